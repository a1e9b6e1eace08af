//! The cost model: FLOPs, memory traffic, activation memory, parameters and communication of
//! one decoder layer and of the extra work of the first and last pipeline stages, per rank and
//! per micro-batch. docs/PLANNER.md derives every formula.

use crate::cluster::Cluster;
use crate::comm::{Group, Network, Transfer};
use crate::job::{Job, Precision};
use crate::layout::Layout;
use crate::model::ModelShape;

/// Element-wise memory traffic as a multiple of the activation bytes a layer keeps for its
/// backward: each kept tensor is written once and read about twice (norms, RoPE, softmax,
/// SwiGLU, permutations).
pub const ELEMENTWISE_TRAFFIC: f64 = 3.0;

/// Fraction of the causal attention score FLOPs a flash-attention kernel computes.
pub const CAUSAL_FRACTION: f64 = 0.5;

/// Time of some work, split by kind, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// Matrix products and element-wise kernels.
    pub compute: f64,
    /// Tensor-parallel collectives (attention, dense FFNs, vocabulary-parallel head).
    pub tp_comm: f64,
    /// Expert dispatch/combine (all-to-all, or the all-gather/reduce-scatter of ETP).
    pub ep_comm: f64,
}

impl Work {
    /// Sum of the parts.
    pub fn total(&self) -> f64 {
        self.compute + self.tp_comm + self.ep_comm
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            compute: self.compute + o.compute,
            tp_comm: self.tp_comm + o.tp_comm,
            ep_comm: self.ep_comm + o.ep_comm,
        }
    }
}

impl std::ops::Mul<f64> for Work {
    type Output = Work;
    fn mul(self, k: f64) -> Work {
        Work {
            compute: self.compute * k,
            tp_comm: self.tp_comm * k,
            ep_comm: self.ep_comm * k,
        }
    }
}

/// Cost of one decoder layer on one rank for one micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerCost {
    /// Forward.
    pub forward: Work,
    /// Backward (twice the forward's compute and the forward's communication mirrored).
    pub backward: Work,
    /// Activation bytes kept from forward to backward.
    pub activation_bytes: f64,
    /// Bytes kept when the layer is recomputed (its input only).
    pub checkpoint_bytes: f64,
    /// Parameters on this rank that are replicated over the data-parallel group.
    pub dense_params: f64,
    /// Expert parameters on this rank (replicated over the expert-data-parallel group).
    pub expert_params: f64,
    /// Bytes this rank sends per micro-batch through the expert dispatch/combine, forward and
    /// backward: (intra-node, inter-node).
    pub ep_bytes: (f64, f64),
    /// Bytes this rank sends per micro-batch through tensor-parallel collectives, forward and backward.
    pub tp_bytes: f64,
    /// Matrix-product FLOPs of the forward (the backward does twice as many).
    pub forward_flops: f64,
    /// Element-wise memory traffic of the forward (the backward moves twice as much).
    pub forward_bytes: f64,
}

impl LayerCost {
    /// Forward plus backward.
    pub fn train(&self) -> Work {
        self.forward + self.backward
    }
}

/// The extra cost of the first stage (embedding) or the last (final norm, LM head, loss).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeCost {
    /// Forward and backward of the extra work, per micro-batch.
    pub work: Work,
    /// Parameters on this rank (replicated over DP).
    pub params: f64,
    /// Activation bytes per micro-batch in flight.
    pub activation_bytes: f64,
    /// Transient bytes of one micro-batch (the fp32 logits and their gradient).
    pub transient_bytes: f64,
    /// Matrix-product FLOPs, forward and backward.
    pub flops: f64,
    /// Element-wise memory traffic, forward and backward.
    pub bytes: f64,
}

/// The compute of one optimiser step on a single device (no parallelism): what
/// `skymoe plan --calibrate` fits the machine's constants to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepWork {
    /// Matrix-product FLOPs.
    pub flops: f64,
    /// Element-wise and optimiser memory traffic, bytes.
    pub bytes: f64,
    /// Layer forward-and-backward passes (each pays the cluster's `layer_overhead_us`).
    pub layer_passes: f64,
}

/// Everything the per-layer formulas need.
pub struct CostModel<'a> {
    /// The model.
    pub model: &'a ModelShape,
    /// The cluster.
    pub cluster: &'a Cluster,
    /// The job.
    pub job: &'a Job,
    /// The layout.
    pub layout: Layout,
}

impl CostModel<'_> {
    fn net(&self) -> Network<'_> {
        Network {
            cluster: self.cluster,
        }
    }

    /// Achievable matrix-product FLOP/s of one accelerator for the job's precision.
    pub fn flops_per_s(&self) -> f64 {
        let peak = match self.job.precision {
            Precision::Fp32 => self.cluster.fp32_tflops,
            _ => self.cluster.tflops,
        };
        peak * 1e12 * self.cluster.matmul_efficiency
    }

    /// Peak FLOP/s of one accelerator for the job's precision (the MFU denominator).
    pub fn peak_flops_per_s(&self) -> f64 {
        match self.job.precision {
            Precision::Fp32 => self.cluster.fp32_tflops * 1e12,
            _ => self.cluster.tflops * 1e12,
        }
    }

    /// Seconds for `flops` of matrix products plus `bytes` of element-wise traffic.
    pub fn compute_seconds(&self, flops: f64, bytes: f64) -> f64 {
        flops / self.flops_per_s() + bytes / (self.cluster.mem_gbps * 1e9)
    }

    /// Tokens of one micro-batch on one data-parallel replica.
    pub fn tokens(&self) -> f64 {
        (self.job.seq_len * self.job.micro_batch) as f64
    }

    /// The tensor-parallel group.
    pub fn tp_group(&self) -> Group {
        Group::new(self.layout.tp, 1)
    }

    /// The data-parallel group of the non-expert weights.
    pub fn dp_group(&self) -> Group {
        Group::new(self.layout.dp, self.layout.tp)
    }

    /// The expert-parallel group.
    pub fn ep_group(&self) -> Group {
        Group::new(self.layout.ep, self.layout.etp)
    }

    /// The expert-tensor-parallel group.
    pub fn etp_group(&self) -> Group {
        Group::new(self.layout.etp, 1)
    }

    /// The data-parallel group of the expert weights.
    pub fn expert_dp_group(&self) -> Group {
        Group::new(self.layout.expert_dp(), self.layout.ep * self.layout.etp)
    }

    /// Forward FLOPs per token of the attention of one layer: the projections
    /// (`2 × attention_weights`: q or q_a/q_b, k/v or kv_a/kv_b, o) and the scores and values
    /// over `positions` attended positions (see
    /// [`ModelShape::attention_score_flops_per_position`]).
    pub fn attention_flops_per_token(&self, positions: f64) -> f64 {
        2.0 * self.model.attention_weights()
            + positions * self.model.attention_score_flops_per_position()
    }

    /// Seconds of the routed experts' matrix products on this rank: `flops` over
    /// `experts_here` local experts of width `width` (on this rank). A grouped GEMM is no
    /// faster than reading its weights once from memory: an expert that gets `n` token copies
    /// does `6·h·width·n` FLOPs on `3·h·width·e` bytes of weights, so below
    /// [`Self::expert_ridge_tokens`] copies per expert (fine-grained experts, many of them on a
    /// rank) the weight reads set the time — its GEMM efficiency falls as `n / ridge`.
    pub fn expert_seconds(&self, flops: f64, experts_here: f64, width: f64) -> f64 {
        let h = self.model.hidden as f64;
        let weight_bytes = experts_here * 3.0 * h * width * self.job.precision.bytes();
        (flops / self.flops_per_s()).max(weight_bytes / (self.cluster.mem_gbps * 1e9))
    }

    /// Token copies per expert and micro-batch below which an expert's forward is bound by
    /// reading its weights: `e · achievable FLOP/s / (2 · mem_gbps)` (258 on an H100 in bf16).
    pub fn expert_ridge_tokens(&self) -> f64 {
        self.job.precision.bytes() * self.flops_per_s() / (2.0 * self.cluster.mem_gbps * 1e9)
    }

    /// Forward FLOPs per token of decoder layer `layer` as the model defines them (Megatron's
    /// convention: attention scores over the full sequence, top-k experts, no capacity padding).
    pub fn model_flops_per_token(&self, layer: usize) -> f64 {
        let m = self.model;
        let h = m.hidden as f64;
        let s = self.job.seq_len as f64;
        let attention = self.attention_flops_per_token(s);
        let ffn = match &m.moe {
            Some(moe) if m.is_moe_layer(layer) => {
                2.0 * h * moe.experts as f64
                    + 6.0 * h * (moe.expert_ffn * moe.top_k + moe.shared_ffn) as f64
            }
            _ => 6.0 * h * m.dense_ffn as f64,
        };
        attention + ffn
    }

    /// Forward FLOPs per token of the LM head.
    pub fn head_flops_per_token(&self) -> f64 {
        2.0 * (self.model.hidden * self.model.vocab) as f64
    }

    /// The cost of decoder layer `layer`.
    pub fn layer(&self, layer: usize) -> LayerCost {
        let m = self.model;
        let l = self.layout;
        let e = self.job.precision.bytes();
        let t = self.tokens();
        let tp = l.tp as f64;
        let h = m.hidden as f64;
        let s = self.job.seq_len as f64;
        let net = self.net();

        // Attention: projections and causal scores, split over TP (sequence parallel outside;
        // latent attention's latent projections run whole on every rank).
        let replicated = m.attention_replicated_weights() * (1.0 - 1.0 / tp);
        let mut flops =
            t * self.attention_flops_per_token(s * CAUSAL_FRACTION) / tp + t * 2.0 * replicated;
        let mut act = t / tp * (m.attention_activation_values() * e + 4.0 * m.heads as f64);
        // Routed experts, timed apart (see `expert_seconds`).
        let (mut expert_flops, mut expert_s) = (0.0, 0.0);
        // All-gather before QKV, reduce-scatter after the output projection.
        let hidden_pass = net.ring_pass(self.tp_group(), t * h * e);
        let mut tp_fwd = hidden_pass * 2.0;
        let mut ep_fwd = Transfer::default();
        let mut dense_params = m.attention_params() / tp + replicated;
        let mut expert_params = 0.0;

        match &m.moe {
            Some(moe) if m.is_moe_layer(layer) => {
                let f = moe.expert_ffn as f64;
                let ex = moe.experts as f64;
                let copies = self.job.expert_copies(moe.top_k);
                let etp = l.etp as f64;
                // Router (fp32 logits and probabilities) on the rank's own tokens.
                flops += t / tp * 2.0 * h * ex;
                act += t / tp * (2.0 * h * e + 8.0 * ex);
                // Routed experts: every rank computes its share of the copies, over its
                // E/ep local experts of width F/etp.
                expert_flops = t * copies / tp * 6.0 * h * f;
                flops += expert_flops;
                expert_s = self.expert_seconds(expert_flops, ex / l.ep as f64, f / etp);
                let copies_here = t * copies * etp / tp;
                act += copies_here * (2.0 * h + 4.0 * f / etp) * e;
                if l.etp > 1 {
                    ep_fwd += net.ring_pass(self.etp_group(), t * etp / tp * h * e);
                    ep_fwd += net.ring_pass(self.etp_group(), copies_here * h * e);
                }
                if l.ep > 1 {
                    // Dispatch and combine.
                    ep_fwd += net.all_to_all(self.ep_group(), copies_here * h * e) * 2.0;
                }
                if moe.shared_ffn > 0 {
                    let fs = moe.shared_ffn as f64;
                    flops += t * 6.0 * h * fs / tp;
                    act += t / tp * (2.0 * h + 4.0 * fs) * e;
                    tp_fwd += hidden_pass * 2.0;
                }
                // Shared expert and norm split over TP; the router replicated.
                dense_params += (m.ffn_dense_params(layer) - h * ex) / tp + h * ex;
                expert_params = m.routed_expert_params() / (l.ep as f64 * etp);
            }
            _ => {
                let f = m.dense_ffn as f64;
                flops += t * 6.0 * h * f / tp;
                act += t / tp * (2.0 * h + 4.0 * f) * e;
                tp_fwd += hidden_pass * 2.0;
                dense_params += m.ffn_dense_params(layer) / tp;
            }
        }
        let overhead = self.cluster.layer_overhead_us * 1e-6;
        let compute = self.compute_seconds(flops - expert_flops, ELEMENTWISE_TRAFFIC * act)
            + expert_s
            + overhead / 3.0;
        let forward = Work {
            compute,
            tp_comm: tp_fwd.seconds,
            ep_comm: ep_fwd.seconds,
        };
        LayerCost {
            forward,
            backward: Work {
                compute: 2.0 * (compute - overhead / 3.0) + 2.0 * overhead / 3.0,
                ..forward
            },
            activation_bytes: act,
            checkpoint_bytes: t / tp * h * e,
            dense_params,
            expert_params,
            ep_bytes: (2.0 * ep_fwd.intra_bytes, 2.0 * ep_fwd.inter_bytes),
            tp_bytes: 2.0 * (tp_fwd.intra_bytes + tp_fwd.inter_bytes),
            forward_flops: flops,
            forward_bytes: ELEMENTWISE_TRAFFIC * act,
        }
    }

    /// The embedding on the first stage: a lookup, then a reduce-scatter of the
    /// vocabulary-parallel result over TP; its gradient is a scatter-add.
    pub fn embedding(&self) -> EdgeCost {
        let (t, h, e) = (
            self.tokens(),
            self.model.hidden as f64,
            self.job.precision.bytes(),
        );
        let tp = self.layout.tp as f64;
        let pass = self.net().ring_pass(self.tp_group(), t * h * e);
        let bytes = 3.0 * t * h * e;
        let compute = self.compute_seconds(0.0, bytes);
        EdgeCost {
            flops: 0.0,
            bytes,
            work: Work {
                compute,
                tp_comm: 2.0 * pass.seconds,
                ep_comm: 0.0,
            },
            params: (self.model.vocab as f64) * h / tp,
            activation_bytes: 0.0,
            transient_bytes: 0.0,
        }
    }

    /// Final norm, vocabulary-parallel LM head and cross-entropy on the last stage.
    pub fn head(&self) -> EdgeCost {
        let (t, h, e) = (
            self.tokens(),
            self.model.hidden as f64,
            self.job.precision.bytes(),
        );
        let v = self.model.vocab as f64;
        let tp = self.layout.tp as f64;
        let logits = t * v / tp * 4.0;
        let flops = t * self.head_flops_per_token() / tp;
        let traffic = 3.0 * t / tp * h * e + 2.0 * logits;
        let fwd = self.compute_seconds(flops, traffic);
        let bwd = self.compute_seconds(2.0 * flops, traffic);
        let net = self.net();
        // All-gather of the hidden states, three all-reduces of per-token scalars (max,
        // sum of exponentials, target logit); the mirror in backward.
        let comm = net.ring_pass(self.tp_group(), t * h * e) * 2.0
            + net.all_reduce(self.tp_group(), 3.0 * t * 4.0);
        EdgeCost {
            work: Work {
                compute: fwd + bwd,
                tp_comm: comm.seconds,
                ep_comm: 0.0,
            },
            params: v * h / tp + h,
            activation_bytes: t / tp * h * e,
            transient_bytes: 2.0 * logits + t * h * e,
            flops: 3.0 * flops,
            bytes: 2.0 * traffic,
        }
    }

    /// The point-to-point transfer of one micro-batch's activations (or their gradients)
    /// between adjacent stages.
    pub fn stage_send(&self) -> Transfer {
        let bytes = self.tokens() * self.model.hidden as f64 * self.job.precision.bytes()
            / self.layout.tp as f64;
        self.send_between_stages(bytes)
    }

    /// `bytes` sent from a rank to its peer in the next pipeline stage.
    pub fn send_between_stages(&self, bytes: f64) -> Transfer {
        self.net().send(self.layout.tp * self.layout.dp, bytes)
    }

    /// Gradient synchronisation and weight gathering per optimiser step for `dense` params
    /// replicated over DP and `expert` params replicated over expert-DP, given `micro`
    /// micro-batches: ZeRO-0 all-reduces fp32 gradients once; ZeRO-1 reduce-scatters them and
    /// all-gathers the updated weights; ZeRO-2 reduce-scatters in every micro-batch; ZeRO-3
    /// also gathers the weights for every forward and backward. Not overlapped with compute.
    pub fn data_parallel_sync(&self, dense: f64, expert: f64, micro: usize) -> Transfer {
        let b = self.job.bytes_per_param();
        let net = self.net();
        let mut total = Transfer::default();
        for (params, group) in [(dense, self.dp_group()), (expert, self.expert_dp_group())] {
            let m = micro as f64;
            let reduce = net.ring_pass(group, params * b.grad);
            let gather = net.ring_pass(group, params * b.weight);
            total += match self.layout.zero {
                0 => net.all_reduce(group, params * b.grad),
                1 => reduce + gather,
                // Sharded gradients cannot accumulate over micro-batches: each micro-batch
                // reduce-scatters its own.
                2 => reduce * m + gather,
                // ... and sharded weights are gathered for every forward and backward.
                _ => reduce * m + gather * (2.0 * m),
            };
        }
        total
    }

    /// Bytes of weights, gradients and optimiser state on one rank for `dense` and `expert`
    /// parameters, under the layout's ZeRO stage.
    pub fn state_bytes(&self, dense: f64, expert: f64) -> f64 {
        let b = self.job.bytes_per_param();
        let z = self.layout.zero;
        let per = |params: f64, shards: f64| {
            let shard = |stage: u8| if z >= stage { shards } else { 1.0 };
            params * (b.weight / shard(3) + b.grad / shard(2) + b.optimizer / shard(1))
        };
        per(dense, self.layout.dp as f64) + per(expert, self.layout.expert_dp() as f64)
    }

    /// Seconds of the optimiser step over the rank's share of `dense` and `expert` params:
    /// memory-bound, reading gradients, state and weights and writing state and weights.
    pub fn optimizer_seconds(&self, dense: f64, expert: f64) -> f64 {
        let b = self.job.bytes_per_param();
        let shards = |n: usize| if self.layout.zero >= 1 { n as f64 } else { 1.0 };
        let params = dense / shards(self.layout.dp) + expert / shards(self.layout.expert_dp());
        params * (b.grad + 2.0 * b.optimizer + b.weight) / (self.cluster.mem_gbps * 1e9)
    }

    /// The work of one optimiser step over `micro` micro-batches on a single device: every
    /// layer's forward and backward, embedding, head and loss, and the optimiser update.
    pub fn single_device_step(&self, micro: usize) -> StepWork {
        let m = self.model;
        let (mut flops, mut bytes, mut params) = (0.0, 0.0, 0.0);
        for l in 0..m.layers {
            let c = self.layer(l);
            flops += 3.0 * c.forward_flops;
            bytes += 3.0 * c.forward_bytes;
            params += c.dense_params + c.expert_params;
        }
        let (emb, head) = (self.embedding(), self.head());
        flops += emb.flops + head.flops;
        bytes += emb.bytes + head.bytes;
        params += emb.params + if m.tied_embeddings { 0.0 } else { head.params };
        let b = self.job.bytes_per_param();
        StepWork {
            layer_passes: (micro * m.layers) as f64,
            flops: micro as f64 * flops,
            bytes: micro as f64 * bytes + params * (b.grad + 2.0 * b.optimizer + b.weight),
        }
    }
}
