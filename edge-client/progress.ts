// Progress of a training run (trainEdge's above all) for people and for programs: a bar redrawn in place on a TTY,
// one plain line per report otherwise, or one JSON object per event.
import type { TrainEvent } from '../model/index.ts';

export type ProgressMode = 'tty' | 'plain' | 'json';

export interface ProgressSink {
  /** Writes without a newline (the bar redraws its line). */
  write(text: string): void;
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function stepLine(e: Extract<TrainEvent, { type: 'step' }>, bar: boolean): string {
  const width = 24;
  const filled = Math.round((e.step / e.totalSteps) * width);
  const head = bar ? `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ` : '';
  const wire = e.wire ? `  up ${formatBytes(e.wire.bytesSent)}  down ${formatBytes(e.wire.bytesReceived)}  rtt ${e.wire.rttMs.toFixed(1)} ms` : '';
  return `${head}step ${e.step}/${e.totalSteps}  loss ${e.loss.toFixed(4)}  ${Math.round(e.tokensPerSecond)} tok/s${wire}`;
}

function otherLine(e: Exclude<TrainEvent, { type: 'step' }>): string | undefined {
  switch (e.type) {
    case 'start': {
      const r = e.remote;
      const model = r ? `model ${r.model} (${r.contentHash.slice(0, 19)}…) ` : '';
      const cut = e.cut ? `cut (${e.cut.bottom}, ${e.cut.top})  ` : '';
      const wire = r ? `codecs ${r.codecs.forward}/${r.codecs.backward}  ` : '';
      const download = r ? `  ${r.cached ? 'edge part from cache' : `downloaded ${formatBytes(r.downloadedBytes)}`}` : '';
      return (
        `${model}${cut}${wire}${e.trainableParameters} trainable parameters  ${e.trainRows} train / ${e.validationRows} validation rows` +
        `${download}${e.step > 0 ? `  resuming at step ${e.step}` : ''}`
      );
    }
    case 'eval':
      return `eval (${e.phase}, step ${e.step}): validation loss ${e.loss.toFixed(4)}${e.accuracy === undefined ? '' : `  accuracy ${(100 * e.accuracy).toFixed(1)}%`}`;
    case 'checkpoint':
      return `checkpoint at step ${e.step} → ${e.dir}`;
    case 'done':
      // The caller reports the outcome.
      return undefined;
  }
}

/** An onEvent handler for a training run. Plain mode prints a step line every `every` steps (and the last). */
export function progressPrinter(mode: ProgressMode, sink: ProgressSink, options: { every?: number } = {}): (e: TrainEvent) => void {
  const every = options.every ?? 10;
  let barShown = false;
  return (e) => {
    if (mode === 'json') {
      sink.write(`${JSON.stringify({ event: e.type, ...e, type: undefined })}\n`);
      return;
    }
    if (e.type === 'step') {
      if (mode === 'tty') {
        sink.write(`\r\x1b[2K${stepLine(e, true)}`);
        barShown = e.step < e.totalSteps;
        if (!barShown) sink.write('\n');
      } else if (e.step % every === 0 || e.step === e.totalSteps || e.step === 1) {
        sink.write(`${stepLine(e, false)}\n`);
      }
      return;
    }
    const line = otherLine(e);
    if (line === undefined) return;
    if (barShown) {
      sink.write('\n');
      barShown = false;
    }
    sink.write(`${line}\n`);
  };
}
