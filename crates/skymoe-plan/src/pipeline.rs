//! Splitting layers into pipeline stages and the 1F1B schedule's step time.

/// Step time of a 1F1B pipeline with per-micro-batch stage times `stage_times` (forward plus
/// backward) over `micro` micro-batches: fill and drain pass every stage once, the steady
/// state runs at the slowest stage, `(m − 1)·max + Σ`. With equal stages this is the familiar
/// `(m + p − 1)·t`.
pub fn one_f_one_b(stage_times: &[f64], micro: usize) -> f64 {
    let max = stage_times.iter().cloned().fold(0.0, f64::max);
    let sum: f64 = stage_times.iter().sum();
    (micro.max(1) - 1) as f64 * max + sum
}

/// Fraction of accelerator time idle in the pipeline: `1 − m·Σ t / (p·T)`.
pub fn bubble_fraction(stage_times: &[f64], micro: usize) -> f64 {
    let total = one_f_one_b(stage_times, micro);
    if total <= 0.0 {
        return 0.0;
    }
    let busy: f64 = stage_times.iter().sum::<f64>() * micro.max(1) as f64;
    (1.0 - busy / (stage_times.len() as f64 * total)).max(0.0)
}

/// Layers per stage as even as possible, the extra layers on the first stages
/// (`24, 5 → [5,5,5,5,4]`).
pub fn uniform_split(layers: usize, stages: usize) -> Vec<usize> {
    (0..stages)
        .map(|i| layers / stages + usize::from(i < layers % stages))
        .collect()
}

/// Split `layers` consecutive layers into `stages` stages. `stage_cost(i, a, b)` is the
/// (time, memory) of stage `i` holding layers `a..b`, or `None` when they do not fit its
/// memory. The split minimises the slowest stage (the 1F1B steady state); among the splits
/// that reach it, the fullest stage's memory; then the sum of stage times (fill and drain).
/// Returns the layers per stage, or `None` when no split fits.
pub fn best_split(
    layers: usize,
    stages: usize,
    mut stage_cost: impl FnMut(usize, usize, usize) -> Option<(f64, f64)>,
) -> Option<Vec<usize>> {
    if stages == 0 || stages > layers {
        return None;
    }
    let mut cache = vec![None; stages * (layers + 1) * (layers + 1)];
    let mut cost = |i: usize, a: usize, b: usize| -> Option<(f64, f64)> {
        let slot = &mut cache[(i * (layers + 1) + a) * (layers + 1) + b];
        *slot.get_or_insert_with(|| stage_cost(i, a, b))
    };
    let (fastest, _) = min_max_split(layers, stages, |i, a, b| cost(i, a, b).map(|(t, _)| (t, t)))?;
    let limit = fastest.0 * (1.0 + 1e-9);
    let (_, split) = min_max_split(layers, stages, |i, a, b| {
        cost(i, a, b).and_then(|(t, mem)| (t <= limit).then_some((mem, t)))
    })?;
    Some(split)
}

/// Minimise the largest `primary` over stages, then the sum of `secondary`.
/// `cost(i, a, b)` gives (primary, secondary) of stage `i` over layers `a..b`.
fn min_max_split(
    layers: usize,
    stages: usize,
    mut cost: impl FnMut(usize, usize, usize) -> Option<(f64, f64)>,
) -> Option<((f64, f64), Vec<usize>)> {
    // best[i][j]: (max primary, sum secondary, start of stage i-1) over the first j layers
    // in i stages.
    type Entry = (f64, f64, usize);
    let mut best: Vec<Vec<Option<Entry>>> = vec![vec![None; layers + 1]; stages + 1];
    best[0][0] = Some((0.0, 0.0, 0));
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs());
    for i in 1..=stages {
        // Stage i-1 ends at j; the stages after it need at least one layer each.
        for j in i..=layers - (stages - i) {
            let mut found: Option<Entry> = None;
            for (a, prev) in best[i - 1].iter().enumerate().take(j).skip(i - 1) {
                let Some((pmax, psum, _)) = *prev else {
                    continue;
                };
                let Some((p, s)) = cost(i - 1, a, j) else {
                    continue;
                };
                let cand = (pmax.max(p), psum + s, a);
                let better = match found {
                    None => true,
                    Some(old) if close(cand.0, old.0) => cand.1 < old.1,
                    Some(old) => cand.0 < old.0,
                };
                if better {
                    found = Some(cand);
                }
            }
            best[i][j] = found;
        }
    }
    let (max, sum, _) = best[stages][layers]?;
    let mut split = vec![0; stages];
    let mut j = layers;
    for i in (1..=stages).rev() {
        let (_, _, a) = best[i][j].expect("a reachable state has a predecessor");
        split[i - 1] = j - a;
        j = a;
    }
    Some(((max, sum), split))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_stages_give_the_classic_bubble() {
        let t = [1.0; 4];
        assert_eq!(one_f_one_b(&t, 8), 11.0);
        assert!((bubble_fraction(&t, 8) - 3.0 / 11.0).abs() < 1e-12);
        assert_eq!(uniform_split(24, 5), vec![5, 5, 5, 5, 4]);
        assert_eq!(uniform_split(24, 4), vec![6, 6, 6, 6]);
    }

    #[test]
    fn best_split_moves_layers_off_a_heavy_last_stage() {
        // 24 unit layers; the last stage also runs a head worth 2 layers.
        let time = |i: usize, a: usize, b: usize| {
            Some(((b - a) as f64 + if i == 3 { 2.0 } else { 0.0 }, 0.0))
        };
        let split = best_split(24, 4, time).unwrap();
        assert_eq!(split.iter().sum::<usize>(), 24);
        let times: Vec<f64> = split
            .iter()
            .enumerate()
            .map(|(i, &n)| n as f64 + if i == 3 { 2.0 } else { 0.0 })
            .collect();
        assert_eq!(times.iter().cloned().fold(0.0, f64::max), 7.0);
        assert_eq!(split[3], 5);
        // Brute force over all splits agrees on the slowest stage.
        let mut best = f64::MAX;
        for a in 1..22 {
            for b in a + 1..23 {
                for c in b + 1..24 {
                    let t = [
                        a as f64,
                        (b - a) as f64,
                        (c - b) as f64,
                        (24 - c) as f64 + 2.0,
                    ];
                    best = best.min(t.iter().cloned().fold(0.0, f64::max));
                }
            }
        }
        assert_eq!(best, 7.0);
    }

    #[test]
    fn memory_limits_are_respected() {
        // No stage may hold more than 6 layers.
        let time = |_: usize, a: usize, b: usize| (b - a <= 6).then_some(((b - a) as f64, 0.0));
        assert_eq!(best_split(24, 4, time).unwrap(), vec![6, 6, 6, 6]);
        let time = |_: usize, a: usize, b: usize| (b - a <= 5).then_some(((b - a) as f64, 0.0));
        assert!(best_split(24, 4, time).is_none());
    }
}
