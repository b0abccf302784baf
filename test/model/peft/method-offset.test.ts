// createAdapter's methodOffset: the methods given get the generators they would get at that
// index of one adapter created with the same seed. The cloud creates the middle part of an
// adapter whose first methods the edge holds (protocol 1.3) and must draw what local training draws.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createAdapter } from '../../../model/peft/index.ts';
import type { MethodSpec } from '../../../model/peft/index.ts';
import { tinyModel } from './helpers.ts';

const EDGE: MethodSpec = { method: 'lora', r: 2, targetModules: ['q_proj'], layersToTransform: [0, 2], initLoraWeights: false };
const MIDDLE: MethodSpec = { method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'], layersToTransform: [1], initLoraWeights: false };

const values = (a: ReturnType<typeof createAdapter>): Map<string, number[]> => new Map([...a.state()].map(([k, t]) => [k, [...(t.variable.dataSync() as Float32Array)]]));

describe('createAdapter methodOffset', () => {
  it('the middle method alone at offset 1 equals the second method of the whole adapter; offset 0 does not', () => {
    const model = tinyModel();
    const whole = createAdapter(model, [EDGE, MIDDLE], { seed: 42 });
    const part = createAdapter(model, [MIDDLE], { seed: 42, methodOffset: 1 });
    const first = createAdapter(model, [MIDDLE], { seed: 42 });
    try {
      const all = values(whole);
      const mine = values(part);
      assert.equal(mine.size, 4);
      for (const [k, v] of mine) assert.deepEqual(v, all.get(k), k);
      const [key] = mine.keys();
      assert.notDeepEqual(values(first).get(key), all.get(key));
      assert.throws(() => createAdapter(model, [MIDDLE], { seed: 42, methodOffset: -1 }), /methodOffset/);
    } finally {
      whole.dispose();
      part.dispose();
      first.dispose();
      model.dispose();
    }
  });
});
