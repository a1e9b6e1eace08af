//! Tensor parallelism for serving across processes, with uneven shares: each rank holds a
//! contiguous range of query heads (with the kv heads they read — shared kv heads are held by
//! every rank that needs them) and a contiguous range of every FFN's intermediate columns
//! (dense, routed experts, shared expert). Attention output and FFN output are partial sums
//! added up over the ranks; embeddings, norms, router and LM head are replicated. Heads that
//! do not divide by the ranks are split as evenly as possible (36 heads on 8 ranks: 5,5,5,5,
//! 4,4,4,4) or in proportion to given rank weights.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Result, ServeError};

/// The collectives tensor parallelism needs (implemented over MPI by the `skymoe` binary).
pub trait TpComm: Send + Sync {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn size(&self) -> usize;
    /// Sum `data` element-wise over the group, in place on every rank.
    fn all_reduce_sum(&self, data: &mut [f32]) -> std::result::Result<(), String>;
    /// Copy `root`'s `data` to every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> std::result::Result<(), String>;
}

/// `total` items split over ranks in proportion to `weights`: each rank gets the floor of its
/// share, the remainder goes to the largest fractional parts (lower ranks first on ties).
/// Every rank gets at least one item.
pub fn split_by_weights(total: usize, weights: &[f64]) -> Result<Vec<usize>> {
    let n = weights.len();
    if n == 0 || weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
        return Err(ServeError::InvalidInput(
            "tensor-parallel rank weights must be positive numbers, one per rank".into(),
        ));
    }
    if total < n {
        return Err(ServeError::InvalidInput(format!(
            "cannot split {total} heads or columns over {n} ranks (each needs at least one)"
        )));
    }
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut left = total - counts.iter().sum::<usize>();
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    // Give an empty rank one item from the largest share.
    while let Some(empty) = counts.iter().position(|&c| c == 0) {
        let (big, _) = counts
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, usize::MAX - i))
            .unwrap_or((0, &0));
        counts[big] -= 1;
        counts[empty] += 1;
    }
    Ok(counts)
}

/// A tensor-parallel group and how work is shared in it.
#[derive(Clone)]
pub struct TensorParallel {
    /// The group's collectives.
    pub comm: Arc<dyn TpComm>,
    /// Relative share of each rank (equal by default).
    pub weights: Vec<f64>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorParallel(rank {} of {}, weights {:?})",
            self.comm.rank(),
            self.comm.size(),
            self.weights
        )
    }
}

impl TensorParallel {
    /// A group over `comm` with `weights` (`None`: equal shares).
    pub fn new(comm: Arc<dyn TpComm>, weights: Option<Vec<f64>>) -> Result<Self> {
        let weights = weights.unwrap_or_else(|| vec![1.0; comm.size()]);
        if weights.len() != comm.size() {
            return Err(ServeError::InvalidInput(format!(
                "{} rank weights given for {} ranks",
                weights.len(),
                comm.size()
            )));
        }
        Ok(TensorParallel { comm, weights })
    }

    /// This rank's range of `total` items.
    pub fn range(&self, total: usize) -> Result<Range<usize>> {
        let counts = split_by_weights(total, &self.weights)?;
        let r = self.comm.rank();
        let start: usize = counts[..r].iter().sum();
        Ok(start..start + counts[r])
    }

    /// Sum partial results over the group.
    pub fn all_reduce(&self, data: &mut [f32]) -> Result<()> {
        self.comm
            .all_reduce_sum(data)
            .map_err(|e| ServeError::Comm(format!("all-reduce: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uneven_splits() {
        assert_eq!(
            split_by_weights(36, &[1.0; 8]).unwrap(),
            vec![5, 5, 5, 5, 4, 4, 4, 4]
        );
        assert_eq!(split_by_weights(4, &[1.0; 3]).unwrap(), vec![2, 1, 1]);
        assert_eq!(split_by_weights(12288, &[1.0; 8]).unwrap(), vec![1536; 8]);
        assert_eq!(
            split_by_weights(10, &[2.0, 1.0, 1.0]).unwrap(),
            vec![5, 3, 2]
        );
        // A tiny weight still gets one item.
        assert_eq!(split_by_weights(4, &[100.0, 0.01]).unwrap(), vec![3, 1]);
        for (total, w) in [(7usize, vec![1.0, 3.0, 0.5]), (100, vec![0.3; 7])] {
            let c = split_by_weights(total, &w).unwrap();
            assert_eq!(c.iter().sum::<usize>(), total);
            assert!(c.iter().all(|&x| x >= 1));
        }
        assert!(split_by_weights(2, &[1.0; 3]).is_err());
        assert!(split_by_weights(5, &[1.0, -1.0]).is_err());
        assert!(split_by_weights(5, &[]).is_err());
    }
}

/// A forward pass's inputs, as the leading rank sends them to the others: header `[stop,
/// chunks, tokens, blocks]`, then per chunk `[start, len, blocks, logits]`, the tokens and the
/// block ids, all as f32 (exact for integers below 2^24).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StepPlan {
    /// Per chunk: start, tokens, block table, logits code (0 none, 1 last, 2 all).
    pub chunks: Vec<(usize, Vec<u32>, Vec<u32>, u8)>,
}

const EXACT: usize = 1 << 24;

impl StepPlan {
    /// Header and body of the plan (`None`: the stop message).
    pub(crate) fn encode(plan: Option<&StepPlan>) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(p) = plan else {
            return Ok((vec![1.0, 0.0, 0.0, 0.0], Vec::new()));
        };
        let tokens: usize = p.chunks.iter().map(|c| c.1.len()).sum();
        let blocks: usize = p.chunks.iter().map(|c| c.2.len()).sum();
        let mut body = Vec::with_capacity(4 * p.chunks.len() + tokens + blocks);
        for (start, t, b, l) in &p.chunks {
            body.extend([*start as f32, t.len() as f32, b.len() as f32, *l as f32]);
        }
        for (_, t, _, _) in &p.chunks {
            body.extend(t.iter().map(|&x| x as f32));
        }
        for (_, _, b, _) in &p.chunks {
            body.extend(b.iter().map(|&x| x as f32));
        }
        let big = p.chunks.iter().any(|(s, t, b, _)| {
            s + t.len() >= EXACT || t.iter().chain(b).any(|&x| x as usize >= EXACT)
        });
        if big {
            return Err(ServeError::Comm(
                "token ids, positions and blocks must stay below 2^24 under tensor parallelism"
                    .into(),
            ));
        }
        let header = vec![0.0, p.chunks.len() as f32, tokens as f32, blocks as f32];
        Ok((header, body))
    }

    /// Body length announced by a header; `None` for the stop message.
    pub(crate) fn body_len(header: &[f32]) -> Option<usize> {
        if header[0] != 0.0 {
            return None;
        }
        Some(4 * header[1] as usize + header[2] as usize + header[3] as usize)
    }

    /// The plan from a header and body.
    pub(crate) fn decode(header: &[f32], body: &[f32]) -> Result<StepPlan> {
        let n = header[1] as usize;
        let bad = || ServeError::Comm("malformed step plan".into());
        let mut at = 4 * n;
        let mut b_at = at + header[2] as usize;
        let mut chunks = Vec::with_capacity(n);
        for c in 0..n {
            let meta = body.get(4 * c..4 * c + 4).ok_or_else(bad)?;
            let (start, len, nb, l) = (
                meta[0] as usize,
                meta[1] as usize,
                meta[2] as usize,
                meta[3] as u8,
            );
            let t = body
                .get(at..at + len)
                .ok_or_else(bad)?
                .iter()
                .map(|&x| x as u32)
                .collect();
            let b = body
                .get(b_at..b_at + nb)
                .ok_or_else(bad)?
                .iter()
                .map(|&x| x as u32)
                .collect();
            at += len;
            b_at += nb;
            chunks.push((start, t, b, l));
        }
        Ok(StepPlan { chunks })
    }
}
