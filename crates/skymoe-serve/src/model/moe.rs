//! The feed-forward blocks: a dense SwiGLU, and the MoE block with its router (kept in f32),
//! tokens grouped by expert so that only the experts that received tokens are read, and the
//! optional shared expert (sigmoid-gated or not). Experts are chosen as the training router
//! chooses them ([`select_experts`]).

use rayon::prelude::*;
use skymoe_kernels::quant::{on_this_thread, QMatrix};
use skymoe_model::layers::router::{combine_weights, select_experts};
use skymoe_model::{RouterConfig, ScoreFunction};

use super::ops::{add_in_place, axpy, dot, silu_mul_rows, softmax};

/// A SwiGLU FFN with gate and up stacked into one matrix `[2f, h]` (gate rows first).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[gate; up]`: `[2f, h]`.
    pub gate_up: QMatrix,
    /// `down`: `[h, f]`.
    pub down: QMatrix,
}

impl Mlp {
    /// Apply to `m` rows of `x` `[m, h]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let f = self.down.cols();
        let mut gu = vec![0f32; m * 2 * f];
        self.gate_up.matmul(x, m, &mut gu);
        let a = silu_mul_rows(&gu, f);
        let mut y = vec![0f32; m * self.down.rows()];
        self.down.matmul(&a, m, &mut y);
        y
    }
}

/// The router's gate network in f32.
#[derive(Debug, Clone)]
pub enum RouterGate {
    /// `z = W x`, `W` `[E, h]`.
    Linear(QMatrix),
    /// `z = W₂ tanh(W₁ x)` (Skywork two-layer gate).
    TwoLayer(QMatrix, QMatrix),
}

/// An MoE block.
#[derive(Debug, Clone)]
pub struct MoeFfn {
    /// The gate network.
    pub gate: RouterGate,
    /// How logits become weights.
    pub router: RouterConfig,
    /// Experts per token.
    pub top_k: usize,
    /// The routed experts.
    pub experts: Vec<Mlp>,
    /// The shared expert and its scalar gate `[h]` (Qwen2-MoE; DeepSeek's has none).
    pub shared: Option<(Mlp, Option<Vec<f32>>)>,
    /// Selection bias `[E]` added to the expert scores for choosing the top-k only
    /// (DeepSeek-V3's `e_score_correction_bias`), as the training router applies it.
    pub selection_bias: Option<Vec<f32>>,
}

impl MoeFfn {
    /// Gate logits `[m, E]`.
    fn logits(&self, x: &[f32], m: usize) -> Vec<f32> {
        match &self.gate {
            RouterGate::Linear(w) => {
                let mut z = vec![0f32; m * w.rows()];
                w.matmul(x, m, &mut z);
                z
            }
            RouterGate::TwoLayer(a, b) => {
                let mut t = vec![0f32; m * a.rows()];
                a.matmul(x, m, &mut t);
                t.iter_mut().for_each(|v| *v = v.tanh());
                let mut z = vec![0f32; m * b.rows()];
                b.matmul(&t, m, &mut z);
                z
            }
        }
    }

    /// Each token's experts and combine weights (`top_k` per token, descending probability).
    pub fn route(&self, x: &[f32], m: usize) -> Vec<(u32, f32)> {
        let e = self.experts.len();
        let mut z = self.logits(x, m);
        let mut out = Vec::with_capacity(m * self.top_k);
        for row in z.chunks_exact_mut(e) {
            if let Some(lambda) = self.router.logits_norm_std {
                // λ·(z − mean)/std with the unbiased std, as in training.
                let mean = row.iter().sum::<f32>() / e as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
                    / (e as f32 - 1.0).max(1.0);
                let std = (var + 1e-12).sqrt();
                row.iter_mut()
                    .for_each(|v| *v = (*v - mean) / std * lambda as f32);
            }
            match self.router.scoring {
                ScoreFunction::Softmax => softmax(row),
                ScoreFunction::Sigmoid => {
                    row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()))
                }
            }
            let row: &[f32] = row;
            let picked = select_experts(
                &self.router,
                row,
                self.selection_bias.as_deref(),
                self.top_k,
            );
            let weights = combine_weights(&self.router, row, &picked);
            out.extend(picked.into_iter().zip(weights));
        }
        out
    }

    /// Apply to `m` rows of `x` `[m, h]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let h = x.len() / m.max(1);
        let k = self.top_k.min(self.experts.len());
        let routes = self.route(x, m);
        // Tokens of each expert, with their combine weights.
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (a, &(e, w)) in routes.iter().enumerate() {
            groups[e as usize].push((a / k.max(1), w));
        }
        let scale_input = if self.router.multiply_input_by_top_k {
            k as f32
        } else {
            1.0
        };
        let mut out = vec![0f32; m * h];
        // The active experts run concurrently (each product also splits its rows over idle
        // threads): at small batches a decode step then streams two experts' weights at once
        // instead of synchronising every thread around each small product.
        let active: Vec<(&Mlp, &Vec<(usize, f32)>)> = self
            .experts
            .iter()
            .zip(&groups)
            .filter(|(_, tokens)| !tokens.is_empty())
            .collect();
        // When the active experts outnumber the threads and have equal work (a decode step of
        // one sequence with top-k above the thread count: each expert has its one token), each
        // expert's products stay on its thread and the threads share out whole experts.
        // Alternated at batch 1 on two threads: the Qwen3-MoE-shaped model (top-8 of 64) faster
        // in four of five pairs (median +3.6%); with top-2 (as many experts as threads) it
        // measured level within this machine's noise, so those products are still split.
        let even = active.len() > rayon::current_num_threads()
            && active
                .iter()
                .all(|(_, tokens)| tokens.len() == active[0].1.len());
        let outputs: Vec<Vec<f32>> = active
            .par_iter()
            .map(|(expert, tokens)| {
                let mut buf = Vec::with_capacity(tokens.len() * h);
                for &(t, _) in tokens.iter() {
                    buf.extend(x[t * h..(t + 1) * h].iter().map(|v| v * scale_input));
                }
                if even {
                    on_this_thread(|| expert.forward(&buf, tokens.len()))
                } else {
                    expert.forward(&buf, tokens.len())
                }
            })
            .collect();
        for ((_, tokens), y) in active.iter().zip(&outputs) {
            for (j, &(t, w)) in tokens.iter().enumerate() {
                axpy(w, &y[j * h..(j + 1) * h], &mut out[t * h..(t + 1) * h]);
            }
        }
        if let Some((ffn, gate)) = &self.shared {
            let mut s = ffn.forward(x, m);
            if let Some(gate) = gate {
                for (t, row) in s.chunks_exact_mut(h).enumerate() {
                    let g = 1.0 / (1.0 + (-dot(gate, &x[t * h..(t + 1) * h])).exp());
                    row.iter_mut().for_each(|v| *v *= g);
                }
            }
            add_in_place(&mut out, &s);
        }
        out
    }
}

/// A decoder layer's feed-forward half.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU.
    Dense(Box<Mlp>),
    /// Mixture of experts.
    Moe(Box<MoeFfn>),
}

impl Ffn {
    /// Apply to `m` rows of `x`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x, m),
            Ffn::Moe(moe) => moe.forward(x, m),
        }
    }
}
