#!/usr/bin/env python3
"""Tabulates `molt bench` and `bench/pytorch_bench.py` JSON lines side by side (Markdown).

Usage: report.py MOLT.jsonl PYTORCH.jsonl [MACHINE.txt]

Standard library only, so it runs with any python3 (it does not need bench/.venv).

Model FLOPs per token, P = all parameters (the tied embedding counted once, as the LM head):
  forward                2P   (every weight is used once per token in one multiply-add; the
                               embedding lookup costs nothing, the tied head costs 2·V·D)
  LoRA training step     4P   forward 2P + backward activation gradients 2P; frozen weights get
                               no weight gradient; the rank-8 adapters add < 1 % and are left
                               out (they are not "useful" base-model work)
  full training step     6P   forward 2P + activation gradients 2P + weight gradients 2P
  generation             2P   per generated token (batch 1 is memory-bandwidth bound, so its
                               share of the matmul peak is low by nature)
The scan, conv and norms (~2 % of a forward at the 130m shape) are not counted. "% of peak"
divides the model FLOP rate by the best 1024³ f32 matmul rate `molt bench` measured in the
same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

TARGETS_NOTE = "issue 2 targets"


def load(path):
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print(f"warning: {path}:{n}: not JSON ({e})", file=sys.stderr)
    except FileNotFoundError:
        print(f"warning: {path} not found", file=sys.stderr)
    return rows


def index(rows):
    by = {}
    for r in rows:
        by[(r.get("shape"), r.get("metric"), r.get("batch"), r.get("seq"))] = r
    return by


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        if v != v:  # NaN
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def load_note(r):
    """cpu/wall and other processes' share of the cores, e.g. '1.9 / 0.05'."""
    if not r:
        return "–"
    return f"{fmt(r.get('cpu_wall'), 2)} / {fmt(r.get('others_cpu'), 2)}"


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    molt_rows, torch_rows = load(argv[1]), load(argv[2])
    machine = ""
    if len(argv) > 3:
        try:
            with open(argv[3]) as f:
                machine = f.read().strip()
        except OSError:
            pass
    m, p = index(molt_rows), index(torch_rows)

    matmuls = [r for r in molt_rows if r.get("metric") == "matmul_gflops"]
    peak = max((r["value"] for r in matmuls if isinstance(r.get("value"), (int, float))), default=None)
    env_m = next((r for r in molt_rows if r.get("metric") == "env"), {})
    env_p = next((r for r in torch_rows if r.get("metric") == "env"), {})

    out = []
    w = out.append
    if machine:
        w("```")
        w(machine)
        w("```")
        w("")
    w(f"molt threads: {env_m.get('threads', '?')} (RAYON_NUM_THREADS={env_m.get('rayon_threads')}); "
      f"PyTorch threads: {env_p.get('threads', '?')} (torch {env_p.get('torch', '?')}, "
      f"transformers {env_p.get('transformers', '?')}, peft {env_p.get('peft', '?')})")
    w("")
    if matmuls:
        readings = ", ".join(
            f"{r.get('shape') or ''}{r.get('when', '')}: best {fmt(r['value'])} / median "
            f"{fmt(r.get('median_gflops'))} (cpu/wall {fmt(r.get('cpu_wall'), 2)}, others {fmt(r.get('others_cpu'), 2)})"
            for r in matmuls
        )
        w(f"f32 matmul 1024³ (Candle), GFLOP/s: {readings}. Peak used below: **{fmt(peak)} GFLOP/s**.")
        w("")

    shapes = []
    for r in molt_rows + torch_rows:
        s = r.get("shape")
        if s and s not in shapes:
            shapes.append(s)

    checks = []
    for shape in shapes:
        params = (m.get((shape, "params", None, None)) or p.get((shape, "params", None, None)) or {}).get("value")
        w(f"### {shape} shape ({fmt(params / 1e6 if params else None)} M parameters)")
        w("")
        w("| measurement | B×L | molt tokens/s | PyTorch tokens/s | molt / PyTorch | molt % of matmul peak "
          "| molt / PyTorch per CPU-second | molt peak RSS MiB | PyTorch peak RSS MiB | cpu/wall, others: molt | … PyTorch |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = defaultdict(list)
        for r in molt_rows + torch_rows:
            if r.get("shape") == shape and r.get("unit") == "tokens/s":
                rows[r["metric"]].append((r.get("batch"), r.get("seq")))
        order = ["forward_tokens_per_s", "train_lora_tokens_per_s", "train_full_tokens_per_s",
                 "generate_tokens_per_s"]
        labels = {
            "forward_tokens_per_s": ("forward (no grad, full logits)", 2),
            "train_lora_tokens_per_s": ("training step, LoRA r=8 in/out_proj, AdamW", 4),
            "train_full_tokens_per_s": ("training step, all weights, AdamW", 6),
            "generate_tokens_per_s": ("greedy generation", 2),
        }
        for metric in order:
            seen = []
            for key in rows.get(metric, []):
                if key in seen:
                    continue
                seen.append(key)
                b, l = key
                mr, pr = m.get((shape, metric, b, l)), p.get((shape, metric, b, l))
                mv = mr.get("value") if mr else None
                pv = pr.get("value") if pr else None
                ratio = mv / pv if mv and pv else None
                # Tokens per CPU-second of each process: under contention the two sides get
                # different shares of the cores, and this ratio takes that out (spin-waiting
                # still counts as CPU time, so it does not flatter either side).
                cpu_ratio = None
                if ratio and mr.get("cpu_wall") and pr.get("cpu_wall"):
                    cpu_ratio = ratio * pr["cpu_wall"] / mr["cpu_wall"]
                label, k = labels[metric]
                util = None
                if mv and params and peak:
                    util = 100.0 * mv * k * params / (peak * 1e9)
                size = f"{b}×{l}" if metric != "generate_tokens_per_s" else f"batch {b}, {l} new"
                w(f"| {label} | {size} | {fmt(mv)} | {fmt(pv)} | {fmt(ratio, 2)}× | {fmt(util)} % | {fmt(cpu_ratio, 2)}× "
                  f"| {fmt(mr.get('peak_rss_mib') if mr else None)} | {fmt(pr.get('peak_rss_mib') if pr else None)} "
                  f"| {load_note(mr)} | {load_note(pr)} |")
                if metric == "forward_tokens_per_s" and ratio is not None:
                    want = {"130m": 4.0, "small": 10.0}.get(shape)
                    if want:
                        checks.append((f"forward {shape} {b}×{l} ≥ {want:g}× PyTorch", ratio >= want,
                                       f"{ratio:.2f}×"))
                    if shape == "130m" and util is not None:
                        checks.append((f"forward 130m {b}×{l} ≈ 65 % of matmul peak (the issue's gloss of 4×)", util >= 65.0,
                                       f"{util:.1f} %"))
                if metric == "train_lora_tokens_per_s" and util is not None and shape == "130m":
                    checks.append((f"LoRA step 130m {b}×{l} ≥ 40 % of matmul peak (4P FLOPs/token)",
                                   util >= 40.0, f"{util:.1f} % ({fmt(mv)} tokens/s)"))
                if (metric == "train_lora_tokens_per_s" and shape == "130m" and (b, l) == (4, 128)
                        and mr and mr.get("peak_rss_mib")):
                    checks.append(("peak RSS, 130m LoRA step 4×128 < 3 GiB", mr["peak_rss_mib"] < 3072,
                                   f"{mr['peak_rss_mib']:.0f} MiB"))
        w("")
        scans = [r for r in molt_rows if r.get("shape") == shape and r.get("metric", "").startswith("scan_")]
        if scans:
            w("| scan alone (E = d_inner, N = 16) | B×L | fused ms | plain Candle ops ms | fused speed-up | cpu/wall, others |")
            w("|---|---|---|---|---|---|")
            for r in scans:
                what = "forward + backward" if r["metric"] == "scan_fwd_bwd_speedup" else "forward only"
                w(f"| {what} | {r.get('batch')}×{r.get('seq')} | {fmt(r.get('fused_s', 0) * 1e3, 2)} "
                  f"| {fmt(r.get('reference_s', 0) * 1e3, 2)} | {fmt(r.get('value'))}× | {load_note(r)} |")
                if r["metric"] == "scan_fwd_bwd_speedup":
                    checks.append((f"fused scan fwd+bwd {shape} {r.get('batch')}×{r.get('seq')} ≥ 20× plain ops",
                                   r.get("value", 0) >= 20.0, f"{r.get('value')}×"))
            w("")
        for side, idx in (("molt", m), ("PyTorch", p)):
            r = idx.get((shape, "process_peak_rss", None, None))
            if r:
                w(f"{side} process peak RSS ({shape}): {fmt(r.get('value'))} MiB. ")
        w("")

    methods_table(molt_rows, w)

    if checks:
        w(f"### {TARGETS_NOTE}")
        w("")
        w("| target | met | measured |")
        w("|---|---|---|")
        for name, ok, got in checks:
            w(f"| {name} | {'yes' if ok else '**no**'} | {got} |")
        w("")
    w("cpu/wall: the process's CPU time over wall time during the timed reps (≈ thread count when "
      "it has the cores to itself). others: CPU used by every other process, as a share of all cores "
      "(0 = quiet machine).")
    print("\n".join(out))


def methods_table(molt_rows, w):
    """Issue 3: every PEFT method's training step, relative to the first row (LoRA(in_proj))."""
    rows = [r for r in molt_rows if r.get("metric") == "method_train_tokens_per_s"]
    for shape in dict.fromkeys(r.get("shape") for r in rows):
        for size in dict.fromkeys((r.get("batch"), r.get("seq")) for r in rows if r.get("shape") == shape):
            sel = [r for r in rows if r.get("shape") == shape and (r.get("batch"), r.get("seq")) == size]
            ref = sel[0]
            w(f"### PEFT methods, {shape} shape, training step at {size[0]}×{size[1]} "
              f"(relative to {ref.get('method')})")
            w("")
            w("| method | trainable params (molt) | the papers' count | tokens/s | vs "
              f"{ref.get('method')} | peak RSS MiB | vs {ref.get('method')} | cpu/wall, others |")
            w("|---|---|---|---|---|---|---|---|")
            for r in sel:
                tps, mem = r.get("value"), r.get("peak_rss_mib")
                rel = tps / ref["value"] if tps and ref.get("value") else None
                rel_mem = mem / ref["peak_rss_mib"] if mem and ref.get("peak_rss_mib") else None
                paper = r.get("paper_params")
                w(f"| {r.get('method')} | {r.get('trainable_params', 0):,} | "
                  f"{f'{paper:,}' if paper else '–'} | {fmt(tps)} | {fmt(rel, 2)}× | {fmt(mem)} | "
                  f"{fmt(rel_mem, 2)}× | {load_note(r)} |")
            w("")


if __name__ == "__main__":
    main(sys.argv)
