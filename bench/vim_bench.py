#!/usr/bin/env python3
"""PyTorch reference side of molt's Vision Mamba (Vim) speed benchmark.

A compact pure-PyTorch port of hustvl's `VisionMamba` (vim/models_mamba.py, bimamba v2, middle
class token, if_divide_out) with the sequential reference scan (mamba_ssm's `selective_scan_ref`:
a Python loop over time) and the causal depthwise conv as nn.Conv1d(padding K-1) truncated to L.
Module and parameter names are the official state-dict names, so hustvl checkpoints load strictly.
It measures, on CPU, at the Vim-tiny shape (random init, seeded):

  vim_forward_images_per_s   eval mode, torch.no_grad(), one warm-up, median of --reps
  vim_train_images_per_s     one step = forward (train mode), mean cross-entropy, backward,
                             grad-norm clip 5 (--clip), AdamW (lr 1e-3) over the trainable
                             parameters; one line per --methods:
                               lora_in_proj     LoRA r=16, alpha=16, dropout 0.1 on every in_proj
                               additional_scan  N'=6 extra states per direction (peft-spec §4.9)
                               prodial          ProDiaL on in_proj + out_proj, r_b=(192, 384),
                                                r_eps=16 (peft-spec §5)
                             base frozen, the (zero-init) head trainable in every case.

Each line on stdout is one JSON object (the format of bench/pytorch_bench.py):
  side, shape, batch, seq, metric, value, unit        -- the figure itself (seq = tokens, 197)
  reps, median_s                                       -- timed repetitions (warm-up excluded), median
  cpu_wall, others_cpu, steal                          -- own CPU / wall, other processes' CPU and
                                                          hypervisor steal as fractions of all cores
  peak_rss_mib                                         -- peak RSS over the timed reps (VmHWM reset first)
  method, trainable_params, trainable_params_excl_head -- training lines only
Progress and parameter counts go to stderr. The forward figure and each method run in their own
child process, so one measurement's freed-but-not-returned heap does not inflate the next peak.

`--check-fixture DIR` (e.g. /work/shared/fixtures/vim/vim_tiny) checks the port instead: it builds
the model from DIR/model/config.json, loads DIR/model/model.safetensors strictly, runs the stored
pixel values in eval mode and asserts max |logits - reference| < 1e-4 (then also the loss and
the full fine-tune gradients against the manifest's tolerances).
`--sanity` runs a few training steps of every method at the --quick shape (finite losses, LoRA's
loss decreasing at a high lr, zero-init methods reproducing the base logits at step 0).

Usage: bench/.venv/bin/python bench/vim_bench.py [--threads 2] [--batch 8] [--reps 3]
       [--train-reps 1] [--train-warmup 0] [--clip 5.0] [--metrics forward,train]
       [--methods lora_in_proj,additional_scan,prodial] [--quick] [--addscan-zero-init]
       [--scan ref|unbind]
       [--check-fixture DIR] [--sanity]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probes  # noqa: E402  (bench/probes.py, beside this script)

# Vim-tiny (hustvl vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2)
# with a 102-class head (a VTAB/Caltech-101-sized task). dt_rank = ceil(192 / 16) = 12.
SHAPES = {
    "vim-tiny": dict(img_size=224, depth=24),
    "vim-quick": dict(img_size=64, depth=2),
}
COMMON = dict(
    patch_size=16,
    stride=16,
    channels=3,
    embed_dim=192,
    d_state=16,
    d_conv=4,
    expand=2,
    dt_rank=12,
    conv_bias=True,
    bias=False,
    num_classes=102,
    norm_epsilon=1e-5,
)

METHODS = ("lora_in_proj", "additional_scan", "prodial")

# lora_in_proj: r = alpha = 16 (scaling 1, the ProDiaL paper's LoRA baseline, peft-spec §3.5) with
# MambaPEFT's in_proj dropout 0.1 on the LoRA input (activation path, spec §2 / §4.2), as molt's
# `{"type": "lora", "targets": "in_proj", "r": 16, "alpha": 16}` defaults to.
LORA_R = 16
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
# additional_scan: MambaPEFT defaults (peft-spec §4.9): N' = 6 per direction, "top" placement
# (B_ext = [B_new, B]), new A_log columns copied from A_log[:, 0], new x_proj rows KU(E) uniform.
ADDSCAN_N = 6
# prodial: Vim-tiny Caltech/Cars settings (peft-spec §5.5): r_b = 192 blocks on in_proj (d_in = 192)
# and 384 on out_proj (d_in = 384), i.e. block size 1; r_eps = 16; alpha = 8 (the code's peft
# default, train.py never sets it, so scaling = 0.5); LoRA dropout 0.1. The blocks are stored as in
# the official code (r_b x q x q, zeros) and D_b = I - ReLU(Diag) + OffDiag: PyTorch's ReLU'(0) = 0
# keeps diag(D_b) at exactly 1 (spec §5.1's decision, "PyTorch's convention"); with q = 1 here the
# blocks are that dead diagonal only, so ProDiaL trains s, the LoRA and the head.
PRODIAL_RB = {"in_proj": 192, "out_proj": 384}
PRODIAL_REPS = 16
PRODIAL_ALPHA = 8
PRODIAL_DROPOUT = 0.1

TRAIN_LR = 1e-3
CLIP_NORM = 5.0  # global grad-norm clip over the trainable set (MambaPEFT vision recipe, molt's step)


def log(msg: str) -> None:
    print(f"[vim_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The model: hustvl VisionMamba, bimamba v2, pure PyTorch. Imported lazily (torch) by build_*.


# "ref": mamba_ssm's selective_scan_ref verbatim (deltaA[:, :, i] per step). Its autograd backward
# is O(L^2) in memory traffic: every select's backward materialises a zero [b, E, L, N] gradient
# and adds it up. "unbind": the same arithmetic with the per-step slices taken by one unbind
# (its backward stacks the L slice gradients once): O(L). Forward numbers are identical.
SCAN_IMPL = "ref"


def _define_model():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
        """mamba_ssm's selective_scan_ref (real A, variable B/C, softplus delta), float32.
        u, delta, z: [b, E, L]; A: [E, N]; B, C: [b, N, L]; D, delta_bias: [E]."""
        delta = F.softplus(delta + delta_bias[..., None])
        batch, dim, length = u.shape
        deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        x = A.new_zeros((batch, dim, A.shape[1]))
        ys = []
        if SCAN_IMPL == "unbind":
            for da, dbu, c in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)):
                x = da * x + dbu
                ys.append(torch.einsum("bdn,bn->bd", x, c))
        else:
            for i in range(length):
                x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
                ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
        y = torch.stack(ys, dim=2)
        out = y + u * D[:, None]
        return out * F.silu(z)

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, stride, channels, embed_dim):
            super().__init__()
            self.grid = ((img_size - patch_size) // stride + 1,) * 2
            self.num_patches = self.grid[0] * self.grid[1]
            self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=stride)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)  # [b, M, D], row-major grid

    class Mixer(nn.Module):
        """mamba_simple.Mamba with bimamba_type="v2" and if_devide_out=True."""

        def __init__(self, c):
            super().__init__()
            d, e, n, k, r = c["embed_dim"], c["expand"] * c["embed_dim"], c["d_state"], c["d_conv"], c["dt_rank"]
            self.d_inner, self.d_state, self.dt_rank = e, n, r
            self.in_proj = nn.Linear(d, 2 * e, bias=c["bias"])
            self.out_proj = nn.Linear(e, d, bias=c["bias"])
            for sfx in ("", "_b"):
                setattr(self, "conv1d" + sfx, nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=c["conv_bias"]))
                setattr(self, "x_proj" + sfx, nn.Linear(e, r + 2 * n, bias=False))
                setattr(self, "dt_proj" + sfx, nn.Linear(r, e, bias=True))
            self.A_log = nn.Parameter(torch.empty(e, n))
            self.A_b_log = nn.Parameter(torch.empty(e, n))
            self.D = nn.Parameter(torch.ones(e))
            self.D_b = nn.Parameter(torch.ones(e))
            self.addscan = None  # set by apply_additional_scan: (n_add, "top")

        def scan(self, x, z, sfx):
            """One direction: conv + SiLU, x_proj, dt_proj, selective scan, gate. x, z: [b, E, L]."""
            conv, x_proj, dt_proj = (getattr(self, m + sfx) for m in ("conv1d", "x_proj", "dt_proj"))
            a_log = self.A_log if sfx == "" else self.A_b_log
            d_skip = self.D if sfx == "" else self.D_b
            b, e, length = x.shape
            u = F.silu(conv(x)[..., :length])
            u_rows = u.transpose(1, 2).reshape(b * length, e)
            x_dbl = x_proj(u_rows)  # [(b l), R + 2N]
            r, n = self.dt_rank, self.d_state
            delta = (dt_proj.weight @ x_dbl[:, :r].t()).reshape(e, b, length).transpose(0, 1)
            bm = x_dbl[:, r : r + n]
            cm = x_dbl[:, r + n :]
            A = -torch.exp(a_log.float())
            if self.addscan is not None:
                # Additional-scan, "top" placement: A_ext = [A_new | A], B_ext = [B_new, B],
                # C_ext = [C_new, C]. The original states evolve exactly as before.
                n_add = self.addscan
                add = getattr(self, "x_proj" + sfx + "_scan_addi")(u_rows)  # [(b l), 2N']
                a_add = self.A_log_scan_addi if sfx == "" else self.A_b_log_scan_addi
                A = torch.cat([-torch.exp(a_add.float()), A], dim=1)
                bm = torch.cat([add[:, :n_add], bm], dim=1)
                cm = torch.cat([add[:, n_add:], cm], dim=1)
            bm = bm.reshape(b, length, -1).transpose(1, 2)  # [b, N, L]
            cm = cm.reshape(b, length, -1).transpose(1, 2)
            return selective_scan_ref(u, delta, A, bm, cm, d_skip.float(), z, dt_proj.bias.float())

        def forward(self, h):  # h: [b, L, D]
            xz = self.in_proj(h).transpose(1, 2)  # [b, 2E, L]
            x, z = xz.chunk(2, dim=1)
            y_f = self.scan(x, z, "")
            y_b = self.scan(x.flip(-1), z.flip(-1), "_b").flip(-1)
            return self.out_proj(((y_f + y_b) / 2).transpose(1, 2))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.mixer = Mixer(c)
            self.norm = RMSNorm(c["embed_dim"], c["norm_epsilon"])

    class VisionMamba(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cfg = dict(c)
            d = c["embed_dim"]
            self.patch_embed = PatchEmbed(c["img_size"], c["patch_size"], c["stride"], c["channels"], d)
            m = self.patch_embed.num_patches
            self.token_position = m // 2
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, m + 1, d))
            self.layers = nn.ModuleList(Block(c) for _ in range(c["depth"]))
            self.norm_f = RMSNorm(d, c["norm_epsilon"])
            self.head = nn.Linear(d, c["num_classes"])

        @property
        def seq_len(self):
            return self.patch_embed.num_patches + 1

        def forward_features(self, x):
            x = self.patch_embed(x)
            c = self.token_position
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :c], cls, x[:, c:]], dim=1) + self.pos_embed
            residual, hidden = None, x
            for layer in self.layers:
                residual = hidden if residual is None else residual + hidden
                hidden = layer.mixer(layer.norm(residual))
            return self.norm_f(residual + hidden)[:, c]

        def forward(self, x):
            return self.head(self.forward_features(x))

    return VisionMamba


_VisionMamba = None


def VisionMamba(cfg):
    global _VisionMamba
    if _VisionMamba is None:
        _VisionMamba = _define_model()
    return _VisionMamba(cfg)


def config_from_json(path: str) -> dict:
    """VisionMamba kwargs from a hustvl-style config.json (as in the shared fixtures)."""
    with open(path) as f:
        j = json.load(f)
    expect = dict(bimamba_type="v2", if_cls_token=True, use_middle_cls_token=True, if_divide_out=True,
                  rms_norm=True, if_abs_pos_embed=True, if_rope=False, use_double_cls_token=False)
    for k, v in expect.items():
        if j.get(k, v) != v:
            sys.exit(f"{path}: {k}={j.get(k)!r} is not supported by this port (want {v!r})")
    img = j["img_size"]
    if isinstance(img, list):
        if img[0] != img[1]:
            sys.exit(f"{path}: only square images are supported, got {img}")
        img = img[0]
    ssm = j.get("ssm_cfg", {})
    d = j["embed_dim"]
    dt_rank = ssm.get("dt_rank", "auto")
    return dict(
        img_size=img,
        patch_size=j["patch_size"],
        stride=j.get("stride", j["patch_size"]),
        channels=j.get("channels", 3),
        embed_dim=d,
        depth=j["depth"],
        d_state=j.get("d_state", 16),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        dt_rank=math.ceil(d / 16) if dt_rank == "auto" else dt_rank,
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
        num_classes=j["num_classes"],
        norm_epsilon=j.get("norm_epsilon", 1e-5),
    )


def init_random(model, seed: int) -> None:
    """Seeded Vim init for the benchmark: PyTorch defaults, then the Mamba-specific tensors
    (A_log = log(1..N) per row, D = 1, dt_proj.bias = softplus^-1 of log-uniform dt in
    [1e-3, 1e-1]), cls_token / pos_embed ~ N(0, 0.02^2), head zero (fine-tuning convention)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            m = layer.mixer
            e, n = m.d_inner, m.d_state
            a = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
            for sfx in ("", "_b"):
                getattr(m, "A_log" if sfx == "" else "A_b_log").copy_(a)
                getattr(m, "D" + sfx).fill_(1.0)
                dt = torch.exp(torch.rand(e, generator=g) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
                dt = dt.clamp(min=1e-4)
                getattr(m, "dt_proj" + sfx).bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        model.cls_token.normal_(0.0, 0.02, generator=g)
        model.pos_embed.normal_(0.0, 0.02, generator=g)
        model.head.weight.zero_()
        model.head.bias.zero_()


def build_random(shape: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)  # PyTorch default inits of every Linear / Conv
    model = VisionMamba({**COMMON, **SHAPES[shape]})
    init_random(model, seed)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT methods. Base weights frozen; the head (zero-init) trainable in every case. Adapter
# modules subclass nn.Linear and keep `weight` under its official name.


def _define_adapters():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class LoraLinear(nn.Linear):
        """W x + (alpha / r) B A dropout(x); A KU(in) (peft's kaiming_uniform a=sqrt(5)), B zero."""

        def setup(self, r, alpha, dropout):
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))
            self.scaling = alpha / r
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def lora(self, x):
            return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

        def forward(self, x):
            return F.linear(x, self.weight, self.bias) + self.lora(x)

    class ProdialLinear(LoraLinear):
        """W' = diag(s) W D_b + (alpha / r_eps) B A (the LoRA on dropout(x)), with
        D_b = I - ReLU(Diag(D_a)) + OffDiag(D_a), D_a = blockdiag of r_b zero-init q x q blocks
        (q = d_in / r_b) acting on the input side, as ProDiaL's mamba_simple.py."""

        def setup_prodial(self, r_b, r_eps, alpha, dropout):
            if self.in_features % r_b:
                raise ValueError(f"ProDiaL: r_b={r_b} does not divide d_in={self.in_features}")
            self.setup(r_eps, alpha, dropout)
            q = self.in_features // r_b
            self.r_b, self.q = r_b, q
            self.prodial_s = nn.Parameter(torch.ones(self.out_features))
            self.prodial_r = nn.Parameter(torch.zeros(r_b, q, q))

        def effective_weight(self):
            w, blocks, q = self.weight, self.prodial_r, self.q
            diag = torch.diagonal(blocks, dim1=-2, dim2=-1)
            off = blocks - torch.diag_embed(diag)
            d_b = off + torch.diag_embed(1.0 - F.relu(diag))  # [r_b, q, q]
            if q == 1:
                w = w * d_b.reshape(1, -1)  # purely diagonal D_b: a per-input-column scale
            else:
                w = torch.einsum("ojk,jkc->ojc", w.reshape(-1, self.r_b, q), d_b).reshape(w.shape)
            return self.prodial_s[:, None] * w

        def forward(self, x):
            return F.linear(x, self.effective_weight(), self.bias) + self.lora(x)

    return LoraLinear, ProdialLinear


_ADAPTERS = None


def _swap_linear(parent, name, cls):
    old = getattr(parent, name)
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)  # same parameters (official names), same flags
    setattr(parent, name, new)
    return new


def apply_method(model, method: str, addscan_zero_init: bool = False) -> dict:
    """Freezes the base, adds `method`'s parameters, makes the head trainable; returns the
    method's settings (for the JSON line)."""
    import torch
    import torch.nn as nn

    global _ADAPTERS
    if _ADAPTERS is None:
        _ADAPTERS = _define_adapters()
    LoraLinear, ProdialLinear = _ADAPTERS
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "lora_in_proj":
        for layer in model.layers:
            _swap_linear(layer.mixer, "in_proj", LoraLinear).setup(LORA_R, LORA_ALPHA, LORA_DROPOUT)
        settings = dict(target="in_proj", r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT)
    elif method == "additional_scan":
        for layer in model.layers:
            m = layer.mixer
            e = m.d_inner
            for sfx in ("", "_b"):
                a_orig = m.A_log if sfx == "" else m.A_b_log
                # "top" + copy init: every new column = the pretrained A_log[:, 0] of its channel.
                a_new = nn.Parameter(a_orig.detach()[:, :1].repeat(1, ADDSCAN_N).clone())
                setattr(m, "A_log_scan_addi" if sfx == "" else "A_b_log_scan_addi", a_new)
                lin = nn.Linear(e, 2 * ADDSCAN_N, bias=False)  # KU(E) uniform, as released
                if addscan_zero_init:
                    nn.init.zeros_(lin.weight)
                setattr(m, "x_proj" + sfx + "_scan_addi", lin)
            m.addscan = ADDSCAN_N
        settings = dict(n_add=ADDSCAN_N, placement="top", a_init="copy",
                        x_proj_init="zeros" if addscan_zero_init else "kaiming_uniform")
    elif method == "prodial":
        for layer in model.layers:
            for name in ("in_proj", "out_proj"):
                _swap_linear(layer.mixer, name, ProdialLinear).setup_prodial(
                    PRODIAL_RB[name], PRODIAL_REPS, PRODIAL_ALPHA, PRODIAL_DROPOUT)
        settings = dict(targets=["in_proj", "out_proj"], r_b=PRODIAL_RB, r_eps=PRODIAL_REPS,
                        alpha=PRODIAL_ALPHA, dropout=PRODIAL_DROPOUT, diagonal="fixed (ReLU'(0)=0)",
                        frozen_diagonal_params=sum(l.mixer.in_proj.in_features + l.mixer.out_proj.in_features
                                                   for l in model.layers))
    else:
        raise ValueError(f"unknown method {method!r}")
    for p in model.head.parameters():
        p.requires_grad_(True)
    return settings


def trainable_counts(model) -> tuple[int, int]:
    """(trainable incl. head, trainable excl. head)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    return total, total - head


# ---------------------------------------------------------------------------------------------
# Fixture check.


def check_fixture(args) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    global SCAN_IMPL
    SCAN_IMPL = args.scan
    torch.set_num_threads(args.threads)
    d = args.check_fixture
    cfg = config_from_json(os.path.join(d, "model", "config.json"))
    model = VisionMamba(cfg)
    sd = load_file(os.path.join(d, "model", "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    model.eval()
    with open(os.path.join(d, "manifest.json")) as f:
        manifest = json.load(f)
    (ref_file, tensors), = manifest["tensors"].items()
    inputs = [k for k, v in tensors.items() if v["tolerance"] == "input"]
    logits_keys = [k for k, v in tensors.items() if v["tolerance"] == "logits"]
    if len(inputs) != 1 or len(logits_keys) != 1:
        sys.exit(f"manifest: expected one input and one logits tensor, got {inputs} / {logits_keys}")
    ref = load_file(os.path.join(d, ref_file))
    x = ref[inputs[0]]
    want = ref[logits_keys[0]]
    with torch.no_grad():
        got = model(x)
    diff = (got - want).abs().max().item()
    print(f"fixture {d} (scan {args.scan}): logits {tuple(got.shape)} max |diff| = {diff:.3e} (limit 1e-4)", flush=True)
    ok = diff < 1e-4

    # Loss and full fine-tune gradients too (when the fixture has them): the training path.
    tol = manifest.get("tolerances", {})
    if "labels" in ref and "loss" in ref:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), ref["labels"])
        loss.backward()
        ld = abs(loss.item() - ref["loss"].item())
        lt = tol.get("loss", {"atol": 1e-5, "rtol": 1e-5})
        lok = ld <= lt["atol"] + lt["rtol"] * abs(ref["loss"].item())
        print(f"fixture {d}: loss {loss.item():.6f} |diff| = {ld:.3e} {'ok' if lok else 'FAIL'}", flush=True)
        ok &= lok
        gt = tol.get("grad", {"atol": 1e-5, "rtol": 1e-3, "rel_l2": 1e-4})
        worst_abs, worst_rel, n, bad = 0.0, 0.0, 0, []
        for name, p in model.named_parameters():
            key = "grad." + name
            if key not in ref:
                continue
            n += 1
            g, w = p.grad, ref[key]
            worst_abs = max(worst_abs, (g - w).abs().max().item())
            rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
            worst_rel = max(worst_rel, rel)
            if not torch.all((g - w).abs() <= gt["atol"] + gt["rtol"] * w.abs()) or rel > gt["rel_l2"]:
                bad.append(name)
        print(f"fixture {d}: {n} gradients, max |diff| = {worst_abs:.3e}, max rel L2 = {worst_rel:.3e} "
              f"{'ok' if not bad else 'FAIL ' + ', '.join(bad)}", flush=True)
        ok &= not bad and n == len(list(model.parameters()))
    if not ok:
        sys.exit("fixture check FAILED")
    print("fixture check passed", flush=True)


# ---------------------------------------------------------------------------------------------
# Sanity: every method trains at the quick shape.


def sanity(args) -> None:
    import torch
    import torch.nn.functional as F

    global SCAN_IMPL
    SCAN_IMPL = args.scan
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    base = build_random("vim-quick")
    x = torch.randn(args.batch, 3, base.cfg["img_size"], base.cfg["img_size"], generator=gen)
    y = torch.randint(0, base.cfg["num_classes"], (args.batch,), generator=gen)
    # Zero-init methods must reproduce the base model's logits at step 0 (with a non-zero head,
    # since the zero head would hide any difference).
    head = torch.randn(base.cfg["num_classes"], base.cfg["embed_dim"], generator=gen)
    ok = True
    for method in METHODS:
        for zero_addscan in ((False, True) if method == "additional_scan" else (False,)):
            b = build_random("vim-quick")
            m = build_random("vim-quick")
            apply_method(m, method, zero_addscan)
            with torch.no_grad():
                b.head.weight.copy_(head)
                m.head.weight.copy_(head)
            b.eval()
            m.eval()
            with torch.no_grad():
                d = (b(x) - m(x)).abs().max().item()
            expect_same = method != "additional_scan" or zero_addscan
            tag = method + (" (zero-init x_proj rows)" if zero_addscan else "")
            log(f"sanity {tag}: step-0 logits vs base max |diff| = {d:.3e} "
                f"({'must be 0' if expect_same else 'nonzero expected: KU-init new rows'})")
            ok &= (d < 1e-6) == expect_same
    for method in METHODS:
        model = build_random("vim-quick")
        apply_method(model, method)
        params = [p for p in model.parameters() if p.requires_grad]
        # The head starts at zero, so only the head gets a gradient in step 1; the adapter
        # parameters must be moved from step 2 on.
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "head" not in n}
        opt = torch.optim.AdamW(params, lr=args.sanity_lr, weight_decay=0.0)
        model.train()
        losses = []
        for _ in range(args.sanity_steps):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        # ProDiaL's diagonal sits behind ReLU at 0 (gradient 0 in PyTorch): with q = 1 the
        # blocks are all diagonal and must stay exactly zero (diag(D_b) = 1, spec §5.1).
        frozen = {n for n in before if n.endswith("prodial_r")}
        moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        finite = all(math.isfinite(v) for v in losses)
        dec = losses[-1] < losses[0]
        log(f"sanity {method}: losses {[round(v, 4) for v in losses]}, {len(moved)}/{len(before) - len(frozen)} "
            f"adapter tensors moved" + (f", {len(frozen)} dead-diagonal tensors unchanged" if frozen else "")
            + f", finite={finite}, decreasing={dec}")
        ok &= finite and moved == set(before) - frozen and (dec or method != "lora_in_proj")
    if not ok:
        sys.exit("sanity FAILED")
    log("sanity passed")


# ---------------------------------------------------------------------------------------------
# Measurements, in a child process per job ("forward" or "train:<method>").


def run_job(args) -> None:
    import torch
    import torch.nn.functional as F

    global SCAN_IMPL
    SCAN_IMPL = args.scan
    torch.set_num_threads(args.threads)
    shape = "vim-quick" if args.quick else "vim-tiny"
    model = build_random(shape)
    cfg = model.cfg
    seq = model.seq_len
    b = args.batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg["channels"], cfg["img_size"], cfg["img_size"], generator=gen)
    labels = torch.randint(0, cfg["num_classes"], (b,), generator=gen)

    def emit(metric, value, unit, **extra):
        rec = {"side": "pytorch", "shape": shape, "batch": b, "seq": seq, "metric": metric,
               "value": value, "unit": unit}
        if args.scan != "ref" and metric.endswith("_per_s"):
            rec["scan"] = args.scan
        rec.update(extra)
        print(json.dumps(rec), flush=True)

    job = args.child
    if job == "forward":
        emit("vim_params", sum(p.numel() for p in model.parameters()), "count")
        model.eval()

        def fwd():
            with torch.no_grad():
                model(x)

        for _ in range(args.warmup):
            fwd()
        med, n, load, peak = probes.timed(fwd, args.reps)
        log(f"{shape} forward batch {b}: {b / med:.2f} images/s ({n} reps, median {med:.3f} s, {load})")
        emit("vim_forward_images_per_s", round(b / med, 4), "images/s",
             reps=n, median_s=round(med, 5), peak_rss_mib=peak, **load)
    else:
        method = job.split(":", 1)[1]
        settings = apply_method(model, method, args.addscan_zero_init)
        total, excl = trainable_counts(model)
        log(f"{shape} {method}: trainable params {excl:,} excluding the head, {total:,} including it")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=TRAIN_LR, weight_decay=0.0)
        model.train()
        losses = []

        def step():
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

        for _ in range(args.train_warmup):
            step()
        med, n, load, peak = probes.timed(step, args.train_reps)
        if not all(math.isfinite(v) for v in losses):
            sys.exit(f"{method}: non-finite loss {losses}")
        log(f"{shape} train {method} batch {b}: {b / med:.4f} images/s ({n} reps, median {med:.2f} s, "
            f"loss {losses[-1]:.4f}, {load})")
        emit("vim_train_images_per_s", round(b / med, 5), "images/s", method=method,
             trainable_params=total, trainable_params_excl_head=excl, settings=settings,
             lr=TRAIN_LR, clip=args.clip, reps=n, median_s=round(med, 5), peak_rss_mib=peak, **load)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    emit("process_peak_rss", round(probes.process_peak_mib(maxrss), 1), "MiB",
         job=job)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--reps", type=int, default=None, help="timed forward reps, median reported (default 3, --quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forward reps first (default 1)")
    ap.add_argument("--train-reps", type=int, default=1, help="timed training steps (default 1)")
    ap.add_argument("--train-warmup", type=int, default=0, help="untimed training steps first (default 0)")
    ap.add_argument("--clip", type=float, default=CLIP_NORM,
                    help=f"training: global grad-norm clip over the trainable set (default {CLIP_NORM}, 0 = off)")
    ap.add_argument("--scan", choices=("ref", "unbind"), default="ref",
                    help="ref (default): selective_scan_ref as mamba_ssm writes it (O(L^2) autograd "
                         "backward); unbind: same math, per-step slices by one unbind (O(L) backward)")
    ap.add_argument("--metrics", default="forward,train", help="comma list of: forward,train")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="smoke test: img 64, depth 2 (shape vim-quick), 1 rep")
    ap.add_argument("--addscan-zero-init", action="store_true",
                    help="additional_scan: zero-init the new x_proj rows (function-preserving; the released "
                         "configs use kaiming-uniform, the default here)")
    ap.add_argument("--check-fixture", metavar="DIR", help="check the port against a shared Vim fixture and exit")
    ap.add_argument("--sanity", action="store_true", help="train every method a few steps at the quick shape and exit")
    ap.add_argument("--sanity-steps", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--sanity-lr", type=float, default=1e-2, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if min(args.threads, args.batch, args.reps, args.train_reps) < 1 or min(args.warmup, args.train_warmup) < 0:
        sys.exit("--threads, --batch, --reps, --train-reps must be >= 1; warm-ups >= 0")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(metrics) - {"forward", "train"}:
        sys.exit(f"--metrics: unknown {sorted(set(metrics) - {'forward', 'train'})}")
    if set(methods) - set(METHODS):
        sys.exit(f"--methods: unknown {sorted(set(methods) - set(METHODS))} (known: {', '.join(METHODS)})")

    if args.check_fixture:
        check_fixture(args)
        return
    if args.sanity:
        sanity(args)
        return
    if args.child:
        run_job(args)
        return

    import importlib.metadata as md

    versions = {k: md.version(k) for k in ("torch", "safetensors")}
    print(json.dumps({"side": "pytorch", "metric": "env", "bench": "vim", "threads": args.threads,
                      "batch": args.batch, "reps": args.reps, "train_reps": args.train_reps,
                      "train_warmup": args.train_warmup, "clip": args.clip, "scan": args.scan, "python": platform.python_version(), **versions}),
          flush=True)

    jobs = (["forward"] if "forward" in metrics else []) + (
        [f"train:{m}" for m in methods] if "train" in metrics else [])
    # Pin the thread pools before torch starts in the child (OpenMP reads these at load time).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    passthrough = ["--threads", str(args.threads), "--batch", str(args.batch), "--reps", str(args.reps),
                   "--warmup", str(args.warmup), "--train-reps", str(args.train_reps),
                   "--train-warmup", str(args.train_warmup), "--clip", str(args.clip),
                   "--scan", args.scan]
    if args.quick:
        passthrough.append("--quick")
    if args.addscan_zero_init:
        passthrough.append("--addscan-zero-init")
    failed = False
    for job in jobs:
        log(f"job {job}")
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--child", job, *passthrough], env=env)
        if rc != 0:
            log(f"job {job} failed with exit status {rc}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
