#!/usr/bin/env python3
"""The PyTorch reference selective scan on a CUDA GPU, for comparison with `molt bench cuda
--metrics scan` on the same GPU and shapes (E 1536, N 16, with z, channels-last inputs as
molt's kernels take them).

"reference" is the scan written as plain PyTorch ops with a Python loop over time (the
algorithm of mamba_ssm's selective_scan_ref, written here from the recurrence, not copied):
what a Mamba implementation without fused kernels runs. If the `mamba_ssm` package is
installed, its fused CUDA kernel (`selective_scan_fn`) is timed too ("mamba_ssm"). Each
line of output is a JSON object like molt's: side, metric, batch, seq, dtype, median_s,
tokens_per_s.

Usage: python bench/pytorch_scan_cuda.py [--sizes 8x512,1x2048] [--reps 10]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def reference_scan(u, delta, A, B, C, D, bias, z):
    """u, delta, z: [b, L, E]; A: [E, N]; B, C: [b, L, N]; D, bias: [E]. f32 state."""
    b, L, E = u.shape
    dt = F.softplus(delta.float() + bias)  # [b, L, E]
    uf = u.float()
    s = torch.zeros(b, E, A.shape[1], device=u.device, dtype=torch.float32)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t, :, None] * A)  # [b, E, N]
        dBu = dt[:, t, :, None] * uf[:, t, :, None] * B[:, t, None, :]
        s = dA * s + dBu
        ys.append((s * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1) + uf * D
    return (y * F.silu(z.float())).to(u.dtype)


def timed(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8x512,1x2048")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, N = 1536, 16
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        selective_scan_fn = None
    for size in args.sizes.split(","):
        b, L = (int(v) for v in size.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            def make(*shape, lo=-1.0, hi=1.0, dt=dtype):
                return (torch.rand(*shape, device=dev) * (hi - lo) + lo).to(dt).requires_grad_()

            u, delta, z = make(b, L, E), make(b, L, E, lo=-3.0), make(b, L, E, lo=-2.0, hi=2.0)
            A = make(E, N, lo=-4.0, hi=-0.1, dt=torch.float32)
            B, C = make(b, L, N, dt=torch.float32), make(b, L, N, dt=torch.float32)
            D = torch.ones(E, device=dev, requires_grad=True)
            bias = torch.zeros(E, device=dev, requires_grad=True)
            impls = [("reference", lambda: reference_scan(u, delta, A, B, C, D, bias, z))]
            if selective_scan_fn is not None:
                # mamba_ssm wants channels-first [b, E, L] and B, C as [b, N, L].
                def fused():
                    return selective_scan_fn(
                        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                        C.transpose(1, 2), D, z.transpose(1, 2), bias, delta_softplus=True)
                impls.append(("mamba_ssm", fused))
            for name, fn in impls:
                with torch.no_grad():
                    fwd = timed(fn, args.reps)

                def fwd_bwd():
                    fn().float().sum().backward()

                fb = timed(fwd_bwd, args.reps)
                for metric, secs in (("scan_fwd", fwd), ("scan_fwd_bwd", fb)):
                    print(json.dumps({
                        "side": f"pytorch-{name}", "metric": metric, "shape": "130m-mixer",
                        "batch": b, "seq": L, "d_inner": E, "d_state": N,
                        "dtype": str(dtype).replace("torch.", ""), "median_s": secs,
                        "tokens_per_s": b * L / secs,
                        "device": torch.cuda.get_device_name(),
                    }), flush=True)


if __name__ == "__main__":
    main()
