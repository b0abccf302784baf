import { Command } from 'commander';
import { mkdir } from 'node:fs/promises';
import { KeyStore } from '../cloud-node/index.ts';
import { requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';

export const DEFAULT_STATE_DIR = '.tandem/cloud';

export function keysCommand(io: CommandIo): Command {
  const keys = new Command('keys').description('API keys of a cloud node (one per data owner)');
  keys.command('create')
    .description('create an API key for a tenant; the key is printed once and stored hashed in <state>/keys.json')
    .option('--tenant <name>', 'the data owner the key belongs to')
    .option('--state <dir>', 'the cloud node state directory', DEFAULT_STATE_DIR)
    .option('--json', 'print {tenant, id, key} as JSON')
    .action(async (flags: { tenant?: string; state: string; json?: boolean }) => {
      const tenant = requiredFlag('--tenant', flags.tenant);
      await mkdir(flags.state, { recursive: true });
      const store = await KeyStore.open(flags.state);
      const { record, key } = await store.create(tenant);
      if (flags.json) {
        io.out(JSON.stringify({ tenant: record.tenant, id: record.id, key }));
      } else {
        io.log(`created a key for tenant ${record.tenant} (id ${record.id}); it is shown once:`);
        io.out(key);
      }
    });
  return keys;
}
