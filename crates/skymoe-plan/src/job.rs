//! The training job: batch, sequence length, precision, optimiser.

use serde::Serialize;

use crate::error::{PlanError, Result};

/// Number format of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 weights and activations, fp32 gradients and master weights (Megatron's mixed precision).
    Bf16,
    /// fp16, as bf16.
    Fp16,
    /// Everything in fp32.
    Fp32,
}

impl Precision {
    /// Parse `bf16`, `fp16` or `fp32`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "fp16" => Ok(Self::Fp16),
            "fp32" => Ok(Self::Fp32),
            _ => Err(PlanError::Job(format!(
                "unknown precision `{s}` (expected bf16, fp16 or fp32)"
            ))),
        }
    }

    /// Bytes of one weight or activation element.
    pub fn bytes(self) -> f64 {
        match self {
            Self::Bf16 | Self::Fp16 => 2.0,
            Self::Fp32 => 4.0,
        }
    }
}

/// The optimiser, for its state size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam/AdamW: two fp32 moments per parameter.
    Adamw,
    /// SGD with momentum: one fp32 buffer per parameter.
    Sgd,
}

impl Optimizer {
    /// Parse `adamw` (or `adam`) or `sgd`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "adamw" | "adam" => Ok(Self::Adamw),
            "sgd" => Ok(Self::Sgd),
            _ => Err(PlanError::Job(format!(
                "unknown optimizer `{s}` (expected adamw or sgd)"
            ))),
        }
    }
}

/// One training job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// Tokens per optimiser step, over all data-parallel replicas.
    pub global_batch_tokens: u64,
    /// Sequence length.
    pub seq_len: usize,
    /// Sequences per micro-batch on one data-parallel replica.
    pub micro_batch: usize,
    /// Number format.
    pub precision: Precision,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// MoE capacity factor; ≤ 0 means dropless (experts then process exactly top-k copies
    /// of each token, assuming balanced routing).
    pub capacity_factor: f64,
}

impl Job {
    /// A job with the defaults: micro-batch 1, bf16, AdamW, capacity factor 1.
    pub fn new(global_batch_tokens: u64, seq_len: usize) -> Self {
        Job {
            global_batch_tokens,
            seq_len,
            micro_batch: 1,
            precision: Precision::Bf16,
            optimizer: Optimizer::Adamw,
            capacity_factor: 1.0,
        }
    }

    /// Sequences per optimiser step.
    pub fn global_sequences(&self) -> u64 {
        self.global_batch_tokens / self.seq_len.max(1) as u64
    }

    /// Check the job on its own; the error says what is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.seq_len == 0 {
            return Err(PlanError::Job(
                "the sequence length must be at least 1".into(),
            ));
        }
        if self.micro_batch == 0 {
            return Err(PlanError::Job("the micro-batch must be at least 1".into()));
        }
        if self.global_batch_tokens < self.seq_len as u64 {
            return Err(PlanError::Job(format!(
                "the global batch ({} tokens) is smaller than one sequence ({} tokens)",
                self.global_batch_tokens, self.seq_len
            )));
        }
        if !self.global_batch_tokens.is_multiple_of(self.seq_len as u64) {
            return Err(PlanError::Job(format!(
                "the global batch ({} tokens) is not a whole number of {}-token sequences",
                self.global_batch_tokens, self.seq_len
            )));
        }
        if !self.capacity_factor.is_finite() {
            return Err(PlanError::Job("the capacity factor must be finite".into()));
        }
        Ok(())
    }

    /// Bytes per parameter of weights, gradients and optimiser state (before ZeRO sharding).
    ///
    /// Mixed precision keeps 16-bit weights, fp32 gradients (Megatron accumulates and reduces
    /// them in fp32) and fp32 master weights beside the optimiser's fp32 moments; fp32
    /// training has no master copy.
    pub fn bytes_per_param(&self) -> ParamBytes {
        let moments = match self.optimizer {
            Optimizer::Adamw => 8.0,
            Optimizer::Sgd => 4.0,
        };
        match self.precision {
            Precision::Fp32 => ParamBytes {
                weight: 4.0,
                grad: 4.0,
                optimizer: moments,
            },
            _ => ParamBytes {
                weight: 2.0,
                grad: 4.0,
                optimizer: 4.0 + moments,
            },
        }
    }

    /// Copies of each token an MoE layer computes: top-k times the capacity factor (the
    /// expert buffers are sized by capacity), or top-k when dropless.
    pub fn expert_copies(&self, top_k: usize) -> f64 {
        let cf = if self.capacity_factor > 0.0 {
            self.capacity_factor
        } else {
            1.0
        };
        top_k as f64 * cf
    }
}

/// Bytes per parameter of each kind of training state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamBytes {
    /// The weights used by forward and backward.
    pub weight: f64,
    /// The gradients.
    pub grad: f64,
    /// Optimiser state, master weights included.
    pub optimizer: f64,
}
