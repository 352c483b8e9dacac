// The dashboard's shell: sign-in with an API key, the hash router, and each page's life
// cycle (a page gets an AbortSignal that fires when the user navigates away, so its
// streams and timers stop).

import { apiKey, setApiKey, h, fill, errorText, ApiError } from './lib.js';
import * as jobs from './pages/jobs.js';
import * as files from './pages/files.js';
import * as searches from './pages/searches.js';
import * as models from './pages/models.js';
import * as playground from './pages/playground.js';

// Errors the page hits are kept for the browser tests (and shown in the console as usual).
window.__moltErrors = [];
window.addEventListener('error', (e) => window.__moltErrors.push(String(e.message)));
window.addEventListener('unhandledrejection', (e) => window.__moltErrors.push(errorText(e.reason)));

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signout = document.getElementById('signout');

/** `#/section/id?query` → the page to render. */
const routes = [
  [/^\/jobs$/, jobs.list],
  [/^\/jobs\/([^/]+)$/, jobs.detail],
  [/^\/files$/, files.list],
  [/^\/searches$/, searches.list],
  [/^\/searches\/([^/]+)$/, searches.detail],
  [/^\/models$/, models.models],
  [/^\/adapters$/, models.adapters],
  [/^\/playground$/, playground.page],
];

let current = null; // the AbortController of the page on screen

function parseHash() {
  const raw = decodeURIComponent(location.hash.replace(/^#/, '')) || '/jobs';
  const [path, query] = raw.split('?');
  return { path, query: new URLSearchParams(query || '') };
}

async function render() {
  if (current) current.abort();
  current = new AbortController();
  document.getElementById('toast').replaceChildren();
  const signal = current.signal;
  if (!apiKey()) {
    showSignIn();
    return;
  }
  nav.hidden = false;
  signout.hidden = false;
  const { path, query } = parseHash();
  const section = path.split('/')[1];
  for (const a of nav.querySelectorAll('a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const route = routes.find(([re]) => re.test(path));
  fill(main);
  if (!route) {
    fill(main, h('h1', {}, 'Not found'), h('p', {}, 'No page here. ', h('a', { href: '#/jobs' }, 'Go to jobs')));
    return;
  }
  const args = path.match(route[0]).slice(1);
  try {
    await route[1]({ root: main, signal, query, args });
  } catch (e) {
    if (signal.aborted || e.name === 'AbortError') return;
    const notFound = e instanceof ApiError && e.status === 404;
    fill(main,
      h('h1', {}, notFound ? 'Not found' : 'Something went wrong'),
      h('p', { class: 'error', role: 'alert' }, errorText(e)));
  }
}

function showSignIn(message) {
  nav.hidden = true;
  signout.hidden = true;
  const input = h('input', {
    id: 'api-key', name: 'api-key', type: 'password', autocomplete: 'off', required: true,
    spellcheck: 'false', 'aria-describedby': 'key-help',
  });
  const status = h('p', { class: 'error', role: 'alert', id: 'signin-error' }, message || '');
  const form = h('form', { class: 'signin card', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to molt'),
    h('label', { for: 'api-key' }, 'API key'),
    input,
    h('p', { id: 'key-help', class: 'muted' },
      'The key is kept in this browser tab only (session storage) and sent to this server as ',
      h('code', {}, 'Authorization: Bearer'), '. A new server prints its first key once, and writes it to ',
      h('code', {}, 'molt-data/first-key'), '.'),
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'),
    status);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    // Any authenticated read tells whether the key works (not through api(), whose 401
    // means "signed out").
    let res;
    try {
      res = await fetch('/v1/models', { headers: { Authorization: `Bearer ${key}` } });
    } catch (err) {
      fill(status, `The server did not answer: ${errorText(err)}`);
      return;
    }
    if (!res.ok) {
      fill(status, res.status === 401 ? 'That key was not accepted.' : `The server answered ${res.status}.`);
      input.select();
      return;
    }
    setApiKey(key);
    if (!location.hash || location.hash === '#/' || location.hash === '#') location.hash = '#/jobs';
    else render();
  });
  fill(main, form);
  input.focus();
}

window.addEventListener('molt:unauthorized', () => {
  setApiKey(null);
  if (current) current.abort();
  showSignIn('Your key is no longer accepted; sign in again.');
});

signout.addEventListener('click', () => {
  setApiKey(null);
  render();
});

window.addEventListener('hashchange', () => {
  render();
  main.focus({ preventScroll: true });
});
render();
