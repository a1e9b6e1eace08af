//! Perplexity with the served model (its weight format and kernels), for measuring what
//! quantisation costs.

use crate::error::{Result, ServeError};
use crate::kv_cache::KvDtype;
use crate::model::{LogitsFor, SeqChunk, ServeModel};

/// Summed next-token negative log-likelihood (nats) of `windows` (each: inputs followed by
/// the last target) and the number of predicted tokens, running `batch` windows per pass
/// over a KV cache of `kv_dtype` (`None`: as `skymoe serve` chooses).
pub fn windows_nll(
    model: &ServeModel,
    windows: &[&[u32]],
    batch: usize,
    kv_dtype: Option<KvDtype>,
) -> Result<(f64, usize)> {
    let (mut nll, mut count) = (0.0f64, 0usize);
    let vocab = model.config.vocab_size;
    for group in windows.chunks(batch.max(1)) {
        let longest = group.iter().map(|w| w.len()).max().unwrap_or(0);
        if longest < 2 {
            return Err(ServeError::InvalidInput(
                "a window needs at least two tokens".into(),
            ));
        }
        let mut kv = model.new_kv_cache(16, group.len() * longest.div_ceil(16), kv_dtype);
        let mut tables = Vec::with_capacity(group.len());
        for w in group {
            let blocks = kv
                .allocate(kv.blocks_for(w.len()))
                .ok_or_else(|| ServeError::InvalidInput("KV cache too small".into()))?;
            tables.push(blocks);
        }
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
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                nll += lse - row[target as usize] as f64;
                count += 1;
            }
        }
    }
    Ok((nll, count))
}
