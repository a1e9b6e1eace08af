//! `balancing`: load-balancing methods side by side on the demo's upcycled MoE and budget.
//!
//! The demo's dense model (same size, steps and schedule as `skymoe demo`) is trained once and
//! cached in `OUT/balancing/dense/`; each seed upcycles it (8 experts, top-2, Skywork layout,
//! λ = 1, gate normal(0, 0.02) drawn from the seed) and continues the MoE as the demo does
//! (peak lr 1e-3, 10 warmup steps, cosine to 1e-4) under five balancing variants, each at
//! capacity factor 1.25 and dropless:
//!
//! - `none`: no balancing loss;
//! - `switch`: the Switch/GShard loss `E · Σ f·P` with a fixed coefficient 0.01 (Switch
//!   Transformer's α);
//! - `skywork`: Skywork-MoE's loss (eq. 4) with the adaptive per-layer coefficient
//!   (ξ = 0.2, α_max = 0.01, β = 0.99, α₀ = 0);
//! - `bias`: DeepSeek-V3's aux-loss-free selection bias (rate 1e-3 per step), no loss;
//! - `bias+skywork`: both.
//!
//! Per run: final validation loss (dropless, as at inference); the drop rate at capacity 1.25
//! (measured in the capacity runs; for dropless runs the share of assignments that a capacity
//! of `ceil(1.25·k·T/E)` would have dropped, computed exactly from the per-expert counts);
//! max/mean expert load; the top-1/top-2 gate ratio; α; the spread of the selection bias.
//! A finished run whose `run.toml` matches is not trained again.

use std::fmt::Write as _;

use super::*;
use crate::aux_loss::AdaptiveConfig;

/// The Switch loss's fixed coefficient (Switch Transformer's α = 10⁻²).
const SWITCH_COEF: f64 = 0.01;
/// Selection-bias step per optimiser step (DeepSeek-V3's γ = 0.001).
const BIAS_RATE: f64 = 1e-3;
/// The capacity factor at which drop rates are measured.
const CF: f64 = 1.25;

struct Variant {
    name: &'static str,
    balance: BalanceLoss,
    adaptive: bool,
    coef: f64,
    bias: f64,
}

const VARIANTS: [Variant; 5] = [
    Variant {
        name: "none",
        balance: BalanceLoss::None,
        adaptive: false,
        coef: 0.0,
        bias: 0.0,
    },
    Variant {
        name: "switch",
        balance: BalanceLoss::Switch,
        adaptive: false,
        coef: SWITCH_COEF,
        bias: 0.0,
    },
    Variant {
        name: "skywork",
        balance: BalanceLoss::Skywork,
        adaptive: true,
        coef: 0.0,
        bias: 0.0,
    },
    Variant {
        name: "bias",
        balance: BalanceLoss::None,
        adaptive: false,
        coef: 0.0,
        bias: BIAS_RATE,
    },
    Variant {
        name: "bias+skywork",
        balance: BalanceLoss::Skywork,
        adaptive: true,
        coef: 0.0,
        bias: BIAS_RATE,
    },
];

/// (label, capacity factor; 0 = dropless).
const CAPACITIES: [(&str, f64); 2] = [("cf1.25", CF), ("dropless", 0.0)];

/// Pairs compared in the findings table (first against second, same capacity).
const COMPARISONS: [(&str, &str); 7] = [
    ("switch", "none"),
    ("skywork", "none"),
    ("bias", "none"),
    ("bias+skywork", "none"),
    ("skywork", "switch"),
    ("bias", "skywork"),
    ("bias+skywork", "skywork"),
];

/// The demo's (dense, MoE) steps for the size (`skymoe demo`), or `--steps` for both.
fn budget(o: &ExperimentOptions) -> (u64, u64) {
    if let Some(n) = o.steps {
        let n = n.max(2);
        return (n, n);
    }
    match o.size {
        DemoSize::Small => (400, 300),
        DemoSize::Medium => (800, 500),
        DemoSize::Large => (2000, 1200),
    }
}

/// Validate four times over a run, only at the end of a tiny one.
fn eval_every(steps: u64) -> u64 {
    if steps >= 20 {
        steps / 4
    } else {
        0
    }
}

/// For an adaptive variant run dropless from α₀ = 0: the index of the variant without the loss
/// and with the same bias, which it equals exactly.
fn dropless_twin(v: &Variant, cf: f64, a: &AdaptiveConfig) -> Option<usize> {
    if cf > 0.0 || !v.adaptive || a.alpha_init != 0.0 {
        return None;
    }
    VARIANTS
        .iter()
        .position(|t| t.balance == BalanceLoss::None && t.bias == v.bias)
}

/// Train unless `run` already holds a finished run of exactly this configuration.
fn train_cached(cfg: RunConfig, obs: &mut dyn Observer, label: &str) -> Result<PathBuf> {
    let run = cfg.train.out_dir.clone();
    let done = std::fs::read_to_string(run.join("run.toml"))
        .ok()
        .is_some_and(|t| cfg.to_toml().is_ok_and(|c| c == t));
    if done {
        if let Some((step, ck)) = list_checkpoints(&run.join("checkpoints"))?.pop() {
            if step == cfg.train.steps && run.join("metrics.jsonl").exists() {
                obs.on_message(&format!(
                    "== {label}: done before, reusing {}",
                    run.display()
                ));
                return Ok(ck);
            }
        }
    }
    Ok(train(cfg, obs, label)?.checkpoint)
}

/// Share of the `assignments` of one micro-batch that a capacity of `ceil(cf·a/E)` per expert
/// drops, from the fraction of assignments per expert.
fn drop_at(load: &[f64], assignments: f64, cf: f64) -> f64 {
    if load.is_empty() || assignments <= 0.0 {
        return f64::NAN;
    }
    let cap = (cf * assignments / load.len() as f64).ceil();
    load.iter()
        .map(|f| ((f * assignments).round() - cap).max(0.0))
        .sum::<f64>()
        / assignments
}

/// max/mean of one layer's loads (the mean is 1/E).
fn max_over_mean(load: &[f64]) -> f64 {
    let total: f64 = load.iter().sum();
    if load.is_empty() || total <= 0.0 {
        return f64::NAN;
    }
    load.iter().copied().fold(0.0, f64::max) * load.len() as f64 / total
}

/// Per-step, layer-mean quantities of one run.
#[derive(Clone)]
struct Series {
    step: Vec<f64>,
    drop: Vec<f64>,
    drop_at_cf: Vec<f64>,
    load: Vec<f64>,
    ratio: Vec<f64>,
    alpha: Vec<f64>,
}

/// One run's measurements.
#[derive(Clone)]
struct RunStats {
    seed: u64,
    val: f64,
    val_curve: Vec<(f64, f64)>,
    series: Series,
    /// Drop rate at capacity 1.25, last 25% / whole run (layer means).
    drop_tail: f64,
    drop_all: f64,
    load_tail: f64,
    ratio_tail: f64,
    /// α per layer after the last step.
    alpha_end: Vec<f64>,
    /// α of each layer over the steps.
    alpha_layers: Vec<Vec<(f64, f64)>>,
    /// Share of (step, layer) pairs whose target ξ·d was below α_max.
    below_cap: f64,
    /// Mean over layers of max(b) − min(b) of the final selection bias.
    bias_range: f64,
}

fn tail_mean(v: &[f64]) -> f64 {
    mean(v[v.len() * 3 / 4..].iter().copied())
}

fn measure(
    seed: u64,
    run: &Path,
    checkpoint: &Path,
    top_k: usize,
    adaptive: &AdaptiveConfig,
) -> Result<RunStats> {
    let (train, val) = records(run)?;
    let tokens_per_step = train
        .first()
        .map_or(0.0, |m| m.tokens as f64 / m.step.max(1) as f64);
    let assignments = tokens_per_step * top_k as f64;
    let series = Series {
        step: train.iter().map(|m| m.step as f64).collect(),
        drop: train
            .iter()
            .map(|m| mean(m.drop_rate.iter().copied()))
            .collect(),
        drop_at_cf: train
            .iter()
            .map(|m| mean(m.expert_load.iter().map(|l| drop_at(l, assignments, CF))))
            .collect(),
        load: train
            .iter()
            .map(|m| mean(m.expert_load.iter().map(|l| max_over_mean(l))))
            .collect(),
        ratio: train
            .iter()
            .map(|m| mean(m.gate_ratio.iter().copied()))
            .collect(),
        alpha: train
            .iter()
            .map(|m| mean(m.alpha.iter().copied()))
            .collect(),
    };
    let pairs: Vec<bool> = train
        .iter()
        .flat_map(|m| {
            m.drop_rate
                .iter()
                .map(|d| adaptive.xi * d < adaptive.alpha_max)
        })
        .collect();
    let below_cap = pairs.iter().filter(|b| **b).count() as f64 / pairs.len().max(1) as f64;
    let ck = Checkpoint::open(checkpoint, &Device::Cpu)?;
    let mut ranges = Vec::new();
    for name in crate::params::selection_bias_names(&ck.config) {
        let experts = ck.config.moe.as_ref().map_or(0, |m| m.num_experts);
        let Ok(t) = ck.weights.get(&name, &[experts], &Device::Cpu) else {
            continue;
        };
        let b = t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let (lo, hi) = b
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        ranges.push((hi - lo) as f64);
    }
    Ok(RunStats {
        seed,
        val: final_val(&val),
        val_curve: val_series(&val),
        drop_tail: tail_mean(&series.drop_at_cf),
        drop_all: mean(series.drop_at_cf.iter().copied()),
        load_tail: tail_mean(&series.load),
        ratio_tail: tail_mean(&series.ratio),
        alpha_end: train.last().map(|m| m.alpha.clone()).unwrap_or_default(),
        alpha_layers: (0..train.first().map_or(0, |m| m.alpha.len()))
            .map(|l| {
                train
                    .iter()
                    .map(|m| (m.step as f64, m.alpha.get(l).copied().unwrap_or(f64::NAN)))
                    .collect()
            })
            .collect(),
        below_cap,
        bias_range: if ranges.is_empty() { 0.0 } else { mean(ranges) },
        series,
    })
}

/// Trailing moving average over `w` points.
fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    (0..points.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(w);
            (points[i].0, mean(points[lo..=i].iter().map(|p| p.1)))
        })
        .collect()
}

/// A variant × capacity and its runs.
struct Cell {
    variant: &'static str,
    capacity: &'static str,
    runs: Vec<RunStats>,
}

impl Cell {
    fn spread(&self, f: impl Fn(&RunStats) -> f64) -> Spread {
        Spread::of(self.runs.iter().map(f))
    }

    /// Seed-mean curve of a per-step series, smoothed over `w` steps.
    fn curve(&self, f: impl Fn(&Series) -> &Vec<f64>, w: usize) -> Vec<(f64, f64)> {
        let curves: Vec<Vec<(f64, f64)>> = self
            .runs
            .iter()
            .map(|r| {
                r.series
                    .step
                    .iter()
                    .copied()
                    .zip(f(&r.series).iter().copied())
                    .collect()
            })
            .collect();
        smooth(&mean_curve(&curves), w)
    }
}

/// The metrics of the tables: (header, value, digits).
type Metric = (&'static str, fn(&RunStats) -> f64, usize);
const METRICS: [Metric; 4] = [
    ("validation loss", |r| r.val, 4),
    ("drop rate at cf 1.25, last 25%", |r| r.drop_tail, 3),
    ("max/mean load, last 25%", |r| r.load_tail, 2),
    ("top-1/top-2 gate ratio, last 25%", |r| r.ratio_tail, 2),
];

pub(super) fn balancing(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let seeds = seed_list(o);
    let (dense_steps, moe_steps) = budget(o);
    let s = scale(o);

    // The demo's dense model, trained once for all variants and seeds.
    let dense_run = dir.join("dense");
    let mut dense = base(o, &dense_run, None);
    dense.model.arch = "llama".into();
    dense.train.steps = dense_steps;
    dense.train.eval_every = eval_every(dense_steps);
    let dense_ck = train_cached(
        dense,
        obs,
        &format!("balancing: dense model to upcycle ({dense_steps} steps)"),
    )?;
    let tok = tokenizer_of(&dense_run);

    let adaptive = AdaptiveConfig::default();
    let mut cells: Vec<Cell> = Vec::new();
    for (cap, _) in CAPACITIES {
        for v in &VARIANTS {
            cells.push(Cell {
                variant: v.name,
                capacity: cap,
                runs: Vec::new(),
            });
        }
    }
    let total = cells.len() * seeds.len();
    let mut done = 0;
    for &seed in &seeds {
        let init = dir.join("moe-init").join(format!("seed-{seed}"));
        if !init.join("config.json").exists() {
            upcycle_to(&dense_ck, &init, seed)?;
        }
        for (c_i, (cap, cf)) in CAPACITIES.into_iter().enumerate() {
            for (v_i, v) in VARIANTS.iter().enumerate() {
                done += 1;
                // Dropless, nothing is dropped, so the adaptive α stays at α₀ = 0 and the loss
                // never enters: the run is the one without the loss (same bias), bit for bit.
                if let Some(twin) = dropless_twin(v, cf, &adaptive) {
                    let r = cells[c_i * VARIANTS.len() + twin].runs.last().cloned();
                    if let Some(r) = r {
                        obs.on_message(&format!(
                            "== balancing ({done}/{total}): {}, {cap}, seed {seed}: the same run as {} (no drops, α stays 0)",
                            v.name, VARIANTS[twin].name
                        ));
                        cells[c_i * VARIANTS.len() + v_i].runs.push(r);
                        continue;
                    }
                }
                let run = dir
                    .join(format!("{}-{cap}", v.name))
                    .join(format!("seed-{seed}"));
                let mut c = base(o, &run, Some(tok.clone()));
                c.model.init = Some(init.clone());
                c.train.seed = seed;
                c.train.steps = moe_steps;
                c.train.eval_every = eval_every(moe_steps);
                c.optim.lr = 1e-3;
                c.optim.min_lr = 1e-4;
                c.optim.warmup_steps = 10;
                c.router.capacity_factor = cf;
                c.aux.balance = v.balance;
                c.aux.adaptive = v.adaptive;
                c.aux.coef = v.coef;
                c.aux.xi = adaptive.xi;
                c.aux.alpha_max = adaptive.alpha_max;
                c.aux.beta = adaptive.beta;
                c.aux.alpha_init = adaptive.alpha_init;
                c.aux.bias_update_rate = v.bias;
                let ck = train_cached(
                    c,
                    obs,
                    &format!(
                        "balancing ({done}/{total}): {}, {cap}, seed {seed}, {moe_steps} steps",
                        v.name
                    ),
                )?;
                let stats = measure(seed, &run, &ck, 2, &adaptive)?;
                cells[c_i * VARIANTS.len() + v_i].runs.push(stats);
            }
        }
    }
    let cell = |variant: &str, capacity: &str| {
        cells
            .iter()
            .find(|c| c.variant == variant && c.capacity == capacity)
    };

    // The results table.
    let mut table = String::from("| variant | capacity | final validation loss | drop rate at cf 1.25, last 25% | drop rate at cf 1.25, whole run | max/mean expert load, last 25% | top-1/top-2 gate ratio, last 25% | α at the end (per layer) | steps with ξ·d < α_max | selection-bias range at the end |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("variant,capacity,seed,val_loss,drop_rate_at_1.25_tail,drop_rate_at_1.25_all,max_mean_load_tail,gate_ratio_tail,alpha_end_mean,alpha_below_cap_share,bias_range\n");
    for c in &cells {
        let v = VARIANTS.iter().find(|v| v.name == c.variant);
        let adaptive_run = v.is_some_and(|v| v.adaptive);
        let twin = v.and_then(|v| {
            let cf = CAPACITIES
                .iter()
                .find(|x| x.0 == c.capacity)
                .map_or(0.0, |x| x.1);
            dropless_twin(v, cf, &adaptive)
        });
        let alpha = if let Some(t) = twin {
            format!("0 (no drops; the run of `{}`)", VARIANTS[t].name)
        } else if adaptive_run {
            fmt_layers(
                &mean_layers(
                    &c.runs
                        .iter()
                        .map(|r| r.alpha_end.clone())
                        .collect::<Vec<_>>(),
                ),
                4,
            )
        } else {
            "–".into()
        };
        let below = if adaptive_run {
            c.spread(|r| r.below_cap * 100.0).fmt(0) + " %"
        } else {
            "–".into()
        };
        let bias = if v.is_some_and(|v| v.bias > 0.0) {
            c.spread(|r| r.bias_range).fmt(3)
        } else {
            "–".into()
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {alpha} | {below} | {bias} |",
            c.variant,
            c.capacity,
            c.spread(|r| r.val).fmt(4),
            c.spread(|r| r.drop_tail).fmt(3),
            c.spread(|r| r.drop_all).fmt(3),
            c.spread(|r| r.load_tail).fmt(2),
            c.spread(|r| r.ratio_tail).fmt(2),
        );
        for r in &c.runs {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{},{}",
                c.variant,
                c.capacity,
                r.seed,
                r.val,
                r.drop_tail,
                r.drop_all,
                r.load_tail,
                r.ratio_tail,
                mean(r.alpha_end.iter().copied()),
                r.below_cap,
                r.bias_range
            );
        }
    }

    // Differences, marked as findings only where the seed ranges do not overlap.
    let _ = write!(table, "\nDifferences of the means (first − second, same capacity); **bold**: the two min–max ranges over seeds do not overlap (a finding), otherwise within the seed-to-seed spread.\n\n| comparison | capacity |");
    for (h, _, _) in METRICS {
        let _ = write!(table, " Δ {h} |");
    }
    table.push_str("\n| --- | --- |");
    for _ in METRICS {
        table.push_str(" --- |");
    }
    table.push('\n');
    for (cap, _) in CAPACITIES {
        for (a, b) in COMPARISONS {
            let (Some(ca), Some(cb)) = (cell(a, cap), cell(b, cap)) else {
                continue;
            };
            let _ = write!(table, "| {a} − {b} | {cap} |");
            for (_, f, digits) in METRICS {
                let (sa, sb) = (ca.spread(f), cb.spread(f));
                let d = format!("{:+.digits$}", sa.mean - sb.mean);
                if sa.separated(&sb) {
                    let _ = write!(table, " **{d}** |");
                } else {
                    let _ = write!(table, " {d} |");
                }
            }
            table.push('\n');
        }
    }

    // Time series, per run.
    let mut series_csv = String::from(
        "variant,capacity,seed,step,drop_rate,drop_rate_at_1.25,max_mean_load,gate_ratio,alpha\n",
    );
    for c in &cells {
        for r in &c.runs {
            let s = &r.series;
            for i in 0..s.step.len() {
                let _ = writeln!(
                    series_csv,
                    "{},{},{},{},{},{},{},{},{}",
                    c.variant,
                    c.capacity,
                    r.seed,
                    s.step[i],
                    s.drop[i],
                    s.drop_at_cf[i],
                    s.load[i],
                    s.ratio[i],
                    s.alpha[i]
                );
            }
        }
    }
    let series_path = dir.join("series.csv");
    std::fs::write(&series_path, series_csv).map_err(|e| TrainError::io(&series_path, e))?;

    // Plots: means over seeds.
    let w = (moe_steps as usize / 30).max(1);
    let mut plots = Vec::new();
    for (cap, _) in CAPACITIES {
        let of = |f: &dyn Fn(&Cell) -> Vec<(f64, f64)>| -> Vec<(String, Vec<(f64, f64)>)> {
            cells
                .iter()
                .filter(|c| c.capacity == cap)
                .map(|c| (c.variant.to_string(), f(c)))
                .collect()
        };
        let dropless = cap == "dropless";
        plots.extend(plot(
            &format!("Validation loss (mean over seeds), {cap}"),
            "loss (nats/token)",
            &of(&|c| {
                mean_curve(
                    &c.runs
                        .iter()
                        .map(|r| r.val_curve.clone())
                        .collect::<Vec<_>>(),
                )
            }),
            dir,
            &format!("val_loss_{cap}"),
        )?);
        plots.extend(plot(
            &format!(
                "{} at capacity factor 1.25 (mean over layers and seeds, {w}-step average), {cap}",
                if dropless {
                    "Share of assignments that would be dropped"
                } else {
                    "Token drop rate"
                }
            ),
            "drop rate",
            &of(&|c| c.curve(|s| &s.drop_at_cf, w)),
            dir,
            &format!("drop_rate_{cap}"),
        )?);
        plots.extend(plot(
            &format!("Max/mean expert load (mean over layers and seeds, {w}-step average), {cap}"),
            "max / mean load",
            &of(&|c| c.curve(|s| &s.load, w)),
            dir,
            &format!("load_{cap}"),
        )?);
        plots.extend(plot(
            &format!(
                "Top-1/top-2 gate ratio (mean over layers and seeds, {w}-step average), {cap}"
            ),
            "ratio",
            &of(&|c| c.curve(|s| &s.ratio, w)),
            dir,
            &format!("gate_ratio_{cap}"),
        )?);
    }
    // α of the adaptive variants at capacity 1.25, against α had the target stayed capped.
    let mut alpha_s = Vec::new();
    for name in ["skywork", "bias+skywork"] {
        if let Some(c) = cell(name, "cf1.25") {
            alpha_s.push((
                format!("{name} (mean over layers)"),
                c.curve(|s| &s.alpha, 1),
            ));
        }
    }
    if let Some(c) = cell("skywork", "cf1.25") {
        let layers = c.runs.first().map_or(0, |r| r.alpha_end.len());
        for l in 0..layers {
            let curves: Vec<Vec<(f64, f64)>> = c
                .runs
                .iter()
                .filter_map(|r| r.alpha_layers.get(l).cloned())
                .collect();
            alpha_s.push((format!("skywork, layer {l}"), mean_curve(&curves)));
        }
    }
    alpha_s.push((
        "α_max·(1 − β^(t−1)): target capped at every step".into(),
        (1..=moe_steps)
            .map(|t| {
                (
                    t as f64,
                    adaptive.alpha_init * adaptive.beta.powi(t as i32 - 1)
                        + adaptive.alpha_max * (1.0 - adaptive.beta.powi(t as i32 - 1)),
                )
            })
            .collect(),
    ));
    plots.extend(plot(
        "Adaptive α used at each step, capacity factor 1.25 (mean over seeds)",
        "α",
        &alpha_s,
        dir,
        "alpha",
    )?);

    let notes = format!(
        "The demo's dense Llama (hidden {}, {} layers, {dense_steps} steps of {} × {} tokens, peak lr 2e-3) is trained once; each seed upcycles it (8 experts, top-2, Skywork-MoE layout, λ = 1, gate normal(0, 0.02) from the seed) and continues the MoE for {moe_steps} steps (peak lr 1e-3, 10 warmup steps, cosine to 1e-4; the seed also sets the data order) with each balancing variant, at capacity factor 1.25 and dropless. Variants: none; switch (Switch/GShard loss, fixed α = {SWITCH_COEF}); skywork (Skywork-MoE eq. 4 with the adaptive coefficient ξ = {}, α_max = {}, β = {}, α₀ = {}); bias (DeepSeek-V3's aux-loss-free selection bias, {BIAS_RATE} per step, no loss); bias+skywork (both). Drop rate at cf 1.25: measured in the capacity runs; in the dropless runs the share of assignments a capacity of ceil(1.25·k·T/E) per expert would have dropped, from the same per-expert counts. Max/mean load: the busiest expert's share of assignments over the mean share (1 = perfectly balanced), before dropping. Gate ratio: mean over tokens of top-1 / top-2 gate probability. Validation loss is always measured dropless. Dropless, nothing is dropped, so the adaptive α stays at α₀ = 0 and the Skywork loss never enters: `skywork` and `bias+skywork` dropless are the very runs of `none` and `bias` dropless (bit-identical; trained once and reported under both names). Steps with ξ·d < α_max: share of (step, layer) pairs where the adaptive target was below its cap. Selection-bias range: max − min of the final bias, mean over layers. Time series per run and step: `series.csv`. {}",
        s.hidden,
        s.layers,
        s.batch,
        s.seq,
        adaptive.xi,
        adaptive.alpha_max,
        adaptive.beta,
        adaptive.alpha_init,
        spread_note(&seeds)
    );
    finish(
        dir,
        "Load balancing: none, Switch, Skywork adaptive, aux-loss-free bias",
        &notes,
        table,
        csv,
        plots,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_at_counts_overflow_beyond_capacity() {
        // 4 experts, 16 assignments, cf 1.25 → capacity ceil(5) = 5 per expert.
        let load = [8.0 / 16.0, 4.0 / 16.0, 2.0 / 16.0, 2.0 / 16.0];
        assert!((drop_at(&load, 16.0, 1.25) - 3.0 / 16.0).abs() < 1e-12);
        assert_eq!(drop_at(&[0.25; 4], 16.0, 1.25), 0.0);
        assert!((max_over_mean(&load) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn spread_marks_only_disjoint_ranges() {
        let a = Spread::of([1.0, 1.1, 1.2]);
        let b = Spread::of([1.15, 1.3, 1.4]);
        let c = Spread::of([1.3, 1.4]);
        assert!(!a.separated(&b));
        assert!(a.separated(&c));
        assert!(!Spread::of([1.0]).separated(&Spread::of([2.0])));
        assert_eq!(a.fmt(2), "1.10 (1.00–1.20)");
        assert_eq!(
            mean_curve(&[vec![(1.0, 1.0), (2.0, 3.0)], vec![(2.0, 5.0)]]),
            vec![(2.0, 4.0)]
        );
    }

    #[test]
    fn smoothing_is_a_trailing_average() {
        let s = smooth(&[(1.0, 1.0), (2.0, 3.0), (3.0, 5.0)], 2);
        assert_eq!(s, vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]);
    }
}
