//! Reading a run's `metrics.jsonl`: one JSON object per line, `"kind":"train"` or `"kind":"val"`.
//!
//! Unknown keys and unknown kinds are ignored, blank lines are skipped, `null` numbers (how
//! serde_json writes NaN) read as NaN, and a truncated last line (a killed run) is skipped with a
//! warning. Any other malformed line is an error naming its line number. When a step goes back
//! (a run resumed from an earlier checkpoint appends to the same log) the later records
//! supersede the earlier ones from that step on, with a warning.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::ReportError;

/// Name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One training step's metrics (`"kind":"train"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrainRecord {
    /// Optimiser step.
    pub step: u64,
    /// Tokens seen so far.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Total training loss (cross-entropy plus auxiliary losses); NaN if logged as `null`.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Cross-entropy part of the loss.
    #[serde(default)]
    pub ce: Option<f64>,
    /// Load-balancing auxiliary loss.
    #[serde(default)]
    pub aux_loss: Option<f64>,
    /// Router z-loss.
    #[serde(default)]
    pub z_loss: Option<f64>,
    /// Adaptive auxiliary-loss coefficient α, one per MoE layer (empty for a dense model).
    #[serde(default, deserialize_with = "vec_nan_if_null")]
    pub alpha: Vec<f64>,
    /// Fraction of tokens dropped by expert capacity, one per MoE layer.
    #[serde(default, deserialize_with = "vec_nan_if_null")]
    pub drop_rate: Vec<f64>,
    /// `expert_load[l][e]`: fraction of MoE layer `l`'s routed assignments that went to expert `e`.
    #[serde(default, deserialize_with = "matrix_nan_if_null")]
    pub expert_load: Vec<Vec<f64>>,
    /// Global gradient norm before clipping.
    #[serde(default)]
    pub grad_norm: Option<f64>,
    /// Learning rate.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Training throughput.
    #[serde(default)]
    pub tokens_per_s: Option<f64>,
    /// Wall-clock seconds since the start of the run.
    #[serde(default)]
    pub elapsed_s: Option<f64>,
}

/// One validation measurement (`"kind":"val"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ValRecord {
    /// Optimiser step at which validation ran.
    pub step: u64,
    /// Mean validation cross-entropy; NaN if logged as `null`.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// Validation perplexity (`exp(val_loss)` when absent).
    #[serde(default)]
    pub val_ppl: Option<f64>,
}

impl ValRecord {
    /// The perplexity: `val_ppl` if logged, else `exp(val_loss)`.
    pub fn ppl(&self) -> f64 {
        self.val_ppl.unwrap_or_else(|| self.val_loss.exp())
    }
}

/// Everything read from one run's metrics log.
#[derive(Debug, Clone, Default)]
pub struct RunMetrics {
    /// Training records in step order.
    pub train: Vec<TrainRecord>,
    /// Validation records in step order.
    pub val: Vec<ValRecord>,
    /// Problems that were tolerated (a truncated last line, steps going back).
    pub warnings: Vec<String>,
}

impl RunMetrics {
    /// Read `run_dir/metrics.jsonl`.
    pub fn load(run_dir: &Path) -> Result<Self, ReportError> {
        if !run_dir.is_dir() {
            return Err(ReportError::MissingRunDir {
                path: run_dir.to_path_buf(),
            });
        }
        let path = run_dir.join(METRICS_FILE);
        if !path.is_file() {
            return Err(ReportError::MissingMetrics {
                dir: run_dir.to_path_buf(),
                path,
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        let metrics = Self::parse(&bytes, &path)?;
        for w in &metrics.warnings {
            tracing::warn!("{w}");
        }
        Ok(metrics)
    }

    /// Parse the contents of a metrics log; `path` is only used in messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ReportError> {
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let last_nonblank = lines.iter().rposition(|l| !is_blank(l));
        let ends_with_newline = bytes.last() == Some(&b'\n');
        let mut out = Parser {
            path: path.to_path_buf(),
            metrics: RunMetrics::default(),
            train_lines: Vec::new(),
        };
        for (i, raw) in lines.iter().enumerate() {
            if is_blank(raw) {
                continue;
            }
            let line = i + 1;
            let value: serde_json::Value = match serde_json::from_slice(raw) {
                Ok(v) => v,
                Err(e) if Some(i) == last_nonblank && (e.is_eof() || !ends_with_newline) => {
                    out.metrics.warnings.push(format!(
                        "{}: line {line}: skipped a truncated last line ({e})",
                        path.display()
                    ));
                    continue;
                }
                Err(e) => return Err(out.malformed(line, format!("not valid JSON: {e}"))),
            };
            out.record(line, value)?;
        }
        if out.metrics.train.is_empty() {
            return Err(ReportError::NoTrainRecords {
                path: path.to_path_buf(),
            });
        }
        out.check_shapes()?;
        Ok(out.metrics)
    }

    /// Number of MoE layers with routing metrics (0 for a dense model): the length of the
    /// first non-empty `alpha`, `drop_rate` or `expert_load`.
    pub fn moe_layers(&self) -> usize {
        let first_len =
            |f: fn(&TrainRecord) -> usize| self.train.iter().map(f).find(|&n| n > 0).unwrap_or(0);
        first_len(|r| r.alpha.len())
            .max(first_len(|r| r.drop_rate.len()))
            .max(first_len(|r| r.expert_load.len()))
    }

    /// Whether the run logged any routing metrics.
    pub fn is_moe(&self) -> bool {
        self.moe_layers() > 0
    }

    /// Experts per MoE layer, from the first record with a non-empty `expert_load`.
    pub fn experts_per_layer(&self) -> Vec<usize> {
        self.train
            .iter()
            .find(|r| !r.expert_load.is_empty())
            .map(|r| r.expert_load.iter().map(Vec::len).collect())
            .unwrap_or_default()
    }
}

/// Parsing state: the records so far and the line number of each training record.
struct Parser {
    path: PathBuf,
    metrics: RunMetrics,
    train_lines: Vec<usize>,
}

impl Parser {
    fn malformed(&self, line: usize, reason: String) -> ReportError {
        ReportError::Malformed {
            path: self.path.clone(),
            line,
            reason,
        }
    }

    fn record(&mut self, line: usize, value: serde_json::Value) -> Result<(), ReportError> {
        let kind = match value.as_object().map(|o| o.get("kind")) {
            None => return Err(self.malformed(line, "not a JSON object".into())),
            Some(None) => return Err(self.malformed(line, "no \"kind\" key".into())),
            Some(Some(k)) => match k.as_str() {
                Some(k) => k.to_string(),
                None => return Err(self.malformed(line, "\"kind\" is not a string".into())),
            },
        };
        match kind.as_str() {
            "train" => {
                let r: TrainRecord = serde_json::from_value(value)
                    .map_err(|e| self.malformed(line, format!("invalid train record: {e}")))?;
                let dropped = supersede(&mut self.metrics.train, r.step, |r| r.step);
                if dropped > 0 {
                    self.train_lines.truncate(self.metrics.train.len());
                    self.warn_superseded(line, "training", r.step, dropped);
                }
                self.metrics.train.push(r);
                self.train_lines.push(line);
            }
            "val" => {
                let r: ValRecord = serde_json::from_value(value)
                    .map_err(|e| self.malformed(line, format!("invalid val record: {e}")))?;
                let dropped = supersede(&mut self.metrics.val, r.step, |r| r.step);
                if dropped > 0 {
                    self.warn_superseded(line, "validation", r.step, dropped);
                }
                self.metrics.val.push(r);
            }
            other => tracing::debug!(
                "{}: line {line}: ignoring record of kind {other:?}",
                self.path.display()
            ),
        }
        Ok(())
    }

    fn warn_superseded(&mut self, line: usize, what: &str, step: u64, dropped: usize) {
        self.metrics.warnings.push(format!(
            "{}: line {line}: step went back to {step} (resumed run?); \
             {dropped} earlier {what} record(s) from that step on were replaced",
            self.path.display()
        ));
    }

    /// A per-layer array may be empty in any record (not logged at that step), but when it is
    /// not, it must have as many layers (and `expert_load` as many experts per layer) as the
    /// first record where it is not empty.
    fn check_shapes(&self) -> Result<(), ReportError> {
        type Shape = fn(&TrainRecord) -> Vec<usize>;
        let shapes: [(&str, Shape); 3] = [
            ("alpha", |r| vec![r.alpha.len()]),
            ("drop_rate", |r| vec![r.drop_rate.len()]),
            ("expert_load", |r| {
                r.expert_load.iter().map(Vec::len).collect()
            }),
        ];
        for (name, shape) in shapes {
            let mut first: Option<(Vec<usize>, usize)> = None;
            for (r, &line) in self.metrics.train.iter().zip(&self.train_lines) {
                let got = shape(r);
                if got.iter().all(|&n| n == 0) {
                    continue;
                }
                match &first {
                    None => first = Some((got, line)),
                    Some((want, first_line)) if *want != got => {
                        return Err(self.malformed(
                            line,
                            format!(
                                "{name} has shape {} but the first training record with {name} \
                                 (line {first_line}) has {}",
                                describe(name, &got),
                                describe(name, want)
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

/// `2 layers` or `2 layers × [4, 4] experts`.
fn describe(name: &str, shape: &[usize]) -> String {
    if name == "expert_load" {
        format!("{} layers × {:?} experts", shape.len(), shape)
    } else {
        format!("{} layers", shape.first().copied().unwrap_or(0))
    }
}

/// Drop the trailing records whose step is at or after `step`; returns how many were dropped.
fn supersede<T>(records: &mut Vec<T>, step: u64, step_of: impl Fn(&T) -> u64) -> usize {
    let keep = records.partition_point(|r| step_of(r) < step);
    let dropped = records.len() - keep;
    records.truncate(keep);
    dropped
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn vec_nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v = Option::<Vec<Option<f64>>>::deserialize(d)?.unwrap_or_default();
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

fn matrix_nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
    let m = Option::<Vec<Vec<Option<f64>>>>::deserialize(d)?.unwrap_or_default();
    Ok(m.into_iter()
        .map(|row| row.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RunMetrics, ReportError> {
        RunMetrics::parse(s.as_bytes(), Path::new("m.jsonl"))
    }

    #[test]
    fn null_reads_as_nan_and_unknown_keys_and_kinds_are_ignored() {
        let m = parse(
            "{\"kind\":\"train\",\"step\":1,\"loss\":null,\"new_key\":[1,2]}\n\
             {\"kind\":\"checkpoint\",\"step\":1}\n\
             {\"kind\":\"val\",\"step\":1,\"val_loss\":2.0}\n",
        )
        .unwrap();
        assert!(m.train[0].loss.is_nan());
        assert_eq!(m.val.len(), 1);
        assert!((m.val[0].ppl() - 2f64.exp()).abs() < 1e-12);
        assert!(!m.is_moe());
    }

    #[test]
    fn a_step_going_back_supersedes_later_records() {
        let m = parse(
            "{\"kind\":\"train\",\"step\":1,\"loss\":3}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":2}\n\
             {\"kind\":\"train\",\"step\":3,\"loss\":1}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":5}\n",
        )
        .unwrap();
        let steps: Vec<u64> = m.train.iter().map(|r| r.step).collect();
        assert_eq!(steps, [1, 2]);
        assert_eq!(m.train[1].loss, 5.0);
        assert_eq!(m.warnings.len(), 1);
    }

    #[test]
    fn a_complete_but_invalid_last_line_is_an_error() {
        let e = parse("{\"kind\":\"train\",\"step\":1,\"loss\":3}\n{\"kind\":\"train\"}\n")
            .unwrap_err();
        assert!(matches!(e, ReportError::Malformed { line: 2, .. }), "{e}");
    }

    #[test]
    fn empty_routing_arrays_are_allowed_but_other_shapes_must_match() {
        let m = parse(
            "{\"kind\":\"train\",\"step\":1,\"loss\":3}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":3,\"expert_load\":[[0.5,0.5]]}\n\
             {\"kind\":\"train\",\"step\":3,\"loss\":3,\"expert_load\":[]}\n",
        )
        .unwrap();
        assert_eq!((m.moe_layers(), m.experts_per_layer()), (1, vec![2]));
        let e = parse(
            "{\"kind\":\"train\",\"step\":1,\"loss\":3,\"expert_load\":[[0.5,0.5]]}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":3,\"expert_load\":[[0.2,0.4,0.4]]}\n",
        )
        .unwrap_err();
        assert!(matches!(e, ReportError::Malformed { line: 2, .. }), "{e}");
    }

    #[test]
    fn layer_count_must_not_change() {
        let e = parse(
            "{\"kind\":\"train\",\"step\":1,\"loss\":3,\"alpha\":[0.1,0.2]}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":3,\"alpha\":[0.1]}\n",
        )
        .unwrap_err();
        assert!(matches!(e, ReportError::Malformed { line: 2, .. }), "{e}");
    }
}
