//! The fused kernels (`trainer::kernels`) against
//! (a) the `ops` golden fixtures from the PyTorch reference (tolerances from the manifest), and
//! (b) the plain-Candle `reference` composition on random inputs, forward and every gradient,
//!     over many shapes (odd widths, chunk boundaries, with/without z and initial state),
//! plus decode-step / chunked-prefill consistency and error handling.
//!
//! Tolerance for (b): both sides are f32 and differ only in summation order (tree sums over
//! lanes, per-block partial sums over channels and time) and in `exp`/`log1p` (polynomials,
//! ≤ 4 ulp, against libm). Measured errors are ≤ 1e-6 of each tensor's largest magnitude for
//! most tensors, 5e-6 at worst (a one-channel reduction with cancellation); we allow
//! `|got − want| ≤ 2e-5·max|want| + 2e-4·|want|` (see `RANDOM_TOL`): 4× above the worst
//! rounding noise and far below any real bug (a wrong term shows up at ≥ 1e-3).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var, backprop::GradStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use trainer::kernels;
use trainer::kernels::reference::{self, ScanFn};

mod common;

// ---------------------------------------------------------------------------------------
// Comparison helpers

#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f64,
    rtol: f64,
    /// Optional ‖got − want‖₂ / ‖want‖₂ bound.
    rel_l2: Option<f64>,
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to vec")
}

/// Element-wise `|got − want| ≤ atol + rtol·|want|` (and the L2 bound if any).
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (tol.atol + tol.rtol * b.abs());
        // NaN counts as a failure.
        let fails = excess > 0.0 || excess.is_nan();
        if fails && worst.is_none_or(|(_, e)| excess > e || e.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} got {} want {} (atol {}, rtol {})",
            g[i], w[i], tol.atol, tol.rtol
        );
    }
    if let Some(bound) = tol.rel_l2 {
        let num: f64 = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let den: f64 = w.iter().map(|b| b * b).sum::<f64>().sqrt();
        if den > 0.0 {
            assert!(
                num / den <= bound,
                "{what}: relative L2 error {} > {bound}",
                num / den
            );
        }
    }
}

/// Tolerance for fused-vs-reference on random inputs, scaled by the tensor's magnitude.
const RANDOM_TOL: (f64, f64) = (2e-5, 2e-4);

fn assert_close_scaled(what: &str, got: &Tensor, want: &Tensor) {
    let scale = values(want).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = Tol {
        atol: RANDOM_TOL.0 * scale.max(1e-3),
        rtol: RANDOM_TOL.1,
        rel_l2: None,
    };
    assert_close(what, got, want, tol);
}

fn grad(grads: &GradStore, v: &Var, name: &str) -> Tensor {
    match grads.get(v) {
        Some(g) => g.clone(),
        None => panic!("no gradient for {name}"),
    }
}

// ---------------------------------------------------------------------------------------
// The two implementations under one interface

type ConvFn = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
type ScanStepFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
) -> Result<(Tensor, Tensor)>;
type ConvStepFn = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>;

struct Impl {
    name: &'static str,
    scan: ScanFn,
    conv: ConvFn,
    scan_step: ScanStepFn,
    conv_step: ConvStepFn,
}

const FUSED: Impl = Impl {
    name: "fused",
    scan: |u, delta, a, b, c, d, bias, z, s0| {
        kernels::selective_scan(u, delta, a, b, c, d, bias, z, s0, false)
    },
    conv: |x, w, b, hist| kernels::causal_conv1d_silu(x, w, b, hist, false),
    scan_step: kernels::selective_scan_step,
    conv_step: kernels::causal_conv1d_step,
};

const REFERENCE: Impl = Impl {
    name: "reference",
    scan: reference::selective_scan,
    conv: reference::causal_conv1d_silu,
    scan_step: reference::selective_scan_step,
    conv_step: reference::causal_conv1d_step,
};

// ---------------------------------------------------------------------------------------
// (a) Golden fixtures

struct OpsCase {
    name: String,
    tensors: std::collections::HashMap<String, Tensor>,
    /// Tolerance of each stored tensor, from its manifest class.
    tol: BTreeMap<String, Tol>,
}

impl OpsCase {
    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: missing tensor {key}", self.name))
    }

    /// `[b, d, L]` (mamba_ssm layout) → `[b, L, d]` (ours).
    fn channels_last(&self, key: &str) -> Tensor {
        self.get(key)
            .transpose(1, 2)
            .and_then(|t| t.contiguous())
            .expect("transpose")
    }

    fn check(&self, what: &str, got: &Tensor, key: &str) {
        let tol = *self
            .tol
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tolerance for {key}", self.name));
        assert_close(
            &format!("{}: {what} vs {key}", self.name),
            got,
            self.get(key),
            tol,
        );
    }
}

/// Every `ops` case of every fixture case set (`tests/fixtures/index.json`, `alt/index.json`).
fn ops_cases() -> Vec<OpsCase> {
    let mut out = Vec::new();
    for case in common::indexed_cases(trainer::model::Family::Mamba, "ops") {
        let name = case.label.clone();
        let manifest = case.manifest();
        let classes = &manifest["tolerances"];
        let mut tol = BTreeMap::new();
        let entries = manifest["tensors"]["reference.safetensors"]
            .as_object()
            .expect("manifest tensors");
        for (key, entry) in entries {
            let class = entry["tolerance"].as_str().expect("tolerance class");
            let c = &classes[class];
            let t = Tol {
                atol: c["atol"].as_f64().expect("atol"),
                rtol: c["rtol"].as_f64().expect("rtol"),
                rel_l2: c["rel_l2"].as_f64(),
            };
            tol.insert(key.clone(), t);
        }
        let tensors =
            candle_core::safetensors::load(case.dir.join("reference.safetensors"), &Device::Cpu)
                .expect("load reference.safetensors");
        out.push(OpsCase { name, tensors, tol });
    }
    out
}

fn check_ops_case(case: &OpsCase, imp: &Impl) {
    let var = |t: Tensor| Var::from_tensor(&t).expect("var");
    let tag = |s: &str| format!("{} {s}", imp.name);

    // Selective scan, with every gradient of sum(y · upstream).
    let u = var(case.channels_last("op.scan.in.u"));
    let delta = var(case.channels_last("op.scan.in.delta"));
    let z = var(case.channels_last("op.scan.in.z"));
    let bm = var(case.channels_last("op.scan.in.B"));
    let cm = var(case.channels_last("op.scan.in.C"));
    let a = var(case.get("op.scan.in.A").clone());
    let d = var(case.get("op.scan.in.D").clone());
    let bias = var(case.get("op.scan.in.delta_bias").clone());
    let (y, last) = (imp.scan)(&u, &delta, &a, &bm, &cm, &d, &bias, Some(&z), None).expect("scan");
    case.check(&tag("scan y"), &y.transpose(1, 2).unwrap(), "op.scan.out.y");
    case.check(&tag("scan last state"), &last, "op.scan.out.last_state");
    let up = case.channels_last("op.scan.upstream.y");
    let grads = (y * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .expect("scan backward");
    for (v, key, transposed) in [
        (&u, "u", true),
        (&delta, "delta", true),
        (&z, "z", true),
        (&bm, "B", true),
        (&cm, "C", true),
        (&a, "A", false),
        (&d, "D", false),
        (&bias, "delta_bias", false),
    ] {
        let g = grad(&grads, v, key);
        let g = if transposed {
            g.transpose(1, 2).unwrap()
        } else {
            g
        };
        case.check(
            &tag(&format!("scan grad {key}")),
            &g,
            &format!("op.scan.grad.{key}"),
        );
    }

    // Causal conv1d + SiLU, with gradients.
    let x = var(case.channels_last("op.conv.in.x"));
    let w = var(case.get("op.conv.in.weight").clone());
    let cb = var(case.get("op.conv.in.bias").clone());
    let y = (imp.conv)(&x, &w, &cb, None).expect("conv");
    case.check(&tag("conv y"), &y.transpose(1, 2).unwrap(), "op.conv.out.y");
    let up = case.channels_last("op.conv.upstream.y");
    let grads = (y * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .expect("conv backward");
    case.check(
        &tag("conv grad x"),
        &grad(&grads, &x, "x").transpose(1, 2).unwrap(),
        "op.conv.grad.x",
    );
    case.check(
        &tag("conv grad weight"),
        &grad(&grads, &w, "weight"),
        "op.conv.grad.weight",
    );
    case.check(
        &tag("conv grad bias"),
        &grad(&grads, &cb, "bias"),
        "op.conv.grad.bias",
    );

    // Decode steps (A, D, delta_bias from the scan; weight and bias from the conv).
    let (y, state) = (imp.scan_step)(
        case.get("op.step.in.state"),
        case.get("op.step.in.x"),
        case.get("op.step.in.dt"),
        case.get("op.scan.in.A"),
        case.get("op.step.in.B"),
        case.get("op.step.in.C"),
        case.get("op.scan.in.D"),
        case.get("op.scan.in.delta_bias"),
        Some(case.get("op.step.in.z")),
    )
    .expect("scan step");
    case.check(&tag("step y"), &y, "op.step.out.y");
    case.check(&tag("step state"), &state, "op.step.out.state");

    let x = case.get("op.convstep.in.x").squeeze(2).unwrap();
    let (y, state) = (imp.conv_step)(
        case.get("op.convstep.in.conv_state"),
        &x,
        case.get("op.conv.in.weight"),
        case.get("op.conv.in.bias"),
    )
    .expect("conv step");
    case.check(
        &tag("convstep y"),
        &y.unsqueeze(2).unwrap(),
        "op.convstep.out.y",
    );
    case.check(&tag("convstep state"), &state, "op.convstep.out.conv_state");
}

#[test]
fn ops_fixture_fused() {
    for case in ops_cases() {
        check_ops_case(&case, &FUSED);
    }
}

#[test]
fn ops_fixture_reference() {
    for case in ops_cases() {
        check_ops_case(&case, &REFERENCE);
    }
}

// ---------------------------------------------------------------------------------------
// (b) Fused vs reference on random inputs

struct Gen(StdRng);

impl Gen {
    fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// Normal(mean, std) by Box–Muller.
    fn normal(&mut self, dims: &[usize], mean: f32, std: f32) -> Tensor {
        let count: usize = dims.iter().product();
        let data: Vec<f32> = (0..count)
            .map(|_| {
                let u1: f32 = self.0.random::<f32>().max(1e-7);
                let u2: f32 = self.0.random();
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
    }

    fn uniform(&mut self, dims: &[usize], lo: f32, hi: f32) -> Tensor {
        let count: usize = dims.iter().product();
        let data: Vec<f32> = (0..count)
            .map(|_| lo + (hi - lo) * self.0.random::<f32>())
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
    }
}

#[derive(Clone, Copy, Debug)]
struct ScanCase {
    b: usize,
    l: usize,
    e: usize,
    n: usize,
    z: bool,
    s0: bool,
}

struct ScanVars {
    u: Var,
    delta: Var,
    a: Var,
    bm: Var,
    cm: Var,
    d: Var,
    bias: Var,
    z: Option<Var>,
    s0: Option<Var>,
    upstream: Tensor,
}

impl ScanVars {
    fn random(c: &ScanCase, seed: u64) -> Self {
        let mut g = Gen::new(seed);
        let v = |t: Tensor| Var::from_tensor(&t).expect("var");
        // Mamba-like ranges: dt = softplus(delta + bias) spans ~1e-3..2, plus a few large
        // deltas past the softplus threshold (20); A = -exp(A_log) in [-N-1, -0.5].
        let mut delta = g.normal(&[c.b, c.l, c.e], 0.0, 1.5);
        if c.l * c.e > 3 {
            let mut dv = delta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            dv[1] = 25.0;
            dv[2] = 21.0;
            delta = Tensor::from_vec(dv, (c.b, c.l, c.e), &Device::Cpu).unwrap();
        }
        Self {
            u: v(g.normal(&[c.b, c.l, c.e], 0.0, 1.0)),
            delta: v(delta),
            a: v(g.uniform(&[c.e, c.n], -(c.n as f32) - 1.0, -0.5)),
            bm: v(g.normal(&[c.b, c.l, c.n], 0.0, 1.0)),
            cm: v(g.normal(&[c.b, c.l, c.n], 0.0, 1.0)),
            d: v(g.normal(&[c.e], 0.0, 1.0)),
            bias: v(g.uniform(&[c.e], -4.0, 0.5)),
            z: c.z.then(|| v(g.normal(&[c.b, c.l, c.e], 0.0, 1.5))),
            s0: c.s0.then(|| v(g.normal(&[c.b, c.e, c.n], 0.0, 1.0))),
            upstream: g.normal(&[c.b, c.l, c.e], 0.0, 1.0),
        }
    }

    fn run(&self, f: ScanFn) -> (Tensor, Tensor, GradStore) {
        let (y, last) = f(
            &self.u,
            &self.delta,
            &self.a,
            &self.bm,
            &self.cm,
            &self.d,
            &self.bias,
            self.z.as_ref().map(|z| z.as_tensor()),
            self.s0.as_ref().map(|s| s.as_tensor()),
        )
        .expect("scan");
        let grads = (&y * &self.upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .expect("backward");
        (y, last, grads)
    }

    fn named(&self) -> Vec<(&'static str, &Var)> {
        let mut out = vec![
            ("u", &self.u),
            ("delta", &self.delta),
            ("A", &self.a),
            ("B", &self.bm),
            ("C", &self.cm),
            ("D", &self.d),
            ("delta_bias", &self.bias),
        ];
        if let Some(z) = &self.z {
            out.push(("z", z));
        }
        if let Some(s) = &self.s0 {
            out.push(("initial_state", s));
        }
        out
    }
}

fn check_scan_case(c: ScanCase, seed: u64) {
    let vars = ScanVars::random(&c, seed);
    let (y, last, grads) = vars.run(FUSED.scan);
    let (y_ref, last_ref, grads_ref) = vars.run(REFERENCE.scan);
    assert_close_scaled(&format!("{c:?} y"), &y, &y_ref);
    assert_close_scaled(&format!("{c:?} last state"), &last, &last_ref);
    for (name, v) in vars.named() {
        let (g, g_ref) = (grad(&grads, v, name), grad(&grads_ref, v, name));
        assert_close_scaled(&format!("{c:?} grad {name}"), &g, &g_ref);
    }
}

/// Chunk size of the fused backward is 64: these straddle one and two boundaries.
const CHUNK_EDGE_LENGTHS: [usize; 6] = [63, 64, 65, 127, 128, 129];

#[test]
fn scan_fused_matches_reference_lengths_and_chunk_edges() {
    let mut seed = 1;
    for l in [1, 2, 5, 31]
        .into_iter()
        .chain(CHUNK_EDGE_LENGTHS)
        .chain([300])
    {
        for (z, s0) in [(true, false), (false, true)] {
            check_scan_case(
                ScanCase {
                    b: 2,
                    l,
                    e: 17,
                    n: 4,
                    z,
                    s0,
                },
                seed,
            );
            seed += 1;
        }
    }
}

#[test]
fn scan_fused_matches_reference_widths_and_states() {
    let mut seed = 100;
    for e in [1, 3, 8, 17, 33] {
        for n in [1, 4, 16] {
            for (b, z, s0) in [(1, false, false), (3, true, true)] {
                check_scan_case(
                    ScanCase {
                        b,
                        l: 9,
                        e,
                        n,
                        z,
                        s0,
                    },
                    seed,
                );
                seed += 1;
            }
        }
    }
}

#[test]
fn scan_fused_matches_reference_mixed() {
    let cases = [
        ScanCase {
            b: 4,
            l: 65,
            e: 33,
            n: 16,
            z: true,
            s0: true,
        },
        ScanCase {
            b: 4,
            l: 129,
            e: 3,
            n: 16,
            z: false,
            s0: false,
        },
        ScanCase {
            b: 1,
            l: 300,
            e: 1,
            n: 1,
            z: true,
            s0: true,
        },
        ScanCase {
            b: 3,
            l: 64,
            e: 160,
            n: 4,
            z: true,
            s0: false,
        },
        ScanCase {
            b: 2,
            l: 200,
            e: 40,
            n: 16,
            z: false,
            s0: true,
        },
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check_scan_case(c, 500 + i as u64);
    }
}

#[test]
fn scan_without_autograd_matches_tracked_run() {
    let c = ScanCase {
        b: 2,
        l: 70,
        e: 19,
        n: 16,
        z: true,
        s0: true,
    };
    let vars = ScanVars::random(&c, 7);
    let (y, last, _) = vars.run(FUSED.scan);
    let t = |v: &Var| v.as_tensor().detach();
    let (y2, last2) = kernels::selective_scan(
        &t(&vars.u),
        &t(&vars.delta),
        &t(&vars.a),
        &t(&vars.bm),
        &t(&vars.cm),
        &t(&vars.d),
        &t(&vars.bias),
        vars.z.as_ref().map(t).as_ref(),
        vars.s0.as_ref().map(t).as_ref(),
        false,
    )
    .unwrap();
    let exact = Tol {
        atol: 0.0,
        rtol: 0.0,
        rel_l2: None,
    };
    assert_close("y", &y2, &y, exact);
    assert_close("last", &last2, &last, exact);
}

#[test]
fn scan_gradients_with_some_inputs_frozen() {
    // Only u and A_log-like A are trainable; strided (narrowed) u as the model produces it.
    let c = ScanCase {
        b: 2,
        l: 66,
        e: 9,
        n: 4,
        z: true,
        s0: false,
    };
    let vars = ScanVars::random(&c, 11);
    let mut g = Gen::new(12);
    let xz = Var::from_tensor(&g.normal(&[c.b, c.l, 2 * c.e], 0.0, 1.0)).unwrap();
    let u = xz.narrow(2, 0, c.e).unwrap();
    let z = xz.narrow(2, c.e, c.e).unwrap();
    let frozen = |v: &Var| v.as_tensor().detach();
    let run = |f: ScanFn| {
        let (y, _) = f(
            &u,
            &frozen(&vars.delta),
            &vars.a,
            &frozen(&vars.bm),
            &frozen(&vars.cm),
            &frozen(&vars.d),
            &frozen(&vars.bias),
            Some(&z),
            None,
        )
        .unwrap();
        let grads = (&y * &vars.upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (
            y,
            grad(&grads, &xz, "xz"),
            grad(&grads, &vars.a, "A"),
            grads.get(&vars.delta).is_none(),
        )
    };
    let (y, gxz, ga, no_delta) = run(FUSED.scan);
    let (y_ref, gxz_ref, ga_ref, no_delta_ref) = run(REFERENCE.scan);
    assert!(no_delta && no_delta_ref, "frozen delta got a gradient");
    assert_close_scaled("y", &y, &y_ref);
    assert_close_scaled("grad xz", &gxz, &gxz_ref);
    assert_close_scaled("grad A", &ga, &ga_ref);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Reductions use partitions fixed by the shapes, not by the pool, so the bits match.
    let c = ScanCase {
        b: 3,
        l: 130,
        e: 200,
        n: 16,
        z: true,
        s0: true,
    };
    let v = ScanVars::random(&c, 21);
    let run = || {
        let (y, last, g) = v.run(FUSED.scan);
        let mut out = vec![values(&y), values(&last)];
        out.extend(
            v.named()
                .iter()
                .map(|(name, var)| values(&grad(&g, var, name))),
        );
        let x = v.u.as_tensor();
        let w = Tensor::ones((c.e, 4), DType::F32, &Device::Cpu).unwrap();
        let yc = kernels::causal_conv1d_silu(x, &w, v.d.as_tensor(), None, false).unwrap();
        let gc = yc.sum_all().unwrap().backward().unwrap();
        out.push(values(&yc));
        out.push(values(&grad(&gc, &v.d, "conv bias")));
        out
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(run);
    assert!(one == three, "results differ between 1 and 3 threads");
}

#[derive(Clone, Copy, Debug)]
struct ConvCase {
    b: usize,
    l: usize,
    e: usize,
    k: usize,
    history: bool,
}

fn check_conv_case(c: ConvCase, seed: u64) {
    let mut g = Gen::new(seed);
    // x is a strided view (the first half of a wider tensor), as in the model.
    let wide = Var::from_tensor(&g.normal(&[c.b, c.l, 2 * c.e], 0.0, 1.0)).unwrap();
    let x = wide.narrow(2, 0, c.e).unwrap();
    let w = Var::from_tensor(&g.normal(&[c.e, c.k], 0.0, 0.7)).unwrap();
    let bias = Var::from_tensor(&g.normal(&[c.e], 0.0, 0.5)).unwrap();
    let hist = c
        .history
        .then(|| Var::from_tensor(&g.normal(&[c.b, c.e, c.k - 1], 0.0, 1.0)).unwrap());
    let up = g.normal(&[c.b, c.l, c.e], 0.0, 1.0);
    let run = |f: ConvFn| {
        let y = f(&x, &w, &bias, hist.as_ref().map(|h| h.as_tensor())).unwrap();
        let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gh = hist.as_ref().map(|h| grad(&grads, h, "history"));
        (
            y,
            grad(&grads, &wide, "x"),
            grad(&grads, &w, "weight"),
            grad(&grads, &bias, "bias"),
            gh,
        )
    };
    let (y, gx, gw, gb, gh) = run(FUSED.conv);
    let (y_ref, gx_ref, gw_ref, gb_ref, gh_ref) = run(REFERENCE.conv);
    assert_close_scaled(&format!("{c:?} y"), &y, &y_ref);
    assert_close_scaled(&format!("{c:?} grad x"), &gx, &gx_ref);
    assert_close_scaled(&format!("{c:?} grad weight"), &gw, &gw_ref);
    assert_close_scaled(&format!("{c:?} grad bias"), &gb, &gb_ref);
    if let (Some(gh), Some(gh_ref)) = (gh, gh_ref) {
        assert_close_scaled(&format!("{c:?} grad history"), &gh, &gh_ref);
    }
}

#[test]
fn conv_fused_matches_reference() {
    let mut seed = 1000;
    for l in [1, 2, 3, 5, 63, 64, 65, 130, 300] {
        for (k, e, b) in [(2, 1, 1), (3, 17, 2), (4, 33, 4), (4, 3, 3)] {
            for history in [false, true] {
                check_conv_case(
                    ConvCase {
                        b,
                        l,
                        e,
                        k,
                        history,
                    },
                    seed,
                );
                seed += 1;
            }
        }
    }
}

/// The fused scan run backwards in time (`reverse`) ...
const SCAN_REVERSED: ScanFn = |u, delta, a, b, c, d, bias, z, s0| {
    kernels::selective_scan(u, delta, a, b, c, d, bias, z, s0, true)
};

/// ... equals the forward scan on inputs flipped in time, with the output flipped back.
const SCAN_ON_FLIPPED: ScanFn = |u, delta, a, b, c, d, bias, z, s0| {
    let f = kernels::flip_time;
    let z = z.map(f).transpose()?;
    let (y, last) = kernels::selective_scan(
        &f(u)?,
        &f(delta)?,
        a,
        &f(b)?,
        &f(c)?,
        d,
        bias,
        z.as_ref(),
        s0,
        false,
    )?;
    Ok((f(&y)?, last))
};

#[test]
fn scan_reverse_equals_scan_of_the_flipped_sequence() {
    let mut seed = 3000;
    for l in [1, 5].into_iter().chain(CHUNK_EDGE_LENGTHS) {
        for (b, e, n, z, s0) in [(2, 17, 4, true, false), (1, 9, 16, false, true)] {
            let c = ScanCase { b, l, e, n, z, s0 };
            let vars = ScanVars::random(&c, seed);
            let (y, last, grads) = vars.run(SCAN_REVERSED);
            let (y_ref, last_ref, grads_ref) = vars.run(SCAN_ON_FLIPPED);
            assert_close_scaled(&format!("reverse {c:?} y"), &y, &y_ref);
            assert_close_scaled(&format!("reverse {c:?} last state"), &last, &last_ref);
            for (name, v) in vars.named() {
                let (g, g_ref) = (grad(&grads, v, name), grad(&grads_ref, v, name));
                assert_close_scaled(&format!("reverse {c:?} grad {name}"), &g, &g_ref);
            }
            seed += 1;
        }
    }
}

#[test]
fn conv_reverse_equals_conv_of_the_flipped_sequence() {
    let mut seed = 4000;
    for l in [1, 2, 3, 5, 63, 64, 65, 130] {
        for (k, e, b) in [(2, 1, 1), (3, 17, 2), (4, 33, 3)] {
            let mut g = Gen::new(seed);
            seed += 1;
            // A strided view, as in the model.
            let wide = Var::from_tensor(&g.normal(&[b, l, 2 * e], 0.0, 1.0)).unwrap();
            let x = wide.narrow(2, e, e).unwrap();
            let w = Var::from_tensor(&g.normal(&[e, k], 0.0, 0.7)).unwrap();
            let bias = Var::from_tensor(&g.normal(&[e], 0.0, 0.5)).unwrap();
            let up = g.normal(&[b, l, e], 0.0, 1.0);
            let run = |reverse: bool| {
                let y = if reverse {
                    kernels::causal_conv1d_silu(&x, &w, &bias, None, true).unwrap()
                } else {
                    let f = kernels::flip_time;
                    let y = kernels::causal_conv1d_silu(&f(&x).unwrap(), &w, &bias, None, false);
                    f(&y.unwrap()).unwrap()
                };
                let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    y,
                    grad(&grads, &wide, "x"),
                    grad(&grads, &w, "weight"),
                    grad(&grads, &bias, "bias"),
                )
            };
            let (y, gx, gw, gb) = run(true);
            let (y_ref, gx_ref, gw_ref, gb_ref) = run(false);
            let what = format!("reverse conv b={b} l={l} e={e} k={k}");
            assert_close_scaled(&format!("{what} y"), &y, &y_ref);
            assert_close_scaled(&format!("{what} grad x"), &gx, &gx_ref);
            assert_close_scaled(&format!("{what} grad weight"), &gw, &gw_ref);
            assert_close_scaled(&format!("{what} grad bias"), &gb, &gb_ref);
        }
    }
}

#[test]
fn scan_step_fused_matches_reference() {
    let mut seed = 2000;
    for (b, e, n) in [
        (1, 1, 1),
        (1, 17, 4),
        (3, 33, 16),
        (64, 40, 16),
        (2, 300, 16),
        (5, 9, 3),
        (2, 20, 33),
        (1, 9, 17),
    ] {
        for with_z in [false, true] {
            let mut g = Gen::new(seed);
            seed += 1;
            let state = g.normal(&[b, e, n], 0.0, 1.0);
            let x = g.normal(&[b, e], 0.0, 1.0);
            let delta = g.normal(&[b, e], 0.0, 2.0);
            let a = g.uniform(&[e, n], -17.0, -0.5);
            let (bm, cm) = (g.normal(&[b, n], 0.0, 1.0), g.normal(&[b, n], 0.0, 1.0));
            let (d, bias, z) = (
                g.normal(&[e], 0.0, 1.0),
                g.uniform(&[e], -4.0, 0.5),
                g.normal(&[b, e], 0.0, 1.0),
            );
            let z = with_z.then_some(&z);
            let (y, s) =
                kernels::selective_scan_step(&state, &x, &delta, &a, &bm, &cm, &d, &bias, z)
                    .unwrap();
            let (y_ref, s_ref) =
                reference::selective_scan_step(&state, &x, &delta, &a, &bm, &cm, &d, &bias, z)
                    .unwrap();
            assert_close_scaled(&format!("step y b{b} e{e} n{n}"), &y, &y_ref);
            assert_close_scaled(&format!("step state b{b} e{e} n{n}"), &s, &s_ref);
        }
    }
}

#[test]
fn conv_step_fused_matches_reference() {
    for (seed, (b, e, k)) in [(1, 1, 1), (1, 17, 2), (3, 33, 3), (64, 40, 4)]
        .into_iter()
        .enumerate()
    {
        let mut g = Gen::new(3000 + seed as u64);
        let state = g.normal(&[b, e, k], 0.0, 1.0);
        let x = g.normal(&[b, e], 0.0, 1.0);
        let (w, bias) = (g.normal(&[e, k], 0.0, 0.7), g.normal(&[e], 0.0, 0.5));
        let (y, s) = kernels::causal_conv1d_step(&state, &x, &w, &bias).unwrap();
        let (y_ref, s_ref) = reference::causal_conv1d_step(&state, &x, &w, &bias).unwrap();
        assert_close_scaled("convstep y", &y, &y_ref);
        let exact = Tol {
            atol: 0.0,
            rtol: 0.0,
            rel_l2: None,
        };
        assert_close("convstep state", &s, &s_ref, exact);
    }
}

// ---------------------------------------------------------------------------------------
// Consistency: sequence kernels vs decode steps, and chunked prefill

#[test]
fn scan_steps_and_split_prefill_reproduce_the_sequence() {
    let c = ScanCase {
        b: 3,
        l: 70,
        e: 11,
        n: 16,
        z: true,
        s0: true,
    };
    let v = ScanVars::random(&c, 42);
    let t = |v: &Var| v.as_tensor().detach();
    let (u, delta, a, bm, cm, d, bias) = (
        t(&v.u),
        t(&v.delta),
        t(&v.a),
        t(&v.bm),
        t(&v.cm),
        t(&v.d),
        t(&v.bias),
    );
    let z = v.z.as_ref().map(t).unwrap();
    let s0 = v.s0.as_ref().map(t).unwrap();
    let (y, last) = kernels::selective_scan(
        &u,
        &delta,
        &a,
        &bm,
        &cm,
        &d,
        &bias,
        Some(&z),
        Some(&s0),
        false,
    )
    .unwrap();

    // Token by token with the decode step.
    let mut state = s0.clone();
    let at = |x: &Tensor, i: usize| x.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
    let mut ys = Vec::new();
    for i in 0..c.l {
        let (yi, s) = kernels::selective_scan_step(
            &state,
            &at(&u, i),
            &at(&delta, i),
            &a,
            &at(&bm, i),
            &at(&cm, i),
            &d,
            &bias,
            Some(&at(&z, i)),
        )
        .unwrap();
        ys.push(yi);
        state = s;
    }
    assert_close_scaled("steps y", &Tensor::stack(&ys, 1).unwrap(), &y);
    assert_close_scaled("steps state", &state, &last);

    // Two prefill segments, the second starting from the first's last state.
    let split = 37;
    let part = |x: &Tensor, from: usize, len: usize| x.narrow(1, from, len).unwrap();
    let (y1, s1) = kernels::selective_scan(
        &part(&u, 0, split),
        &part(&delta, 0, split),
        &a,
        &part(&bm, 0, split),
        &part(&cm, 0, split),
        &d,
        &bias,
        Some(&part(&z, 0, split)),
        Some(&s0),
        false,
    )
    .unwrap();
    let rest = c.l - split;
    let (y2, s2) = kernels::selective_scan(
        &part(&u, split, rest),
        &part(&delta, split, rest),
        &a,
        &part(&bm, split, rest),
        &part(&cm, split, rest),
        &d,
        &bias,
        Some(&part(&z, split, rest)),
        Some(&s1),
        false,
    )
    .unwrap();
    assert_close_scaled("split y", &Tensor::cat(&[y1, y2], 1).unwrap(), &y);
    assert_close_scaled("split state", &s2, &last);
}

#[test]
fn conv_steps_and_history_reproduce_the_sequence() {
    let (b, l, e, k) = (2, 23, 13, 4);
    let mut g = Gen::new(77);
    let x = g.normal(&[b, l, e], 0.0, 1.0);
    let (w, bias) = (g.normal(&[e, k], 0.0, 0.7), g.normal(&[e], 0.0, 0.5));
    let hist = g.normal(&[b, e, k - 1], 0.0, 1.0);
    let y = kernels::causal_conv1d_silu(&x, &w, &bias, Some(&hist), false).unwrap();

    // Steps from a state holding the history (its oldest slot is dropped at once).
    let mut state = Tensor::cat(
        &[
            &Tensor::zeros((b, e, 1), DType::F32, &Device::Cpu).unwrap(),
            &hist,
        ],
        2,
    )
    .unwrap();
    let mut ys = Vec::new();
    for i in 0..l {
        let xi = x.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let (yi, s) = kernels::causal_conv1d_step(&state, &xi, &w, &bias).unwrap();
        ys.push(yi);
        state = s;
    }
    assert_close_scaled("conv steps", &Tensor::stack(&ys, 1).unwrap(), &y);

    // Two segments: the second's history is the first's last K-1 inputs.
    let split = 9;
    let y1 = kernels::causal_conv1d_silu(
        &x.narrow(1, 0, split).unwrap(),
        &w,
        &bias,
        Some(&hist),
        false,
    )
    .unwrap();
    let h2 = x
        .narrow(1, split - (k - 1), k - 1)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let y2 = kernels::causal_conv1d_silu(
        &x.narrow(1, split, l - split).unwrap(),
        &w,
        &bias,
        Some(&h2),
        false,
    )
    .unwrap();
    assert_close_scaled("conv split", &Tensor::cat(&[y1, y2], 1).unwrap(), &y);
}

// ---------------------------------------------------------------------------------------
// Dtypes, empty inputs, errors

#[test]
fn other_dtypes_are_computed_in_f32() {
    let c = ScanCase {
        b: 2,
        l: 20,
        e: 5,
        n: 4,
        z: true,
        s0: false,
    };
    let v = ScanVars::random(&c, 5);
    let t = |v: &Var| v.as_tensor().detach();
    let args = [
        t(&v.u),
        t(&v.delta),
        t(&v.a),
        t(&v.bm),
        t(&v.cm),
        t(&v.d),
        t(&v.bias),
        t(v.z.as_ref().unwrap()),
    ];
    let run = |dt: DType| {
        let a: Vec<Tensor> = args.iter().map(|x| x.to_dtype(dt).unwrap()).collect();
        kernels::selective_scan(
            &a[0],
            &a[1],
            &a[2],
            &a[3],
            &a[4],
            &a[5],
            &a[6],
            Some(&a[7]),
            None,
            false,
        )
        .unwrap()
    };
    let (y32, s32) = run(DType::F32);
    let (y64, s64) = run(DType::F64);
    assert_eq!(y64.dtype(), DType::F64);
    assert_eq!(s64.dtype(), DType::F32);
    assert_close(
        "f64 y",
        &y64,
        &y32,
        Tol {
            atol: 0.0,
            rtol: 0.0,
            rel_l2: None,
        },
    );
    assert_close(
        "f64 state",
        &s64,
        &s32,
        Tol {
            atol: 0.0,
            rtol: 0.0,
            rel_l2: None,
        },
    );
    let (y16, _) = run(DType::BF16);
    assert_eq!(y16.dtype(), DType::BF16);
    // bf16 inputs and output carry ~3 significant digits, so only a coarse match is expected.
    let scale = values(&y32).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(
        "bf16 y",
        &y16,
        &y32,
        Tol {
            atol: 0.05 * scale,
            rtol: 0.05,
            rel_l2: Some(0.03),
        },
    );
}

#[test]
fn empty_sequence_returns_the_initial_state() {
    let c = ScanCase {
        b: 2,
        l: 0,
        e: 5,
        n: 3,
        z: true,
        s0: true,
    };
    let v = ScanVars::random(&c, 9);
    let (y, last) = kernels::selective_scan(
        &v.u,
        &v.delta,
        &v.a,
        &v.bm,
        &v.cm,
        &v.d,
        &v.bias,
        v.z.as_ref().map(|z| z.as_tensor()),
        v.s0.as_ref().map(|s| s.as_tensor()),
        false,
    )
    .unwrap();
    assert_eq!(y.dims(), &[2, 0, 5]);
    let (y_ref, _, _) = v.run(REFERENCE.scan);
    assert_eq!(y_ref.dims(), &[2, 0, 5]);
    let exact = Tol {
        atol: 0.0,
        rtol: 0.0,
        rel_l2: None,
    };
    assert_close("state", &last, v.s0.as_ref().unwrap().as_tensor(), exact);
    let x = Tensor::zeros((2, 0, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        kernels::causal_conv1d_silu(&x, &w, &b, None, false)
            .unwrap()
            .dims(),
        &[2, 0, 5]
    );
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shape_mismatches_are_errors_naming_the_tensor() {
    let c = ScanCase {
        b: 2,
        l: 6,
        e: 5,
        n: 3,
        z: true,
        s0: false,
    };
    let v = ScanVars::random(&c, 3);
    let t = |v: &Var| v.as_tensor().detach();
    let (u, delta, a, bm, cm, d, bias) = (
        t(&v.u),
        t(&v.delta),
        t(&v.a),
        t(&v.bm),
        t(&v.cm),
        t(&v.d),
        t(&v.bias),
    );
    let z = t(v.z.as_ref().unwrap());
    let scan = |u: &Tensor, bm: &Tensor, z: &Tensor, s0: Option<&Tensor>| {
        kernels::selective_scan(u, &delta, &a, bm, &cm, &d, &bias, Some(z), s0, false)
    };
    let msg = err_text(scan(&u, &bm.narrow(2, 0, 2).unwrap(), &z, None));
    assert!(
        msg.contains("B has shape [2, 6, 2]") && msg.contains("[2, 6, 3]"),
        "{msg}"
    );
    let msg = err_text(scan(&u.flatten_all().unwrap(), &bm, &z, None));
    assert!(msg.contains("u has shape"), "{msg}");
    let msg = err_text(scan(&u, &bm, &z.narrow(1, 0, 5).unwrap(), None));
    assert!(msg.contains("z has shape"), "{msg}");
    let bad_s0 = Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu).unwrap();
    let msg = err_text(scan(&u, &bm, &z, Some(&bad_s0)));
    assert!(msg.contains("initial_state has shape [2, 5, 4]"), "{msg}");

    let w = Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap();
    let msg = err_text(kernels::causal_conv1d_silu(
        &u,
        &w,
        &d.narrow(0, 0, 4).unwrap(),
        None,
        false,
    ));
    assert!(msg.contains("bias has shape [4]"), "{msg}");
    let hist = Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu).unwrap();
    let msg = err_text(kernels::causal_conv1d_silu(&u, &w, &d, Some(&hist), false));
    assert!(
        msg.contains("history has shape [2, 5, 4]") && msg.contains("[2, 5, 3]"),
        "{msg}"
    );

    let state = Tensor::zeros((2, 5, 3), DType::F32, &Device::Cpu).unwrap();
    let x = u.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let bt = bm.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let msg = err_text(kernels::selective_scan_step(
        &state,
        &x,
        &x,
        &a,
        &bt,
        &bt.narrow(1, 0, 1).unwrap(),
        &d,
        &bias,
        None,
    ));
    assert!(msg.contains("C has shape [2, 1]"), "{msg}");
    let msg = err_text(kernels::causal_conv1d_step(&state, &x, &w, &d));
    assert!(msg.contains("weight has shape [5, 4]"), "{msg}");
}
