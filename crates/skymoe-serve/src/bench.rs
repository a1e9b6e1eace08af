//! Throughput of the served model, measured the way llama.cpp's batched benchmark does: no
//! HTTP, greedy sampling, synthetic prompts. `skymoe bench serve` prints the result as JSON;
//! `benches/serve_vs_llamacpp.py` runs the same measurement on llama.cpp.

use std::time::Instant;

use crate::error::{Result, ServeError};
use crate::kv_cache::KvDtype;
use crate::model::{LogitsFor, SeqChunk, ServeModel};

/// Token `j` of synthetic prompt `k` for a vocabulary of `vocab` (the formula the benchmark
/// script uses for llama.cpp too).
pub fn prompt_token(j: usize, k: usize, vocab: usize) -> u32 {
    ((j * 7919 + k * 104_729 + 1) % vocab) as u32
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    pub gen_tokens: usize,
    /// Numbers of concurrent requests to measure total throughput at.
    pub concurrency: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    pub repeats: usize,
    /// Most prompt tokens in one forward pass (the engine's `max_step_tokens`): the prompts
    /// of a batch are prefilled in steps of at most this many tokens, a prompt split over
    /// steps where it does not fit, as the server does.
    pub step_tokens: usize,
    /// Element type of the KV cache (`None`: as the server chooses for the weights).
    pub kv_dtype: Option<KvDtype>,
}

/// The prefill steps for `requests` prompts of `prompt` tokens, at most `step` tokens a step:
/// each step a list of (request, first token, end token) pieces, in order.
fn prefill_steps(requests: usize, prompt: usize, step: usize) -> Vec<Vec<(usize, usize, usize)>> {
    let step = step.max(1);
    let mut steps = Vec::new();
    let mut current = Vec::new();
    let mut room = step;
    for k in 0..requests {
        let mut at = 0;
        while at < prompt {
            let take = (prompt - at).min(room);
            current.push((k, at, at + take));
            at += take;
            room -= take;
            if room == 0 {
                steps.push(std::mem::take(&mut current));
                room = step;
            }
        }
    }
    if !current.is_empty() {
        steps.push(current);
    }
    steps
}

/// The memory's read bandwidth in GB/s as this process's thread pool sees it: every thread
/// sums its share of a `mib` MiB buffer (far larger than the caches), the median of `repeats`
/// passes after one to fault the pages in. Decode at batch 1 streams its weights once per
/// token, so this is its ceiling.
pub fn read_bandwidth_gbs(mib: usize, repeats: usize) -> f64 {
    use rayon::prelude::*;
    let words = (mib.max(1) << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let pass = || {
        let t = Instant::now();
        let sum = buf
            .par_chunks(1 << 15)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    pass();
    median((0..repeats.max(1)).map(|_| pass()).collect())
}

/// One measurement at a number of concurrent requests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchRun {
    /// Concurrent requests.
    pub requests: usize,
    /// Prompt tokens processed per second (all prompts, in steps of `step_tokens`).
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second over the decode phase.
    pub decode_tokens_per_s: f64,
    /// Generated tokens per second over the whole run, prefill included.
    pub total_tokens_per_s: f64,
}

/// Run `requests` synthetic requests to completion; returns the timing.
fn run_batch(model: &ServeModel, requests: usize, cfg: &BenchConfig) -> Result<BatchRun> {
    let vocab = model.config.vocab_size;
    let len = cfg.prompt_tokens + cfg.gen_tokens;
    if len > model.context_length() {
        return Err(ServeError::InvalidInput(format!(
            "prompt + generated tokens ({len}) exceed the model's context of {}",
            model.context_length()
        )));
    }
    let block = 16;
    let per_seq = len.div_ceil(block);
    let mut kv = model.new_kv_cache(block, per_seq * requests, cfg.kv_dtype);
    let tables: Vec<Vec<u32>> = (0..requests)
        .map(|_| kv.allocate(per_seq).unwrap_or_default())
        .collect();
    let mut seqs: Vec<Vec<u32>> = (0..requests)
        .map(|k| {
            (0..cfg.prompt_tokens)
                .map(|j| prompt_token(j, k, vocab))
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    for step in prefill_steps(requests, cfg.prompt_tokens, cfg.step_tokens) {
        let chunks: Vec<SeqChunk<'_>> = step
            .iter()
            .map(|&(k, from, to)| SeqChunk {
                tokens: &seqs[k][from..to],
                start: from,
                blocks: &tables[k],
                logits: if to == cfg.prompt_tokens {
                    LogitsFor::Last
                } else {
                    LogitsFor::None
                },
            })
            .collect();
        let logits = model.forward(&chunks, &mut kv)?;
        let firsts: Vec<(usize, u32)> = step
            .iter()
            .zip(&logits)
            .filter(|((_, _, to), _)| *to == cfg.prompt_tokens)
            .map(|(&(k, _, _), l)| (k, skymoe_model::sampling::argmax(l)))
            .collect();
        for (k, t) in firsts {
            seqs[k].push(t);
        }
    }
    let t1 = Instant::now();
    for _ in 1..cfg.gen_tokens {
        let chunks: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(&tables)
            .map(|(s, b)| SeqChunk {
                tokens: &s[s.len() - 1..],
                start: s.len() - 1,
                blocks: b,
                logits: LogitsFor::Last,
            })
            .collect();
        let logits = model.forward(&chunks, &mut kv)?;
        for (s, l) in seqs.iter_mut().zip(&logits) {
            s.push(skymoe_model::sampling::argmax(l));
        }
    }
    let t2 = Instant::now();
    let prefill_s = (t1 - t0).as_secs_f64().max(1e-9);
    let decode_s = (t2 - t1).as_secs_f64().max(1e-9);
    let generated = (requests * cfg.gen_tokens) as f64;
    Ok(BatchRun {
        requests,
        prefill_tokens_per_s: (requests * cfg.prompt_tokens) as f64 / prefill_s,
        decode_tokens_per_s: (requests * (cfg.gen_tokens.saturating_sub(1))) as f64 / decode_s,
        total_tokens_per_s: generated / (prefill_s + decode_s),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median over `cfg.repeats` runs at each concurrency (1 first: batch-1 decode and
/// single-prompt prefill).
pub fn run(model: &ServeModel, cfg: &BenchConfig) -> Result<Vec<BatchRun>> {
    if cfg.prompt_tokens == 0 || cfg.gen_tokens < 2 {
        return Err(ServeError::InvalidInput(
            "the benchmark needs a prompt and at least 2 generated tokens".into(),
        ));
    }
    let mut levels = vec![1];
    levels.extend(cfg.concurrency.iter().copied().filter(|&c| c > 1));
    // Warm up (page in the weights, start the thread pool).
    run_batch(
        model,
        1,
        &BenchConfig {
            gen_tokens: 2,
            ..cfg.clone()
        },
    )?;
    let mut out = Vec::new();
    for n in levels {
        let runs = (0..cfg.repeats.max(1))
            .map(|_| run_batch(model, n, cfg))
            .collect::<Result<Vec<_>>>()?;
        let pick = |f: fn(&BatchRun) -> f64| median(runs.iter().map(f).collect());
        out.push(BatchRun {
            requests: n,
            prefill_tokens_per_s: pick(|r| r.prefill_tokens_per_s),
            decode_tokens_per_s: pick(|r| r.decode_tokens_per_s),
            total_tokens_per_s: pick(|r| r.total_tokens_per_s),
        });
    }
    Ok(out)
}

/// A workload for measuring automatic prefix caching through the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixScenario {
    /// lm-eval style: `items` contexts, each followed by `branches` different continuations,
    /// all requests submitted at once.
    LmEval,
    /// Multi-turn chat: `items` conversations of `branches` turns; each turn's prompt is the
    /// previous prompt, its reply and a new user message.
    Chat,
}

impl std::str::FromStr for PrefixScenario {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "lm-eval" => Ok(PrefixScenario::LmEval),
            "chat" => Ok(PrefixScenario::Chat),
            _ => Err(format!("unknown scenario {s:?} (expected lm-eval or chat)")),
        }
    }
}

/// What to measure with [`run_prefix`].
#[derive(Debug, Clone)]
pub struct PrefixBenchConfig {
    /// The workload.
    pub scenario: PrefixScenario,
    /// Contexts (lm-eval) or conversations (chat).
    pub items: usize,
    /// Tokens of each context (lm-eval) or of each conversation's first prompt (chat).
    pub context_tokens: usize,
    /// Continuations per context (lm-eval) or turns per conversation (chat).
    pub branches: usize,
    /// Tokens of each continuation (lm-eval) or of each later user message (chat).
    pub branch_tokens: usize,
    /// Tokens generated per request.
    pub gen_tokens: usize,
    /// Runs with caching on and with caching off (alternating; medians are reported).
    pub repeats: usize,
    /// The engine's `max_step_tokens`.
    pub step_tokens: usize,
    /// The engine's `max_batch`.
    pub max_batch: usize,
    /// Element type of the KV cache (`None`: as the server chooses for the weights).
    pub kv_dtype: Option<KvDtype>,
}

/// The result of a workload with caching on or off.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefixRun {
    /// Whether prefix caching was on.
    pub prefix_caching: bool,
    /// Requests submitted.
    pub requests: usize,
    /// Prompt tokens submitted.
    pub prompt_tokens: u64,
    /// Prompt tokens the model computed.
    pub computed_prompt_tokens: u64,
    /// Prompt tokens taken from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Median wall time of the workload, first submission to last completion, in seconds.
    pub wall_s: f64,
    /// Every run's wall time.
    pub wall_s_runs: Vec<f64>,
}

fn submit_err(e: crate::engine::SubmitError) -> ServeError {
    ServeError::InvalidInput(format!("the engine refused a request: {e}"))
}

/// Wait for a request's generated ids.
fn generated(mut s: crate::engine::RequestStream) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            crate::engine::GenerationEvent::Delta { token_ids, .. } => ids.extend(token_ids),
            crate::engine::GenerationEvent::Finished { .. } => break,
            crate::engine::GenerationEvent::Failed { message } => {
                return Err(ServeError::InvalidInput(format!(
                    "a request failed: {message}"
                )))
            }
        }
    }
    Ok(ids)
}

/// Run the workload once on a fresh engine; (prompt tokens submitted, requests, wall time,
/// the idle engine's counters).
fn run_prefix_once(
    engine: &crate::engine::EngineHandle,
    cfg: &PrefixBenchConfig,
    vocab: usize,
) -> Result<(u64, usize, f64, crate::engine::EngineStats)> {
    use crate::engine::GenerationRequest;
    let request = |prompt: Vec<u32>| GenerationRequest {
        ignore_eos: true,
        seed: Some(0),
        ..GenerationRequest::greedy(prompt, cfg.gen_tokens)
    };
    let (mut prompt_tokens, mut requests) = (0u64, 0usize);
    let t0 = Instant::now();
    match cfg.scenario {
        PrefixScenario::LmEval => {
            let mut streams = Vec::new();
            for k in 0..cfg.items {
                for c in 0..cfg.branches {
                    let tail = 1_000 + k * cfg.branches + c;
                    let prompt: Vec<u32> = (0..cfg.context_tokens)
                        .map(|j| prompt_token(j, k, vocab))
                        .chain((0..cfg.branch_tokens).map(|j| prompt_token(j, tail, vocab)))
                        .collect();
                    prompt_tokens += prompt.len() as u64;
                    requests += 1;
                    streams.push(engine.submit(request(prompt)).map_err(submit_err)?);
                }
            }
            for s in streams {
                generated(s)?;
            }
        }
        PrefixScenario::Chat => {
            let mut prompts: Vec<Vec<u32>> = (0..cfg.items)
                .map(|k| {
                    (0..cfg.context_tokens)
                        .map(|j| prompt_token(j, k, vocab))
                        .collect()
                })
                .collect();
            for turn in 0..cfg.branches {
                let mut streams = Vec::new();
                for p in &prompts {
                    prompt_tokens += p.len() as u64;
                    requests += 1;
                    streams.push(engine.submit(request(p.clone())).map_err(submit_err)?);
                }
                for (k, (s, p)) in streams.into_iter().zip(prompts.iter_mut()).enumerate() {
                    p.extend(generated(s)?);
                    let user = 10_000 + k * cfg.branches + turn;
                    p.extend((0..cfg.branch_tokens).map(|j| prompt_token(j, user, vocab)));
                }
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    // The counters are published by the scheduler's next loop after the last request.
    let t1 = Instant::now();
    loop {
        let st = engine.stats();
        if st.requests_finished as usize >= requests && st.running == 0 && st.kv_blocks_used == 0 {
            return Ok((prompt_tokens, requests, wall, st));
        }
        if t1.elapsed().as_secs() > 30 {
            return Err(ServeError::InvalidInput(
                "the engine did not come back to idle".into(),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Run a prefix-caching workload on engines over `model` with caching off and on (each run
/// on a fresh engine, so the cache starts empty; runs alternate); `tokenizer` makes the
/// model's tokenizer for each engine. Returns the run with caching off, then on.
pub fn run_prefix(
    model: &ServeModel,
    tokenizer: &dyn Fn() -> Result<skymoe_model::Tokenizer>,
    cfg: &PrefixBenchConfig,
) -> Result<[PrefixRun; 2]> {
    let vocab = model.config.vocab_size;
    let longest = match cfg.scenario {
        PrefixScenario::LmEval => cfg.context_tokens + cfg.branch_tokens,
        PrefixScenario::Chat => {
            cfg.context_tokens
                + cfg.branches.saturating_sub(1) * (cfg.gen_tokens + cfg.branch_tokens)
        }
    } + cfg.gen_tokens;
    if longest > model.context_length() {
        return Err(ServeError::InvalidInput(format!(
            "the longest request ({longest} tokens with its output) exceeds the model's context of {}",
            model.context_length()
        )));
    }
    if cfg.items == 0 || cfg.branches == 0 || cfg.gen_tokens == 0 || cfg.context_tokens == 0 {
        return Err(ServeError::InvalidInput(
            "the scenario needs items, branches, context and generated tokens".into(),
        ));
    }
    let start = |caching: bool| -> Result<crate::engine::EngineHandle> {
        let config = crate::engine::EngineConfig {
            max_batch: cfg.max_batch.max(1),
            max_queue: usize::MAX,
            max_step_tokens: cfg.step_tokens.max(1),
            kv_dtype: cfg.kv_dtype,
            enable_prefix_caching: caching,
            ..crate::engine::EngineConfig::default()
        };
        Ok(crate::engine::EngineHandle::start(
            model.clone(),
            tokenizer()?,
            crate::chat_template::ChatTemplate::chatml(),
            config,
        ))
    };
    // Warm up (page in the weights, start the thread pool).
    run_prefix_once(&start(false)?, cfg, vocab)?;
    let mut runs: [PrefixRun; 2] = [false, true].map(|caching| PrefixRun {
        prefix_caching: caching,
        requests: 0,
        prompt_tokens: 0,
        computed_prompt_tokens: 0,
        cached_prompt_tokens: 0,
        wall_s: 0.0,
        wall_s_runs: Vec::new(),
    });
    for _ in 0..cfg.repeats.max(1) {
        for run in runs.iter_mut() {
            let engine = start(run.prefix_caching)?;
            let (prompt_tokens, requests, wall, st) = run_prefix_once(&engine, cfg, vocab)?;
            run.requests = requests;
            run.prompt_tokens = prompt_tokens;
            run.computed_prompt_tokens = st.prompt_tokens_total;
            run.cached_prompt_tokens = st.prefix_cache.hit_tokens;
            run.wall_s_runs.push(wall);
        }
    }
    for run in runs.iter_mut() {
        run.wall_s = median(run.wall_s_runs.clone());
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::prefill_steps;

    #[test]
    fn prefill_steps_cover_every_prompt_token_once_within_the_step_size() {
        for (requests, prompt, step) in [(1, 128, 512), (32, 128, 512), (3, 300, 512), (5, 7, 3)] {
            let steps = prefill_steps(requests, prompt, step);
            let mut next = vec![0usize; requests];
            for s in &steps {
                let tokens: usize = s.iter().map(|(_, a, b)| b - a).sum();
                assert!(tokens > 0 && tokens <= step, "{s:?}");
                for &(k, a, b) in s {
                    assert_eq!(a, next[k], "pieces of request {k} in order");
                    next[k] = b;
                }
            }
            assert!(next.iter().all(|&n| n == prompt));
            let total = requests * prompt;
            assert_eq!(steps.len(), total.div_ceil(step));
        }
    }
}
