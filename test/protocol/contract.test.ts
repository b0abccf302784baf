// The wire contract in protocol/ is what cloud-node sends: every code the edge acts on is in
// the cloud's catalogue, and a node's REST answers carry protocol's file name and default cut.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CLOUD_ERRORS, isCloudErrorCode } from '../../cloud-node/index.ts';
import { AUTH_ERROR_CODES, DEFAULT_CUT, EDGE_WEIGHTS_FILE, WIRE_ERRORS } from '../../protocol/index.ts';

describe('the wire contract', () => {
  it('every wire error code the edge acts on is an entry of the cloud catalogue', () => {
    for (const code of [...Object.values(WIRE_ERRORS), ...AUTH_ERROR_CODES]) assert.ok(isCloudErrorCode(code), `${code} is not in CLOUD_ERRORS`);
    assert.equal(CLOUD_ERRORS[WIRE_ERRORS.activationsGone].status, 409);
    assert.equal(CLOUD_ERRORS[WIRE_ERRORS.modelNotReady].status, 503);
    assert.equal(CLOUD_ERRORS[WIRE_ERRORS.storeFull].status, 503);
  });

  it('the edge weights file and the default cut are fixed values (on-disk and on-wire names never change)', () => {
    assert.equal(EDGE_WEIGHTS_FILE, 'edge.safetensors');
    assert.deepEqual({ ...DEFAULT_CUT }, { bottom: 2, top: 2 });
    assert.ok(Object.isFrozen(DEFAULT_CUT));
  });
});
