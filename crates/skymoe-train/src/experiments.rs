//! The Skywork-MoE report's findings reproduced in miniature (`skymoe experiment NAME`):
//!
//! - `gating-norm`: gating logit normalisation λ ∈ {none, 1, 2} — token drop rate, mean
//!   top-1/top-2 gate ratio per layer, validation loss;
//! - `adaptive-aux`: the adaptive auxiliary-loss coefficient against fixed 0.01, 0.001 and 0 —
//!   drop rate over time per layer, validation loss;
//! - `upcycle-vs-scratch`: an upcycled MoE against one trained from scratch, at a budget of half
//!   the dense model's and at twice it — validation loss curves;
//! - `expert-similarity`: mean pairwise cosine similarity of the experts of each layer over
//!   training, upcycled against from scratch;
//! - `balancing`: on the demo's upcycled model and budget, no balancing against the Switch loss,
//!   Skywork's adaptive auxiliary loss, DeepSeek-V3's aux-loss-free selection bias and bias plus
//!   adaptive loss, each at capacity factor 1.25 and dropless (see [`balancing`]).
//!
//! Every variant runs once per seed (`ExperimentOptions::seeds`, consecutive seeds from
//! `seed`); tables give the mean over seeds with the min–max range in brackets, and a difference
//! between variants counts as a finding only where their ranges do not overlap.
//!
//! Each writes `OUT/NAME/results.md` (a table), `results.csv` (one row per variant and seed),
//! plots (means over seeds), and a run directory per variant and seed (`VARIANT/seed-S/`).

mod balancing;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use skymoe_model::{Architecture, Checkpoint, ModelConfig};

use crate::aux_loss::BalanceLoss;
use crate::checkpoint::list_checkpoints;
use crate::demo::DemoSize;
use crate::error::{Result, TrainError};
use crate::params::TrainableParams;
use crate::run_config::RunConfig;
use crate::trainer::{Observer, StepMetrics, TrainSummary, Trainer, ValMetrics};
use crate::upcycle::{upcycle, GateInit, UpcycleOptions};

/// The experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experiment {
    /// Gating logit normalisation.
    GatingNorm,
    /// Adaptive against fixed auxiliary-loss coefficients.
    AdaptiveAux,
    /// Upcycling against training from scratch at two budgets.
    UpcycleVsScratch,
    /// Expert similarity over training.
    ExpertSimilarity,
    /// Load-balancing methods on the demo's upcycled model.
    Balancing,
}

impl Experiment {
    /// Every experiment, in order.
    pub const ALL: [Experiment; 5] = [
        Experiment::GatingNorm,
        Experiment::AdaptiveAux,
        Experiment::UpcycleVsScratch,
        Experiment::ExpertSimilarity,
        Experiment::Balancing,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::GatingNorm => "gating-norm",
            Experiment::AdaptiveAux => "adaptive-aux",
            Experiment::UpcycleVsScratch => "upcycle-vs-scratch",
            Experiment::ExpertSimilarity => "expert-similarity",
            Experiment::Balancing => "balancing",
        }
    }
}

impl std::str::FromStr for Experiment {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Experiment::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown experiment `{s}` (gating-norm | adaptive-aux | upcycle-vs-scratch | expert-similarity | balancing)"))
    }
}

/// Settings shared by the experiments.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// Training text.
    pub corpus: Vec<PathBuf>,
    /// Parent directory of the experiment's outputs.
    pub out: PathBuf,
    /// Scale of models and budgets.
    pub size: DemoSize,
    /// First seed.
    pub seed: u64,
    /// Seeds per variant (`seed`, `seed + 1`, …; at least 1).
    pub seeds: usize,
    /// Override of the training steps per run (the size's default otherwise).
    pub steps: Option<u64>,
}

/// What an experiment wrote.
#[derive(Debug, Clone)]
pub struct ExperimentResult {
    /// The results table (Markdown).
    pub table: String,
    /// `results.md`.
    pub results: PathBuf,
    /// Plots written.
    pub plots: Vec<PathBuf>,
}

struct Scale {
    hidden: usize,
    layers: usize,
    seq: usize,
    batch: usize,
    steps: u64,
}

fn scale(o: &ExperimentOptions) -> Scale {
    let mut s = match o.size {
        DemoSize::Small => Scale {
            hidden: 128,
            layers: 4,
            seq: 128,
            batch: 8,
            steps: 200,
        },
        DemoSize::Medium => Scale {
            hidden: 192,
            layers: 6,
            seq: 192,
            batch: 12,
            steps: 500,
        },
        DemoSize::Large => Scale {
            hidden: 256,
            layers: 8,
            seq: 256,
            batch: 16,
            steps: 1200,
        },
    };
    if let Some(steps) = o.steps {
        s.steps = steps.max(2);
    }
    s
}

fn base(o: &ExperimentOptions, dir: &Path, tokenizer: Option<PathBuf>) -> RunConfig {
    let s = scale(o);
    let mut c = RunConfig::default();
    c.model.arch = "skywork_moe".into();
    c.model.hidden_size = s.hidden;
    c.model.intermediate_size = s.hidden * 3;
    c.model.layers = s.layers;
    c.model.heads = 4;
    c.model.kv_heads = 2;
    c.model.experts = 8;
    c.model.top_k = 2;
    c.model.max_position_embeddings = s.seq.max(256);
    c.data.inputs = o.corpus.clone();
    c.data.tokenizer = tokenizer;
    c.data.vocab_size = 2048;
    c.data.seq_len = s.seq;
    c.train.batch_size = s.batch;
    c.train.steps = s.steps;
    // Five validations a run; a tiny run (a smoke test) validates only at the end.
    c.train.eval_every = if s.steps >= 20 { s.steps / 5 } else { 0 };
    c.train.eval_batches = 16;
    c.train.checkpoint_every = 0;
    c.train.keep_checkpoints = 1;
    c.train.seed = o.seed;
    c.train.out_dir = dir.to_path_buf();
    c.optim.lr = 2e-3;
    c.optim.min_lr = 2e-4;
    c.router.capacity_factor = 1.0;
    c
}

fn train(cfg: RunConfig, obs: &mut dyn Observer, label: &str) -> Result<TrainSummary> {
    obs.on_message(&format!("== {label}"));
    let mut t = Trainer::prepare(cfg, obs)?;
    t.run(obs)
}

/// The train and validation records of a run.
fn records(run: &Path) -> Result<(Vec<StepMetrics>, Vec<ValMetrics>)> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("train") => train.extend(serde_json::from_value::<StepMetrics>(v).ok()),
            Some("val") => val.extend(serde_json::from_value::<ValMetrics>(v).ok()),
            _ => {}
        }
    }
    Ok((train, val))
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = v
        .into_iter()
        .filter(|x| x.is_finite())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Per-layer mean of `f` over the last quarter of the steps.
fn tail_per_layer(train: &[StepMetrics], f: impl Fn(&StepMetrics) -> &Vec<f64>) -> Vec<f64> {
    let start = train.len() * 3 / 4;
    let tail = &train[start..];
    let layers = tail.first().map_or(0, |m| f(m).len());
    (0..layers)
        .map(|l| mean(tail.iter().filter_map(|m| f(m).get(l).copied())))
        .collect()
}

/// Layer-mean of `f` at every step.
fn layer_mean_series(
    train: &[StepMetrics],
    f: impl Fn(&StepMetrics) -> &Vec<f64>,
) -> Vec<(f64, f64)> {
    train
        .iter()
        .map(|m| (m.step as f64, mean(f(m).iter().copied())))
        .collect()
}

fn val_series(val: &[ValMetrics]) -> Vec<(f64, f64)> {
    val.iter().map(|v| (v.step as f64, v.val_loss)).collect()
}

fn fmt_layers(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The seeds of every variant: `seed`, `seed + 1`, …
fn seed_list(o: &ExperimentOptions) -> Vec<u64> {
    (0..o.seeds.max(1) as u64).map(|i| o.seed + i).collect()
}

/// One quantity over seeds: mean and min–max range.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    mean: f64,
    min: f64,
    max: f64,
    /// Finite values seen.
    n: usize,
}

impl Spread {
    fn of(v: impl IntoIterator<Item = f64>) -> Spread {
        let v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread {
                mean: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        Spread {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: v.len(),
        }
    }

    /// `mean (min–max)`, or the value alone for one seed.
    fn fmt(&self, digits: usize) -> String {
        if self.n > 1 {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.mean, self.min, self.max
            )
        } else {
            format!("{:.digits$}", self.mean)
        }
    }

    /// Both over at least two seeds and the two ranges do not overlap: the difference exceeds
    /// the seed-to-seed spread.
    fn separated(&self, other: &Spread) -> bool {
        self.n > 1 && other.n > 1 && (self.min > other.max || self.max < other.min)
    }
}

/// How the tables state their spread.
fn spread_note(seeds: &[u64]) -> String {
    if seeds.len() > 1 {
        format!(
            "Every figure is the mean over {} seeds ({}–{}), with the min–max range over the seeds in brackets; per-layer values are means over the seeds. Plots show means over the seeds.",
            seeds.len(),
            seeds[0],
            seeds[seeds.len() - 1]
        )
    } else {
        format!("One seed ({}).", seeds[0])
    }
}

/// Step-by-step mean of per-seed curves (steps present in every curve).
fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut acc: BTreeMap<i64, (f64, f64, usize)> = BTreeMap::new();
    for c in curves {
        for &(x, y) in c {
            let e = acc
                .entry((x * 1000.0).round() as i64)
                .or_insert((x, 0.0, 0));
            if y.is_finite() {
                e.1 += y;
                e.2 += 1;
            }
        }
    }
    acc.into_values()
        .filter(|e| e.2 == curves.len() && e.2 > 0)
        .map(|(x, s, n)| (x, s / n as f64))
        .collect()
}

/// Per-layer mean over seeds of per-seed, per-layer values.
fn mean_layers(v: &[Vec<f64>]) -> Vec<f64> {
    let layers = v.iter().map(Vec::len).max().unwrap_or(0);
    (0..layers)
        .map(|l| mean(v.iter().filter_map(|s| s.get(l).copied())))
        .collect()
}

/// A variant's runs: (seed, train records, validation records).
type Runs = Vec<(u64, Vec<StepMetrics>, Vec<ValMetrics>)>;

fn final_val(val: &[ValMetrics]) -> f64 {
    val.last().map_or(f64::NAN, |v| v.val_loss)
}

fn finish(
    dir: &Path,
    title: &str,
    notes: &str,
    table: String,
    csv: String,
    plots: Vec<PathBuf>,
) -> Result<ExperimentResult> {
    let results = dir.join("results.md");
    let mut md = format!("# {title}\n\n{notes}\n\n{table}\n");
    for p in &plots {
        if p.extension().is_some_and(|e| e == "png") {
            if let Some(n) = p.file_name() {
                let _ = writeln!(md, "![{0}]({0})", n.to_string_lossy());
            }
        }
    }
    std::fs::write(&results, md).map_err(|e| TrainError::io(&results, e))?;
    let csv_path = dir.join("results.csv");
    std::fs::write(&csv_path, csv).map_err(|e| TrainError::io(&csv_path, e))?;
    Ok(ExperimentResult {
        table,
        results,
        plots,
    })
}

fn plot(
    title: &str,
    y: &str,
    series: &[(String, Vec<(f64, f64)>)],
    dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    crate::report::line_chart(title, "step", y, series, dir, stem)
        .map_err(|e| TrainError::Config(format!("plot {stem}: {e}")))
}

/// Run one experiment.
pub fn run_experiment(
    exp: Experiment,
    o: &ExperimentOptions,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let dir = o.out.join(exp.name());
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    match exp {
        Experiment::GatingNorm => gating_norm(o, &dir, obs),
        Experiment::AdaptiveAux => adaptive_aux(o, &dir, obs),
        Experiment::UpcycleVsScratch => upcycle_vs_scratch(o, &dir, obs),
        Experiment::ExpertSimilarity => expert_similarity(o, &dir, obs),
        Experiment::Balancing => balancing::balancing(o, &dir, obs),
    }
}

/// Train a first variant (which trains the tokenizer), return the tokenizer path for the rest.
fn tokenizer_of(run: &Path) -> PathBuf {
    run.join("tokenizer.json")
}

fn gating_norm(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let variants: [(&str, f64); 3] = [("none", 0.0), ("lambda-1", 1.0), ("lambda-2", 2.0)];
    let seeds = seed_list(o);
    let mut tok = None;
    let mut rows: Vec<(&str, Runs)> = Vec::new();
    for (name, lambda) in variants {
        let mut runs = Runs::new();
        for &seed in &seeds {
            let run = dir.join(name).join(format!("seed-{seed}"));
            let mut c = base(o, &run, tok.clone());
            c.train.seed = seed;
            c.model.gate_norm_std = lambda;
            train(c, obs, &format!("gating-norm: {name}, seed {seed}"))?;
            tok.get_or_insert_with(|| tokenizer_of(&run));
            let (t, v) = records(&run)?;
            runs.push((seed, t, v));
        }
        rows.push((name, runs));
    }
    let mut table = String::from("| gating | final validation loss | drop rate, last 25% (mean over layers) | per layer | top-1/top-2 gate ratio, last 25% (mean over layers) | per layer |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("variant,seed,val_loss,drop_rate_mean,gate_ratio_mean\n");
    let (mut drop_s, mut ratio_s, mut val_s) = (Vec::new(), Vec::new(), Vec::new());
    for (name, runs) in &rows {
        let d: Vec<Vec<f64>> = runs
            .iter()
            .map(|(_, t, _)| tail_per_layer(t, |m| &m.drop_rate))
            .collect();
        let g: Vec<Vec<f64>> = runs
            .iter()
            .map(|(_, t, _)| tail_per_layer(t, |m| &m.gate_ratio))
            .collect();
        let v = Spread::of(runs.iter().map(|(_, _, v)| final_val(v)));
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} |",
            v.fmt(4),
            Spread::of(d.iter().map(|x| mean(x.clone()))).fmt(3),
            fmt_layers(&mean_layers(&d), 3),
            Spread::of(g.iter().map(|x| mean(x.clone()))).fmt(2),
            fmt_layers(&mean_layers(&g), 2),
        );
        for (i, (seed, _, val)) in runs.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{name},{seed},{},{},{}",
                final_val(val),
                mean(d[i].clone()),
                mean(g[i].clone())
            );
        }
        let curve = |f: fn(&StepMetrics) -> &Vec<f64>| {
            mean_curve(
                &runs
                    .iter()
                    .map(|(_, t, _)| layer_mean_series(t, f))
                    .collect::<Vec<_>>(),
            )
        };
        drop_s.push((name.to_string(), curve(|m| &m.drop_rate)));
        ratio_s.push((name.to_string(), curve(|m| &m.gate_ratio)));
        val_s.push((
            name.to_string(),
            mean_curve(
                &runs
                    .iter()
                    .map(|(_, _, v)| val_series(v))
                    .collect::<Vec<_>>(),
            ),
        ));
    }
    let mut plots = plot(
        "Token drop rate (mean over layers and seeds), capacity factor 1.0",
        "drop rate",
        &drop_s,
        dir,
        "drop_rate",
    )?;
    plots.extend(plot(
        "Top-1 / top-2 gate probability ratio (mean over layers and seeds)",
        "ratio",
        &ratio_s,
        dir,
        "gate_ratio",
    )?);
    plots.extend(plot(
        "Validation loss (mean over seeds)",
        "loss (nats/token)",
        &val_s,
        dir,
        "val_loss",
    )?);
    let notes = format!("Skywork-MoE trained from scratch with the same data, adaptive auxiliary loss and capacity factor 1.0; only λ differs (none: plain softmax gate). {}", spread_note(&seeds));
    finish(dir, "Gating logit normalisation", &notes, table, csv, plots)
}

fn adaptive_aux(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let variants: [(&str, Option<f64>); 4] = [
        ("adaptive", None),
        ("fixed-0.01", Some(0.01)),
        ("fixed-0.001", Some(0.001)),
        ("fixed-0", Some(0.0)),
    ];
    let seeds = seed_list(o);
    let mut tok = None;
    let mut rows: Vec<(&str, Runs)> = Vec::new();
    for (name, fixed) in variants {
        let mut runs = Runs::new();
        for &seed in &seeds {
            let run = dir.join(name).join(format!("seed-{seed}"));
            let mut c = base(o, &run, tok.clone());
            c.train.seed = seed;
            c.aux.balance = BalanceLoss::Skywork;
            match fixed {
                Some(coef) => {
                    c.aux.adaptive = false;
                    c.aux.coef = coef;
                }
                None => c.aux.adaptive = true,
            }
            train(c, obs, &format!("adaptive-aux: {name}, seed {seed}"))?;
            tok.get_or_insert_with(|| tokenizer_of(&run));
            let (t, v) = records(&run)?;
            runs.push((seed, t, v));
        }
        rows.push((name, runs));
    }
    let mut table = String::from("| coefficient | final validation loss | drop rate, last 25% (mean over layers) | per layer | mean drop rate, whole run | α at the end (per layer) |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("variant,seed,val_loss,drop_rate_tail,drop_rate_all,alpha_final\n");
    let (mut drop_s, mut val_s) = (Vec::new(), Vec::new());
    for (name, runs) in &rows {
        let d: Vec<Vec<f64>> = runs
            .iter()
            .map(|(_, t, _)| tail_per_layer(t, |m| &m.drop_rate))
            .collect();
        let all: Vec<f64> = runs
            .iter()
            .map(|(_, t, _)| mean(t.iter().map(|m| mean(m.drop_rate.iter().copied()))))
            .collect();
        let a: Vec<Vec<f64>> = runs
            .iter()
            .map(|(_, t, _)| t.last().map(|m| m.alpha.clone()).unwrap_or_default())
            .collect();
        let v = Spread::of(runs.iter().map(|(_, _, v)| final_val(v)));
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} |",
            v.fmt(4),
            Spread::of(d.iter().map(|x| mean(x.clone()))).fmt(3),
            fmt_layers(&mean_layers(&d), 3),
            Spread::of(all.iter().copied()).fmt(3),
            fmt_layers(&mean_layers(&a), 5)
        );
        for (i, (seed, _, val)) in runs.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{name},{seed},{},{},{},{}",
                final_val(val),
                mean(d[i].clone()),
                all[i],
                mean(a[i].clone())
            );
        }
        drop_s.push((
            name.to_string(),
            mean_curve(
                &runs
                    .iter()
                    .map(|(_, t, _)| layer_mean_series(t, |m| &m.drop_rate))
                    .collect::<Vec<_>>(),
            ),
        ));
        val_s.push((
            name.to_string(),
            mean_curve(
                &runs
                    .iter()
                    .map(|(_, _, v)| val_series(v))
                    .collect::<Vec<_>>(),
            ),
        ));
    }
    let mut plots = plot(
        "Token drop rate (mean over layers and seeds), capacity factor 1.0",
        "drop rate",
        &drop_s,
        dir,
        "drop_rate",
    )?;
    plots.extend(plot(
        "Validation loss (mean over seeds)",
        "loss (nats/token)",
        &val_s,
        dir,
        "val_loss",
    )?);
    let notes = format!("Skywork-MoE (λ = 1) trained from scratch; the Skywork balancing loss with the adaptive per-layer coefficient (ξ = 0.2, α_max = 0.01, β = 0.99, α₀ = 0) or a fixed one. Per-layer drop rate and α over time are in each run's `metrics.jsonl` (`VARIANT/seed-S/`). {}", spread_note(&seeds));
    finish(
        dir,
        "Adaptive auxiliary-loss coefficient",
        &notes,
        table,
        csv,
        plots,
    )
}

/// Train the dense model the upcycling experiments start from, in `run`; returns (checkpoint,
/// tokenizer). Without `tok` the run trains the tokenizer.
fn dense_base(
    o: &ExperimentOptions,
    run: &Path,
    seed: u64,
    tok: Option<PathBuf>,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, PathBuf)> {
    let mut c = base(o, run, tok.clone());
    c.model.arch = "llama".into();
    c.train.seed = seed;
    let s = train(c, obs, &format!("dense model to upcycle, seed {seed}"))?;
    Ok((s.checkpoint, tok.unwrap_or_else(|| tokenizer_of(run))))
}

fn upcycle_to(dense: &Path, out: &Path, seed: u64) -> Result<()> {
    upcycle(
        dense,
        out,
        &UpcycleOptions {
            experts: 8,
            top_k: 2,
            arch: Architecture::SkyworkMoe,
            gate_init: GateInit::Normal(0.02),
            expert_noise: 0.0,
            gate_norm_std: Some(1.0),
            segments: 1,
            seed,
            kv_lora_rank: None,
            rope_dim: None,
            dense_layers: 0,
        },
    )?;
    Ok(())
}

fn upcycle_vs_scratch(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let seeds = seed_list(o);
    let dense_steps = scale(o).steps;
    let budgets = [("half", dense_steps / 2), ("double", dense_steps * 2)];
    // finals[budget][kind] = per-seed final validation losses; curves likewise.
    let mut finals = vec![vec![Vec::new(), Vec::new()]; budgets.len()];
    let mut curves = vec![vec![Vec::new(), Vec::new()]; budgets.len()];
    let mut tok = None;
    for &seed in &seeds {
        let (dense, t) = dense_base(
            o,
            &dir.join("dense").join(format!("seed-{seed}")),
            seed,
            tok.clone(),
            obs,
        )?;
        let tok = tok.get_or_insert(t).clone();
        let init = dir.join("moe-init").join(format!("seed-{seed}"));
        upcycle_to(&dense, &init, seed)?;
        for (b, (label, steps)) in budgets.iter().enumerate() {
            for (k, kind) in ["upcycled", "scratch"].into_iter().enumerate() {
                let run = dir
                    .join(format!("{kind}-{label}"))
                    .join(format!("seed-{seed}"));
                let mut c = base(o, &run, Some(tok.clone()));
                c.train.seed = seed;
                c.train.steps = *steps;
                c.train.eval_every = (steps / 8).max(1);
                if kind == "upcycled" {
                    c.model.init = Some(init.clone());
                    c.optim.lr = 1e-3;
                    c.optim.min_lr = 1e-4;
                }
                train(
                    c,
                    obs,
                    &format!("upcycle-vs-scratch: {kind}, {steps} steps, seed {seed}"),
                )?;
                let (_, val) = records(&run)?;
                finals[b][k].push(final_val(&val));
                curves[b][k].push(val_series(&val));
            }
        }
    }
    let mut table = String::from("| MoE budget (steps) | vs dense budget | upcycled: final validation loss | from scratch: final validation loss | difference (upcycled − scratch), per seed |\n| --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("budget_steps,seed,upcycled_val,scratch_val\n");
    let mut plots = Vec::new();
    for (b, (label, steps)) in budgets.iter().enumerate() {
        let diff = Spread::of(finals[b][0].iter().zip(&finals[b][1]).map(|(u, s)| u - s));
        let diff = if diff.n > 1 {
            format!("{:+.4} ({:+.4} – {:+.4})", diff.mean, diff.min, diff.max)
        } else {
            format!("{:+.4}", diff.mean)
        };
        let _ = writeln!(
            table,
            "| {steps} | {}x | {} | {} | {diff} |",
            *steps as f64 / dense_steps as f64,
            Spread::of(finals[b][0].iter().copied()).fmt(4),
            Spread::of(finals[b][1].iter().copied()).fmt(4),
        );
        for (i, seed) in seeds.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{steps},{seed},{},{}",
                finals[b][0][i], finals[b][1][i]
            );
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = ["upcycled", "scratch"]
            .iter()
            .enumerate()
            .map(|(k, kind)| (format!("{kind} ({steps} steps)"), mean_curve(&curves[b][k])))
            .collect();
        plots.extend(plot(
            &format!(
                "Validation loss (mean over seeds), MoE budget {steps} steps ({label} the dense model's)"
            ),
            "loss (nats/token)",
            &series,
            dir,
            &format!("val_loss_{label}"),
        )?);
    }
    let notes = format!("A dense Llama trained {dense_steps} steps is upcycled (8 experts, top-2, Skywork layout, λ = 1, peak lr 1e-3) and compared with the same MoE trained from scratch (peak lr 2e-3), both for half and for twice the dense model's budget. The upcycled model's budget excludes the dense pre-training it inherits. Each seed trains its own dense model, upcycles it (gate initialisation from the seed) and trains both MoEs with it. {}", spread_note(&seeds));
    finish(
        dir,
        "Upcycling against training from scratch",
        &notes,
        table,
        csv,
        plots,
    )
}

/// Mean pairwise cosine similarity of the experts of every MoE layer (each expert flattened to
/// one vector of its w1, w3 and w2), averaged over layers.
pub fn expert_similarity_of(
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<f64> {
    let mut per_layer = Vec::new();
    for l in 0..config.num_hidden_layers {
        if !config.is_moe_layer(l) {
            continue;
        }
        let names = config.moe_names(l);
        let mut rows = Vec::new();
        for e in &names.experts {
            let mut parts = Vec::new();
            for n in [&e.gate, &e.up, &e.down] {
                let t = tensors
                    .get(n)
                    .ok_or_else(|| TrainError::Config(format!("no tensor {n}")))?;
                parts.push(t.flatten_all()?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        let v = Tensor::stack(&rows, 0)?; // [E, P]
        let norms = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let u = v.broadcast_div(&norms)?;
        let gram = u.matmul(&u.t()?)?.to_vec2::<f32>()?;
        let e = gram.len();
        let mut s = 0.0;
        for (i, row) in gram.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                if i != j {
                    s += *x as f64;
                }
            }
        }
        per_layer.push(s / (e * (e - 1)).max(1) as f64);
    }
    Ok(mean(per_layer))
}

fn similarity_series(run: &Path, init: (u64, f64)) -> Result<Vec<(f64, f64)>> {
    let mut out = vec![(init.0 as f64, init.1)];
    for (step, ck) in list_checkpoints(&run.join("checkpoints"))? {
        let c = Checkpoint::open(&ck, &Device::Cpu)?;
        let p = TrainableParams::from_checkpoint(&c, &Device::Cpu)?;
        out.push((step as f64, expert_similarity_of(&c.config, &p.tensors())?));
    }
    Ok(out)
}

fn expert_similarity(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let seeds = seed_list(o);
    let steps = scale(o).steps;
    let kinds = ["upcycled", "scratch"];
    // sims[kind] = per-seed similarity curves; vals[kind] = per-seed final validation losses.
    let mut sims = [Vec::new(), Vec::new()];
    let mut vals = [Vec::new(), Vec::new()];
    // results.csv: the mean over seeds; seeds.csv: every seed.
    let mut csv = String::from("model,step,similarity\n");
    let mut seeds_csv = String::from("model,seed,step,similarity\n");
    let mut tok = None;
    for &seed in &seeds {
        let (dense, t) = dense_base(
            o,
            &dir.join("dense").join(format!("seed-{seed}")),
            seed,
            tok.clone(),
            obs,
        )?;
        let tok = tok.get_or_insert(t).clone();
        let init = dir.join("moe-init").join(format!("seed-{seed}"));
        upcycle_to(&dense, &init, seed)?;
        for (k, kind) in kinds.into_iter().enumerate() {
            let run = dir.join(kind).join(format!("seed-{seed}"));
            let mut c = base(o, &run, Some(tok.clone()));
            c.train.seed = seed;
            c.train.checkpoint_every = (steps / 8).max(1);
            c.train.keep_checkpoints = 100;
            let start = if kind == "upcycled" {
                c.model.init = Some(init.clone());
                c.optim.lr = 1e-3;
                c.optim.min_lr = 1e-4;
                let ck = Checkpoint::open(&init, &Device::Cpu)?;
                let p = TrainableParams::from_checkpoint(&ck, &Device::Cpu)?;
                expert_similarity_of(&ck.config, &p.tensors())?
            } else {
                // The trainer initialises a fresh model exactly like this.
                let vocab = tokenizers::Tokenizer::from_file(&tok)
                    .map_err(|e| TrainError::Config(e.to_string()))?
                    .get_vocab_size(true);
                let mc = c.fresh_model_config(vocab, None, None)?;
                let p = TrainableParams::random(&mc, c.model.init_std, c.train.seed, &Device::Cpu)?;
                expert_similarity_of(&mc, &p.tensors())?
            };
            train(c, obs, &format!("expert-similarity: {kind}, seed {seed}"))?;
            let s = similarity_series(&run, (0, start))?;
            for (x, y) in &s {
                let _ = writeln!(seeds_csv, "{kind},{seed},{x},{y}");
            }
            let (_, val) = records(&run)?;
            vals[k].push(final_val(&val));
            sims[k].push(s);
        }
    }
    let at = |s: &[(f64, f64)], frac: f64| -> f64 {
        let target = steps as f64 * frac;
        s.iter()
            .min_by(|a, b| (a.0 - target).abs().total_cmp(&(b.0 - target).abs()))
            .map_or(f64::NAN, |p| p.1)
    };
    let mut table = String::from("| model | similarity at start | after 25% | after 50% | at the end | final validation loss |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut series = Vec::new();
    for (k, kind) in kinds.into_iter().enumerate() {
        let cell = |frac: f64| Spread::of(sims[k].iter().map(|s| at(s, frac))).fmt(4);
        let _ = writeln!(
            table,
            "| {kind} | {} | {} | {} | {} | {} |",
            cell(0.0),
            cell(0.25),
            cell(0.5),
            cell(1.0),
            Spread::of(vals[k].iter().copied()).fmt(4)
        );
        let m = mean_curve(&sims[k]);
        for (x, y) in &m {
            let _ = writeln!(csv, "{kind},{x},{y}");
        }
        series.push((kind.to_string(), m));
    }
    let seeds_path = dir.join("seeds.csv");
    std::fs::write(&seeds_path, seeds_csv).map_err(|e| TrainError::io(&seeds_path, e))?;
    let plots = plot(
        "Mean pairwise cosine similarity of experts (mean over layers and seeds)",
        "cosine similarity",
        &series,
        dir,
        "similarity",
    )?;
    let notes = format!("Metric: for each MoE layer, every expert's w1, w3 and w2 are flattened into one vector; the similarity of a layer is the mean cosine similarity over all ordered pairs of distinct experts; the figure is the mean over layers. Upcycled experts start identical (1.0); experts trained from scratch start near 0. Each seed trains its own dense model to upcycle. `results.csv` holds the mean over seeds, `seeds.csv` every seed. {}", spread_note(&seeds));
    finish(
        dir,
        "Expert similarity over training",
        &notes,
        table,
        csv,
        plots,
    )
}
