//! `skymoe train`: train a model from a TOML run file (CLI flags override it), with a progress
//! bar, a JSONL metrics log, validation and checkpoints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use skymoe_train::trainer::{Observer, StepMetrics, ValMetrics};
use skymoe_train::{RunConfig, Trainer};

use super::launch;

/// Arguments of `skymoe train`.
#[derive(clap::Args)]
pub struct Args {
    /// The run file (see docs/run.toml for every option).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override train.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Override train.out_dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override data.inputs (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Override model.init (a checkpoint to start from: a directory, a .gguf file or a hub
    /// id in the local Hugging Face cache).
    #[arg(long, value_parser = super::model_arg)]
    init: Option<PathBuf>,
    /// Override optim.lr.
    #[arg(long)]
    lr: Option<f64>,
    /// Override train.batch_size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override train.grad_accum.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Override train.concurrent_micro_batches.
    #[arg(long)]
    concurrent_micro_batches: Option<usize>,
    /// Override data.seq_len.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Override train.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override train.checkpoint_every.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Continue from the newest checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// No progress bar (log lines instead).
    #[arg(long)]
    quiet: bool,
    /// Parallel layout, as `skymoe plan` prints it: `tp=..,ep=..,edp=..,etp=..,pp=..,dp=..,zero=..`.
    #[arg(long)]
    parallel: Option<String>,
    /// Decoder layers per pipeline stage, e.g. 5,7,7,5.
    #[arg(long)]
    pp_layers: Option<String>,
    /// Recomputed (activation-checkpointed) layers per pipeline stage.
    #[arg(long)]
    recompute_layers: Option<String>,
    /// Seconds a collective may wait for the other processes before the run stops.
    #[arg(long, default_value_t = 600)]
    comm_timeout_s: u64,
}

/// Parse `--parallel` and check it against the processes of this run. Data parallelism runs
/// over processes; the other degrees are checked but not yet run across processes.
fn parallel_spec(a: &Args, world: usize) -> anyhow::Result<skymoe_plan::Layout> {
    let spec = match &a.parallel {
        Some(text) => skymoe_plan::LayoutSpec::parse(text)?,
        None => skymoe_plan::LayoutSpec::default(),
    };
    let wanted = spec.tp.or(spec.edp).unwrap_or(1)
        * spec.pp.unwrap_or(1)
        * spec
            .dp
            .unwrap_or(if a.parallel.is_some() { 1 } else { world });
    if wanted != world {
        if world == 1 {
            anyhow::bail!(
                "--parallel {} needs {wanted} processes; launch with `mpirun -np {wanted} skymoe train ...`",
                a.parallel.as_deref().unwrap_or("")
            );
        }
        anyhow::bail!(
            "--parallel {} needs {wanted} processes, but {world} were started",
            a.parallel.as_deref().unwrap_or("")
        );
    }
    let layout = spec.resolve(world, 0)?;
    use skymoe_plan::Strategy;
    let experts_ok = matches!(layout.strategy(), Strategy::Edp | Strategy::Etp)
        || layout.strategy() == Strategy::Ep
        || (layout.tp == 1 && layout.strategy() == Strategy::Replicated);
    if !experts_ok {
        anyhow::bail!(
            "--parallel {}: training runs data (dp=N), tensor (tp=N: experts split; edp=N: experts whole), expert (ep=N, experts whole) and pipeline (pp=N) parallelism and their products; experts both spread and split (ep with etp > 1) and experts replicated over a tensor-parallel group are not available yet",
            layout.to_arg()
        );
    }
    if layout.zero > 1 {
        anyhow::bail!(
            "--parallel {}: ZeRO-{} is not available; zero=1 (optimiser state sharded over data-parallel replicas) is",
            layout.to_arg(),
            layout.zero
        );
    }
    Ok(layout)
}

/// The planner's non-uniform stage split for this run (the first stage also embeds, the last
/// also runs the LM head and loss), from its cost model with CPU constants.
fn planned_split(
    cfg: RunConfig,
    layout: skymoe_plan::Layout,
    world: usize,
) -> skymoe_train::sharded::SplitChooser {
    Box::new(move |config, stages| {
        use skymoe_plan::planner::{evaluate, SplitChoice};
        use skymoe_plan::{Cluster, Job, ModelShape, Precision};
        let shape = ModelShape::from_config(config, "model");
        let cluster = Cluster {
            name: "this machine".into(),
            gpus_per_node: world,
            nodes: 1,
            mem_gib: 1e6,
            reserved_gib: 0.0,
            tflops: 0.2,
            fp32_tflops: 0.2,
            matmul_efficiency: 1.0,
            mem_gbps: 5.0,
            intra_gbps: 10.0,
            inter_gbps: 10.0,
            intra_latency_us: 1.0,
            inter_latency_us: 1.0,
            layer_overhead_us: 0.0,
        };
        let t = &cfg.train;
        let tokens = (t.batch_size * cfg.data.seq_len * t.grad_accum * layout.dp) as u64;
        let job = Job {
            micro_batch: t.batch_size,
            precision: Precision::Fp32,
            capacity_factor: cfg.router.capacity_factor,
            ..Job::new(tokens, cfg.data.seq_len)
        };
        let layout = skymoe_plan::Layout { zero: 0, ..layout };
        evaluate(&shape, &cluster, &job, layout, &SplitChoice::default())
            .ok()
            .filter(|p| p.feasible && p.pp_layers.len() == stages)
            .map(|p| p.pp_layers)
    })
}

/// Check `--parallel`, `--pp-layers` and `--recompute-layers` against the model.
fn check_parallel(
    a: &Args,
    layout: skymoe_plan::Layout,
    procs: &launch::Processes,
    model: &skymoe_model::ModelConfig,
) -> anyhow::Result<()> {
    use skymoe_plan::layout::{check_stage_layers, parse_counts};
    use skymoe_plan::ModelShape;
    skymoe_dist::mesh::Mesh::new(
        procs.world,
        procs.rank,
        layout,
        &ModelShape::from_config(model, "model"),
    )?;
    if let Some(text) = &a.pp_layers {
        check_stage_layers(&parse_counts(text)?, layout.pp, model.num_hidden_layers)?;
    }
    if let Some(text) = &a.recompute_layers {
        let counts = parse_counts(text)?;
        if counts.len() != layout.pp {
            anyhow::bail!(
                "{} recompute counts given for pp={}",
                counts.len(),
                layout.pp
            );
        }
    }
    Ok(())
}

/// Draws the progress bar.
pub struct ProgressObserver {
    bar: Option<ProgressBar>,
    quiet: bool,
    last_val: Option<f64>,
    /// Communication payload counter at the previous step, and the per-step differences.
    last_bytes: u64,
    step_bytes: Vec<u64>,
}

impl ProgressObserver {
    /// A progress bar, or plain lines when `quiet`.
    pub fn new(quiet: bool) -> Self {
        ProgressObserver {
            bar: None,
            quiet,
            last_val: None,
            last_bytes: skymoe_dist::comm::payload_bytes(),
            step_bytes: Vec::new(),
        }
    }

    /// Median bytes this process handed to collectives and sends per training step.
    pub fn median_step_bytes(&self) -> Option<u64> {
        let mut v = self.step_bytes.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }
}

impl Observer for ProgressObserver {
    fn on_start(&mut self, start: u64, total: u64) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(start);
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn on_step(&mut self, m: &StepMetrics) {
        let now = skymoe_dist::comm::payload_bytes();
        self.step_bytes.push(now - self.last_bytes);
        self.last_bytes = now;
        let drop = if m.drop_rate.is_empty() {
            String::new()
        } else {
            format!(
                " drop {:.3}",
                m.drop_rate.iter().sum::<f64>() / m.drop_rate.len() as f64
            )
        };
        let val = self
            .last_val
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}{val}{drop} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        );
        match &self.bar {
            Some(b) => {
                b.set_position(m.step);
                b.set_message(msg);
            }
            None => eprintln!("step {} {msg}", m.step),
        }
    }

    fn on_val(&mut self, v: &ValMetrics) {
        self.last_val = Some(v.val_loss);
        self.on_message(&format!(
            "step {}: validation loss {:.4} (perplexity {:.2})",
            v.step, v.val_loss, v.val_ppl
        ));
    }

    fn on_checkpoint(&mut self, dir: &Path) {
        self.on_message(&format!("checkpoint {}", dir.display()));
    }

    fn on_message(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}

impl Drop for ProgressObserver {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Apply the CLI overrides to a run configuration.
fn apply_overrides(mut cfg: RunConfig, a: &Args) -> RunConfig {
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    if let Some(o) = &a.out {
        cfg.train.out_dir = o.clone();
    }
    if !a.data.is_empty() {
        cfg.data.inputs = a.data.clone();
    }
    if let Some(i) = &a.init {
        cfg.model.init = Some(i.clone());
    }
    if let Some(lr) = a.lr {
        cfg.optim.lr = lr;
    }
    if let Some(b) = a.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(g) = a.grad_accum {
        cfg.train.grad_accum = g;
    }
    if let Some(c) = a.concurrent_micro_batches {
        cfg.train.concurrent_micro_batches = c;
    }
    if let Some(s) = a.seq_len {
        cfg.data.seq_len = s;
    }
    if let Some(s) = a.seed {
        cfg.train.seed = s;
    }
    if let Some(c) = a.checkpoint_every {
        cfg.train.checkpoint_every = c;
    }
    if a.resume {
        cfg.train.resume = true;
    }
    cfg
}

/// Activations of at most this many elements per micro-batch (tokens × hidden width) are
/// small enough that candle's element-wise worker pool costs more than it saves: one
/// micro-batch of the benchmark model (4 × 256 tokens, hidden 256) trains 5–10% faster with the
/// element-wise ops on the calling thread, and at hidden 1024 (1 Mi elements) the two measured
/// level (2 cores, `benches/train_vs_pytorch.py` and 10-step runs at hidden 1024).
const SMALL_ACTIVATION_ELEMS: usize = 1 << 20;

/// When micro-batches will run concurrently, one per thread, candle's element-wise ops stay
/// on the thread that calls them (`CANDLE_NUM_THREADS=1`, unless set): its own worker pool
/// takes one caller at a time and would make the micro-batches wait for each other and spin
/// against their threads. The same for one micro-batch of a fresh model whose activations are
/// small ([`SMALL_ACTIVATION_ELEMS`]): the heavy operations run on the rayon pool in any case,
/// and the element-wise pool's threads would only wake, synchronise and spin against it.
/// Runs before any tensor op (candle reads the variable once).
fn keep_elementwise_ops_on_their_thread(cfg: &RunConfig) {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if elementwise_on_caller(cfg, threads) && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Whether candle's element-wise ops should run on the calling thread for this run on
/// `threads` threads (see [`keep_elementwise_ops_on_their_thread`]).
fn elementwise_on_caller(cfg: &RunConfig, threads: usize) -> bool {
    let concurrent = match cfg.train.concurrent_micro_batches {
        0 => threads,
        n => n,
    }
    .min(cfg.train.grad_accum);
    let small = cfg.model.init.is_none()
        && cfg
            .train
            .batch_size
            .saturating_mul(cfg.data.seq_len)
            .saturating_mul(cfg.model.hidden_size)
            <= SMALL_ACTIVATION_ELEMS;
    concurrent > 1 || small
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let mut procs = launch::Processes::detect()?;
    match run_on(&a, &mut procs) {
        Err(e) if procs.world > 1 => procs.fail(&e),
        other => other,
    }
}

fn run_on(a: &Args, procs: &mut launch::Processes) -> anyhow::Result<()> {
    let cfg = match &a.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    let cfg = apply_overrides(cfg, a);
    let a_cfg = cfg.clone();
    let layout = parallel_spec(a, procs.world).context("bad parallel layout")?;
    if layout.tp == 1 && layout.pp == 1 {
        keep_elementwise_ops_on_their_thread(&cfg);
    }
    let lead = procs.rank == 0;
    let mut progress = ProgressObserver::new(a.quiet);
    let mut silent = skymoe_train::trainer::Silent;
    let obs: &mut dyn Observer = if lead { &mut progress } else { &mut silent };
    let mut trainer = if procs.world > 1 {
        use skymoe_dist::data_parallel::DataParallel;
        use skymoe_dist::mesh::{GroupKind, Mesh};
        use skymoe_train::trainer::ReplicaSync;
        let world = procs.world_comm(Duration::from_secs(a.comm_timeout_s.max(1)));
        let mesh = Mesh::for_layout(procs.world, procs.rank, layout)?;
        let data = if layout.dp > 1 {
            let c = mesh.communicator(GroupKind::Dp, world.as_ref())?;
            Some(Box::new(DataParallel::new(c)) as Box<dyn ReplicaSync>)
        } else {
            None
        };
        // EP and EDP move tokens to their experts by all-to-all (for EDP inside the TP group).
        let spread_experts = matches!(
            layout.strategy(),
            skymoe_plan::Strategy::Ep | skymoe_plan::Strategy::Edp
        );
        let shards = if layout.tp > 1 || layout.pp > 1 || spread_experts {
            use skymoe_dist::model_parallel::CommShard;
            use std::sync::Arc;
            let replica = mesh.communicator(GroupKind::ModelParallel, world.as_ref())?;
            let tensor = if layout.tp > 1 {
                let tp = mesh.communicator(GroupKind::Tp, world.as_ref())?;
                Some(skymoe_model::parallel::Sharding {
                    tp: skymoe_model::parallel::TensorParallel {
                        comm: Arc::new(CommShard::new(tp)),
                    },
                    whole_experts: layout.strategy() == skymoe_plan::Strategy::Edp,
                })
            } else {
                None
            };
            let pipeline = if layout.pp > 1 {
                let links = mesh.communicator(GroupKind::Pp, world.as_ref())?;
                let stages = mesh.communicator(GroupKind::Pp, world.as_ref())?;
                let embedding = mesh.communicator(GroupKind::Embedding, world.as_ref())?;
                let stage = mesh.coords(procs.rank).0;
                let layers_per_stage = a
                    .pp_layers
                    .as_deref()
                    .map(skymoe_plan::layout::parse_counts)
                    .transpose()?;
                let choose_split = layers_per_stage
                    .is_none()
                    .then(|| planned_split(a_cfg.clone(), layout, procs.world));
                Some(skymoe_train::sharded::PipelineSplit {
                    choose_split,
                    comm: Arc::new(CommShard::new(links)),
                    stage,
                    stages_count: layout.pp,
                    layers_per_stage,
                    stages: Box::new(DataParallel::new(stages)),
                    embedding: (embedding.size() > 1)
                        .then(|| Box::new(DataParallel::new(embedding)) as Box<dyn ReplicaSync>),
                })
            } else {
                None
            };
            let experts = if spread_experts {
                let a2a = mesh.communicator(GroupKind::Ep, world.as_ref())?;
                let group = mesh.communicator(GroupKind::Ep, world.as_ref())?;
                let expert_dp = mesh.communicator(GroupKind::ExpertDp, world.as_ref())?;
                Some(skymoe_train::sharded::ExpertSplit {
                    ep: skymoe_model::parallel::ExpertParallel {
                        comm: Arc::new(CommShard::new(a2a)),
                    },
                    group: Box::new(DataParallel::new(group)),
                    expert_dp: (expert_dp.size() > 1)
                        .then(|| Box::new(DataParallel::new(expert_dp)) as Box<dyn ReplicaSync>),
                })
            } else {
                None
            };
            Some(skymoe_train::sharded::ModelSplit {
                replica: Box::new(DataParallel::new(replica)),
                tensor,
                pipeline,
                experts,
            })
        } else {
            None
        };
        Trainer::prepare_parallel(cfg, obs, Box::new(DataParallel::new(world)), data, shards)
    } else {
        Trainer::prepare(cfg, obs)
    }
    .context("cannot set up the run")?;
    check_parallel(a, layout, procs, &trainer.model_config).context("bad parallel layout")?;
    if let Some(split) = trainer.pipeline_split().filter(|_| lead) {
        let how = if a.pp_layers.is_some() {
            "given"
        } else {
            "planned"
        };
        eprintln!("pipeline: {split:?} layers per stage ({how})");
    }
    if layout.pp > 1 {
        // 1F1B keeps up to `pp` micro-batches in flight per link, each way.
        let t = &trainer.cfg.train;
        let message =
            t.batch_size * trainer.cfg.data.seq_len * trainer.model_config.hidden_size * 4;
        let messages = 2 * (layout.pp + t.grad_accum) + 4;
        procs.reserve_send_buffer((message + 1024) * messages);
    }
    if layout.zero == 1 && layout.dp > 1 {
        trainer.enable_zero()?;
    }
    if let Some(text) = &a.recompute_layers {
        let counts = skymoe_plan::layout::parse_counts(text)?;
        trainer
            .enable_recompute(&counts)
            .context("bad --recompute-layers")?;
    }
    let summary = trainer.run(obs).context("training failed")?;
    let step_bytes = progress.median_step_bytes();
    drop(progress);
    if !lead {
        return Ok(());
    }
    if let Some(bytes) = step_bytes.filter(|_| procs.world > 1) {
        eprintln!(
            "communication: rank 0 handed {:.2} MiB per step to collectives and sends (median)",
            bytes as f64 / 1048576.0
        );
    }
    eprintln!(
        "trained {} steps{}: final loss {:.4}{}, {:.0} tokens/s; checkpoint {}",
        summary.steps,
        if procs.world > 1 {
            format!(" on {} processes", procs.world)
        } else {
            String::new()
        },
        summary.final_loss,
        summary
            .final_val
            .as_ref()
            .map(|v| format!(
                ", validation loss {:.4} (perplexity {:.2})",
                v.val_loss, v.val_ppl
            ))
            .unwrap_or_default(),
        summary.tokens_per_s,
        summary.checkpoint.display()
    );
    Ok(())
}

#[cfg(test)]
mod elementwise_tests {
    use super::*;

    fn config(batch: usize, seq: usize, hidden: usize, accum: usize) -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.train.batch_size = batch;
        cfg.data.seq_len = seq;
        cfg.model.hidden_size = hidden;
        cfg.train.grad_accum = accum;
        cfg
    }

    #[test]
    fn concurrent_micro_batches_or_small_activations_keep_elementwise_ops_on_the_caller() {
        // Two micro-batches at once on two threads, whatever their size.
        assert!(elementwise_on_caller(&config(8, 4096, 4096, 2), 2));
        // One micro-batch: only while its activations are small.
        assert!(elementwise_on_caller(&config(4, 256, 256, 1), 2));
        assert!(elementwise_on_caller(&config(4, 256, 1024, 1), 2));
        assert!(!elementwise_on_caller(&config(8, 4096, 4096, 1), 2));
        // On one thread micro-batches do not run concurrently.
        assert!(!elementwise_on_caller(&config(8, 4096, 4096, 2), 1));
        // A checkpoint's width is not the config's: no guess for it.
        let mut from_checkpoint = config(4, 256, 256, 1);
        from_checkpoint.model.init = Some("model-dir".into());
        assert!(!elementwise_on_caller(&from_checkpoint, 2));
    }
}
