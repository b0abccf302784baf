// `tandem federation create|status|export` (the admin) and `tandem edge federate` (an owner).
import { Command } from 'commander';
import { FederationAdmin, federate, readAdapterFolder, writeAdapterFolder } from '../edge-client/index.ts';
import { CODEC_NAMES, DEFAULT_OWNER_TIMEOUT_SECONDS, FEDERATION_AGGREGATIONS, FEDERATION_MODES, encodeFloat32 } from '../protocol/index.ts';
import type { CodecName, FederationAggregation, FederationCreate, FederationMode, FederationStatus } from '../protocol/index.ts';
import { CliError } from './errors.ts';
import { numberFlag, pemFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { choice } from './recipe.ts';
import { intList } from './train.ts';

interface CommonFlags {
  cloud?: string;
  key?: string;
  federation?: string;
  json?: boolean;
}

interface CreateFlags extends CommonFlags {
  id?: string;
  model?: string;
  adapter?: string;
  mode?: string;
  cut?: string;
  fedproxMu?: string;
  owners?: string;
  rounds?: string;
  sample?: string;
  minOwners?: string;
  localSteps?: string;
  deadline?: string;
  ownerTimeout?: string;
  aggregation?: string;
  trimFraction?: string;
  serverLr?: string;
  secagg?: boolean;
  dpClip?: string;
  dpNoise?: string;
  dpDelta?: string;
  dpEpsilon?: string;
}

function admin(flags: CommonFlags): FederationAdmin {
  return new FederationAdmin(requiredFlag('--cloud', flags.cloud), requiredFlag('--key', flags.key ?? process.env.TANDEM_KEY));
}

function printStatus(io: CommandIo, s: FederationStatus, json?: boolean): void {
  if (json) {
    io.out(JSON.stringify(s));
    return;
  }
  io.out(`federation ${s.id} (${s.model}, ${s.mode}, ${s.aggregation}${s.secureAggregation ? ', secagg' : ''}): ${s.state}, round ${Math.min(s.round, s.rounds)}/${s.rounds} attempt ${s.attempt}`);
  io.out(`owners: ${s.owners.join(', ')}; this round sampled ${s.current.sampled.join(', ') || '-'}, received ${s.current.received.join(', ') || '-'}`);
  if (s.epsilon !== null) io.out(`privacy: ε = ${s.epsilon.toFixed(3)} at δ = ${s.delta}`);
  for (const h of s.history) {
    const val = Object.entries(h.validation).map(([o, v]) => `${o} ${v.loss.toFixed(3)}${v.accuracy === undefined ? '' : `/${(v.accuracy * 100).toFixed(1)}%`}`).join(', ');
    const lora = h.lora ? `, rank-r refactoring error ${h.lora.refactorError.toExponential(2)} (naive A/B averaging ${h.lora.naiveError.toExponential(2)})` : '';
    io.out(`round ${h.round}.${h.attempt}: ${h.participants.length}/${h.sampled.length} owners, loss ${h.loss?.toFixed(4) ?? '-'}, bytes in ${h.bytesReceived} out ${h.bytesSent}${h.epsilon === null ? '' : `, ε ${h.epsilon.toFixed(3)}`}${val ? `, validation ${val}` : ''}${lora}`);
  }
  const rejected = Object.entries(s.rejected);
  if (rejected.length) io.out(`rejected updates: ${rejected.map(([c, n]) => `${c} ×${n}`).join(', ')}`);
}

export function federationCommand(io: CommandIo): Command {
  const fed = new Command('federation').description('federations of several data owners training one adapter (admin side)');
  fed.command('create')
    .description('create a federation on a cloud node (admin key)')
    .option('--cloud <url>', 'cloud node URL').option('--key <key>', 'admin API key (or TANDEM_KEY)')
    .option('--id <id>', 'federation id').option('--model <id>', 'model id the cloud serves')
    .option('--adapter <dir>', 'PEFT folder of the initial global adapter')
    .option('--mode <mode>', `owners' local training: ${FEDERATION_MODES.join(' or ')}`, 'offsite')
    .option('--cut <B,T>', "split mode: bottom and top blocks on the owners' side (the model's default cut when absent)")
    .option('--fedprox-mu <mu>', 'FedProx: μ of the proximal term μ/2·‖w − w_global‖² in every owner\'s loss (0: FedAvg)')
    .option('--owners <a,b,c>', 'invited tenants, comma-separated')
    .option('--rounds <n>', 'rounds', '5').option('--sample <n>', 'owners sampled per round (default all)')
    .option('--min-owners <n>', 'fewest updates a round completes with (default: the sample)')
    .option('--local-steps <n>', 'local steps per round', '10').option('--deadline <s>', 'round deadline in seconds', '600')
    .option('--owner-timeout <s>', `an owner the round waits on, silent this long, is taken as gone; the round moves on once all it waits on are (default min(${DEFAULT_OWNER_TIMEOUT_SECONDS}, the deadline))`)
    .option('--aggregation <name>', FEDERATION_AGGREGATIONS.join(', '), 'fedavg').option('--trim-fraction <f>', 'trimmed mean: fraction cut at each end')
    .option('--server-lr <lr>', 'server learning rate (FedAvg 1, FedAdam 0.01 by default)')
    .option('--secagg', 'secure aggregation (SecAgg: the cloud learns only the sum of the updates)')
    .option('--dp-clip <C>', 'client-level DP: clip norm').option('--dp-noise <sigma>', 'noise multiplier').option('--dp-delta <d>', 'δ', '1e-5').option('--dp-epsilon <e>', 'ε budget')
    .option('--json', 'print the status as JSON')
    .action(async (flags: CreateFlags) => {
      const owners = requiredFlag('--owners', flags.owners).split(',').map((o) => o.trim()).filter(Boolean);
      const sampleSize = numberFlag('--sample', flags.sample, { min: 1, integer: true, fallback: owners.length });
      const body: FederationCreate = {
        id: requiredFlag('--id', flags.id), model: requiredFlag('--model', flags.model),
        mode: choice<FederationMode>('--mode', flags.mode, FEDERATION_MODES, 'offsite'),
        adapter: await readAdapterFolder(requiredFlag('--adapter', flags.adapter)), owners,
        rounds: numberFlag('--rounds', flags.rounds, { min: 1, integer: true }), sampleSize,
        minOwners: numberFlag('--min-owners', flags.minOwners, { min: 1, integer: true, fallback: sampleSize }),
        localSteps: numberFlag('--local-steps', flags.localSteps, { min: 1, integer: true }),
        roundDeadlineSeconds: numberFlag('--deadline', flags.deadline, { min: 1, integer: true }),
        aggregation: choice<FederationAggregation>('--aggregation', flags.aggregation, FEDERATION_AGGREGATIONS, 'fedavg'),
        secureAggregation: flags.secagg === true,
      };
      if (flags.cut !== undefined) {
        const cut = intList('--cut', flags.cut);
        if (cut.length !== 2) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--cut', `must be two integers B,T, got ${JSON.stringify(flags.cut)}`);
        body.cut = { bottom: cut[0], top: cut[1] };
      }
      if (flags.ownerTimeout !== undefined) body.ownerTimeoutSeconds = numberFlag('--owner-timeout', flags.ownerTimeout, { min: 1, max: body.roundDeadlineSeconds, integer: true });
      if (flags.fedproxMu !== undefined) body.fedproxMu = numberFlag('--fedprox-mu', flags.fedproxMu, { min: 0 });
      if (flags.trimFraction !== undefined) body.trimFraction = numberFlag('--trim-fraction', flags.trimFraction, { min: 0, max: 0.49 });
      if (flags.serverLr !== undefined) body.serverLearningRate = numberFlag('--server-lr', flags.serverLr, { min: 0 });
      if (flags.dpClip !== undefined || flags.dpNoise !== undefined || flags.dpEpsilon !== undefined) {
        body.dp = {
          clipNorm: numberFlag('--dp-clip', flags.dpClip, { min: 0 }), noiseMultiplier: numberFlag('--dp-noise', flags.dpNoise, { min: 0 }),
          delta: numberFlag('--dp-delta', flags.dpDelta, { min: 0, max: 0.5 }), epsilonBudget: numberFlag('--dp-epsilon', flags.dpEpsilon, { min: 0 }),
        };
      }
      printStatus(io, await admin(flags).create(body), flags.json);
    });
  fed.command('status')
    .description('rounds, participants and per-round figures: training loss, owners\' validation, bytes, ε')
    .option('--cloud <url>', 'cloud node URL').option('--key <key>', 'API key (or TANDEM_KEY)').option('--federation <id>', 'federation id').option('--json', 'JSON')
    .action(async (flags: CommonFlags) => printStatus(io, await admin(flags).status(requiredFlag('--federation', flags.federation)), flags.json));
  fed.command('export')
    .description('write the global adapter as a PEFT folder (admin key)')
    .option('--cloud <url>', 'cloud node URL').option('--key <key>', 'admin API key (or TANDEM_KEY)').option('--federation <id>', 'federation id').option('--out <dir>', 'output folder')
    .action(async (flags: CommonFlags & { out?: string }) => {
      const out = requiredFlag('--out', flags.out);
      await writeAdapterFolder(await admin(flags).adapter(requiredFlag('--federation', flags.federation)), out);
      io.out(`wrote the global adapter of ${flags.federation} to ${out}`);
    });
  return fed;
}

interface FederateFlags extends CommonFlags {
  ca?: string;
  data?: string;
  model?: string;
  work?: string;
  codec?: string;
  poll?: string;
  batchSize?: string;
  seqLen?: string;
  lr?: string;
  seed?: string;
  backend?: string;
}

/** `tandem edge federate`: join a federation and take part in every round this owner is sampled for. */
export function federateCommand(io: CommandIo): Command {
  return new Command('federate')
    .description('join a federation: for each round sampled, train the global adapter locally and send the update')
    .option('--cloud <url>', 'cloud node URL').option('--key <key>', "this owner's API key (or TANDEM_KEY)").option('--federation <id>', 'federation id')
    .option('--ca <file>', "PEM CA certificate an https:// cloud's certificate must chain to (a private CA)")
    .option('--data <file>', "this owner's data file").option('--model <dir>', 'offsite mode: the model folder local training runs on (the emulated model of a bundle); split mode downloads the edge part')
    .option('--codec <codec>', `split mode: codec of activations and gradients (${CODEC_NAMES.join(', ')})`, 'f32')
    .option('--work <dir>', 'scratch folder', '.tandem/federate').option('--poll <ms>', 'how often to ask for the next round', '500')
    .option('--batch-size <n>', 'rows per micro-batch', '8').option('--seq-len <n>', 'tokens per row', '64').option('--lr <lr>', 'local learning rate', '0.001').option('--seed <n>', 'seed', '0')
    .option('--backend <name>', 'compute backend')
    .option('--json', 'print one JSON line per event (with the update sent, base64 float32)')
    .action(async (flags: FederateFlags) => {
      const ca = flags.ca === undefined ? undefined : (await pemFlag('--ca', flags.ca)).toString('utf8');
      const result = await federate({
        cloud: requiredFlag('--cloud', flags.cloud), key: requiredFlag('--key', flags.key ?? process.env.TANDEM_KEY), ca, federation: requiredFlag('--federation', flags.federation),
        data: requiredFlag('--data', flags.data), modelDir: flags.model, codec: choice<CodecName>('--codec', flags.codec, CODEC_NAMES, 'f32'), workDir: flags.work ?? '.tandem/federate',
        pollMs: numberFlag('--poll', flags.poll, { min: 10, integer: true }), backend: flags.backend,
        recipe: {
          batchSize: numberFlag('--batch-size', flags.batchSize, { min: 1, integer: true }), seqLen: numberFlag('--seq-len', flags.seqLen, { min: 2, integer: true }),
          lr: numberFlag('--lr', flags.lr, { min: 0 }), seed: numberFlag('--seed', flags.seed, { min: 0, integer: true }), warmupSteps: 0, valFraction: 0.2,
        },
        onReady: () => (flags.json ? io.out(JSON.stringify({ event: 'ready' })) : io.log('model loaded; joining')),
        onTraining: (round, attempt) => (flags.json ? io.out(JSON.stringify({ event: 'training', round, attempt })) : io.log(`round ${round}.${attempt}: training`)),
        onRound: (e) => {
          if (flags.json) io.out(JSON.stringify({ event: 'round', round: e.round, attempt: e.attempt, loss: e.loss, examples: e.examples, validation: e.validation ?? null, refused: e.refused ?? null, accepted: e.ack?.accepted ?? false, secaggSeconds: e.secaggSeconds ?? null, update: encodeFloat32(e.update) }));
          else io.out(`round ${e.round}.${e.attempt}: loss ${e.loss.toFixed(4)}, ${e.examples} examples, ${e.updateBytes} bytes sent${e.refused ? `, refused: ${e.refused}` : ''}`);
        },
      });
      if (flags.json) io.out(JSON.stringify({ event: 'done', state: result.state, rounds: result.rounds.length }));
      else io.out(`federation ${flags.federation} is ${result.state}; this owner took part in ${result.rounds.filter((r) => r.ack).length} rounds`);
      if (result.state === 'stopped') throw new CliError('TANDEM_CLI_FLAG_INVALID', '--federation', 'the federation stopped (privacy budget)');
    });
}
