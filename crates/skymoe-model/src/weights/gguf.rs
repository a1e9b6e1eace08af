//! llama.cpp GGUF files (v2/v3) of the `llama` architecture, dense or MoE (stacked experts).
//!
//! Tensors are dequantised at load (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the other ggml block
//! types candle reads) and converted to Hugging Face names and layout: the rotary-permuted q/k
//! rows of llama.cpp's converter are put back in Hugging Face's "rotate_half" order and the
//! stacked `ffn_*_exps` tensors are split into one tensor per expert.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::{Architecture, ModelConfig, MoeConfig, RopeScaling, RouterConfig};
use crate::error::{ModelError, Result};

/// The key/value metadata of a GGUF file.
pub struct GgufMetadata {
    /// All metadata entries.
    pub entries: HashMap<String, Value>,
}

impl GgufMetadata {
    /// A string entry.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.entries.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An integer entry of any integer type.
    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.entries.get(key)? {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        }
    }

    /// A float entry (f32 or f64).
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.entries.get(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }

    /// A boolean entry.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.entries.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.entries.get(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An array of integers.
    pub fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.entries.get(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Some(*x as i64),
                    Value::U32(x) => Some(*x as i64),
                    Value::I64(x) => Some(*x),
                    Value::U64(x) => i64::try_from(*x).ok(),
                    Value::I8(x) => Some(*x as i64),
                    Value::U8(x) => Some(*x as i64),
                    Value::I16(x) => Some(*x as i64),
                    Value::U16(x) => Some(*x as i64),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

/// A GGUF file converted to Hugging Face names, layout and config.
pub struct GgufCheckpoint {
    /// The config derived from the metadata.
    pub config: ModelConfig,
    /// Dequantised f32 tensors under Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
    /// The metadata (tokenizer and the rest).
    pub metadata: GgufMetadata,
}

fn read_err(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::corrupt(
        path,
        e.to_string().lines().next().unwrap_or_default().to_string(),
    )
}

impl GgufCheckpoint {
    /// Read a GGUF file, dequantise its tensors and convert them.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| read_err(path, e))?;
        let metadata = GgufMetadata {
            entries: content.metadata.clone(),
        };
        let arch = metadata
            .string("general.architecture")
            .ok_or_else(|| ModelError::corrupt(path, "no general.architecture in the metadata"))?
            .to_string();
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                found: format!("GGUF general.architecture={arch:?}"),
            });
        }
        let mut raw: HashMap<String, Tensor> = HashMap::new();
        for name in content.tensor_infos.keys() {
            let q = content.tensor(&mut file, name, device).map_err(|e| {
                ModelError::corrupt(
                    path,
                    format!(
                        "tensor {name}: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    ),
                )
            })?;
            let t = q
                .dequantize(device)
                .map_err(|e| ModelError::corrupt(path, format!("tensor {name}: {e}")))?;
            raw.insert(name.clone(), t);
        }
        let config = config_from_metadata(&metadata, &raw, path)?;
        let tensors = to_hf_layout(&config, raw)?;
        Ok(GgufCheckpoint {
            config,
            tensors,
            metadata,
        })
    }
}

fn config_from_metadata(
    m: &GgufMetadata,
    raw: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<ModelConfig> {
    let origin: PathBuf = path.to_path_buf();
    let need = |key: &str| -> Result<usize> {
        m.uint(&format!("llama.{key}"))
            .filter(|&x| x > 0)
            .map(|x| x as usize)
            .ok_or_else(|| ModelError::config(&origin, format!("GGUF metadata lacks llama.{key}")))
    };
    let hidden_size = need("embedding_length")?;
    let num_hidden_layers = need("block_count")?;
    let num_attention_heads = need("attention.head_count")?;
    let num_key_value_heads = need("attention.head_count_kv").unwrap_or(num_attention_heads);
    let feed_forward = need("feed_forward_length")?;
    let head_dim = m
        .uint("llama.attention.key_length")
        .map(|x| x as usize)
        .unwrap_or(hidden_size / num_attention_heads.max(1));
    let vocab_size = match m.uint("llama.vocab_size") {
        Some(v) => v as usize,
        None => match m.strings("tokenizer.ggml.tokens") {
            Some(t) => t.len(),
            None => raw
                .get("token_embd.weight")
                .map(|t| t.dims()[0])
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })?,
        },
    };
    let experts = m.uint("llama.expert_count").unwrap_or(0) as usize;
    let moe = if experts > 0 {
        let top_k = m.uint("llama.expert_used_count").unwrap_or(2) as usize;
        if top_k == 0 || top_k > experts {
            return Err(ModelError::config(
                &origin,
                format!("llama.expert_used_count ({top_k}) must be in 1..={experts}"),
            ));
        }
        Some(MoeConfig {
            num_experts: experts,
            top_k,
            expert_intermediate_size: m
                .uint("llama.expert_feed_forward_length")
                .map(|x| x as usize)
                .unwrap_or(feed_forward),
            shared_expert_intermediate_size: None,
            moe_layers: vec![true; num_hidden_layers],
            router: RouterConfig {
                logits_norm_std: None,
                normalize_top_k: true,
                two_layer_gate: false,
                multiply_input_by_top_k: false,
            },
        })
    } else {
        None
    };
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(ModelError::config(
            &origin,
            "attention.head_count must be a multiple of head_count_kv",
        ));
    }
    let max_position_embeddings = m.uint("llama.context_length").unwrap_or(4096) as usize;
    Ok(ModelConfig {
        architecture: if moe.is_some() {
            Architecture::Mixtral
        } else {
            Architecture::Llama
        },
        vocab_size,
        hidden_size,
        intermediate_size: feed_forward,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: m
            .float("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5),
        rope_theta: m.float("llama.rope.freq_base").unwrap_or(10000.0),
        max_position_embeddings,
        rope_scaling: rope_scaling_from_metadata(m, raw, &origin, max_position_embeddings)?,
        tie_word_embeddings: !raw.contains_key("output.weight"),
        qkv_bias: raw.contains_key("blk.0.attn_q.bias"),
        o_bias: raw.contains_key("blk.0.attn_output.bias"),
        moe,
        bos_token_id: m.uint("tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_ids: m
            .uint("tokenizer.ggml.eos_token_id")
            .map(|x| vec![x as u32])
            .unwrap_or_default(),
    })
}

/// The rotary scaling llama.cpp's converter writes: `llama.rope.scaling.type` (`none`,
/// `linear`, `yarn`) with `llama.rope.scaling.factor` and, for YaRN,
/// `llama.rope.scaling.original_context_length` (defaulting to `llama.context_length`, as
/// transformers defaults it to `max_position_embeddings`), the optional
/// `llama.rope.scaling.attn_factor` (a multiplier on YaRN's attention factor) and
/// `llama.rope.scaling.yarn_beta_fast`/`yarn_beta_slow`; also the older
/// `llama.rope.scale_linear`. Llama 3.1 files carry their scaling as per-frequency divisors in
/// a `rope_freqs.weight` tensor instead; those are refused unless all ones (no scaling).
fn rope_scaling_from_metadata(
    m: &GgufMetadata,
    raw: &HashMap<String, Tensor>,
    origin: &Path,
    context_length: usize,
) -> Result<RopeScaling> {
    if let Some(t) = raw.get("rope_freqs.weight") {
        let ones = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map(|v| v.iter().all(|&x| x == 1.0))
            .unwrap_or(false);
        if !ones {
            return Err(ModelError::config(
                origin,
                "the GGUF file scales its rotary embedding with a `rope_freqs.weight` tensor                  (llama.cpp's form of Llama 3.1 `llama3` scaling), which skymoe does not read;                  load the Hugging Face checkpoint (config.json with `rope_scaling`) instead",
            ));
        }
    }
    let factor = |key: &str| -> Result<f64> {
        m.float(key)
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| {
                ModelError::config(
                    origin,
                    format!("GGUF metadata lacks a positive `{key}` for its rope scaling"),
                )
            })
    };
    let kind = m.string("llama.rope.scaling.type");
    match kind {
        None | Some("none") => match m.float("llama.rope.scale_linear") {
            Some(f) if f != 1.0 => Ok(RopeScaling::Linear {
                factor: factor("llama.rope.scale_linear")?,
            }),
            _ => Ok(RopeScaling::Default),
        },
        Some("linear") => Ok(RopeScaling::Linear {
            factor: factor("llama.rope.scaling.factor")?,
        }),
        Some("yarn") => {
            let factor = factor("llama.rope.scaling.factor")?;
            let original = m
                .uint("llama.rope.scaling.original_context_length")
                .filter(|&n| n > 0)
                .map_or(context_length, |n| n as usize);
            // llama.cpp multiplies its attention factor `0.1·ln(factor) + 1` by attn_factor.
            let attention_factor = m
                .float("llama.rope.scaling.attn_factor")
                .filter(|&a| a != 1.0)
                .map(|a| {
                    a * if factor > 1.0 {
                        0.1 * factor.ln() + 1.0
                    } else {
                        1.0
                    }
                });
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: m.float("llama.rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                beta_slow: m.float("llama.rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                mscale: None,
                mscale_all_dim: None,
                attention_factor,
                truncate: true,
            })
        }
        Some(other) => Err(ModelError::config(
            origin,
            format!("GGUF `llama.rope.scaling.type` is `{other}`; supported: none, linear, yarn"),
        )),
    }
}

/// Undo llama.cpp's rotary permutation of q/k rows (`[heads, 2, d/2] -> [heads, d/2, 2]`).
fn unpermute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(ModelError::InvalidInput(format!(
            "cannot un-permute a [{rows}, {cols}] q/k weight for {heads} heads"
        )));
    }
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn to_hf_layout(
    cfg: &ModelConfig,
    raw: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in raw {
        let hf = match name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            _ => {
                let Some(rest) = name.strip_prefix("blk.") else {
                    tracing::debug!("ignoring GGUF tensor {name}");
                    continue;
                };
                let Some((layer, tail)) = rest.split_once('.') else {
                    continue;
                };
                let p = format!("model.layers.{layer}");
                match tail {
                    "attn_norm.weight" => format!("{p}.input_layernorm.weight"),
                    "ffn_norm.weight" => format!("{p}.post_attention_layernorm.weight"),
                    "attn_q.weight" => {
                        out.insert(
                            format!("{p}.self_attn.q_proj.weight"),
                            unpermute_rotary(&t, cfg.num_attention_heads)?,
                        );
                        continue;
                    }
                    "attn_k.weight" => {
                        out.insert(
                            format!("{p}.self_attn.k_proj.weight"),
                            unpermute_rotary(&t, cfg.num_key_value_heads)?,
                        );
                        continue;
                    }
                    "attn_q.bias" | "attn_k.bias" => {
                        let heads = if tail.starts_with("attn_q") {
                            cfg.num_attention_heads
                        } else {
                            cfg.num_key_value_heads
                        };
                        let b = unpermute_rotary(&t.unsqueeze(1)?, heads)?.squeeze(1)?;
                        let proj = if tail.starts_with("attn_q") {
                            "q_proj"
                        } else {
                            "k_proj"
                        };
                        out.insert(format!("{p}.self_attn.{proj}.bias"), b);
                        continue;
                    }
                    "attn_v.weight" => format!("{p}.self_attn.v_proj.weight"),
                    "attn_v.bias" => format!("{p}.self_attn.v_proj.bias"),
                    "attn_output.weight" => format!("{p}.self_attn.o_proj.weight"),
                    "attn_output.bias" => format!("{p}.self_attn.o_proj.bias"),
                    "ffn_gate.weight" => format!("{p}.mlp.gate_proj.weight"),
                    "ffn_up.weight" => format!("{p}.mlp.up_proj.weight"),
                    "ffn_down.weight" => format!("{p}.mlp.down_proj.weight"),
                    "ffn_gate_inp.weight" => format!("{p}.block_sparse_moe.gate.weight"),
                    "ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight" => {
                        let w = match tail {
                            "ffn_gate_exps.weight" => "w1",
                            "ffn_up_exps.weight" => "w3",
                            _ => "w2",
                        };
                        let n = t.dim(0)?;
                        for e in 0..n {
                            out.insert(
                                format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
                                t.get(e)?.contiguous()?,
                            );
                        }
                        continue;
                    }
                    _ => {
                        tracing::debug!("ignoring GGUF tensor {name}");
                        continue;
                    }
                }
            }
        };
        out.insert(hf, t);
    }
    Ok(out)
}
