//! The training loop, readable top to bottom: data → forward (capacity, drops) → cross-entropy
//! plus auxiliary losses → backward → clip → AdamW → adaptive α → metrics, validation and
//! checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use skymoe_model::layers::moe::DeferredExpertGrads;
use skymoe_model::{CausalLm, Checkpoint, ModelConfig};

use crate::aux_loss::{
    global_aux, sequence_aux, skywork_aux, switch_aux, update_selection_bias, z_loss, BalanceLoss,
};
use crate::checkpoint::{list_checkpoints, load_trainer_state, save_checkpoint, TrainerState};
use crate::data::{PackedDataset, TokenFile};
use crate::error::{Result, TrainError};
use crate::loss::cross_entropy;
use crate::optim::{global_norm, AdamW, GradSum};
use crate::params::TrainableParams;
use crate::run_config::RunConfig;

/// Metrics of one optimiser step (one line of `metrics.jsonl`, `kind = "train"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser step (1-based: the number of updates done).
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Total loss (cross-entropy + auxiliary terms), averaged over micro-batches.
    pub loss: f64,
    /// Cross-entropy.
    pub ce: f64,
    /// Σ_l α_l · L_aux_l.
    pub aux_loss: f64,
    /// z-loss term (coefficient applied).
    pub z_loss: f64,
    /// α per MoE layer used in this step.
    pub alpha: Vec<f64>,
    /// Token drop rate per MoE layer.
    pub drop_rate: Vec<f64>,
    /// Fraction of assignments per expert, per MoE layer.
    pub expert_load: Vec<Vec<f64>>,
    /// Mean ratio of the top-1 to the top-2 gate probability per MoE layer (1 means the
    /// router cannot tell its two choices apart; empty for top-1 routing).
    #[serde(default)]
    pub gate_ratio: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Training throughput of this step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
    /// Bytes this replica handed to the data-parallel all-reduces this step (gradients and
    /// metrics; 0 in a single process).
    #[serde(default)]
    pub sync_bytes: u64,
}

/// A validation result (`kind = "val"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    /// The step after which it was measured.
    pub step: u64,
    /// Mean next-token cross-entropy on held-out sequences (dropless routing).
    pub val_loss: f64,
    /// exp(val_loss).
    pub val_ppl: f64,
}

/// Receives progress; the CLI draws a progress bar from it.
pub trait Observer {
    /// Training starts at `start_step` of `total_steps`.
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    /// A step finished.
    fn on_step(&mut self, _m: &StepMetrics) {}
    /// A validation finished.
    fn on_val(&mut self, _v: &ValMetrics) {}
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _dir: &Path) {}
    /// A message worth showing.
    fn on_message(&mut self, _msg: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Last training loss.
    pub final_loss: f64,
    /// Last validation result.
    pub final_val: Option<ValMetrics>,
    /// The final checkpoint.
    pub checkpoint: PathBuf,
    /// Mean tokens/s over this invocation.
    pub tokens_per_s: f64,
}

/// A prepared training run.
pub struct Trainer {
    /// The configuration.
    pub cfg: RunConfig,
    /// The model's configuration.
    pub model_config: ModelConfig,
    /// The trainable variables.
    pub params: TrainableParams,
    model: CausalLm,
    optimizer: AdamW,
    /// Step, data position and α.
    pub state: TrainerState,
    /// Training data; `None` for a trainer driven with explicit batches.
    data: Option<PackedDataset>,
    tokenizer_path: Option<PathBuf>,
    /// The other data-parallel replicas, when there are any.
    replicas: Option<Box<dyn ReplicaSync>>,
    /// The tensor-parallel group the model is cut over, when there is one.
    shards: Option<crate::sharded::ModelShards>,
    /// Whether this process writes metrics and checkpoints (one process of a run does).
    writer: bool,
    /// Under ZeRO-1: the parameters whose optimiser state this data-parallel replica owns.
    zero_owned: Option<std::collections::BTreeSet<String>>,
    run_dir: PathBuf,
    device: Device,
}

fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|e| TrainError::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| TrainError::io(&probe, e))
}

/// Synchronisation with the other data-parallel replicas of a run (implemented over MPI by
/// skymoe-dist). Every replica calls the same methods in the same order.
pub trait ReplicaSync {
    /// This replica's index.
    fn rank(&self) -> usize;
    /// Replicas in the run.
    fn replicas(&self) -> usize;
    /// Element-wise sum over the replicas, in place.
    fn sum_f32(&self, data: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the replicas, in place.
    fn sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Whether every replica passes `true`.
    fn all_ok(&self, ok: bool) -> Result<bool>;
}

/// Elements per gradient all-reduce: gradients are flattened into buckets of this size.
pub const GRAD_BUCKET_ELEMS: usize = 1 << 22;

impl Trainer {
    /// Set up a run: tokenizer, token file, dataset, model (fresh, from `model.init`, or resumed
    /// from the newest checkpoint of the run directory).
    pub fn prepare(cfg: RunConfig, obs: &mut dyn Observer) -> Result<Self> {
        Self::prepare_inner(cfg, obs, true)
    }

    /// Set up this process's part of a run over many processes. Process 0 of `world`
    /// prepares the run directory (tokenizer, token file) as [`Trainer::prepare`] does and
    /// alone writes metrics and checkpoints; the others then read it. With `data`, replica `r`
    /// of the data-parallel group trains on its share of each global batch (`replicas ×
    /// grad_accum` micro-batches of `batch_size`), gradients and metrics are summed over the
    /// replicas and every replica applies the same update: the result equals one process
    /// with `grad_accum × replicas`. With `shards`, the model and its optimiser state are cut
    /// over a tensor-parallel group, and checkpoints hold the whole tensors.
    pub fn prepare_parallel(
        cfg: RunConfig,
        obs: &mut dyn Observer,
        world: Box<dyn ReplicaSync>,
        data: Option<Box<dyn ReplicaSync>>,
        shards: Option<crate::sharded::ModelSplit>,
    ) -> Result<Self> {
        let writer = world.rank() == 0;
        let first = if writer {
            Some(Self::prepare_inner(cfg.clone(), obs, true))
        } else {
            None
        };
        let ok = first.as_ref().is_none_or(|r| r.is_ok());
        if !world.all_ok(ok)? {
            return match first {
                Some(Err(e)) => Err(e),
                _ => Err(TrainError::Config(
                    "process 0 could not prepare the run (see its error)".into(),
                )),
            };
        }
        let trainer = match first {
            Some(t) => t,
            None => Self::prepare_inner(cfg, &mut Silent, false),
        };
        if !world.all_ok(trainer.is_ok())? {
            return match trainer {
                Err(e) => Err(e),
                Ok(_) => Err(TrainError::Config(
                    "another process could not prepare the run (see its error)".into(),
                )),
            };
        }
        let mut trainer = trainer?;
        trainer.writer = writer;
        trainer.replicas = data;
        if let Some(group) = shards {
            let shards = crate::sharded::ModelShards::new(group, &trainer.model_config);
            if !world.all_ok(shards.is_ok())? {
                return Err(shards.err().unwrap_or_else(|| {
                    TrainError::Config("another process could not cut the model".into())
                }));
            }
            trainer.shard(shards?)?;
        }
        Ok(trainer)
    }

    /// Cut the model and its optimiser state down to this rank's parts.
    fn shard(&mut self, shards: crate::sharded::ModelShards) -> Result<()> {
        let full = std::mem::replace(
            &mut self.params,
            TrainableParams {
                vars: BTreeMap::new(),
            },
        );
        let shapes: BTreeMap<String, Vec<usize>> = full
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        self.params = shards.shard_params(full)?;
        let mut optimizer = AdamW::new(self.cfg.adamw(), &self.params.vars);
        optimizer.step = self.optimizer.step;
        for (name, m) in &optimizer.moments {
            let (Some(old), Some(shape)) = (self.optimizer.moments.get(name), shapes.get(name))
            else {
                continue;
            };
            let old = old
                .lock()
                .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
            let mut m = m
                .lock()
                .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
            if let (Some(a), Some(b)) = (
                shards.local_part(name, shape, &old.m),
                shards.local_part(name, shape, &old.v),
            ) {
                m.m = a;
                m.v = b;
            }
        }
        self.optimizer = optimizer;
        self.model = CausalLm::from_loader_split(
            self.model_config.clone(),
            &self.params,
            &self.device,
            shards.tensor.as_ref(),
            shards.experts.as_ref().map(|x| &x.ep),
            shards.pipeline.as_ref().map(|p| p.stage.clone()),
        )?;
        self.shards = Some(shards);
        Ok(())
    }

    /// Recompute the activations of the first `per_stage[s]` decoder layers of this
    /// process's pipeline stage `s` (the whole model is stage 0) in backward instead of
    /// keeping them.
    pub fn enable_recompute(&mut self, per_stage: &[usize]) -> Result<()> {
        let (stage, range) = match &self.model.pipeline {
            Some(p) => (p.stage, p.layers.clone()),
            None => (0, 0..self.model_config.num_hidden_layers),
        };
        let count = per_stage.get(stage).copied().unwrap_or(0);
        if count > range.len() {
            return Err(TrainError::Config(format!(
                "{count} recomputed layers for a stage of {} layers",
                range.len()
            )));
        }
        if count == 0 {
            self.model.recompute = None;
            return Ok(());
        }
        // A recomputed layer runs its own backward pass, which takes every gradient from the
        // graph.
        self.model.set_deferred_expert_grads(false);
        let layers: std::collections::HashSet<usize> = (range.start..range.start + count).collect();
        let mut params = std::collections::HashMap::new();
        for &i in &layers {
            let prefix = skymoe_model::names::layer(i, "");
            let held: Vec<(String, Tensor)> = self
                .params
                .vars
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            params.insert(i, held);
        }
        self.model.recompute = Some(std::sync::Arc::new(skymoe_model::recompute::Recompute {
            layers,
            params,
            ..Default::default()
        }));
        Ok(())
    }

    /// ZeRO-1: shard the AdamW state over the data-parallel replicas. Whole tensors are dealt
    /// to replicas in name order, each to the one with the fewest elements so far; a replica
    /// keeps moments only for its own, updates only those, and sends them to the others after
    /// each step. The updates are those of replicated AdamW.
    pub fn enable_zero(&mut self) -> Result<()> {
        let Some(sync) = self.replicas.as_ref() else {
            return Err(TrainError::Config(
                "ZeRO-1 shards optimiser state over data-parallel replicas; this run has none"
                    .into(),
            ));
        };
        let (rank, replicas) = (sync.rank(), sync.replicas());
        let mut loads = vec![0usize; replicas];
        let mut owned = std::collections::BTreeSet::new();
        let spread = self.spread_experts();
        for (name, var) in &self.params.vars {
            if spread.contains(name) {
                // An expert spread over the replicas has its state on its own rank already.
                owned.insert(name.clone());
                continue;
            }
            let r = (0..replicas).min_by_key(|&r| (loads[r], r)).unwrap_or(0);
            loads[r] += var.elem_count();
            if r == rank {
                owned.insert(name.clone());
            }
        }
        self.optimizer
            .moments
            .retain(|name, _| owned.contains(name));
        self.zero_owned = Some(owned);
        Ok(())
    }

    /// Names of the experts spread over the data-parallel replicas (each on its own rank).
    fn spread_experts(&self) -> std::collections::HashSet<String> {
        self.shards
            .as_ref()
            .map(|s| s.expert_names.clone())
            .unwrap_or_default()
    }

    /// Under ZeRO-1, the optimiser with every replica's moments (all replicas call this).
    fn optimizer_over_replicas(&self) -> Result<Option<AdamW>> {
        let (Some(owned), Some(sync)) = (&self.zero_owned, &self.replicas) else {
            return Ok(None);
        };
        let mut whole = AdamW::new(self.cfg.adamw(), &self.params.vars);
        whole.step = self.optimizer.step;
        let spread = self.spread_experts();
        for (name, var) in &self.params.vars {
            let n = var.elem_count();
            let mut buf = vec![0f32; 2 * n];
            if spread.contains(name) {
                // Local to this rank: no exchange.
                if let (Some(m), Some(slot)) =
                    (self.optimizer.moments.get(name), whole.moments.get(name))
                {
                    let m = m
                        .lock()
                        .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                    let mut slot = slot
                        .lock()
                        .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                    slot.m = m.m.clone();
                    slot.v = m.v.clone();
                }
                continue;
            }
            if owned.contains(name) {
                if let Some(m) = self.optimizer.moments.get(name) {
                    let m = m
                        .lock()
                        .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                    buf[..n].copy_from_slice(&m.m);
                    buf[n..].copy_from_slice(&m.v);
                }
            }
            sync.sum_f32(&mut buf)?;
            if let Some(slot) = whole.moments.get(name) {
                let mut slot = slot
                    .lock()
                    .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                slot.m = buf[..n].to_vec();
                slot.v = buf[n..].to_vec();
            }
        }
        Ok(Some(whole))
    }

    /// The whole parameters and optimiser state of a model cut over a tensor-parallel group
    /// (every rank of the group calls this; the result is the same on each).
    fn gather_whole(&self, local_optimizer: &AdamW) -> Result<(TrainableParams, AdamW)> {
        let shards = self
            .shards
            .as_ref()
            .ok_or_else(|| TrainError::Config("the model is not sharded".into()))?;
        let mut vars = BTreeMap::new();
        let mut moments = BTreeMap::new();
        for spec in self.model_config.param_specs() {
            let local = self.params.vars.get(&spec.name);
            let data = match local {
                Some(v) => Some(v.as_tensor().flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            let whole = shards.gather(&spec.name, &spec.shape, data.as_deref())?;
            vars.insert(
                spec.name.clone(),
                Var::from_tensor(&Tensor::from_vec(whole, spec.shape.clone(), &self.device)?)?,
            );
            let (m, v) = match local_optimizer.moments.get(&spec.name) {
                Some(m) => {
                    let m = m
                        .lock()
                        .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                    (Some(m.m.clone()), Some(m.v.clone()))
                }
                None => (None, None),
            };
            let m = shards.gather(&spec.name, &spec.shape, m.as_deref())?;
            let v = shards.gather(&spec.name, &spec.shape, v.as_deref())?;
            moments.insert(spec.name.clone(), (m, v));
        }
        // The routers' selection biases (state, not parameters) as every rank holds them.
        if self.cfg.aux.bias_update_rate > 0.0 || self.model_config.requires_selection_bias() {
            let e = self.model_config.moe.as_ref().map_or(0, |m| m.num_experts);
            for name in crate::params::selection_bias_names(&self.model_config) {
                let local = match self.params.vars.get(&name) {
                    Some(v) => Some(v.as_tensor().to_vec1::<f32>()?),
                    None => None,
                };
                let whole = shards.gather(&name, &[e], local.as_deref())?;
                vars.insert(
                    name,
                    Var::from_tensor(&Tensor::from_vec(whole, e, &self.device)?)?,
                );
            }
        }
        let params = TrainableParams { vars };
        let mut optimizer = AdamW::new(self.cfg.adamw(), &params.vars);
        optimizer.step = self.optimizer.step;
        for (name, slot) in &optimizer.moments {
            if let Some((m, v)) = moments.remove(name) {
                let mut slot = slot
                    .lock()
                    .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
                slot.m = m;
                slot.v = v;
            }
        }
        Ok((params, optimizer))
    }

    /// Decoder layers of every pipeline stage, when the model is split into stages.
    pub fn pipeline_split(&self) -> Option<&[usize]> {
        self.shards
            .as_ref()
            .and_then(|s| s.pipeline.as_ref())
            .map(|p| p.split.as_slice())
    }

    /// This process's replica index (0 without data parallelism).
    pub fn replica_rank(&self) -> usize {
        self.replicas.as_ref().map_or(0, |s| s.rank())
    }

    fn prepare_inner(cfg: RunConfig, obs: &mut dyn Observer, writer: bool) -> Result<Self> {
        cfg.validate()?;
        let device = Device::Cpu;
        let run_dir = cfg.train.out_dir.clone();
        if writer {
            check_writable(&run_dir)?;
        }
        let ckpt_root = run_dir.join("checkpoints");
        let resume_from = if cfg.train.resume {
            list_checkpoints(&ckpt_root)?.pop()
        } else {
            None
        };

        // Tokenizer: given, that of the `model.init` directory, already trained for this run,
        // or trained now.
        let init_tokenizer = cfg
            .model
            .init
            .as_ref()
            .and_then(|d| skymoe_model::hub::resolve_model_path(d).ok())
            .filter(|d| skymoe_model::tokenizer::has_tokenizer(d));
        let tokenizer_path = match (&cfg.data.tokenizer, init_tokenizer) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir,
            (None, None) => {
                let p = run_dir.join("tokenizer.json");
                if writer && !(resume_from.is_some() && p.exists()) {
                    obs.on_message(&format!(
                        "training a byte-level BPE tokenizer of {} tokens",
                        cfg.data.vocab_size
                    ));
                    crate::data::train_tokenizer(
                        &cfg.data.inputs,
                        cfg.data.vocab_size,
                        &["<|endoftext|>"],
                        &p,
                    )?;
                }
                p
            }
        };
        // tokenizer.json, tokenizer.model or a model directory holding either.
        let loaded = skymoe_model::Tokenizer::from_path(&tokenizer_path).map_err(|e| {
            TrainError::Config(format!(
                "cannot load tokenizer {}: {e}",
                tokenizer_path.display()
            ))
        })?;
        let tokenizer = loaded.inner();
        let eos = tokenizer
            .token_to_id("<|endoftext|>")
            .or_else(|| tokenizer.token_to_id("</s>"))
            .or_else(|| tokenizer.token_to_id("<|im_end|>"));

        // Tokens, written once.
        let token_path = run_dir.join("data").join("tokens.bin");
        if writer && !(resume_from.is_some() && token_path.exists()) {
            std::fs::create_dir_all(run_dir.join("data"))
                .map_err(|e| TrainError::io(run_dir.join("data"), e))?;
            obs.on_message("tokenizing the corpus");
            TokenFile::build(&cfg.data.inputs, tokenizer, eos, &token_path)?;
        }
        let tokens = TokenFile::open(&token_path)?;
        let data = PackedDataset::new(
            tokens,
            cfg.data.seq_len,
            cfg.data.val_fraction,
            cfg.train.seed,
        )?;

        // Model.
        let vocab = tokenizer.get_vocab_size(true);
        let (model_config, params) = match (&resume_from, &cfg.model.init) {
            (Some((_, dir)), _) | (None, Some(dir)) => {
                // `model.init` may name a hub id in the local Hugging Face cache.
                let dir = skymoe_model::hub::resolve_model_path(dir)
                    .map_err(|e| TrainError::Config(e.to_string()))?;
                let ck = Checkpoint::open(&dir, &device)?;
                (
                    ck.config.clone(),
                    TrainableParams::from_checkpoint(&ck, &device)?,
                )
            }
            (None, None) => {
                let mc = cfg.fresh_model_config(vocab, None, eos)?;
                let p = TrainableParams::random(&mc, cfg.model.init_std, cfg.train.seed, &device)?;
                (mc, p)
            }
        };
        if model_config.vocab_size < vocab {
            return Err(TrainError::Config(format!(
                "the tokenizer has {vocab} tokens but the model's vocabulary is {}",
                model_config.vocab_size
            )));
        }
        if cfg.data.seq_len > model_config.max_position_embeddings {
            return Err(TrainError::Config(format!(
                "data.seq_len ({}) exceeds the model's maximum sequence length ({})",
                cfg.data.seq_len, model_config.max_position_embeddings
            )));
        }
        let moe_layers = (0..model_config.num_hidden_layers)
            .filter(|&l| model_config.is_moe_layer(l))
            .count();
        let mut params = params;
        if cfg.aux.bias_update_rate > 0.0 || model_config.requires_selection_bias() {
            params.add_selection_biases(&model_config, &device)?;
        }
        let mut optimizer = AdamW::new(cfg.adamw(), &params.vars);
        let state = match &resume_from {
            Some((_, dir)) => {
                obs.on_message(&format!("resuming from {}", dir.display()));
                load_trainer_state(dir, &params, &mut optimizer)?
            }
            None => TrainerState {
                step: 0,
                consumed: 0,
                aux: cfg.aux_coefficients(moe_layers),
                seed: cfg.train.seed,
                tokens: 0,
            },
        };
        let mut model = params.model(&model_config, &device)?;
        // The trainer adds the experts' weight gradients from each layer's routing itself.
        model.set_deferred_expert_grads(true);
        if writer {
            let cfg_text = cfg.to_toml()?;
            std::fs::write(run_dir.join("run.toml"), cfg_text)
                .map_err(|e| TrainError::io(run_dir.join("run.toml"), e))?;
            truncate_metrics(&run_dir.join("metrics.jsonl"), state.step)?;
        }
        Ok(Trainer {
            cfg,
            model_config,
            params,
            model,
            optimizer,
            state,
            data: Some(data),
            tokenizer_path: Some(tokenizer_path),
            run_dir,
            device,
            replicas: None,
            shards: None,
            writer: true,
            zero_owned: None,
        })
    }

    /// A trainer over given parameters without a data pipeline or run directory, driven with
    /// [`Trainer::step_on_batches`] (tests, experiments, other schedulers).
    pub fn in_memory(
        cfg: RunConfig,
        model_config: ModelConfig,
        mut params: TrainableParams,
    ) -> Result<Self> {
        let device = Device::Cpu;
        if cfg.aux.bias_update_rate > 0.0 || model_config.requires_selection_bias() {
            params.add_selection_biases(&model_config, &device)?;
        }
        let moe_layers = (0..model_config.num_hidden_layers)
            .filter(|&l| model_config.is_moe_layer(l))
            .count();
        let optimizer = AdamW::new(cfg.adamw(), &params.vars);
        let state = TrainerState {
            step: 0,
            consumed: 0,
            aux: cfg.aux_coefficients(moe_layers),
            seed: cfg.train.seed,
            tokens: 0,
        };
        let mut model = params.model(&model_config, &device)?;
        // The trainer adds the experts' weight gradients from each layer's routing itself.
        model.set_deferred_expert_grads(true);
        Ok(Trainer {
            run_dir: cfg.train.out_dir.clone(),
            cfg,
            model_config,
            params,
            model,
            optimizer,
            state,
            data: None,
            tokenizer_path: None,
            device,
            replicas: None,
            shards: None,
            writer: true,
            zero_owned: None,
        })
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The model over the current weights.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// Train until `train.steps`, validating and checkpointing on schedule.
    pub fn run(&mut self, obs: &mut dyn Observer) -> Result<TrainSummary> {
        let total = self.cfg.train.steps;
        obs.on_start(self.state.step, total);
        let writer = self.writer;
        let metrics_path = if writer {
            self.run_dir.join("metrics.jsonl")
        } else {
            // Replicas other than 0 write nothing to the run directory.
            PathBuf::from("/dev/null")
        };
        let mut metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        let ckpt_root = self.run_dir.join("checkpoints");
        let mut last_checkpoint = list_checkpoints(&ckpt_root)?.pop().map(|c| c.1);
        let start = Instant::now();
        let start_tokens = self.state.tokens;
        let mut final_loss = f64::NAN;
        let mut final_val = None;
        while self.state.step < total {
            let m = self.train_step(start, &last_checkpoint)?;
            final_loss = m.loss;
            let mut line =
                serde_json::to_value(&m).map_err(|e| TrainError::Config(e.to_string()))?;
            line["kind"] = "train".into();
            append_record(&mut metrics, &line).map_err(|e| TrainError::io(&metrics_path, e))?;
            obs.on_step(&m);
            let step = self.state.step;
            let eval_now = (self.cfg.train.eval_every > 0
                && step.is_multiple_of(self.cfg.train.eval_every))
                || step == total;
            // A sharded model evaluates on every rank of its group (the forward pass is
            // collective); one process records the result.
            let evaluates = writer || self.shards.is_some();
            if evaluates && eval_now && self.data.as_ref().is_some_and(|d| d.num_val() > 0) {
                let v = self.evaluate()?;
                if writer {
                    let mut line =
                        serde_json::to_value(&v).map_err(|e| TrainError::Config(e.to_string()))?;
                    line["kind"] = "val".into();
                    append_record(&mut metrics, &line)
                        .map_err(|e| TrainError::io(&metrics_path, e))?;
                    obs.on_val(&v);
                    final_val = Some(v);
                }
            }
            metrics
                .flush()
                .map_err(|e| TrainError::io(&metrics_path, e))?;
            let ckpt_now = (self.cfg.train.checkpoint_every > 0
                && step.is_multiple_of(self.cfg.train.checkpoint_every))
                || step == total;
            if ckpt_now {
                // A sharded model gathers its whole tensors on every rank of its group.
                let over_replicas = self.optimizer_over_replicas()?;
                let local_optimizer = over_replicas.as_ref().unwrap_or(&self.optimizer);
                let whole = match &self.shards {
                    Some(_) => Some(self.gather_whole(local_optimizer)?),
                    None => None,
                };
                if writer {
                    metrics
                        .sync_data()
                        .map_err(|e| TrainError::io(&metrics_path, e))?;
                    let (params, optimizer) = match &whole {
                        Some((p, o)) => (p, o),
                        None => (&self.params, local_optimizer),
                    };
                    let dir = save_checkpoint(
                        &ckpt_root,
                        &self.model_config,
                        params,
                        optimizer,
                        &self.state,
                        self.tokenizer_path.as_deref(),
                        self.cfg.train.keep_checkpoints,
                    )?;
                    obs.on_checkpoint(&dir);
                    last_checkpoint = Some(dir);
                }
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        Ok(TrainSummary {
            steps: self.state.step,
            final_loss,
            final_val,
            checkpoint: last_checkpoint.unwrap_or_else(|| ckpt_root.clone()),
            tokens_per_s: (self.state.tokens - start_tokens) as f64 / secs,
        })
    }

    /// One optimiser step over the next `grad_accum` micro-batches of the training data.
    fn train_step(
        &mut self,
        start: Instant,
        last_checkpoint: &Option<PathBuf>,
    ) -> Result<StepMetrics> {
        let bs = self.cfg.train.batch_size;
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| TrainError::Config("this trainer has no training data".into()))?;
        let accum = self.cfg.train.grad_accum;
        let (rank, replicas) = self
            .replicas
            .as_ref()
            .map_or((0, 1), |s| (s.rank(), s.replicas()));
        // The global batch is `replicas × accum` micro-batches; replica r takes its run of them.
        let mut micro = Vec::with_capacity(accum);
        for i in 0..accum {
            let at = self.state.consumed + ((rank * accum + i) * bs) as u64;
            micro.push(data.train_batch(at, bs));
        }
        self.state.consumed += (replicas * accum * bs) as u64;
        self.step_on_batches(&micro, start, last_checkpoint)
    }

    /// After an optimiser step: move each MoE layer's selection bias towards balance from
    /// the tokens routed to each expert in the step (`routed`, one list per MoE layer).
    fn update_selection_biases(&mut self, routed: &[Vec<usize>]) -> Result<()> {
        let rate = self.cfg.aux.bias_update_rate;
        let mut l = 0;
        for layer in 0..self.model_config.num_hidden_layers {
            if !self.model_config.is_moe_layer(layer) {
                continue;
            }
            let gate = self.model_config.moe_names(layer).gate;
            let name = skymoe_model::layers::router::selection_bias_name(&gate);
            let (Some(var), Some(load)) = (self.params.vars.get(&name), routed.get(l)) else {
                // A pipeline stage holds (and routes) its own layers only.
                if self.model.pipeline.is_some() {
                    l += 1;
                    continue;
                }
                return Err(TrainError::Config(format!("no selection bias {name}")));
            };
            let mut bias = var.as_tensor().to_vec1::<f32>()?;
            update_selection_bias(&mut bias, load, rate);
            let n = bias.len();
            var.set(&Tensor::from_vec(bias, n, &self.device)?)?;
            l += 1;
        }
        Ok(())
    }

    /// How many micro-batches of a step of `accum` run at once: `train.concurrent_micro_batches`
    /// (0: as many as the thread pool has threads), at most `accum`, and 1 when something
    /// orders the passes (a pipeline stage, a model cut over processes, recomputation).
    fn concurrent_micro_batches(&self, accum: usize) -> usize {
        // The global-batch balance loss of a micro-batch reads the load counts of the ones
        // before it.
        if self.model.pipeline.is_some()
            || self.shards.is_some()
            || self.model.recompute.is_some()
            || self.cfg.aux.balance == BalanceLoss::Global
        {
            return 1;
        }
        let wanted = match self.cfg.train.concurrent_micro_batches {
            0 => rayon::current_num_threads(),
            n => n,
        };
        wanted.clamp(1, accum.max(1))
    }

    /// One optimiser step over the given micro-batches (each a list of equal-length sequences
    /// of `seq_len + 1` tokens: inputs followed by the shifted targets).
    pub fn step_on_batches(
        &mut self,
        micro: &[Vec<Vec<u32>>],
        start: Instant,
        last_checkpoint: &Option<PathBuf>,
    ) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let accum = micro.len().max(1);
        let capacity = cfg.capacity_factor();
        let alpha = self.state.aux.alpha.clone();
        let n_moe = alpha.len();
        let mut grad_sum = GradSum::default();
        let experts = self.model_config.moe.as_ref().map_or(0, |m| m.num_experts);
        let mut sums = StepSums::new(n_moe, experts);
        // The index among the MoE layers of each layer (a pipeline stage routes only its own).
        let mut moe_index = Vec::with_capacity(self.model_config.num_hidden_layers);
        let mut next = 0;
        for layer in 0..self.model_config.num_hidden_layers {
            moe_index.push(self.model_config.is_moe_layer(layer).then_some(next));
            next += usize::from(self.model_config.is_moe_layer(layer));
        }
        let split = self.replicas.is_some() || self.shards.is_some();
        let global = (cfg.aux.balance == BalanceLoss::Global)
            .then(|| std::sync::Arc::new(std::sync::Mutex::new(GlobalCounts::new(n_moe, experts))));
        let mut tokens = 0u64;
        let mut nonfinite = 0.0f64;
        // The order of the forward and backward passes: each micro-batch's backward right
        // after its forward or, on a pipeline stage, 1F1B (warm-up forwards, then one forward
        // and one backward in turn, then the remaining backwards). Backwards run in
        // micro-batch order either way, so the gradients add up in the same order.
        if let Some(plan) = &self.model.recompute {
            // A recomputed layer's backward adds its auxiliary losses itself (its routing
            // here carries no graph).
            let alpha = alpha.clone();
            let moe_index = moe_index.clone();
            let balance = cfg.aux.balance;
            let z_coef = cfg.aux.z_loss_coef;
            let scale = 1.0 / accum as f64;
            // Sequences per micro-batch (the sequence-wise loss averages over them).
            let sequences = micro.first().map_or(1, Vec::len);
            let global = global.clone();
            let objective: std::sync::Arc<skymoe_model::recompute::AuxObjective> =
                std::sync::Arc::new(move |layer, r| {
                    let Some(l) = moe_index.get(layer).copied().flatten() else {
                        return Ok(None);
                    };
                    let a = alpha.get(l).copied().unwrap_or(0.0);
                    let mut total: Option<Tensor> = None;
                    let mut add = |t: Tensor| -> candle_core::Result<()> {
                        total = Some(match total.take() {
                            Some(prev) => (prev + t)?,
                            None => t,
                        });
                        Ok(())
                    };
                    let aux = match balance {
                        BalanceLoss::Skywork => Some(skywork_aux(&r.probs)?),
                        BalanceLoss::Switch => Some(switch_aux(&r.probs, &r.score_counts())?),
                        BalanceLoss::Sequence => Some(sequence_aux(
                            &r.probs,
                            &r.score_experts,
                            r.top_k,
                            sequences,
                        )?),
                        // The running mean the forward pass of this micro-batch saw.
                        BalanceLoss::Global => {
                            let mean = global
                                .as_ref()
                                .and_then(|g| g.lock().ok()?.recorded.get_mut(&layer)?.pop_front());
                            match mean {
                                Some(mean) => Some(global_aux(&r.probs, &mean, r.top_k)?),
                                None => candle_core::bail!(
                                    "no load counts recorded for recomputed layer {layer}"
                                ),
                            }
                        }
                        BalanceLoss::None => None,
                    };
                    if let Some(aux) = aux {
                        if a != 0.0 {
                            add((aux * a)?)?;
                        }
                    }
                    if z_coef > 0.0 {
                        add((z_loss(&r.logits)? * z_coef)?)?;
                    }
                    total.map(|t| t * scale).transpose()
                });
            if let Ok(mut slot) = plan.aux.lock() {
                *slot = Some(objective);
            }
        }
        let ctx = MicroContext {
            model: &self.model,
            model_config: &self.model_config,
            cfg,
            params: &self.params,
            device: &self.device,
            alpha: &alpha,
            moe_index: &moe_index,
            capacity,
            accum,
            global: global.as_deref(),
        };
        // Micro-batches run concurrently, each on a thread of its own, when nothing orders
        // them (no pipeline, no model cut over processes, no recomputation); their gradients
        // still add up in micro-batch order.
        let concurrent = self.concurrent_micro_batches(accum);
        let order = if concurrent > 1 {
            Vec::new()
        } else {
            pass_order(
                micro.len(),
                self.model.pipeline.as_ref().map(|p| (p.stage, p.stages)),
            )
        };
        if concurrent > 1 {
            let all: Vec<usize> = (0..micro.len()).collect();
            for group in all.chunks(concurrent) {
                let results: Vec<Result<(MicroForward, Option<Grads>)>> = group
                    .par_iter()
                    .map(|&i| {
                        let f = forward_micro(&ctx, &micro[i], None)?;
                        let grads = if f.total_val.is_finite() {
                            Some(backward_micro(&ctx, &f.total, &f.deferred)?)
                        } else {
                            None
                        };
                        Ok((f, grads))
                    })
                    .collect();
                for result in results {
                    let (f, grads) = result?;
                    tokens += f.tokens;
                    let finite = merge_forward(&f, &mut sums);
                    match grads {
                        Some(grads) if finite => grad_sum.add(grads)?,
                        _ if split => nonfinite = nonfinite.max(1.0),
                        _ => {
                            return Err(TrainError::NonFiniteLoss {
                                step: self.state.step + 1,
                                value: f.total_val,
                                last_checkpoint: last_checkpoint.clone(),
                            })
                        }
                    }
                }
            }
        }
        let mut pending: Vec<Option<(Tensor, Vec<DeferredExpertGrads>)>> =
            (0..micro.len()).map(|_| None).collect();
        for pass in order {
            match pass {
                Pass::Forward(i) => {
                    let f = forward_micro(&ctx, &micro[i], self.replicas.as_deref())?;
                    tokens += f.tokens;
                    let finite = merge_forward(&f, &mut sums);
                    if !finite && split {
                        // Tell the other processes after the step's synchronisation, so that all
                        // stop. A model split over processes still runs this backward (its
                        // collectives must match); replicas alone skip it.
                        nonfinite = nonfinite.max(1.0);
                        if self.shards.is_some() {
                            pending[i] = Some((f.total, f.deferred));
                        }
                        continue;
                    }
                    if !finite {
                        return Err(TrainError::NonFiniteLoss {
                            step: self.state.step + 1,
                            value: f.total_val,
                            last_checkpoint: last_checkpoint.clone(),
                        });
                    }
                    pending[i] = Some((f.total, f.deferred));
                }
                Pass::Backward(i) => {
                    let Some((total, deferred)) = pending[i].take() else {
                        continue;
                    };
                    grad_sum.add(backward_micro(&ctx, &total, &deferred)?)?;
                }
            }
        }
        let mut grads_acc = grad_sum.into_grads();
        let StepSums {
            mut loss_sum,
            mut ce_sum,
            mut aux_sum,
            mut z_sum,
            mut drop,
            mut gate_ratio,
            mut load,
            mut routed,
        } = sums;
        if let Some(shards) = &self.shards {
            shards.sum_tied_embedding(&mut grads_acc)?;
        }
        let mut sync_bytes = 0u64;
        if let Some(sync) = self.replicas.as_ref().filter(|s| s.replicas() > 1) {
            let replicas = sync.replicas() as f64;
            // Experts spread over the replicas are not all-reduced.
            let spread = self.shards.as_ref().map(|s| &s.expert_names);
            sync_bytes = 4 * self
                .params
                .vars
                .iter()
                .filter(|(n, _)| spread.is_none_or(|e| !e.contains(*n)))
                .map(|(_, v)| v.as_tensor().elem_count() as u64)
                .sum::<u64>();
            let experts = self
                .shards
                .as_ref()
                .map(|s| s.expert_names.clone())
                .unwrap_or_default();
            grads_acc = sum_gradients(sync.as_ref(), &self.params, grads_acc, &experts)?;
            if let Some(shards) = &self.shards {
                shards.sync_expert_grads(&mut grads_acc, sync.replicas(), &self.params)?;
            }
            // Metrics: sums over replicas, means divided by their count.
            let mut stats = vec![loss_sum, ce_sum, aux_sum, z_sum, tokens as f64, nonfinite];
            stats.extend(&drop);
            stats.extend(&gate_ratio);
            for l in &load {
                stats.extend(l);
            }
            // The selection bias moves with the tokens every replica routed.
            let bias_counts = cfg.aux.bias_update_rate > 0.0;
            if bias_counts {
                for r in &routed {
                    stats.extend(r.iter().map(|&c| c as f64));
                }
            }
            sync_bytes += 8 * stats.len() as u64;
            sync.sum_f64(&mut stats)?;
            let mean = |x: f64| x / replicas;
            (loss_sum, ce_sum, aux_sum, z_sum) = (
                mean(stats[0]),
                mean(stats[1]),
                mean(stats[2]),
                mean(stats[3]),
            );
            tokens = stats[4].round() as u64;
            nonfinite = stats[5];
            let mut at = 6;
            for d in drop.iter_mut() {
                *d = mean(stats[at]);
                at += 1;
            }
            for g in gate_ratio.iter_mut() {
                *g = mean(stats[at]);
                at += 1;
            }
            for l in load.iter_mut() {
                for x in l.iter_mut() {
                    *x = mean(stats[at]);
                    at += 1;
                }
            }
            if bias_counts {
                for r in routed.iter_mut() {
                    for c in r.iter_mut() {
                        *c = stats[at].round() as usize;
                        at += 1;
                    }
                }
            }
            if nonfinite > 0.0 {
                return Err(TrainError::NonFiniteLoss {
                    step: self.state.step + 1,
                    value: f32::NAN,
                    last_checkpoint: last_checkpoint.clone(),
                });
            }
        }
        if let Some(shards) = self.shards.as_ref().filter(|s| s.pipeline.is_some()) {
            // Each stage measured its own layers and the last one the cross-entropy.
            let mut stats = vec![loss_sum, ce_sum, aux_sum, z_sum, nonfinite];
            stats.extend(&drop);
            stats.extend(&gate_ratio);
            for l in &load {
                stats.extend(l);
            }
            shards.sum_over_stages(&mut stats)?;
            (loss_sum, ce_sum, aux_sum, z_sum, nonfinite) =
                (stats[0], stats[1], stats[2], stats[3], stats[4]);
            let mut at = 5;
            for d in drop.iter_mut().chain(gate_ratio.iter_mut()) {
                *d = stats[at];
                at += 1;
            }
            for l in load.iter_mut() {
                for x in l.iter_mut() {
                    *x = stats[at];
                    at += 1;
                }
            }
        }
        if nonfinite > 0.0 {
            return Err(TrainError::NonFiniteLoss {
                step: self.state.step + 1,
                value: f32::NAN,
                last_checkpoint: last_checkpoint.clone(),
            });
        }
        let grad_norm = match &self.shards {
            Some(shards) => shards.grad_norm(&grads_acc)?,
            None => global_norm(&grads_acc)?,
        };
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: self.state.step + 1,
                value: grad_norm as f32,
                last_checkpoint: last_checkpoint.clone(),
            });
        }
        // As torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)).
        let clip = cfg.optim.grad_clip;
        let scale = if clip > 0.0 {
            (clip / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = cfg.schedule().lr_at(self.state.step);
        match (&self.zero_owned, &self.replicas) {
            (Some(owned), Some(sync)) => {
                let mine: BTreeMap<String, Var> = self
                    .params
                    .vars
                    .iter()
                    .filter(|(n, _)| owned.contains(*n))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                self.optimizer.step(&mine, &grads_acc, lr, scale)?;
                share_from_owners(sync.as_ref(), &self.params, owned, &self.spread_experts())?;
            }
            _ => self
                .optimizer
                .step(&self.params.vars, &grads_acc, lr, scale)?,
        }
        self.state.aux.update(&drop);
        if cfg.aux.bias_update_rate > 0.0 {
            self.update_selection_biases(&routed)?;
        }
        self.state.step += 1;
        self.state.tokens += tokens;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        Ok(StepMetrics {
            step: self.state.step,
            tokens: self.state.tokens,
            loss: loss_sum / accum as f64,
            ce: ce_sum / accum as f64,
            aux_loss: aux_sum / accum as f64,
            z_loss: z_sum / accum as f64,
            alpha,
            drop_rate: drop,
            expert_load: load,
            gate_ratio: if gate_ratio.iter().all(|g| g.is_finite()) {
                gate_ratio
            } else {
                Vec::new()
            },
            grad_norm,
            lr,
            tokens_per_s: tokens as f64 / secs,
            elapsed_s: start.elapsed().as_secs_f64(),
            sync_bytes,
        })
    }

    /// Validation loss over the held-out sequences (dropless routing, as at inference).
    pub fn evaluate(&self) -> Result<ValMetrics> {
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| TrainError::Config("this trainer has no validation data".into()))?;
        let mut loss = [evaluate_model(
            &self.model,
            data,
            self.cfg.train.batch_size,
            self.cfg.train.eval_batches,
        )?];
        if let Some(shards) = &self.shards {
            // Only the last pipeline stage measures the loss (the others report 0).
            shards.sum_over_stages(&mut loss)?;
        }
        let loss = loss[0];
        Ok(ValMetrics {
            step: self.state.step,
            val_loss: loss,
            val_ppl: loss.exp(),
        })
    }
}

/// Mean next-token cross-entropy of `model` on the validation windows of `data`
/// (`max_batches = 0`: all of them).
pub fn evaluate_model(
    model: &CausalLm,
    data: &PackedDataset,
    batch_size: usize,
    max_batches: usize,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (i, batch) in data.val_batches(batch_size).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let (ce, rows) = window_loss(model, &batch)?;
        sum += ce * rows as f64;
        n += rows;
    }
    if n == 0 {
        return Err(TrainError::Config(
            "no validation sequences to evaluate".into(),
        ));
    }
    Ok(sum / n as f64)
}

/// Mean next-token cross-entropy (dropless) of equal-length windows of `seq_len + 1` tokens,
/// and the number of predicted positions.
fn window_loss<S: AsRef<[u32]>>(model: &CausalLm, batch: &[S]) -> Result<(f64, usize)> {
    let t = batch[0].as_ref().len() - 1;
    if model.pipeline.as_ref().is_some_and(|p| !p.is_last()) {
        // A stage before the last only passes activations on.
        let inputs: Vec<Vec<u32>> = batch.iter().map(|s| s.as_ref()[..t].to_vec()).collect();
        model.forward_batch(&inputs, None)?;
        return Ok((0.0, batch.len() * t));
    }
    let inputs: Vec<Vec<u32>> = batch.iter().map(|s| s.as_ref()[..t].to_vec()).collect();
    let targets: Vec<u32> = batch
        .iter()
        .flat_map(|s| s.as_ref()[1..].iter().copied())
        .collect();
    let out = model.forward_batch(&inputs, None)?;
    let rows = batch.len() * t;
    let targets = Tensor::from_vec(targets, rows, out.logits.device())?;
    let logits = out.logits.reshape((rows, model.config.vocab_size))?;
    let ce = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
    Ok((ce as f64, rows))
}

/// Drop metric lines newer than `step` (after a resume from the checkpoint of `step`).
/// Append one record and its newline with a single write, so that a process killed between
/// records never leaves half a line behind (`writeln!` on a file issues one write per piece).
fn append_record(out: &mut impl Write, record: &serde_json::Value) -> std::io::Result<()> {
    let mut text = record.to_string();
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| TrainError::io(path, e))
}

/// Mean next-token cross-entropy of `model` over every window of `data` (train and validation
/// alike), at most `max_windows` of them (0: all). Dropless routing.
pub fn evaluate_all_windows(
    model: &CausalLm,
    data: &PackedDataset,
    batch_size: usize,
    max_windows: usize,
) -> Result<(f64, usize)> {
    let n = if max_windows > 0 {
        data.num_windows().min(max_windows)
    } else {
        data.num_windows()
    };
    let (mut sum, mut rows_total) = (0.0f64, 0usize);
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(batch_size.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().filter_map(|&i| data.window(i)).collect();
        if batch.is_empty() {
            continue;
        }
        let (ce, rows) = window_loss(model, &batch)?;
        sum += ce * rows as f64;
        rows_total += rows;
    }
    if rows_total == 0 {
        return Err(TrainError::Config("no sequences to evaluate".into()));
    }
    Ok((sum / rows_total as f64, rows_total))
}

/// Sum every parameter's gradient over the replicas and divide by their count, in buckets of
/// [`GRAD_BUCKET_ELEMS`] elements, in parameter-name order (a parameter no token reached
/// contributes zeros).
fn sum_gradients(
    sync: &dyn ReplicaSync,
    params: &TrainableParams,
    mut local: BTreeMap<String, Tensor>,
    skip: &std::collections::HashSet<String>,
) -> Result<BTreeMap<String, Tensor>> {
    let scale = 1.0 / sync.replicas() as f32;
    let names: Vec<&String> = params.vars.keys().filter(|n| !skip.contains(*n)).collect();
    // Gradients left out (experts spread over the replicas) pass through unchanged.
    let mut out: BTreeMap<String, Tensor> = skip
        .iter()
        .filter_map(|n| local.remove(n).map(|g| (n.clone(), g)))
        .collect();
    let mut start = 0;
    while start < names.len() {
        // One bucket: whole tensors up to GRAD_BUCKET_ELEMS elements (at least one tensor).
        let mut end = start;
        let mut elems = 0;
        while end < names.len() {
            let n = params.vars[names[end]].as_tensor().elem_count();
            if end > start && elems + n > GRAD_BUCKET_ELEMS {
                break;
            }
            elems += n;
            end += 1;
        }
        // The bucket ends with one presence flag per tensor: a tensor no replica has a
        // gradient for stays without one (the optimiser then leaves it alone, as one process
        // accumulating the same micro-batches would).
        let count = end - start;
        let mut bucket = Vec::with_capacity(elems + count);
        let mut present = Vec::with_capacity(count);
        for name in &names[start..end] {
            match local.remove(*name) {
                Some(g) => {
                    bucket.extend(g.flatten_all()?.to_vec1::<f32>()?);
                    present.push(1.0);
                }
                None => {
                    bucket.extend(std::iter::repeat_n(
                        0f32,
                        params.vars[*name].as_tensor().elem_count(),
                    ));
                    present.push(0.0);
                }
            }
        }
        bucket.extend(present);
        sync.sum_f32(&mut bucket)?;
        let mut at = 0;
        for (i, name) in names[start..end].iter().enumerate() {
            let var = params.vars[*name].as_tensor();
            let n = var.elem_count();
            if bucket[elems + i] > 0.0 {
                let data: Vec<f32> = bucket[at..at + n].iter().map(|x| x * scale).collect();
                out.insert(
                    (*name).clone(),
                    Tensor::from_vec(data, var.shape(), var.device())?,
                );
            }
            at += n;
        }
        start = end;
    }
    Ok(out)
}

/// After a ZeRO-1 step: every replica receives the tensors other replicas updated (a sum in
/// which only the owner contributes), in buckets of [`GRAD_BUCKET_ELEMS`] elements.
fn share_from_owners(
    sync: &dyn ReplicaSync,
    params: &TrainableParams,
    owned: &std::collections::BTreeSet<String>,
    spread: &std::collections::HashSet<String>,
) -> Result<()> {
    let names: Vec<&String> = params
        .vars
        .keys()
        .filter(|n| !spread.contains(*n))
        .collect();
    let mut start = 0;
    while start < names.len() {
        let mut end = start;
        let mut elems = 0;
        while end < names.len() {
            let n = params.vars[names[end]].elem_count();
            if end > start && elems + n > GRAD_BUCKET_ELEMS {
                break;
            }
            elems += n;
            end += 1;
        }
        let mut bucket = Vec::with_capacity(elems);
        for name in &names[start..end] {
            let var = &params.vars[*name];
            if owned.contains(*name) {
                bucket.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            } else {
                bucket.extend(std::iter::repeat_n(0f32, var.elem_count()));
            }
        }
        sync.sum_f32(&mut bucket)?;
        let mut at = 0;
        for name in &names[start..end] {
            let var = &params.vars[*name];
            let n = var.elem_count();
            if !owned.contains(*name) {
                let t = Tensor::from_vec(bucket[at..at + n].to_vec(), var.shape(), var.device())?;
                var.set(&t)?;
            }
            at += n;
        }
        start = end;
    }
    Ok(())
}

/// Gradients by parameter name.
type Grads = BTreeMap<String, Tensor>;

/// What the forward pass of every micro-batch of a step reads.
struct MicroContext<'a> {
    model: &'a CausalLm,
    model_config: &'a ModelConfig,
    cfg: &'a RunConfig,
    params: &'a TrainableParams,
    device: &'a Device,
    /// α per MoE layer.
    alpha: &'a [f64],
    /// The index among the MoE layers of each layer.
    moe_index: &'a [Option<usize>],
    capacity: Option<f64>,
    /// Micro-batches in the step.
    accum: usize,
    /// The step's running load counts of the global-batch balance loss.
    global: Option<&'a std::sync::Mutex<GlobalCounts>>,
}

/// Tokens per expert of each MoE layer summed over the micro-batches of a step so far, and how
/// many micro-batches that was (Megatron-Core's `global_tokens_per_expert` and `ga_steps`).
struct GlobalCounts {
    sums: Vec<Vec<f64>>,
    seen: Vec<usize>,
    /// For recomputed layers (by model layer index): the running means their micro-batches'
    /// forward passes saw, in order, for the loss their backward passes add.
    recorded: HashMap<usize, std::collections::VecDeque<Vec<f64>>>,
}

impl GlobalCounts {
    fn new(moe_layers: usize, experts: usize) -> Self {
        GlobalCounts {
            sums: vec![vec![0.0; experts]; moe_layers],
            seen: vec![0; moe_layers],
            recorded: HashMap::new(),
        }
    }

    /// Add a micro-batch's counts of MoE layer `l`; returns the running mean.
    fn add(&mut self, l: usize, counts: &[f64]) -> Vec<f64> {
        let (Some(sum), Some(seen)) = (self.sums.get_mut(l), self.seen.get_mut(l)) else {
            return counts.to_vec();
        };
        for (s, &c) in sum.iter_mut().zip(counts) {
            *s += c;
        }
        *seen += 1;
        sum.iter().map(|s| s / *seen as f64).collect()
    }
}

/// The tokens per expert of each routed layer of a micro-batch (on the top-k of the unbiased
/// gate probabilities; `None` for a layer without routing), averaged over the data-parallel
/// replicas in one all-reduce: Megatron-Core sums them over its data-parallel group and
/// divides by that group's tokens, which is this mean over this replica's tokens.
fn replica_mean_counts(
    routings: &[Option<skymoe_model::layers::router::Routing>],
    replicas: Option<&dyn ReplicaSync>,
) -> Result<Vec<Option<Vec<f64>>>> {
    let mut per_layer: Vec<Option<Vec<f64>>> = routings
        .iter()
        .map(|r| {
            r.as_ref()
                .map(|r| r.score_counts().iter().map(|&c| c as f64).collect())
        })
        .collect();
    let Some(group) = replicas.filter(|g| g.replicas() > 1) else {
        return Ok(per_layer);
    };
    let mut flat: Vec<f64> = per_layer.iter().flatten().flatten().copied().collect();
    group.sum_f64(&mut flat)?;
    let n = group.replicas() as f64;
    let mut sums = flat.into_iter();
    for counts in per_layer.iter_mut().flatten() {
        for (c, s) in counts.iter_mut().zip(&mut sums) {
            *c = s / n;
        }
    }
    Ok(per_layer)
}

/// One micro-batch's forward pass: its objective and its share of the step's metrics.
struct MicroForward {
    tokens: u64,
    /// The objective to differentiate (not yet divided by the micro-batch count).
    total: Tensor,
    total_val: f32,
    ce: Option<f64>,
    aux: f64,
    z: f64,
    /// Per MoE layer, already divided by the micro-batch count.
    drop: Vec<(usize, f64)>,
    gate_ratio: Vec<(usize, f64)>,
    load: Vec<(usize, Vec<f64>)>,
    /// Tokens routed to each expert per MoE layer (before capacity dropping).
    routed: Vec<(usize, Vec<usize>)>,
    /// Expert weight gradients the backward pass leaves outside the graph.
    deferred: Vec<DeferredExpertGrads>,
}

/// The step's metrics summed over its micro-batches.
struct StepSums {
    loss_sum: f64,
    ce_sum: f64,
    aux_sum: f64,
    z_sum: f64,
    drop: Vec<f64>,
    gate_ratio: Vec<f64>,
    load: Vec<Vec<f64>>,
    /// Tokens routed to each expert per MoE layer, summed over the micro-batches.
    routed: Vec<Vec<usize>>,
}

impl StepSums {
    fn new(moe_layers: usize, experts: usize) -> Self {
        StepSums {
            loss_sum: 0.0,
            ce_sum: 0.0,
            aux_sum: 0.0,
            z_sum: 0.0,
            drop: vec![0.0; moe_layers],
            gate_ratio: vec![0.0; moe_layers],
            load: vec![vec![0.0; experts]; moe_layers],
            routed: vec![vec![0; experts]; moe_layers],
        }
    }
}

/// Add a micro-batch's routing metrics to `sums` and, when its objective is finite, its
/// losses; returns whether it was.
fn merge_forward(f: &MicroForward, sums: &mut StepSums) -> bool {
    for &(l, d) in &f.drop {
        if let Some(slot) = sums.drop.get_mut(l) {
            *slot += d;
        }
    }
    for &(l, g) in &f.gate_ratio {
        if let Some(slot) = sums.gate_ratio.get_mut(l) {
            *slot += g;
        }
    }
    for (l, el) in &f.load {
        if let Some(slot) = sums.load.get_mut(*l) {
            for (s, x) in slot.iter_mut().zip(el) {
                *s += x;
            }
        }
    }
    for (l, counts) in &f.routed {
        if let Some(slot) = sums.routed.get_mut(*l) {
            for (s, c) in slot.iter_mut().zip(counts) {
                *s += c;
            }
        }
    }
    if !f.total_val.is_finite() {
        return false;
    }
    sums.loss_sum += f.total_val as f64;
    if let Some(ce) = f.ce {
        sums.ce_sum += ce;
    }
    sums.aux_sum += f.aux;
    sums.z_sum += f.z;
    true
}

/// The forward pass of one micro-batch (sequences of `seq_len + 1` tokens): cross-entropy plus
/// each MoE layer's auxiliary terms, and the routing metrics.
/// `replicas`: the data-parallel group, whose load counts of this micro-batch the global-batch
/// balance loss sums (micro-batches then run one at a time, in the same order everywhere).
fn forward_micro(
    ctx: &MicroContext<'_>,
    batch: &[Vec<u32>],
    replicas: Option<&dyn ReplicaSync>,
) -> Result<MicroForward> {
    let cfg = ctx.cfg;
    let accum = ctx.accum as f64;
    let bs = batch.len();
    let t = batch.first().map_or(0, |s| s.len().saturating_sub(1));
    let inputs: Vec<Vec<u32>> = batch.iter().map(|s| s[..t].to_vec()).collect();
    let targets: Vec<u32> = batch.iter().flat_map(|s| s[1..].iter().copied()).collect();
    let out = ctx.model.forward_batch(&inputs, ctx.capacity)?;
    let v = ctx.model_config.vocab_size;
    let targets = Tensor::from_vec(targets, bs * t, ctx.device)?;
    // A pipeline stage before the last has no logits: its objective is the zero scalar that
    // pulls its output's gradient from the next stage.
    let (ce, mut total) = match &out.stage_output {
        Some(zero) => (None, zero.clone()),
        None => {
            let ce = cross_entropy(&out.logits.reshape((bs * t, v))?, &targets)?;
            (Some(ce.clone()), ce)
        }
    };
    let (mut aux_val, mut z_val) = (0.0, 0.0);
    let (mut drop, mut gate_ratio, mut load) = (Vec::new(), Vec::new(), Vec::new());
    let mut routed = Vec::new();
    let mut global_counts = match cfg.aux.balance {
        BalanceLoss::Global => replica_mean_counts(&out.routings, replicas)?,
        _ => Vec::new(),
    };
    for (layer, r) in out.routings.iter().enumerate() {
        let (Some(r), Some(l)) = (r, ctx.moe_index.get(layer).copied().flatten()) else {
            continue;
        };
        let a = ctx.alpha.get(l).copied().unwrap_or(0.0);
        let aux = match cfg.aux.balance {
            BalanceLoss::Skywork => Some(skywork_aux(&r.probs)?),
            BalanceLoss::Switch => Some(switch_aux(&r.probs, &r.score_counts())?),
            BalanceLoss::Sequence => Some(sequence_aux(&r.probs, &r.score_experts, r.top_k, bs)?),
            BalanceLoss::Global => {
                // The running mean of the tokens per expert over the step's micro-batches so
                // far (micro-batches of such a step run in order), each micro-batch's counts
                // averaged over the data-parallel replicas.
                let counts = global_counts
                    .get_mut(layer)
                    .and_then(Option::take)
                    .ok_or_else(|| TrainError::Config("missing load counts".into()))?;
                let mean = match ctx.global {
                    Some(g) => {
                        let mut g = g
                            .lock()
                            .map_err(|_| TrainError::Config("poisoned load counts".into()))?;
                        let mean = g.add(l, &counts);
                        // A recomputed layer adds its loss in backward: keep the mean for it.
                        let recomputed = ctx
                            .model
                            .recompute
                            .as_ref()
                            .is_some_and(|p| p.layers.contains(&layer));
                        if recomputed {
                            g.recorded.entry(layer).or_default().push_back(mean.clone());
                        }
                        mean
                    }
                    None => counts,
                };
                Some(global_aux(&r.probs, &mean, r.top_k)?)
            }
            BalanceLoss::None => None,
        };
        routed.push((l, r.expert_counts.clone()));
        if let Some(aux) = aux {
            if a != 0.0 {
                let term = (aux * a)?;
                aux_val += term.to_scalar::<f32>()? as f64;
                total = (total + term)?;
            }
        }
        if cfg.aux.z_loss_coef > 0.0 {
            let term = (z_loss(&r.logits)? * cfg.aux.z_loss_coef)?;
            z_val += term.to_scalar::<f32>()? as f64;
            total = (total + term)?;
        }
        drop.push((l, r.drop_rate() / accum));
        gate_ratio.push((l, r.gate_ratio() / accum));
        load.push((l, r.expert_load().iter().map(|x| x / accum).collect()));
    }
    let deferred = out
        .routings
        .iter()
        .flatten()
        .filter_map(|r| r.deferred_expert_grads.clone())
        .collect();
    let total_val = total.to_scalar::<f32>()?;
    let ce = match &ce {
        Some(ce) => Some(ce.to_scalar::<f32>()? as f64),
        None => None,
    };
    Ok(MicroForward {
        tokens: (bs * t) as u64,
        total,
        total_val,
        ce,
        aux: aux_val,
        z: z_val,
        drop,
        gate_ratio,
        load,
        routed,
        deferred,
    })
}

/// The backward pass of one micro-batch's objective: the gradient of every parameter, scaled
/// by one over the micro-batch count.
fn backward_micro(
    ctx: &MicroContext<'_>,
    total: &Tensor,
    deferred: &[DeferredExpertGrads],
) -> Result<Grads> {
    let mut store = (total / ctx.accum as f64)?.backward()?;
    for d in deferred {
        d.add_to(&mut store)?;
    }
    let mut grads = BTreeMap::new();
    for (name, var) in &ctx.params.vars {
        if let Some(g) = store.get(var.as_tensor()) {
            grads.insert(name.clone(), g.clone());
        }
    }
    if let Some(plan) = &ctx.model.recompute {
        // Parameters of recomputed layers got their gradients in the recomputation.
        for (name, g) in plan.take_grads() {
            let sum = match grads.remove(&name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(name, sum);
        }
    }
    Ok(grads)
}

/// One pass of a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward(usize),
    Backward(usize),
}

/// The passes of `micro` micro-batches: forward then backward for each in turn, or on stage
/// `s` of `p` the 1F1B schedule: `min(p − s − 1, micro)` warm-up forwards, then a forward and
/// the oldest pending backward in turn, then the remaining backwards.
fn pass_order(micro: usize, stage: Option<(usize, usize)>) -> Vec<Pass> {
    let warmup = stage.map_or(0, |(s, p)| (p - s - 1).min(micro));
    let mut order: Vec<Pass> = (0..warmup).map(Pass::Forward).collect();
    for i in 0..micro - warmup {
        order.push(Pass::Forward(warmup + i));
        order.push(Pass::Backward(i));
    }
    order.extend((micro - warmup..micro).map(Pass::Backward));
    order
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn one_f_one_b_orders_passes_per_stage() {
        use Pass::{Backward as B, Forward as F};
        assert_eq!(pass_order(2, None), vec![F(0), B(0), F(1), B(1)]);
        // Four micro-batches on the first of three stages: two warm-up forwards.
        assert_eq!(
            pass_order(4, Some((0, 3))),
            vec![F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3)]
        );
        // The last stage alternates from the start.
        assert_eq!(
            pass_order(3, Some((2, 3))),
            vec![F(0), B(0), F(1), B(1), F(2), B(2)]
        );
        // More stages than micro-batches: all forwards, then all backwards.
        assert_eq!(pass_order(2, Some((0, 4))), vec![F(0), F(1), B(0), B(1)]);
    }
}
