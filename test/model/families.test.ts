import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import * as model from '../../model/index.ts';
import { MODEL_FAMILIES, ModelFamilyRegistry, SUPPORTED_MODEL_TYPES, parseModelConfig } from '../../model/index.ts';
import { throwsModelError } from './helpers.ts';

const base = { hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, vocab_size: 16 };

describe('model families', () => {
  it('are registered once by model_type: llama, mistral, qwen2', () => {
    assert.deepEqual(MODEL_FAMILIES.modelTypes(), ['llama', 'mistral', 'qwen2']);
    assert.deepEqual(SUPPORTED_MODEL_TYPES, ['llama', 'mistral', 'qwen2']);
  });

  it('read config.json as their family does: Qwen2 always has q/k/v biases, llama only with attention_bias', () => {
    assert.equal(parseModelConfig({ ...base, model_type: 'qwen2' }).attentionBias, true);
    assert.equal(parseModelConfig({ ...base, model_type: 'llama' }).attentionBias, false);
    assert.equal(parseModelConfig({ ...base, model_type: 'llama', attention_bias: true }).attentionBias, true);
    assert.equal(parseModelConfig({ ...base, model_type: 'mistral' }).modelType, 'mistral');
  });

  it('cut the context to an attention window, whose attention equals full attention only that far (found by fuzzing)', () => {
    const ctx = (raw: Record<string, unknown>): number => parseModelConfig({ ...base, max_position_embeddings: 32768, ...raw }).maxPositionEmbeddings;
    assert.equal(ctx({ model_type: 'mistral', sliding_window: 4096 }), 4096);
    assert.equal(ctx({ model_type: 'mistral', sliding_window: null }), 32768);
    assert.equal(ctx({ model_type: 'mistral', sliding_window: 65536 }), 32768, 'a window over the context changes nothing');
    assert.equal(ctx({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 2, max_window_layers: 0 }), 2);
    assert.equal(ctx({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 2 }), 32768, 'max_window_layers 28 by default: no layer of one uses the window');
    assert.equal(ctx({ model_type: 'qwen2', use_sliding_window: false, sliding_window: 2, max_window_layers: 0 }), 32768);
    throwsModelError(() => parseModelConfig({ ...base, model_type: 'mistral', sliding_window: -1 }), 'TANDEM_MODEL_CONFIG_INVALID', 'sliding_window');
  });

  it('refuse an unknown model_type naming the supported ones, and a family registered twice', () => {
    throwsModelError(() => parseModelConfig({ ...base, model_type: 'gpt2' }), 'TANDEM_MODEL_TYPE_UNSUPPORTED', 'gpt2', 'llama, mistral, qwen2');
    const registry = new ModelFamilyRegistry();
    const family = { modelType: 'x', architecture: 'XForCausalLM', attentionBias: () => false };
    registry.register(family);
    assert.equal(registry.get('x'), family);
    throwsModelError(() => registry.register(family), 'TANDEM_MODEL_FAMILY_DUPLICATE', '"x"');
  });

  it("model/index.ts keeps test helpers out of the public surface (they live in model/testing.ts)", () => {
    for (const name of ['llamaConfig', 'randomWeights', 'SMOLLM_135M_SHAPE', 'useBackend']) assert.equal(name in model, false, name);
  });
});
