import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { main } from '../../cli/main.ts';
import { createAdapter, generate, initBackend, LlamaModel, loadModelFolder, saveAdapter, tf } from '../../model/index.ts';
import type { CommandIo } from '../../cli/io.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const reference = JSON.parse(readFileSync(join(fixture, 'reference-once-upon-a-time.json'), 'utf8')) as {
  input_ids: number[];
  greedy_ids: number[];
  full_text: string;
  last_prompt_position_top10: { id: number; logit: number }[];
};

async function run(argv: string[]): Promise<{ code: number; out: string[]; log: string[] }> {
  const out: string[] = [];
  const log: string[] = [];
  const io: CommandIo = { out: (l) => out.push(l), log: (l) => log.push(l) };
  const code = await main(argv, io);
  return { code, out, log };
}

describe('tandem generate', () => {
  for (const backend of ['wasm', 'cpu']) {
    it(`reproduces the stories260K reference greedily on ${backend}`, async () => {
      const { code, out } = await run(['generate', '--model', fixture, '--prompt', 'Once upon a time', '--max-new-tokens', '32', '--temperature', '0', '--json', '--backend', backend]);
      assert.equal(code, 0);
      const result = JSON.parse(out.join('\n')) as { input_ids: number[]; generated_ids: number[]; text: string; top_logits: { id: number; logit: number }[] };
      assert.deepEqual(result.input_ids, reference.input_ids);
      assert.deepEqual(result.generated_ids, reference.greedy_ids);
      assert.equal(result.text, reference.full_text);
      assert.equal(result.top_logits.length, 10);
      result.top_logits.forEach((t, i) => {
        assert.equal(t.id, reference.last_prompt_position_top10[i].id);
        assert.ok(Math.abs(t.logit - reference.last_prompt_position_top10[i].logit) < 1e-4, `logit ${i}: ${t.logit}`);
      });
    });
  }

  it('reproduces the stories260K reference greedily on ONNX Runtime (--engine ort-cpu, KV cache)', async () => {
    const { code, out } = await run(['generate', '--model', fixture, '--prompt', 'Once upon a time', '--max-new-tokens', '32', '--temperature', '0', '--json', '--engine', 'ort-cpu']);
    assert.equal(code, 0);
    const result = JSON.parse(out.join('\n')) as { input_ids: number[]; generated_ids: number[]; text: string; top_logits: { id: number; logit: number }[] };
    assert.deepEqual(result.input_ids, reference.input_ids);
    assert.deepEqual(result.generated_ids, reference.greedy_ids);
    assert.equal(result.text, reference.full_text);
    result.top_logits.forEach((t, i) => {
      assert.equal(t.id, reference.last_prompt_position_top10[i].id);
      assert.ok(Math.abs(t.logit - reference.last_prompt_position_top10[i].logit) < 1e-4, `logit ${i}: ${t.logit}`);
    });
  });

  it('generates on the selected engine by default, logging the choice', async () => {
    const { code, out, log } = await run(['generate', '--model', fixture, '--prompt', 'Once upon a time', '--max-new-tokens', '32', '--temperature', '0']);
    assert.equal(code, 0);
    assert.equal(out.join('\n'), reference.full_text);
    if (!process.env.TANDEM_ENGINE) assert.match(log.join('\n'), /^engine: ort-(cpu|cuda)/m);
  });

  it('samples on ONNX Runtime the tokens tfjs samples with the same seed', async () => {
    const args = ['generate', '--model', fixture, '--prompt', 'One day', '--max-new-tokens', '24', '--temperature', '1', '--top-p', '0.95', '--seed', '1', '--json'];
    const tfjs = JSON.parse((await run([...args, '--backend', 'wasm'])).out[0]) as { generated_ids: number[] };
    const ort = JSON.parse((await run([...args, '--engine', 'ort-cpu'])).out[0]) as { generated_ids: number[] };
    assert.ok(tfjs.generated_ids.length > 0);
    assert.deepEqual(ort.generated_ids, tfjs.generated_ids);
  });

  it('refuses an unknown --engine with a typed error', async () => {
    const bad = await run(['generate', '--model', fixture, '--engine', 'abacus']);
    assert.equal(bad.code, 2);
    assert.match(bad.log.join('\n'), /TANDEM_BACKEND_UNAVAILABLE.*abacus/);
  });

  it('samples reproducibly with a seed and differently with another', async () => {
    const args = ['generate', '--model', fixture, '--prompt', 'One day', '--max-new-tokens', '24', '--temperature', '1', '--top-p', '0.95', '--json'];
    const a = JSON.parse((await run([...args, '--seed', '1'])).out[0]) as { generated_ids: number[] };
    const b = JSON.parse((await run([...args, '--seed', '1'])).out[0]) as { generated_ids: number[] };
    const c = JSON.parse((await run([...args, '--seed', '2'])).out[0]) as { generated_ids: number[] };
    assert.deepEqual(a.generated_ids, b.generated_ids);
    assert.notDeepEqual(a.generated_ids, c.generated_ids);
  });

  it('refuses bad flags and missing folders with a typed error and exit code 2', async () => {
    const bad = await run(['generate', '--model', fixture, '--max-new-tokens', 'many']);
    assert.equal(bad.code, 2);
    assert.match(bad.log.join('\n'), /TANDEM_CLI_FLAG_INVALID: --max-new-tokens/);
    const missing = await run(['generate', '--model', join(fixture, 'nope'), '--prompt', 'x']);
    assert.equal(missing.code, 2);
    assert.match(missing.log.join('\n'), /TANDEM_MODEL_FILE_MISSING.*nope/);
    const backend = await run(['generate', '--model', fixture, '--backend', 'abacus']);
    assert.equal(backend.code, 2);
    assert.match(backend.log.join('\n'), /TANDEM_BACKEND_UNAVAILABLE/);
  });

  it('applies a PEFT adapter with --adapter', async () => {
    await initBackend({ backend: 'wasm' });
    const loaded = await loadModelFolder(fixture);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] }], { seed: 3 });
    // A trained-looking adapter: B away from its zero init.
    for (const [name, v] of adapter.trainableVariables()) if (name.includes('lora_B')) v.assign(tf.mul(tf.randomNormal(v.shape, 0, 1, 'float32', 5), 0.5));
    const dir = mkdtempSync(join(tmpdir(), 'tandem-adapter-'));
    try {
      await saveAdapter(adapter, dir, { baseModel: 'stories260K' });
      const expected = generate(model, reference.input_ids, { maxNewTokens: 16, temperature: 0, hooks: adapter.hooks, stopTokenIds: [] });
      const { code, out } = await run(['generate', '--model', fixture, '--adapter', dir, '--prompt', 'Once upon a time', '--max-new-tokens', '16', '--temperature', '0', '--json', '--backend', 'wasm']);
      assert.equal(code, 0);
      const result = JSON.parse(out[0]) as { top_logits: { id: number; logit: number }[]; generated_ids: number[] };
      assert.notEqual(result.top_logits[0].logit, reference.last_prompt_position_top10[0].logit);
      result.top_logits.forEach((t, i) => assert.ok(Math.abs(t.logit - expected.topLogits[i].logit) < 1e-4));
      assert.deepEqual(result.generated_ids, expected.generatedIds.slice(0, result.generated_ids.length));
      // On ONNX Runtime the LoRA adapter is merged into the weights: the same logits and tokens.
      const onOrt = await run(['generate', '--model', fixture, '--adapter', dir, '--prompt', 'Once upon a time', '--max-new-tokens', '16', '--temperature', '0', '--json', '--engine', 'ort-cpu']);
      assert.equal(onOrt.code, 0, onOrt.log.join('\n'));
      const ort = JSON.parse(onOrt.out[0]) as { top_logits: { id: number; logit: number }[]; generated_ids: number[] };
      ort.top_logits.forEach((t, i) => {
        assert.equal(t.id, expected.topLogits[i].id);
        assert.ok(Math.abs(t.logit - expected.topLogits[i].logit) < 1e-4, `ORT logit ${i}: ${t.logit} vs ${expected.topLogits[i].logit}`);
      });
      assert.deepEqual(ort.generated_ids, result.generated_ids);
    } finally {
      adapter.dispose();
      model.dispose();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
