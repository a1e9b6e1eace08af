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
        // Selection biases (aux-loss-free balancing), when the checkpoint has them: state the
        // trainer updates outside the optimiser.
        for name in selection_bias_names(&ckpt.config) {
            if loader.contains(&name) {
                let e = ckpt.config.moe.as_ref().map_or(0, |m| m.num_experts);
                let t = loader
                    .tensor(&name, &[e])?
                    .to_dtype(candle_core::DType::F32)?;
                vars.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(TrainableParams { vars })
    }

    /// Add a zero selection bias (`…gate.e_score_correction_bias`, f32 `[experts]`) to every
    /// MoE layer that has none.
    pub fn add_selection_biases(&mut self, config: &ModelConfig, device: &Device) -> Result<()> {
        let e = config.moe.as_ref().map_or(0, |m| m.num_experts);
        for name in selection_bias_names(config) {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.vars.entry(name) {
                let t = Tensor::zeros(e, candle_core::DType::F32, device)?;
                slot.insert(Var::from_tensor(&t)?);
            }
        }
        Ok(())
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

/// The checkpoint names of the selection biases of the MoE layers of `config`.
pub fn selection_bias_names(config: &ModelConfig) -> Vec<String> {
    (0..config.num_hidden_layers)
        .filter(|&l| config.is_moe_layer(l))
        .map(|l| skymoe_model::layers::router::selection_bias_name(&config.moe_names(l).gate))
        .collect()
}

/// Gaussian samples from a seeded generator (Box–Muller), so initialisation is reproducible.
pub(crate) fn normal_samples(n: usize, std: f64, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl TrainableParams {
    /// Fresh parameters: norms at one, everything else normal(0, `std`), output projections
    /// (`o_proj`, `down_proj`/`w2`) scaled by `1/sqrt(2·layers)` as in GPT-2; reproducible from `seed`.
    pub fn random(config: &ModelConfig, std: f64, seed: u64, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        let depth_scale = 1.0 / (2.0 * config.num_hidden_layers.max(1) as f64).sqrt();
        for spec in config.param_specs() {
            let n = spec.numel();
            let data = if spec.name.ends_with("norm.weight") {
                vec![1.0f32; n]
            } else if spec.name.ends_with(".bias") {
                vec![0.0f32; n]
            } else {
                let out_proj = spec.name.contains("o_proj")
                    || spec.name.contains("down_proj")
                    || spec.name.ends_with("w2.weight");
                normal_samples(n, if out_proj { std * depth_scale } else { std }, &mut rng)
            };
            let t = Tensor::from_vec(data, spec.shape.clone(), device)?;
            vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        Ok(TrainableParams { vars })
    }

    /// The current values as plain tensors (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }
}
