// The edge's part comes from the cloud, which decides its bytes: a weights file whose header
// names more tensors than the whole model has is refused before its header is parsed.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CloudRest, downloadEdgePart, loadEdgePart } from '../../edge-client/index.ts';
import { ModelError, initBackend, maxCheckpointTensors, readModelConfig, writeSafetensorsFile } from '../../model/index.ts';
import type { SafetensorsTensorInput } from '../../model/index.ts';
import { EDGE_WEIGHTS_FILE } from '../../protocol/index.ts';
import { createTenantKey, startTestNode } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';
import { tempDir } from '../model/helpers.ts';

describe('an edge part from the cloud', () => {
  let node: TestNode;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    node = await startTestNode();
  });
  after(() => node.close());

  it('whose weights name more tensors than the model has is refused as TANDEM_SAFETENSORS_INVALID', async () => {
    const rest = new CloudRest(node.url, await createTenantKey(node, 'owner'));
    const part = await downloadEdgePart(rest, 'stories260K', { bottom: 1, top: 1 }, await tempDir());
    const fitting = await loadEdgePart(part);
    fitting.model.dispose();
    const limit = maxCheckpointTensors(await readModelConfig(part.dir));
    const many = new Map<string, SafetensorsTensorInput>();
    for (let i = 0; i <= limit; i++) many.set(`t.${i}`, { dtype: 'F32', shape: [1], data: new Float32Array(1) });
    await writeSafetensorsFile(join(part.dir, EDGE_WEIGHTS_FILE), many, { format: 'pt' });
    await assert.rejects(loadEdgePart(part), (err: unknown) => {
      assert.ok(err instanceof ModelError, String(err));
      assert.equal(err.code, 'TANDEM_SAFETENSORS_INVALID');
      assert.match(err.message, new RegExp(`more than ${limit} tensors`));
      return true;
    });
  });
});
