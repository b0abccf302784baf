// The operator's dashboard in the browser: asks for an API key, keeps it in this tab's
// sessionStorage and sends it as `Authorization: Bearer` (never in a URL). With the admin key
// it draws GET /v1/cluster; with a tenant's key (GET /v1/cluster answers 403) the tenant's own
// sessions and their loss curves. Text goes in with textContent only: names are hostile.
/* global document, window, sessionStorage, fetch, Chart */
'use strict';

(() => {
  const KEY_ITEM = 'tandem.dashboard.key';
  const POLL_MS = 2000;
  /** Loss curves drawn at most (the sessions most recently created). */
  const MAX_CURVES = 12;
  const COLORS = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];

  const $ = (id) => document.getElementById(id);
  const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
  const charts = {};
  let timer;
  let generation = 0;

  class HttpError extends Error {
    constructor(status, body) {
      super(`${status} ${body && body.code ? `${body.code}: ${body.message}` : ''}`);
      this.status = status;
    }
  }

  async function getJson(path) {
    const key = sessionStorage.getItem(KEY_ITEM);
    const response = await fetch(path, { headers: { authorization: `Bearer ${key}` }, cache: 'no-store', credentials: 'omit' });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new HttpError(response.status, body);
    return body;
  }

  function cell(text, className) {
    const td = document.createElement('td');
    td.textContent = String(text);
    if (className) td.className = className;
    return td;
  }

  /** Replaces a tbody's rows: each row is [attributes, [[testid, text, numeric?], ...]]. */
  function fillRows(tbody, rows) {
    tbody.replaceChildren(...rows.map(([attrs, cells]) => {
      const tr = document.createElement('tr');
      for (const [name, value] of Object.entries(attrs)) tr.setAttribute(name, value);
      for (const [testId, text, numeric] of cells) {
        const td = cell(text, numeric ? 'num' : '');
        if (testId) td.dataset.testid = testId;
        tr.append(td);
      }
      return tr;
    }));
  }

  function setText(testId, text) {
    byTestId(testId).textContent = String(text);
  }

  const integer = (n) => String(Math.round(n));
  const decimal = (n) => (n === null || n === undefined ? '' : n.toFixed(2));

  /** A line chart drawn once and updated in place (no animation: every figure is drawn when set). */
  function lineChart(id, yTitle) {
    if (charts[id]) return charts[id];
    charts[id] = new Chart($(id), {
      type: 'line',
      data: { labels: [], datasets: [] },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, parsing: true, normalized: true,
        interaction: { mode: 'nearest', intersect: false },
        elements: { point: { radius: 0 }, line: { borderWidth: 2, tension: 0 } },
        scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true, title: { display: true, text: yTitle } } },
        plugins: { legend: { display: true, position: 'bottom' } },
      },
    });
    return charts[id];
  }

  function setSeries(id, yTitle, labels, series, pointRadius = 0) {
    const chart = lineChart(id, yTitle);
    chart.data.labels = labels;
    chart.data.datasets = series.map((s, i) => ({ label: s.label, data: s.data, borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length], spanGaps: true, pointRadius }));
    chart.update('none');
    $(id).dataset.points = String(labels.length);
  }

  function drawSeries(series) {
    const points = series.points;
    const labels = points.map((p) => new Date(p.t).toLocaleTimeString());
    setSeries('chart-tokens', 'tokens/s', labels, [{ label: 'trained tokens/s', data: points.map((p) => p.trainedTokensPerSecond) }]);
    const codecs = [...new Set(points.flatMap((p) => Object.keys(p.frameBytesPerSecond)))].sort();
    setSeries('chart-bytes', 'bytes/s', labels, codecs.map((codec) => ({ label: codec, data: points.map((p) => p.frameBytesPerSecond[codec] ?? 0) })));
    setSeries('chart-latency', 'ms', labels, [
      { label: 'forward', data: points.map((p) => p.stepLatencyMs.forward) },
      { label: 'backward', data: points.map((p) => p.stepLatencyMs.backward) },
    ]);
    const mib = (b) => b / (1024 * 1024);
    setSeries('chart-memory', 'MiB', labels, [
      { label: 'rss', data: points.map((p) => mib(p.memory.rssBytes)) },
      { label: 'heap used', data: points.map((p) => mib(p.memory.heapUsedBytes)) },
      { label: 'heap total', data: points.map((p) => mib(p.memory.heapTotalBytes)) },
    ]);
  }

  /** One curve per session, x = step; the canvas says how many points each curve has. */
  function drawLosses(curves) {
    const steps = [...new Set(curves.flatMap((c) => c.points.map((p) => p.step)))].sort((a, b) => a - b);
    setSeries('chart-loss', 'loss', steps.map(String), curves.map((c) => {
      const byStep = new Map(c.points.map((p) => [p.step, p.loss]));
      return { label: `${c.tenant} ${c.sessionId.slice(0, 8)}`, data: steps.map((s) => (byStep.has(s) ? byStep.get(s) : null)) };
    }), 3);
    $('chart-loss').dataset.curves = JSON.stringify(Object.fromEntries(curves.map((c) => [c.sessionId, c.points.length])));
  }

  async function lossCurves(sessions) {
    const wanted = sessions.filter((s) => s.lossPoints === undefined || s.lossPoints > 0)
      .sort((a, b) => b.createdAt.localeCompare(a.createdAt)).slice(0, MAX_CURVES);
    return Promise.all(wanted.map((s) => getJson(`/v1/sessions/${encodeURIComponent(s.id)}/losses`)));
  }

  function drawSessions(sessions) {
    setText('session-count', sessions.length);
    fillRows($('sessions'), sessions.map((s) => [{ 'data-testid': 'session-row', 'data-session': s.id, 'data-tenant': s.tenant }, [
      ['session-id', s.id], ['session-tenant', s.tenant], ['session-state', s.state], ['session-step', s.lastStep, true],
      ['session-tokens', integer(s.trainedTokens), true], ['session-loss-points', s.lossPoints, true],
    ]]));
  }

  async function refreshAdmin(cluster) {
    document.body.classList.remove('tenant');
    setText('mode', 'admin');
    setText('model', cluster.model ?? 'loading');
    setText('worker-count', cluster.workers.length);
    fillRows($('workers'), cluster.workers.map((w) => [{ 'data-testid': 'worker-row', 'data-worker': w.id }, [
      ['worker-id', w.id], ['worker-model', w.model], ['worker-range', `[${w.blocks.start}, ${w.blocks.end})`],
      ['worker-queued', w.load.queued, true], ['worker-running', w.load.running, true], ['worker-tps', decimal(w.load.tokensPerSecond), true],
    ]]));
    setText('total-trained-tokens', integer(cluster.totals.trainedTokens));
    setText('total-forward-steps', integer(cluster.totals.steps.forward));
    setText('total-backward-steps', integer(cluster.totals.steps.backward));
    fillRows($('tenants'), cluster.tenants.map((t) => [{ 'data-testid': 'tenant-row', 'data-tenant': t.tenant }, [
      ['tenant-name', t.tenant], ['tenant-sessions', t.sessions, true], ['tenant-open', t.open, true], ['tenant-closed', t.closed, true], ['tenant-tokens', integer(t.trainedTokens), true],
    ]]));
    drawSessions(cluster.sessions);
    setText('federation-count', cluster.federations.length);
    fillRows($('federations'), cluster.federations.map((f) => {
      const last = f.history.at(-1);
      return [{ 'data-testid': 'federation-row', 'data-federation': f.id }, [
        ['federation-id', f.id], ['federation-model', f.model], ['federation-mode', f.mode], ['federation-state', f.state],
        ['federation-round', `${f.round} / ${f.rounds}`], ['federation-rounds-done', f.history.length, true], ['federation-loss', last ? decimal(last.loss) : '', true],
      ]];
    }));
    drawSeries(cluster.series);
    drawLosses(await lossCurves(cluster.sessions));
  }

  async function refreshTenant() {
    document.body.classList.add('tenant');
    setText('mode', 'tenant');
    const { sessions } = await getJson('/v1/sessions');
    const curves = await lossCurves(sessions);
    const byId = new Map(curves.map((c) => [c.sessionId, c]));
    const tenant = sessions[0] ? sessions[0].tenant : '';
    setText('mode', tenant ? `tenant ${tenant}` : 'tenant');
    drawSessions(sessions.map((s) => ({ ...s, trainedTokens: byId.get(s.id)?.trainedTokens ?? 0, lossPoints: byId.get(s.id)?.points.length ?? 0 })));
    drawLosses(curves);
  }

  async function refresh() {
    const error = byTestId('fetch-error');
    try {
      let cluster;
      try {
        cluster = await getJson('/v1/cluster');
      } catch (e) {
        if (!(e instanceof HttpError) || e.status !== 403) throw e;
      }
      if (cluster) await refreshAdmin(cluster);
      else await refreshTenant();
      error.hidden = true;
      generation += 1;
      document.body.dataset.generation = String(generation);
      document.body.dataset.fetchedAt = String(Date.now());
    } catch (e) {
      if (e instanceof HttpError && e.status === 401) {
        signOut(`the key was refused (${e.message})`);
        return;
      }
      error.textContent = `could not refresh: ${e.message}`;
      error.hidden = false;
    }
    timer = window.setTimeout(refresh, POLL_MS);
  }

  function showView() {
    $('login').hidden = true;
    $('view').hidden = false;
    $('sign-out').hidden = false;
    window.clearTimeout(timer);
    void refresh();
  }

  function signOut(reason) {
    window.clearTimeout(timer);
    sessionStorage.removeItem(KEY_ITEM);
    $('view').hidden = true;
    $('sign-out').hidden = true;
    $('login').hidden = false;
    setText('mode', 'signed out');
    const error = byTestId('login-error');
    error.textContent = reason ?? '';
    error.hidden = !reason;
  }

  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('key').value.trim();
    $('key').value = '';
    if (!key) return;
    sessionStorage.setItem(KEY_ITEM, key);
    showView();
  });
  $('sign-out').addEventListener('click', () => signOut());

  if (sessionStorage.getItem(KEY_ITEM)) showView();
})();
