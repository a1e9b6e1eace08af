//! Router auxiliary losses and Skywork-MoE's adaptive per-layer coefficient.
//!
//! - Skywork L_aux (report eq. 4): `Σ_j (1/n − (1/T) Σ_i g_ij)²` over the `n` experts, with
//!   `g` the full softmax gate distribution of each of the `T` tokens.
//! - Switch/GShard load balancing: `E · Σ_e f_e · P_e`, with `f_e` the fraction of tokens that
//!   chose expert `e` among their top-k (so `Σ_e f_e = k`; counted before capacity dropping, not
//!   differentiable) and `P_e` the mean gate probability of `e` — transformers'
//!   `load_balancing_loss_func` for Mixtral computes the same value.
//! - Sequence-wise balance loss (DeepSeek-V3's complementary loss, Megatron-Core `seq_aux_loss`):
//!   per sequence of `T` tokens `Σ_e f_e · P_e` with `f_e = E/(k·T) · (tokens of the sequence
//!   whose top-k holds e)` and `P_e` the sequence's mean gate probability of `e`, averaged over
//!   the sequences.
//! - Global-batch balance loss (Megatron-Core `global_aux_loss`): `E/(k·T²) · Σ_e c̄_e · Σ_i g_ie`
//!   over the `T` tokens of a micro-batch, with `c̄_e` the running mean, over the step's
//!   micro-batches so far (this one included), of the tokens per expert.
//! - Counts of the last three are taken on the top-k of the unbiased gate probabilities, before
//!   capacity dropping.
//! - Router z-loss (ST-MoE): `mean_i (log Σ_j exp z_ij)²` over the raw gate logits.
//! - Adaptive coefficient (eqs. 7–9): after each step, `α̂ = min(ξ · d, α_max)` from the layer's
//!   token drop rate `d`, and `α ← β · α + (1 − β) · α̂`.

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Which load-balancing loss to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceLoss {
    /// Skywork-MoE eq. 4.
    Skywork,
    /// Switch Transformer / GShard `E · Σ f·P`.
    Switch,
    /// DeepSeek-V3's sequence-wise balance loss.
    Sequence,
    /// Megatron-Core's global-batch balance loss (counts over the step's micro-batches).
    Global,
    /// No balancing loss.
    None,
}

/// Skywork L_aux of one layer from its gate probabilities `[tokens, experts]`.
pub fn skywork_aux(probs: &Tensor) -> Result<Tensor> {
    let n = probs.dim(D::Minus1)? as f64;
    let mean = probs.mean(0)?; // [experts]
    (mean - 1.0 / n)?.sqr()?.sum_all()
}

/// Switch/GShard load-balancing loss of one layer from its gate probabilities
/// `[tokens, experts]` and the number of tokens routed to each expert.
pub fn switch_aux(probs: &Tensor, expert_counts: &[usize]) -> Result<Tensor> {
    let e = expert_counts.len();
    let tokens = probs.dim(0)?.max(1);
    let f: Vec<f32> = expert_counts
        .iter()
        .map(|&c| c as f32 / tokens as f32)
        .collect();
    let f = Tensor::from_vec(f, e, probs.device())?;
    let p = probs.mean(0)?;
    (p * f)?.sum_all()? * e as f64
}

/// DeepSeek-V3's sequence-wise balance loss of one layer from its gate probabilities
/// `[sequences · seq_len, experts]` (sequence-major) and the top-k chosen experts of each token
/// (`top_k` per token, token-major): the mean over sequences of
/// `Σ_e (E/(k·T)) · count_e · mean_t p_te`. The probabilities of a softmax router sum to one per
/// token, so they are DeepSeek-V3's normalised scores `s'` as they stand.
pub fn sequence_aux(
    probs: &Tensor,
    experts: &[u32],
    top_k: usize,
    sequences: usize,
) -> Result<Tensor> {
    let (tokens, e) = probs.dims2()?;
    if sequences == 0 || top_k == 0 || !tokens.is_multiple_of(sequences) {
        candle_core::bail!("{tokens} tokens do not split into {sequences} sequences");
    }
    if experts.len() != tokens * top_k {
        candle_core::bail!(
            "{} selections for {tokens} tokens of top-{top_k}",
            experts.len()
        );
    }
    let t = tokens / sequences;
    let scale = e as f32 / (top_k * t) as f32;
    let mut f = vec![0f32; sequences * e];
    for (a, &x) in experts.iter().enumerate() {
        let s = a / top_k / t;
        if let Some(slot) = f.get_mut(s * e + x as usize) {
            *slot += scale;
        }
    }
    let f = Tensor::from_vec(f, (sequences, e), probs.device())?;
    let p = probs.reshape((sequences, t, e))?.mean(1)?; // [sequences, experts]
    (p * f)?.sum_all()? / sequences as f64
}

/// Megatron-Core's global-batch balance loss of one micro-batch's layer from its gate
/// probabilities `[tokens, experts]` and the mean tokens per expert `mean_counts` over the
/// step's micro-batches so far: `E/(k·T²) · Σ_e c̄_e · Σ_i p_ie`.
pub fn global_aux(probs: &Tensor, mean_counts: &[f64], top_k: usize) -> Result<Tensor> {
    let e = mean_counts.len();
    let tokens = probs.dim(0)?.max(1);
    let f: Vec<f32> = mean_counts
        .iter()
        .map(|&c| (c / tokens as f64) as f32)
        .collect();
    let f = Tensor::from_vec(f, e, probs.device())?;
    let p = probs.mean(0)?;
    (p * f)?.sum_all()? * (e as f64 / top_k.max(1) as f64)
}

/// The aux-loss-free bias update of one layer (DeepSeek-V3, Megatron-Core
/// `get_updated_expert_bias`): `b_e ← b_e + rate · sign(mean load − load_e)` from the tokens
/// routed to each expert in the step (`sign(0) = 0`).
pub fn update_selection_bias(bias: &mut [f32], load: &[usize], rate: f64) {
    let n = load.len().max(1);
    let mean = load.iter().sum::<usize>() as f32 / n as f32;
    let rate = rate as f32;
    for (b, &l) in bias.iter_mut().zip(load) {
        let offset = mean - l as f32;
        let sign = if offset > 0.0 {
            1.0
        } else if offset < 0.0 {
            -1.0
        } else {
            0.0
        };
        *b += sign * rate;
    }
}

/// Router z-loss of one layer from its raw gate logits `[tokens, experts]`.
pub fn z_loss(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    lse.sqr()?.mean_all()
}

/// Settings of the adaptive auxiliary-loss coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveConfig {
    /// ξ: sensitivity to the drop rate.
    pub xi: f64,
    /// α_max: upper bound of the target coefficient.
    pub alpha_max: f64,
    /// β: smoothing of the moving average.
    pub beta: f64,
    /// α before the first update.
    pub alpha_init: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            xi: 0.2,
            alpha_max: 0.01,
            beta: 0.99,
            alpha_init: 0.0,
        }
    }
}

/// Per-layer auxiliary-loss coefficients, fixed or adapted to each layer's drop rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuxCoefficients {
    /// Current α of each MoE layer.
    pub alpha: Vec<f64>,
    /// `Some` for the adaptive rule; `None` keeps α fixed.
    pub adaptive: Option<AdaptiveConfig>,
}

impl AuxCoefficients {
    /// Fixed coefficient `alpha` for `layers` MoE layers.
    pub fn fixed(layers: usize, alpha: f64) -> Self {
        AuxCoefficients {
            alpha: vec![alpha; layers],
            adaptive: None,
        }
    }

    /// Adaptive coefficients starting at `config.alpha_init`.
    pub fn adaptive(layers: usize, config: AdaptiveConfig) -> Self {
        AuxCoefficients {
            alpha: vec![config.alpha_init; layers],
            adaptive: Some(config),
        }
    }

    /// Update after a step that saw `drop_rates` (one per MoE layer); no-op when fixed.
    pub fn update(&mut self, drop_rates: &[f64]) {
        let Some(c) = &self.adaptive else { return };
        for (a, &d) in self.alpha.iter_mut().zip(drop_rates) {
            let target = (c.xi * d).min(c.alpha_max);
            *a = c.beta * *a + (1.0 - c.beta) * target;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn skywork_aux_matches_plain_formula() -> Result<()> {
        let p = [[0.7f32, 0.2, 0.1], [0.1, 0.6, 0.3]];
        let t = Tensor::new(&p, &Device::Cpu)?;
        let got = skywork_aux(&t)?.to_scalar::<f32>()?;
        let want: f32 = p[0]
            .iter()
            .zip(&p[1])
            .map(|(a, b)| (1.0 / 3.0 - (a + b) / 2.0).powi(2))
            .sum();
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        // Perfect balance gives zero.
        let u = Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5]], &Device::Cpu)?;
        assert!(skywork_aux(&u)?.to_scalar::<f32>()?.abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn switch_aux_and_z_loss_match_plain_formulas() -> Result<()> {
        let p = [[0.7f32, 0.2, 0.1], [0.1, 0.6, 0.3]];
        let t = Tensor::new(&p, &Device::Cpu)?;
        // Two tokens, top-2: token 0 → {0, 1}, token 1 → {1, 2}.
        let counts = [1usize, 2, 1];
        let got = switch_aux(&t, &counts)?.to_scalar::<f32>()?;
        let f = [0.5f32, 1.0, 0.5];
        let want: f32 = 3.0
            * (0..3)
                .map(|j| f[j] * (p[0][j] + p[1][j]) / 2.0)
                .sum::<f32>();
        assert!((got - want).abs() < 1e-6);
        let z = [[1.0f32, 2.0, 3.0], [0.0, -1.0, 5.0]];
        let zt = Tensor::new(&z, &Device::Cpu)?;
        let want: f32 = z
            .iter()
            .map(|r| r.iter().map(|x| x.exp()).sum::<f32>().ln().powi(2))
            .sum::<f32>()
            / 2.0;
        assert!((z_loss(&zt)?.to_scalar::<f32>()? - want).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn sequence_and_global_losses_match_plain_formulas() -> Result<()> {
        // Two sequences of two tokens, three experts, top-1.
        let p = [
            [0.7f32, 0.2, 0.1],
            [0.1, 0.6, 0.3],
            [0.3, 0.3, 0.4],
            [0.5, 0.25, 0.25],
        ];
        let t = Tensor::new(&p, &Device::Cpu)?;
        let experts = [0u32, 1, 2, 0];
        let got = sequence_aux(&t, &experts, 1, 2)?.to_scalar::<f32>()?;
        let mut want = 0.0f32;
        for s in 0..2 {
            for (e, (a, b)) in p[2 * s].iter().zip(&p[2 * s + 1]).enumerate() {
                let count = (0..2).filter(|&i| experts[2 * s + i] as usize == e).count() as f32;
                let f = 3.0 / 2.0 * count;
                want += f * (a + b) / 2.0 / 2.0;
            }
        }
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(sequence_aux(&t, &experts, 1, 3).is_err());
        // Global: E/(k·T²) · Σ_e c_e · Σ_i p_ie.
        let counts = [1.5f64, 1.0, 1.5];
        let got = global_aux(&t, &counts, 2)?.to_scalar::<f32>()?;
        let want: f32 = (0..3)
            .map(|e| counts[e] as f32 * p.iter().map(|r| r[e]).sum::<f32>())
            .sum::<f32>()
            * 3.0
            / (2.0 * 16.0);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn bias_moves_towards_the_mean_load() {
        let mut b = [0.0f32, 0.5, -0.25, 0.0];
        update_selection_bias(&mut b, &[4, 1, 2, 1], 0.125);
        // mean 2: overloaded down, underloaded up, at the mean unchanged.
        assert_eq!(b, [-0.125, 0.625, -0.25, 0.125]);
    }

    #[test]
    fn adaptive_alpha_follows_eqs_7_to_9() {
        let cfg = AdaptiveConfig {
            xi: 0.2,
            alpha_max: 0.01,
            beta: 0.99,
            alpha_init: 0.0,
        };
        let mut c = AuxCoefficients::adaptive(2, cfg);
        let mut reference = [0.0f64; 2];
        let drops = [[0.30, 0.01], [0.20, 0.02], [0.0, 0.04]];
        for d in drops {
            c.update(&d);
            for l in 0..2 {
                let target = f64::min(0.2 * d[l], 0.01);
                reference[l] = 0.99 * reference[l] + (1.0 - 0.99) * target;
            }
            assert_eq!(c.alpha, reference.to_vec());
        }
        // Layer 0 was capped at α_max twice then fell: 0.0001, 0.000199, then decays.
        assert!((c.alpha[0] - 0.99 * 0.000199).abs() < 1e-12);
        let mut fixed = AuxCoefficients::fixed(2, 0.01);
        fixed.update(&[0.5, 0.5]);
        assert_eq!(fixed.alpha, vec![0.01, 0.01]);
    }
}
