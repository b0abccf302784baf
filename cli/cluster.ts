// `tandem cluster up`: a NATS cluster on this machine (a nats-server with JetStream, N
// middle workers, a gateway) until SIGINT or SIGTERM, which stops every process it started.
import { Command } from 'commander';
import { join } from 'node:path';
import { DEFAULT_NATS_SERVER, launchCluster, parseBlockRanges } from '../cloud-node/index.ts';
import { CliError } from './errors.ts';
import { numberFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { untilSignal } from './cloud.ts';

interface UpFlags {
  model?: string;
  workers: string;
  ranges?: string;
  state: string;
  port: string;
  natsPort: string;
  host: string;
  natsServer: string;
  backend?: string;
}

const BIN = join(import.meta.dirname, '..', 'bin', 'tandem.js');

export function clusterCommand(io: CommandIo, until: () => Promise<void> = untilSignal): Command {
  const cluster = new Command('cluster').description('run Tandem on NATS: gateways, middle workers, JetStream state');
  cluster.command('up')
    .description('start a nats-server (JetStream), N middle workers and a gateway on this machine; stop them all on SIGINT/SIGTERM')
    .option('--model <dir>', 'Hugging Face model folder to serve')
    .option('--workers <n>', 'middle worker processes', '1')
    .option('--ranges <a-b,...>', 'block ranges the workers own, spread in turn (a pipeline when several); the whole model by default')
    .option('--state <dir>', "the cluster's folder: the JetStream store and the gateway's", '.tandem/cluster')
    .option('--port <p>', "the gateway's port", '7470')
    .option('--nats-port <p>', "nats-server's client port", '4222')
    .option('--host <h>', 'address the gateway listens on (nats-server stays on 127.0.0.1, with a password per role made for this launch)', '127.0.0.1')
    .option('--nats-server <path>', 'the nats-server binary', DEFAULT_NATS_SERVER)
    .option('--backend <name>', 'compute backend of the workers and the gateway')
    .action(async (flags: UpFlags) => {
      const modelDir = requiredFlag('--model', flags.model);
      const workers = numberFlag('--workers', flags.workers, { min: 1, max: 64, integer: true });
      let ranges: ReturnType<typeof parseBlockRanges> = [];
      if (flags.ranges !== undefined) {
        try {
          ranges = parseBlockRanges(flags.ranges);
        } catch (cause) {
          throw new CliError('TANDEM_CLI_FLAG_INVALID', '--ranges', (cause as Error).message);
        }
        if (ranges.length > workers) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--ranges', `lists ${ranges.length} ranges for ${workers} workers: each range needs one`);
      }
      const launched = await launchCluster({
        modelDir, workers, ranges, stateDir: flags.state, host: flags.host, backend: flags.backend, bin: BIN, natsServer: flags.natsServer,
        natsPort: numberFlag('--nats-port', flags.natsPort, { min: 1, max: 65535, integer: true }),
        gatewayPort: numberFlag('--port', flags.port, { min: 0, max: 65535, integer: true }),
      });
      io.out(`tandem cluster up: gateway ${launched.gatewayUrl}, nats ${launched.natsUrl}, ${workers} worker(s)`);
      if (launched.adminKey !== undefined) io.out(`admin key (shown once, keep it): ${launched.adminKey}`);
      try {
        await until();
      } finally {
        await launched.stop();
        io.out('tandem cluster stopped');
      }
    });
  return cluster;
}
