//! Fused kernels vs the plain-Candle reference, forward + backward, plain `std::time`.
//!
//! `cargo bench --workspace --bench kernels` (defaults: b=4, L=128, E=1536, N=16, K=4, i.e.
//! mamba-130m's mixer), or with a shape: `cargo bench --workspace --bench kernels -- 1 512 768 16`
//! (b L E N). Prints tokens/s (median of the timed runs) and the speed-up. With
//! `MOLT_BENCH_SCAN_ONLY` set it stops after the first line (the scan kernels alone, median
//! and best run), which is what interleaved A/B comparisons of two builds need.

use candle_core::Result;
use trainer::kernels::bench::{self, BenchShape, Comparison, Timing};

fn cpu(t: &Timing) -> String {
    t.cpu_per_wall
        .map(|c| format!("{c:.1}"))
        .unwrap_or_else(|| "?".into())
}

fn report(what: &str, tokens: usize, c: &Comparison) {
    println!(
        "{what:<28} fused {:>10.0} tok/s ({:>8.2} ms, cpu/wall {})   reference {:>9.0} tok/s ({:>9.2} ms, cpu/wall {})   speed-up {:>6.1}x",
        c.fused.tokens_per_s(tokens),
        c.fused.median_s * 1e3,
        cpu(&c.fused),
        c.reference.tokens_per_s(tokens),
        c.reference.median_s * 1e3,
        cpu(&c.reference),
        c.speedup()
    );
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; numbers are the shape.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut shape = BenchShape::mamba_130m();
    if let [b, l, e, n] = nums[..] {
        shape = BenchShape {
            batch: b,
            len: l,
            d_inner: e,
            d_state: n,
            ..shape
        };
    }
    println!(
        "shape b={} L={} E={} N={} K={}, {} rayon threads",
        shape.batch,
        shape.len,
        shape.d_inner,
        shape.d_state,
        shape.d_conv,
        rayon::current_num_threads()
    );
    let tokens = shape.tokens();
    let (kf, kb) = bench::scan_kernels_only(&shape, 20)?;
    println!(
        "scan kernels alone           forward {:.2} ms (best {:.2}), backward {:.2} ms (best {:.2}): fwd+bwd {:.0} tok/s (cpu/wall {})",
        kf.median_s * 1e3,
        kf.min_s * 1e3,
        kb.median_s * 1e3,
        kb.min_s * 1e3,
        tokens as f64 / (kf.median_s + kb.median_s),
        cpu(&kb)
    );
    // A/B runs of the scan kernels alone (the reference comparisons below take minutes).
    if std::env::var_os("MOLT_BENCH_SCAN_ONLY").is_some() {
        return Ok(());
    }
    report(
        "scan fwd+bwd (with z)",
        tokens,
        &bench::scan_fwd_bwd(&shape, 20, 3)?,
    );
    report(
        "scan fwd (no grad)",
        tokens,
        &bench::scan_fwd(&shape, 20, 3)?,
    );
    report("conv fwd+bwd", tokens, &bench::conv_fwd_bwd(&shape, 20, 5)?);
    // A decode step (one layer's conv + scan) produces one token per batch row.
    for batch in [1, shape.batch, 64] {
        let step_shape = BenchShape { batch, ..shape };
        report(
            &format!("decode step, batch {batch}"),
            batch,
            &bench::decode_step(&step_shape, 200)?,
        );
    }
    Ok(())
}
