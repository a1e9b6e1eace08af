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
//!
//! With prefix caching (on by default, [`EngineConfig::enable_prefix_caching`]) an admitted
//! request starts from the cached full blocks of its longest cached prefix and computes only
//! the rest; every full block a sequence computes is registered for later requests, and a
//! request whose next block another running sequence is computing waits for it rather than
//! computing it again ([`crate::kv_cache::prefix`]).

mod api;
mod detokenize;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::sampling::Sampler;
use skymoe_model::{Checkpoint, Tokenizer};
use tokio::sync::mpsc;

pub use api::{
    EngineStats, FinishReason, GenerationEvent, GenerationRequest, RequestStream, SubmitError,
    TokenLogprob, Usage,
};
use detokenize::Detokenizer;

use crate::chat_template::ChatTemplate;
use crate::constrained::{Constraint, ConstraintError, ConstraintVocab, Step};
use crate::error::{Result, ServeError};
use crate::kv_cache::{BlockPool, BlockRef, KvCache, KvDtype};
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
    /// Share the KV blocks of identical prompt prefixes between requests (automatic prefix
    /// caching).
    pub enable_prefix_caching: bool,
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
            enable_prefix_caching: true,
        }
    }
}

impl EngineConfig {
    /// KV-cache blocks for `model`: `kv_blocks`, or as many as `kv_memory_bytes` holds for the
    /// whole model (the same count on every rank of a tensor-parallel group).
    pub fn kv_blocks_for(&self, model: &ServeModel) -> usize {
        self.kv_blocks.unwrap_or_else(|| {
            let dtype = model.kv_dtype(self.kv_dtype);
            let per_pos = KvCache::bytes_per_position(
                model.num_layers(),
                model.config.kv_cache_width(),
                model.config.kv_cache_heads(),
                dtype,
            )
            .max(1);
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
    /// End-of-sequence ids (tokenizer and config).
    eos: Arc<Vec<u32>>,
    /// The vocabulary prepared for constrained decoding, built on first use.
    constraint_vocab: Arc<OnceLock<std::result::Result<ConstraintVocab, ConstraintError>>>,
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
            eos: Arc::new(eos.clone()),
            constraint_vocab: Arc::new(OnceLock::new()),
            config: Arc::new(config.clone()),
            _alive: Arc::new(AliveGuard(shared.clone())),
        };
        let pool = BlockPool::new(blocks, block_size, config.enable_prefix_caching);
        let scheduler = Scheduler {
            model,
            kv,
            pool,
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

    /// Rows of the model's logits (token ids must be below it).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Positions the KV cache holds in all (the most tokens all running sequences together
    /// can hold at once).
    pub fn kv_capacity(&self) -> usize {
        self.kv_positions
    }

    /// Most requests running or waiting at once.
    pub fn max_queue(&self) -> usize {
        self.config.max_queue
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template (ChatML when the model has none).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The ids that end a generation (the tokenizer's and the model config's).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The model's vocabulary prepared for constrained decoding (the byte prefix tree of
    /// every token over the model's logits), built on the first call and shared by every
    /// later one. The first call walks the whole vocabulary: call it off async threads.
    pub fn constraint_vocab(&self) -> std::result::Result<&ConstraintVocab, ConstraintError> {
        self.constraint_vocab
            .get_or_init(|| {
                let t0 = Instant::now();
                let v = ConstraintVocab::from_tokenizer(&self.tokenizer, self.vocab, &self.eos);
                if v.is_ok() {
                    tracing::info!(
                        "constrained decoding: vocabulary of {} tokens prepared in {:.1} ms",
                        self.vocab,
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                }
                v
            })
            .as_ref()
            .map_err(Clone::clone)
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
    /// Chained prefix-cache keys of the full blocks of `tokens`.
    keys: Vec<u64>,
    /// Leading blocks already registered in (or taken from) the prefix cache.
    registered: usize,
    /// The registered block the next one chains to (`None` before the first block, or when
    /// the chain was broken and later blocks are not registered).
    chain: Option<BlockRef>,
    /// Blocks (indices into `keys`) this sequence will compute, marked pending in the pool.
    pending: std::ops::Range<usize>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    pending_ids: Vec<u32>,
    /// Log-probabilities of the tokens in `pending_ids` (when the request asks for them).
    pending_logprobs: Vec<TokenLogprob>,
    /// Alternatives to report per generated token (`None`: no log-probabilities).
    logprobs: Option<usize>,
    /// Alternatives to report per prompt token (`None`: no prompt log-probabilities).
    prompt_logprobs: Option<usize>,
    /// Prompt log-probabilities gathered so far, one per prompt position; `None` once sent.
    prompt_lps: Option<Vec<Option<TokenLogprob>>>,
    tx: mpsc::UnboundedSender<GenerationEvent>,
    cancelled: Arc<AtomicBool>,
    max_tokens: usize,
    ignore_eos: bool,
    /// The grammar the generated text follows (constrained decoding).
    constraint: Option<Constraint>,
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

    /// Whether the logits of every prompt position are still needed (prompt log-probabilities
    /// asked for and not yet sent). Such a sequence computes its whole prompt: a prefix
    /// cache must not let it skip positions.
    fn wants_prompt_logits(&self) -> bool {
        self.prompt_lps.is_some()
    }

    /// Which logits a chunk of this sequence starting at `self.cached` needs.
    fn logits_for(&self, sample: bool) -> LogitsFor {
        if self.wants_prompt_logits() && self.cached < self.prompt_len {
            LogitsFor::All
        } else if sample {
            LogitsFor::Last
        } else {
            LogitsFor::None
        }
    }

    /// Take the logits of a chunk of `n` positions starting at `self.cached`: record the
    /// prompt log-probabilities they give (sending them all once the prompt is complete) and
    /// return the last position's logits (what the sampler needs).
    fn take_chunk_logits(&mut self, n: usize, logits: Vec<f32>) -> Vec<f32> {
        let start = self.cached;
        let (Some(top), Some(lps)) = (self.prompt_logprobs, self.prompt_lps.as_mut()) else {
            return logits;
        };
        if start >= self.prompt_len || n == 0 || !logits.len().is_multiple_of(n) {
            return logits;
        }
        let vocab = logits.len() / n;
        if vocab == 0 {
            return logits;
        }
        lps.resize(self.prompt_len, None);
        // Row k predicts the token at position start + k + 1.
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            let pos = start + k + 1;
            if pos >= self.prompt_len {
                break;
            }
            lps[pos] = Some(self.sampler.logprobs(row, self.tokens[pos], top));
        }
        if start + n >= self.prompt_len {
            let prompt_logprobs = self.prompt_lps.take();
            let _ = self.tx.send(GenerationEvent::Delta {
                text: String::new(),
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                prompt_logprobs,
            });
        }
        let last = logits.len() - vocab;
        logits[last..].to_vec()
    }
}

struct Scheduler {
    model: ServeModel,
    kv: KvCache,
    /// Who holds which of `kv`'s blocks, and the prefix cache over them.
    pool: BlockPool,
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
    /// The request cannot go on (its constraint failed).
    Failed(String),
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
                keys: Vec::new(),
                registered: 0,
                chain: None,
                pending: 0..0,
                sampler: Sampler::new(p.req.sampling, seed),
                detok: Detokenizer::default(),
                stop: StopMatcher::new(p.req.stop),
                pending_ids: Vec::new(),
                pending_logprobs: Vec::new(),
                logprobs: p.req.logprobs,
                prompt_logprobs: p.req.prompt_logprobs,
                prompt_lps: p.req.prompt_logprobs.map(|_| Vec::new()),
                tx: p.tx,
                cancelled: p.cancelled,
                max_tokens: p.req.max_tokens,
                ignore_eos: p.req.ignore_eos,
                constraint: p.req.constraint,
            });
        }
        true
    }

    /// Finish a sequence: free its blocks, count it, send the final event (after the counts,
    /// so a caller that reacts to it finds its place already free).
    fn retire(&mut self, mut s: Seq, reason: Option<FinishReason>) {
        self.release_blocks(&mut s);
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

    /// Admit waiting sequences, in order, while the batch has room and their prompts fit in
    /// the cache. A sequence starts from the cached blocks of its longest cached prefix; one
    /// whose next block a running sequence is computing is passed over until it is cached.
    fn admit(&mut self) {
        let mut i = 0;
        while self.running.len() < self.config.max_batch.max(1) && i < self.waiting.len() {
            let Some(s) = self.waiting.get_mut(i) else {
                break;
            };
            self.pool.extend_keys(&s.tokens, &mut s.keys);
            // Prompt log-probabilities need the logits of every prompt position: no hits.
            let hits = if s.wants_prompt_logits() {
                Vec::new()
            } else {
                self.pool.lookup(&s.tokens, &s.keys)
            };
            let shareable = self.pool.shareable_blocks(s.tokens.len());
            if hits.len() < shareable
                && s.keys
                    .get(hits.len())
                    .is_some_and(|&k| self.pool.is_pending(k))
            {
                i += 1;
                continue;
            }
            // Blocks for everything to compute plus the next token.
            let need = self.pool.blocks_for(s.tokens.len() + 1);
            let Some(blocks) = self.pool.acquire(&hits, need.saturating_sub(hits.len())) else {
                break;
            };
            let Some(mut s) = self.waiting.remove(i) else {
                self.pool.release(&blocks);
                break;
            };
            self.pool.record_query(s.tokens.len(), hits.len());
            s.blocks = blocks;
            s.cached = hits.len() * self.pool.block_size();
            s.registered = hits.len();
            s.chain = hits.last().copied();
            s.pending = hits.len()..s.keys.len();
            self.pool.mark_pending(&s.keys[s.pending.clone()]);
            self.running.push(s);
        }
    }

    /// Give back a sequence's blocks and pending marks: it holds nothing and starts over.
    fn release_blocks(&mut self, s: &mut Seq) {
        self.pool.release(&s.blocks);
        let pending = std::mem::replace(&mut s.pending, 0..0);
        self.pool
            .unmark_pending(s.keys.get(pending).unwrap_or_default());
        s.blocks.clear();
        s.cached = 0;
        s.registered = 0;
        s.chain = None;
    }

    /// Register the full blocks `s` has computed since the last call in the prefix cache (the
    /// chain stops at a block that cannot be registered).
    fn register_blocks(pool: &mut BlockPool, s: &mut Seq) {
        if !pool.prefix_caching() {
            return;
        }
        let bs = pool.block_size();
        pool.extend_keys(&s.tokens, &mut s.keys);
        while s.registered < s.cached / bs {
            let i = s.registered;
            s.registered += 1;
            if s.pending.contains(&i) {
                pool.unmark_pending(&s.keys[i..i + 1]);
                s.pending.start = i + 1;
            }
            if i > 0 && s.chain.is_none() {
                continue;
            }
            let (Some(&block), Some(&key)) = (s.blocks.get(i), s.keys.get(i)) else {
                s.chain = None;
                continue;
            };
            s.chain = pool.register(s.chain, block, key, &s.tokens[i * bs..(i + 1) * bs]);
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
            if let Some(b) = self.pool.allocate(need - s.blocks.len()) {
                self.running[i].blocks.extend(b);
                i += 1;
                continue;
            }
            // Preempt the most recently admitted sequence (possibly this one).
            if let Some(mut victim) = self.running.pop() {
                self.release_blocks(&mut victim);
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
        // Shared (cached) blocks are never written: every position a chunk writes lies in a
        // block its sequence holds alone.
        let bs = self.pool.block_size();
        for &(i, n, _) in &plan {
            let s = &self.running[i];
            let (first, last) = (s.cached / bs, (s.cached + n - 1) / bs);
            if let Some(b) = (first..=last)
                .map(|j| s.blocks.get(j).copied())
                .find(|b| !b.is_some_and(|b| self.pool.is_writable(b)))
            {
                return Err(ServeError::InvalidInput(format!(
                    "a step would write KV block {b:?} at position {}, which the sequence does \
                     not hold alone",
                    s.cached
                )));
            }
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(i, n, sample)| {
                let s = &self.running[i];
                SeqChunk {
                    tokens: &s.tokens[s.cached..s.cached + n],
                    start: s.cached,
                    blocks: &s.blocks,
                    logits: s.logits_for(sample),
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
        let mut failed = Vec::new();
        for (&(i, n, sample), logits) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            let logits = s.take_chunk_logits(n, logits);
            s.cached += n;
            Self::register_blocks(&mut self.pool, s);
            if !sample {
                continue;
            }
            if s.max_tokens == 0 {
                // Prompt log-probabilities only (an echo with `max_tokens` 0).
                finished.push((i, Some(FinishReason::Length)));
                continue;
            }
            generated += 1;
            match Self::advance(
                s,
                &logits,
                &self.tokenizer,
                &self.eos,
                self.model.context_length(),
            ) {
                Outcome::Continue => {}
                Outcome::Done(reason) => finished.push((i, Some(reason))),
                Outcome::Failed(message) => {
                    tracing::warn!("constrained decoding failed: {message}");
                    let _ = s.tx.send(GenerationEvent::Failed { message });
                    failed.push(i);
                }
            }
        }
        if let Ok(mut st) = self.shared.stats.lock() {
            st.prompt_tokens_total += prompt_tokens as u64;
            st.generated_tokens_total += generated as u64;
        }
        // `finished` and `failed` hold distinct indices: sorted, they are removed from the back.
        finished.extend(failed.into_iter().map(|i| (i, None)));
        finished.sort_unstable_by_key(|&(i, _)| i);
        for (i, reason) in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.retire(s, reason);
        }
        Ok(generated)
    }

    /// Sample the next token of `s` and stream its text; says whether `s` is done.
    ///
    /// With a constraint, the logits of the tokens it does not allow are set to −∞ before
    /// sampling (the log-probabilities reported are those of the masked logits, as vLLM
    /// reports them), a sampled token it does not allow (possible only with non-finite
    /// logits) is replaced by the first one it does, and the request stops when the text is
    /// complete or at an end-of-sequence token, `ignore_eos` or not.
    fn advance(
        s: &mut Seq,
        logits: &[f32],
        tok: &Tokenizer,
        eos: &[u32],
        context: usize,
    ) -> Outcome {
        let mut masked = Vec::new();
        let logits = match s.constraint.as_mut() {
            None => logits,
            Some(c) => {
                masked.extend_from_slice(logits);
                match c.apply(&mut masked) {
                    Ok(Step::Sample) => &masked[..],
                    Ok(Step::Finished) => {
                        Self::flush(s);
                        return Outcome::Done(FinishReason::Stop);
                    }
                    Err(e) => return Outcome::Failed(e.to_string()),
                }
            }
        };
        let mut next = {
            let (prompt, generated) = s.tokens.split_at(s.prompt_len);
            s.sampler.sample_with_history(logits, prompt, generated)
        };
        if let Some(c) = s.constraint.as_mut() {
            let step = (|| {
                if !c.allows(next)? {
                    next = c
                        .first_allowed()?
                        .ok_or_else(|| ConstraintError::Engine("no token is allowed".into()))?;
                }
                c.commit(next)
            })();
            if let Err(e) = step {
                return Outcome::Failed(e.to_string());
            }
            if c.is_eos(next) || eos.contains(&next) {
                Self::flush(s);
                return Outcome::Done(FinishReason::Stop);
            }
        } else if !s.ignore_eos && eos.contains(&next) {
            Self::flush(s);
            return Outcome::Done(FinishReason::Stop);
        }
        if let Some(top) = s.logprobs {
            let lp = s.sampler.logprobs(logits, next, top);
            s.pending_logprobs.push(lp);
        }
        s.tokens.push(next);
        s.pending_ids.push(next);
        let delta = s.detok.push(tok, next);
        let out = s.stop.push(&delta);
        if !out.text.is_empty() || out.stopped {
            let _ = s.tx.send(GenerationEvent::Delta {
                text: out.text,
                token_ids: std::mem::take(&mut s.pending_ids),
                logprobs: std::mem::take(&mut s.pending_logprobs),
                prompt_logprobs: None,
            });
        }
        if out.stopped || s.constraint.as_ref().is_some_and(Constraint::is_finished) {
            if !out.stopped {
                Self::flush(s);
            }
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
                logprobs: std::mem::take(&mut s.pending_logprobs),
                prompt_logprobs: None,
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
            st.kv_blocks_used = self.pool.used_blocks();
            st.prefix_cache = self.pool.stats();
            st.prefix_cache_blocks = self.pool.cached_blocks();
            st.generation_tokens_per_s = if span > 0.0 {
                tokens as f64 / span
            } else {
                0.0
            };
        }
    }
}
