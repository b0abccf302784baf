// The worker thread of adapter evaluation (node:worker_threads): loads the served model and its
// tokenizer once, then runs one evaluation at a time, in arrival order. Tokenizing the data and
// running the model twice over it (with the adapter and without) is seconds to minutes of
// compute that would otherwise stop the node's event loop: heartbeats, REST and other tenants
// go on while it runs. The node's thread has checked the adapter's files and the request's
// limits before sending it here (adapter-evaluator.ts); this thread checks them again, as
// evaluateAdapter does, and bounds the compute by the tokens the data makes.
import { parentPort, workerData } from 'node:worker_threads';
import { LlamaModel, checkTokenizerFits, initFirstBackend, loadModelFolder, loadTokenizer } from '../model/index.ts';
import type { Tokenizer } from '../model/index.ts';
import type { AdapterEvaluation } from '../protocol/index.ts';
import { evaluateAdapter } from './adapter-evaluation.ts';
import type { AdapterFiles, EvaluationData, EvaluationOptions } from './adapter-evaluation.ts';
import { CloudError, resourceErrorOf } from './errors.ts';
import type { CloudErrorCode, CloudErrorDetails } from './errors.ts';

export interface EvaluationWorkerStart {
  modelDir: string;
  /** The served model's id, for errors. */
  modelId: string;
  /** tfjs backends to try in turn (the one the node's thread picked first). */
  backends: string[];
}

export type EvaluationWorkerRequest = { op: 'evaluate'; req: number; files: AdapterFiles; data: EvaluationData; options: EvaluationOptions };

export type EvaluationWorkerReply =
  | { op: 'ready'; backend: string }
  | { op: 'evaluated'; req: number; result: AdapterEvaluation }
  /** A refusal of the request (`code` set), or a failure of the compute (`message` only). */
  | { op: 'failed'; req: number; code?: CloudErrorCode; details?: CloudErrorDetails; message: string };

const port = parentPort;
if (port === null) throw new Error('adapter-evaluation-worker.ts runs as a worker thread');
const start = workerData as EvaluationWorkerStart;

const backend = await initFirstBackend(start.backends);
const loaded = await loadModelFolder(start.modelDir);
const base = { id: start.modelId, config: loaded.config, model: LlamaModel.fromArrays(loaded.config, loaded.weights) };
let tokenizer: Promise<Tokenizer> | undefined;
/** The folder's tokenizer, read at the first evaluation: a model without one serves everything else. */
const tokenizerOf = (): Promise<Tokenizer> => {
  tokenizer ??= loadTokenizer(start.modelDir).then((t) => {
    checkTokenizerFits(t, loaded.config.vocabSize);
    return t;
  }).catch((err: unknown) => {
    throw new CloudError('TANDEM_INTERNAL', { reason: `the served model's tokenizer does not load: ${err instanceof Error ? err.message : String(err)}` }, { cause: err });
  });
  return tokenizer;
};

let chain: Promise<unknown> = Promise.resolve();
port.on('message', (m: EvaluationWorkerRequest) => {
  chain = chain.then(async () => {
    try {
      const result = await evaluateAdapter(base, await tokenizerOf(), m.files, m.data, m.options);
      port.postMessage({ op: 'evaluated', req: m.req, result } satisfies EvaluationWorkerReply);
    } catch (error) {
      const typed = error instanceof CloudError ? error : resourceErrorOf(error, 'memory');
      if (typed !== undefined) port.postMessage({ op: 'failed', req: m.req, code: typed.code as CloudErrorCode, details: typed.details, message: typed.message } satisfies EvaluationWorkerReply);
      else port.postMessage({ op: 'failed', req: m.req, message: error instanceof Error ? error.message : String(error) } satisfies EvaluationWorkerReply);
    }
  });
});
port.postMessage({ op: 'ready', backend } satisfies EvaluationWorkerReply);
