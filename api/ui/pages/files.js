// Files: the tenant's datasets (status, size, examples, validation problems with their line
// numbers) and an upload form with a progress bar.

import {
  api, uploadFile, h, fill, table, badge, toast, errorText, timeCell, fmtBytes, fmtInt,
} from '../lib.js';

/** A file's validation problems, one per line ("line 3: …"), from `status_details`. */
function problems(details) {
  if (!details) return [];
  // "3 invalid lines: line 1: …; line 2: …" → ["line 1: …", "line 2: …"]
  const body = details.replace(/^\d+ invalid lines?:\s*/, '');
  return body.split(/;\s*(?=line \d+)/);
}

function datasetLabel(f) {
  const d = f.dataset;
  if (!d) return '–';
  if (d.kind === 'images') {
    return `images (${d.classes ? d.classes.length : '?'} classes, ${fmtInt(d.train_examples)} train / ${fmtInt(d.validation_examples)} validation)`;
  }
  return d.kind.replace('_', ' ');
}

function fileRow(f, onDelete) {
  const del = h('button', { type: 'button', class: 'link danger-text', 'aria-label': `Delete ${f.filename}` }, 'Delete');
  del.addEventListener('click', () => onDelete(f));
  const issues = problems(f.status_details);
  return h('tr', { dataset: { id: f.id } },
    h('td', {}, h('span', { class: 'mono' }, f.id)),
    h('td', {}, f.filename),
    h('td', {}, badge(f.status)),
    h('td', {}, datasetLabel(f)),
    h('td', { class: 'num' }, fmtInt(f.line_count)),
    h('td', { class: 'num' }, fmtBytes(f.bytes)),
    timeCell(f.created_at),
    h('td', {}, issues.length
      ? h('ul', { class: 'problems' }, issues.map((p) => h('li', {}, p)))
      : h('span', { class: 'muted' }, '–')),
    h('td', {}, del));
}

/** `#/files` */
export async function list({ root, signal }) {
  const input = h('input', { type: 'file', id: 'upload-file', accept: '.jsonl,.json,.zip,.tar,.tgz,.tar.gz' });
  const button = h('button', { type: 'submit', class: 'primary', id: 'upload-button' }, 'Upload');
  const bar = h('progress', { max: 100, value: 0, id: 'upload-progress', 'aria-label': 'upload progress' });
  const pct = h('span', { class: 'num', id: 'upload-percent' }, '');
  const outcome = h('div', { id: 'upload-result', role: 'status', 'aria-live': 'polite' });
  const form = h('form', { class: 'card upload' },
    h('h2', {}, 'Upload a dataset'),
    h('p', { class: 'muted' }, 'JSONL (text, prompt/completion, multiple choice, chat) or an image archive (ImageFolder zip / tar). Every line or image is checked on upload.'),
    h('div', { class: 'row' }, h('label', { for: 'upload-file' }, 'File'), input, button),
    h('div', { class: 'row' }, bar, pct),
    outcome);
  const { el, tbody } = table([
    { label: 'File' }, { label: 'Name' }, { label: 'Status' }, { label: 'Dataset' },
    { label: 'Examples', cls: 'num' }, { label: 'Size', cls: 'num' }, { label: 'Uploaded' },
    { label: 'Problems' }, { label: '' },
  ], { caption: 'Files' });
  const empty = h('p', { class: 'muted', hidden: true }, 'No files yet.');
  fill(root, h('div', { class: 'page-head' }, h('h1', {}, 'Files')), form, h('h2', {}, 'Your files'), el, empty);

  async function refresh() {
    const page = await api('/v1/files?limit=100', { signal });
    fill(tbody, page.data.map((f) => fileRow(f, remove)));
    empty.hidden = page.data.length > 0;
  }
  async function remove(f) {
    if (!window.confirm(`Delete ${f.filename} (${f.id})?`)) return;
    try {
      await api(`/v1/files/${f.id}`, { method: 'DELETE' });
      toast(`Deleted ${f.filename}`);
      await refresh();
    } catch (e) {
      toast(errorText(e), 'bad');
    }
  }
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const file = input.files && input.files[0];
    if (!file) { fill(outcome, h('p', { class: 'error' }, 'Choose a file first.')); return; }
    button.disabled = true;
    fill(outcome);
    bar.value = 0;
    try {
      const f = await uploadFile(file, 'fine-tune', (frac) => {
        bar.value = Math.round(frac * 100);
        pct.textContent = `${Math.round(frac * 100)} %`;
      });
      if (f.status === 'error') {
        fill(outcome, h('div', { class: 'error', role: 'alert' },
          h('p', {}, `${f.filename} was stored but is not a valid dataset:`),
          h('ul', { class: 'problems' }, problems(f.status_details).map((p) => h('li', {}, p)))));
      } else {
        fill(outcome, h('p', { class: 'ok' }, `${f.filename} uploaded as `, h('span', { class: 'mono' }, f.id),
          `: ${datasetLabel(f)}, ${fmtInt(f.line_count)} examples.`));
      }
      input.value = '';
      await refresh();
    } catch (err) {
      fill(outcome, h('p', { class: 'error', role: 'alert' }, `Upload failed: ${errorText(err)}`));
    } finally {
      button.disabled = false;
    }
  });
  await refresh();
}
