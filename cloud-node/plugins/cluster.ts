// GET /v1/cluster: the operator's view as JSON (the dashboard draws the same): the workers and
// their block ranges and load, sessions by tenant, federations and their rounds, and the
// node's recent series of trained tokens/s, bytes per codec, step latency and memory. Admin only.
import type { FastifyInstance } from 'fastify';
import type { ClusterStatusSource } from '../cluster-status.ts';
import type { ModelSlot } from '../context.ts';
import type { Coordinator } from '../federation/index.ts';
import type { SessionRecords } from '../state/session-records.ts';
import type { TimeSeries } from '../time-series.ts';
import type { TrainingActivity } from '../training-activity.ts';
import { requireAdmin } from './auth.ts';
import { authErrors, clusterSchema, security } from './schemas.ts';

/** Rounds of each federation's history the view lists (the latest). */
export const CLUSTER_ROUNDS_SHOWN = 50;

export interface ClusterPluginOptions {
  model: ModelSlot;
  workers: ClusterStatusSource;
  sessions: SessionRecords;
  activity: TrainingActivity;
  series: TimeSeries;
  coordinator: Coordinator;
}

interface TenantRow {
  tenant: string;
  sessions: number;
  open: number;
  closed: number;
  trainedTokens: number;
}

export async function clusterPlugin(app: FastifyInstance, options: ClusterPluginOptions): Promise<void> {
  const { activity, coordinator } = options;
  app.get('/cluster', {
    schema: {
      summary: "the operator's view: workers, sessions by tenant, federations and rounds, the node's recent series (admin only)",
      tags: ['operations'], security, response: { 200: clusterSchema, ...authErrors },
    },
  }, async (request) => {
    requireAdmin(request, 'reading the cluster view');
    const sessions = [...options.sessions.all()].map((s) => ({
      id: s.id, tenant: s.tenant, state: s.state, lastStep: s.lastStep, createdAt: s.createdAt,
      trainedTokens: activity.trainedTokensOf(s.id), lossPoints: activity.losses.count(s.id),
    })).sort((a, b) => a.tenant.localeCompare(b.tenant) || a.createdAt.localeCompare(b.createdAt));
    const tenants = new Map<string, TenantRow>();
    for (const s of sessions) {
      let row = tenants.get(s.tenant);
      if (row === undefined) {
        row = { tenant: s.tenant, sessions: 0, open: 0, closed: 0, trainedTokens: 0 };
        tenants.set(s.tenant, row);
      }
      row.sessions += 1;
      row[s.state] += 1;
      row.trainedTokens += s.trainedTokens;
    }
    const federations = coordinator.ids().map((id) => {
      const f = coordinator.status(id);
      return {
        id, model: f.model, mode: f.mode, state: f.state, round: f.round, rounds: f.rounds, owners: f.owners.length,
        history: f.history.slice(-CLUSTER_ROUNDS_SHOWN).map((h) => ({ round: h.round, participants: h.participants.length, examples: h.examples, loss: h.loss !== null && Number.isFinite(h.loss) ? h.loss : null, completedAt: h.completedAt })),
      };
    });
    return {
      model: options.model.loaded ? options.model.served().id : null,
      workers: await options.workers.workers(),
      tenants: [...tenants.values()],
      sessions,
      federations,
      totals: await options.series.totals(),
      series: { intervalMs: options.series.intervalMs, points: options.series.points() },
    };
  });
}
