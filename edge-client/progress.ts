// Progress of trainEdge for people and for programs: a bar redrawn in place on a TTY,
// one plain line per report otherwise, or one JSON object per event.
import type { TrainEvent } from './train.ts';

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
  const filled = Math.round((e.step / e.steps) * width);
  const head = bar ? `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ` : '';
  return (
    `${head}step ${e.step}/${e.steps}  loss ${e.loss.toFixed(4)}  ${Math.round(e.tokensPerSecond)} tok/s  ` +
    `up ${formatBytes(e.bytesSent)}  down ${formatBytes(e.bytesReceived)}  rtt ${e.rttMs.toFixed(1)} ms`
  );
}

function otherLine(e: Exclude<TrainEvent, { type: 'step' }>): string {
  switch (e.type) {
    case 'start':
      return (
        `model ${e.model} (${e.contentHash.slice(0, 19)}…) cut (${e.cut.bottom}, ${e.cut.top})  codecs ${e.codecs.forward}/${e.codecs.backward}  ` +
        `${e.trainableParameters} trainable parameters  ${e.trainRows} train / ${e.validationRows} validation rows  ` +
        `${e.cached ? 'edge part from cache' : `downloaded ${formatBytes(e.downloadedBytes)}`}${e.startStep > 0 ? `  resuming at step ${e.startStep}` : ''}`
      );
    case 'eval':
      return `eval (${e.phase}, step ${e.step}): validation loss ${e.result.valLoss.toFixed(4)}${e.result.accuracy === null ? '' : `  accuracy ${(100 * e.result.accuracy).toFixed(1)}%`}`;
    case 'checkpoint':
      return `checkpoint at step ${e.step} → ${e.dir}`;
  }
}

/** An onEvent handler for trainEdge. Plain mode prints a step line every `every` steps (and the last). */
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
        barShown = e.step < e.steps;
        if (!barShown) sink.write('\n');
      } else if (e.step % every === 0 || e.step === e.steps || e.step === 1) {
        sink.write(`${stepLine(e, false)}\n`);
      }
      return;
    }
    if (barShown) {
      sink.write('\n');
      barShown = false;
    }
    sink.write(`${otherLine(e)}\n`);
  };
}
