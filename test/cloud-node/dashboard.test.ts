// /dashboard in real headless Chromium (Debian's /usr/bin/chromium driven by playwright-core),
// against a real node on loopback after real split training by an edge: the page's figures
// (workers and ranges, sessions by tenant, trained tokens, charts, loss curves) are read from
// its DOM and its charts and compared with GET /v1/cluster. Without a key the data calls get
// 401; a tenant's key shows that tenant's sessions only. A screenshot goes to test-artifacts/.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium } from 'playwright-core';
import type { BrowserContext, Page } from 'playwright-core';
import { trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainResult } from '../../edge-client/index.ts';
import { initBackend } from '../../model/index.ts';
import { DEFAULT_LIMITS } from '../../protocol/index.ts';
import type { LossPoint, WorkerStatus } from '../../cloud-node/index.ts';
import { TestClient, api, createTenantKey, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { federationWithOneRound } from './dashboard-fixtures.ts';

const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = join(import.meta.dirname, '..', '..', 'test-artifacts');
const DEMO_DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
const STEPS = 3;

interface ClusterView {
  workers: WorkerStatus[];
  tenants: { tenant: string; sessions: number; open: number; closed: number; trainedTokens: number }[];
  sessions: { id: string; tenant: string; state: string; lastStep: number; trainedTokens: number; lossPoints: number }[];
  federations: { id: string; state: string; round: number; rounds: number; history: { loss: number | null }[] }[];
  totals: { trainedTokens: number; steps: { forward: number; backward: number } };
}

/** What the page shows, read from its DOM and its charts. */
interface PageFigures {
  mode: string;
  workerCount: string;
  workers: { id: string; range: string; queued: string; running: string }[];
  tenants: { tenant: string; sessions: string; open: string; closed: string; tokens: string }[];
  sessions: { id: string; tenant: string; state: string; step: string; tokens: string; lossPoints: string }[];
  federations: { id: string; state: string; round: string; done: string; loss: string }[];
  totalTokens: string;
  forwardSteps: string;
  backwardSteps: string;
  adminSectionsVisible: boolean;
  /** Painted (non-transparent) pixels of each chart canvas. */
  painted: Record<string, number>;
  /** The largest trained tokens/s the tokens chart holds. */
  maxTokensPerSecond: number;
  /** Each loss curve's label and its non-empty values. */
  lossCurves: { label: string; values: number[] }[];
  curvesAttribute: Record<string, number>;
}

// Runs in the page, as source text: the test's TypeScript knows no DOM, and tsx's helpers do not exist there.
const READ_FIGURES = `(() => {
  const text = (root, id) => root.querySelector('[data-testid="' + id + '"]')?.textContent ?? '';
  const rows = (id) => [...document.querySelectorAll('[data-testid="' + id + '"]')];
  const chartOf = (id) => window.Chart.getChart(document.getElementById(id));
  const painted = {};
  for (const id of ['chart-tokens', 'chart-bytes', 'chart-latency', 'chart-memory', 'chart-loss']) {
    const canvas = document.getElementById(id);
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) n++;
    painted[id] = n;
  }
  const tokens = chartOf('chart-tokens');
  const loss = chartOf('chart-loss');
  return {
    mode: text(document, 'mode'),
    workerCount: text(document, 'worker-count'),
    workers: rows('worker-row').map((r) => ({ id: text(r, 'worker-id'), range: text(r, 'worker-range'), queued: text(r, 'worker-queued'), running: text(r, 'worker-running') })),
    tenants: rows('tenant-row').map((r) => ({ tenant: text(r, 'tenant-name'), sessions: text(r, 'tenant-sessions'), open: text(r, 'tenant-open'), closed: text(r, 'tenant-closed'), tokens: text(r, 'tenant-tokens') })),
    sessions: rows('session-row').map((r) => ({
      id: text(r, 'session-id'), tenant: text(r, 'session-tenant'), state: text(r, 'session-state'), step: text(r, 'session-step'), tokens: text(r, 'session-tokens'), lossPoints: text(r, 'session-loss-points'),
    })),
    federations: rows('federation-row').map((r) => ({ id: text(r, 'federation-id'), state: text(r, 'federation-state'), round: text(r, 'federation-round'), done: text(r, 'federation-rounds-done'), loss: text(r, 'federation-loss') })),
    totalTokens: text(document, 'total-trained-tokens'),
    forwardSteps: text(document, 'total-forward-steps'),
    backwardSteps: text(document, 'total-backward-steps'),
    adminSectionsVisible: [...document.querySelectorAll('.admin-only')].some((e) => e.offsetParent !== null),
    painted,
    maxTokensPerSecond: tokens ? Math.max(0, ...tokens.data.datasets[0].data.map((v) => v ?? 0)) : -1,
    lossCurves: loss ? loss.data.datasets.map((d) => ({ label: d.label, values: d.data.filter((v) => v !== null) })) : [],
    curvesAttribute: JSON.parse(document.getElementById('chart-loss')?.dataset.curves ?? '{}'),
  };
})()`;

async function readFigures(page: Page): Promise<PageFigures> {
  return (await page.evaluate(READ_FIGURES)) as PageFigures;
}

/** Opens the dashboard in a fresh tab (fresh sessionStorage), signs in with `key` and waits for a refresh that began after `since`. */
async function signIn(context: BrowserContext, node: TestNode, key: string, since = Date.now()): Promise<Page> {
  const page = await context.newPage();
  await page.goto(`${node.url}/dashboard`);
  await page.fill('[data-testid="key"]', key);
  await page.click('[data-testid="sign-in"]');
  // Polled from here, not with page.waitForFunction: a predicate that is not true at once is
  // evaluated inside the page, where the page's CSP (no 'unsafe-eval') refuses it.
  const until = Date.now() + 30_000;
  while (!(await page.evaluate(`Number(document.body.dataset.fetchedAt ?? 0) > ${since + 1}`))) {
    if (Date.now() > until) throw new Error('the dashboard did not refresh within 30 s of signing in');
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return page;
}

describe('the operator dashboard in headless Chromium', { skip: existsSync(CHROMIUM) ? false : `${CHROMIUM} is absent (apt-get install -y chromium)` }, () => {
  let node: TestNode;
  let aliceKey: string;
  let bobKey: string;
  let trained: EdgeTrainResult;
  let context: BrowserContext;
  let profile: string;
  /** Console errors and page errors of every tab (a CSP violation shows up here). */
  const problems: string[] = [];

  before(async () => {
    await initBackend();
    node = await startTestNode({ limits: DEFAULT_LIMITS, series: { intervalMs: 250 } });
    aliceKey = await createTenantKey(node, 'alice');
    bobKey = await createTenantKey(node, 'bob');
    const cache = await mkdtemp(join(tmpdir(), 'tandem-dashboard-cache-'));
    try {
      trained = await trainEdge({
        cloud: node.url, key: aliceKey, model: 'stories260K', data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: STEPS, batchSize: 2, gradientAccumulationSteps: 2,
        seqLen: 16, lr: 5e-3, seed: 3, methods: [{ method: 'lora', r: 4, targetModules: ['q_proj', 'v_proj'] }], evaluate: false, cacheDir: cache,
      });
    } finally {
      await rm(cache, { recursive: true, force: true });
    }
    const bob = await TestClient.connect(node, bobKey);
    await bob.hello();
    bob.close();
    // A federation of both tenants with its first round done.
    await federationWithOneRound(node, 'feelings', 4, { alice: { key: aliceKey, loss: 2.5 }, bob: { key: bobKey, loss: 1.5 } });
    profile = await mkdtemp(join(tmpdir(), 'tandem-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, viewport: { width: 1280, height: 1400 },
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
    });
    context.on('page', (page) => {
      page.on('console', (m) => { if (m.type() === 'error' && !/status of 40[13]/.test(m.text())) problems.push(`console: ${m.text()}`); });
      page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    });
  });

  after(async () => {
    await context?.close();
    if (profile) await rm(profile, { recursive: true, force: true });
  });

  it('serves the page and its assets with a strict Content-Security-Policy and no inline script', async () => {
    const page = await api(node, 'GET', '/dashboard');
    assert.equal(page.status, 200);
    const csp = page.headers.get('content-security-policy') ?? '';
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'self'(;|$)/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
    assert.match(csp, /frame-ancestors 'none'/);
    const html = Buffer.from(page.bytes).toString('utf8');
    assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>/, 'every script has a src');
    assert.doesNotMatch(html, /\sstyle=|<style/, 'no inline style');
    const chart = await api(node, 'GET', '/dashboard/chart.umd.js');
    assert.equal(chart.status, 200);
    assert.match(chart.headers.get('content-type') ?? '', /javascript/);
    assert.match(Buffer.from(chart.bytes).toString('utf8'), /window\.Chart=/);
    assert.equal((await api(node, 'GET', '/dashboard/../node.ts')).status, 404);
    assert.equal((await api(node, 'GET', '/dashboard/index.html.map')).status, 404);
  });

  it("shows the admin the workers, sessions by tenant, trained tokens, live charts and loss curves equal to GET /v1/cluster's", async () => {
    const page = await signIn(context, node, node.adminKey);
    const figures = await readFigures(page);
    const { json } = await api(node, 'GET', '/v1/cluster', node.adminKey);
    const view = json as unknown as ClusterView;

    assert.equal(figures.mode, 'admin');
    assert.equal(figures.workerCount, String(view.workers.length));
    assert.equal(view.workers.length, 1);
    assert.deepEqual(figures.workers, view.workers.map((w) => ({ id: w.id, range: `[${w.blocks.start}, ${w.blocks.end})`, queued: '0', running: '0' })));
    assert.equal(figures.workers[0].range, '[0, 4)');

    assert.deepEqual(figures.tenants, view.tenants.map((t) => ({ tenant: t.tenant, sessions: String(t.sessions), open: String(t.open), closed: String(t.closed), tokens: String(t.trainedTokens) })));
    const alice = view.tenants.find((t) => t.tenant === 'alice');
    // Each step: 2 micro-batches of 2 x 16 tokens through the middle.
    assert.deepEqual(alice && [alice.sessions, alice.trainedTokens], [1, STEPS * 2 * 2 * 16]);
    assert.deepEqual(figures.sessions.map((s) => s.id).sort(), view.sessions.map((s) => s.id).sort());
    assert.equal(figures.totalTokens, String(view.totals.trainedTokens));
    assert.ok(view.totals.trainedTokens > 0);
    assert.equal(figures.forwardSteps, String(view.totals.steps.forward));
    assert.deepEqual(figures.federations, view.federations.map((f) => ({ id: f.id, state: f.state, round: `${f.round} / ${f.rounds}`, done: String(f.history.length), loss: (f.history.at(-1)?.loss ?? 0).toFixed(2) })));
    assert.deepEqual(figures.federations, [{ id: 'feelings', state: 'open', round: '2 / 4', done: '1', loss: '2.00' }]);
    assert.equal(figures.backwardSteps, String(view.totals.steps.backward));

    for (const [id, n] of Object.entries(figures.painted)) assert.ok(n > 500, `${id} is drawn (${n} painted pixels)`);
    assert.ok(figures.maxTokensPerSecond > 0, 'the tokens/s chart shows the training');

    const session = view.sessions.find((s) => s.tenant === 'alice') as ClusterView['sessions'][number];
    const losses = (await api(node, 'GET', `/v1/sessions/${session.id}/losses`, node.adminKey)).json.points as LossPoint[];
    assert.equal(losses.length, STEPS);
    assert.ok(losses.every((p, i) => Math.abs(p.loss - trained.losses[i]) < 1e-9), `the cloud's curve ${JSON.stringify(losses)} is the edge's ${JSON.stringify(trained.losses)}`);
    assert.deepEqual(figures.curvesAttribute, { [session.id]: STEPS });
    assert.equal(figures.lossCurves.length, 1);
    assert.deepEqual(figures.lossCurves[0].values, losses.map((p) => p.loss));

    await mkdir(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, 'dashboard.png'), fullPage: true });
    await page.close();
    assert.deepEqual(problems, []);
  });

  it("without a key the page's data calls get 401, and a wrong key is refused on the sign-in form", async () => {
    const { json } = await api(node, 'GET', '/v1/sessions', aliceKey);
    const [session] = json.sessions as { id: string }[];
    const page = await context.newPage();
    await page.goto(`${node.url}/dashboard`);
    const statuses = await page.evaluate(async (id) => Promise.all(['/v1/cluster', '/v1/sessions', `/v1/sessions/${id}/losses`].map(async (p) => (await fetch(p)).status)), session.id);
    assert.deepEqual(statuses, [401, 401, 401]);
    await page.fill('[data-testid="key"]', 'tdk_not-a-key');
    await page.click('[data-testid="sign-in"]');
    await page.waitForSelector('[data-testid="login-error"]:not([hidden])');
    assert.match(await page.textContent('[data-testid="login-error"]') ?? '', /TANDEM_AUTH_KEY_INVALID/);
    assert.equal(await page.evaluate('sessionStorage.length'), 0, 'a refused key is not kept');
    await page.close();
  });

  it("shows a tenant only its own sessions and their loss curves", async () => {
    const bob = await signIn(context, node, bobKey);
    const bobs = await readFigures(bob);
    assert.equal(bobs.mode, 'tenant bob');
    assert.equal(bobs.adminSectionsVisible, false);
    assert.deepEqual(bobs.sessions.map((s) => [s.tenant, s.lossPoints]), [['bob', '0']]);
    assert.doesNotMatch(await bob.content(), /alice/);
    await bob.close();

    const alice = await signIn(context, node, aliceKey);
    const figures = await readFigures(alice);
    assert.equal(figures.mode, 'tenant alice');
    assert.deepEqual(figures.sessions.map((s) => [s.tenant, s.lossPoints, s.tokens]), [['alice', String(STEPS), String(STEPS * 2 * 2 * 16)]]);
    assert.equal(figures.lossCurves.length, 1);
    assert.equal(figures.lossCurves[0].values.length, STEPS);
    assert.ok(figures.painted['chart-loss'] > 500);
    await alice.close();
    assert.deepEqual(problems, []);
  });
});
