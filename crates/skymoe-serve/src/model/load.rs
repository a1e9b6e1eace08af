//! Building a [`ServeModel`] from a checkpoint: each projection is read once (as f32, or as
//! stored when the checkpoint is already in the target format, so fp8/int8/q4 checkpoints
//! load bit-exactly) and converted to the target format; the router gate, norms and biases
//! stay in f32.
//!
//! GGUF files loaded "as stored" (`format` `None`) keep every projection, the embedding and the
//! LM head whose ggml type skymoe's kernels serve (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
//! Q6_K) as the file's own blocks, read in place from its memory map; stacked projections
//! (q/k/v, gate/up) of different ggml types become row-segmented matrices. Matrices of other
//! types (F32, F16, BF16, Q2_K, Q3_K) are dequantised and converted to [`stored_format`]'s
//! format, as is everything a requested `format` asks for.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Device;
use safetensors::Dtype;
use skymoe_kernels::quant::{QMatrix, WeightFormat};
use skymoe_model::config::MlaConfig;
use skymoe_model::names::{self, SwiGluNames};
use skymoe_model::weights::pytorch::TorchDtype;
use skymoe_model::weights::WeightSource;
use skymoe_model::{Checkpoint, ModelConfig};

use std::ops::Range;

use super::attention::{HeadShape, Rope};
use super::linear::QLinear;
use super::mla::{MlaLayer, MlaQueries};
use super::moe::{Ffn, Mlp, MoeFfn, RouterGate};
use super::tp::TensorParallel;
use super::{LayerAttention, ServeLayer, ServeModel};
use crate::error::Result;

/// The format a checkpoint's projections are stored in: f16 for bf16/f16 safetensors and
/// PyTorch files. For a GGUF file, whose quantised projections are served as stored ggml
/// blocks, the format of the matrices that are not (those in F32, F16/BF16 or a ggml type the
/// kernels do not serve): f32 for an F32 file, else f16.
pub fn stored_format(ckpt: &Checkpoint) -> WeightFormat {
    // Every family has an output projection (latent attention has no q_proj with a query
    // bottleneck).
    let probe = names::layer(0, "self_attn.o_proj.weight");
    let st = match &ckpt.weights {
        WeightSource::Safetensors(st) => st,
        // bf16/f16 PyTorch checkpoints are served in 16 bits, as their safetensors form is.
        WeightSource::Pytorch(p) => {
            return match p.dtype(&probe) {
                Ok(TorchDtype::F16) | Ok(TorchDtype::BF16) => WeightFormat::F16,
                _ => WeightFormat::F32,
            }
        }
        WeightSource::InMemory(_) => return WeightFormat::F32,
        WeightSource::Gguf(_) => {
            return match ckpt.weights.gguf_raw(&probe) {
                Ok(Some(raw)) if raw.ggml_type != 0 => WeightFormat::F16,
                _ => WeightFormat::F32,
            }
        }
    };
    match st.dtype(&probe) {
        Ok(Dtype::F8_E4M3) => WeightFormat::Fp8,
        Ok(Dtype::I8) => WeightFormat::Int8,
        Ok(Dtype::U8) => WeightFormat::Q4,
        Ok(Dtype::F16) | Ok(Dtype::BF16) => WeightFormat::F16,
        _ => WeightFormat::F32,
    }
}

/// The format of the embedding and LM head for projections in `format`: as vLLM keeps the LM
/// head of FP8 checkpoints unquantised, fp8 models keep it (and the tied embedding) in f16;
/// as llama.cpp gives 4-bit models a higher-precision output matrix, q4 models use int8.
pub fn head_format(format: WeightFormat) -> WeightFormat {
    match format {
        WeightFormat::Fp8 => WeightFormat::F16,
        WeightFormat::Q4 => WeightFormat::Int8,
        other => other,
    }
}

struct Reader<'a> {
    weights: &'a WeightSource,
    format: WeightFormat,
    /// Serve ggml blocks as stored (a GGUF file loaded without a requested format).
    stored: bool,
    tp: Option<&'a TensorParallel>,
}

impl Reader<'_> {
    fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.weights.get(name, shape, &Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A matrix in exactly `format` (as stored when it already is).
    fn matrix_as(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<QMatrix> {
        if let Some(q) = self.weights.quantized(name, rows, cols)? {
            if q.format() == format {
                return Ok(q);
            }
            return Ok(QMatrix::quantize(&q.dequantize(), rows, cols, format)?);
        }
        if format == WeightFormat::F16 {
            // f16 as stored, read in place.
            if let Some(q) = self.weights.f16_matrix(name, rows, cols)? {
                return Ok(q);
            }
        }
        Ok(QMatrix::quantize(
            &self.vec(name, &[rows, cols])?,
            rows,
            cols,
            format,
        )?)
    }

    /// A served matrix: its ggml blocks as stored when serving so, else in `format`.
    fn serving(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<QMatrix> {
        if self.stored {
            if let Some(q) = self.weights.quantized(name, rows, cols)? {
                if q.format().is_ggml() {
                    return Ok(q);
                }
            }
        }
        self.matrix_as(name, rows, cols, format)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        self.serving(name, rows, cols, self.format)
    }

    /// The block `rows × cols` of a `[all_rows, all_cols]` matrix, in the target format (the
    /// whole matrix read as stored when the block is all of it; stored ggml rows are sliced in
    /// place when the block is whole rows).
    fn block(
        &self,
        name: &str,
        (all_rows, all_cols): (usize, usize),
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<QMatrix> {
        if rows == (0..all_rows) && cols == (0..all_cols) {
            return self.matrix(name, all_rows, all_cols);
        }
        let stored = self.weights.quantized(name, all_rows, all_cols)?;
        if let (true, true, Some(q)) = (self.stored, cols == (0..all_cols), &stored) {
            if let Some([seg]) = q.ggml_segments() {
                if let Some(part) = seg.slice_rows(rows.clone()) {
                    return Ok(QMatrix::from_ggml(part));
                }
            }
        }
        let full = match stored {
            Some(q) => q.dequantize(),
            None => self.vec(name, &[all_rows, all_cols])?,
        };
        let mut part = Vec::with_capacity(rows.len() * cols.len());
        for r in rows.clone() {
            part.extend_from_slice(&full[r * all_cols + cols.start..r * all_cols + cols.end]);
        }
        Ok(QMatrix::quantize(
            &part,
            rows.len(),
            cols.len(),
            self.format,
        )?)
    }

    /// Rows `rows` of several matrices of width `cols`, stacked. Stored ggml parts stack
    /// whatever their types; when only some parts are ggml (a file mixing quantised and float
    /// projections), those are converted to the target format too.
    fn stacked(&self, parts: &[(&str, usize, Range<usize>)], cols: usize) -> Result<QMatrix> {
        let mut mats = parts
            .iter()
            .map(|(name, rows, range)| self.block(name, (*rows, cols), range.clone(), 0..cols))
            .collect::<Result<Vec<_>>>()?;
        let ggml = mats.iter().filter(|m| m.format().is_ggml()).count();
        if ggml > 0 && ggml < mats.len() {
            for m in mats.iter_mut().filter(|m| m.format().is_ggml()) {
                *m = QMatrix::quantize(&m.dequantize(), m.rows(), m.cols(), self.format)?;
            }
        }
        Ok(QMatrix::concat_rows(&mats)?)
    }

    /// This rank's columns of an FFN `ffn` wide (all of them without tensor parallelism).
    fn ffn_range(&self, ffn: usize) -> Result<Range<usize>> {
        match self.tp {
            Some(tp) => tp.range(ffn),
            None => Ok(0..ffn),
        }
    }

    /// Layer `i`'s latent attention: `q_a_proj` stacked over `kv_a_proj_with_mqa`, the query
    /// projection, the latent norm, and `kv_b_proj` split per head into absorbed keys and
    /// values.
    /// Under tensor parallelism, the rank's `heads` only: their query rows and their absorbed
    /// key and value matrices (the latent projections and norm are whole on every rank).
    fn mla(
        &self,
        c: &ModelConfig,
        dims: &MlaConfig,
        i: usize,
        heads: Range<usize>,
    ) -> Result<MlaLayer> {
        let h = c.hidden_size;
        let n = names::mla(i);
        let all = c.num_attention_heads;
        let dq = dims.qk_head_dim();
        let q_rows = heads.start * dq..heads.end * dq;
        let kv_rows = dims.kv_lora_rank + dims.qk_rope_head_dim;
        let (down, queries) = match dims.q_lora_rank {
            Some(q) => (
                self.stacked(
                    &[(&n.q_a_proj, q, 0..q), (&n.kv_a_proj, kv_rows, 0..kv_rows)],
                    h,
                )?,
                MlaQueries::LowRank {
                    norm: self.vec(&n.q_a_norm, &[q])?,
                    up: self.block(&n.q_b_proj, (all * dq, q), q_rows, 0..q)?,
                },
            ),
            None => (
                self.matrix(&n.kv_a_proj, kv_rows, h)?,
                MlaQueries::Direct(self.block(&n.q_proj, (all * dq, h), q_rows, 0..h)?),
            ),
        };
        let kv_up_rows = all * (dims.qk_nope_head_dim + dims.v_head_dim);
        // In the serving format first (as stored, or quantised as every projection is), so a
        // quantised checkpoint and the same model quantised while loading agree exactly.
        let kv_up = self
            .matrix(&n.kv_b_proj, kv_up_rows, dims.kv_lora_rank)?
            .dequantize();
        let (key_absorb, value_up) = MlaLayer::split_kv_up(&kv_up, heads, dims, self.format)?;
        Ok(MlaLayer {
            down,
            queries,
            kv_norm: self.vec(&n.kv_a_norm, &[dims.kv_lora_rank])?,
            key_absorb,
            value_up,
            dims: *dims,
        })
    }

    fn mlp(&self, n: &SwiGluNames, hidden: usize, ffn: usize) -> Result<Mlp> {
        let cols = self.ffn_range(ffn)?;
        Ok(Mlp {
            gate_up: self.stacked(
                &[(&n.gate, ffn, cols.clone()), (&n.up, ffn, cols.clone())],
                hidden,
            )?,
            down: self.block(&n.down, (hidden, ffn), 0..hidden, cols)?,
        })
    }
}

impl ServeModel {
    /// Build from an opened checkpoint with projections in `format` (`None`: as stored).
    pub fn load(ckpt: &Checkpoint, format: Option<WeightFormat>) -> Result<ServeModel> {
        Self::load_sharded(ckpt, format, None)
    }

    /// [`ServeModel::load`] keeping only this rank's share of a tensor-parallel group.
    pub fn load_sharded(
        ckpt: &Checkpoint,
        format: Option<WeightFormat>,
        tp: Option<TensorParallel>,
    ) -> Result<ServeModel> {
        let stored = format.is_none() && matches!(ckpt.weights, WeightSource::Gguf(_));
        let format = format.unwrap_or_else(|| stored_format(ckpt));
        let c = ckpt.config.clone();
        let r = Reader {
            weights: &ckpt.weights,
            format,
            stored,
            tp: tp.as_ref(),
        };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let group = c.num_attention_heads / c.num_key_value_heads.max(1);
        let heads = match &tp {
            Some(tp) => tp.range(c.num_attention_heads)?,
            None => 0..c.num_attention_heads,
        };
        let kv_heads = heads.start / group..(heads.end - 1) / group + 1;
        let mut shape = HeadShape {
            heads: heads.len(),
            kv_heads: kv_heads.len(),
            head_dim: hd,
            value_dim: hd,
            scale: c.attention_scale() as f32,
            first_head: heads.start,
            first_kv_head: kv_heads.start,
            group,
        };
        let (q_rows, kv_rows) = (
            heads.start * hd..heads.end * hd,
            kv_heads.start * hd..kv_heads.end * hd,
        );
        // A row-parallel projection's bias is added once: by rank 0.
        let first_rank = tp.as_ref().is_none_or(|t| t.comm.rank() == 0);
        let hf = head_format(format);
        let embed = Arc::new(r.serving(names::EMBED, c.vocab_size, h, hf)?);
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            Arc::new(r.serving(names::LM_HEAD, c.vocab_size, h, hf)?)
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = |s: &str| names::layer(i, s);
            let (qn, kn, vn, on) = (
                p("self_attn.q_proj.weight"),
                p("self_attn.k_proj.weight"),
                p("self_attn.v_proj.weight"),
                p("self_attn.o_proj.weight"),
            );
            let qkv_bias = if c.qkv_bias {
                let mut b = r.vec(&p("self_attn.q_proj.bias"), &[q])?[q_rows.clone()].to_vec();
                b.extend_from_slice(&r.vec(&p("self_attn.k_proj.bias"), &[kv])?[kv_rows.clone()]);
                b.extend_from_slice(&r.vec(&p("self_attn.v_proj.bias"), &[kv])?[kv_rows.clone()]);
                Some(b)
            } else {
                None
            };
            let o_bias = if c.o_bias && first_rank {
                Some(r.vec(&p("self_attn.o_proj.bias"), &[h])?)
            } else {
                None
            };
            let ffn = match (&c.moe, c.is_moe_layer(i)) {
                (Some(m), true) => {
                    let n = c.moe_names(i);
                    let e = m.num_experts;
                    let f32m =
                        |name: &str, rows, cols| r.matrix_as(name, rows, cols, WeightFormat::F32);
                    let gate = match &n.gate2 {
                        Some(g2) => {
                            RouterGate::TwoLayer(f32m(&n.gate, 8 * e, h)?, f32m(g2, e, 8 * e)?)
                        }
                        None => RouterGate::Linear(f32m(&n.gate, e, h)?),
                    };
                    let experts = n
                        .experts
                        .iter()
                        .map(|en| r.mlp(en, h, m.expert_intermediate_size))
                        .collect::<Result<Vec<_>>>()?;
                    let shared = match (&n.shared, m.shared_expert_intermediate_size) {
                        (Some(sn), Some(sf)) => Some((
                            r.mlp(&sn.ffn, h, sf)?,
                            match &sn.gate {
                                Some(g) => Some(r.vec(g, &[1, h])?),
                                None => None,
                            },
                        )),
                        _ => None,
                    };
                    if m.router.requires_selection_bias
                        && !r
                            .weights
                            .contains(&skymoe_model::layers::router::selection_bias_name(&n.gate))
                    {
                        return Err(crate::error::ServeError::InvalidInput(format!(
                            "{} routers select with a bias, and the checkpoint has no {}",
                            c.architecture.hf_class(),
                            skymoe_model::layers::router::selection_bias_name(&n.gate)
                        )));
                    }
                    // DeepSeek-V3's aux-loss-free balancing bias, when the checkpoint has one.
                    let bias_name = skymoe_model::layers::router::selection_bias_name(&n.gate);
                    let selection_bias = if r.weights.contains(&bias_name) {
                        Some(r.vec(&bias_name, &[e])?)
                    } else {
                        None
                    };
                    Ffn::Moe(Box::new(MoeFfn {
                        gate,
                        router: m.router.clone(),
                        top_k: m.top_k,
                        experts,
                        shared,
                        selection_bias,
                    }))
                }
                _ => Ffn::Dense(Box::new(r.mlp(
                    &c.dense_ffn_names(i),
                    h,
                    c.intermediate_size,
                )?)),
            };
            let (attention, o) = match &c.mla {
                Some(dims) => {
                    let mla = r.mla(&c, dims, i, heads.clone())?;
                    shape = mla.head_shape(heads.len(), c.attention_scale());
                    let v = dims.v_head_dim;
                    let o = QLinear {
                        weight: r.block(
                            &on,
                            (h, c.attention_output_width()),
                            0..h,
                            heads.start * v..heads.end * v,
                        )?,
                        bias: None,
                    };
                    (LayerAttention::Mla(Box::new(mla)), o)
                }
                None => (
                    LayerAttention::Gqa {
                        qkv: QLinear {
                            weight: r.stacked(
                                &[
                                    (&qn, q, q_rows.clone()),
                                    (&kn, kv, kv_rows.clone()),
                                    (&vn, kv, kv_rows.clone()),
                                ],
                                h,
                            )?,
                            bias: qkv_bias,
                        },
                        qk_norm: match c.qk_norm_sizes() {
                            // Over the whole projections: this rank's heads' part.
                            Some((qs, ks)) if c.qk_norm == skymoe_model::QkNorm::PerProjection => {
                                Some((
                                    r.vec(&names::q_norm(i), &[qs])?[q_rows.clone()].to_vec(),
                                    r.vec(&names::k_norm(i), &[ks])?[kv_rows.clone()].to_vec(),
                                ))
                            }
                            Some((qs, ks)) => Some((
                                r.vec(&names::q_norm(i), &[qs])?,
                                r.vec(&names::k_norm(i), &[ks])?,
                            )),
                            None => None,
                        },
                    },
                    QLinear {
                        weight: r.block(&on, (h, q), 0..h, q_rows.clone())?,
                        bias: o_bias,
                    },
                ),
            };
            layers.push(ServeLayer {
                input_norm: r.vec(&p("input_layernorm.weight"), &[h])?,
                attention,
                o,
                post_norm: r.vec(&p("post_attention_layernorm.weight"), &[h])?,
                ffn,
            });
        }
        Ok(ServeModel {
            final_norm: r.vec(names::FINAL_NORM, &[h])?,
            rope: Rope::new(&c),
            config: c,
            format,
            embed,
            lm_head,
            layers,
            shape,
            tp,
        })
    }
}

impl ServeModel {
    /// The weight matrices whose bytes [`ServeModel::weight_bytes`] counts (the embedding, the
    /// LM head unless tied, and every layer's projections; not the f32 router gates), each with
    /// a label such as `layers.3.qkv` or `layers.1.experts.5.gate_up`.
    pub fn weight_matrices(&self) -> Vec<(String, &QMatrix)> {
        let mut out: Vec<(String, &QMatrix)> = vec![("embed".into(), &*self.embed)];
        if !Arc::ptr_eq(&self.embed, &self.lm_head) {
            out.push(("lm_head".into(), &*self.lm_head));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("layers.{i}.{s}");
            match &l.attention {
                LayerAttention::Gqa { qkv, .. } => out.push((p("qkv"), &qkv.weight)),
                LayerAttention::Mla(m) => {
                    out.push((p("mla.down"), &m.down));
                    match &m.queries {
                        MlaQueries::LowRank { up, .. } => out.push((p("mla.q_up"), up)),
                        MlaQueries::Direct(q) => out.push((p("mla.q"), q)),
                    }
                    for (h, k) in m.key_absorb.iter().enumerate() {
                        out.push((p(&format!("mla.key_absorb.{h}")), k));
                    }
                    for (h, v) in m.value_up.iter().enumerate() {
                        out.push((p(&format!("mla.value_up.{h}")), v));
                    }
                }
            }
            out.push((p("o"), &l.o.weight));
            fn mlp<'a>(out: &mut Vec<(String, &'a QMatrix)>, prefix: String, m: &'a Mlp) {
                out.push((format!("{prefix}.gate_up"), &m.gate_up));
                out.push((format!("{prefix}.down"), &m.down));
            }
            match &l.ffn {
                Ffn::Dense(m) => mlp(&mut out, p("mlp"), m),
                Ffn::Moe(moe) => {
                    for (e, m) in moe.experts.iter().enumerate() {
                        mlp(&mut out, p(&format!("experts.{e}")), m);
                    }
                    if let Some((m, _)) = &moe.shared {
                        mlp(&mut out, p("shared_expert"), m);
                    }
                }
            }
        }
        out
    }

    /// How the weight matrices are stored: bytes per format (`q4_k` style names for ggml
    /// blocks served as stored, `gguf:mixed` for stacks of several ggml types, `f16` etc.),
    /// e.g. `{"gguf:Q4_K": …, "gguf:mixed": …, "gguf:Q6_K": …}` for a Q4_K_M file.
    pub fn weight_formats(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, m) in self.weight_matrices() {
            *out.entry(m.format().to_string()).or_insert(0) += m.storage_bytes();
        }
        out
    }
}
