// Jobs: the list (filter by status, refreshed while jobs run) and one job (curves that grow
// as steps arrive, live events over the SSE stream, checkpoints, the adapter, cancel).

import {
  api, streamEvents, downloadButton, every, h, fill, patch, table, badge, toast, errorText, ACTIVE_JOB,
  fmtTime, timeCell, fmtEta, fmtInt, fmtParams, fmtNum, fmtPercent, fmtBytes, methodLabel,
} from '../lib.js';
import { lineChart } from '../charts.js';

const STATUSES = ['validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelling', 'cancelled'];

function progressCell(job) {
  const p = job.progress || {};
  const pct = p.percent ?? (job.status === 'succeeded' ? 100 : null);
  return h('td', { class: 'progress-cell' },
    h('progress', { max: 100, value: pct ?? 0, 'aria-label': `progress of ${job.id}` }),
    h('span', { class: 'num' }, pct === null ? '–' : fmtPercent(pct)));
}

function jobRow(job) {
  return h('tr', { dataset: { id: job.id } },
    h('td', {}, h('a', { href: `#/jobs/${job.id}`, class: 'mono' }, job.id)),
    h('td', {}, badge(job.status)),
    h('td', {}, job.model),
    h('td', {}, methodLabel(job.method)),
    h('td', { class: 'num' }, fmtParams(job.trainable_parameters)),
    progressCell(job),
    h('td', {}, ACTIVE_JOB.includes(job.status) ? fmtEta(job.estimated_finish) : '–'),
    timeCell(job.created_at));
}

/** `#/jobs?status=…` */
export async function list({ root, signal, query }) {
  const status = query.get('status') || '';
  const select = h('select', { id: 'status-filter' },
    h('option', { value: '' }, 'All statuses'),
    STATUSES.map((s) => h('option', { value: s, selected: s === status }, s.replace('_', ' '))));
  select.addEventListener('change', () => {
    location.hash = select.value ? `#/jobs?status=${select.value}` : '#/jobs';
  });
  const { el, tbody } = table([
    { label: 'Job' }, { label: 'Status' }, { label: 'Model' }, { label: 'Method' },
    { label: 'Trainable params', cls: 'num' }, { label: 'Progress' }, { label: 'ETA' }, { label: 'Created' },
  ], { caption: 'Fine-tuning jobs' });
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const empty = h('p', { class: 'muted', hidden: true, id: 'jobs-empty' },
    status ? `No ${status.replace('_', ' ')} jobs.` : 'No jobs yet. Create one with the API or `molt jobs create`.');
  fill(root,
    h('div', { class: 'page-head' }, h('h1', {}, 'Fine-tuning jobs'),
      h('label', { class: 'inline' }, 'Status ', select)),
    el, empty, more);

  let pages = 1;
  const qs = (after) => {
    const p = new URLSearchParams({ limit: '20' });
    if (status) p.set('status', status);
    if (after) p.set('after', after);
    return p.toString();
  };
  // Refreshes every loaded page in place, so rows update without the table jumping.
  async function refresh() {
    const rows = [];
    let after = null;
    let hasMore = false;
    for (let i = 0; i < pages; i++) {
      const page = await api(`/v1/fine_tuning/jobs?${qs(after)}`, { signal });
      rows.push(...page.data);
      hasMore = page.has_more;
      after = page.last_id;
      if (!hasMore) break;
    }
    patch(tbody, rows.map(jobRow));
    empty.hidden = rows.length > 0;
    more.hidden = !hasMore;
    return rows;
  }
  more.addEventListener('click', async () => { pages += 1; await refresh(); });
  await refresh();
  every(signal, 3000, refresh);
}

function dl(label, value) {
  return [h('dt', {}, label), h('dd', {}, value)];
}

/** `#/jobs/{id}` */
export async function detail({ root, signal, args: [id] }) {
  let job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal });
  // Image jobs count images where text jobs count tokens.
  const base = await api(`/v1/models/${encodeURIComponent(job.model)}`, { signal }).catch(() => ({}));
  const unit = base.task === 'image_classification' ? 'images/s' : 'tokens/s';
  // Accuracy is measured on image and multiple-choice data; elsewhere the second chart
  // shows the gradient norm. Decided before drawing, so no chart appears later.
  const file = await api(`/v1/files/${encodeURIComponent(job.training_file)}`, { signal }).catch(() => ({}));
  const kind = file.dataset && file.dataset.kind;
  const hasAccuracy = base.task === 'image_classification' || kind === 'multiple_choice';
  const head = h('div', { class: 'page-head' });
  const summary = h('dl', { class: 'facts', id: 'job-facts' });
  const charts = h('div', { class: 'charts' });
  const lossBox = h('div', { id: 'chart-loss' });
  const accBox = h('div', { id: 'chart-accuracy' });
  const lrBox = h('div', { id: 'chart-lr' });
  const speedBox = h('div', { id: 'chart-speed' });
  charts.append(lossBox, accBox, lrBox, speedBox);
  const events = h('ol', { class: 'events', id: 'job-events', 'aria-live': 'polite', 'aria-label': 'Events, newest first' });
  const ckpts = h('div', { id: 'job-checkpoints' });
  const result = h('div', { id: 'job-result' });
  fill(root,
    h('p', { class: 'crumbs' }, h('a', { href: '#/jobs' }, 'Jobs'), ' / ', id),
    head, summary,
    h('h2', {}, 'Training curves'), charts,
    h('div', { class: 'two-col' },
      h('section', { 'aria-labelledby': 'ev-h' }, h('h2', { id: 'ev-h' }, 'Events'), events),
      h('section', {},
        h('h2', {}, 'Result'), result,
        h('h2', {}, 'Checkpoints'), ckpts)));

  const loss = lineChart(lossBox, { title: 'Loss', xLabel: 'step', series: [
    { label: 'training loss' }, { label: 'validation loss', points: true }] });
  const acc = hasAccuracy
    ? lineChart(accBox, { title: 'Validation accuracy', xLabel: 'step', series: [{ label: 'accuracy', points: true }] })
    : lineChart(accBox, { title: 'Gradient norm', xLabel: 'step', series: [{ label: 'gradient norm' }] });
  const lr = lineChart(lrBox, { title: 'Learning rate', xLabel: 'step', series: [{ label: 'learning rate' }] });
  const speed = lineChart(speedBox, { title: 'Throughput', xLabel: 'step', series: [{ label: unit }] });
  signal.addEventListener('abort', () => [loss, acc, lr, speed].forEach((c) => c.destroy()));

  // The per-step series, fetched incrementally (after_step) as the job reports steps.
  const series = { step: [], train: [], valid: [], acc: [], lr: [], speed: [], grad: [] };
  let lastStep = -1;
  let fetching = null;
  async function fetchMetrics() {
    for (;;) {
      const q = new URLSearchParams({ limit: '10000' });
      if (lastStep >= 0) q.set('after_step', String(lastStep));
      const page = await api(`/v1/fine_tuning/jobs/${id}/metrics?${q}`, { signal });
      for (const m of page.data) {
        if (m.step <= lastStep) continue;
        lastStep = m.step;
        series.step.push(m.step);
        series.train.push(m.train_loss ?? null);
        series.valid.push(m.valid_loss ?? null);
        series.acc.push(m.valid_accuracy ?? null);
        series.lr.push(m.learning_rate ?? null);
        series.speed.push(m.tokens_per_second ?? null);
        series.grad.push((m.extra && m.extra.grad_norm) ?? null);
      }
      if (!page.has_more) break;
    }
    loss.set([series.step, series.train, series.valid]);
    if (hasAccuracy) {
      const accSteps = [];
      const accVals = [];
      series.acc.forEach((v, i) => { if (v !== null) { accSteps.push(series.step[i]); accVals.push(v); } });
      acc.set([accSteps, accVals]);
    } else {
      acc.set([series.step, series.grad]);
    }
    lr.set([series.step, series.lr]);
    speed.set([series.step, series.speed]);
  }
  // One fetch at a time; a request while one runs is folded into the next.
  let again = false;
  function refreshMetrics() {
    if (fetching) { again = true; return fetching; }
    fetching = fetchMetrics().catch((e) => { if (!signal.aborted) toast(errorText(e), 'bad'); })
      .finally(() => { fetching = null; if (again && !signal.aborted) { again = false; refreshMetrics(); } });
    return fetching;
  }

  // The head is built once and updated in place: re-creating it would drop the keyboard
  // focus (and a click in flight) every time the job refreshes.
  const title = h('h1', { class: 'mono' }, job.id);
  const statusBox = h('span', { id: 'job-status' });
  const cancel = h('button', { type: 'button', class: 'danger', id: 'cancel-job' }, 'Cancel job');
  fill(head, title, statusBox, cancel);
  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    try {
      job = await api(`/v1/fine_tuning/jobs/${id}/cancel`, { method: 'POST' });
      renderAll();
      toast('Cancellation requested');
    } catch (e) {
      toast(errorText(e), 'bad');
      cancel.disabled = false;
    }
  });
  function renderHead() {
    const active = ACTIVE_JOB.includes(job.status);
    if (statusBox.textContent !== job.status.replace('_', ' ')) fill(statusBox, badge(job.status));
    cancel.hidden = !active;
    if (job.status === 'cancelling') cancel.disabled = true;
  }

  function renderSummary() {
    const p = job.progress || {};
    const m = job.metrics || {};
    const hp = job.hyperparameters || {};
    patch(summary,
      dl('Model', job.fine_tuned_model ? [job.model, ' → ', h('span', { class: 'mono' }, job.fine_tuned_model)] : job.model),
      dl('Method', methodLabel(job.method)),
      dl('Trainable parameters', fmtParams(job.trainable_parameters)),
      dl('Progress', [h('progress', { max: 100, value: p.percent ?? 0, 'aria-label': 'progress' }), ' ',
        `step ${fmtInt(p.step)} of ${p.total_steps ? fmtInt(p.total_steps) : '–'} (${fmtPercent(p.percent ?? null)})`]),
      dl('Tokens seen', fmtInt(p.tokens_seen)),
      dl('Training loss', fmtNum(m.train_loss)),
      dl('Validation loss', m.valid_loss !== undefined ? fmtNum(m.valid_loss) : '–'),
      dl('Throughput', m.tokens_per_second ? `${fmtNum(m.tokens_per_second)} ${unit}` : '–'),
      dl('Learning rate', m.learning_rate !== undefined ? fmtNum(m.learning_rate) : fmtNum(hp.learning_rate)),
      dl('Epochs · batch', `${hp.n_epochs ?? '–'} · ${hp.batch_size ?? '–'}`),
      dl('ETA', ACTIVE_JOB.includes(job.status) ? fmtEta(job.estimated_finish) : '–'),
      dl('Created', fmtTime(job.created_at)),
      dl('Finished', fmtTime(job.finished_at)),
      dl('Attempts', fmtInt(p.attempts)),
      job.search ? dl('Search', [h('a', { href: `#/searches/${job.search.id}` }, job.search.id), ` trial ${job.search.trial}`]) : null,
      job.error ? dl('Error', h('span', { class: 'error' }, `${job.error.message}${job.error.line ? ` (line ${job.error.line})` : ''}`)) : null);
  }

  async function renderResult() {
    if (!job.adapter_id) {
      fill(result, h('p', { class: 'muted' }, job.status === 'succeeded' ? 'No adapter.' : 'The adapter appears here when the job succeeds.'));
      return;
    }
    const a = await api(`/v1/adapters/${job.adapter_id}`, { signal });
    fill(result,
      h('p', {}, 'Adapter ', h('span', { class: 'mono' }, a.id), ` (${fmtBytes(a.bytes)}) — `,
        h('a', { href: `#/playground?model=${encodeURIComponent(a.fine_tuned_model)}` }, 'try it in the playground')),
      h('ul', { class: 'files' }, (a.files || []).map((f) => {
        return h('li', {}, downloadButton(f.url, f.name, `Download ${f.name}`), ` ${fmtBytes(f.bytes)}`);
      })));
  }

  async function renderCheckpoints() {
    const page = await api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`, { signal });
    if (!page.data.length) {
      fill(ckpts, h('p', { class: 'muted' }, 'No checkpoints yet.'));
      return;
    }
    const { el, tbody } = table([{ label: 'Step', cls: 'num' }, { label: 'Checkpoint' }, { label: 'Training loss', cls: 'num' }, { label: 'Saved' }]);
    fill(tbody, page.data.map((c) => h('tr', {},
      h('td', { class: 'num' }, fmtInt(c.step_number)),
      h('td', { class: 'mono' }, c.fine_tuned_model_checkpoint),
      h('td', { class: 'num' }, fmtNum(c.metrics && c.metrics.train_loss)),
      timeCell(c.created_at))));
    fill(ckpts, el);
  }

  function renderAll() {
    renderHead();
    renderSummary();
  }
  renderAll();
  await Promise.all([refreshMetrics(), renderResult(), renderCheckpoints()]);

  // Live: the job's event stream; every event refreshes the job and its series.
  const seen = new Set();
  let wasActive = ACTIVE_JOB.includes(job.status);
  const addEvent = (ev) => {
    if (seen.has(ev.id)) return;
    seen.add(ev.id);
    events.prepend(h('li', { class: `ev ${ev.level}` },
      h('time', { datetime: new Date(ev.created_at * 1000).toISOString() }, fmtTime(ev.created_at)), ' ',
      ev.message));
  };
  const refreshJob = async () => {
    job = await api(`/v1/fine_tuning/jobs/${id}`, { signal });
    renderAll();
    const active = ACTIVE_JOB.includes(job.status);
    if (wasActive && !active) {
      await Promise.all([renderResult(), renderCheckpoints()]);
    }
    wasActive = active;
  };
  let pending = null;
  const soon = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        await Promise.all([refreshJob(), refreshMetrics()]);
        if (job.status !== 'running') await renderCheckpoints();
      } catch (e) { if (!signal.aborted) toast(errorText(e), 'bad'); }
    }, 300);
  };
  // Steps do not all produce events, so the series is also polled while the job runs.
  // Every 2 s: two requests, well inside the default rate limit (600 a minute per key).
  every(signal, 2000, async () => {
    if (ACTIVE_JOB.includes(job.status)) {
      await Promise.all([refreshJob(), refreshMetrics()]);
    }
  });
  const older = await api(`/v1/fine_tuning/jobs/${id}/events?limit=100`, { signal });
  older.data.slice().reverse().forEach(addEvent);
  let lastSeq = older.data.length ? older.data[0].seq : 0;
  (async () => {
    while (!signal.aborted) {
      try {
        await streamEvents(`/v1/fine_tuning/jobs/${id}/events?stream=true`, {
          signal, lastEventId: lastSeq,
          onEvent: (ev) => {
            const e = JSON.parse(ev.data);
            lastSeq = e.seq;
            addEvent(e);
            if (e.message && /checkpoint/i.test(e.message)) renderCheckpoints().catch(() => {});
            soon();
          },
        });
        // The stream ends when the job does.
        await refreshJob();
        if (!ACTIVE_JOB.includes(job.status)) break;
      } catch (e) {
        if (signal.aborted) return;
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
  })();
}
