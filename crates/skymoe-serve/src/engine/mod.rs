//! The inference engine: a scheduler thread running continuous batches over a paged KV cache.
//!
//! Each step the scheduler (1) takes new requests into the waiting queue, (2) drops requests
//! whose caller went away, (3) admits waiting requests while the batch has room and the KV
//! cache has blocks for their prompts, (4) gives every running sequence the blocks its next
//! positions need, preempting the most recently admitted sequence when the cache is full (it
//! returns to the front of the queue and recomputes its cache when readmitted), (5) runs one
//! forward pass over all of them — prompt chunks of newly admitted requests (a step holds at
//! most `max_step_tokens` prompt tokens, so long prompts are split over steps) beside one
//! token of every decoding sequence — and (6) samples, streams text and finishes requests.

mod api;
mod detokenize;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::sampling::Sampler;
use skymoe_model::{Checkpoint, Tokenizer};
use tokio::sync::mpsc;

pub use api::{
    EngineStats, FinishReason, GenerationEvent, GenerationRequest, RequestStream, SubmitError,
    Usage,
};
use detokenize::Detokenizer;

use crate::chat_template::ChatTemplate;
use crate::error::{Result, ServeError};
use crate::kv_cache::{KvCache, KvDtype};
use crate::model::{LogitsFor, SeqChunk, ServeModel};
use crate::stop::StopMatcher;

/// How often an idle leader of a tensor-parallel group shows its followers it is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// Most requests running or waiting; more are refused with [`SubmitError::Saturated`].
    pub max_queue: usize,
    /// KV-cache blocks (`None`: enough for `kv_memory_bytes`).
    pub kv_blocks: Option<usize>,
    /// Memory for the KV cache when `kv_blocks` is not given.
    pub kv_memory_bytes: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Element type of the KV cache (`None`: [`KvDtype::auto`] for the model's weights).
    pub kv_dtype: Option<KvDtype>,
    /// Most prompt tokens processed in one step.
    pub max_step_tokens: usize,
    /// The model name reported to clients.
    pub model_id: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            max_queue: 256,
            kv_blocks: None,
            kv_memory_bytes: 1 << 30,
            block_size: 16,
            kv_dtype: None,
            max_step_tokens: 512,
            model_id: "skymoe".into(),
        }
    }
}

impl EngineConfig {
    /// KV-cache blocks for `model`: `kv_blocks`, or as many as `kv_memory_bytes` holds for the
    /// whole model (the same count on every rank of a tensor-parallel group).
    pub fn kv_blocks_for(&self, model: &ServeModel) -> usize {
        self.kv_blocks.unwrap_or_else(|| {
            let c = &model.config;
            let kv_dim = c.num_key_value_heads * c.head_dim;
            let dtype = model.kv_dtype(self.kv_dtype);
            let per_pos = KvCache::bytes_per_position(model.num_layers(), kv_dim, dtype).max(1);
            (self.kv_memory_bytes / per_pos / self.block_size.max(1)).max(1)
        })
    }
}

/// Why an engine could not start.
pub type EngineError = ServeError;

struct Pending {
    req: GenerationRequest,
    tx: mpsc::UnboundedSender<GenerationEvent>,
    cancelled: Arc<AtomicBool>,
}

struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    wake: Condvar,
    accepting: AtomicBool,
    in_flight: AtomicUsize,
    stats: Mutex<EngineStats>,
}

/// A handle on a running engine; clones share it. The scheduler thread stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    config: Arc<EngineConfig>,
    context: usize,
    vocab: usize,
    kv_positions: usize,
    _alive: Arc<AliveGuard>,
}

/// Tells the scheduler to stop when the last handle goes.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.accepting.store(false, Ordering::SeqCst);
        if let Ok(mut q) = self.0.queue.lock() {
            q.clear();
        }
        self.0.wake.notify_all();
    }
}

impl EngineHandle {
    /// Open a model directory or `.gguf` file, load it in `format` (`None`: as stored) and
    /// start the scheduler.
    pub fn load(model: &Path, format: Option<WeightFormat>, config: EngineConfig) -> Result<Self> {
        Self::load_sharded(model, format, config, None)
    }

    /// [`EngineHandle::load`] on the leading rank of a tensor-parallel group (the other
    /// ranks run [`ServeModel::follow`] on their shares).
    pub fn load_sharded(
        model: &Path,
        format: Option<WeightFormat>,
        config: EngineConfig,
        tp: Option<crate::model::TensorParallel>,
    ) -> Result<Self> {
        let ckpt = Checkpoint::open(model, &candle_core::Device::Cpu)?;
        let tokenizer = Tokenizer::for_model(&ckpt.path, ckpt.gguf_metadata.as_ref())?;
        let template_err = |e| ServeError::InvalidInput(format!("chat template: {e}"));
        let template = match &ckpt.gguf_metadata {
            // A GGUF file carries its template and special tokens in its metadata.
            Some(meta) => match meta.string("tokenizer.chat_template") {
                Some(source) => {
                    let token = |key: &str| {
                        let id = meta.uint(key)? as usize;
                        meta.strings("tokenizer.ggml.tokens")?
                            .get(id)
                            .map(|t| t.to_string())
                    };
                    Some(
                        ChatTemplate::new(
                            source,
                            token("tokenizer.ggml.bos_token_id"),
                            token("tokenizer.ggml.eos_token_id"),
                        )
                        .map_err(template_err)?,
                    )
                }
                None => None,
            },
            None => ChatTemplate::from_model_dir(&ckpt.path).map_err(template_err)?,
        }
        .unwrap_or_else(ChatTemplate::chatml);
        let served = ServeModel::load_sharded(&ckpt, format, tp)?;
        tracing::info!(
            "loaded {} ({:?}, {} weights, {:.1} MiB)",
            model.display(),
            served.config.architecture,
            served.format,
            served.weight_bytes() as f64 / (1 << 20) as f64
        );
        Ok(Self::start(served, tokenizer, template, config))
    }

    /// Start the scheduler over a loaded model.
    pub fn start(
        model: ServeModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        config: EngineConfig,
    ) -> Self {
        let block_size = config.block_size.max(1);
        let blocks = config.kv_blocks_for(&model);
        let kv = model.new_kv_cache(block_size, blocks, config.kv_dtype);
        tracing::info!(
            "KV cache: {blocks} blocks of {block_size} positions, {}",
            kv.dtype()
        );
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            stats: Mutex::new(EngineStats {
                kv_blocks_total: blocks,
                ..EngineStats::default()
            }),
        });
        let tokenizer = Arc::new(tokenizer);
        let mut eos = tokenizer.eos_ids.clone();
        eos.extend(model.config.eos_token_ids.iter().copied());
        let handle = EngineHandle {
            shared: shared.clone(),
            tokenizer: tokenizer.clone(),
            template: Arc::new(template),
            context: model.context_length(),
            vocab: model.config.vocab_size,
            kv_positions: blocks * block_size,
            config: Arc::new(config.clone()),
            _alive: Arc::new(AliveGuard(shared.clone())),
        };
        let scheduler = Scheduler {
            model,
            kv,
            shared,
            tokenizer,
            eos,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rate: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("skymoe-scheduler".into())
            .spawn(move || scheduler.run())
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the scheduler thread: {e}"));
        handle
    }

    /// Queue a request; its events arrive on the returned stream.
    pub fn submit(
        &self,
        req: GenerationRequest,
    ) -> std::result::Result<RequestStream, SubmitError> {
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.vocab
            )));
        }
        req.sampling.validate().map_err(SubmitError::Invalid)?;
        let limit = self.context.min(self.kv_positions);
        if req.prompt.len() + req.max_tokens.max(1) > limit {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                context: limit,
            });
        }
        let limit = self.config.max_queue;
        let taken = self
            .shared
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(SubmitError::Saturated { limit });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        if let Ok(mut st) = self.shared.stats.lock() {
            st.requests_total += 1;
        }
        match self.shared.queue.lock() {
            Ok(mut q) => q.push_back(Pending {
                req,
                tx,
                cancelled: cancelled.clone(),
            }),
            Err(_) => {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                return Err(SubmitError::ShuttingDown);
            }
        }
        self.shared.wake.notify_all();
        Ok(RequestStream { rx, cancelled })
    }

    /// The engine's counters now.
    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The model name reported to clients.
    pub fn model_id(&self) -> &str {
        &self.config.model_id
    }

    /// The model's context length.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template (ChatML when the model has none).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Stop accepting requests; running and queued ones continue.
    pub fn begin_shutdown(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Requests running or waiting.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is running or waiting.
    pub async fn drained(&self) {
        while self.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A request admitted to the scheduler.
struct Seq {
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys and values are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    pending_ids: Vec<u32>,
    tx: mpsc::UnboundedSender<GenerationEvent>,
    cancelled: Arc<AtomicBool>,
    max_tokens: usize,
    ignore_eos: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
        }
    }
}

struct Scheduler {
    model: ServeModel,
    kv: KvCache,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// (time, tokens generated) of recent steps, for the tokens/s gauge.
    rate: VecDeque<(Instant, usize)>,
}

enum Outcome {
    Continue,
    Done(FinishReason),
}

impl Scheduler {
    fn run(mut self) {
        self.run_steps();
        // Under tensor parallelism the other ranks wait for the next step: release them.
        if let Err(e) = self.model.release_followers() {
            tracing::error!("cannot release the tensor-parallel ranks: {e}");
        }
    }

    fn run_steps(&mut self) {
        loop {
            if !self.take_new() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                self.publish(0);
                continue;
            }
            match self.step() {
                Ok(generated) => self.publish(generated),
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    let running = std::mem::take(&mut self.running);
                    for s in running {
                        let _ = s.tx.send(GenerationEvent::Failed {
                            message: e.to_string(),
                        });
                        self.retire(s, None);
                    }
                }
            }
        }
    }

    /// Move submitted requests into the waiting queue; blocks while there is nothing to do.
    /// Returns false when the engine is gone.
    fn take_new(&mut self) -> bool {
        let Ok(mut q) = self.shared.queue.lock() else {
            return false;
        };
        let mut pinged = Instant::now();
        while q.is_empty() && self.running.is_empty() && self.waiting.is_empty() {
            if Arc::strong_count(&self.shared) == 1 {
                return false;
            }
            if pinged.elapsed() > KEEP_ALIVE {
                if let Err(e) = self.model.keep_followers_alive() {
                    tracing::error!("tensor-parallel ranks unreachable: {e}");
                }
                pinged = Instant::now();
            }
            q = match self.shared.wake.wait_timeout(q, Duration::from_millis(200)) {
                Ok((q, _)) => q,
                Err(_) => return false,
            };
        }
        for p in q.drain(..) {
            let seed = p.req.seed.unwrap_or_else(|| rand::rng().random());
            self.waiting.push_back(Seq {
                prompt_len: p.req.prompt.len(),
                tokens: p.req.prompt,
                cached: 0,
                blocks: Vec::new(),
                sampler: Sampler::new(p.req.sampling, seed),
                detok: Detokenizer::default(),
                stop: StopMatcher::new(p.req.stop),
                pending_ids: Vec::new(),
                tx: p.tx,
                cancelled: p.cancelled,
                max_tokens: p.req.max_tokens,
                ignore_eos: p.req.ignore_eos,
            });
        }
        true
    }

    /// Finish a sequence: free its blocks, count it, send the final event (after the counts,
    /// so a caller that reacts to it finds its place already free).
    fn retire(&mut self, s: Seq, reason: Option<FinishReason>) {
        self.kv.release(&s.blocks);
        if let Ok(mut st) = self.shared.stats.lock() {
            st.requests_finished += 1;
            if reason == Some(FinishReason::Cancelled) {
                st.requests_cancelled += 1;
            }
        }
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(reason) = reason {
            let _ = s.tx.send(GenerationEvent::Finished {
                reason,
                usage: s.usage(),
            });
        }
    }

    /// Retire the sequences whose caller cancelled or went away.
    fn drop_cancelled(&mut self) {
        let gone = |s: &Seq| s.cancelled.load(Ordering::Relaxed) || s.tx.is_closed();
        let (dead_waiting, waiting): (VecDeque<Seq>, VecDeque<Seq>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(gone);
        let (dead_running, running): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(gone);
        self.waiting = waiting;
        self.running = running;
        for s in dead_waiting.into_iter().chain(dead_running) {
            self.retire(s, Some(FinishReason::Cancelled));
        }
    }

    /// Admit waiting sequences while the batch has room and their prompts fit in the cache.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch.max(1) {
            let Some(front) = self.waiting.front() else {
                break;
            };
            // Blocks for everything to recompute plus the next token.
            let need = self.kv.blocks_for(front.tokens.len() + 1);
            let Some(blocks) = self.kv.allocate(need) else {
                break;
            };
            if let Some(mut s) = self.waiting.pop_front() {
                s.blocks = blocks;
                s.cached = 0;
                self.running.push(s);
            }
        }
    }

    /// Make sure every running sequence has blocks for the positions this step writes,
    /// preempting the newest sequences when the cache is full.
    fn reserve_blocks(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let need = self.kv.blocks_for(s.tokens.len() + 1);
            if need <= s.blocks.len() {
                i += 1;
                continue;
            }
            if let Some(b) = self.kv.allocate(need - s.blocks.len()) {
                self.running[i].blocks.extend(b);
                i += 1;
                continue;
            }
            // Preempt the most recently admitted sequence (possibly this one).
            if let Some(mut victim) = self.running.pop() {
                self.kv.release(&victim.blocks);
                victim.blocks.clear();
                victim.cached = 0;
                self.waiting.push_front(victim);
                if let Ok(mut st) = self.shared.stats.lock() {
                    st.preemptions_total += 1;
                }
            }
        }
    }

    /// One forward pass; returns the number of tokens generated.
    fn step(&mut self) -> Result<usize> {
        self.reserve_blocks();
        if self.running.is_empty() {
            return Ok(0);
        }
        let mut budget = self.config.max_step_tokens.max(1);
        // (sequence index, tokens in this step, samples after it)
        let mut plan = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            let todo = s.tokens.len() - s.cached;
            if todo == 1 {
                plan.push((i, 1, true));
            } else if budget > 0 {
                let take = todo.min(budget);
                budget -= take;
                plan.push((i, take, take == todo));
            }
        }
        // Decodes first used no budget; make sure at least one chunk runs.
        if plan.is_empty() {
            return Ok(0);
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(i, n, sample)| {
                let s = &self.running[i];
                SeqChunk {
                    tokens: &s.tokens[s.cached..s.cached + n],
                    start: s.cached,
                    blocks: &s.blocks,
                    logits: if sample {
                        LogitsFor::Last
                    } else {
                        LogitsFor::None
                    },
                }
            })
            .collect();
        let prompt_tokens: usize = plan
            .iter()
            .filter(|&&(i, n, _)| n > 1 || self.running[i].generated() == 0)
            .map(|&(_, n, _)| n)
            .sum();
        let logits = self.model.forward_led(&chunks, &mut self.kv)?;
        drop(chunks);
        let mut generated = 0;
        let mut finished = Vec::new();
        for (&(i, n, sample), logits) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            s.cached += n;
            if !sample {
                continue;
            }
            generated += 1;
            if let Outcome::Done(reason) = Self::advance(
                s,
                &logits,
                &self.tokenizer,
                &self.eos,
                self.model.context_length(),
            ) {
                finished.push((i, reason));
            }
        }
        if let Ok(mut st) = self.shared.stats.lock() {
            st.prompt_tokens_total += prompt_tokens as u64;
            st.generated_tokens_total += generated as u64;
        }
        for (i, reason) in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.retire(s, Some(reason));
        }
        Ok(generated)
    }

    /// Sample the next token of `s` and stream its text; says whether `s` is done.
    fn advance(
        s: &mut Seq,
        logits: &[f32],
        tok: &Tokenizer,
        eos: &[u32],
        context: usize,
    ) -> Outcome {
        let next = {
            let (prompt, generated) = s.tokens.split_at(s.prompt_len);
            s.sampler.sample_with_history(logits, prompt, generated)
        };
        if !s.ignore_eos && eos.contains(&next) {
            Self::flush(s);
            return Outcome::Done(FinishReason::Stop);
        }
        s.tokens.push(next);
        s.pending_ids.push(next);
        let delta = s.detok.push(tok, next);
        let out = s.stop.push(&delta);
        if !out.text.is_empty() || out.stopped {
            let _ = s.tx.send(GenerationEvent::Delta {
                text: out.text,
                token_ids: std::mem::take(&mut s.pending_ids),
            });
        }
        if out.stopped {
            return Outcome::Done(FinishReason::Stop);
        }
        if s.generated() >= s.max_tokens || s.tokens.len() >= context {
            Self::flush(s);
            return Outcome::Done(FinishReason::Length);
        }
        Outcome::Continue
    }

    /// Send text held back by the stop matcher (generation ended without a stop string).
    fn flush(s: &mut Seq) {
        let rest = s.stop.finish();
        if !rest.is_empty() || !s.pending_ids.is_empty() {
            let _ = s.tx.send(GenerationEvent::Delta {
                text: rest,
                token_ids: std::mem::take(&mut s.pending_ids),
            });
        }
    }

    /// Update the gauges.
    fn publish(&mut self, generated: usize) {
        let now = Instant::now();
        self.rate.push_back((now, generated));
        while self
            .rate
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.rate.pop_front();
        }
        let tokens: usize = self.rate.iter().map(|(_, n)| n).sum();
        let span = self
            .rate
            .front()
            .map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64());
        if let Ok(mut st) = self.shared.stats.lock() {
            st.running = self.running.len();
            st.waiting = self.waiting.len();
            st.kv_blocks_used = self.kv.total_blocks() - self.kv.free_blocks();
            st.generation_tokens_per_s = if span > 0.0 {
                tokens as f64 / span
            } else {
                0.0
            };
        }
    }
}
