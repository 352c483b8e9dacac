//! ProDiaL (spec §5): on in_proj and/or out_proj, W' = diag(s)·W·D_b + (α/r_ε)·B_ε·A_ε with
//! D_b = I − ReLU(Diag(D_a)) + OffDiag(D_a), D_a = blockdiag(X_1..X_{r_b}), blocks q = d_in/r_b
//! wide. Blocks start at zero, s at one, B_ε at zero, so W' = W at init.
//!
//! The diagonal: the official code's ReLU'(0) = 0 keeps diag(D_b) at exactly 1 for the
//! whole run (§5.1), so by default the diagonal is fixed at 1 (the blocks' stored diagonal
//! is masked out; its gradient is exactly 0). `"diagonal": "trainable"` is an opt-in
//! variant, not the reference: diag(D_b) = 1 + d, unconstrained, d starting at 0.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::lora::{LowRank, check_dropout, check_rank, check_scale};
use super::sites::{Dir, LinearPart, Proj, Sites, Stage};
use super::spec::{check_range, one_or_many};
use super::target::{ModelShape, PeftBase};
use super::{ParamGroup, ParamShape, Params, PeftMethod};

/// A projector ProDiaL can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProdialTarget {
    InProj,
    OutProj,
}

impl ProdialTarget {
    fn proj(self) -> Proj {
        match self {
            ProdialTarget::InProj => Proj::In,
            ProdialTarget::OutProj => Proj::Out,
        }
    }
}

const TARGETS: &[&str] = &["in_proj", "out_proj", "both"];

/// The block count r_b: one for every target, or per target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockCount {
    All(usize),
    PerTarget {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_proj: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        out_proj: Option<usize>,
    },
}

/// How diag(D_b) behaves; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Diagonal {
    Fixed,
    Trainable,
}

fn default_targets() -> Vec<String> {
    vec!["in_proj".into(), "out_proj".into()]
}
fn default_r_b() -> BlockCount {
    BlockCount::All(64)
}
fn default_r_eps() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_dropout() -> f64 {
    0.1
}
fn default_diagonal() -> Diagonal {
    Diagonal::Fixed
}
fn default_wd() -> f64 {
    0.01
}

/// `{"type": "prodial", "targets": ["in_proj", "out_proj"], "r_b": 64 | {"in_proj": 64,
/// "out_proj": 64}, "r_eps": 8, "alpha": 8, "dropout": 0.1}` (130m ARC settings; wd 0.01 as
/// the scripts, which also decay `s` toward 0 — set `s_decay_toward_one` to decay it toward 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProdialConfig {
    #[serde(
        default = "default_targets",
        alias = "target",
        deserialize_with = "one_or_many"
    )]
    pub targets: Vec<String>,
    #[serde(default = "default_r_b")]
    pub r_b: BlockCount,
    #[serde(default = "default_r_eps")]
    pub r_eps: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_diagonal")]
    pub diagonal: Diagonal,
    #[serde(default)]
    pub s_decay_toward_one: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
}

impl ProdialConfig {
    pub fn new(targets: &[&str], r_b: BlockCount, r_eps: usize, alpha: f64) -> Self {
        ProdialConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            r_b,
            r_eps,
            alpha,
            dropout: default_dropout(),
            diagonal: Diagonal::Fixed,
            s_decay_toward_one: false,
            lr: None,
            weight_decay: default_wd(),
        }
    }

    fn parsed_targets(&self) -> PeftResult<Vec<ProdialTarget>> {
        let mut out = Vec::new();
        for t in &self.targets {
            let add: &[ProdialTarget] = match t.as_str() {
                "in_proj" => &[ProdialTarget::InProj],
                "out_proj" => &[ProdialTarget::OutProj],
                "both" => &[ProdialTarget::InProj, ProdialTarget::OutProj],
                _ => {
                    return Err(PeftError::UnknownTarget {
                        method: "prodial".into(),
                        target: t.clone(),
                        valid: TARGETS.iter().map(|s| s.to_string()).collect(),
                    });
                }
            };
            for a in add {
                if out.contains(a) {
                    return Err(PeftError::Contradictory(format!(
                        "prodial: target `{}` listed twice",
                        a.proj().name()
                    )));
                }
                out.push(*a);
            }
        }
        if out.is_empty() {
            return Err(PeftError::UnknownTarget {
                method: "prodial".into(),
                target: "(none)".into(),
                valid: TARGETS.iter().map(|s| s.to_string()).collect(),
            });
        }
        Ok(out)
    }

    fn blocks(&self, t: ProdialTarget) -> PeftResult<usize> {
        match (&self.r_b, t) {
            (BlockCount::All(n), _) => Ok(*n),
            (
                BlockCount::PerTarget {
                    in_proj: Some(n), ..
                },
                ProdialTarget::InProj,
            )
            | (
                BlockCount::PerTarget {
                    out_proj: Some(n), ..
                },
                ProdialTarget::OutProj,
            ) => Ok(*n),
            (BlockCount::PerTarget { .. }, _) => Err(PeftError::config(
                "prodial",
                format!("`r_b` gives no block count for {}", t.proj().name()),
            )),
        }
    }

    pub fn lora_scaling(&self) -> f64 {
        self.alpha / self.r_eps.max(1) as f64
    }
}

fn names(p: Proj, i: usize) -> [String; 4] {
    let pre = format!("layers.{i}.{}.prodial", p.name());
    [
        format!("{pre}.blocks"),
        format!("{pre}.s"),
        format!("{pre}.lora_A"),
        format!("{pre}.lora_B"),
    ]
}

/// A few divisors of `n`, for the error message.
fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n.is_multiple_of(*k))
        .map(|k| k.to_string())
        .collect();
    if d.len() > 12 {
        format!("{} ... {}", d[..6].join(", "), d[d.len() - 3..].join(", "))
    } else {
        d.join(", ")
    }
}

impl PeftMethod for ProdialConfig {
    fn kind(&self) -> &'static str {
        "prodial"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        for t in self.parsed_targets()? {
            let p = t.proj();
            let (d_out, d_in) = p.shape(cfg);
            let r_b = self.blocks(t)?;
            check_range("prodial", "r_b", p.name(), r_b, 1, d_in)?;
            if !d_in.is_multiple_of(r_b) {
                return Err(PeftError::BlocksDoNotDivide {
                    target: p.name().into(),
                    r_b,
                    d_in,
                    examples: divisors(d_in),
                });
            }
            check_rank("prodial", p.name(), self.r_eps, d_out, d_in)?;
        }
        if let BlockCount::PerTarget { in_proj, out_proj } = &self.r_b {
            let targets = self.parsed_targets()?;
            for (given, t) in [
                (in_proj, ProdialTarget::InProj),
                (out_proj, ProdialTarget::OutProj),
            ] {
                if given.is_some() && !targets.contains(&t) {
                    return Err(PeftError::Contradictory(format!(
                        "prodial: `r_b` sets {} but it is not a target",
                        t.proj().name()
                    )));
                }
            }
        }
        check_scale("prodial", "alpha", self.alpha)?;
        check_dropout("prodial", self.dropout)
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(targets) = self.parsed_targets() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in targets {
            let p = t.proj();
            let (d_out, d_in) = p.shape(cfg);
            let r_b = self.blocks(t).unwrap_or(1).max(1);
            let q = d_in / r_b;
            for i in 0..cfg.num_hidden_layers {
                let [b, s, la, lb] = names(p, i);
                out.push((b, vec![r_b, q, q]));
                out.push((s, vec![d_out]));
                out.push((la, vec![self.r_eps, d_in]));
                out.push((lb, vec![d_out, self.r_eps]));
            }
        }
        out
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.parameters(&base.peft_shape())
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with(".s") {
                    rng.ones(&shape)?
                } else if name.ends_with("lora_A") {
                    let fan_in = shape.get(1).copied().unwrap_or(1);
                    rng.kaiming_uniform(&name, &shape, fan_in)?
                } else {
                    rng.zeros(&shape)?
                };
                Ok((name, t))
            })
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let cfg = sites.config().clone();
        for t in self.parsed_targets()? {
            let p = t.proj();
            let (d_out, _) = p.shape(&cfg);
            for i in 0..cfg.num_hidden_layers {
                let [b, s, la, lb] = names(p, i);
                // in_proj and out_proj are shared by the scan directions: one instance.
                sites.add_linear(
                    i,
                    p,
                    Dir::Fwd,
                    Arc::new(DiagBlocks {
                        blocks: params.get(&b)?,
                        s: params.get(&s)?,
                        diagonal: self.diagonal,
                    }),
                );
                sites.add_linear(
                    i,
                    p,
                    Dir::Fwd,
                    Arc::new(LowRank {
                        a: params.get(&la)?,
                        b: params.get(&lb)?,
                        scale: self.lora_scaling(),
                        dropout: self.dropout,
                        rows: (0, d_out, d_out),
                    }),
                );
            }
        }
        Ok(())
    }

    fn groups(
        &self,
        index: usize,
        params: Vec<(String, Var)>,
        _base: &dyn PeftBase,
    ) -> PeftResult<Vec<ParamGroup>> {
        if !self.s_decay_toward_one {
            return Ok(vec![ParamGroup {
                name: format!("{index}:prodial"),
                params,
                lr: self.lr,
                weight_decay: self.weight_decay,
                decay_toward: None,
            }]);
        }
        let (s, rest): (Vec<_>, Vec<_>) = params.into_iter().partition(|(n, _)| n.ends_with(".s"));
        let ones = s
            .iter()
            .map(|(_, v)| v.as_tensor().ones_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(vec![
            ParamGroup {
                name: format!("{index}:prodial"),
                params: rest,
                lr: self.lr,
                weight_decay: self.weight_decay,
                decay_toward: None,
            },
            ParamGroup {
                name: format!("{index}:prodial.s"),
                params: s,
                lr: self.lr,
                weight_decay: self.weight_decay,
                decay_toward: Some(ones),
            },
        ])
    }
}

/// W → diag(s)·W·D_b.
#[derive(Debug)]
struct DiagBlocks {
    blocks: Tensor,
    s: Tensor,
    diagonal: Diagonal,
}

impl LinearPart for DiagBlocks {
    fn stage(&self) -> Stage {
        Stage::Transform
    }

    fn weight(&self, w: &Tensor) -> Result<Tensor> {
        let (o, i) = w.dims2()?;
        let (r_b, q, _) = self.blocks.dims3()?;
        let dev = w.device();
        let eye = Tensor::eye(q, DType::F32, dev)?;
        let blocks = self.blocks.to_dtype(DType::F32)?;
        let db = match self.diagonal {
            // Masking (not zeroing) keeps the stored diagonal's gradient exactly 0.
            Diagonal::Fixed => {
                let off = (Tensor::ones((q, q), DType::F32, dev)? - &eye)?;
                blocks.broadcast_mul(&off)?.broadcast_add(&eye)?
            }
            Diagonal::Trainable => blocks.broadcast_add(&eye)?,
        };
        let wb = w
            .to_dtype(DType::F32)?
            .reshape((o, r_b, q))?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&db)?
            .transpose(0, 1)?
            .reshape((o, i))?;
        let scaled = wb.broadcast_mul(&self.s.to_dtype(DType::F32)?.unsqueeze(1)?)?;
        scaled.to_dtype(w.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(diagonal: Diagonal) -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3., 4.], [0.5, -1., 2., 0.]], &dev)?;
        let blocks = Var::zeros((2, 2, 2), DType::F32, &dev)?;
        let s = Var::ones(2, DType::F32, &dev)?;
        let part = DiagBlocks {
            blocks: blocks.as_tensor().clone(),
            s: s.as_tensor().clone(),
            diagonal,
        };
        let w2 = part.weight(&w)?;
        // W' = W at init.
        assert_eq!(w2.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        let g = (w2 * Tensor::new(&[[1f32, -2., 3., 1.], [2., 1., -1., 0.5]], &dev)?)?
            .sum_all()?
            .backward()?;
        let gb = g
            .get(blocks.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient for the blocks".into()))?;
        let mask = Tensor::eye(2, DType::F32, &dev)?
            .unsqueeze(0)?
            .broadcast_as((2, 2, 2))?;
        Ok(((gb.clone() * &mask)?, (gb * (1.0 - mask)?)?))
    }

    #[test]
    fn diagonal_is_fixed_unless_opted_in() -> Result<()> {
        let (diag, off) = grads(Diagonal::Fixed)?;
        assert_eq!(diag.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        assert!(off.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        let (diag, _) = grads(Diagonal::Trainable)?;
        assert!(diag.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn block_orientation_matches_the_reference_formula() -> Result<()> {
        // D_b[j·q+a, j·q+b] = blocks[j, a, b] (a ≠ b): W·D_b mixes input columns in a block.
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 10., 100., 1000.]], &dev)?;
        let blocks = Tensor::new(&[[[0f32, 0.5], [0., 0.]], [[0., 0.], [2., 0.]]], &dev)?;
        let part = DiagBlocks {
            blocks,
            s: Tensor::new(&[3f32], &dev)?,
            diagonal: Diagonal::Fixed,
        };
        let got = part.weight(&w)?.to_vec2::<f32>()?;
        // Column 1 = w0·0.5 + w1; column 2 = w2 + w3·2; then ×3.
        assert_eq!(got, vec![vec![3., 3. * 10.5, 3. * 2100., 3000.]]);
        Ok(())
    }
}
