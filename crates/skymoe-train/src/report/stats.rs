//! Numbers derived from a run's metrics: the summary, EMA smoothing, decimation, late load.

use super::metrics::RunMetrics;

/// Below this many training records the raw curves are drawn without an EMA line.
pub const SMOOTH_MIN_RECORDS: usize = 50;

/// Curves with more points than this are decimated (min and max of each bucket kept).
pub const MAX_PLOT_POINTS: usize = 2000;

/// The best (lowest-loss) validation measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestVal {
    /// Step of the measurement.
    pub step: u64,
    /// Validation loss.
    pub loss: f64,
    /// Validation perplexity.
    pub ppl: f64,
}

/// Headline numbers of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Number of training records.
    pub train_records: usize,
    /// Number of validation records.
    pub val_records: usize,
    /// Step of the last training record.
    pub last_step: u64,
    /// Tokens seen at the last training record, if logged.
    pub tokens: Option<u64>,
    /// Training loss of the last record.
    pub final_loss: f64,
    /// Cross-entropy of the last record, if logged.
    pub final_ce: Option<f64>,
    /// Auxiliary loss of the last record, if logged.
    pub final_aux_loss: Option<f64>,
    /// Z-loss of the last record, if logged.
    pub final_z_loss: Option<f64>,
    /// Lowest finite validation loss, if any.
    pub best_val: Option<BestVal>,
    /// Mean of the finite `tokens_per_s` values, if any.
    pub mean_tokens_per_s: Option<f64>,
    /// Wall-clock seconds at the last record, if logged.
    pub elapsed_s: Option<f64>,
    /// Drop rate of each MoE layer at the last record.
    pub final_drop_rate: Vec<f64>,
    /// α of each MoE layer at the last record.
    pub final_alpha: Vec<f64>,
    /// Number of training records `late_load` averages: the last 10%, at least one.
    pub late_records: usize,
    /// `late_load[l][e]`: expert load averaged over the last `late_records` training records.
    pub late_load: Vec<Vec<f64>>,
}

impl RunSummary {
    /// Summarise a run. `metrics.train` must not be empty (as [`RunMetrics::load`] ensures);
    /// an empty run gives an all-NaN summary.
    pub fn of(metrics: &RunMetrics) -> Self {
        let last = metrics.train.last();
        let best_val = metrics
            .val
            .iter()
            .filter(|v| v.val_loss.is_finite())
            .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
            .map(|v| BestVal {
                step: v.step,
                loss: v.val_loss,
                ppl: v.ppl(),
            });
        RunSummary {
            train_records: metrics.train.len(),
            val_records: metrics.val.len(),
            last_step: last.map_or(0, |r| r.step),
            tokens: last.and_then(|r| r.tokens),
            final_loss: last.map_or(f64::NAN, |r| r.loss),
            final_ce: last.and_then(|r| r.ce),
            final_aux_loss: last.and_then(|r| r.aux_loss),
            final_z_loss: last.and_then(|r| r.z_loss),
            best_val,
            mean_tokens_per_s: mean(metrics.train.iter().filter_map(|r| r.tokens_per_s)),
            elapsed_s: last.and_then(|r| r.elapsed_s),
            final_drop_rate: last.map(|r| r.drop_rate.clone()).unwrap_or_default(),
            final_alpha: last.map(|r| r.alpha.clone()).unwrap_or_default(),
            late_records: late_count(metrics.train.len()),
            late_load: late_load(metrics),
        }
    }

    /// Per MoE layer, the largest late expert load divided by the mean (1 = perfectly balanced).
    pub fn load_imbalance(&self) -> Vec<f64> {
        self.late_load
            .iter()
            .map(|row| {
                let finite = || row.iter().copied().filter(|x| x.is_finite());
                match mean(finite()) {
                    Some(m) if m > 0.0 => finite().fold(f64::NEG_INFINITY, f64::max) / m,
                    _ => f64::NAN,
                }
            })
            .collect()
    }
}

/// Mean of the finite values, `None` if there are none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .filter(|x| x.is_finite())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// How many of `n` records are the "last 10%": `ceil(n/10)`, at least one, at most `n`.
fn late_count(n: usize) -> usize {
    n.div_ceil(10).max(1).min(n)
}

/// Expert load of each layer averaged over the last 10% (at least one) of training records
/// (over those of them that logged it; NaN where none did).
fn late_load(metrics: &RunMetrics) -> Vec<Vec<f64>> {
    let n = metrics.train.len();
    let k = late_count(n);
    let tail = &metrics.train[n - k..];
    metrics
        .experts_per_layer()
        .into_iter()
        .enumerate()
        .map(|(l, experts)| {
            (0..experts)
                .map(|e| {
                    mean(
                        tail.iter()
                            .filter_map(|r| r.expert_load.get(l).and_then(|x| x.get(e)).copied()),
                    )
                    .unwrap_or(f64::NAN)
                })
                .collect()
        })
        .collect()
}

/// Smoothing span for a curve of `n` points: about 4% of the run, between 5 and 500 points.
pub fn ema_span(n: usize) -> f64 {
    (n as f64 / 25.0).clamp(5.0, 500.0)
}

/// Bias-corrected exponential moving average with weight `1 − 2/(span+1)` on the past.
/// Non-finite inputs do not update the average; before the first finite input the output is NaN.
pub fn ema(values: &[f64], span: f64) -> Vec<f64> {
    let w = 1.0 - 2.0 / (span + 1.0);
    let mut acc = 0.0;
    let mut norm = 0.0;
    values
        .iter()
        .map(|&x| {
            if x.is_finite() {
                acc = w * acc + (1.0 - w) * x;
                norm = w * norm + (1.0 - w);
            }
            if norm > 0.0 {
                acc / norm
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// Keep the finite points only.
pub fn finite(points: impl IntoIterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points
        .into_iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Reduce a curve to at most about `2 × max_buckets` points: split it into `max_buckets`
/// consecutive buckets and keep each bucket's lowest and highest point (in order), so spikes
/// survive.
pub fn decimate(points: &[(f64, f64)], max_buckets: usize) -> Vec<(f64, f64)> {
    if points.len() <= 2 * max_buckets || max_buckets == 0 {
        return points.to_vec();
    }
    let size = points.len().div_ceil(max_buckets);
    let mut out = Vec::with_capacity(2 * max_buckets);
    for bucket in points.chunks(size) {
        let by_y = |a: &&(f64, f64), b: &&(f64, f64)| a.1.total_cmp(&b.1);
        let lo = bucket.iter().enumerate().min_by(|a, b| by_y(&a.1, &b.1));
        let hi = bucket.iter().enumerate().max_by(|a, b| by_y(&a.1, &b.1));
        if let (Some((i, &p)), Some((j, &q))) = (lo, hi) {
            match i.cmp(&j) {
                std::cmp::Ordering::Less => out.extend([p, q]),
                std::cmp::Ordering::Greater => out.extend([q, p]),
                std::cmp::Ordering::Equal => out.push(p),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_of_a_constant_is_the_constant_and_skips_nan() {
        let e = ema(&[f64::NAN, 2.0, 2.0, f64::NAN, 2.0], 10.0);
        assert!(e[0].is_nan());
        for x in &e[1..] {
            assert!((x - 2.0).abs() < 1e-12);
        }
    }

    #[test]
    fn ema_lags_a_step() {
        let mut v = vec![0.0; 20];
        v.extend([1.0; 20]);
        let e = ema(&v, 5.0);
        assert!(e[20] > 0.0 && e[20] < 1.0);
        assert!(e[39] > 0.99);
    }

    #[test]
    fn decimate_keeps_spikes_and_order() {
        let mut pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 1.0)).collect();
        pts[5_003].1 = 100.0;
        let d = decimate(&pts, 100);
        assert!(d.len() <= 200);
        assert!(d.iter().any(|p| p.1 == 100.0));
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
