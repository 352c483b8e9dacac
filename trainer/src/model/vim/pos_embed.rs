//! Resizing `pos_embed` to another image size (peft-spec §1.4; fixture `vim_posinterp`).
//!
//! - [`PosEmbedResize::ClsAware`] (default): take the class-token row out at its index, resize
//!   the `(gh, gw)` patch grid, put the row back at the new index. Non-square grids work.
//! - [`PosEmbedResize::Hustvl`]: hustvl's `vim/utils.py interpolate_pos_embed` as `main.py
//!   --finetune` runs it: keep row 0, treat rows 1..=M as an `int(√M)²` grid, resize to
//!   `int(√M')²`. With a middle class token this keeps patch 0's row in the cls slot and
//!   resizes the real cls row as a grid cell — reproduced on purpose, for parity with models
//!   fine-tuned that way. Square grids only.
//!
//! Both resize with PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`: cubic
//! convolution with A = −0.75, source coordinate `(dst + 0.5)·in/out − 0.5`, edge taps
//! clamped, no antialiasing.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{ClsPosition, cls_index};
use crate::error::{Error, Result};

/// How to resize `pos_embed` when the image size differs from the checkpoint's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosEmbedResize {
    #[default]
    ClsAware,
    Hustvl,
}

const A: f32 = -0.75;

fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// Source taps and weights for each of `out` positions resized from `inp`.
fn taps(inp: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|o| {
            // PyTorch computes the source coordinate in the input's dtype (f32 here).
            // (`guard_index_and_lambda`: the index is capped at the last one, t kept in [0, 1]).
            let real = scale * (o as f32 + 0.5) - 0.5;
            let i0 = (real.floor() as i64).min(inp as i64 - 1);
            let t = (real - i0 as f32).clamp(0.0, 1.0);
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let clamp = |k: i64| k.clamp(0, inp as i64 - 1) as usize;
            ([clamp(i0 - 1), clamp(i0), clamp(i0 + 1), clamp(i0 + 2)], w)
        })
        .collect()
}

/// Bicubic resize of a row-major `[gh·gw, D]` grid to `[nh·nw, D]`.
pub fn bicubic_resize(
    grid: &[f32],
    d: usize,
    (gh, gw): (usize, usize),
    (nh, nw): (usize, usize),
) -> Vec<f32> {
    if (gh, gw) == (nh, nw) {
        return grid.to_vec();
    }
    let ty = taps(gh, nh);
    let tx = taps(gw, nw);
    let mut out = vec![0f32; nh * nw * d];
    for (oy, (ys, wy)) in ty.iter().enumerate() {
        for (ox, (xs, wx)) in tx.iter().enumerate() {
            let dst = &mut out[(oy * nw + ox) * d..(oy * nw + ox + 1) * d];
            for ch in 0..d {
                // Along x within each of the four rows, then along y (PyTorch's order).
                let mut acc = 0f32;
                for (ky, &y) in ys.iter().enumerate() {
                    let row = |x: usize| grid[(y * gw + x) * d + ch];
                    let v = row(xs[0]) * wx[0]
                        + row(xs[1]) * wx[1]
                        + row(xs[2]) * wx[2]
                        + row(xs[3]) * wx[3];
                    acc += v * wy[ky];
                }
                dst[ch] = acc;
            }
        }
    }
    out
}

/// Resizes `pos` `[1, M+1, D]` (grid `from`) to the grid `to`.
pub fn resize_pos_embed(
    pos: &Tensor,
    from: (usize, usize),
    to: (usize, usize),
    cls: ClsPosition,
    mode: PosEmbedResize,
) -> Result<Tensor> {
    let (one, rows, d) = pos.dims3()?;
    let m = from.0 * from.1;
    if one != 1 || rows != m + 1 {
        return Err(Error::input(
            "pos_embed",
            format!(
                "shape {:?} does not fit a {}×{} grid plus the class token (expected [1, {}, {d}])",
                pos.dims(),
                from.0,
                from.1,
                m + 1
            ),
        ));
    }
    let m2 = to.0 * to.1;
    let dtype = pos.dtype();
    let v = pos.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let out = match mode {
        PosEmbedResize::ClsAware => {
            let ci = cls_index(cls, m);
            let cls_row = &v[ci * d..(ci + 1) * d];
            let mut grid = Vec::with_capacity(m * d);
            grid.extend_from_slice(&v[..ci * d]);
            grid.extend_from_slice(&v[(ci + 1) * d..]);
            let resized = bicubic_resize(&grid, d, from, to);
            let cj = cls_index(cls, m2);
            let mut out = Vec::with_capacity((m2 + 1) * d);
            out.extend_from_slice(&resized[..cj * d]);
            out.extend_from_slice(cls_row);
            out.extend_from_slice(&resized[cj * d..]);
            out
        }
        PosEmbedResize::Hustvl => {
            let old = (m as f64).sqrt() as usize;
            let new = (m2 as f64).sqrt() as usize;
            if old * old != m || new * new != m2 {
                return Err(Error::input(
                    "pos_embed",
                    format!(
                        "hustvl's interpolate_pos_embed resizes square grids only; \
                         {}×{} → {}×{} is not square (use the class-token-aware resize)",
                        from.0, from.1, to.0, to.1
                    ),
                ));
            }
            let mut out = Vec::with_capacity((m2 + 1) * d);
            out.extend_from_slice(&v[..d]);
            out.extend(bicubic_resize(&v[d..], d, (old, old), (new, new)));
            out
        }
    };
    Ok(Tensor::from_vec(out, (1, m2 + 1, d), pos.device())?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity_and_constant_stays_constant() {
        let g = vec![1.5f32; 4 * 3 * 2];
        assert_eq!(bicubic_resize(&g, 2, (4, 3), (4, 3)), g);
        let r = bicubic_resize(&g, 2, (4, 3), (7, 5));
        assert!(r.iter().all(|v| (v - 1.5).abs() < 1e-5), "{r:?}");
    }

    #[test]
    fn cls_aware_keeps_the_cls_row_and_hustvl_refuses_non_square() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // 3 × 5 grid, cls at 7; rows hold their own index so the cls row is recognisable.
        let d = 2;
        let v: Vec<f32> = (0..16 * d).map(|i| (i / d) as f32).collect();
        let pos = Tensor::from_vec(v, (1, 16, d), &dev)?;
        let out = resize_pos_embed(
            &pos,
            (3, 5),
            (4, 7),
            ClsPosition::Middle,
            PosEmbedResize::ClsAware,
        )?;
        assert_eq!(out.dims(), &[1, 29, d]);
        let cls = out.narrow(1, 14, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(cls, vec![7.0; d]);
        let e = resize_pos_embed(
            &pos,
            (3, 5),
            (4, 7),
            ClsPosition::Middle,
            PosEmbedResize::Hustvl,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("square"), "{e}");
        Ok(())
    }
}
