//! `skymoe quantize`: write a checkpoint whose linear projections (attention q/k/v/o, experts,
//! dense and shared FFNs) are stored quantised, in the layout `skymoe_model::weights::quantized`
//! documents (for fp8 the layout of vLLM / Skywork FP8 checkpoints: `F8_E4M3` weights plus
//! `weight_scale`, `quantization_config.quant_method = "fp8"`). Embeddings, LM head, norms,
//! biases and the router gate keep their precision (f32). The directory is written under a
//! temporary name and renamed into place, so an interrupted run leaves nothing half-written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use skymoe_kernels::quant::{QData, QMatrix, WeightFormat};
use skymoe_model::names::{self, SwiGluNames};
use skymoe_model::weights::quantized::scale_name;
use skymoe_model::weights::WeightSource;
use skymoe_model::{Checkpoint, ModelConfig, Tokenizer};

use crate::error::{Result, ServeError};

/// How FP8 scales are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Scale {
    /// One scale per output channel (`weight_scale` `[rows, 1]`).
    Channel,
    /// One scale per matrix (`weight_scale` `[]`), vLLM's `Fp8Config` layout.
    Tensor,
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    /// The output directory.
    pub out: PathBuf,
    /// Matrices quantised.
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub kept: usize,
    /// Bytes of the source tensors (as f32) and of the written tensors.
    pub bytes_before: usize,
    /// Bytes written.
    pub bytes_after: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| io_error(path, source)
}

/// The linear projections of a model (name → `[rows, cols]`).
pub fn projection_names(c: &ModelConfig) -> BTreeMap<String, (usize, usize)> {
    let mut out = BTreeMap::new();
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let swiglu = |n: &SwiGluNames, f: usize, out: &mut BTreeMap<String, (usize, usize)>| {
        out.insert(n.gate.clone(), (f, h));
        out.insert(n.up.clone(), (f, h));
        out.insert(n.down.clone(), (h, f));
    };
    for i in 0..c.num_hidden_layers {
        let p = |s: &str| names::layer(i, &format!("self_attn.{s}.weight"));
        if c.mla.is_some() {
            for (name, shape) in c.mla_tensors(i) {
                if let [rows, cols] = shape[..] {
                    out.insert(name, (rows, cols));
                }
            }
        } else {
            out.insert(p("q_proj"), (q, h));
            out.insert(p("k_proj"), (kv, h));
            out.insert(p("v_proj"), (kv, h));
            out.insert(p("o_proj"), (h, q));
        }
        match (&c.moe, c.is_moe_layer(i)) {
            (Some(m), true) => {
                let n = c.moe_names(i);
                for e in &n.experts {
                    swiglu(e, m.expert_intermediate_size, &mut out);
                }
                if let (Some(sn), Some(sf)) = (&n.shared, m.shared_expert_intermediate_size) {
                    swiglu(&sn.ffn, sf, &mut out);
                }
            }
            _ => swiglu(&c.dense_ffn_names(i), c.intermediate_size, &mut out),
        }
    }
    out
}

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The stored tensors of one quantised matrix: the weight and its scale (none for f16/f32).
fn encode(m: &QMatrix, fp8_scale: Fp8Scale) -> (Owned, Option<Owned>) {
    let (rows, cols) = (m.rows(), m.cols());
    let owned = |dtype, shape: Vec<usize>, bytes| Owned {
        dtype,
        shape,
        bytes,
    };
    let scale = |shape: Vec<usize>, v: &[f32]| Some(owned(Dtype::F32, shape, f32_bytes(v)));
    match m.data() {
        QData::Fp8 { q, scales } => (
            owned(Dtype::F8_E4M3, vec![rows, cols], q.to_vec()),
            match fp8_scale {
                Fp8Scale::Tensor => scale(vec![], &scales[..1]),
                Fp8Scale::Channel => scale(vec![rows, 1], scales),
            },
        ),
        QData::Int8 { q, scales } => (
            owned(
                Dtype::I8,
                vec![rows, cols],
                q.iter().map(|&v| v as u8).collect(),
            ),
            scale(vec![rows, 1], scales),
        ),
        QData::Q4 { packed, scales } => {
            let groups = scales.len() / rows.max(1);
            (
                owned(Dtype::U8, vec![rows, groups * 16], packed.to_vec()),
                scale(vec![rows, groups], scales),
            )
        }
        QData::F16(bits) => (
            owned(
                Dtype::F16,
                vec![rows, cols],
                bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            ),
            None,
        ),
        QData::F32(v) => (owned(Dtype::F32, vec![rows, cols], f32_bytes(v)), None),
    }
}

fn quantization_config(format: WeightFormat, fp8_scale: Fp8Scale) -> serde_json::Value {
    match format {
        WeightFormat::Fp8 => serde_json::json!({
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_scale_granularity": if fp8_scale == Fp8Scale::Tensor { "tensor" } else { "channel" },
            "ignored_layers": ["lm_head"],
            "quantized_by": "skymoe",
        }),
        WeightFormat::Int8 => serde_json::json!({
            "quant_method": "skymoe",
            "format": "int8",
            "weight_scale_granularity": "channel",
        }),
        WeightFormat::Q4 => serde_json::json!({
            "quant_method": "skymoe",
            "format": "q4",
            "group_size": skymoe_kernels::quant::Q4_GROUP,
        }),
        WeightFormat::F16 | WeightFormat::F32 => serde_json::Value::Null,
    }
}

/// Quantise the checkpoint at `src` into a new model directory `out`.
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    format: WeightFormat,
    fp8_scale: Fp8Scale,
) -> Result<QuantizeSummary> {
    let ckpt = Checkpoint::open(src, &Device::Cpu)?;
    let c = &ckpt.config;
    let projections = projection_names(c);
    let mut tensors: BTreeMap<String, Owned> = BTreeMap::new();
    let (mut quantized, mut kept, mut before) = (0, 0, 0);
    let names = ckpt.weights.names();
    let present: BTreeSet<&String> = names.iter().collect();
    for (name, &(rows, cols)) in &projections {
        if !present.contains(name) {
            return Err(skymoe_model::ModelError::MissingTensor { name: name.clone() }.into());
        }
        let stored = ckpt.weights.quantized(name, rows, cols)?;
        let m = match stored {
            Some(q) if q.format() == format => q,
            Some(q) => QMatrix::quantize(&q.dequantize(), rows, cols, format)?,
            None => {
                let w = ckpt
                    .weights
                    .get(name, &[rows, cols], &Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                match (format, fp8_scale) {
                    (WeightFormat::Fp8, Fp8Scale::Tensor) => {
                        QMatrix::quantize_fp8_per_tensor(&w, rows, cols)?
                    }
                    _ => QMatrix::quantize(&w, rows, cols, format)?,
                }
            }
        };
        before += rows * cols * 4;
        let (w, s) = encode(&m, fp8_scale);
        tensors.insert(name.clone(), w);
        if let Some(s) = s {
            tensors.insert(scale_name(name), s);
        }
        quantized += 1;
    }
    for name in &names {
        if projections.contains_key(name)
            || name.ends_with("_scale") && projections.contains_key(name.trim_end_matches("_scale"))
        {
            continue;
        }
        let shape = tensor_shape(&ckpt.weights, name)?;
        let t = ckpt.weights.get(name, &shape, &Device::Cpu)?;
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        before += v.len() * 4;
        tensors.insert(
            name.clone(),
            Owned {
                dtype: Dtype::F32,
                shape,
                bytes: f32_bytes(&v),
            },
        );
        kept += 1;
    }
    let after: usize = tensors.values().map(|t| t.bytes.len()).sum();
    let mut config = match &ckpt.gguf_metadata {
        None => {
            let path = ckpt.path.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| ServeError::InvalidInput(format!("{}: {e}", path.display())))?
        }
        Some(_) => c.to_hf_json(),
    };
    let qc = quantization_config(format, fp8_scale);
    if let Some(obj) = config.as_object_mut() {
        if qc.is_null() {
            obj.remove("quantization_config");
        } else {
            obj.insert("quantization_config".into(), qc);
        }
        if format == WeightFormat::F16 {
            obj.insert("torch_dtype".into(), "float16".into());
        }
    }
    skymoe_model::fsutil::write_dir_atomically(out, io_error, |dir| {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, t)| {
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ServeError::InvalidInput(format!("tensor {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let file = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &file).map_err(|e| {
            ServeError::InvalidInput(format!("cannot write {}: {e}", file.display()))
        })?;
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(io(&file))?;
        let cfg = serde_json::to_vec_pretty(&config)
            .map_err(|e| ServeError::InvalidInput(e.to_string()))?;
        write_synced(&dir.join("config.json"), &cfg)?;
        if ckpt.path.is_dir() {
            // tokenizer.json and/or tokenizer.model with their configs.
            skymoe_model::tokenizer::copy_tokenizer_files(&ckpt.path, dir)?;
            let from = ckpt.path.join("generation_config.json");
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(io(&from))?;
                write_synced(&dir.join("generation_config.json"), &bytes)?;
            }
            for entry in std::fs::read_dir(&ckpt.path)
                .map_err(io(&ckpt.path))?
                .flatten()
            {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "py") {
                    let bytes = std::fs::read(&p).map_err(io(&p))?;
                    write_synced(&dir.join(entry.file_name()), &bytes)?;
                }
            }
        } else if let Some(meta) = &ckpt.gguf_metadata {
            let tok = Tokenizer::from_gguf(meta)?;
            let file = dir.join("tokenizer.json");
            tok.inner().save(&file, false).map_err(|e| {
                ServeError::InvalidInput(format!("cannot write {}: {e}", file.display()))
            })?;
        }
        Ok(())
    })?;
    Ok(QuantizeSummary {
        out: out.to_path_buf(),
        quantized,
        kept,
        bytes_before: before,
        bytes_after: after,
    })
}

fn tensor_shape(w: &WeightSource, name: &str) -> Result<Vec<usize>> {
    Ok(w.shape(name)?)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    skymoe_model::fsutil::write_synced(path, bytes, io_error)
}

fn io_error(path: &Path, source: std::io::Error) -> ServeError {
    ServeError::Io {
        path: path.to_path_buf(),
        source,
    }
}
