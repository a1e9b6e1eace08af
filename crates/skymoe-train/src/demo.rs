//! The one-command demonstration of the Skywork-MoE recipe, in miniature: train a small dense
//! model, upcycle it to 8 experts (top-2), continue the MoE with gating logit normalisation and
//! the adaptive auxiliary loss, continue the dense model for the same budget as the control,
//! evaluate both on the same held-out text, write reports and generate a sample from each.

use std::path::{Path, PathBuf};

use candle_core::Device;
use skymoe_model::sampling::{Sampler, SamplingParams};
use skymoe_model::{Architecture, CausalLm, Checkpoint, Tokenizer};

use crate::aux_loss::BalanceLoss;
use crate::error::{Result, TrainError};
use crate::optim::Decay;
use crate::run_config::RunConfig;
use crate::trainer::{Observer, TrainSummary, Trainer};
use crate::upcycle::{upcycle, GateInit, UpcycleOptions};

/// How big a demo to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoSize {
    /// A few minutes on 2 CPU cores.
    Small,
    /// About 4x the compute.
    Medium,
    /// About 16x the compute.
    Large,
}

impl std::str::FromStr for DemoSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "small" => Ok(DemoSize::Small),
            "medium" => Ok(DemoSize::Medium),
            "large" => Ok(DemoSize::Large),
            _ => Err(format!("unknown size `{s}` (small | medium | large)")),
        }
    }
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Text files or directories to train on.
    pub corpus: Vec<PathBuf>,
    /// Where everything goes.
    pub out: PathBuf,
    /// Scale.
    pub size: DemoSize,
    /// Seed of initialisation, data order and sampling.
    pub seed: u64,
    /// Steps of each phase (dense pre-training, then MoE and control); `None`: the size's default.
    pub steps: Option<(u64, u64)>,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoResult {
    /// Dense pre-training.
    pub dense: TrainSummary,
    /// The upcycled MoE's continued training.
    pub moe: TrainSummary,
    /// The dense control's continued training.
    pub control: TrainSummary,
    /// Parameters of the dense and MoE models (total, active per token).
    pub params: ((usize, usize), (usize, usize)),
    /// Generated samples (MoE, control).
    pub samples: (String, String),
    /// The comparison report page.
    pub report: PathBuf,
    /// The prompt of the samples.
    pub prompt: String,
}

fn base_config(o: &DemoOptions) -> RunConfig {
    let (hidden, layers, seq, batch) = match o.size {
        DemoSize::Small => (128, 4, 128, 8),
        DemoSize::Medium => (192, 6, 192, 12),
        DemoSize::Large => (256, 8, 256, 16),
    };
    let mut c = RunConfig::default();
    c.model.arch = "llama".into();
    c.model.hidden_size = hidden;
    c.model.intermediate_size = hidden * 3;
    c.model.layers = layers;
    c.model.heads = 4;
    c.model.kv_heads = 2;
    c.model.max_position_embeddings = seq.max(256);
    c.data.inputs = o.corpus.clone();
    c.data.vocab_size = 2048;
    c.data.seq_len = seq;
    c.data.val_fraction = 0.05;
    c.train.batch_size = batch;
    c.train.eval_batches = 16;
    c.train.keep_checkpoints = 1;
    c.train.seed = o.seed;
    c.optim.warmup_steps = 20;
    c.optim.decay = Decay::Cosine;
    c
}

fn default_steps(size: DemoSize) -> (u64, u64) {
    match size {
        DemoSize::Small => (400, 300),
        DemoSize::Medium => (800, 500),
        DemoSize::Large => (2000, 1200),
    }
}

fn train(cfg: RunConfig, obs: &mut dyn Observer, phase: &str) -> Result<TrainSummary> {
    obs.on_message(&format!("== {phase}"));
    let mut t = Trainer::prepare(cfg, obs)?;
    t.run(obs)
}

/// Greedy-ish sample (temperature 0.8, top-k 40) of `n` tokens from a checkpoint.
pub fn sample(ckpt_dir: &Path, prompt: &str, n: usize, seed: u64) -> Result<String> {
    let dev = Device::Cpu;
    let ck = Checkpoint::open(ckpt_dir, &dev)?;
    let model = CausalLm::load(&ck, &dev)?;
    let tok = Tokenizer::for_model(ckpt_dir, None)?;
    let mut ids = tok.encode_prompt(prompt)?;
    let mut sampler = Sampler::new(
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            ..Default::default()
        },
        seed,
    );
    let mut cache = model.new_cache();
    let mut logits = model.forward_last(&ids, Some(&mut cache))?;
    let start = ids.len();
    for _ in 0..n {
        let next = sampler.sample(&logits.to_vec1::<f32>()?);
        if tok.eos_ids.contains(&next) || cache.len() + 1 >= model.config.max_position_embeddings {
            break;
        }
        ids.push(next);
        logits = model.forward_last(&[next], Some(&mut cache))?;
    }
    Ok(format!("{prompt}{}", tok.decode(&ids[start..])?))
}

/// Run the whole demo.
pub fn run_demo(o: &DemoOptions, obs: &mut dyn Observer) -> Result<DemoResult> {
    if o.corpus.is_empty() {
        return Err(TrainError::Config("the demo needs a corpus".into()));
    }
    let (pre_steps, cont_steps) = o.steps.unwrap_or_else(|| default_steps(o.size));
    let base = base_config(o);

    // 1. Dense pre-training from scratch.
    let mut dense = base.clone();
    dense.train.steps = pre_steps;
    dense.train.eval_every = (pre_steps / 4).max(1);
    dense.train.checkpoint_every = 0;
    dense.optim.lr = 2e-3;
    dense.optim.min_lr = 2e-4;
    dense.train.out_dir = o.out.join("dense");
    let dense_summary = train(
        dense,
        obs,
        &format!("1/4 dense pre-training ({pre_steps} steps)"),
    )?;
    let dense_ckpt = dense_summary.checkpoint.clone();
    let tokenizer = o.out.join("dense").join("tokenizer.json");

    // 2. Upcycle to 8 experts, top-2, Skywork layout with gating logit normalisation (λ = 1).
    obs.on_message("== 2/4 upcycling to 8 experts, top-2 (Skywork-MoE layout, gating logit normalisation λ = 1)");
    let moe_init = o.out.join("moe-init");
    let up = upcycle(
        &dense_ckpt,
        &moe_init,
        &UpcycleOptions {
            experts: 8,
            top_k: 2,
            arch: Architecture::SkyworkMoe,
            gate_init: GateInit::Normal(0.02),
            expert_noise: 0.0,
            gate_norm_std: Some(1.0),
            segments: 1,
            seed: o.seed,
            kv_lora_rank: None,
            rope_dim: None,
            dense_layers: 0,
        },
    )?;
    let dense_cfg = Checkpoint::open(&dense_ckpt, &Device::Cpu)?.config;

    // 3. Continue the MoE (capacity factor 1.25, adaptive Skywork auxiliary loss) and
    // 4. the dense control, for the same number of steps, tokens and learning-rate schedule.
    let mut cont = base.clone();
    cont.data.tokenizer = Some(tokenizer);
    cont.train.steps = cont_steps;
    cont.train.eval_every = (cont_steps / 4).max(1);
    cont.train.checkpoint_every = 0;
    cont.optim.lr = 1e-3;
    cont.optim.min_lr = 1e-4;
    cont.optim.warmup_steps = 10;
    let mut moe = cont.clone();
    moe.model.init = Some(moe_init.clone());
    moe.router.capacity_factor = 1.25;
    moe.aux.balance = BalanceLoss::Skywork;
    moe.aux.adaptive = true;
    moe.train.out_dir = o.out.join("moe");
    let moe_summary = train(
        moe,
        obs,
        &format!(
            "3/4 MoE continued training ({cont_steps} steps, capacity 1.25, adaptive aux loss)"
        ),
    )?;
    let mut control = cont;
    control.model.init = Some(dense_ckpt.clone());
    control.train.out_dir = o.out.join("dense-control");
    let control_summary = train(
        control,
        obs,
        &format!("4/4 dense control ({cont_steps} steps)"),
    )?;

    // Reports and samples.
    for run in ["dense", "moe", "dense-control"] {
        let dir = o.out.join(run);
        crate::report::render_report(&dir, &crate::report::default_out_dir(&dir))
            .map_err(|e| TrainError::Config(format!("report of {run}: {e}")))?;
    }
    let cmp_dir = o.out.join("report");
    let cmp = crate::report::render_comparison(
        &[
            ("MoE (upcycled)", o.out.join("moe")),
            ("dense control", o.out.join("dense-control")),
        ],
        &cmp_dir,
    )
    .map_err(|e| TrainError::Config(format!("comparison report: {e}")))?;
    let prompt = "ROMEO.\n".to_string();
    let samples = (
        sample(&moe_summary.checkpoint, &prompt, 60, o.seed)?,
        sample(&control_summary.checkpoint, &prompt, 60, o.seed)?,
    );
    Ok(DemoResult {
        params: (
            (dense_cfg.total_params(), dense_cfg.active_params()),
            (up.config.total_params(), up.config.active_params()),
        ),
        dense: dense_summary,
        moe: moe_summary,
        control: control_summary,
        samples,
        report: cmp.index_html,
        prompt,
    })
}
