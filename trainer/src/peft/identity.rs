//! The base-model identity stored with an adapter: a hash of the config's structural fields
//! and the weights' names and shapes. Two checkpoints of one architecture share it (an
//! adapter trained on one loads on a re-save of it); any change of shape does not.

use sha2::{Digest, Sha256};

use super::target::PeftBase;
use crate::model::MambaConfig;

/// `sha256:` + hex of the config's shape fields (`description`, see `describe`) and every
/// `(name, shape)`, sorted by name.
pub fn model_identity(description: &str, shapes: &[(String, Vec<usize>)]) -> String {
    let mut h = Sha256::new();
    h.update(description.as_bytes());
    let mut sorted: Vec<&(String, Vec<usize>)> = shapes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape) in sorted {
        h.update(format!("\n{name}:{shape:?}").as_bytes());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The identity of a loaded model (its base weights, adapters ignored).
pub fn base_identity(model: &(impl PeftBase + ?Sized)) -> String {
    let shapes: Vec<(String, Vec<usize>)> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    model_identity(&model.peft_shape().description, &shapes)
}

/// The config fields that fix the shapes and the function, in a readable form (also shown
/// in the "adapter is for another base model" error).
pub fn describe(cfg: &MambaConfig) -> String {
    format!(
        "mamba1 hidden_size={} num_hidden_layers={} vocab_size={} state_size={} conv_kernel={} \
         intermediate_size={} time_step_rank={} use_bias={} use_conv_bias={} tied={}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.state_size,
        cfg.conv_kernel,
        cfg.intermediate_size,
        cfg.time_step_rank,
        cfg.use_bias,
        cfg.use_conv_bias,
        cfg.tie_word_embeddings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_with_shapes_not_order() {
        let cfg = MambaConfig::new(64, 2, 512);
        let a = vec![("x".to_string(), vec![2, 3]), ("y".to_string(), vec![4])];
        let b = vec![("y".to_string(), vec![4]), ("x".to_string(), vec![2, 3])];
        let id = |cfg: &MambaConfig, s| model_identity(&describe(cfg), s);
        assert_eq!(id(&cfg, &a), id(&cfg, &b));
        let c = vec![("x".to_string(), vec![2, 4]), ("y".to_string(), vec![4])];
        assert_ne!(id(&cfg, &a), id(&cfg, &c));
        let mut cfg2 = cfg.clone();
        cfg2.state_size = 8;
        assert_ne!(id(&cfg, &a), id(&cfg2, &a));
    }
}
