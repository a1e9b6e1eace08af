//! Packing a token stream into fixed-length training windows, the train/validation split, and
//! the per-epoch shuffled order.
//!
//! Window `i` is the tokens `i·seq_len ..= i·seq_len + seq_len` (`seq_len + 1` tokens): the
//! first `seq_len` are the inputs and the last `seq_len` the targets, so consecutive windows
//! share exactly one token and the windows tile the stream (the few tokens after the last full
//! window are unused). Documents are packed back to back, separated by the end-of-sequence
//! token of the token file.
//!
//! A seeded permutation of the windows sends its last `val_fraction` to validation. The
//! training windows are then visited epoch after epoch, epoch `e` in an order shuffled by a
//! generator seeded from `(seed, e)`. The position in the stream is one integer, `consumed`
//! (training sequences handed out so far), and every batch is a pure function of
//! `(token file, seq_len, val_fraction, seed, consumed, batch_size)`, so resuming a run needs
//! only `consumed`.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};

use super::error::{DataError, Result};
use super::rng::{derive_seed, SplitMix64};
use super::token_file::TokenFile;

/// Domain tags for [`derive_seed`].
const DOMAIN_SPLIT: u64 = 0x5350_4C49_5400_0001; // "SPLIT"
const DOMAIN_EPOCH: u64 = 0x4550_4F43_4800_0002; // "EPOCH"

/// Epoch orders kept in memory (the current one and the next, for batches that straddle).
const CACHED_EPOCHS: usize = 2;

/// A token file cut into training and validation windows.
pub struct PackedDataset {
    tokens: TokenFile,
    seq_len: usize,
    seed: u64,
    n_windows: usize,
    /// Training window indices, ascending.
    train: Vec<usize>,
    /// Validation window indices, ascending.
    val: Vec<usize>,
    /// Recently used epoch orders, oldest first.
    orders: Mutex<Vec<(u64, Arc<Vec<usize>>)>>,
}

impl std::fmt::Debug for PackedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDataset")
            .field("tokens", &self.tokens)
            .field("seq_len", &self.seq_len)
            .field("seed", &self.seed)
            .field("windows", &self.n_windows)
            .field("train", &self.train.len())
            .field("val", &self.val.len())
            .finish()
    }
}

impl PackedDataset {
    /// Cut `tokens` into windows of `seq_len + 1` tokens and hold out about `val_fraction` of
    /// them (rounded to nearest) for validation, chosen by `seed`.
    ///
    /// With `val_fraction > 0` and at least two windows, validation gets at least one window
    /// and training keeps at least one; with a single window it all goes to training.
    ///
    /// Errors: [`DataError::InvalidArgument`] for `seq_len == 0` or `val_fraction` outside
    /// `[0, 1)`; [`DataError::TooFewTokens`] if the stream is shorter than one window.
    pub fn new(tokens: TokenFile, seq_len: usize, val_fraction: f64, seed: u64) -> Result<Self> {
        if seq_len == 0 {
            return Err(DataError::InvalidArgument(
                "sequence length must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(DataError::InvalidArgument(format!(
                "validation fraction must be in [0, 1), got {val_fraction}"
            )));
        }
        let n = tokens.len();
        let need = seq_len.checked_add(1).ok_or_else(|| {
            DataError::InvalidArgument(format!("sequence length {seq_len} is too large"))
        })?;
        if n < need {
            return Err(DataError::TooFewTokens {
                have: n as u64,
                need: need as u64,
            });
        }
        let n_windows = (n - 1) / seq_len;
        let n_val = if val_fraction == 0.0 {
            0
        } else if n_windows < 2 {
            tracing::warn!(
                "only one window of {need} tokens: no validation split despite a validation \
                 fraction of {val_fraction}"
            );
            0
        } else {
            ((val_fraction * n_windows as f64).round() as usize).clamp(1, n_windows - 1)
        };
        let mut order: Vec<usize> = (0..n_windows).collect();
        SplitMix64::new(derive_seed(seed, DOMAIN_SPLIT, 0)).shuffle(&mut order);
        let mut val = order.split_off(n_windows - n_val);
        let mut train = order;
        val.sort_unstable();
        train.sort_unstable();
        Ok(PackedDataset {
            tokens,
            seq_len,
            seed,
            n_windows,
            train,
            val,
            orders: Mutex::new(Vec::new()),
        })
    }

    /// The underlying token file.
    pub fn token_file(&self) -> &TokenFile {
        &self.tokens
    }

    /// Tokens of input per sequence (each window holds one more).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The seed of the split and of the epoch orders.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of windows, training and validation together.
    pub fn num_windows(&self) -> usize {
        self.n_windows
    }

    /// Number of training windows (at least 1), i.e. sequences per epoch.
    pub fn num_train(&self) -> usize {
        self.train.len()
    }

    /// Number of validation windows.
    pub fn num_val(&self) -> usize {
        self.val.len()
    }

    /// Training window indices, ascending.
    pub fn train_windows(&self) -> &[usize] {
        &self.train
    }

    /// Validation window indices, ascending (the validation order).
    pub fn val_windows(&self) -> &[usize] {
        &self.val
    }

    /// The `seq_len + 1` tokens of window `i`, or `None` if there is no such window.
    pub fn window(&self, i: usize) -> Option<&[u32]> {
        if i >= self.n_windows {
            return None;
        }
        let start = i * self.seq_len;
        self.tokens.get(start..start + self.seq_len + 1)
    }

    /// The epoch that training sequence number `consumed` belongs to.
    pub fn epoch_of(&self, consumed: u64) -> u64 {
        consumed / self.train.len() as u64
    }

    /// The order in which epoch `epoch` visits the training windows (window indices): a
    /// permutation of [`train_windows`](Self::train_windows) seeded by `(seed, epoch)`.
    pub fn epoch_order(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut cache = self
            .orders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, order)) = cache.iter().find(|(e, _)| *e == epoch) {
            return order.clone();
        }
        let mut order = self.train.clone();
        SplitMix64::new(derive_seed(self.seed, DOMAIN_EPOCH, epoch)).shuffle(&mut order);
        let order = Arc::new(order);
        if cache.len() >= CACHED_EPOCHS {
            cache.remove(0);
        }
        cache.push((epoch, order.clone()));
        order
    }

    /// The window index of training sequence number `consumed` (counting from 0 across
    /// epochs).
    pub fn train_window(&self, consumed: u64) -> usize {
        let n = self.train.len() as u64;
        let order = self.epoch_order(consumed / n);
        order[(consumed % n) as usize]
    }

    /// The training batch of `batch_size` sequences that starts after `consumed` sequences:
    /// sequences `consumed .. consumed + batch_size` of the endless epoch-by-epoch order, each
    /// `seq_len + 1` tokens. A pure function of the dataset, its seed, `consumed` and
    /// `batch_size`; crossing an epoch boundary continues into the next epoch's order.
    pub fn train_batch(&self, consumed: u64, batch_size: usize) -> Vec<Vec<u32>> {
        let n = self.train.len() as u64;
        let mut out = Vec::with_capacity(batch_size);
        let mut current: Option<(u64, Arc<Vec<usize>>)> = None;
        for i in 0..batch_size as u64 {
            let k = consumed.wrapping_add(i);
            let epoch = k / n;
            let order = match &current {
                Some((e, o)) if *e == epoch => o.clone(),
                _ => {
                    let o = self.epoch_order(epoch);
                    current = Some((epoch, o.clone()));
                    o
                }
            };
            out.push(self.window_tokens(order[(k % n) as usize]).to_vec());
        }
        out
    }

    /// The validation windows in fixed (ascending) order, in batches of `batch_size` (the last
    /// one may be smaller; a `batch_size` of 0 counts as 1).
    pub fn val_batches(&self, batch_size: usize) -> ValBatches<'_> {
        ValBatches {
            data: self,
            next: 0,
            batch_size: batch_size.max(1),
        }
    }

    /// Window `i`'s tokens; `i` must be a valid window index.
    fn window_tokens(&self, i: usize) -> &[u32] {
        // Every index handed here comes from `train` or `val`, all below `n_windows`, and
        // `n_windows · seq_len + 1 <= len`, so the range is in bounds.
        let start = i * self.seq_len;
        &self.tokens.tokens()[start..start + self.seq_len + 1]
    }
}

/// Iterator over the validation windows in batches; see [`PackedDataset::val_batches`].
pub struct ValBatches<'a> {
    data: &'a PackedDataset,
    next: usize,
    batch_size: usize,
}

impl Iterator for ValBatches<'_> {
    type Item = Vec<Vec<u32>>;

    fn next(&mut self) -> Option<Vec<Vec<u32>>> {
        let rest = self.data.val.get(self.next..)?;
        if rest.is_empty() {
            return None;
        }
        let take = rest.len().min(self.batch_size);
        self.next += take;
        Some(
            rest[..take]
                .iter()
                .map(|&w| self.data.window_tokens(w).to_vec())
                .collect(),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.data.val.len().saturating_sub(self.next);
        let n = left.div_ceil(self.batch_size);
        (n, Some(n))
    }
}

impl ExactSizeIterator for ValBatches<'_> {}

/// Turn a batch of windows (each `seq_len + 1` tokens, as from
/// [`PackedDataset::train_batch`]) into `(inputs, targets)` tensors of shape
/// `[batch, seq_len]` and dtype u32 on `device`: inputs are each window without its last
/// token, targets without its first.
pub fn batch_tensors(batch: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let width = batch.first().map_or(0, Vec::len);
    if width < 2 {
        return Err(DataError::InvalidArgument(
            "a batch needs at least one window of at least two tokens".into(),
        ));
    }
    if let Some(w) = batch.iter().find(|w| w.len() != width) {
        return Err(DataError::InvalidArgument(format!(
            "windows of different lengths in one batch ({width} and {})",
            w.len()
        )));
    }
    let seq_len = width - 1;
    let mut inputs = Vec::with_capacity(batch.len() * seq_len);
    let mut targets = Vec::with_capacity(batch.len() * seq_len);
    for w in batch {
        inputs.extend_from_slice(&w[..seq_len]);
        targets.extend_from_slice(&w[1..]);
    }
    let inputs = Tensor::from_vec(inputs, (batch.len(), seq_len), device)?;
    let targets = Tensor::from_vec(targets, (batch.len(), seq_len), device)?;
    Ok((inputs, targets))
}
