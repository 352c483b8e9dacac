//! Timing helpers for the kernels (used by `trainer/benches/kernels.rs`, and meant for a
//! `molt bench` subcommand): fused kernels against the `reference` compositions, forward +
//! backward, on random Mamba-like inputs. Plain `std::time`, median of the timed runs.

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};

use super::reference::ScanFn;

/// Shape of one benchmark run.
#[derive(Clone, Copy, Debug)]
pub struct BenchShape {
    pub batch: usize,
    pub len: usize,
    /// E (d_inner).
    pub d_inner: usize,
    /// N (d_state).
    pub d_state: usize,
    /// K (d_conv).
    pub d_conv: usize,
}

impl BenchShape {
    /// mamba-130m's mixer at batch 4 × 128 tokens.
    pub fn mamba_130m() -> Self {
        Self {
            batch: 4,
            len: 128,
            d_inner: 1536,
            d_state: 16,
            d_conv: 4,
        }
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.len
    }
}

/// Median and best wall time of the timed runs, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub runs: usize,
    /// Process CPU time / wall time over the timed runs (Linux only): about the number of
    /// threads when the machine is quiet, lower when other processes take the cores.
    pub cpu_per_wall: Option<f64>,
}

impl Timing {
    pub fn tokens_per_s(&self, tokens: usize) -> f64 {
        tokens as f64 / self.median_s
    }
}

/// Fused vs reference timings of the same work.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    pub fused: Timing,
    pub reference: Timing,
}

impl Comparison {
    /// How many times faster the fused kernel is (median against median).
    pub fn speedup(&self) -> f64 {
        self.reference.median_s / self.fused.median_s
    }
}

/// User + system CPU time of this process (all threads), from `/proc/self/stat`.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // Linux reports clock ticks of 1/100 s (USER_HZ) on every mainstream architecture.
    Some((utime + stime) / 100.0)
}

/// Runs `f` once to warm up, then `runs` times, and returns the timing.
pub fn time<F: FnMut() -> Result<()>>(runs: usize, mut f: F) -> Result<Timing> {
    f()?;
    let mut times = Vec::with_capacity(runs.max(1));
    let (cpu0, wall0) = (process_cpu_s(), Instant::now());
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu_per_wall = match (cpu0, process_cpu_s()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
        _ => None,
    };
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_s: times[times.len() / 2],
        min_s: times[0],
        runs: times.len(),
        cpu_per_wall,
    })
}

/// Trainable scan inputs with Mamba-like statistics (`dt` ≈ softplus(N(-3, 0.5)), S4D-real A).
pub struct ScanInputs {
    pub u: Var,
    pub delta: Var,
    pub a: Var,
    pub b: Var,
    pub c: Var,
    pub d: Var,
    pub delta_bias: Var,
    pub z: Var,
    pub upstream: Tensor,
}

impl ScanInputs {
    pub fn random(s: &BenchShape) -> Result<Self> {
        let dev = Device::Cpu;
        let (bl, e, n) = ((s.batch, s.len), s.d_inner, s.d_state);
        let a = Tensor::arange(1f32, n as f32 + 1.0, &dev)?
            .neg()?
            .unsqueeze(0)?
            .broadcast_as((e, n))?
            .contiguous()?;
        Ok(Self {
            u: Var::randn(0f32, 1.0, (bl.0, bl.1, e), &dev)?,
            delta: Var::randn(0f32, 0.5, (bl.0, bl.1, e), &dev)?,
            a: Var::from_tensor(&a)?,
            b: Var::randn(0f32, 1.0, (bl.0, bl.1, n), &dev)?,
            c: Var::randn(0f32, 1.0, (bl.0, bl.1, n), &dev)?,
            d: Var::randn(0f32, 1.0, e, &dev)?,
            delta_bias: Var::from_tensor(
                &(Tensor::ones(e, candle_core::DType::F32, &dev)? * -3.0)?,
            )?,
            z: Var::randn(0f32, 1.0, (bl.0, bl.1, e), &dev)?,
            upstream: Tensor::randn(0f32, 1.0, (bl.0, bl.1, e), &dev)?,
        })
    }

    /// Forward, `sum(y · upstream)`, backward; with the fused kernel or the reference.
    pub fn fwd_bwd(&self, fused: bool) -> Result<()> {
        let f = scan_impl(fused);
        let (y, _) = f(
            &self.u,
            &self.delta,
            &self.a,
            &self.b,
            &self.c,
            &self.d,
            &self.delta_bias,
            Some(&self.z),
            None,
        )?;
        let grads = (y * &self.upstream)?.sum_all()?.backward()?;
        // Touch one gradient so nothing can be skipped.
        grads
            .get(&self.u)
            .map(|g| g.dims().len())
            .unwrap_or_default();
        Ok(())
    }
}

/// The fused scan (forward in time) or the reference.
fn scan_impl(fused: bool) -> ScanFn {
    if fused {
        |u, delta, a, b, c, d, bias, z, s0| {
            super::selective_scan(u, delta, a, b, c, d, bias, z, s0, false)
        }
    } else {
        super::reference::selective_scan
    }
}

/// Scan forward + backward (all 8 gradients, with z): fused vs reference.
pub fn scan_fwd_bwd(shape: &BenchShape, runs: usize, reference_runs: usize) -> Result<Comparison> {
    let inp = ScanInputs::random(shape)?;
    let fused = time(runs, || inp.fwd_bwd(true))?;
    let reference = time(reference_runs, || inp.fwd_bwd(false))?;
    Ok(Comparison { fused, reference })
}

/// Scan forward only, no gradient tracking (prefill): fused vs reference.
pub fn scan_fwd(shape: &BenchShape, runs: usize, reference_runs: usize) -> Result<Comparison> {
    let inp = ScanInputs::random(shape)?;
    let run = |fused: bool| {
        let f = scan_impl(fused);
        let t = |v: &Var| v.as_tensor().detach();
        f(
            &t(&inp.u),
            &t(&inp.delta),
            &t(&inp.a),
            &t(&inp.b),
            &t(&inp.c),
            &t(&inp.d),
            &t(&inp.delta_bias),
            Some(&t(&inp.z)),
            None,
        )
        .map(|_| ())
    };
    let fused = time(runs, || run(true))?;
    let reference = time(reference_runs, || run(false))?;
    Ok(Comparison { fused, reference })
}

/// Conv forward + backward (grads of x, weight, bias): fused vs reference.
pub fn conv_fwd_bwd(shape: &BenchShape, runs: usize, reference_runs: usize) -> Result<Comparison> {
    let dev = Device::Cpu;
    let (b, l, e, k) = (shape.batch, shape.len, shape.d_inner, shape.d_conv);
    let x = Var::randn(0f32, 1.0, (b, l, e), &dev)?;
    let w = Var::randn(0f32, 0.5, (e, k), &dev)?;
    let bias = Var::randn(0f32, 0.5, e, &dev)?;
    let up = Tensor::randn(0f32, 1.0, (b, l, e), &dev)?;
    let run = |fused: bool| -> Result<()> {
        let y = if fused {
            super::causal_conv1d_silu(&x, &w, &bias, None, false)?
        } else {
            super::reference::causal_conv1d_silu(&x, &w, &bias, None)?
        };
        (y * &up)?.sum_all()?.backward().map(|_| ())
    };
    let fused = time(runs, || run(true))?;
    let reference = time(reference_runs, || run(false))?;
    Ok(Comparison { fused, reference })
}

/// One decode step of scan + conv for a batch (the generation inner loop, per layer):
/// fused vs reference.
pub fn decode_step(shape: &BenchShape, runs: usize) -> Result<Comparison> {
    let dev = Device::Cpu;
    let (b, e, n, k) = (shape.batch, shape.d_inner, shape.d_state, shape.d_conv);
    let r = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev);
    let (state, conv_state) = (r(&[b, e, n])?, r(&[b, e, k])?);
    let (x, delta, z) = (r(&[b, e])?, (r(&[b, e])? - 3.0)?, r(&[b, e])?);
    let a = Tensor::arange(1f32, n as f32 + 1.0, &dev)?
        .neg()?
        .unsqueeze(0)?
        .broadcast_as((e, n))?
        .contiguous()?;
    let (bm, cm, d, bias, w, cb) = (
        r(&[b, n])?,
        r(&[b, n])?,
        r(&[e])?,
        r(&[e])?,
        r(&[e, k])?,
        r(&[e])?,
    );
    let run = |fused: bool| -> Result<()> {
        if fused {
            let (xc, _) = super::causal_conv1d_step(&conv_state, &x, &w, &cb)?;
            super::selective_scan_step(&state, &xc, &delta, &a, &bm, &cm, &d, &bias, Some(&z))?;
        } else {
            let (xc, _) = super::reference::causal_conv1d_step(&conv_state, &x, &w, &cb)?;
            super::reference::selective_scan_step(
                &state,
                &xc,
                &delta,
                &a,
                &bm,
                &cm,
                &d,
                &bias,
                Some(&z),
            )?;
        }
        Ok(())
    };
    let fused = time(runs, || run(true))?;
    let reference = time(runs, || run(false))?;
    Ok(Comparison { fused, reference })
}

/// The scan kernels alone, without Candle (no packing, no graph): forward with
/// checkpoints, and backward. Separates kernel time from framework overhead.
pub fn scan_kernels_only(shape: &BenchShape, runs: usize) -> Result<(Timing, Timing)> {
    use super::scan::{ScanDims, backward, forward};
    let dims = ScanDims {
        b: shape.batch,
        l: shape.len,
        e: shape.d_inner,
        n: shape.d_state,
        has_z: true,
        has_s0: false,
        reverse: false,
    };
    let inp = ScanInputs::random(shape)?;
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (u, delta) = (flat(&inp.u)?, flat(&inp.delta)?);
    let parts = [&inp.z, &inp.b, &inp.c, &inp.a, &inp.d, &inp.delta_bias]
        .map(|v| v.as_tensor().flatten_all());
    let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
    let rest = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
    let grad_y = flat(&inp.upstream)?;
    let fwd = time(runs, || forward(&dims, &u, &delta, &rest, true).map(|_| ()))?;
    let (_, slabs) = forward(&dims, &u, &delta, &rest, true)?;
    let bwd = time(runs, || {
        backward(&dims, &u, &delta, &rest, &grad_y, &slabs).map(|_| ())
    })?;
    Ok((fwd, bwd))
}
