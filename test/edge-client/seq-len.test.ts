// A split run whose rows cannot fit the model's positions is refused from the model's
// description (GET /v1/models), before the edge part is downloaded for it.
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { before, describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainOptions } from '../../edge-client/index.ts';
import { ModelError, initBackend } from '../../model/index.ts';
import { createTenantKey, startTestNode, tempDir } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';
import { DEMO_DATA, MODEL_ID } from './helpers.ts';

/** stories260K's max_position_embeddings. */
const POSITIONS = 512;

describe('--seq-len against the model\'s positions', () => {
  let node: TestNode;
  let key = '';
  before(async () => {
    await initBackend({ backend: 'wasm' });
    node = await startTestNode();
    key = await createTenantKey(node, 'owner');
  });

  /** trainEdge's refusal and the cache folder's entries afterwards. */
  async function refused(options: Partial<EdgeTrainOptions>): Promise<{ err: unknown; cached: string[]; events: number }> {
    const cacheDir = await tempDir();
    let events = 0;
    const err = await trainEdge({
      cloud: node.url, key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 1, batchSize: 1, evaluate: false, cacheDir,
      onEvent: () => {
        events++;
      },
      ...options,
    }).then(() => undefined, (e: unknown) => e);
    return { err, cached: await readdir(cacheDir), events };
  }

  function assertSeqLenError(err: unknown, ...mentions: string[]): void {
    assert.ok(err instanceof ModelError, `expected a ModelError, got ${String(err)}`);
    assert.equal(err.code, 'TANDEM_TRAIN_OPTION_INVALID', err.message);
    assert.equal(err.field, 'seqLen');
    for (const m of mentions) assert.ok(err.message.includes(m), `message should name ${JSON.stringify(m)}: ${err.message}`);
  }

  it('one position more than max_position_embeddings: TANDEM_TRAIN_OPTION_INVALID, and no edge part downloaded', async () => {
    const { err, cached, events } = await refused({ seqLen: POSITIONS + 1 });
    assertSeqLenError(err, String(POSITIONS + 1), `max_position_embeddings ${POSITIONS}`);
    assert.deepEqual(cached, [], 'the cache holds no edge part');
    assert.equal(events, 0);
  });

  it('a sequence that fits only without the prompt-tuning adapter\'s virtual tokens: refused the same way, naming them', async () => {
    const { err, cached } = await refused({ seqLen: POSITIONS - 2, methods: [{ method: 'prompt_tuning', numVirtualTokens: 4 }] });
    assertSeqLenError(err, '4 virtual tokens', `max_position_embeddings ${POSITIONS}`);
    assert.deepEqual(cached, []);
  });
});
