// What the operator's view counts of the middle's work, fed by the session service for every
// Forward and Backward it computed: trained tokens (batch x sequence of each Forward that
// needs a backward, i.e. a training micro-batch through the middle) per session and in total,
// and the sessions' loss curves. Memory only: it starts at zero with the process.
import type { Backward, Forward } from '../protocol/index.ts';
import { LossHistory } from './loss-history.ts';
import type { LossHistoryLimits } from './loss-history.ts';
import type { ComputedStep } from './session-service.ts';

export class TrainingActivity {
  readonly losses: LossHistory;
  /** Session id → trained tokens; a session leaves with `retain`. */
  readonly #tokens = new Map<string, number>();
  #total = 0;

  constructor(lossLimits: Partial<LossHistoryLimits> = {}) {
    this.losses = new LossHistory(lossLimits);
  }

  /** The session service's hook. */
  record(computed: ComputedStep): void {
    const { session, kind, message, tokens } = computed;
    if (kind === 'forward') {
      if (!(message as Forward).needsBackward) return;
      this.#total += tokens;
      this.#tokens.set(session.id, (this.#tokens.get(session.id) ?? 0) + tokens);
    } else {
      this.losses.record(session.id, message.step, message.microbatch, (message as Backward).loss, session.tenant);
    }
  }

  /** Trained tokens since the node started, all sessions together (forgotten sessions included). */
  get trainedTokens(): number {
    return this.#total;
  }

  trainedTokensOf(sessionId: string): number {
    return this.#tokens.get(sessionId) ?? 0;
  }

  /** Forgets what it holds of sessions `keep` says no to. */
  retain(keep: (sessionId: string) => boolean): void {
    for (const id of [...this.#tokens.keys()]) if (!keep(id)) this.#tokens.delete(id);
    this.losses.retain(keep);
  }
}
