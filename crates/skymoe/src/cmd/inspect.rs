//! `skymoe inspect`: architecture, sizes and parameter counts of a model.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use skymoe_model::Checkpoint;

/// Arguments of `skymoe inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn human(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn bytes(n: f64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    if n >= GIB {
        format!("{:.2} GiB", n / GIB)
    } else {
        format!("{:.2} MiB", n / 1024.0 / 1024.0)
    }
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&a.model, &Device::Cpu)
        .with_context(|| format!("cannot open model {}", a.model.display()))?;
    let c = &ckpt.config;
    // Check the checkpoint against the config: every tensor present with the right shape.
    let specs = c.param_specs();
    for s in &specs {
        if !ckpt.weights.contains(&s.name) {
            anyhow::bail!("tensor {} is missing from the checkpoint", s.name);
        }
    }
    let total = c.total_params();
    let active = c.active_params();
    let moe_layers = (0..c.num_hidden_layers)
        .filter(|&l| c.is_moe_layer(l))
        .count();
    let dtypes: [(&str, f64); 5] = [
        ("f32", 4.0),
        ("bf16/f16", 2.0),
        ("fp8/int8", 1.0),
        ("q8_0", 34.0 / 32.0),
        ("q4_0", 18.0 / 32.0),
    ];
    // How the weights are stored: tensors per dtype, and the scales of quantised layouts.
    let names = ckpt.weights.names();
    let mut dtypes_stored: std::collections::BTreeMap<String, usize> = Default::default();
    for n in &names {
        if let Some(d) = ckpt.weights.stored_dtype(n) {
            *dtypes_stored.entry(d).or_default() += 1;
        }
    }
    let count = |suffix: &str| names.iter().filter(|n| n.ends_with(suffix)).count();
    let (weight_scales, act_scales) = (
        count(".weight_scale"),
        count(".act_scale") + count(".input_scale"),
    );
    let source = match &ckpt.gguf_metadata {
        Some(_) => "gguf (dequantised when read)",
        None => ckpt.weights.kind(),
    };
    // What a KV cache keeps per token over all layers (keys and values, or MLA's latent and
    // rotary key).
    let kv_values = c.kv_cache_width() * c.num_hidden_layers;
    if a.json {
        let v = serde_json::json!({
            "architecture": c.architecture.hf_class(),
            "model_type": c.architecture.model_type(),
            "layers": c.num_hidden_layers,
            "moe_layers": moe_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "attention_heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "experts": c.moe.as_ref().map(|m| m.num_experts),
            "top_k": c.moe.as_ref().map(|m| m.top_k),
            "expert_intermediate_size": c.moe.as_ref().map(|m| m.expert_intermediate_size),
            "shared_expert_intermediate_size": c.moe.as_ref().and_then(|m| m.shared_expert_intermediate_size),
            "gate_logits_norm_std": c.moe.as_ref().and_then(|m| m.router.logits_norm_std),
            "rope_scaling": c.rope_scaling.name(),
            "mla": c.mla.map(|m| serde_json::json!({
                "q_lora_rank": m.q_lora_rank,
                "kv_lora_rank": m.kv_lora_rank,
                "qk_nope_head_dim": m.qk_nope_head_dim,
                "qk_rope_head_dim": m.qk_rope_head_dim,
                "v_head_dim": m.v_head_dim,
            })),
            "kv_cache_values_per_token": kv_values,
            "kv_cache_bytes_per_token": {"f32": kv_values * 4, "f16": kv_values * 2},
            "router_scores": c.moe.as_ref().map(|m| score_name(m.router.scoring)),
            "mtp_layers_skipped": c.mtp_layers,
            "weights": {
                "source": source,
                "dtypes": dtypes_stored,
                "weight_scales": weight_scales,
                "activation_scales_unused": act_scales,
            },
            "params_total": total,
            "params_active_per_token": active,
            "bytes": dtypes.iter().map(|(n, b)| (n.to_string(), serde_json::json!(total as f64 * b))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model          {}", a.model.display());
    // A config naming another class for the same computation (Skywork-13B's `skywork` is a
    // Llama block) is said so.
    let declared = std::fs::read_to_string(ckpt.path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string))
        .filter(|t| t != c.architecture.model_type());
    println!(
        "architecture   {} ({}){}",
        c.architecture.hf_class(),
        c.architecture.model_type(),
        declared
            .map(|t| format!(", read from model_type `{t}`"))
            .unwrap_or_default()
    );
    println!(
        "layers         {} ({} MoE)",
        c.num_hidden_layers, moe_layers
    );
    println!("hidden         {}", c.hidden_size);
    if let Some(m) = &c.mla {
        println!(
            "attention      latent (MLA), {} heads: q/k {} plain + {} rotary{}, kv latent {} + \
             shared rotary key {}, v {}",
            c.num_attention_heads,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.q_lora_rank
                .map(|r| format!(" (query rank {r})"))
                .unwrap_or_default(),
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            m.v_head_dim
        );
    } else {
        println!(
            "attention      {} heads x {} (kv heads {}{}{}{})",
            c.num_attention_heads,
            c.head_dim,
            c.num_key_value_heads,
            if c.qkv_bias { ", q/k/v bias" } else { "" },
            c.qk_norm
                .describe()
                .map(|d| format!(", {d}"))
                .unwrap_or_default(),
            c.clip_qkv
                .map(|x| format!(", q/k/v clipped to ±{x}"))
                .unwrap_or_default()
        );
    }
    println!(
        "kv cache       {kv_values} values per token: {} bytes in f16, {} in f32{}",
        kv_values * 2,
        kv_values * 4,
        if c.mla.is_some() {
            " (latent and rotary key only)"
        } else {
            ""
        }
    );
    if c.mtp_layers > 0 {
        println!(
            "mtp layers     {} multi-token-prediction layer(s) after layer {}: not used for \
             next-token prediction, their weights are skipped",
            c.mtp_layers,
            c.num_hidden_layers.saturating_sub(1)
        );
    }
    println!("vocab          {}", c.vocab_size);
    println!(
        "rope           theta {}, scaling {}",
        c.rope_theta,
        c.rope_scaling.name()
    );
    let stored: Vec<String> = dtypes_stored
        .iter()
        .map(|(d, n)| format!("{n} {d}"))
        .collect();
    println!(
        "weights        {source}{}{}",
        if stored.is_empty() {
            String::new()
        } else {
            format!(": {} tensors", stored.join(", "))
        },
        if weight_scales > 0 {
            format!(" ({weight_scales} with weight_scale)")
        } else {
            String::new()
        }
    );
    if act_scales > 0 {
        println!(
            "               {act_scales} activation scales (act_scale/input_scale) read and unused: \
             activations stay in f32 (as under activation_scheme dynamic)"
        );
    }
    println!("tied embedding {}", c.tie_word_embeddings);
    match &c.moe {
        Some(m) => {
            println!(
                "experts        {} (top-{}), expert FFN {}",
                m.num_experts, m.top_k, m.expert_intermediate_size
            );
            if let Some(s) = m.shared_expert_intermediate_size {
                println!(
                    "shared expert  FFN {s}, {}",
                    if m.shared_expert_gated {
                        "sigmoid gate"
                    } else {
                        "no gate"
                    }
                );
            }
            let r = &m.router;
            println!(
                "router         {}{}{}{}{}{}{}{}",
                score_name(r.scoring),
                r.group_limit
                    .map(|g| format!(
                        ", best {} of {} groups ({})",
                        g.top_groups,
                        g.groups,
                        match g.score {
                            skymoe_model::config::GroupScore::Max => "by best expert",
                            skymoe_model::config::GroupScore::TopTwoSum => "by top-2 sum",
                        }
                    ))
                    .unwrap_or_default(),
                if r.requires_selection_bias {
                    ", selection bias (e_score_correction_bias)"
                } else {
                    ""
                },
                if r.routed_scaling_factor != 1.0 {
                    format!(", weights x{}", r.routed_scaling_factor)
                } else {
                    String::new()
                },
                r.logits_norm_std
                    .map(|l| format!(", logit norm λ={l}"))
                    .unwrap_or_default(),
                if r.normalize_top_k {
                    ", top-k renormalised"
                } else {
                    ""
                },
                if r.two_layer_gate {
                    ", 2-layer gate"
                } else {
                    ""
                },
                if r.multiply_input_by_top_k {
                    ", input x top-k"
                } else {
                    ""
                },
            );
            if moe_layers < c.num_hidden_layers {
                println!("dense FFN      {} (non-MoE layers)", c.intermediate_size);
            }
        }
        None => println!("FFN            dense SwiGLU {}", c.intermediate_size),
    }
    println!("params total   {} ({total})", human(total));
    println!("params active  {} per token ({active})", human(active));
    for (n, b) in dtypes {
        println!("size {n:<9} {}", bytes(total as f64 * b));
    }
    Ok(())
}

/// The name of a router's score function.
fn score_name(f: skymoe_model::ScoreFunction) -> &'static str {
    match f {
        skymoe_model::ScoreFunction::Softmax => "softmax",
        skymoe_model::ScoreFunction::Sigmoid => "sigmoid",
    }
}
