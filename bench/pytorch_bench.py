#!/usr/bin/env python3
"""PyTorch reference side of molt's speed benchmark (issue 2, "Speed"; issue 14 for Mamba-2).

Measures HF transformers' `MambaForCausalLM` — or `Mamba2ForCausalLM` for the `mamba2-130m`
shape, on its pure-PyTorch chunked path — (random init, CPU) + peft LoRA at the shapes that
`molt bench` measures, and prints one JSON object per line on stdout so that bench/run.sh (or any
other driver) can tabulate it next to molt's figures. Progress and warnings go to stderr.

Every measurement line carries:
  side, shape, batch, seq, metric, value, unit       -- the figure itself
  reps, median_s                                      -- timed repetitions (warm-up excluded), median
  cpu_wall                                            -- this process's CPU time / wall time over the
                                                         timed reps; ~threads on a quiet machine, lower
                                                         when other processes take the cores
  others_cpu                                          -- CPU used by everything else on the machine
                                                         during the timed reps, as a fraction of all
                                                         cores (from /proc/stat); 0 = quiet machine
  steal                                               -- hypervisor steal, same units
  peak_rss_mib                                        -- peak RSS during the timed reps (VmHWM, reset
                                                         before the reps), model weights included

Each shape runs in its own child process so that one shape's freed-but-not-returned heap does not
inflate the next shape's peak memory.

Usage: bench/.venv/bin/python bench/pytorch_bench.py [--shapes small,130m] [--threads 2] [--reps N]
       [--quick] [--sizes 1x512,4x128] [--metrics forward,train,generate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probes  # noqa: E402  (bench/probes.py, beside this script)

# The two model shapes of issue 2. `time_step_rank` for the small shape is HF's "auto"
# (ceil(hidden / 16)); the 130m shape is state-spaces/mamba-130m's config.
SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, time_step_rank=16),
    "130m": dict(hidden_size=768, num_hidden_layers=24, time_step_rank=48),
}
# state-spaces/mamba2-130m's config in HF's naming (vocab 50277 padded to 50288).
MAMBA2_SHAPES = {
    "mamba2-130m": dict(
        hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128,
        n_groups=1, chunk_size=256, expand=2, conv_kernel=4, vocab_size=50288,
        use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    ),
}
COMMON = dict(
    vocab_size=50280,
    state_size=16,
    expand=2,
    conv_kernel=4,
    use_bias=False,
    use_conv_bias=True,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
)

# Generation: a short prompt so that prefill is a small part of the time, then greedy decoding
# of a fixed number of tokens (min_new_tokens = max_new_tokens: a random model may emit EOS).
GEN_PROMPT = 16
GEN_NEW = 64
GEN_NEW_QUICK = 16
GEN_BATCHES = (1, 8)

LORA_R = 8
LORA_ALPHA = 16


def log(msg: str) -> None:
    print(f"[pytorch_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# One shape, in a child process.


def run_shape(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = args.child
    if shape in MAMBA2_SHAPES:
        from transformers import Mamba2Config, Mamba2ForCausalLM

        cfg = Mamba2Config(**MAMBA2_SHAPES[shape])
        model = Mamba2ForCausalLM(cfg)
    else:
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(**COMMON, **SHAPES[shape])
        model = MambaForCausalLM(cfg)
    model.to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = parse_sizes(args.sizes)
    metrics = set(args.metrics.split(","))
    budget = args.max_seconds
    vocab = cfg.vocab_size

    def emit(metric, value, unit, batch=None, seq=None, **extra):
        rec = {
            "side": "pytorch",
            "shape": shape,
            "batch": batch,
            "seq": seq,
            "metric": metric,
            "value": value,
            "unit": unit,
        }
        rec.update(extra)
        print(json.dumps(rec), flush=True)

    emit("params", n_params, "count")

    gen = torch.Generator().manual_seed(1)

    def ids(b, l):
        return torch.randint(0, vocab, (b, l), generator=gen)

    # -- forward: eval, no grad, full logits (as molt's forward computes them) -------------------
    if "forward" in metrics:
        model.eval()
        for b, l in sizes:
            x = ids(b, l)

            def fwd():
                with torch.inference_mode():
                    model(input_ids=x, use_cache=False).logits

            fwd()  # warm-up
            med, n, load, peak = probes.timed(fwd, args.reps, budget)
            log(f"{shape} forward {b}x{l}: {b * l / med:.1f} tokens/s ({n} reps, {load})")
            emit("forward_tokens_per_s", round(b * l / med, 3), "tokens/s", b, l,
                 reps=n, median_s=round(med, 5), peak_rss_mib=peak, **load)

    # -- generation: greedy, KV-free recurrent cache -------------------------------------------
    if "generate" in metrics:
        model.eval()
        new = GEN_NEW_QUICK if args.quick else GEN_NEW
        for b in GEN_BATCHES:
            prompt = ids(b, GEN_PROMPT)
            mask = torch.ones_like(prompt)

            def generate():
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=prompt,
                        attention_mask=mask,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=0,
                    )
                assert out.shape[1] == GEN_PROMPT + new, out.shape

            generate()  # warm-up
            med, n, load, peak = probes.timed(generate, args.reps, budget)
            tps = b * new / med
            log(f"{shape} generate batch {b}: {tps:.1f} tokens/s ({n} reps, {load})")
            emit("generate_tokens_per_s", round(tps, 3), "tokens/s", b, new,
                 prompt=GEN_PROMPT, reps=n, median_s=round(med, 5), peak_rss_mib=peak, **load)

    # -- training step: LoRA r=8 on in_proj + out_proj, forward + backward + AdamW ---------------
    if "train" in metrics:
        import peft
        import peft.tuners.tuners_utils as tuners_utils

        # peft >= 0.17 refuses LoRA on a Mamba `out_proj` ("incompatible with Mamba-based
        # models") because the CUDA fast path (`mamba_inner_fn` from mamba-ssm) reads
        # `out_proj.weight` directly and would silently bypass the adapter. On CPU that fast path
        # does not exist (`mamba_inner_fn` falls back to None and MambaMixer calls
        # `self.out_proj(...)` as a module), so the adapter is applied. The least invasive way
        # around the guard is to wrap the one module-level check function that
        # `_check_target_module_compatiblity` looks up at call time, letting `out_proj` through
        # and keeping every other check (e.g. `conv1d` stays refused). Nothing in peft's or
        # transformers' installed files is modified.
        original_check = tuners_utils._check_lora_target_modules_mamba

        def check_allowing_out_proj(peft_config, model_, target_name):
            if target_name == "out_proj":
                return None
            return original_check(peft_config, model_, target_name)

        tuners_utils._check_lora_target_modules_mamba = check_allowing_out_proj

        lora_cfg = peft.LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=["in_proj", "out_proj"],
            bias="none",
        )
        pmodel = peft.get_peft_model(model, lora_cfg)
        wrapped = [n for n, _ in pmodel.named_modules() if n.endswith("out_proj.lora_A")]
        if len(wrapped) != cfg.num_hidden_layers:
            sys.exit(f"LoRA was applied to {len(wrapped)} out_proj modules, "
                     f"expected {cfg.num_hidden_layers}")
        trainable = [p for p in pmodel.parameters() if p.requires_grad]
        emit("train_lora_trainable_params", sum(p.numel() for p in trainable), "count")
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        pmodel.train()

        def step(x):
            loss = pmodel(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for b, l in sizes:
            x = ids(b, l)
            # Warm-up at a shorter length: it exercises every code path (autograd, AdamW state,
            # thread pools) but a full-length PyTorch step at the 130m shape costs minutes (its
            # backward replays the Python time loop of the scan step by step).
            step(x[:, : min(l, 32)])
            med, n, load, peak = probes.timed(lambda: step(x), args.reps, budget)
            log(f"{shape} train_lora {b}x{l}: {b * l / med:.2f} tokens/s ({n} reps, {load})")
            emit("train_lora_tokens_per_s", round(b * l / med, 3), "tokens/s", b, l,
                 reps=n, median_s=round(med, 5), peak_rss_mib=peak, **load)

    # The whole child's peak over every measurement above (ru_maxrss is in KiB on Linux; it
    # shares VmHWM's high-water mark, so take the max with the per-measurement peaks).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    emit("process_peak_rss", round(probes.process_peak_mib(maxrss), 1), "MiB")


# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, _, l = part.strip().lower().partition("x")
        try:
            out.append((int(b), int(l)))
        except ValueError:
            sys.exit(f"--sizes: expected BxL items like 4x128, got {part!r}")
        if out[-1][0] < 1 or out[-1][1] < 1:
            sys.exit(f"--sizes: batch and length must be >= 1, got {part!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,130m",
                    help="comma list of: " + ",".join([*SHAPES, *MAMBA2_SHAPES]))
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions, median reported (default 5, --quick 1)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating a measurement once its timed reps took this long (default 30, --quick 0)")
    ap.add_argument("--quick", action="store_true", help="1 rep per measurement, shorter generation")
    ap.add_argument("--sizes", default="1x512,4x128", help="BxL list for forward and training")
    ap.add_argument("--metrics", default="forward,train,generate")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.max_seconds is None:
        args.max_seconds = 0.0 if args.quick else 30.0
    if args.threads < 1 or args.reps < 1:
        sys.exit("--threads and --reps must be >= 1")
    parse_sizes(args.sizes)
    unknown = set(args.metrics.split(",")) - {"forward", "train", "generate"}
    if unknown:
        sys.exit(f"--metrics: unknown {sorted(unknown)}")

    known = {**SHAPES, **MAMBA2_SHAPES}
    if args.child:
        if args.child not in known:
            sys.exit(f"unknown shape {args.child!r}")
        run_shape(args)
        return

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in known:
            sys.exit(f"--shapes: unknown shape {s!r} (known: {', '.join(known)})")

    import importlib.metadata as md

    versions = {k: md.version(k) for k in ("torch", "transformers", "peft")}
    print(json.dumps({"side": "pytorch", "metric": "env", "threads": args.threads, "reps": args.reps,
                      "python": platform.python_version(), **versions}), flush=True)

    # Pin the thread pools before torch starts in the child (OpenMP reads these at load time).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    passthrough = ["--threads", str(args.threads), "--reps", str(args.reps),
                   "--max-seconds", str(args.max_seconds), "--sizes", args.sizes, "--metrics", args.metrics]
    if args.quick:
        passthrough.append("--quick")
    failed = False
    for s in shapes:
        log(f"shape {s}")
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--child", s, *passthrough], env=env)
        if rc != 0:
            log(f"shape {s} failed with exit status {rc}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
