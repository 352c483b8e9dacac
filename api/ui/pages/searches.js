// Searches: the list, and one search — the trials table (sortable), the objective against
// the trial number with the best so far, a parallel-coordinates view of the sampled
// hyperparameters against the objective, links to every trial's job, cancel and train-best.

import {
  api, every, h, fill, patch, table, badge, toast, errorText, fmtTime, timeCell, fmtEta, fmtNum, fmtParams, fmtInt, methodLabel,
} from '../lib.js';
import { lineChart, parallelCoordinates } from '../charts.js';

const ACTIVE = ['queued', 'running'];

/** `#/searches` */
export async function list({ root, signal }) {
  const { el, tbody } = table([
    { label: 'Search' }, { label: 'Status' }, { label: 'Model' }, { label: 'Objective' },
    { label: 'Trials', cls: 'num' }, { label: 'Best', cls: 'num' }, { label: 'ETA' }, { label: 'Created' },
  ], { caption: 'Searches' });
  const empty = h('p', { class: 'muted', hidden: true }, 'No searches yet. Start one with POST /v1/fine_tuning/searches or `molt searches create`.');
  fill(root, h('div', { class: 'page-head' }, h('h1', {}, 'Hybrid PEFT searches')), el, empty);
  async function refresh() {
    const page = await api('/v1/fine_tuning/searches?limit=100', { signal });
    patch(tbody, page.data.map((s) => h('tr', { dataset: { id: s.id } },
      h('td', {}, h('a', { href: `#/searches/${s.id}`, class: 'mono' }, s.id)),
      h('td', {}, badge(s.status)),
      h('td', {}, s.model),
      h('td', {}, s.objective.replace('_', ' ')),
      h('td', { class: 'num' }, `${fmtInt(s.trial_counts.finished)} / ${fmtInt(s.trial_counts.total)}`),
      h('td', { class: 'num' }, s.best ? fmtNum(s.best.value) : '–'),
      h('td', {}, ACTIVE.includes(s.status) ? fmtEta(s.estimated_finish) : '–'),
      timeCell(s.created_at))));
    empty.hidden = page.data.length > 0;
    return page.data.some((s) => ACTIVE.includes(s.status));
  }
  await refresh();
  every(signal, 3000, refresh);
}

function paramsText(params) {
  return Object.entries(params || {})
    .filter(([, v]) => v !== false)
    .map(([k, v]) => (v === true ? k : `${k}=${typeof v === 'number' ? fmtNum(v) : v}`))
    .join(', ');
}

const COLUMNS = [
  { key: 'number', label: 'Trial', num: true },
  { key: 'step', label: 'Step', num: true },
  { key: 'status', label: 'Status' },
  { key: 'value', label: 'Objective', num: true },
  { key: 'trainable_parameters', label: 'Trainable params', num: true },
  { key: 'params', label: 'Hyperparameters' },
  { key: 'job_id', label: 'Job' },
];

/** `#/searches/{id}` */
export async function detail({ root, signal, args: [id] }) {
  let search = await api(`/v1/fine_tuning/searches/${encodeURIComponent(id)}`, { signal });
  let trials = [];
  const minimize = search.objective === 'validation_loss';
  const head = h('div', { class: 'page-head' });
  const facts = h('dl', { class: 'facts' });
  const chartBox = h('div', { id: 'chart-objective' });
  const pcBox = h('div', { class: 'pc', id: 'parallel-coordinates' });
  const stepPick = h('select', { id: 'pc-step', 'aria-label': 'step shown in the parallel-coordinates view' },
    h('option', { value: '1' }, 'Step 1: which methods'), h('option', { value: '2' }, 'Step 2: ranks, scales, learning rates'));
  let stepChosen = null;
  stepPick.addEventListener('change', () => { stepChosen = stepPick.value; renderPc(); });
  const tableBox = h('div', {});
  fill(root,
    h('p', { class: 'crumbs' }, h('a', { href: '#/searches' }, 'Searches'), ' / ', id),
    head, facts,
    h('div', { class: 'charts one' }, chartBox),
    h('div', { class: 'page-head' }, h('h2', {}, 'Hyperparameters against the objective'), stepPick),
    pcBox,
    h('h2', {}, 'Trials'), tableBox);
  const chart = lineChart(chartBox, {
    title: `${search.objective.replace('_', ' ')} by trial`, xLabel: 'trial',
    series: [{ label: 'trial value', pointsOnly: true, points: true }, { label: minimize ? 'best so far (lowest)' : 'best so far (highest)' }],
  });
  signal.addEventListener('abort', () => chart.destroy());

  let sortKey = 'number';
  let sortAsc = true;

  // Buttons are made once and shown or hidden, so a refresh does not take the focus away.
  const statusBox = h('span', {});
  const cancel = h('button', { type: 'button', class: 'danger', id: 'cancel-search', hidden: true }, 'Cancel search');
  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    try { search = await api(`/v1/fine_tuning/searches/${id}/cancel`, { method: 'POST' }); renderHead(); }
    catch (e) { toast(errorText(e), 'bad'); cancel.disabled = false; }
  });
  const train = h('button', { type: 'button', class: 'primary', hidden: true }, 'Train the best configuration');
  train.addEventListener('click', async () => {
    train.disabled = true;
    try {
      const job = await api(`/v1/fine_tuning/searches/${id}/train`, { method: 'POST' });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) { toast(errorText(e), 'bad'); train.disabled = false; }
  });
  fill(head, h('h1', { class: 'mono' }, search.id), statusBox, cancel, train);

  function renderHead() {
    patch(statusBox, badge(search.status));
    cancel.hidden = !ACTIVE.includes(search.status);
    train.hidden = !(search.status === 'succeeded' && !search.result_job_id && search.best);
    const c = search.trial_counts;
    const best = search.best;
    patch(facts,
      h('dt', {}, 'Model'), h('dd', {}, search.model),
      h('dt', {}, 'Objective'), h('dd', {}, `${search.objective.replace('_', ' ')} (${minimize ? 'minimised' : 'maximised'})`),
      h('dt', {}, 'Sampler · step'), h('dd', {}, `${search.sampler} · step ${search.step}`),
      h('dt', {}, 'Trials'), h('dd', {}, `${fmtInt(c.finished)} of ${fmtInt(c.total)} finished: ${fmtInt(c.complete)} complete, ${fmtInt(c.pruned)} pruned, ${fmtInt(c.skipped)} skipped, ${fmtInt(c.failed)} failed; ${fmtInt(c.running)} running`),
      h('dt', {}, 'Best'), h('dd', { id: 'search-best' }, best
        ? [`${fmtNum(best.value)} at trial ${best.trial} — ${methodLabel(best.method)}, ${fmtParams(best.trainable_params)} parameters `,
          best.job_id ? h('a', { href: `#/jobs/${best.job_id}` }, 'job') : null]
        : '–'),
      h('dt', {}, 'Result job'), h('dd', {}, search.result_job_id ? h('a', { href: `#/jobs/${search.result_job_id}`, class: 'mono' }, search.result_job_id) : '–'),
      h('dt', {}, 'ETA'), h('dd', {}, ACTIVE.includes(search.status) ? fmtEta(search.estimated_finish) : '–'),
      h('dt', {}, 'Created'), h('dd', {}, fmtTime(search.created_at)),
      search.error ? [h('dt', {}, 'Error'), h('dd', { class: 'error' }, search.error.message || JSON.stringify(search.error))] : null);
  }

  function renderChart() {
    const sorted = trials.slice().sort((a, b) => a.number - b.number);
    const xs = [];
    const vals = [];
    const best = [];
    let b = null;
    for (const t of sorted) {
      xs.push(t.number);
      const v = t.status === 'complete' && typeof t.value === 'number' ? t.value : null;
      vals.push(v);
      if (v !== null && (b === null || (minimize ? v < b : v > b))) b = v;
      best.push(b);
    }
    chart.set([xs, vals, best]);
  }

  function renderPc() {
    const step = stepChosen || (trials.some((t) => t.step === 2 && t.status === 'complete') ? '2' : '1');
    stepPick.value = step;
    const rows = trials.filter((t) => String(t.step) === step && t.status === 'complete' && typeof t.value === 'number');
    if (!rows.length) {
      fill(pcBox, h('p', { class: 'muted chart-empty' }, 'No complete trials in this step yet.'));
      pcBox.dataset.lines = '0';
      return;
    }
    const dims = [...new Set(rows.flatMap((t) => Object.keys(t.params || {})))].sort();
    parallelCoordinates(pcBox, {
      dims, objective: 'objective', minimize,
      rows: rows.map((t) => ({
        values: Object.assign({}, t.params, { objective: t.value }),
        title: `trial ${t.number}: ${fmtNum(t.value)} — ${paramsText(t.params)}`,
      })),
    });
  }

  const { el: trialsTable, tbody } = table([]);
  const headRow = trialsTable.querySelector('thead tr');
  for (const c of COLUMNS) {
    const btn = h('button', { type: 'button', class: 'sort' }, c.label);
    const th = h('th', { scope: 'col', class: c.num ? 'num' : null, dataset: { key: c.key } }, btn);
    btn.addEventListener('click', () => {
      if (sortKey === c.key) sortAsc = !sortAsc; else { sortKey = c.key; sortAsc = true; }
      renderTable();
    });
    headRow.append(th);
  }
  fill(tableBox, trialsTable);

  function renderTable() {
    for (const th of headRow.children) {
      th.setAttribute('aria-sort', th.dataset.key === sortKey ? (sortAsc ? 'ascending' : 'descending') : 'none');
    }
    const val = (t) => (sortKey === 'params' ? paramsText(t.params) : t[sortKey]);
    const rows = trials.slice().sort((a, b) => {
      const x = val(a);
      const y = val(b);
      if (x === y) return a.number - b.number;
      if (x === null || x === undefined) return 1; // missing values last either way
      if (y === null || y === undefined) return -1;
      const d = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return sortAsc ? d : -d;
    });
    patch(tbody, rows.map((t) => h('tr', { dataset: { id: String(t.number), trial: t.number } },
      h('td', { class: 'num' }, String(t.number)),
      h('td', { class: 'num' }, String(t.step)),
      h('td', {}, badge(t.status), t.pruned_step !== null && t.pruned_step !== undefined ? ` at step ${t.pruned_step}` : ''),
      h('td', { class: 'num' }, fmtNum(t.value)),
      h('td', { class: 'num' }, fmtParams(t.trainable_parameters)),
      h('td', { class: 'params' }, paramsText(t.params) || '–', t.message ? h('div', { class: 'muted' }, t.message) : null),
      h('td', {}, t.job_id ? h('a', { href: `#/jobs/${t.job_id}`, class: 'mono' }, t.job_id) : '–'))));
  }

  async function refresh() {
    search = await api(`/v1/fine_tuning/searches/${id}`, { signal });
    const page = await api(`/v1/fine_tuning/searches/${id}/trials`, { signal });
    trials = page.data;
    renderHead();
    renderChart();
    renderPc();
    renderTable();
    return ACTIVE.includes(search.status);
  }
  if (await refresh()) every(signal, 2000, refresh);
}
