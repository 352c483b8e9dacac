//! Mamba-2's kernels — the SSD scan (with every gradient), its cached decode step and the
//! grouped gated RMSNorm — against HF transformers' pure-PyTorch ops on every Mamba-2 `ops`
//! case (`tests/fixtures/mamba2/`, walked by index; shapes, the dt limit, the group count and
//! tolerances from each manifest), and the fused CPU scan against the plain-op reference on
//! random inputs over many shapes.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use trainer::kernels;
use trainer::model::Family;

use common::{Tol, assert_close};

struct Ops {
    label: String,
    manifest: Value,
    t: HashMap<String, Tensor>,
}

impl Ops {
    fn get(&self, name: &str) -> Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("{}: no `{name}`", self.label))
            .clone()
    }

    fn check(&self, what: &str, got: &Tensor, name: &str) {
        let (d, _) = assert_close(
            &format!("{} {what}", self.label),
            got,
            &self.get(name),
            Tol::for_tensor(&self.manifest, name),
        );
        eprintln!("{}: {what} max abs diff {d:.3e}", self.label);
    }

    /// `[lo, hi]` from the manifest (`"inf"` for +inf).
    fn dt_limit(&self) -> (f64, f64) {
        let v = &self.manifest["dt_limit"];
        let num = |x: &Value| match x {
            Value::String(s) if s == "inf" => f64::INFINITY,
            other => other.as_f64().expect("dt_limit entry"),
        };
        (num(&v[0]), num(&v[1]))
    }

    /// G, from the manifest's `shapes` (the key carries its symbol, `n_groups(G)`).
    fn groups(&self) -> usize {
        let shapes = self.manifest["shapes"].as_object().expect("shapes");
        shapes
            .iter()
            .find(|(k, _)| k.starts_with("n_groups"))
            .and_then(|(_, v)| v.as_u64())
            .expect("n_groups in shapes") as usize
    }

    /// The gated norm's eps as the notes state it (`eps=…`), else HF's default 1e-5.
    fn gnorm_eps(&self) -> f64 {
        self.manifest["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|n| {
                let rest = &n[n.find("eps=")? + 4..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || "e-+.".contains(c)))
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
            .unwrap_or(1e-5)
    }
}

fn ops_cases() -> Vec<Ops> {
    common::indexed_cases(Family::Mamba2, "ops")
        .into_iter()
        .map(|c| Ops {
            t: candle_core::safetensors::load(c.dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors"),
            manifest: c.manifest(),
            label: c.label,
        })
        .collect()
}

fn var(t: Tensor) -> Var {
    Var::from_tensor(&t).expect("var")
}

#[test]
fn ssd_scan_step_and_gated_norm_match_hf() {
    for case in ops_cases() {
        let limit = case.dt_limit();
        let names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"];
        let vars: Vec<Var> = names
            .iter()
            .map(|n| var(case.get(&format!("op.scan.in.{n}"))))
            .collect();
        let v = |i: usize| vars[i].as_tensor();
        let (y, last) =
            kernels::ssd_scan(v(0), v(1), v(2), v(3), v(4), v(5), v(6), limit, Some(v(7)))
                .expect("scan");
        case.check("scan y", &y, "op.scan.out.y");
        case.check("scan final state", &last, "op.scan.out.final_state");
        let grads = (y * case.get("op.scan.upstream.y"))
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        for (i, n) in names.iter().enumerate() {
            let g = grads
                .get(v(i))
                .unwrap_or_else(|| panic!("{}: no gradient for {n}", case.label));
            case.check(&format!("scan grad {n}"), g, &format!("op.scan.grad.{n}"));
        }

        let (y0, last0) = kernels::ssd_scan(v(0), v(1), v(2), v(3), v(4), v(5), v(6), limit, None)
            .expect("scan0");
        case.check("scan0 y", &y0, "op.scan0.out.y");
        case.check("scan0 final state", &last0, "op.scan0.out.final_state");

        let step = |n: &str| case.get(&format!("op.step.in.{n}"));
        let (ys, state) = kernels::ssd_step(
            &step("state"),
            &step("x"),
            &step("dt"),
            v(2),
            &step("B"),
            &step("C"),
            v(5),
            v(6),
        )
        .expect("step");
        case.check("step y", &ys, "op.step.out.y");
        case.check("step state", &state, "op.step.out.state");

        let g = |n: &str| var(case.get(&format!("op.gnorm.in.{n}")));
        let (gy, gz, gw) = (g("y"), g("z"), g("weight"));
        let out = kernels::gated_rms_norm(
            gy.as_tensor(),
            gz.as_tensor(),
            gw.as_tensor(),
            case.groups(),
            case.gnorm_eps(),
        )
        .expect("gated norm");
        case.check("gated norm", &out, "op.gnorm.out.y");
        let grads = (out * case.get("op.gnorm.upstream.y"))
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        for (v, n) in [(&gy, "y"), (&gz, "z"), (&gw, "weight")] {
            let got = grads.get(v.as_tensor()).expect("gradient");
            case.check(
                &format!("gated norm grad {n}"),
                got,
                &format!("op.gnorm.grad.{n}"),
            );
        }
    }
}

/// The scan refuses inputs that do not fit together, naming them.
#[test]
fn ssd_scan_names_bad_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).expect("zeros");
    let (b, l, h, p, g, n) = (1, 5, 4, 2, 3, 2);
    let e = kernels::ssd_scan(
        &z(&[b, l, h, p]),
        &z(&[b, l, h]),
        &z(&[h]),
        &z(&[b, l, g, n]),
        &z(&[b, l, g, n]),
        &z(&[h]),
        &z(&[h]),
        (0.0, f64::INFINITY),
        None,
    )
    .expect_err("3 groups cannot share 4 heads")
    .to_string();
    assert!(e.contains("groups") && e.contains("heads"), "{e}");
    let e = kernels::ssd_scan(
        &z(&[b, l, h, p]),
        &z(&[b, l + 1, h]),
        &z(&[h]),
        &z(&[b, l, 1, n]),
        &z(&[b, l, 1, n]),
        &z(&[h]),
        &z(&[h]),
        (0.0, f64::INFINITY),
        None,
    )
    .expect_err("dt of another length")
    .to_string();
    assert!(e.contains("dt"), "{e}");
}

/// Deterministic uniform values in `[lo, hi)` (a 64-bit LCG), as a tensor of `shape`.
fn uniform(seed: &mut u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((*seed >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// The fused CPU scan equals the plain-op reference — output, last state and the gradient of
/// every input — over shapes that cross the kernel's 64-step chunks (lengths not a multiple
/// of any chunk), several groups, heads and head dims, a clamped and an unclamped dt, with
/// and without an initial state.
#[test]
fn fused_ssd_scan_equals_the_reference_on_many_shapes() {
    let mut seed = 7u64;
    // (batch, length, heads, head dim, groups, state, dt limit, initial state)
    let inf = f64::INFINITY;
    let cases = [
        (2, 19, 4, 8, 1, 8, (0.0, inf), true),
        (1, 130, 6, 4, 3, 5, (0.0, inf), false),
        (2, 65, 4, 3, 2, 16, (0.02, 0.3), true),
        (1, 200, 2, 16, 1, 12, (0.0, 0.1), false),
        (3, 1, 2, 2, 2, 3, (0.0, inf), true),
    ];
    for (b, l, h, p, g, n, limit, with_s0) in cases {
        let what = format!("b{b} L{l} H{h} P{p} G{g} N{n} limit {limit:?} s0 {with_s0}");
        let vars = [
            var(uniform(&mut seed, &[b, l, h, p], -1.0, 1.0)),
            var(uniform(&mut seed, &[b, l, h], -3.0, 1.0)),
            var(uniform(&mut seed, &[h], -2.0, -0.1)),
            var(uniform(&mut seed, &[b, l, g, n], -1.0, 1.0)),
            var(uniform(&mut seed, &[b, l, g, n], -1.0, 1.0)),
            var(uniform(&mut seed, &[h], -1.0, 1.0)),
            var(uniform(&mut seed, &[h], -1.0, 1.0)),
            var(uniform(&mut seed, &[b, h, p, n], -0.5, 0.5)),
        ];
        let up = uniform(&mut seed, &[b, l, h, p], -1.0, 1.0);
        let t = |i: usize| vars[i].as_tensor();
        let s0 = with_s0.then(|| t(7));
        let fused =
            kernels::ssd_scan(t(0), t(1), t(2), t(3), t(4), t(5), t(6), limit, s0).expect("fused");
        let plain =
            kernels::reference::ssd_scan(t(0), t(1), t(2), t(3), t(4), t(5), t(6), limit, s0)
                .expect("reference");
        let tol = Tol {
            atol: 2e-5,
            rtol: 1e-4,
            rel_l2: None,
        };
        assert_close(&format!("{what}: y"), &fused.0, &plain.0, tol);
        assert_close(&format!("{what}: last state"), &fused.1, &plain.1, tol);
        let grads = |y: &Tensor| {
            (y * &up)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward")
        };
        let (gf, gp) = (grads(&fused.0), grads(&plain.0));
        let names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"];
        let grad_tol = Tol {
            atol: 1e-4,
            rtol: 1e-3,
            rel_l2: Some(1e-4),
        };
        for (i, name) in names.iter().enumerate() {
            if i == 7 && !with_s0 {
                continue;
            }
            let (Some(f), Some(r)) = (gf.get(t(i)), gp.get(t(i))) else {
                panic!("{what}: no gradient for {name}");
            };
            assert_close(&format!("{what}: grad {name}"), f, r, grad_tol);
        }
    }
}

/// The fused decode step equals the plain-op reference step over several shapes (groups,
/// head dims, state sizes not a multiple of the SIMD width), large dt included (softplus's
/// linear branch).
#[test]
fn fused_ssd_step_equals_the_reference() {
    let mut seed = 11u64;
    for (b, h, p, g, n) in [(2, 4, 8, 1, 8), (3, 6, 5, 3, 13), (1, 2, 16, 2, 128)] {
        let t = |seed: &mut u64, shape: &[usize], lo, hi| uniform(seed, shape, lo, hi);
        let state = t(&mut seed, &[b, h, p, n], -1.0, 1.0);
        let x = t(&mut seed, &[b, h, p], -1.0, 1.0);
        let dt = t(&mut seed, &[b, h], -4.0, 24.0);
        let a = t(&mut seed, &[h], -2.0, -0.1);
        let bm = t(&mut seed, &[b, g, n], -1.0, 1.0);
        let cm = t(&mut seed, &[b, g, n], -1.0, 1.0);
        let d = t(&mut seed, &[h], -1.0, 1.0);
        let bias = t(&mut seed, &[h], -1.0, 1.0);
        let fused = kernels::ssd_step(&state, &x, &dt, &a, &bm, &cm, &d, &bias).expect("fused");
        let plain = kernels::reference::ssd_step(&state, &x, &dt, &a, &bm, &cm, &d, &bias)
            .expect("reference");
        let tol = Tol {
            atol: 1e-5,
            rtol: 1e-5,
            rel_l2: None,
        };
        let what = format!("b{b} H{h} P{p} G{g} N{n}");
        assert_close(&format!("{what}: y"), &fused.0, &plain.0, tol);
        assert_close(&format!("{what}: state"), &fused.1, &plain.1, tol);
    }
}
