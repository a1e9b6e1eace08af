//! `skymoe upcycle`: turn a dense Llama checkpoint into an MoE whose experts start from the
//! dense FFN (whole copies, or fine-grained column segments).

use std::path::PathBuf;

use anyhow::Context;
use skymoe_model::Architecture;
use skymoe_train::upcycle::{upcycle, GateInit, UpcycleOptions};

/// Arguments of `skymoe upcycle`.
#[derive(clap::Args)]
pub struct Args {
    /// The dense model: a Hugging Face Llama-family directory, a Llama .gguf file, or a hub
    /// id (org/name[@revision]) found in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    from: PathBuf,
    /// Experts per MoE layer.
    #[arg(long)]
    experts: usize,
    /// Experts per token.
    #[arg(long)]
    top_k: usize,
    /// Output layout: skywork, mixtral, qwen3_moe or deepseek_v3 (DeepSeekMoE recipe: the
    /// dense FFN becomes the shared expert, routed experts start from its segments; latent
    /// attention starts from Llama's attention).
    #[arg(long, default_value = "skywork")]
    arch: String,
    /// Split the dense FFN into this many column segments, one per expert (fine-grained
    /// experts; expert e holds segment e mod SEGMENTS, its down projection scaled by
    /// SEGMENTS). 1: every expert is the whole FFN.
    #[arg(long, default_value_t = 1)]
    segments: usize,
    /// Router initialisation: zeros or normal:STD.
    #[arg(long, default_value = "zeros")]
    gate_init: GateInit,
    /// Gaussian noise added to each expert copy (standard deviation; 0 keeps exact copies).
    #[arg(long, default_value_t = 0.0)]
    expert_noise: f64,
    /// Gating logit normalisation λ of the Skywork layout (0 disables).
    #[arg(long, default_value_t = 1.0)]
    gate_norm_std: f64,
    /// Seed of the gate and noise draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// deepseek_v3: width of the key/value latent (default: the hidden size, lossless;
    /// smaller: a truncated SVD of the key and value projections).
    #[arg(long)]
    kv_lora_rank: Option<usize>,
    /// deepseek_v3: rotary dimensions per head, an even divisor of the head dimension; the
    /// others become latent attention's plain dimensions (default: all of them for a dense
    /// model with one kv head, which keeps its attention exactly; else head_dim/16).
    #[arg(long)]
    rope_dim: Option<usize>,
    /// deepseek_v3: leading layers whose FFN stays dense (`first_k_dense_replace`).
    #[arg(long, default_value_t = 0)]
    dense_layers: usize,
    /// Output directory (a Hugging Face checkpoint).
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Some(arch) = Architecture::from_name(&a.arch) else {
        anyhow::bail!(
            "unknown --arch `{}` (skywork | mixtral | qwen3_moe | deepseek_v3)",
            a.arch
        );
    };
    let opts = UpcycleOptions {
        experts: a.experts,
        top_k: a.top_k,
        arch,
        gate_init: a.gate_init,
        expert_noise: a.expert_noise,
        gate_norm_std: (a.gate_norm_std > 0.0).then_some(a.gate_norm_std),
        segments: a.segments,
        seed: a.seed,
        kv_lora_rank: a.kv_lora_rank,
        rope_dim: a.rope_dim,
        dense_layers: a.dense_layers,
    };
    let s = upcycle(&a.from, &a.out, &opts)
        .with_context(|| format!("cannot upcycle {}", a.from.display()))?;
    eprintln!(
        "wrote {} ({} experts, top-{}, {:.2}M parameters, {:.2}M active per token{}) to {}",
        s.config.architecture.hf_class(),
        a.experts,
        a.top_k,
        s.config.total_params() as f64 / 1e6,
        s.config.active_params() as f64 / 1e6,
        if s.tokenizer {
            ", tokenizer included"
        } else {
            ""
        },
        s.out.display()
    );
    Ok(())
}
