import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CliError } from '../../cli/errors.ts';
import { CloudError } from '../../cloud-node/errors.ts';
import { TandemError, defineErrors, isTandemError } from '../../common/define-errors.ts';
import { EdgeError } from '../../edge-client/errors.ts';
import { EmulatorError } from '../../emulator/errors.ts';
import { ModelError } from '../../model/errors.ts';
import { ProtocolError } from '../../protocol/errors.ts';

describe('defineErrors', () => {
  const defined = defineErrors('WidgetError', {
    TANDEM_WIDGET_TOO_BIG: { template: '{field} is {actual}, over the limit of {limit}', status: 413 },
    TANDEM_WIDGET_GONE: { summary: 'the widget is gone' },
  });
  class WidgetError extends defined.Base {}

  it('fills the template, keeps the code out of the message, the status and the cause', () => {
    const cause = new RangeError('boom');
    const e = new WidgetError('TANDEM_WIDGET_TOO_BIG', defined.format('TANDEM_WIDGET_TOO_BIG', { field: 'size', actual: 9, limit: 8 }), { details: { limit: 8 }, cause });
    assert.equal(e.message, 'size is 9, over the limit of 8');
    assert.equal(e.describe(), 'TANDEM_WIDGET_TOO_BIG: size is 9, over the limit of 8');
    assert.equal(e.name, 'WidgetError');
    assert.equal(e.status, 413);
    assert.equal(e.cause, cause);
    assert.deepEqual(e.details, { limit: 8 });
    assert.match(String(e), /^WidgetError: TANDEM_WIDGET_TOO_BIG: size is 9/);
    assert.match(e.stack ?? '', /^WidgetError: TANDEM_WIDGET_TOO_BIG: size is 9/);
    assert.ok(e instanceof TandemError && e instanceof Error);
    assert.equal(defined.isCode('TANDEM_WIDGET_GONE'), true);
    assert.equal(defined.isCode('TANDEM_NOPE'), false);
    assert.equal(defined.format('TANDEM_WIDGET_GONE', { reason: 'eaten' }), 'eaten');
  });

  it('every folder builds its errors on it: one check recognises them all, and a look-alike is not one', () => {
    const all = [
      new ModelError('TANDEM_INPUT_INVALID', 'x', { field: 'f' }),
      new EmulatorError('TANDEM_BUNDLE_INVALID', 'x'),
      new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: 'f', reason: 'x' }),
      new CloudError('TANDEM_SESSION_UNKNOWN', { session: 's' }),
      new EdgeError('TANDEM_EDGE_CLOSED', 'x'),
      new CliError('TANDEM_CLI_FLAG_INVALID', '--steps', 'x'),
    ];
    for (const e of all) {
      assert.ok(isTandemError(e), e.name);
      assert.ok(!e.message.includes(e.code), `${e.name}: the code is kept out of the message: ${e.message}`);
      assert.ok(e.describe().startsWith(e.code), e.describe());
    }
    assert.equal(new CloudError('TANDEM_SESSION_UNKNOWN', { session: 's' }).status, 404);
    assert.equal(new ProtocolError('TANDEM_PROTO_INPUT_INVALID', {}).number, 4023);
    assert.equal(isTandemError(Object.assign(new Error('TANDEM_X: y'), { code: 'TANDEM_X' })), false);
  });
});
