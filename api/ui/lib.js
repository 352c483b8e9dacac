// Shared by every page: the API client (bearer key from session storage, the error
// envelope, server-sent events over fetch), DOM building without innerHTML (every string
// from the server goes in as text), and formatting (units, the user's time zone).

const KEY = 'molt.apiKey';

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/** An API error: the HTTP status and the envelope's `error` object. */
export class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
}

function authHeaders(extra) {
  return Object.assign({ Authorization: `Bearer ${apiKey()}` }, extra || {});
}

async function check(res) {
  if (res.ok) return res;
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  const err = new ApiError(res.status, body && body.error);
  if (res.status === 401) window.dispatchEvent(new CustomEvent('molt:unauthorized', { detail: err }));
  throw err;
}

/** Calls the API; `body` is sent as JSON. Resolves to the parsed answer. */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await check(await fetch(path, init));
  return res.status === 204 ? null : res.json();
}

/**
 * Reads a server-sent event stream (EventSource cannot send the bearer token, so this is
 * fetch + a parser). Calls `onEvent({id, event, data})` per event; resolves when the stream
 * ends, rejects on an HTTP error. Abort with `signal`.
 */
export async function streamEvents(path, { method = 'GET', body, signal, onEvent, lastEventId }) {
  const headers = authHeaders({ Accept: 'text/event-stream' });
  if (lastEventId) headers['Last-Event-ID'] = String(lastEventId);
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await check(await fetch(path, init));
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
      const ev = { id: null, event: 'message', data: '' };
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(':')) continue;
        const i = line.indexOf(':');
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
        if (field === 'data') data.push(val);
        else if (field === 'id') ev.id = val;
        else if (field === 'event') ev.event = val;
      }
      if (data.length) {
        ev.data = data.join('\n');
        onEvent(ev);
      }
    }
  }
}

/** Downloads an API file with the key (a plain link could not send it). */
export async function download(path, filename) {
  const res = await check(await fetch(path, { headers: authHeaders() }));
  const url = URL.createObjectURL(await res.blob());
  const a = h('a', { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** A button that downloads an API file (an adapter's, a merged model's). */
export function downloadButton(url, name, label = name) {
  const b = h('button', { type: 'button', class: 'link' }, label);
  b.addEventListener('click', () => download(url, name).catch((e) => toast(errorText(e), 'bad')));
  return b;
}

/**
 * Calls `fn` every `ms` until the page goes away or `fn` resolves to `false` (nothing left
 * to watch). A failure is shown once per run of failures, and the call is retried.
 */
export function every(signal, ms, fn) {
  let failing = false;
  const tick = async () => {
    if (signal.aborted) return;
    let again = true;
    try {
      again = (await fn()) !== false;
      failing = false;
    } catch (e) {
      if (signal.aborted) return;
      if (!failing) toast(`Refresh failed: ${errorText(e)}`, 'bad');
      failing = true;
    }
    if (again && !signal.aborted) setTimeout(tick, ms);
  };
  setTimeout(tick, ms);
}

/**
 * Uploads a file (multipart) with progress: `onProgress(fraction)`. XMLHttpRequest because
 * fetch reports no upload progress.
 */
export function uploadFile(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1/files');
    xhr.setRequestHeader('Authorization', `Bearer ${apiKey()}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) { onProgress(1); resolve(body); }
      else reject(new ApiError(xhr.status, body && body.error));
    };
    xhr.onerror = () => reject(new ApiError(0, { message: 'the upload failed (network error)' }));
    const form = new FormData();
    form.append('purpose', purpose);
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

/** Builds an element: `h('a', {href, class}, 'text', child…)`. Strings become text nodes. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/**
 * Brings `parent`'s children to `kids` touching only what changed: an equal node stays, a
 * table row that changed keeps its unchanged cells. A refresh every few seconds thus keeps
 * the keyboard focus (and a text selection) on what it did not change.
 */
export function patch(parent, ...kids) {
  const wanted = kids.flat(Infinity)
    .filter((k) => k !== null && k !== undefined && k !== false)
    .map((k) => (k instanceof Node ? k : document.createTextNode(String(k))));
  wanted.forEach((neu, i) => {
    const old = parent.childNodes[i];
    if (!old) parent.append(neu);
    else if (old.isEqualNode(neu)) { /* keep */ }
    else if (old.nodeName === 'TR' && neu.nodeName === 'TR' && old.dataset.id === neu.dataset.id
      && old.children.length === neu.children.length) {
      [...neu.children].forEach((cell, j) => {
        if (!old.children[j].isEqualNode(cell)) old.children[j].replaceWith(cell);
      });
    } else old.replaceWith(neu);
  });
  while (parent.childNodes.length > wanted.length) parent.lastChild.remove();
  return parent;
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// ---- formatting -------------------------------------------------------------------------

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const shortDateTime = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });

/** A Unix time (seconds) in the user's time zone. */
export function fmtTime(secs) {
  if (secs === null || secs === undefined) return '–';
  return dateTime.format(new Date(secs * 1000));
}

/** A compact time for table cells ("Dec 6, 11:20 PM"); the full one is its tooltip. */
export function timeCell(secs) {
  if (secs === null || secs === undefined) return h('td', {}, '–');
  const d = new Date(secs * 1000);
  return h('td', { class: 'time' }, h('time', { datetime: d.toISOString(), title: dateTime.format(d) }, shortDateTime.format(d)));
}

export function fmtClock(secs) {
  return secs === null || secs === undefined ? '–' : timeOnly.format(new Date(secs * 1000));
}

/** A duration in seconds as "1 h 4 min", "3 min 20 s", "12 s". */
export function fmtDuration(secs) {
  if (secs === null || secs === undefined || !isFinite(secs)) return '–';
  secs = Math.max(0, Math.round(secs));
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${secs % 60} s`;
  return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
}

/** "in 3 min" for an estimated finish (Unix seconds). */
export function fmtEta(secs) {
  if (!secs) return '–';
  const left = secs - Date.now() / 1000;
  return left <= 0 ? 'any moment' : `in ${fmtDuration(left)} (${fmtClock(secs)})`;
}

export function fmtInt(n) {
  return n === null || n === undefined ? '–' : Math.round(n).toLocaleString();
}

/** A parameter count with its unit: "20,480", "1.25 M". */
export function fmtParams(n) {
  if (n === null || n === undefined) return '–';
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  return Math.round(n).toLocaleString();
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

/** A metric value: 4 significant digits, scientific when tiny. */
export function fmtNum(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '–';
  if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(2);
  return Number(x.toPrecision(4)).toLocaleString(undefined, { maximumFractionDigits: 6 });
}

export function fmtPercent(x) {
  return x === null || x === undefined ? '–' : `${x.toFixed(x < 10 ? 1 : 0)} %`;
}

/** A status as a badge (colour by family of states). */
export function badge(status) {
  const tone = {
    succeeded: 'ok', complete: 'ok', processed: 'ok',
    running: 'run', cancelling: 'run', validating_files: 'wait', queued: 'wait', pending: 'wait',
    failed: 'bad', error: 'bad',
    cancelled: 'off', pruned: 'off', skipped: 'off',
  }[status] || 'off';
  return h('span', { class: `badge ${tone}` }, status.replace('_', ' '));
}

export const ACTIVE_JOB = ['validating_files', 'queued', 'running', 'cancelling'];

/** A short description of a PEFT method: "lora r 8 · in_proj". */
export function methodLabel(m) {
  if (!m || typeof m !== 'object') return '–';
  const parts = [m.type];
  if (m.r !== undefined) parts.push(`r ${m.r}`);
  if (m.targets) parts.push(Array.isArray(m.targets) ? m.targets.join(', ') : String(m.targets));
  if (m.type === 'hybrid' && Array.isArray(m.methods)) parts.push(m.methods.map((x) => x.type).join(' + '));
  return parts.join(' · ');
}

/** Shows a short message at the bottom of the screen. */
export function toast(message, tone = 'info') {
  const t = document.getElementById('toast');
  const item = h('div', { class: `toast ${tone}` }, message);
  t.append(item);
  setTimeout(() => item.remove(), 4000);
}

/** An error's message for the page, with the API's code when there is one. */
export function errorText(e) {
  if (e instanceof ApiError) {
    const code = e.error.code ? ` (${e.error.code})` : '';
    return `${e.message}${code}`;
  }
  return e && e.message ? e.message : String(e);
}

/** A table whose body the caller fills; wrapped so it scrolls sideways on a phone. */
export function table(columns, { caption } = {}) {
  const tbody = h('tbody');
  const el = h('div', { class: 'table-wrap' },
    h('table', {},
      caption ? h('caption', { class: 'sr-only' }, caption) : null,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.cls || null }, c.label)))),
      tbody));
  return { el, tbody };
}
