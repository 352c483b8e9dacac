#!/usr/bin/env python3
"""Tabulates the Vision Mamba figures of `molt bench --shapes vim-tiny` and
`bench/vim_bench.py` side by side (Markdown), with issue 13's targets.

Usage: vim_report.py MOLT.jsonl PYTORCH.jsonl [MACHINE.txt]

Standard library only. "% of peak" divides molt's useful model GFLOP/s (`model_gflops`: the
forward's matmul FLOPs per image — patch embedding, every projection of both scan directions,
the head — times images/s; twice that for a PEFT training step, forward + activation
gradients) by the best 1024³ f32 matmul rate `molt bench` measured in the same process.
Targets (issue 13): inference ≥ 40 % of peak, training with each method ≥ 30 %.
"""

from __future__ import annotations

import json
import sys

TARGETS = {"vim_forward_images_per_s": 40.0, "vim_train_images_per_s": 30.0}


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        print(f"warning: {path} not found", file=sys.stderr)
    return rows


def fmt(v, digits=2):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


# vim_bench.py's method names → the adapter type molt's lines carry in `spec`.
PYTORCH_METHODS = {"lora_in_proj": "lora", "additional_scan": "additional_scan", "prodial": "prodial"}


def key(r):
    """(metric, adapter type) — the same on both sides."""
    if isinstance(r.get("spec"), dict):
        kind = r["spec"].get("type", "")
    else:
        kind = PYTORCH_METHODS.get(r.get("method") or "", r.get("method") or "")
    return (r.get("metric"), kind)


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    molt, torch = load(argv[1]), load(argv[2])
    if len(argv) > 3:
        try:
            print("```\n" + open(argv[3]).read().rstrip() + "\n```\n")
        except FileNotFoundError:
            pass
    peaks = [r for r in molt if r.get("metric") == "matmul_gflops"]
    peak = max((r["value"] for r in peaks), default=None)
    if peaks:
        readings = ", ".join(
            f"{r.get('when')}: best {fmt(r['value'], 0)} / median {fmt(r.get('median_gflops'), 0)}"
            for r in peaks
        )
        print(f"f32 matmul 1024³ (Candle), GFLOP/s: {readings}. Peak used: **{fmt(peak, 0)} GFLOP/s**.\n")
    by_torch = {key(r): r for r in torch if r.get("unit") == "images/s"}
    rows = [r for r in molt if r.get("unit") == "images/s"]
    print(
        "| measurement | method | trainable params | batch | molt images/s | PyTorch images/s | "
        "molt / PyTorch | molt GFLOP/s | % of matmul peak | target | molt peak RSS MiB | "
        "PyTorch peak RSS MiB | cpu/wall, others: molt | … PyTorch |"
    )
    print("|" + "---|" * 14)
    for r in rows:
        t = by_torch.get(key(r), {})
        pct = 100.0 * r["model_gflops"] / peak if peak else None
        target = TARGETS.get(r["metric"])
        met = "–" if pct is None or target is None else ("met" if pct >= target else "**not met**")
        ratio = r["value"] / t["value"] if t.get("value") else None
        what = "inference" if "forward" in r["metric"] else "training step"
        print(
            f"| {what} | {r.get('method') or '–'} | {fmt(r.get('trainable_params'))} | {r.get('batch')} | "
            f"{fmt(r['value'])} | {fmt(t.get('value'), 3)} | {fmt(ratio, 1)}× | {fmt(r['model_gflops'], 1)} | "
            f"{fmt(pct, 1)} % | ≥ {fmt(target, 0)} %: {met} | {fmt(r.get('peak_rss_mib'), 0)} | "
            f"{fmt(t.get('peak_rss_mib'), 0)} | {fmt(r.get('cpu_wall'))} / {fmt(r.get('others_cpu'))} | "
            f"{fmt(t.get('cpu_wall'))} / {fmt(t.get('others_cpu'))} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
