//! The loss of a token sequence and the gradient of every parameter.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use skymoe_model::error::{ModelError, Result};
use skymoe_model::ModelConfig;

use crate::loss::next_token_loss;
use crate::params::TrainableParams;

/// A loss value and the gradient of every parameter.
pub struct LossAndGrads {
    /// Mean next-token cross-entropy.
    pub loss: f32,
    /// Gradient of each parameter by checkpoint name (zeros for parameters the loss does not
    /// reach, e.g. experts no token was routed to).
    pub grads: BTreeMap<String, Tensor>,
}

/// Forward `tokens` through the model over `params`, take the mean next-token cross-entropy
/// (dropless routing, no auxiliary loss) and backpropagate.
pub fn loss_and_grads(
    params: &TrainableParams,
    config: &ModelConfig,
    tokens: &[u32],
    device: &Device,
) -> Result<LossAndGrads> {
    if tokens.len() < 2 {
        return Err(ModelError::InvalidInput(
            "a loss needs at least two tokens".into(),
        ));
    }
    let model = params.model(config, device)?;
    let logits = model.forward_tokens(tokens, None)?;
    let loss = next_token_loss(&logits, tokens)?;
    let store = loss.backward()?;
    let mut grads = BTreeMap::new();
    // Parameters only: a router's selection bias is state updated outside the optimiser.
    let parameters: std::collections::HashSet<String> =
        config.param_specs().into_iter().map(|s| s.name).collect();
    for (name, var) in params.vars.iter().filter(|(n, _)| parameters.contains(*n)) {
        let g = match store.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        grads.insert(name.clone(), g);
    }
    Ok(LossAndGrads {
        loss: loss.to_scalar::<f32>()?,
        grads,
    })
}
