//! Every weight trainable: what pretraining from random init trains, saved as a model folder
//! (`config.json` + `model.safetensors`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::TrainError;
use super::engine::{TaskModel, Trainable};
use super::optim::ParamGroup;
use crate::model::{Checkpoint, MambaConfig, MambaForCausalLM};

/// A model whose every weight is a `Var`.
pub struct FullModel {
    model: MambaForCausalLM,
    varmap: VarMap,
    config: MambaConfig,
    weight_decay: f64,
}

impl FullModel {
    /// `weight_decay` applies to matrices (embedding, projections, conv weight); norms,
    /// biases, `A_log` and `D` are not decayed (peft-spec §2, §3.1).
    pub fn new(ck: Checkpoint, weight_decay: f64) -> Result<Self, TrainError> {
        let config = ck.config.clone();
        let (model, varmap) = ck.into_trainable()?;
        Ok(FullModel {
            model,
            varmap,
            config,
            weight_decay,
        })
    }

    pub fn config(&self) -> &MambaConfig {
        &self.config
    }

    /// Every weight under its HF name.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect())
    }

    fn sorted_vars(&self) -> Result<Vec<(String, Var)>, TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // A HashMap's order changes from run to run; the optimizer's must not.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}

/// Whether a weight is exempt from decay: norms, biases, A_log, D.
fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.ends_with("norm.weight")
        || name.ends_with("norm_f.weight")
        || name.ends_with(".A_log")
        || name.ends_with(".D")
}

impl Trainable for FullModel {
    fn task_model(&self) -> TaskModel<'_> {
        TaskModel::CausalLm(&self.model)
    }

    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        let (mut decay, mut rest) = (Vec::new(), Vec::new());
        for (name, var) in self.sorted_vars()? {
            if no_decay(&name) {
                rest.push((name, var));
            } else {
                decay.push((name, var));
            }
        }
        Ok(vec![
            ParamGroup {
                name: "full.decay".into(),
                params: decay,
                lr: None,
                weight_decay: self.weight_decay,
                decay_toward: None,
            },
            ParamGroup {
                name: "full.no_decay".into(),
                params: rest,
                lr: None,
                weight_decay: 0.0,
                decay_toward: None,
            },
        ])
    }

    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let cfg = dir.join("config.json");
        let json = serde_json::to_string_pretty(&self.config.to_hf_json())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        std::fs::write(&cfg, json + "\n").map_err(|e| TrainError::io(&cfg, e))?;
        let tensors = self.tensors()?;
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(())
    }
}
