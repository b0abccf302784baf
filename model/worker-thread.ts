// A worker thread running a TypeScript entry: a worker does not inherit the parent's --import
// hooks, so it registers tsx's loader first, then imports the entry. One place for the model's
// serving thread, the cloud's compute workers and split inference's worker.
import { Worker } from 'node:worker_threads';

export function startTsWorker(entry: URL, workerData: unknown): Worker {
  const api = import.meta.resolve('tsx/esm/api');
  const source = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(entry.href)}); })`;
  return new Worker(source, { eval: true, execArgv: [], workerData });
}
