//! Mamba-2's decode step through the fused layer kernel ([`kernels::decode_ssd`]): which
//! layers it applies to (see [`crate::model::fused`]), and the layer's tensors as the
//! kernel's slices.

use super::model::Mamba2Block;
use crate::error::Result;
use crate::kernels::decode_ssd::{SsdDims, SsdLayerWeights, layer_step};
use crate::model::cache::LayerCache;
use crate::model::fused::{self, Held, bias, opt};

/// Runs `block` on `h` (`[b, D]`, updated in place) through the fused kernel and stores its
/// new states in `lc`; `false` (and nothing changed) where the kernel does not apply.
pub(super) fn fused_layer(
    block: &Mamba2Block,
    b: usize,
    dm: usize,
    h: &mut [f32],
    lc: &mut LayerCache,
) -> Result<bool> {
    let m = &block.mixer;
    let md = m.dims;
    let dims = SsdDims {
        b,
        dm,
        h: md.heads,
        p: md.head_dim,
        g: md.groups,
        n: md.state,
        k: md.conv_kernel,
    };
    let (e, c, d_in) = (dims.e(), dims.conv_dim(), dims.d_in());
    let shapes_ok = e > 0
        && dims.g > 0
        && dims.h.is_multiple_of(dims.g)
        && lc.conv.dims() == [b, c, dims.k]
        && lc.ssm.dims() == [b, dims.h, dims.p, dims.n];
    if !shapes_ok || !fused::base_weights_only(m) {
        return Ok(false);
    }
    let a = m.a_log.neg_exp()?;
    let new = {
        let held = [
            Held::new(block.norm.weight()),
            Held::new(m.in_proj.base().weight()),
            Held::new(m.conv_weight.base()),
            Held::new(m.dt_bias.base()),
            Held::new(&a),
            Held::new(m.d.base()),
            Held::new(m.norm.base()),
            Held::new(m.out_proj.base().weight()),
            Held::new(&lc.conv),
            Held::new(&lc.ssm),
        ];
        let biases = [
            opt(m.in_proj.base().bias()),
            opt(m.conv_bias.as_ref().map(|p| p.base())),
            opt(m.out_proj.base().bias()),
        ];
        let [norm, in_w, conv_w, dt_b, a, d, gate_norm, out_w, conv, ssm] = &held;
        let [in_b, conv_b, out_b] = &biases;
        // A present bias that is not f32 of the right size rules the kernel out.
        let lw = (|| {
            Some(SsdLayerWeights {
                norm: norm.f32(dm)?,
                eps: block.norm.eps() as f32,
                in_proj: in_w.weights(d_in * dm)?,
                in_bias: bias(in_b, d_in)?,
                conv_w: conv_w.f32(c * dims.k)?,
                conv_b: bias(conv_b, c)?,
                dt_bias: dt_b.f32(dims.h)?,
                a: a.f32(dims.h)?,
                d: d.f32(dims.h)?,
                gate_norm: gate_norm.f32(e)?,
                gate_eps: md.eps as f32,
                out_proj: out_w.weights(dm * e)?,
                out_bias: bias(out_b, dm)?,
            })
        })();
        let ssm_len = b * e * dims.n;
        let (Some(lw), Some(conv), Some(ssm)) = (lw, conv.f32(b * c * dims.k), ssm.f32(ssm_len))
        else {
            return Ok(false);
        };
        layer_step(&lw, dims, h, conv, ssm)
    };
    fused::store_states(lc, new)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::mamba2::checkpoint::Mamba2Checkpoint;
    use crate::model::mamba2::config::Mamba2Config;
    use crate::model::mamba2::init::random_tensors;

    #[test]
    fn fused_step_matches_block_step() {
        // Head dims, state sizes and widths off the SIMD width, several groups, with and
        // without biases.
        let mut odd = Mamba2Config::new(30, 2, 37);
        odd.num_heads = 6;
        odd.head_dim = 5;
        odd.expand = 1;
        odd.state_size = 7;
        odd.n_groups = 3;
        odd.conv_kernel = 3;
        odd.use_bias = true;
        let mut plain = Mamba2Config::new(64, 2, 50);
        plain.use_conv_bias = false;
        for cfg in [&odd, &plain] {
            let tensors = random_tensors(cfg, 11, &Device::Cpu).unwrap();
            fused::tests::check_fused_layers(cfg, tensors, fused_layer);
        }
    }

    #[test]
    fn adapted_layers_take_the_generic_step() {
        let cfg = Mamba2Config::new(32, 1, 40);
        let model = Mamba2Checkpoint::random(&cfg, 5, &Device::Cpu)
            .unwrap()
            .into_frozen()
            .unwrap();
        fused::tests::adapted_layer_is_not_fused(model, |m| &mut m.d, fused_layer);
    }
}
