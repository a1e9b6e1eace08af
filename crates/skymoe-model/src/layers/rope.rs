//! Rotary position embedding frequencies: the default schedule and the scaled variants that
//! Hugging Face configs name in `rope_scaling` (older spelling, `type` or `rope_type`) or
//! `rope_parameters` (transformers 5): `linear`, `dynamic`, `ntk`, `llama3` and `yarn`.
//!
//! Everything here is computed in f32 in the order transformers 5 computes it
//! (`modeling_rope_utils.py`), so that the cos/sin tables, and with them the logits, agree
//! with transformers to float32 rounding. Every executor (the autograd model, the serving
//! model, the model-parallel stages) takes its tables from [`RopeSpec`].
//!
//! # Dynamic NTK and the KV cache
//!
//! transformers recomputes the dynamic NTK base at every forward pass from the current length
//! `max(position) + 1` and rotates only that pass's queries and keys with it; keys already in
//! the cache keep the rotation they were written with. skymoe does the same, statelessly: the
//! positions `start..start + len` of one forward pass are rotated with the base for the length
//! `start + len` (the default frequencies while that length is at most
//! `max_position_embeddings`). A one-pass forward of a whole sequence therefore equals
//! transformers' exactly, and so does a prefill followed by token-by-token decoding, which is
//! what transformers' `generate` runs. Splitting a prompt into several chunks rotates each
//! chunk with the base of its own end, as transformers would if fed the same chunks.

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// How a model scales its rotary position embedding beyond the context it was trained on.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No scaling: `inv_freq[i] = 1/θ^(2i/d)`.
    Default,
    /// Position interpolation: every frequency divided by `factor` (positions divided by it).
    Linear {
        /// Interpolation factor.
        factor: f64,
    },
    /// Dynamic NTK: once a sequence is longer than `max_position_embeddings`, the base becomes
    /// `θ·((factor·len/max_pos) − (factor − 1))^(d/(d−2))` for its current length `len`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// Fixed NTK-aware scaling: the base becomes `θ·factor^(d/(d−2))` at every length. This is
    /// the `{"type": "ntk", "factor": …}` scaling of Skywork-13B's remote modeling code
    /// (`modeling_skywork.py`), which transformers has no class for.
    Ntk {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, the band between them
    /// interpolated smoothly.
    Llama3 {
        /// Division of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
    },
    /// YaRN: frequencies blended between extrapolation and interpolation by a linear ramp over
    /// the dimensions, and cos/sin multiplied by an attention factor.
    Yarn {
        /// Interpolation factor.
        factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
        /// Rotations at which the ramp starts (extrapolation only above it); 32 by default.
        beta_fast: f64,
        /// Rotations at which the ramp ends (interpolation only below it); 1 by default.
        beta_slow: f64,
        /// DeepSeek-style `mscale` (used with `mscale_all_dim` for the attention factor).
        mscale: Option<f64>,
        /// DeepSeek-style `mscale_all_dim`.
        mscale_all_dim: Option<f64>,
        /// Explicit factor on cos/sin; when absent it is derived from `factor` (and mscale).
        attention_factor: Option<f64>,
        /// Round the ramp's ends to whole dimensions (transformers' default `true`).
        truncate: bool,
    },
}

fn num(r: &Map<String, Value>, key: &str) -> Option<f64> {
    r.get(key).and_then(Value::as_f64)
}

impl RopeScaling {
    /// The type name used in `config.json` (`rope_type`).
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Ntk { .. } => "ntk",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }

    /// Parse the rope section of a `config.json`: `rope_scaling` when it is a non-empty object,
    /// else `rope_parameters` (as transformers 5 reads them). A top-level
    /// `original_max_position_embeddings` takes precedence over the one inside, and the one
    /// inside defaults to `max_position_embeddings`, as in transformers. Unknown types, missing
    /// or invalid keys are errors naming the key.
    pub fn from_hf_json(v: &Value, origin: &Path, max_position_embeddings: usize) -> Result<Self> {
        let Some(r) = rope_section(v) else {
            return Ok(RopeScaling::Default);
        };
        let section = if v.get("rope_scaling").is_some_and(|s| Some(s) == r.1) {
            "rope_scaling"
        } else {
            "rope_parameters"
        };
        let r = r.0;
        let err = |msg: String| ModelError::config(origin, format!("`{section}`: {msg}"));
        let kind = match r.get("rope_type").or_else(|| r.get("type")) {
            None => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(err(format!("`rope_type` must be a string, found {other}"))),
        };
        if let Some(p) = num(r, "partial_rotary_factor").filter(|&p| p != 1.0) {
            return Err(err(format!(
                "`partial_rotary_factor` {p} is not supported (only 1.0: the whole head rotates)"
            )));
        }
        let factor = |required: bool| -> Result<Option<f64>> {
            match r.get("factor") {
                None if required => {
                    Err(err(format!("rope type `{kind}` requires the key `factor`")))
                }
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(f) if f.is_finite() && f > 0.0 => Ok(Some(f)),
                    _ => Err(err(format!(
                        "`factor` must be a positive number, found {x}"
                    ))),
                },
            }
        };
        let need_factor = || -> Result<f64> {
            factor(true)?.ok_or_else(|| err(format!("`factor` of rope type `{kind}` is null")))
        };
        let original = || -> Result<usize> {
            let top = v.get("original_max_position_embeddings");
            match top.or_else(|| r.get("original_max_position_embeddings")) {
                None => Ok(max_position_embeddings),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        err(format!(
                        "`original_max_position_embeddings` must be a positive integer, found {x}"
                    ))
                    }),
            }
        };
        let opt = |key: &str| -> Result<Option<f64>> {
            match r.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(Some)
                    .ok_or_else(|| err(format!("`{key}` must be a number, found {x}"))),
            }
        };
        let need = |key: &str| -> Result<f64> {
            opt(key)?.ok_or_else(|| err(format!("rope type `{kind}` requires the key `{key}`")))
        };
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need_factor()?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: need_factor()?,
            },
            "ntk" => RopeScaling::Ntk {
                factor: need_factor()?,
            },
            "llama3" => {
                // transformers requires `original_max_position_embeddings` in the dict only
                // after filling it in from `max_position_embeddings`.
                let low = need("low_freq_factor")?;
                let high = need("high_freq_factor")?;
                if high <= low {
                    return Err(err(format!(
                        "`high_freq_factor` ({high}) must be greater than `low_freq_factor` ({low})"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: need_factor()?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original()?,
                }
            }
            "yarn" => {
                let original = original()?;
                // A null factor is the ratio of the context lengths (DeepSeek-V3 style).
                let factor = factor(true)?
                    .unwrap_or(max_position_embeddings as f64 / original as f64);
                // transformers reads `rope_parameters.get("truncate", True)` as a truth value.
                let truncate = match r.get("truncate") {
                    None => true,
                    Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => return Err(err(format!("`truncate` must be a boolean, found {x}"))),
                };
                // transformers reads `beta_fast or 32`, `beta_slow or 1`: zero means the default.
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: opt("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: opt("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    mscale: opt("mscale")?,
                    mscale_all_dim: opt("mscale_all_dim")?,
                    attention_factor: opt("attention_factor")?,
                    truncate,
                }
            }
            other => {
                return Err(err(format!(
                    "rope type `{other}` is not supported (supported: default, linear, dynamic, ntk, llama3, yarn)"
                )))
            }
        })
    }

    /// The `rope_parameters` object for `config.json` (transformers 5 spelling), with `theta`.
    pub fn to_hf_json(&self, theta: f64) -> Value {
        let mut o = Map::new();
        o.insert("rope_type".into(), self.name().into());
        o.insert("rope_theta".into(), theta.into());
        let mut put = |k: &str, x: Value| {
            o.insert(k.into(), x);
        };
        match self {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Ntk { factor } => put("factor", (*factor).into()),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                put("factor", (*factor).into());
                put("low_freq_factor", (*low_freq_factor).into());
                put("high_freq_factor", (*high_freq_factor).into());
                put(
                    "original_max_position_embeddings",
                    (*original_max_position_embeddings).into(),
                );
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                put("factor", (*factor).into());
                put(
                    "original_max_position_embeddings",
                    (*original_max_position_embeddings).into(),
                );
                put("beta_fast", (*beta_fast).into());
                put("beta_slow", (*beta_slow).into());
                if let Some(m) = mscale {
                    put("mscale", (*m).into());
                }
                if let Some(m) = mscale_all_dim {
                    put("mscale_all_dim", (*m).into());
                }
                if let Some(a) = attention_factor {
                    put("attention_factor", (*a).into());
                }
                put("truncate", (*truncate).into());
            }
        }
        Value::Object(o)
    }

    /// Longest sequence a model with this scaling accepts, given its
    /// `max_position_embeddings`: that value for `default` and `llama3` (whose configs state
    /// the extended length there); at least `factor × max_position_embeddings` for `linear`,
    /// `dynamic` and `ntk`, whose configs keep the original length there; at least
    /// `factor × original_max_position_embeddings` for `yarn`.
    pub fn position_limit(&self, max_position_embeddings: usize) -> usize {
        let scaled = |factor: f64, len: usize| {
            let n = (factor * len as f64).ceil();
            if n.is_finite() && n > 0.0 {
                (n as usize).max(max_position_embeddings)
            } else {
                max_position_embeddings
            }
        };
        match self {
            RopeScaling::Default | RopeScaling::Llama3 { .. } => max_position_embeddings,
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Ntk { factor } => scaled(*factor, max_position_embeddings),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => scaled(*factor, *original_max_position_embeddings),
        }
    }
}

/// The rope object of a config: (`rope_scaling` if it is a non-empty object, else
/// `rope_parameters`), and the value it came from.
fn rope_section(v: &Value) -> Option<(&Map<String, Value>, Option<&Value>)> {
    let scaling = v
        .get("rope_scaling")
        .filter(|s| s.as_object().is_some_and(|o| !o.is_empty()));
    let chosen = scaling.or_else(|| v.get("rope_parameters"));
    chosen.and_then(Value::as_object).map(|o| (o, chosen))
}

/// The rope base frequency of a `config.json`: `rope_theta` inside the rope section (as
/// transformers 5 gives it priority), else at the top level, else 10000.
pub fn rope_theta_from_hf_json(v: &Value) -> f64 {
    rope_section(v)
        .and_then(|(r, _)| num(r, "rope_theta"))
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .or_else(|| {
            v.get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10000.0)
}

/// Inverse frequencies of one rotary embedding and the factor on its cos/sin.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// `head_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
}

/// Everything that fixes a model's rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    /// Width of one attention head (the whole head rotates).
    pub head_dim: usize,
    /// Base frequency θ.
    pub theta: f64,
    /// `max_position_embeddings` of the config.
    pub max_position_embeddings: usize,
    /// The scaling.
    pub scaling: RopeScaling,
}

/// `base^(2i/d)` for `i < d/2` in f32, as `base ** (arange(0, d, 2).float() / d)`.
fn powers(base: f32, head_dim: usize) -> impl Iterator<Item = f32> {
    (0..head_dim / 2).map(move |i| base.powf((2 * i) as f32 / head_dim as f32))
}

fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    powers(theta as f32, head_dim).map(|p| 1.0 / p).collect()
}

/// YaRN's attention factor for scale `s`: `0.1·m·ln s + 1` (1 for `s ≤ 1`).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl RopeSpec {
    /// The rotary embedding of a model configuration.
    pub fn from_config(c: &ModelConfig) -> Self {
        RopeSpec {
            head_dim: c.head_dim,
            theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings.max(1),
            scaling: c.rope_scaling.clone(),
        }
    }

    /// Longest sequence the model accepts (see [`RopeScaling::position_limit`]).
    pub fn max_positions(&self) -> usize {
        self.scaling.position_limit(self.max_position_embeddings)
    }

    /// Whether the frequencies depend on the sequence length (dynamic NTK).
    pub fn is_dynamic(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. })
    }

    /// The dynamic NTK base for a sequence of `seq_len` positions, `None` for other types or
    /// while `seq_len ≤ max_position_embeddings` (the default frequencies apply). Computed in
    /// f32 in transformers' order: `θ·((factor·len)/max_pos − (factor − 1))^(d/(d−2))`.
    pub fn dynamic_base(&self, seq_len: usize) -> Option<f32> {
        let RopeScaling::Dynamic { factor } = self.scaling else {
            return None;
        };
        if seq_len <= self.max_position_embeddings {
            return None;
        }
        let d = self.head_dim;
        let ratio = (factor as f32 * seq_len as f32) / self.max_position_embeddings as f32
            - (factor - 1.0) as f32;
        let exponent = (d as f64 / (d as f64 - 2.0)) as f32;
        Some(self.theta as f32 * ratio.powf(exponent))
    }

    /// Inverse frequencies and cos/sin factor for a forward pass whose last position is
    /// `seq_len − 1` (only dynamic NTK depends on it).
    pub fn frequencies(&self, seq_len: usize) -> RopeFrequencies {
        let d = self.head_dim;
        let mut attention_scaling = 1.0f32;
        let inv_freq = match &self.scaling {
            RopeScaling::Default => default_inv_freq(self.theta, d),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                default_inv_freq(self.theta, d)
                    .into_iter()
                    .map(|x| x / f)
                    .collect()
            }
            RopeScaling::Dynamic { .. } => match self.dynamic_base(seq_len) {
                Some(base) => powers(base, d).map(|p| 1.0 / p).collect(),
                None => default_inv_freq(self.theta, d),
            },
            RopeScaling::Ntk { factor } => {
                let base = self.theta * factor.powf(d as f64 / (d as f64 - 2.0));
                default_inv_freq(base, d)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let f = *factor as f32;
                let low = *low_freq_factor as f32;
                let span = (high_freq_factor - low_freq_factor) as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                default_inv_freq(self.theta, d)
                    .into_iter()
                    .map(|inv| {
                        // `c / t` on a tensor is `reciprocal(t) · c` in torch.
                        let wavelen = (1.0 / inv) * two_pi;
                        let scaled = if wavelen > low_wavelen { inv / f } else { inv };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = ((1.0 / wavelen) * old as f32 - low) / span;
                            (1.0 - smooth) * scaled / f + smooth * scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                attention_scaling =
                    attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                            yarn_mscale(*factor, *m) / yarn_mscale(*factor, *a)
                        }
                        _ => yarn_mscale(*factor, 1.0),
                    }) as f32;
                let dim = d as f64;
                let base = self.theta;
                let original = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let (low32, width) = (low as f32, (high - low) as f32);
                let f = *factor as f32;
                powers(base as f32, d)
                    .enumerate()
                    .map(|(i, p)| {
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (f * p);
                        let ramp = ((i as f32 - low32) / width).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        interpolation * (1.0 - extra) + extrapolation * extra
                    })
                    .collect()
            }
        };
        RopeFrequencies {
            inv_freq,
            attention_scaling,
        }
    }

    /// The table every forward pass uses, except dynamic NTK passes that end beyond
    /// `max_position_embeddings` (see [`RopeSpec::span_table`]): positions
    /// `0..max_positions()`.
    pub fn table(&self) -> RopeTable {
        RopeTable::new(
            &self.frequencies(self.max_position_embeddings),
            0,
            self.max_positions(),
        )
    }

    /// For dynamic NTK, the table of positions `start..start + len` of a forward pass ending
    /// at `start + len`, when that is beyond `max_position_embeddings`; `None` when
    /// [`RopeSpec::table`] applies.
    pub fn span_table(&self, start: usize, len: usize) -> Option<RopeTable> {
        let end = start + len;
        self.dynamic_base(end)?;
        Some(RopeTable::new(&self.frequencies(end), start, len))
    }
}

/// cos/sin of `position · inv_freq` (× the attention factor), for positions
/// `first..first + rows`, each row `head_dim / 2` wide.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// First position covered.
    pub first: usize,
    /// Half the head width.
    pub half: usize,
    /// `rows × half` cosines.
    pub cos: Vec<f32>,
    /// `rows × half` sines.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// The table of positions `first..first + rows` for `freqs`, in f32 as transformers
    /// computes it: `angle = pos · inv_freq`, then `cos(angle) · scaling`.
    pub fn new(freqs: &RopeFrequencies, first: usize, rows: usize) -> Self {
        let half = freqs.inv_freq.len();
        let mut cos = Vec::with_capacity(rows * half);
        let mut sin = Vec::with_capacity(rows * half);
        let s = freqs.attention_scaling;
        for p in first..first + rows {
            for f in &freqs.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * s);
                sin.push(a.sin() * s);
            }
        }
        RopeTable {
            first,
            half,
            cos,
            sin,
        }
    }

    /// Positions covered.
    pub fn rows(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }

    /// Whether position `pos` is in the table.
    pub fn covers(&self, pos: usize) -> bool {
        pos >= self.first && pos < self.first + self.rows()
    }

    /// Rotate one head vector (`2·half` wide, "rotate_half" layout) in place for position
    /// `pos`, which must be covered.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let r = pos - self.first;
        let (c, s) = (&self.cos[r * h..(r + 1) * h], &self.sin[r * h..(r + 1) * h]);
        let (lo, hi) = x.split_at_mut(h);
        for i in 0..h {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * c[i] - b * s[i];
            hi[i] = b * c[i] + a * s[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(scaling: RopeScaling) -> RopeSpec {
        RopeSpec {
            head_dim: 16,
            theta: 10000.0,
            max_position_embeddings: 8,
            scaling,
        }
    }

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                ((*x as f64) - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "{a:?} vs {b:?}"
            );
        }
    }

    fn default_f64(base: f64) -> Vec<f64> {
        (0..8)
            .map(|i| base.powf(-(2.0 * i as f64) / 16.0))
            .collect()
    }

    #[test]
    fn default_and_linear() {
        close(
            &spec(RopeScaling::Default).frequencies(100).inv_freq,
            &default_f64(10000.0),
        );
        let lin = spec(RopeScaling::Linear { factor: 4.0 }).frequencies(5);
        let want: Vec<f64> = default_f64(10000.0).iter().map(|x| x / 4.0).collect();
        close(&lin.inv_freq, &want);
        assert_eq!(lin.attention_scaling, 1.0);
    }

    #[test]
    fn ntk_changes_the_base_once() {
        let base = 10000.0 * 4f64.powf(16.0 / 14.0);
        let s = spec(RopeScaling::Ntk { factor: 4.0 });
        close(&s.frequencies(1).inv_freq, &default_f64(base));
        assert_eq!(s.frequencies(1), s.frequencies(1000));
    }

    #[test]
    fn dynamic_base_follows_the_length() {
        let s = spec(RopeScaling::Dynamic { factor: 4.0 });
        assert_eq!(s.dynamic_base(8), None);
        assert_eq!(s.frequencies(8), spec(RopeScaling::Default).frequencies(8));
        let b = s.dynamic_base(24).unwrap() as f64;
        let want = 10000.0 * (4.0f64 * 24.0 / 8.0 - 3.0).powf(16.0 / 14.0);
        assert!((b - want).abs() / want < 1e-6, "{b} vs {want}");
        close(&s.frequencies(24).inv_freq, &default_f64(want));
        assert!(s.span_table(0, 8).is_none());
        let t = s.span_table(20, 4).unwrap();
        assert_eq!((t.first, t.rows()), (20, 4));
        assert_eq!(t, RopeTable::new(&s.frequencies(24), 20, 4));
    }

    #[test]
    fn llama3_keeps_high_scales_low_and_smooths_between() {
        let s = RopeSpec {
            max_position_embeddings: 64,
            ..spec(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            })
        };
        let got = s.frequencies(1).inv_freq;
        let base = default_f64(10000.0);
        // wavelength 2π (< 32/4): kept; 2π·10 (> 32): divided by 8
        close(&got[..1], &base[..1]);
        close(
            &got[2..],
            &base[2..].iter().map(|x| x / 8.0).collect::<Vec<_>>(),
        );
        let wavelen = 2.0 * std::f64::consts::PI / base[1];
        let smooth = (32.0 / wavelen - 1.0) / 3.0;
        close(
            &got[1..2],
            &[(1.0 - smooth) * base[1] / 8.0 + smooth * base[1]],
        );
    }

    #[test]
    fn yarn_ramp_and_attention_factor() {
        let yarn = |attention_factor, mscale, mscale_all_dim| {
            spec(RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 8,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate: true,
            })
            .frequencies(1)
        };
        let f = yarn(None, None, None);
        assert!((f.attention_scaling as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-7);
        // The correction range is [0, 1]: dimension 0 extrapolates, the rest interpolate.
        let base = default_f64(10000.0);
        close(&f.inv_freq[..1], &base[..1]);
        close(
            &f.inv_freq[1..],
            &base[1..].iter().map(|x| x / 4.0).collect::<Vec<_>>(),
        );
        assert_eq!(yarn(Some(1.25), None, None).attention_scaling, 1.25);
        let m = yarn(None, Some(1.0), Some(0.5)).attention_scaling as f64;
        let want = (0.1 * 4f64.ln() + 1.0) / (0.05 * 4f64.ln() + 1.0);
        assert!((m - want).abs() < 1e-7);
    }

    #[test]
    fn position_limits() {
        assert_eq!(RopeScaling::Default.position_limit(8), 8);
        assert_eq!(RopeScaling::Dynamic { factor: 4.0 }.position_limit(8), 32);
        assert_eq!(RopeScaling::Linear { factor: 0.5 }.position_limit(8), 8);
        let yarn = RopeScaling::from_hf_json(
            &json!({"rope_scaling": {"type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 16}}),
            Path::new("c"),
            32,
        )
        .unwrap();
        assert_eq!(yarn.position_limit(32), 64);
    }

    fn parse(v: Value) -> Result<RopeScaling> {
        RopeScaling::from_hf_json(&v, Path::new("config.json"), 8)
    }

    #[test]
    fn both_spellings_parse_and_round_trip() {
        let old = parse(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
        let new =
            parse(json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0}})).unwrap();
        assert_eq!(old, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(old, new);
        let yarn = parse(
            json!({"rope_parameters": {"rope_type": "yarn", "factor": null,
            "original_max_position_embeddings": 2, "beta_fast": 0}}),
        )
        .unwrap();
        assert!(
            matches!(yarn, RopeScaling::Yarn { factor, beta_fast, truncate: true, .. }
            if factor == 4.0 && beta_fast == 32.0)
        );
        for s in [old, yarn, RopeScaling::Default] {
            let back = parse(json!({"rope_parameters": s.to_hf_json(10000.0)})).unwrap();
            assert_eq!(back, s);
        }
        // An empty `rope_scaling` defers to `rope_parameters`; a top-level original length wins.
        let v = json!({"rope_scaling": {}, "original_max_position_embeddings": 4,
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 2, "rope_theta": 5.0}});
        assert!(matches!(
            parse(v.clone()).unwrap(),
            RopeScaling::Llama3 {
                original_max_position_embeddings: 4,
                ..
            }
        ));
        assert_eq!(rope_theta_from_hf_json(&v), 5.0);
    }

    #[test]
    fn bad_rope_dicts_name_the_key() {
        let msg = |v: Value| parse(v).unwrap_err().to_string();
        assert!(
            msg(json!({"rope_scaling": {"type": "longrope", "factor": 2.0}})).contains("longrope")
        );
        assert!(msg(json!({"rope_scaling": {"type": "linear"}})).contains("`factor`"));
        assert!(
            msg(json!({"rope_parameters": {"rope_type": "dynamic", "factor": "x"}}))
                .contains("`factor`")
        );
        assert!(msg(
            json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
            "high_freq_factor": 4.0}})
        )
        .contains("`low_freq_factor`"));
        assert!(
            msg(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
            "original_max_position_embeddings": -1}}))
            .contains("`original_max_position_embeddings`")
        );
        assert!(
            msg(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": 1}}))
                .contains("`truncate`")
        );
        assert!(msg(json!({"rope_scaling": {"rope_type": 3}})).contains("`rope_type`"));
        assert!(msg(
            json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
            "partial_rotary_factor": 0.5}})
        )
        .contains("partial_rotary_factor"));
    }
}
