//! The Skywork-MoE report's findings reproduced in miniature (`skymoe experiment NAME`):
//!
//! - `gating-norm`: gating logit normalisation λ ∈ {none, 1, 2} — token drop rate, mean
//!   top-1/top-2 gate ratio per layer, validation loss;
//! - `adaptive-aux`: the adaptive auxiliary-loss coefficient against fixed 0.01, 0.001 and 0 —
//!   drop rate over time per layer, validation loss;
//! - `upcycle-vs-scratch`: an upcycled MoE against one trained from scratch, at a budget of half
//!   the dense model's and at twice it — validation loss curves;
//! - `expert-similarity`: mean pairwise cosine similarity of the experts of each layer over
//!   training, upcycled against from scratch.
//!
//! Each writes `OUT/NAME/results.md` (a table), `results.csv`, plots, and a run directory per
//! variant (with its own report).

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
}

impl Experiment {
    /// Every experiment, in order.
    pub const ALL: [Experiment; 4] = [
        Experiment::GatingNorm,
        Experiment::AdaptiveAux,
        Experiment::UpcycleVsScratch,
        Experiment::ExpertSimilarity,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::GatingNorm => "gating-norm",
            Experiment::AdaptiveAux => "adaptive-aux",
            Experiment::UpcycleVsScratch => "upcycle-vs-scratch",
            Experiment::ExpertSimilarity => "expert-similarity",
        }
    }
}

impl std::str::FromStr for Experiment {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Experiment::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown experiment `{s}` (gating-norm | adaptive-aux | upcycle-vs-scratch | expert-similarity)"))
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
    /// Seed.
    pub seed: u64,
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
    c.train.eval_every = (s.steps / 5).max(1);
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
    let mut tok = None;
    let mut rows = Vec::new();
    for (name, lambda) in variants {
        let run = dir.join(name);
        let mut c = base(o, &run, tok.clone());
        c.model.gate_norm_std = lambda;
        train(c, obs, &format!("gating-norm: {name}"))?;
        tok.get_or_insert_with(|| tokenizer_of(&run));
        rows.push((name, records(&run)?));
    }
    let mut table = String::from("| gating | final validation loss | drop rate, last 25% (per layer) | top-1/top-2 gate ratio, last 25% (per layer) |\n| --- | --- | --- | --- |\n");
    let mut csv = String::from("variant,val_loss,drop_rate_mean,gate_ratio_mean\n");
    let (mut drop_s, mut ratio_s, mut val_s) = (Vec::new(), Vec::new(), Vec::new());
    for (name, (train, val)) in &rows {
        let d = tail_per_layer(train, |m| &m.drop_rate);
        let g = tail_per_layer(train, |m| &m.gate_ratio);
        let v = val.last().map_or(f64::NAN, |v| v.val_loss);
        let _ = writeln!(
            table,
            "| {name} | {v:.4} | {} (mean {:.3}) | {} (mean {:.2}) |",
            fmt_layers(&d, 3),
            mean(d.clone()),
            fmt_layers(&g, 2),
            mean(g.clone())
        );
        let _ = writeln!(csv, "{name},{v},{},{}", mean(d.clone()), mean(g.clone()));
        drop_s.push((name.to_string(), layer_mean_series(train, |m| &m.drop_rate)));
        ratio_s.push((
            name.to_string(),
            layer_mean_series(train, |m| &m.gate_ratio),
        ));
        val_s.push((name.to_string(), val_series(val)));
    }
    let mut plots = plot(
        "Token drop rate (mean over layers), capacity factor 1.0",
        "drop rate",
        &drop_s,
        dir,
        "drop_rate",
    )?;
    plots.extend(plot(
        "Top-1 / top-2 gate probability ratio (mean over layers)",
        "ratio",
        &ratio_s,
        dir,
        "gate_ratio",
    )?);
    plots.extend(plot(
        "Validation loss",
        "loss (nats/token)",
        &val_s,
        dir,
        "val_loss",
    )?);
    finish(dir, "Gating logit normalisation", "Skywork-MoE trained from scratch with the same data, seed, adaptive auxiliary loss and capacity factor 1.0; only λ differs (none: plain softmax gate).", table, csv, plots)
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
    let mut tok = None;
    let mut rows = Vec::new();
    for (name, fixed) in variants {
        let run = dir.join(name);
        let mut c = base(o, &run, tok.clone());
        c.aux.balance = BalanceLoss::Skywork;
        match fixed {
            Some(coef) => {
                c.aux.adaptive = false;
                c.aux.coef = coef;
            }
            None => c.aux.adaptive = true,
        }
        train(c, obs, &format!("adaptive-aux: {name}"))?;
        tok.get_or_insert_with(|| tokenizer_of(&run));
        rows.push((name, records(&run)?));
    }
    let mut table = String::from("| coefficient | final validation loss | drop rate, last 25% (per layer) | mean drop rate, whole run | α at the end (per layer) |\n| --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("variant,val_loss,drop_rate_tail,drop_rate_all,alpha_final\n");
    let (mut drop_s, mut val_s) = (Vec::new(), Vec::new());
    for (name, (train, val)) in &rows {
        let d = tail_per_layer(train, |m| &m.drop_rate);
        let all = mean(train.iter().map(|m| mean(m.drop_rate.iter().copied())));
        let a = train.last().map(|m| m.alpha.clone()).unwrap_or_default();
        let v = val.last().map_or(f64::NAN, |v| v.val_loss);
        let _ = writeln!(
            table,
            "| {name} | {v:.4} | {} | {all:.3} | {} |",
            fmt_layers(&d, 3),
            fmt_layers(&a, 5)
        );
        let _ = writeln!(
            csv,
            "{name},{v},{},{all},{}",
            mean(d.clone()),
            mean(a.clone())
        );
        drop_s.push((name.to_string(), layer_mean_series(train, |m| &m.drop_rate)));
        val_s.push((name.to_string(), val_series(val)));
    }
    let mut plots = plot(
        "Token drop rate (mean over layers), capacity factor 1.0",
        "drop rate",
        &drop_s,
        dir,
        "drop_rate",
    )?;
    plots.extend(plot(
        "Validation loss",
        "loss (nats/token)",
        &val_s,
        dir,
        "val_loss",
    )?);
    finish(dir, "Adaptive auxiliary-loss coefficient", "Skywork-MoE (λ = 1) trained from scratch; the Skywork balancing loss with the adaptive per-layer coefficient (ξ = 0.2, α_max = 0.01, β = 0.99, α₀ = 0) or a fixed one. Per-layer drop rate and α over time are in each variant's report (`VARIANT/report/`).", table, csv, plots)
}

/// Train the dense model both upcycling experiments start from; returns (checkpoint, tokenizer).
fn dense_base(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, PathBuf)> {
    let run = dir.join("dense");
    let mut c = base(o, &run, None);
    c.model.arch = "llama".into();
    let s = train(c, obs, "dense model to upcycle")?;
    Ok((s.checkpoint, tokenizer_of(&run)))
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
        },
    )?;
    Ok(())
}

fn upcycle_vs_scratch(
    o: &ExperimentOptions,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<ExperimentResult> {
    let (dense, tok) = dense_base(o, dir, obs)?;
    let dense_steps = scale(o).steps;
    upcycle_to(&dense, &dir.join("moe-init"), o.seed)?;
    let mut table = String::from("| MoE budget (steps) | vs dense budget | upcycled: final validation loss | from scratch: final validation loss | difference (upcycled − scratch) |\n| --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("budget_steps,upcycled_val,scratch_val\n");
    let mut plots = Vec::new();
    for (label, steps) in [("half", dense_steps / 2), ("double", dense_steps * 2)] {
        let mut finals = Vec::new();
        let mut series = Vec::new();
        for kind in ["upcycled", "scratch"] {
            let run = dir.join(format!("{kind}-{label}"));
            let mut c = base(o, &run, Some(tok.clone()));
            c.train.steps = steps;
            c.train.eval_every = (steps / 8).max(1);
            if kind == "upcycled" {
                c.model.init = Some(dir.join("moe-init"));
                c.optim.lr = 1e-3;
                c.optim.min_lr = 1e-4;
            }
            train(
                c,
                obs,
                &format!("upcycle-vs-scratch: {kind}, {steps} steps"),
            )?;
            let (_, val) = records(&run)?;
            finals.push(val.last().map_or(f64::NAN, |v| v.val_loss));
            series.push((format!("{kind} ({steps} steps)"), val_series(&val)));
        }
        let _ = writeln!(
            table,
            "| {steps} | {}x | {:.4} | {:.4} | {:+.4} |",
            steps as f64 / dense_steps as f64,
            finals[0],
            finals[1],
            finals[0] - finals[1]
        );
        let _ = writeln!(csv, "{steps},{},{}", finals[0], finals[1]);
        plots.extend(plot(
            &format!("Validation loss, MoE budget {steps} steps ({label} the dense model's)"),
            "loss (nats/token)",
            &series,
            dir,
            &format!("val_loss_{label}"),
        )?);
    }
    let notes = format!("A dense Llama trained {dense_steps} steps is upcycled (8 experts, top-2, Skywork layout, λ = 1, peak lr 1e-3) and compared with the same MoE trained from scratch (peak lr 2e-3), both for half and for twice the dense model's budget. The upcycled model's budget excludes the dense pre-training it inherits.");
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
    let (dense, tok) = dense_base(o, dir, obs)?;
    let steps = scale(o).steps;
    let init = dir.join("moe-init");
    upcycle_to(&dense, &init, o.seed)?;
    let mut series = Vec::new();
    let mut table = String::from("| model | similarity at start | after 25% | after 50% | at the end | final validation loss |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut csv = String::from("model,step,similarity\n");
    for kind in ["upcycled", "scratch"] {
        let run = dir.join(kind);
        let mut c = base(o, &run, Some(tok.clone()));
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
        train(c, obs, &format!("expert-similarity: {kind}"))?;
        let s = similarity_series(&run, (0, start))?;
        let at = |frac: f64| -> f64 {
            let target = steps as f64 * frac;
            s.iter()
                .min_by(|a, b| (a.0 - target).abs().total_cmp(&(b.0 - target).abs()))
                .map_or(f64::NAN, |p| p.1)
        };
        let (_, val) = records(&run)?;
        let v = val.last().map_or(f64::NAN, |v| v.val_loss);
        let _ = writeln!(
            table,
            "| {kind} | {:.4} | {:.4} | {:.4} | {:.4} | {v:.4} |",
            at(0.0),
            at(0.25),
            at(0.5),
            at(1.0)
        );
        for (x, y) in &s {
            let _ = writeln!(csv, "{kind},{x},{y}");
        }
        series.push((kind.to_string(), s));
    }
    let plots = plot(
        "Mean pairwise cosine similarity of experts (mean over layers)",
        "cosine similarity",
        &series,
        dir,
        "similarity",
    )?;
    finish(dir, "Expert similarity over training", "Metric: for each MoE layer, every expert's w1, w3 and w2 are flattened into one vector; the similarity of a layer is the mean cosine similarity over all ordered pairs of distinct experts; the figure is the mean over layers. Upcycled experts start identical (1.0); experts trained from scratch start near 0.", table, csv, plots)
}
