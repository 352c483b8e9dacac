// Models (base, fine-tuned, merged: what each serves, merged files to download) and
// adapters (warm into / evict from the serving cache, merge, download the files).

import { api, downloadButton, h, fill, table, toast, errorText, timeCell, fmtBytes, fmtParams } from '../lib.js';

const TASK = { causal_lm: 'text (completions, scores)', image_classification: 'images (classifications)' };

/** `#/models` */
export async function models({ root, signal }) {
  const { el, tbody } = table([
    { label: 'Model' }, { label: 'Kind' }, { label: 'Serves' }, { label: 'Base' }, { label: 'Created' }, { label: '' },
  ], { caption: 'Models' });
  const files = h('div', { id: 'merged-files' });
  fill(root, h('div', { class: 'page-head' }, h('h1', {}, 'Models')),
    h('p', { class: 'muted' }, 'Base models are shared by every tenant; fine-tuned models are your adapters on them; merged models are an adapter folded into a full copy of its base.'),
    el, files);
  const page = await api('/v1/models', { signal });
  fill(tbody, page.data.map((m) => {
    const actions = [h('a', { href: `#/playground?model=${encodeURIComponent(m.id)}` }, 'Playground')];
    if (m.kind === 'merged') {
      const show = h('button', { type: 'button', class: 'link' }, 'Files');
      show.addEventListener('click', async () => {
        try {
          const full = await api(`/v1/models/${encodeURIComponent(m.id)}`);
          fill(files, h('h2', {}, `Files of ${m.id}`),
            h('ul', { class: 'files' }, full.files.map((f) => h('li', {}, downloadButton(f.url, f.name), ` ${fmtBytes(f.bytes)}`))));
        } catch (e) { toast(errorText(e), 'bad'); }
      });
      actions.push(' · ', show);
    }
    return h('tr', {},
      h('td', { class: 'mono' }, m.id),
      h('td', {}, m.kind),
      h('td', {}, TASK[m.task] || '–'),
      h('td', {}, m.parent || '–'),
      timeCell(m.created),
      h('td', {}, actions));
  }));
}

/** `#/adapters` */
export async function adapters({ root, signal }) {
  const { el, tbody } = table([
    { label: 'Adapter' }, { label: 'Fine-tuned model' }, { label: 'Base' }, { label: 'Method' },
    { label: 'Trainable params', cls: 'num' }, { label: 'Size', cls: 'num' }, { label: 'Created' },
    { label: 'Serving' }, { label: 'Files' },
  ], { caption: 'Adapters' });
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const empty = h('p', { class: 'muted', hidden: true }, 'No adapters yet: a job that succeeds makes one.');
  fill(root, h('div', { class: 'page-head' }, h('h1', {}, 'Adapters')), el, empty, more);
  let after = null;

  function row(a) {
    const state = h('span', { class: 'muted', id: `residency-${a.id}` }, '');
    const act = (label, fn) => {
      const b = h('button', { type: 'button', class: 'small' }, label);
      b.addEventListener('click', async () => {
        b.disabled = true;
        try { await fn(); } catch (e) { toast(errorText(e), 'bad'); } finally { b.disabled = false; }
      });
      return b;
    };
    const warm = act('Warm', async () => {
      const r = await api(`/v1/adapters/${a.id}/load`, { method: 'POST' });
      state.textContent = r.resident ? `resident (${fmtBytes(r.bytes)})` : 'not resident';
    });
    const evict = act('Evict', async () => {
      await api(`/v1/adapters/${a.id}/load`, { method: 'DELETE' });
      state.textContent = 'not resident';
    });
    const merge = act('Merge', async () => {
      toast(`Merging ${a.fine_tuned_model}…`);
      const m = await api(`/v1/adapters/${a.id}/merge`, { method: 'POST' });
      toast(`Merged: ${m.id}`, 'ok');
      state.textContent = `merged as ${m.id}`;
    });
    const spec = (a.config && a.config.spec) || {};
    return h('tr', { dataset: { id: a.id } },
      h('td', { class: 'mono' }, a.id),
      h('td', {}, h('a', { href: `#/playground?model=${encodeURIComponent(a.fine_tuned_model)}`, class: 'mono' }, a.fine_tuned_model)),
      h('td', {}, a.base_model),
      h('td', {}, spec.type || '–'),
      h('td', { class: 'num' }, fmtParams(a.config && a.config.trainable_parameters)),
      h('td', { class: 'num' }, fmtBytes(a.bytes)),
      timeCell(a.created_at),
      h('td', { class: 'actions' }, warm, evict, merge, ' ', state),
      h('td', {}, h('ul', { class: 'files' }, (a.files || []).map((f) => h('li', {}, downloadButton(f.url, f.name))))));
  }

  async function load() {
    const q = new URLSearchParams({ limit: '50' });
    if (after) q.set('after', after);
    const page = await api(`/v1/adapters?${q}`, { signal });
    // The list answer has no files; each adapter's own answer does.
    const full = await Promise.all(page.data.map((a) => (a.files ? a : api(`/v1/adapters/${a.id}`, { signal }))));
    tbody.append(...full.map(row));
    after = page.last_id;
    more.hidden = !page.has_more;
    empty.hidden = tbody.children.length > 0;
  }
  more.addEventListener('click', () => load().catch((e) => toast(errorText(e), 'bad')));
  await load();
}
