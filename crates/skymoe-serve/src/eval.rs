//! Perplexity with the served model (its weight format and kernels), for measuring what
//! quantisation costs.

use crate::error::{Result, ServeError};
use crate::kv_cache::{KvCache, KvDtype};
use crate::model::{LogitsFor, SeqChunk, ServeModel};

/// How [`windows_nll`] runs a window through the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Each window as one prompt: one forward pass of all its inputs.
    Prompts,
    /// Each window token by token, as decoding runs: the windows of a batch are concurrent
    /// sequences, each step feeds every unfinished one its next token and scores the token
    /// after it. The attention then reads the KV cache as a decoding step does (through the
    /// decode kernels, for every position), not as a prompt does.
    Decoded,
}

/// Summed next-token negative log-likelihood (nats) of `windows` (each: inputs followed by
/// the last target) and the number of predicted tokens, running `batch` windows at a time
/// as `scoring` says over a KV cache of `kv_dtype` (`None`: as `skymoe serve` chooses).
pub fn windows_nll(
    model: &ServeModel,
    windows: &[&[u32]],
    batch: usize,
    kv_dtype: Option<KvDtype>,
    scoring: Scoring,
) -> Result<(f64, usize)> {
    let (mut nll, mut count) = (0.0f64, 0usize);
    let vocab = model.config.vocab_size;
    let mut add = |row: &[f32], target: u32| {
        nll += next_token_nll(&row[..vocab], target);
        count += 1;
    };
    for group in windows.chunks(batch.max(1)) {
        let (mut kv, tables) = cache_for(model, group, kv_dtype)?;
        match scoring {
            Scoring::Prompts => {
                let chunks: Vec<SeqChunk<'_>> = group
                    .iter()
                    .zip(&tables)
                    .map(|(w, blocks)| SeqChunk {
                        tokens: &w[..w.len() - 1],
                        start: 0,
                        blocks,
                        logits: LogitsFor::All,
                    })
                    .collect();
                let logits = model.forward(&chunks, &mut kv)?;
                for (w, l) in group.iter().zip(logits) {
                    for (row, &target) in l.chunks_exact(vocab).zip(&w[1..]) {
                        add(row, target);
                    }
                }
            }
            Scoring::Decoded => {
                let longest = group.iter().map(|w| w.len()).max().unwrap_or(0);
                for pos in 0..longest - 1 {
                    let active: Vec<usize> = (0..group.len())
                        .filter(|&i| pos + 1 < group[i].len())
                        .collect();
                    let chunks: Vec<SeqChunk<'_>> = active
                        .iter()
                        .map(|&i| SeqChunk {
                            tokens: &group[i][pos..pos + 1],
                            start: pos,
                            blocks: &tables[i],
                            logits: LogitsFor::All,
                        })
                        .collect();
                    let logits = model.forward(&chunks, &mut kv)?;
                    for (&i, row) in active.iter().zip(&logits) {
                        add(row, group[i][pos + 1]);
                    }
                }
            }
        }
    }
    Ok((nll, count))
}

/// A KV cache of `kv_dtype` in blocks of 16 positions holding every window of `group`, and
/// each window's block table; an error for a window of fewer than two tokens (nothing to
/// predict).
fn cache_for(
    model: &ServeModel,
    group: &[&[u32]],
    kv_dtype: Option<KvDtype>,
) -> Result<(KvCache, Vec<Vec<u32>>)> {
    if group.iter().any(|w| w.len() < 2) {
        return Err(ServeError::InvalidInput(
            "a window needs at least two tokens".into(),
        ));
    }
    let blocks: usize = group.iter().map(|w| w.len().div_ceil(16)).sum();
    let mut kv = model.new_kv_cache(16, blocks, kv_dtype);
    let mut tables = Vec::with_capacity(group.len());
    for w in group {
        let table = kv
            .allocate(kv.blocks_for(w.len()))
            .ok_or_else(|| ServeError::InvalidInput("KV cache too small".into()))?;
        tables.push(table);
    }
    Ok((kv, tables))
}

/// `−log softmax(row)[target]`, in f64.
fn next_token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - row[target as usize] as f64
}
