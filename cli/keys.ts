import { Command } from 'commander';
import { KeyStore, ensureStateDir } from '../cloud-node/index.ts';
import { requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';

export const DEFAULT_STATE_DIR = '.tandem/cloud';

const STATE_HELP = 'the cloud node state directory';

export function keysCommand(io: CommandIo): Command {
  const keys = new Command('keys').description('API keys of a cloud node (one per data owner); a running node sees changes on its next request');
  keys.command('create')
    .description('create an API key for a tenant; the key is printed once and stored hashed in <state>/keys.json')
    .option('--tenant <name>', 'the data owner the key belongs to')
    .option('--state <dir>', STATE_HELP, DEFAULT_STATE_DIR)
    .option('--json', 'print {tenant, id, prefix, key} as JSON')
    .action(async (flags: { tenant?: string; state: string; json?: boolean }) => {
      const tenant = requiredFlag('--tenant', flags.tenant);
      await ensureStateDir(flags.state);
      const store = await KeyStore.open(flags.state);
      const { record, key } = await store.create(tenant);
      if (flags.json) {
        io.out(JSON.stringify({ tenant: record.tenant, id: record.id, prefix: record.prefix, key }));
      } else {
        io.log(`created a key for tenant ${record.tenant} (id ${record.id}); it is shown once:`);
        io.out(key);
      }
    });
  keys.command('list')
    .description('list the keys: id, tenant, prefix, dates (never the key)')
    .option('--state <dir>', STATE_HELP, DEFAULT_STATE_DIR)
    .option('--json', 'print {keys: [...]} as JSON')
    .action(async (flags: { state: string; json?: boolean }) => {
      const store = await KeyStore.open(flags.state);
      const list = await store.list();
      if (flags.json) {
        io.out(JSON.stringify({ keys: list }));
        return;
      }
      for (const k of list) {
        io.out(`${k.id}  ${(k.prefix || '?').padEnd(12)}…  ${k.tenant}${k.admin ? ' (admin)' : ''}  created ${k.createdAt}${k.revokedAt ? `  REVOKED ${k.revokedAt}` : ''}`);
      }
    });
  keys.command('revoke')
    .description('revoke a key by id (or by a prefix of at least 8 characters that only it has): refused from the next request on, its open sockets disconnected')
    .option('--id <id>', 'the key id (or its prefix) from `tandem keys list`')
    .option('--state <dir>', STATE_HELP, DEFAULT_STATE_DIR)
    .option('--json', 'print the revoked key as JSON')
    .action(async (flags: { id?: string; state: string; json?: boolean }) => {
      const id = requiredFlag('--id', flags.id);
      const store = await KeyStore.open(flags.state);
      const revoked = await store.revoke(id);
      if (flags.json) io.out(JSON.stringify(revoked));
      else io.out(`revoked key ${revoked.id} of tenant ${revoked.tenant} (${revoked.revokedAt})`);
    });
  return keys;
}
