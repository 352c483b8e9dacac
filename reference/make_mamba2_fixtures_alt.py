#!/usr/bin/env python3
"""Generates tests/fixtures/mamba2_alt/: Mamba-2 parity fixtures on other shapes.

One base case in the format of tests/fixtures/mamba2/m2_tiny (see that folder's README),
built by make_fixtures_alt.py's `make_base` on HF transformers' `Mamba2ForCausalLM`:

  m2_alt  vocabulary 509 (not a multiple of 8), hidden 40, 10 heads x head_dim 8 (E 80),
          state 12, 2 groups (5 heads each), chunk 7, conv kernel 3, 3 layers, a finite
          time_step_limit (0.001, 0.08) that clamps part of the dt values (the full forward
          and the prefill clamp, the single-token cached steps do not: HF's behaviour);
          batch 3 x 11, greedy generation (prompt 5, 8 new tokens), prefill cache, left
          padding, full fine-tune gradients; no tokenizer

References come from HF's pure-PyTorch path (the script stops if mamba_ssm or causal_conv1d
is importable), float32 on CPU, one thread, deterministic algorithms, fixed seeds; running it
twice gives byte-identical files (`--check` regenerates into a temporary folder and compares).

    bench/.venv/bin/python reference/make_mamba2_fixtures_alt.py            # writes tests/fixtures/mamba2_alt
    bench/.venv/bin/python reference/make_mamba2_fixtures_alt.py --check    # regenerates, compares
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures_alt as g  # noqa: E402  (re-executes with PYTHONHASHSEED=0 first)

from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402

g.SET = "mamba2_alt"
g.GENERATED_BY = "reference/make_mamba2_fixtures_alt.py"
DEFAULT_OUT = g.REPO / "tests" / "fixtures" / "mamba2_alt"

BASE = {
    "name": "m2_alt",
    "vocab_size": 509,
    "hidden_size": 40,
    "num_heads": 10,
    "head_dim": 8,
    "state_size": 12,
    "n_groups": 2,
    "chunk_size": 7,
    "num_hidden_layers": 3,
    "expand": 2,
    "conv_kernel": 3,
    "time_step_limit": (0.001, 0.08),
    "batch": 3,
    "seq": 11,
    "prompt_len": 5,
    "new_tokens": 8,
    "n_left_pad": 3,
    "seeds": {"torch.manual_seed (init)": 5001, "perturbation": 5002, "inputs": 5003},
}


def hf_config(spec):
    return Mamba2Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        num_heads=spec["num_heads"],
        head_dim=spec["head_dim"],
        state_size=spec["state_size"],
        n_groups=spec["n_groups"],
        chunk_size=spec["chunk_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        expand=spec["expand"],
        conv_kernel=spec["conv_kernel"],
        time_step_limit=spec["time_step_limit"],
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


MAMBA2 = {
    "config": hf_config,
    "cls": Mamba2ForCausalLM,
    "config_keys": ["vocab_size", "hidden_size", "num_heads", "head_dim", "state_size",
                    "n_groups", "chunk_size", "num_hidden_layers", "expand", "conv_kernel",
                    "time_step_limit", "layer_norm_epsilon", "tie_word_embeddings", "use_bias",
                    "use_conv_bias", "residual_in_fp32"],
    "conv_state": "the last conv_kernel pre-conv xBC inputs [batch, E + 2GN, conv_kernel]",
    "ssm_state": "SSM state after the prompt [batch, heads, head_dim, state]",
    "title": "Mamba-2",
    "check_config": lambda cfg_json: cfg_json["model_type"] == "mamba2",
}


def generate(out: Path):
    out.mkdir(parents=True)
    cases = [g.make_base(out, BASE, MAMBA2)]
    g.write_json(out / "index.json", {
        "generated_by": g.GENERATED_BY,
        "set": g.SET,
        "versions": g.versions(),
        "cases": cases,
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare with --out byte for byte")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "mamba2_alt"
        generate(fresh)
        if args.check:
            diff = g.same_tree(fresh, args.out)
            if diff:
                sys.exit(f"{args.out} differs from a fresh run: {diff}")
            print(f"{args.out}: identical to a fresh run")
            return
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(fresh, args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
