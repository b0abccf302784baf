import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { cutPartOf, expectedTensorShapes, layerOf, onEdge } from '../../model/index.ts';
import { llamaConfig } from '../../model/testing.ts';

describe('the cut', () => {
  it('reads the block index of tensor names and adapter keys, and nothing else', () => {
    assert.equal(layerOf('model.layers.7.mlp.up_proj.weight'), 7);
    assert.equal(layerOf('base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight'), 12);
    assert.equal(layerOf('model.norm.weight'), undefined);
    assert.equal(layerOf('model.embed_tokens.weight'), undefined);
    assert.equal(layerOf('xmodel.layers.3.mlp.up_proj.weight'), undefined);
  });

  it('puts every tensor of a 6-block model in the part DESIGN.md gives it at cut (2, 1)', () => {
    const config = llamaConfig({ hidden: 8, layers: 6, heads: 2, kvHeads: 1, intermediate: 16, vocab: 16 });
    const cut = { bottom: 2, top: 1 };
    const parts = new Map<string, string[]>();
    for (const name of expectedTensorShapes(config).keys()) {
      const part = cutPartOf(name, cut, 6);
      parts.set(part, [...(parts.get(part) ?? []), name]);
    }
    assert.deepEqual(parts.get('embedding'), ['model.embed_tokens.weight']);
    assert.deepEqual([...new Set(parts.get('bottom')?.map(layerOf))], [0, 1]);
    assert.deepEqual([...new Set(parts.get('middle')?.map(layerOf))], [2, 3, 4]);
    assert.deepEqual([...new Set(parts.get('top')?.map(layerOf))], [5]);
    assert.ok(parts.get('head')?.includes('model.norm.weight'));
    assert.equal(onEdge('model.layers.4.mlp.down_proj.weight', cut, 6), false);
    assert.equal(onEdge('model.layers.5.mlp.down_proj.weight', cut, 6), true);
    assert.equal(onEdge('lm_head.weight', cut, 6), true);
  });
});
