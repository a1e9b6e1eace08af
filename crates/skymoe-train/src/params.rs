//! Trainable parameters: one `Var` per checkpoint tensor, handed to the model builder.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use skymoe_model::error::{ModelError, Result};
use skymoe_model::layers::TensorLoader;
use skymoe_model::model::CheckpointLoader;
use skymoe_model::{CausalLm, Checkpoint, ModelConfig};

/// The trainable tensors of a model, by checkpoint name.
pub struct TrainableParams {
    /// Variables by checkpoint name (sorted).
    pub vars: BTreeMap<String, Var>,
}

impl TrainableParams {
    /// Variables initialised from a checkpoint's tensors (f32).
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let loader = CheckpointLoader::new(&ckpt.weights, device);
        let mut vars = BTreeMap::new();
        for spec in ckpt.config.param_specs() {
            let t = loader.tensor(&spec.name, &spec.shape)?;
            vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        Ok(TrainableParams { vars })
    }

    /// Build the model over these variables: its parameters are the variables themselves, so
    /// a backward pass from its outputs yields their gradients.
    pub fn model(&self, config: &ModelConfig, device: &Device) -> Result<CausalLm> {
        CausalLm::from_loader(config.clone(), self, device)
    }
}

impl TensorLoader for TrainableParams {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let v = self
            .vars
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if v.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: v.dims().to_vec(),
            });
        }
        Ok(v.as_tensor().clone())
    }

    fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}
