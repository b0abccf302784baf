// Uniform layer drop as Offsite-Tuning's reference code does it, and the emulated numbering.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { EmulatorError, edgeLayers, emulatorLayout, keptMiddleIndices, toEmulatedLayer, toFullLayer } from '../../emulator/index.ts';
import { renameLayer } from '../../model/index.ts';

describe('uniform layer drop', () => {
  it('keeps round(i·(n−1)/(K−1)) with Python rounding, first and last always', () => {
    const cases: [number, number, number[]][] = [
      [3, 2, [0, 2]],
      [3, 3, [0, 1, 2]],
      [4, 3, [0, 2, 3]], // 1.5 rounds to 2
      [5, 3, [0, 2, 4]],
      [6, 3, [0, 2, 5]], // 2.5 rounds to the even 2
      [6, 5, [0, 1, 2, 4, 5]], // 1.25, 2.5, 3.75
      [10, 4, [0, 3, 6, 9]],
      [20, 8, [0, 3, 5, 8, 11, 14, 16, 19]],
      [1, 1, [0]],
    ];
    for (const [n, k, want] of cases) assert.deepEqual(keptMiddleIndices(n, k), want, `n=${n} K=${k}`);
  });

  it('refuses K larger than the middle, K < 2 for a longer middle, and non-integers', () => {
    for (const [n, k] of [[3, 4], [3, 1], [3, 0], [4, 2.5]]) {
      assert.throws(() => keptMiddleIndices(n, k), (e: unknown) => e instanceof EmulatorError && e.code === 'TANDEM_EMULATOR_KEEP_INVALID', `n=${n} K=${k}`);
    }
    assert.throws(() => emulatorLayout(5, { bottom: 1, top: 1 }, 4), /TANDEM_EMULATOR_KEEP_INVALID.*the middle has 3 blocks/);
    assert.throws(() => emulatorLayout(5, { bottom: 3, top: 2 }, 1), /TANDEM_EMULATOR_OPTION_INVALID/);
  });

  it('numbers the emulated model bottom, kept, top and maps both ways', () => {
    const layout = emulatorLayout(12, { bottom: 2, top: 2 }, 3); // middle 2..9: 0, 3.5 → 4 (even), 7
    assert.deepEqual(layout.kept, [2, 6, 9]);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((j) => toFullLayer(layout, j)), [0, 1, 2, 6, 9, 10, 11]);
    assert.deepEqual([0, 1, 2, 3, 6, 9, 10, 11].map((i) => toEmulatedLayer(layout, i)), [0, 1, 2, undefined, 3, 4, 5, 6]);
    assert.deepEqual(edgeLayers(layout), [0, 1, 10, 11]);
    assert.equal(renameLayer('base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight', (j) => toFullLayer(layout, j)), 'base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight');
    assert.equal(renameLayer('model.layers.6.mlp.up_proj.weight', (j) => toFullLayer(layout, j)), 'model.layers.11.mlp.up_proj.weight');
    assert.equal(renameLayer('model.norm.weight', () => 0), 'model.norm.weight');
  });
});
