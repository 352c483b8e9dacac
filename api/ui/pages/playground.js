// The playground: a completion streamed token by token from a base, fine-tuned (hot-swapped)
// or merged model; or, for a vision model, the top classes of an image.

import { api, streamEvents, h, fill, errorText, fmtNum } from '../lib.js';

/** `#/playground?model=…` */
export async function page({ root, signal, query }) {
  const all = (await api('/v1/models', { signal })).data;
  const wanted = query.get('model');
  const select = h('select', { id: 'pg-model' },
    all.map((m) => h('option', { value: m.id, selected: m.id === wanted }, `${m.id} (${m.kind})`)));
  const body = h('div', {});
  fill(root,
    h('div', { class: 'page-head' }, h('h1', {}, 'Playground')),
    h('div', { class: 'row' }, h('label', { for: 'pg-model' }, 'Model'), select),
    body);
  let stop = null;
  const show = () => {
    if (stop) stop.abort();
    stop = new AbortController();
    signal.addEventListener('abort', () => stop.abort());
    const m = all.find((x) => x.id === select.value);
    if (!m) fill(body, h('p', { class: 'muted' }, 'No models.'));
    else if (m.task === 'image_classification') classify(body, m, stop.signal);
    else complete(body, m, stop.signal);
  };
  select.addEventListener('change', show);
  show();
}

function complete(body, model, signal) {
  const prompt = h('textarea', { id: 'pg-prompt', rows: 5, required: true }, 'Question 3: who wrote Emma?');
  const maxTokens = h('input', { id: 'pg-max-tokens', type: 'number', min: 1, max: 2048, value: 32 });
  const temperature = h('input', { id: 'pg-temperature', type: 'number', min: 0, max: 2, step: 0.1, value: 0 });
  const go = h('button', { type: 'submit', class: 'primary', id: 'pg-run' }, 'Complete');
  const out = h('pre', { class: 'output', id: 'pg-output', 'aria-live': 'polite' });
  const info = h('p', { class: 'muted', id: 'pg-info' });
  const form = h('form', { class: 'card' },
    h('label', { for: 'pg-prompt' }, 'Prompt'), prompt,
    h('div', { class: 'row' },
      h('label', { for: 'pg-max-tokens' }, 'Max tokens'), maxTokens,
      h('label', { for: 'pg-temperature' }, 'Temperature'), temperature, go),
    h('h2', {}, 'Completion'), out, info);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    go.disabled = true;
    fill(out, h('span', { class: 'prompt' }, prompt.value));
    const text = document.createTextNode('');
    out.append(text);
    info.textContent = 'Generating…';
    const t0 = performance.now();
    let chunks = 0;
    let finish = null;
    try {
      await streamEvents('/v1/completions', {
        method: 'POST', signal,
        body: {
          model: model.id, prompt: prompt.value, stream: true,
          max_tokens: Number(maxTokens.value), temperature: Number(temperature.value),
        },
        onEvent: (ev) => {
          if (ev.data === '[DONE]') return;
          const c = JSON.parse(ev.data);
          const choice = c.choices && c.choices[0];
          if (!choice) return;
          if (choice.text) { text.appendData(choice.text); chunks += 1; }
          if (choice.finish_reason) finish = choice.finish_reason;
        },
      });
      const secs = (performance.now() - t0) / 1000;
      info.textContent = `${chunks} tokens in ${fmtNum(secs)} s (${fmtNum(chunks / secs)} tokens/s), finished: ${finish || '–'}`;
    } catch (err) {
      if (!signal.aborted) info.textContent = `Error: ${errorText(err)}`;
    } finally {
      go.disabled = false;
    }
  });
  fill(body, form);
}

function classify(body, model, signal) {
  const input = h('input', { id: 'pg-image', type: 'file', accept: 'image/*', required: true });
  const topK = h('input', { id: 'pg-top-k', type: 'number', min: 1, max: 100, value: 5 });
  const go = h('button', { type: 'submit', class: 'primary', id: 'pg-run' }, 'Classify');
  const preview = h('div', { class: 'preview' });
  const out = h('div', { id: 'pg-output', 'aria-live': 'polite' });
  const form = h('form', { class: 'card' },
    h('div', { class: 'row' }, h('label', { for: 'pg-image' }, 'Image'), input,
      h('label', { for: 'pg-top-k' }, 'Top k'), topK, go),
    preview, out);
  input.addEventListener('change', () => {
    const f = input.files && input.files[0];
    fill(preview, f ? h('img', { src: URL.createObjectURL(f), alt: 'the chosen image', width: 96, height: 96 }) : null);
  });
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = input.files && input.files[0];
    if (!f) return;
    go.disabled = true;
    try {
      const b64 = await new Promise((resolve, reject) => {
        const r = new FileReader();
        r.onload = () => resolve(String(r.result).replace(/^data:[^,]*,/, ''));
        r.onerror = () => reject(r.error);
        r.readAsDataURL(f);
      });
      const res = await api('/v1/classifications', {
        method: 'POST', signal, body: { model: model.id, images: [b64], top_k: Number(topK.value) },
      });
      const top = res.data[0].predictions;
      fill(out, h('table', {},
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Class'), h('th', { scope: 'col', class: 'num' }, 'Probability'))),
        h('tbody', {}, top.map((c) => h('tr', {},
          h('td', {}, c.label),
          h('td', { class: 'num' }, `${fmtNum(c.probability * 100)} %`))))));
    } catch (err) {
      if (!signal.aborted) fill(out, h('p', { class: 'error' }, errorText(err)));
    } finally {
      go.disabled = false;
    }
  });
  fill(body, form);
}
