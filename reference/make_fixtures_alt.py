#!/usr/bin/env python3
"""Generates tests/fixtures/alt/: a second set of parity fixtures on other shapes.

The set has the format of tests/fixtures/ (see tests/fixtures/README.md): an `index.json`,
and per case a `manifest.json`, a `reference.safetensors` and a `model/` or `adapter/`
folder. Its cases:

  alt       base HF Mamba-1 checkpoint: vocabulary 397 (not a multiple of 8), hidden 56,
            state 12, conv kernel 3, 3 layers, dt_rank 4; batch 3 x 11; no tokenizer
  alt_lora  PEFT LoRA r=3, alpha=5 on x_proj, dt_proj, out_proj
  alt_dora  PEFT DoRA r=2, alpha=3 on in_proj, x_proj
  alt_ops   kernel-level ops: batch 3, d_inner 12, seq 9, state 5, conv kernel 3

References come from HF transformers' MambaForCausalLM on its pure-PyTorch path and from
peft, on CPU, float32, one thread, deterministic algorithms, fixed seeds. Running the script
twice gives byte-identical files (`--check` regenerates into a temporary folder and compares).

    bench/.venv/bin/python reference/make_fixtures_alt.py            # writes tests/fixtures/alt
    bench/.venv/bin/python reference/make_fixtures_alt.py --check    # regenerates, compares

Versions: torch 2.15.0, transformers 5.23.0, peft 0.21.2, safetensors 0.8.0 (bench/setup.sh).
"""

import os
import sys

# Set iteration order (peft keeps target_modules in a set) must not depend on the run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import argparse  # noqa: E402
import copy  # noqa: E402
import filecmp  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402
from transformers.models.mamba import modeling_mamba as hf_mamba  # noqa: E402
import peft  # noqa: E402
import peft.tuners.tuners_utils as peft_tuners_utils  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.utils.logging.set_verbosity_error()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "alt"
SET = "alt"
GENERATED_BY = "reference/make_fixtures_alt.py"

BASE = {
    "name": "alt",
    "vocab_size": 397,
    "hidden_size": 56,
    "state_size": 12,
    "num_hidden_layers": 3,
    "expand": 2,
    "conv_kernel": 3,
    "time_step_rank": 4,
    "batch": 3,
    "seq": 11,
    "prompt_len": 5,
    "new_tokens": 8,
    "n_left_pad": 3,
    "seeds": {"torch.manual_seed (init)": 4001, "perturbation": 4002, "inputs": 4003},
}

ADAPTERS = [
    {
        "name": "alt_lora",
        "kind": "lora",
        "r": 3,
        "lora_alpha": 5,
        "targets": ["x_proj", "dt_proj", "out_proj"],
        # lora_B std per target: the SSM-path projections need larger values to move the
        # logits of a random model visibly.
        "b_std": {"x_proj": 0.3, "dt_proj": 0.3, "out_proj": 0.05},
        "seed": 4101,
    },
    {
        "name": "alt_dora",
        "kind": "dora",
        "r": 2,
        "lora_alpha": 3,
        "targets": ["in_proj", "x_proj"],
        "b_std": {"in_proj": 0.05, "x_proj": 0.3},
        "seed": 4201,
    },
]

OPS = {"name": "alt_ops", "batch": 3, "d_inner": 12, "seq": 9, "state": 5, "conv_kernel": 3,
       "seed": 4301}

TOLERANCES = {
    "logits": {"atol": 1e-4, "rtol": 1e-4},
    "loss": {"atol": 1e-5, "rtol": 1e-5},
    "hidden": {"atol": 1e-4, "rtol": 1e-4},
    "state": {"atol": 1e-4, "rtol": 1e-4},
    "grad": {"atol": 1e-5, "rtol": 1e-3, "rel_l2": 1e-4},
    "weight": {"atol": 1e-6, "rtol": 1e-5},
    "ids": {"exact": True},
    "op": {"atol": 1e-5, "rtol": 1e-4},
}

# Every draw of the peft guard that refuses out_proj on Mamba models is skipped (see the
# LoRA manifest's notes); nothing else of peft is changed.
peft_tuners_utils._check_lora_target_modules_mamba = lambda *args, **kwargs: None


def versions():
    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": v("safetensors"),
        "tokenizers": v("tokenizers"),
        "numpy": v("numpy"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }


def slow_path():
    """Which optional kernel packages exist (none may: the references use HF's PyTorch path)."""
    out = {}
    for mod in ["mamba_ssm", "causal_conv1d", "kernels", "mambapy"]:
        out[f"module {mod} importable"] = importlib.util.find_spec(mod) is not None
    if any(out.values()):
        sys.exit(f"a kernel package is installed, the slow path is not guaranteed: {out}")
    return out


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def file_entry(path: Path):
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def dtype_name(t: torch.Tensor):
    return {torch.float32: "F32", torch.int64: "I64"}[t.dtype]


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def save_reference(case_dir: Path, tensors: dict, describe):
    """Writes reference.safetensors; returns the manifest's tensor table."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    for k, v in clean.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        assert torch.isfinite(v.double()).all(), k
    save_file(clean, str(case_dir / "reference.safetensors"))
    table = {}
    for k in sorted(clean):
        tol, desc = describe(k)
        assert tol in TOLERANCES, (k, tol)
        table[k] = {"shape": list(clean[k].shape), "dtype": dtype_name(clean[k]),
                    "tolerance": tol, "desc": desc}
    return table


def files_of(case_dir: Path, root: Path):
    out = {}
    for p in sorted(case_dir.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[p.relative_to(case_dir).as_posix()] = file_entry(p)
    return out


# ---- base case ------------------------------------------------------------------------------


def hf_config(spec):
    return MambaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        state_size=spec["state_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        expand=spec["expand"],
        conv_kernel=spec["conv_kernel"],
        time_step_rank=spec["time_step_rank"],
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        use_mambapy=False,
    )


def load_model(model_dir: Path, cls=MambaForCausalLM):
    m = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    m.eval()
    return m


# What differs between the architectures make_base covers (make_mamba2_fixtures_alt.py adds
# Mamba-2): the config, the model class, the config keys the manifest repeats, the cache
# shapes and the description.
MAMBA1 = {
    "config": lambda spec: hf_config(spec),
    "cls": MambaForCausalLM,
    "config_keys": ["vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand",
                    "conv_kernel", "time_step_rank", "intermediate_size", "layer_norm_epsilon",
                    "tie_word_embeddings", "use_bias", "use_conv_bias", "residual_in_fp32"],
    "conv_state": "the last conv_kernel pre-conv x inputs [batch, d_inner, conv_kernel]",
    "ssm_state": "SSM state after the prompt [batch, d_inner, state]",
    "title": "Mamba-1",
    "check_config": lambda cfg_json: isinstance(cfg_json["time_step_rank"], int),
}


def capture_hidden(model):
    """Forward hooks recording the embeddings, each block's output and norm_f's output."""
    store = {}
    handles = [model.backbone.embeddings.register_forward_hook(
        lambda m, i, o: store.__setitem__("hidden.embeddings", o.detach().clone()))]
    for idx, layer in enumerate(model.backbone.layers):
        handles.append(layer.register_forward_hook(
            lambda m, i, o, idx=idx: store.__setitem__(f"hidden.block.{idx}", o.detach().clone())))
    handles.append(model.backbone.norm_f.register_forward_hook(
        lambda m, i, o: store.__setitem__("hidden.norm_f", o.detach().clone())))
    return store, handles


def shifted_ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_base(out: Path, spec, arch=MAMBA1):
    name = spec["name"]
    case_dir = out / name
    model_dir = case_dir / "model"
    model_dir.mkdir(parents=True)
    seeds = spec["seeds"]
    cfg = arch["config"](spec)

    torch.manual_seed(seeds["torch.manual_seed (init)"])
    model = arch["cls"](cfg)
    g = torch.Generator().manual_seed(seeds["perturbation"])
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            rms = p.pow(2).mean().sqrt().item()
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (rms if rms > 0 else 1.0))
    model.eval()
    model.save_pretrained(str(model_dir))
    keys = sorted(load_file(str(model_dir / "model.safetensors")).keys())
    assert "lm_head.weight" not in keys, keys
    cfg_json = json.loads((model_dir / "config.json").read_text())
    assert arch["check_config"](cfg_json), cfg_json

    # Everything below runs on the checkpoint as stored.
    mem_model = model
    model = load_model(model_dir, arch["cls"])
    V = spec["vocab_size"]
    B, T = spec["batch"], spec["seq"]
    gi = torch.Generator().manual_seed(seeds["inputs"])
    input_ids = torch.randint(0, V, (B, T), generator=gi)
    # The last embedding row must be used, so that a wrong vocabulary size shows.
    input_ids[0, 2] = V - 1
    input_ids[B - 1, T - 2] = V - 1

    checks, measured = {}, {}
    ref = {"input_ids": input_ids}
    with torch.no_grad():
        checks["reload_logits_bit_exact"] = bool(torch.equal(
            mem_model(input_ids, use_cache=False).logits, model(input_ids, use_cache=False).logits))
        store, handles = capture_hidden(model)
        out_nc = model(input_ids, labels=input_ids, use_cache=False)
        for h in handles:
            h.remove()
        out_c = model(input_ids, use_cache=True)
    ref["logits"] = out_nc.logits
    ref["loss"] = out_nc.loss.reshape(1)
    ref.update(store)
    assert len(store) == spec["num_hidden_layers"] + 2
    assert torch.equal(store["hidden.embeddings"], model.backbone.embeddings.weight[input_ids])
    checks["full_forward_use_cache_true_vs_false_max_abs"] = max_abs(out_c.logits, out_nc.logits)
    checks["hf_loss_vs_manual_shifted_ce_abs"] = abs(
        out_nc.loss.item() - shifted_ce(out_nc.logits, input_ids).item())

    # Full fine-tune gradients (train mode; there is no dropout, so it equals eval).
    model.train()
    model.zero_grad()
    out_t = model(input_ids, labels=input_ids, use_cache=False)
    out_t.loss.backward()
    checks["train_mode_logits_bit_exact"] = bool(torch.equal(out_t.logits, out_nc.logits))
    params = dict(model.named_parameters())
    assert sorted(params) == keys, (sorted(params), keys)
    for pname, p in params.items():
        assert p.grad is not None, pname
        ref[f"grad.{pname}"] = p.grad.detach().clone()
    model.eval()
    model.zero_grad()

    # Float64 re-run (HF casts A, D, the dt bias and the logits to float32 inside, so these
    # bound the float32 error from above only roughly).
    m64 = copy.deepcopy(model).double()
    out64 = m64(input_ids, labels=input_ids, use_cache=False)
    out64.loss.backward()
    measured["logits_f32_vs_f64_max_abs"] = max_abs(ref["logits"], out64.logits)
    measured["loss_f32_vs_f64_abs"] = max_abs(ref["loss"], out64.loss.reshape(1))
    g_abs, g_l2 = 0.0, 0.0
    for pname, p in m64.named_parameters():
        want = p.grad.double()
        got = ref[f"grad.{pname}"].double()
        g_abs = max(g_abs, (got - want).abs().max().item())
        g_l2 = max(g_l2, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    measured["grad_f32_vs_f64_max_abs"] = g_abs
    measured["grad_f32_vs_f64_max_rel_l2"] = g_l2
    measured["logits_max_abs_value"] = ref["logits"].abs().max().item()
    del m64

    # Greedy generation with the cache; prompts are redrawn until no step is a near tie and
    # the greedy token is the raw logits' argmax (min_new_tokens masks EOS = id 0).
    P, NT = spec["prompt_len"], spec["new_tokens"]
    for attempt in range(100):
        prompt = torch.randint(0, V, (B, P), generator=gi)
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=NT, min_new_tokens=NT, do_sample=False,
                                 use_cache=True, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        step_logits = torch.stack(list(gen.logits)).float()
        top2 = step_logits.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).min().item()
        greedy_ok = torch.equal(gen.sequences[:, P:], step_logits.argmax(-1).T)
        if gap >= 1e-3 and greedy_ok:
            break
    else:
        sys.exit("no prompt without near ties found")
    ref["gen.prompt_ids"] = prompt
    ref["gen.sequences"] = gen.sequences
    ref["gen.step_logits"] = step_logits
    checks["gen_prompt_attempts"] = attempt + 1
    checks["gen_min_top2_gap"] = gap
    with torch.no_grad():
        pre = model(prompt, use_cache=True)
        cache = pre.cache_params
        for i in range(spec["num_hidden_layers"]):
            ref[f"gen.prefill.conv_state.{i}"] = cache.get_conv_state(i, state_idx=0).clone()
            ref[f"gen.prefill.ssm_state.{i}"] = cache.get_recurrent_state(i, state_idx=0).clone()
        # Each step's logits against a full forward (no cache) over the growing sequence.
        worst = 0.0
        for k in range(NT):
            seq = gen.sequences[:, : P + k]
            full = model(seq, use_cache=False).logits[:, -1]
            worst = max(worst, max_abs(full, step_logits[k]))
        checks["gen_step_logits_vs_full_forward_max_abs"] = worst

    # Left padding: the last row shifted right by n_left_pad, pad id 0, mask 0.
    n_pad = spec["n_left_pad"]
    m_ids = input_ids.clone()
    mask = torch.ones_like(input_ids)
    m_ids[B - 1] = torch.cat([torch.zeros(n_pad, dtype=torch.long), input_ids[B - 1, : T - n_pad]])
    mask[B - 1, :n_pad] = 0
    with torch.no_grad():
        m_logits = model(m_ids, attention_mask=mask, use_cache=False).logits
        alone = model(input_ids[B - 1 :, : T - n_pad], use_cache=False).logits
    ref["masked.input_ids"] = m_ids
    ref["masked.attention_mask"] = mask
    ref["masked.logits"] = m_logits
    checks["masked_real_positions_vs_unpadded_max_abs"] = max_abs(m_logits[B - 1, n_pad:], alone[0])
    assert checks["masked_real_positions_vs_unpadded_max_abs"] < 1e-5, checks

    def describe(k):
        d_inner = spec["expand"] * spec["hidden_size"]
        table = {
            "input_ids": ("ids", "token ids [batch, seq]; also the labels (HF shifts them inside)"),
            "logits": ("logits", "logits [batch, seq, vocab] of the forward on input_ids"),
            "loss": ("loss", "mean next-token cross-entropy over batch*(seq-1) positions, shape [1]"),
            "hidden.embeddings": ("hidden", "embedding lookup output [batch, seq, hidden]"),
            "hidden.norm_f": ("hidden", "after the final RMSNorm, the lm_head input [batch, seq, hidden]"),
            "gen.prompt_ids": ("ids", "greedy-generation prompt [batch, prompt_len]"),
            "gen.sequences": ("ids", "prompt + greedily generated ids [batch, prompt_len+new_tokens]"),
            "gen.step_logits": ("logits", "logits of each generation step [new_tokens, batch, vocab]; step 0 is the last prompt position (prefill), later steps are single-token cached decode steps"),
            "masked.input_ids": ("ids", "input ids with the last row left-padded with pad id 0"),
            "masked.attention_mask": ("ids", "1 = real token, 0 = padding [batch, seq]"),
            "masked.logits": ("logits", "logits of the forward on masked.input_ids with masked.attention_mask"),
        }
        if k in table:
            return table[k]
        if k.startswith("hidden.block."):
            return ("hidden", "residual stream after block i (before norm_f) [batch, seq, hidden]")
        if k.startswith("grad."):
            return ("grad", "d loss / d parameter, same shape as the parameter")
        if k.startswith("gen.prefill.conv_state."):
            return ("state", "layer i conv cache after the prompt: " + arch["conv_state"])
        if k.startswith("gen.prefill.ssm_state."):
            return ("state", "layer i " + arch["ssm_state"])
        raise KeyError(f"{k} (d_inner {d_inner})")

    tensors = save_reference(case_dir, ref, describe)
    manifest = {
        "case": name,
        "kind": "base",
        "set": SET,
        "generated_by": GENERATED_BY,
        "versions": versions(),
        "description": f"Base HF {arch['title']} checkpoint '{name}' (random init, perturbed) with full-fine-tune references, on shapes other than the shared set's.",
        "model_dir": f"{name}/model",
        "config": {k: cfg_json[k] for k in arch["config_keys"]},
        "checkpoint_keys": keys,
        "lm_head": "tied: model.safetensors has no lm_head.weight; logits = norm_f(h) @ backbone.embeddings.weight^T",
        "batch": {"batch": B, "seq": T, "labels": "labels = input_ids (HF shifts inside)"},
        "generation": {
            "prompt_len": P,
            "new_tokens": NT,
            "strategy": "greedy (argmax), use_cache=True",
            "eos_stopping": "off (min_new_tokens = max_new_tokens)",
            "prompt_source": "random ids from the inputs generator, redrawn until every step's top-two logits differ by >= 1e-3",
        },
        "masked": {"n_left_pad": n_pad, "padded_row": B - 1, "pad_id": 0},
        "seeds": seeds,
        "tokenizer": None,
        "slow_path": slow_path(),
        "checks": checks,
        "measured": measured,
        "notes": [
            "grad.backbone.embeddings.weight is the sum of the embedding-lookup and the tied lm_head contributions (PyTorch has one Parameter; lm_head.weight is not listed separately).",
            "Gradients are of the mean loss, computed in train() mode (no dropout exists, so identical to eval).",
            "masked.*: with HF's attention_mask the normed block input and the conv output are zeroed at padded positions, so left padding leaves the real positions as if unpadded (see checks).",
            "No tokenizer: this case has no model/tokenizer.json and `tokenizer` is null; input_ids[0, 2] and input_ids[-1, -2] are the last vocabulary id.",
            "Perturbation: every parameter p += 0.1 * rms(p) * N(0,1) (rms 1 where p is all zeros), drawn in sorted-name order.",
            "measured.*_f64: HF's code casts A, D, the dt bias and the logits to float32 even in a float64 model, so these are rough bounds.",
        ],
        "files": files_of(case_dir, out),
        "tolerances": TOLERANCES,
        "tensors": {"reference.safetensors": tensors},
    }
    write_json(case_dir / "manifest.json", manifest)
    return {"name": name, "kind": "base", "model_dir": f"{name}/model"}


# ---- adapter cases --------------------------------------------------------------------------


class EffectiveLinear(nn.Module):
    """A peft LoRA Linear seen as one Linear with weight W + s·B·A, for modules whose weight
    HF reads directly (dt_proj): the primary tensors apply the adapter as the merge does."""

    def __init__(self, lora_layer):
        super().__init__()
        self.inner = lora_layer

    @property
    def weight(self):
        lay = self.inner
        return lay.base_layer.weight + lay.scaling["default"] * (
            lay.lora_B["default"].weight @ lay.lora_A["default"].weight)

    @property
    def bias(self):
        return self.inner.base_layer.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@contextmanager
def dt_proj_applied(peft_model, targets):
    if "dt_proj" not in targets:
        yield
        return
    mixers = [layer.mixer for layer in peft_model.base_model.model.backbone.layers]
    saved = [m.dt_proj for m in mixers]
    try:
        for m in mixers:
            m.dt_proj = EffectiveLinear(m.dt_proj)
        yield
    finally:
        for m, d in zip(mixers, saved):
            m.dt_proj = d


def file_key(param_name):
    """peft parameter name -> key in adapter_model.safetensors."""
    k = param_name.replace(".lora_A.default.weight", ".lora_A.weight")
    k = k.replace(".lora_B.default.weight", ".lora_B.weight")
    k = k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    assert ".default" not in k, param_name
    return k


def make_adapter(out: Path, spec, base_spec):
    name = spec["name"]
    base_name = base_spec["name"]
    model_dir = out / base_name / "model"
    case_dir = out / name
    adapter_dir = case_dir / "adapter"
    adapter_dir.mkdir(parents=True)
    dora = spec["kind"] == "dora"
    targets = spec["targets"]
    r, alpha = spec["r"], spec["lora_alpha"]
    scaling = alpha / r

    base_ref = load_file(str(out / base_name / "reference.safetensors"))
    input_ids = base_ref["input_ids"]
    base_logits = base_ref["logits"]

    def fresh_peft():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                         bias="none", use_dora=dora, init_lora_weights=True)
        pm = get_peft_model(load_model(model_dir), cfg)
        pm.peft_config["default"].base_model_name_or_path = f"fixtures/{SET}/{base_name}/model"
        pm.eval()
        return pm

    pm = fresh_peft()
    # Seeded values in sorted-name order (peft's own init is overwritten): lora_A ~
    # U(±1/sqrt(in)), lora_B ~ N(0, b_std[target]^2), DoRA m = ||W||_row (1 + 0.05 N(0,1)).
    g = torch.Generator().manual_seed(spec["seed"])
    adapter_params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    modules = dict(pm.named_modules())
    with torch.no_grad():
        for pname in sorted(adapter_params):
            p = adapter_params[pname]
            target = next(t for t in targets if f".{t}." in pname)
            if ".lora_A." in pname:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * spec["b_std"][target])
            elif ".lora_magnitude_vector." in pname:
                mod = modules[pname.split(".lora_magnitude_vector.")[0]]
                w = mod.base_layer.weight
                p.copy_(w.norm(dim=1) * (1 + 0.05 * torch.randn(p.shape, generator=g)))
            else:
                raise KeyError(pname)

    # Save (peft's own writer), keeping only the two PEFT files.
    tmp = Path(tempfile.mkdtemp())
    try:
        pm.save_pretrained(str(tmp))
        shutil.copyfile(tmp / "adapter_model.safetensors", adapter_dir / "adapter_model.safetensors")
        # peft writes target_modules from a set; sorted here, written as peft writes it.
        acfg = json.loads((tmp / "adapter_config.json").read_text())
        acfg["target_modules"] = sorted(acfg["target_modules"])
        (adapter_dir / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    finally:
        shutil.rmtree(tmp)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    keyed = {file_key(n): p for n, p in adapter_params.items()}
    assert sorted(saved) == sorted(keyed), (sorted(saved), sorted(keyed))
    for k, t in saved.items():
        assert torch.equal(t, keyed[k].detach()), k

    ref = {"input_ids": input_ids}
    checks, measured = {}, {}

    # Primary: the adapter applied everywhere (dt_proj as the merge applies it).
    pm.zero_grad()
    with dt_proj_applied(pm, targets):
        out_p = pm(input_ids=input_ids, labels=input_ids, use_cache=False)
        out_p.loss.backward()
    ref["logits"] = out_p.logits.detach()
    ref["loss"] = out_p.loss.detach().reshape(1)
    for k, p in keyed.items():
        assert p.grad is not None, k
        ref[f"grad.{k}"] = p.grad.detach().clone()
    pm.zero_grad()
    checks["loss_vs_manual_shifted_ce_abs"] = abs(
        out_p.loss.item() - shifted_ce(out_p.logits, input_ids).item())

    with torch.no_grad(), dt_proj_applied(pm, targets):
        pm.train()
        checks["train_mode_logits_bit_exact"] = bool(torch.equal(
            pm(input_ids=input_ids, use_cache=False).logits, ref["logits"]))
        pm.eval()

    # What peft's unmerged forward returns (dt_proj adapter skipped).
    without_grad = []
    if "dt_proj" in targets:
        out_u = pm(input_ids=input_ids, labels=input_ids, use_cache=False)
        out_u.loss.backward()
        ref["peft_unmerged.logits"] = out_u.logits.detach()
        ref["peft_unmerged.loss"] = out_u.loss.detach().reshape(1)
        for k, p in keyed.items():
            if p.grad is None:
                without_grad.append(k)
            else:
                ref[f"peft_unmerged.grad.{k}"] = p.grad.detach().clone()
        pm.zero_grad()
        assert all(".dt_proj." in k for k in without_grad), without_grad

    # Reloaded from disk with peft's own loader: bit-identical primary logits.
    re = PeftModel.from_pretrained(load_model(model_dir), str(adapter_dir))
    re.eval()
    with torch.no_grad(), dt_proj_applied(re, targets):
        checks["reload_logits_bit_exact"] = bool(torch.equal(
            re(input_ids=input_ids, use_cache=False).logits, ref["logits"]))
    del re

    # DoRA row norms ||W + s·B·A||.
    if dora:
        with torch.no_grad():
            for mname, mod in modules.items():
                if hasattr(mod, "lora_magnitude_vector") and "default" in getattr(mod, "lora_A", {}):
                    w = mod.base_layer.weight
                    delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
                    module = mname.removeprefix("base_model.model.")
                    ref[f"aux.dora_weight_norm.{module}"] = (w + scaling * delta).norm(dim=1)

    # Merged.
    merged = copy.deepcopy(pm).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        ref["merged.logits"] = merged(input_ids=input_ids, use_cache=False).logits
    sd = merged.state_dict()
    for i in range(base_spec["num_hidden_layers"]):
        for t in targets:
            k = f"backbone.layers.{i}.mixer.{t}.weight"
            ref[f"merged.weight.{k}"] = sd[k].detach().clone()
    checks["merged_vs_unmerged_logits_max_abs"] = max_abs(ref["merged.logits"], ref["logits"])
    assert checks["merged_vs_unmerged_logits_max_abs"] < 1e-5, checks
    if "peft_unmerged.logits" in ref:
        checks["merged_vs_peft_unmerged_logits_max_abs"] = max_abs(
            ref["merged.logits"], ref["peft_unmerged.logits"])

    # Float64 re-run of the primary forward.
    pm64 = copy.deepcopy(pm).double()
    with dt_proj_applied(pm64, targets):
        out64 = pm64(input_ids=input_ids, labels=input_ids, use_cache=False)
        out64.loss.backward()
    measured["logits_f32_vs_f64_max_abs"] = max_abs(ref["logits"], out64.logits)
    measured["loss_f32_vs_f64_abs"] = max_abs(ref["loss"], out64.loss.reshape(1))
    g_abs, g_l2 = 0.0, 0.0
    for n, p in pm64.named_parameters():
        if p.requires_grad:
            want = p.grad.double()
            got = ref[f"grad.{file_key(n)}"].double()
            g_abs = max(g_abs, (got - want).abs().max().item())
            g_l2 = max(g_l2, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    measured["grad_f32_vs_f64_max_abs"] = g_abs
    measured["grad_f32_vs_f64_max_rel_l2"] = g_l2
    measured["adapter_effect_logits_max_abs"] = max_abs(ref["logits"], base_logits)
    assert measured["adapter_effect_logits_max_abs"] > 0.1, measured
    del pm64

    def describe(k):
        table = {
            "input_ids": ("ids", "token ids [batch, seq]; also the labels (HF shifts them inside)"),
            "logits": ("logits", "logits [batch, seq, vocab] of the forward on input_ids"),
            "loss": ("loss", "mean next-token cross-entropy over batch*(seq-1) positions, shape [1]"),
            "merged.logits": ("logits", "logits after peft merge_and_unload()"),
            "peft_unmerged.logits": ("logits", "what peft's unmerged forward returns: the dt_proj adapter is silently skipped (HF reads dt_proj.weight directly)"),
            "peft_unmerged.loss": ("loss", "loss of peft's unmerged forward (dt_proj adapter skipped)"),
        }
        if k in table:
            return table[k]
        if k.startswith("grad."):
            return ("grad", "d loss / d parameter, same shape as the parameter")
        if k.startswith("peft_unmerged.grad."):
            return ("grad", "gradients in peft's unmerged forward; dt_proj adapter tensors are absent because peft gives them no gradient (None)")
        if k.startswith("merged.weight."):
            return ("weight", "the base weight after merge_and_unload() (targeted modules only)")
        if k.startswith("aux.dora_weight_norm."):
            return ("weight", "DoRA row norm ||W + s*B*A|| per output row (detached in the forward, so no gradient flows through it)")
        raise KeyError(k)

    tensors = save_reference(case_dir, ref, describe)
    notes = [
        f"scaling = lora_alpha / r = {scaling}; LoRA: y = W x + scaling * B (A x); no rsLoRA, no dropout, no bias.",
        "grad.<key> uses the key names of adapter/adapter_model.safetensors.",
    ]
    if "out_proj" in targets:
        notes.append("Targets include out_proj, which stock peft (>= 0.15) refuses for Mamba models (ValueError: 'out_proj' is incompatible with Mamba-based models) because mamba_ssm's fused CUDA path bypasses out_proj.forward. On the pure-PyTorch path the adapter is applied correctly; this script skips only that guard when creating and loading the adapter.")
    if "dt_proj" in targets:
        notes.append("dt_proj: HF's mixer computes dt = softplus(dt_proj.weight @ x_dt + dt_proj.bias) by reading dt_proj.weight directly, so peft's unmerged forward silently ignores a dt_proj adapter (its lora_A/lora_B get grad None) while merge_and_unload() folds it in. The primary tensors (logits, loss, grad.*) apply the dt_proj adapter (= merged math, dt = softplus((W + s B A) x_dt + b)); peft_unmerged.* is what peft's unmerged forward actually returns.")
    if dora:
        notes.append("DoRA (peft): y = (m / ||W + s B A||_row) * ((W + s B A) x) + bias, with the row norm detached (treated as a constant in backward, DoRA paper sec. 4.3). m is '...lora_magnitude_vector' (no '.weight' suffix in the file), shape [out_features]. The stored m is ||W||_row * (1 + 0.05 N(0,1)), i.e. perturbed from peft's init.")
    notes.append(f"Adapter tensors: lora_A ~ U(+-1/sqrt(in)), lora_B ~ N(0, std^2) with std per target {spec['b_std']}, drawn from a private generator seeded {spec['seed']} in sorted-name order (peft's own init is overwritten).")
    manifest = {
        "case": name,
        "kind": "adapter",
        "set": SET,
        "generated_by": GENERATED_BY,
        "versions": versions(),
        "description": f"PEFT {spec['kind'].upper()} (r={r}, alpha={alpha}, targets={targets}) on the '{base_name}' checkpoint.",
        "base_case": base_name,
        "model_dir": f"{base_name}/model",
        "adapter_dir": f"{name}/adapter",
        "adapter": {
            "kind": spec["kind"],
            "r": r,
            "lora_alpha": alpha,
            "scaling": scaling,
            "target_modules": targets,
            "keys": sorted(saved),
            "base_model_name_or_path": f"fixtures/{SET}/{base_name}/model",
            "stock_peft_loadable": "out_proj" not in targets,
        },
        "params_without_grad_in_peft_unmerged": sorted(without_grad),
        "seeds": {"adapter init": spec["seed"]},
        "checks": checks,
        "measured": measured,
        "notes": notes,
        "files": files_of(case_dir, out),
        "tolerances": TOLERANCES,
        "tensors": {"reference.safetensors": tensors},
    }
    write_json(case_dir / "manifest.json", manifest)
    return {"name": name, "kind": "adapter", "base_case": base_name,
            "model_dir": f"{base_name}/model", "adapter_dir": f"{name}/adapter"}


# ---- ops ------------------------------------------------------------------------------------


def make_ops(out: Path, spec):
    name = spec["name"]
    case_dir = out / name
    case_dir.mkdir(parents=True)
    b, d, L, n, k = spec["batch"], spec["d_inner"], spec["seq"], spec["state"], spec["conv_kernel"]
    g = torch.Generator().manual_seed(spec["seed"])

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(shape, generator=g) * scale + shift

    ref = {}
    # Selective scan.
    A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32))[None, :].repeat(d, 1) + randn(d, n, scale=0.1)
    scan_in = {
        "u": randn(b, d, L),
        "delta": randn(b, d, L, scale=0.5),
        "z": randn(b, d, L),
        "A": -torch.exp(A_log),
        "B": randn(b, n, L),
        "C": randn(b, n, L),
        "D": randn(d, scale=0.1, shift=1.0),
        "delta_bias": randn(d, scale=0.5, shift=-2.0),
    }
    up_scan = randn(b, d, L)

    def scan(t, dtype):
        v = {kk: x.to(dtype).clone().requires_grad_(True) for kk, x in t.items()}
        y, last = hf_mamba.mamba_selective_scan(
            v["u"], v["delta"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
            delta_bias=v["delta_bias"], delta_softplus=True, return_last_state=True)
        (y * up_scan.to(dtype)).sum().backward()
        return y, last, {kk: x.grad for kk, x in v.items()}

    y, last, grads = scan(scan_in, torch.float32)
    for kk, x in scan_in.items():
        ref[f"op.scan.in.{kk}"] = x
        ref[f"op.scan.grad.{kk}"] = grads[kk]
    ref["op.scan.out.y"] = y
    ref["op.scan.out.last_state"] = last
    ref["op.scan.upstream.y"] = up_scan
    y64, last64, _ = scan(scan_in, torch.float64)

    # Causal depthwise conv1d + SiLU.
    conv_in = {"x": randn(b, d, L), "weight": randn(d, k, scale=0.5), "bias": randn(d, scale=0.2)}
    up_conv = randn(b, d, L)

    def conv(t, dtype):
        v = {kk: x.to(dtype).clone().requires_grad_(True) for kk, x in t.items()}
        yc = hf_mamba.causal_conv1d_fn(v["x"], v["weight"], v["bias"], activation="silu")
        (yc * up_conv.to(dtype)).sum().backward()
        return yc, {kk: x.grad for kk, x in v.items()}

    yc, gc = conv(conv_in, torch.float32)
    for kk, x in conv_in.items():
        ref[f"op.conv.in.{kk}"] = x
        ref[f"op.conv.grad.{kk}"] = gc[kk]
    ref["op.conv.out.y"] = yc
    ref["op.conv.upstream.y"] = up_conv
    yc64, _ = conv(conv_in, torch.float64)

    # One decode step of the scan (A, D, dt bias from op.scan.in.*).
    step_in = {
        "state": randn(b, d, n),
        "x": randn(b, d),
        "dt": randn(b, d, scale=0.5),
        "B": randn(b, n),
        "C": randn(b, n),
        "z": randn(b, d),
    }
    with torch.no_grad():
        state = step_in["state"].clone()
        ys = hf_mamba.mamba_selective_state_update(
            state, step_in["x"], step_in["dt"], scan_in["A"], step_in["B"], step_in["C"],
            D=scan_in["D"], z=step_in["z"], dt_bias=scan_in["delta_bias"], dt_softplus=True)
    for kk, x in step_in.items():
        ref[f"op.step.in.{kk}"] = x
    ref["op.step.out.y"] = ys
    ref["op.step.out.state"] = state

    # One decode step of the conv (weight and bias from op.conv.in.*).
    cs_in = {"conv_state": randn(b, d, k), "x": randn(b, d, 1)}
    with torch.no_grad():
        cs = cs_in["conv_state"].clone()
        ycs = hf_mamba.causal_conv1d_update(cs_in["x"], cs, conv_in["weight"], conv_in["bias"],
                                            activation="silu")
    ref["op.convstep.in.conv_state"] = cs_in["conv_state"]
    ref["op.convstep.in.x"] = cs_in["x"]
    ref["op.convstep.out.y"] = ycs
    ref["op.convstep.out.conv_state"] = cs

    tensors = save_reference(
        case_dir, ref, lambda key: ("op", "kernel-level input/output, see the manifest notes"))
    manifest = {
        "case": name,
        "kind": "ops",
        "set": SET,
        "generated_by": GENERATED_BY,
        "versions": versions(),
        "description": "Kernel-level fixtures from HF's pure-PyTorch Mamba ops: selective scan (sequence and single-step) and causal depthwise conv1d (sequence and single-step), with gradients, on shapes other than the shared set's.",
        "shapes": {"batch": b, "channels(d_inner)": d, "seq": L, "state": n, "conv_kernel": k},
        "seeds": {"all draws, in code order": spec["seed"]},
        "measured": {
            "scan_y_f32_vs_f64_max_abs": max_abs(y, y64),
            "scan_last_state_f32_vs_f64_max_abs": max_abs(last, last64),
            "conv_y_f32_vs_f64_max_abs": max_abs(yc, yc64),
        },
        "notes": [
            "op.scan: HF modeling_mamba.mamba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True). Layouts as in mamba_ssm: u, delta, z [b, d, L]; A [d, n] (already negative: A = -exp(A_log)); B, C [b, n, L]; D, delta_bias [d]. dt = softplus(delta + delta_bias); h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t; y_t = <h_t, C_t> + D * u_t; y = y * silu(z).",
            "op.scan.grad.*: gradient of sum(y * op.scan.upstream.y) w.r.t. each op.scan.in.* (the last_state output gets no upstream gradient).",
            "op.conv: causal_conv1d_fn(x [b, d, L], weight [d, k], bias [d], activation='silu'): depthwise conv with k-1 zeros on the left, + bias, then SiLU. Grads are of sum(y * op.conv.upstream.y).",
            "op.step: mamba_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True), with A, D and dt_bias = op.scan.in.A / D / delta_bias. Writes op.step.out.state.",
            "op.convstep: causal_conv1d_update(x [b, d, 1], conv_state [b, d, k], weight, bias, 'silu') with weight/bias = op.conv.in.weight / bias: conv over concat(conv_state, x) without padding, output the last position; the new conv_state is the last k inputs (oldest dropped).",
        ],
        "files": files_of(case_dir, out),
        "tolerances": TOLERANCES,
        "tensors": {"reference.safetensors": tensors},
    }
    write_json(case_dir / "manifest.json", manifest)
    return {"name": name, "kind": "ops"}


# ---- driver ---------------------------------------------------------------------------------


def generate(out: Path):
    out.mkdir(parents=True)
    cases = [make_base(out, BASE)]
    for spec in ADAPTERS:
        cases.append(make_adapter(out, spec, BASE))
    cases.append(make_ops(out, OPS))
    write_json(out / "index.json", {
        "generated_by": GENERATED_BY,
        "set": SET,
        "versions": versions(),
        "cases": cases,
    })


def same_tree(a: Path, b: Path):
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if fa != fb:
        return [f"file lists differ: {sorted(set(fa) ^ set(fb))}"]
    return [f for f in fa if not filecmp.cmp(a / f, b / f, shallow=False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare with --out byte for byte")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "alt"
        generate(fresh)
        if args.check:
            diff = same_tree(fresh, args.out)
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
