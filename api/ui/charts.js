// Charts: line charts over uPlot (vendor/uPlot.iife.min.js, the global `uPlot`), sized to
// their container (a fixed height, so nothing jumps as data arrives), and a parallel-
// coordinates view in plain SVG for a search's hyperparameters.

import { h, fmtNum } from './lib.js';

const PALETTE = ['#2f6fb0', '#d9822b', '#3c9a5f', '#b8475b', '#7a5cc4'];
const WHOLE = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);

/**
 * A line chart in `container` with series `[{label, points?}]`; x is the first array given
 * to `set`. Returns `{ set(data) }`; the container's `data-points` attribute counts the
 * x values drawn (the browser tests read it).
 */
export function lineChart(container, { title, xLabel, series, yLog = false, points = false, height = 220 }) {
  container.classList.add('chart');
  const empty = h('p', { class: 'chart-empty muted' }, 'No data yet');
  const holder = h('div', { class: 'chart-plot' });
  container.append(h('h3', { class: 'chart-title' }, title), holder, empty);
  container.dataset.points = '0';
  const opts = {
    width: Math.max(200, holder.clientWidth || 400),
    height,
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
    scales: { x: { time: false }, y: yLog ? { distr: 3 } : {} },
    axes: [
      // x is a step or a trial number: whole-number ticks only.
      { label: xLabel, stroke: 'currentColor', grid: { stroke: 'rgba(128,128,128,0.18)' }, incrs: WHOLE },
      { stroke: 'currentColor', size: 60, grid: { stroke: 'rgba(128,128,128,0.18)' },
        values: (u, vals) => vals.map((v) => fmtNum(v)) },
    ],
    series: [
      { label: xLabel },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || PALETTE[i % PALETTE.length],
        width: 1.6,
        spanGaps: true,
        points: { show: s.points ?? points, size: 5 },
        paths: s.pointsOnly ? () => null : undefined,
        value: (u, v) => fmtNum(v),
      })),
    ],
  };
  const empties = [[], ...series.map(() => [])];
  const plot = new uPlot(opts, empties, holder);
  // Resized on the next frame, not inside the observer's callback (which would re-enter
  // layout: "ResizeObserver loop completed with undelivered notifications").
  let width = opts.width;
  const ro = new ResizeObserver(() => requestAnimationFrame(() => {
    const w = holder.clientWidth;
    if (w > 0 && w !== width) {
      width = w;
      plot.setSize({ width: w, height });
    }
  }));
  ro.observe(holder);
  return {
    set(data) {
      plot.setData(data);
      const n = data[0].length;
      container.dataset.points = String(n);
      empty.hidden = n > 0;
    },
    destroy() {
      ro.disconnect();
      plot.destroy();
    },
  };
}

/**
 * Parallel coordinates: one vertical axis per dimension (numbers linear or log, booleans and
 * strings as categories), one line per row, coloured from best (dark) to worst (light) on
 * the last dimension, the objective. `rows`: [{values: {dim: v}, title}]; `dims`: names.
 */
export function parallelCoordinates(container, { dims, rows, objective, minimize }) {
  const NS = 'http://www.w3.org/2000/svg';
  const svg = (tag, attrs, ...kids) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    for (const k of kids) el.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return el;
  };
  // Axes 95 px apart at least (the view scrolls sideways when they do not fit); labels
  // alternate between two rows so that long names do not collide.
  const width = Math.max(480, 95 * (dims.length + 1));
  const height = 310;
  const top = 50;
  const bottom = height - 24;
  const axes = [...dims, objective];
  const x = (i) => 60 + (i * (width - 120)) / Math.max(1, axes.length - 1);
  const scales = axes.map((d) => scaleFor(rows.map((r) => r.values[d])));
  const objs = rows.map((r) => r.values[objective]).filter((v) => typeof v === 'number');
  const lo = Math.min(...objs);
  const hi = Math.max(...objs);
  const shade = (v) => {
    if (typeof v !== 'number' || hi === lo) return 0.5;
    const t = (v - lo) / (hi - lo);
    return minimize ? t : 1 - t; // 0 = best
  };
  const root = svg('svg', {
    viewBox: `0 0 ${width} ${height}`, width: '100%', role: 'img',
    'aria-label': `Parallel coordinates of ${rows.length} trials: ${axes.join(', ')}`,
  });
  for (const row of rows) {
    const pts = [];
    axes.forEach((d, i) => {
      const y = scales[i](row.values[d]);
      if (y !== null) pts.push(`${x(i).toFixed(1)},${(bottom - y * (bottom - top)).toFixed(1)}`);
    });
    const t = shade(row.values[objective]);
    const line = svg('polyline', {
      points: pts.join(' '), fill: 'none', 'stroke-width': 1.6,
      stroke: `hsl(212, 60%, ${Math.round(30 + 45 * t)}%)`, opacity: 0.85,
    });
    line.append(svg('title', {}, row.title));
    root.append(line);
  }
  axes.forEach((d, i) => {
    const g = svg('g', {});
    g.append(svg('line', { x1: x(i), x2: x(i), y1: top, y2: bottom, stroke: 'currentColor', 'stroke-opacity': 0.5 }));
    g.append(svg('text', { x: x(i), y: top - (i % 2 ? 12 : 30), 'text-anchor': 'middle', class: 'pc-label' }, d));
    for (const [frac, label] of scales[i].ticks) {
      g.append(svg('text', { x: x(i) + 4, y: bottom - frac * (bottom - top) + 4, class: 'pc-tick' }, label));
    }
    root.append(g);
  });
  root.style.minWidth = `${width}px`;
  container.replaceChildren(root);
  container.dataset.lines = String(rows.length);
}

/** Maps values of one dimension to [0, 1] (null when absent), with a few tick labels. */
function scaleFor(values) {
  const present = values.filter((v) => v !== undefined && v !== null);
  const nums = present.filter((v) => typeof v === 'number');
  if (present.length && nums.length === present.length) {
    const lo = Math.min(...nums);
    const hi = Math.max(...nums);
    const log = lo > 0 && hi / lo >= 100;
    const f = log ? Math.log : (v) => v;
    const a = f(lo);
    const b = f(hi);
    const map = (v) => (typeof v !== 'number' ? null : b === a ? 0.5 : (f(v) - a) / (b - a));
    const fn = (v) => map(v);
    fn.ticks = b === a ? [[0.5, fmtNum(lo)]] : [[0, fmtNum(lo)], [1, fmtNum(hi)]];
    return fn;
  }
  const cats = [...new Set(present.map((v) => String(v)))].sort();
  const fn = (v) => {
    if (v === undefined || v === null) return null;
    const i = cats.indexOf(String(v));
    return cats.length === 1 ? 0.5 : i / (cats.length - 1);
  };
  fn.ticks = cats.map((c, i) => [cats.length === 1 ? 0.5 : i / (cats.length - 1), c]);
  return fn;
}
