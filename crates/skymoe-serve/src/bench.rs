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
