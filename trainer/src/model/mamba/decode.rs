//! Mamba-1's decode step through the fused layer kernel ([`kernels::decode`]): which layers
//! it applies to (see [`crate::model::fused`]), and the layer's tensors as the kernel's
//! slices.

use super::model::{MambaBlock, MambaMixer};
use crate::error::Result;
use crate::kernels::decode::{Dims, LayerWeights, layer_step};
use crate::model::cache::LayerCache;
use crate::model::fused::{self, Held, bias, opt};

/// Whether only the checkpoint's own, frozen weights act in this mixer.
fn plain(m: &MambaMixer) -> bool {
    m.hook.is_none()
        && fused::base_weights_only(m)
        && m.branch.x_proj.base().bias().is_none()
        && m.branch.dt_proj.base().bias().is_none()
}

/// Runs `block` on `h` (`[b, D]`, updated in place) through the fused kernel and stores its
/// new states in `lc`; `false` (and nothing changed) where the kernel does not apply.
pub(super) fn fused_layer(
    block: &MambaBlock,
    b: usize,
    dm: usize,
    h: &mut [f32],
    lc: &mut LayerCache,
) -> Result<bool> {
    let m = &block.mixer;
    if !plain(m) {
        return Ok(false);
    }
    let br = &m.branch;
    let (e, k) = (m.d_inner(), m.conv_kernel());
    let n = m.state_size()?;
    let r = br.dt_proj.base().in_features();
    if lc.conv.dims() != [b, e, k] || lc.ssm.dims() != [b, e, n] {
        return Ok(false);
    }
    let a = br.a_log.neg_exp()?;
    let eps = block.norm.eps() as f32;
    let new = {
        let held = [
            Held::new(block.norm.weight()),
            Held::new(m.in_proj.base().weight()),
            Held::new(br.conv_weight.base()),
            Held::new(br.x_proj.base().weight()),
            Held::new(br.dt_proj.base().weight()),
            Held::new(br.dt_bias.base()),
            Held::new(&a),
            Held::new(br.d.base()),
            Held::new(m.out_proj.base().weight()),
            Held::new(&lc.conv),
            Held::new(&lc.ssm),
        ];
        let biases = [
            opt(m.in_proj.base().bias()),
            opt(br.conv_bias.as_ref().map(|p| p.base())),
            opt(m.out_proj.base().bias()),
        ];
        let [norm, in_w, conv_w, x_w, dt_w, dt_b, a, d, out_w, conv, ssm] = &held;
        let [in_b, conv_b, out_b] = &biases;
        // A present bias that is not f32 of the right size rules the kernel out.
        let lw = (|| {
            Some(LayerWeights {
                norm: norm.f32(dm)?,
                eps,
                in_proj: in_w.weights(2 * e * dm)?,
                in_bias: bias(in_b, 2 * e)?,
                conv_w: conv_w.f32(e * k)?,
                conv_b: bias(conv_b, e)?,
                x_proj: x_w.weights((r + 2 * n) * e)?,
                dt_proj: dt_w.weights(e * r)?,
                dt_bias: dt_b.f32(e)?,
                a: a.f32(e * n)?,
                d: d.f32(e)?,
                out_proj: out_w.weights(dm * e)?,
                out_bias: bias(out_b, dm)?,
            })
        })();
        let (Some(lw), Some(conv), Some(ssm)) = (lw, conv.f32(b * e * k), ssm.f32(b * e * n))
        else {
            return Ok(false);
        };
        layer_step(&lw, Dims { b, dm, e, n, r, k }, h, conv, ssm)
    };
    fused::store_states(lc, new)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::mamba::checkpoint::Checkpoint;
    use crate::model::mamba::config::MambaConfig;
    use crate::model::mamba::init::random_tensors;

    #[test]
    fn fused_step_matches_block_step() {
        // Widths and state sizes off the SIMD width, with and without biases.
        let mut odd = MambaConfig::new(36, 2, 37);
        odd.state_size = 5;
        odd.use_bias = true;
        odd.intermediate_size = 76;
        let mut plain = MambaConfig::new(64, 2, 50);
        plain.use_conv_bias = false;
        plain.conv_kernel = 3;
        for cfg in [&odd, &plain] {
            let tensors = random_tensors(cfg, 11, &Device::Cpu).unwrap();
            fused::tests::check_fused_layers(cfg, tensors, fused_layer);
        }
    }

    #[test]
    fn adapted_layers_take_the_generic_step() {
        let cfg = MambaConfig::new(32, 1, 40);
        let model = Checkpoint::random(&cfg, 5, &Device::Cpu)
            .unwrap()
            .into_frozen()
            .unwrap();
        fused::tests::adapted_layer_is_not_fused(model, |m| &mut m.branch.d, fused_layer);
    }
}
