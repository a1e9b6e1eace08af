//! The MoE router: gate logits → (optional gating logit normalisation) → softmax → top-k →
//! (optional) renormalisation.
//!
//! A router may carry a selection bias (DeepSeek-V3's `e_score_correction_bias`, aux-loss-free
//! load balancing): the top-k is chosen on `probs + bias`, while the combine weights stay the
//! unbiased probabilities of the chosen experts (renormalised as the router's rule says).

use candle_core::{DType, Result, Tensor, D};

use super::linear::Linear;
use super::ops::{sigmoid, softmax_last_dim};
use crate::config::{GroupScore, RouterConfig, ScoreFunction};

/// The gate network: one bias-free linear layer, or Linear → Tanh → Linear (Skywork
/// `moe_2layer_gate`).
#[derive(Debug, Clone)]
pub enum Gate {
    /// `z = W x`.
    Linear(Linear),
    /// `z = W₂ tanh(W₁ x)`.
    TwoLayer(Linear, Linear),
}

impl Gate {
    /// Gate logits `[tokens, experts]` for `x` `[tokens, hidden]`, in f32.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        match self {
            Gate::Linear(l) => l.forward(&x),
            Gate::TwoLayer(a, b) => b.forward(&a.forward(&x)?.tanh()?),
        }
    }
}

/// The outcome of routing a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Raw gate logits `[tokens, experts]`.
    pub logits: Tensor,
    /// Gate probabilities after normalisation and softmax `[tokens, experts]`.
    pub probs: Tensor,
    /// Selected experts, `top_k` per token, token-major, in descending selection score (the
    /// gate probability, plus the selection bias when the router has one).
    pub experts: Vec<u32>,
    /// The top-k of the unbiased gate probabilities, token-major (equal to `experts` without a
    /// selection bias). The load-balancing losses count these, as DeepSeek-V3 and
    /// Megatron-Core do.
    pub score_experts: Vec<u32>,
    /// Combine weights of the selected experts `[tokens, top_k]` (differentiable).
    pub weights: Tensor,
    /// Experts per token.
    pub top_k: usize,
    /// Gate probability of each selected assignment (before renormalisation), token-major.
    pub selected_probs: Vec<f32>,
    /// Whether each assignment reached its expert (false: dropped by the capacity limit).
    pub kept: Vec<bool>,
    /// Assignments routed to each expert before capacity dropping.
    pub expert_counts: Vec<usize>,
    /// Per-expert capacity in force, if any.
    pub capacity: Option<usize>,
    /// The experts' weight gradients that the layer's backward pass hands over outside the
    /// autograd graph, if the layer defers them (see
    /// [`MoeBlock::defer_expert_weight_grads`](super::moe::MoeBlock::defer_expert_weight_grads)).
    pub deferred_expert_grads: Option<super::moe::DeferredExpertGrads>,
}

impl Routing {
    /// Fraction of assignments dropped by the capacity limit.
    pub fn drop_rate(&self) -> f64 {
        let total = self.kept.len();
        if total == 0 {
            return 0.0;
        }
        self.kept.iter().filter(|k| !**k).count() as f64 / total as f64
    }

    /// Mean over tokens of (top-1 gate probability / top-2 gate probability); NaN for top-1
    /// routing.
    pub fn gate_ratio(&self) -> f64 {
        if self.top_k < 2 || self.selected_probs.is_empty() {
            return f64::NAN;
        }
        let pairs = self.selected_probs.chunks(self.top_k);
        let n = pairs.len() as f64;
        pairs
            .map(|p| p[0] as f64 / (p[1] as f64).max(1e-30))
            .sum::<f64>()
            / n
    }

    /// Assignments per expert among the top-k of the unbiased gate probabilities
    /// ([`Routing::score_experts`]).
    pub fn score_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.expert_counts.len()];
        for &e in &self.score_experts {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// Fraction of routed assignments that went to each expert.
    pub fn expert_load(&self) -> Vec<f64> {
        let total: usize = self.expert_counts.iter().sum();
        self.expert_counts
            .iter()
            .map(|&c| {
                if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                }
            })
            .collect()
    }

    /// Apply a capacity limit of `ceil(cf · k · T / E)` assignments per expert; `cf ≤ 0` (or
    /// `None`) means dropless. Within an expert, assignments are kept in order of descending gate
    /// probability (ties: earlier token first), so the tokens that most want an expert get it.
    pub fn apply_capacity(&mut self, capacity_factor: Option<f64>) {
        let e = self.expert_counts.len();
        let tokens = self.experts.len().checked_div(self.top_k).unwrap_or(0);
        self.kept = vec![true; self.experts.len()];
        self.capacity = None;
        let Some(cf) = capacity_factor.filter(|&cf| cf > 0.0) else {
            return;
        };
        if e == 0 {
            return;
        }
        let cap = (cf * self.top_k as f64 * tokens as f64 / e as f64).ceil() as usize;
        self.capacity = Some(cap);
        let mut per_expert: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (a, &x) in self.experts.iter().enumerate() {
            per_expert[x as usize].push(a);
        }
        for list in &mut per_expert {
            if list.len() <= cap {
                continue;
            }
            list.sort_by(|&a, &b| {
                self.selected_probs[b]
                    .partial_cmp(&self.selected_probs[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            });
            for &a in &list[cap..] {
                self.kept[a] = false;
            }
        }
    }
}

/// A router: gate network plus routing rule.
#[derive(Debug, Clone)]
pub struct Router {
    /// The gate network.
    pub gate: Gate,
    /// The routing rule.
    pub config: RouterConfig,
    /// Experts per token.
    pub top_k: usize,
    /// Selection bias `[experts]` (f32) added to the gate probabilities for choosing the top-k
    /// only (DeepSeek-V3's `e_score_correction_bias`); `None`: select on the probabilities.
    pub selection_bias: Option<Tensor>,
}

/// The checkpoint name of the selection bias of the router whose (first) gate weight is
/// `gate_weight`: the gate module's prefix plus `.e_score_correction_bias`, as DeepSeek-V3
/// names it (`model.layers.N.block_sparse_moe.gate.e_score_correction_bias`,
/// `model.layers.N.mlp.gate.e_score_correction_bias`).
pub fn selection_bias_name(gate_weight: &str) -> String {
    let module = gate_weight.strip_suffix(".weight").unwrap_or(gate_weight);
    let module = module.strip_suffix(".wg.0").unwrap_or(module);
    format!("{module}.e_score_correction_bias")
}

impl Router {
    /// Gating logit normalisation: `λ · (z − mean z) / std z` with the unbiased std.
    /// A token whose logits are all equal (e.g. a zero-initialised gate) gets all-zero
    /// normalised logits rather than 0/0: the variance is floored at 1e-12 before the square root,
    /// far below any variance f32 logits can otherwise have that would change the result.
    pub fn normalize_logits(z: &Tensor, lambda: f64) -> Result<Tensor> {
        let mean = z.mean_keepdim(D::Minus1)?;
        let std = (z.var_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
        z.broadcast_sub(&mean)?.broadcast_div(&std)? * lambda
    }

    /// Route `x` `[tokens, hidden]`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.gate.logits(x)?;
        let z = match self.config.logits_norm_std {
            Some(lambda) => Self::normalize_logits(&logits, lambda)?,
            None => logits.clone(),
        };
        let probs = match self.config.scoring {
            ScoreFunction::Softmax => softmax_last_dim(&z)?,
            ScoreFunction::Sigmoid => sigmoid(&z)?,
        };
        let rows = probs.detach().to_vec2::<f32>()?;
        let n = probs.dim(0)?;
        let num_experts = probs.dim(1)?;
        let score_experts = top_k_indices(&rows, self.top_k);
        let bias = match &self.selection_bias {
            Some(bias) => {
                let bias = bias.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if bias.len() != num_experts {
                    candle_core::bail!(
                        "selection bias of {} values for {num_experts} experts",
                        bias.len()
                    );
                }
                Some(bias)
            }
            None => None,
        };
        let experts = if bias.is_none() && self.config.group_limit.is_none() {
            score_experts.clone()
        } else {
            let mut experts = Vec::with_capacity(n * self.top_k);
            for row in &rows {
                experts.extend(select_experts(
                    &self.config,
                    row,
                    bias.as_deref(),
                    self.top_k,
                ));
            }
            experts
        };
        let selected_probs: Vec<f32> = experts
            .iter()
            .enumerate()
            .map(|(a, &e)| rows[a / self.top_k][e as usize])
            .collect();
        let mut expert_counts = vec![0usize; num_experts];
        for &e in &experts {
            expert_counts[e as usize] += 1;
        }
        let idx = Tensor::from_vec(experts.clone(), (n, self.top_k), probs.device())?;
        let mut weights = probs.gather(&idx, 1)?;
        if self.config.normalize_top_k {
            let sum = weights.sum_keepdim(D::Minus1)?;
            weights = weights.broadcast_div(&sum)?;
        }
        if self.config.routed_scaling_factor != 1.0 {
            weights = (weights * self.config.routed_scaling_factor)?;
        }
        Ok(Routing {
            logits,
            probs,
            kept: vec![true; experts.len()],
            experts,
            score_experts,
            weights,
            top_k: self.top_k,
            selected_probs,
            expert_counts,
            capacity: None,
            deferred_expert_grads: None,
        })
    }
}

/// The experts a token with expert scores `scores` (softmax or sigmoid of its gate logits)
/// is sent to, in descending selection score: the top-`k` of `scores + bias` (the bias only
/// chooses, DeepSeek-V3's `e_score_correction_bias`), among the experts of the token's best
/// groups when the router limits groups (each group scored by its best selection score, or by
/// the sum of its two best). Ties go to the lower index. Both executors route with it.
pub fn select_experts(
    config: &RouterConfig,
    scores: &[f32],
    bias: Option<&[f32]>,
    k: usize,
) -> Vec<u32> {
    let n = scores.len();
    let choice: Vec<f32> = match bias {
        Some(b) => scores
            .iter()
            .enumerate()
            .map(|(i, s)| s + b.get(i).copied().unwrap_or(0.0))
            .collect(),
        None => scores.to_vec(),
    };
    let mut allowed = vec![true; n];
    if let Some(g) = config
        .group_limit
        .filter(|g| g.groups > 1 && n.is_multiple_of(g.groups))
    {
        let size = n / g.groups;
        let group_scores: Vec<f32> = choice
            .chunks_exact(size)
            .map(|group| match g.score {
                GroupScore::Max => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                GroupScore::TopTwoSum => {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &x in group {
                        if x > a {
                            b = a;
                            a = x;
                        } else if x > b {
                            b = x;
                        }
                    }
                    if size == 1 {
                        a
                    } else {
                        a + b
                    }
                }
            })
            .collect();
        let kept = top_k_of_row(&group_scores, g.top_groups);
        allowed.fill(false);
        for grp in kept {
            let start = grp as usize * size;
            allowed[start..start + size].fill(true);
        }
    }
    let mut order: Vec<u32> = (0..n as u32).filter(|&i| allowed[i as usize]).collect();
    order.sort_by(|&a, &b| {
        choice[b as usize]
            .partial_cmp(&choice[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

/// Indices of the `k` largest values of `row`, in descending order, ties to the lower index.
fn top_k_of_row(row: &[f32], k: usize) -> Vec<u32> {
    top_k_indices(std::slice::from_ref(&row.to_vec()), k)
}

/// The combine weights of the experts `picked` from scores `scores`, as the router's rule
/// says: the scores of the picked experts, renormalised to sum to one when asked, times the
/// routed scaling factor.
pub fn combine_weights(config: &RouterConfig, scores: &[f32], picked: &[u32]) -> Vec<f32> {
    let mut w: Vec<f32> = picked
        .iter()
        .map(|&i| scores.get(i as usize).copied().unwrap_or(0.0))
        .collect();
    if config.normalize_top_k {
        let sum: f32 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= sum);
    }
    let f = config.routed_scaling_factor as f32;
    if f != 1.0 {
        w.iter_mut().for_each(|x| *x *= f);
    }
    w
}

/// Indices of the `k` largest values of each row, in descending order; ties go to the lower
/// index (as a stable sort would).
pub fn top_k_indices(rows: &[Vec<f32>], k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(rows.len() * k);
    let mut order: Vec<u32> = Vec::new();
    for row in rows {
        order.clear();
        order.extend(0..row.len() as u32);
        order.sort_by(|&a, &b| {
            row[b as usize]
                .partial_cmp(&row[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        out.extend_from_slice(&order[..k.min(order.len())]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_largest_in_order_with_stable_ties() {
        let rows = vec![vec![0.1, 0.5, 0.2, 0.5], vec![0.9, 0.0, 0.05, 0.05]];
        assert_eq!(top_k_indices(&rows, 2), vec![1, 3, 0, 2]);
    }

    fn routing(experts: Vec<u32>, probs: Vec<f32>, k: usize, e: usize) -> Routing {
        let dev = candle_core::Device::Cpu;
        let mut counts = vec![0; e];
        experts.iter().for_each(|&x| counts[x as usize] += 1);
        let n = experts.len();
        Routing {
            logits: Tensor::zeros((n / k, e), DType::F32, &dev).unwrap(),
            probs: Tensor::zeros((n / k, e), DType::F32, &dev).unwrap(),
            kept: vec![true; n],
            score_experts: experts.clone(),
            experts,
            weights: Tensor::zeros((n / k, k), DType::F32, &dev).unwrap(),
            top_k: k,
            selected_probs: probs,
            expert_counts: counts,
            capacity: None,
            deferred_expert_grads: None,
        }
    }

    /// Capacity dropping against a plain reference: per expert keep the `cap` assignments with
    /// the highest gate probability.
    #[test]
    fn capacity_keeps_most_confident_assignments() {
        // 4 tokens, top-2, 2 experts: every token picks both experts; cf 0.5 → cap ceil(0.5·2·4/2) = 2.
        let experts = vec![0, 1, 1, 0, 0, 1, 1, 0];
        let probs = vec![0.9, 0.1, 0.6, 0.4, 0.7, 0.3, 0.55, 0.45];
        let mut r = routing(experts, probs, 2, 2);
        r.apply_capacity(Some(0.5));
        assert_eq!(r.capacity, Some(2));
        // expert 0 assignments (prob): a0 .9, a3 .4, a4 .7, a7 .45 → keep a0, a4.
        // expert 1 assignments: a1 .1, a2 .6, a5 .3, a6 .55 → keep a2, a6.
        assert_eq!(
            r.kept,
            vec![true, false, true, false, true, false, true, false]
        );
        assert!((r.drop_rate() - 0.5).abs() < 1e-12);
        assert_eq!(r.expert_load(), vec![0.5, 0.5]);
        r.apply_capacity(None);
        assert_eq!(r.drop_rate(), 0.0);
        r.apply_capacity(Some(0.0));
        assert_eq!(r.drop_rate(), 0.0);
        r.apply_capacity(Some(1.0));
        assert_eq!((r.capacity, r.drop_rate()), (Some(4), 0.0));
    }

    #[test]
    fn gate_ratio_is_the_mean_top1_over_top2() {
        let r = routing(vec![0, 1, 1, 0], vec![0.6, 0.2, 0.5, 0.5], 2, 2);
        assert!((r.gate_ratio() - 2.0).abs() < 1e-6, "(3 + 1) / 2");
        assert!(routing(vec![0, 1], vec![0.7, 0.9], 1, 2)
            .gate_ratio()
            .is_nan());
    }

    #[test]
    fn selection_bias_changes_choice_not_weights() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // Identity gate: the logits are the inputs.
        let w = Tensor::new(
            &[[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            &dev,
        )?;
        let mut router = Router {
            gate: Gate::Linear(Linear::new(w, None)),
            config: RouterConfig {
                logits_norm_std: None,
                normalize_top_k: true,
                two_layer_gate: false,
                multiply_input_by_top_k: false,
                ..RouterConfig::PLAIN
            },
            top_k: 1,
            selection_bias: None,
        };
        let x = Tensor::new(&[[2.0f32, 1.0, 0.0]], &dev)?;
        let plain = router.route(&x)?;
        assert_eq!(plain.experts, vec![0]);
        router.selection_bias = Some(Tensor::new(&[0.0f32, 0.5, 0.0], &dev)?);
        let biased = router.route(&x)?;
        assert_eq!(
            (biased.experts.clone(), biased.score_experts.clone()),
            (vec![1], vec![0])
        );
        assert_eq!(biased.score_counts(), vec![1, 0, 0]);
        assert_eq!(biased.expert_counts, vec![0, 1, 0]);
        // Top-1 renormalised: the weight is 1 whatever was chosen; the probability is unbiased.
        let p = plain.probs.to_vec2::<f32>()?[0][1];
        assert_eq!(biased.selected_probs, vec![p]);
        assert_eq!(
            selection_bias_name("model.layers.3.block_sparse_moe.gate.wg.0.weight"),
            "model.layers.3.block_sparse_moe.gate.e_score_correction_bias"
        );
        assert_eq!(
            selection_bias_name("model.layers.0.mlp.gate.weight"),
            "model.layers.0.mlp.gate.e_score_correction_bias"
        );
        Ok(())
    }

    #[test]
    fn logits_norm_of_equal_logits_is_zero_not_nan() -> Result<()> {
        let z = Tensor::new(&[[0.0f32, 0.0, 0.0, 0.0]], &candle_core::Device::Cpu)?;
        assert_eq!(
            Router::normalize_logits(&z, 1.0)?.to_vec2::<f32>()?,
            vec![vec![0.0; 4]]
        );
        Ok(())
    }

    #[test]
    fn logits_norm_matches_hand_computation() -> Result<()> {
        let z = Tensor::new(&[[1.0f32, 2.0, 3.0, 6.0]], &candle_core::Device::Cpu)?;
        let got = Router::normalize_logits(&z, 2.0)?.to_vec2::<f32>()?;
        let mean = 3.0f32;
        let std = ((4.0 + 1.0 + 0.0 + 9.0) / 3.0f32).sqrt();
        for (g, v) in got[0].iter().zip([1.0f32, 2.0, 3.0, 6.0]) {
            assert!((g - 2.0 * (v - mean) / std).abs() < 1e-6);
        }
        Ok(())
    }
}
