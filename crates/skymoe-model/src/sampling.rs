//! Choosing the next token from logits: greedy, or temperature / top-k / top-p / min-p
//! sampling with a seeded generator, after optional repetition, presence and frequency
//! penalties.
//!
//! The processing order follows Hugging Face `generate`: logit bias, repetition penalty,
//! presence and frequency penalties, temperature, top-k, top-p, min-p, then the draw. Greedy
//! decoding (temperature 0) applies the bias and penalties and then takes the arg-max.
//!
//! [`Sampler::logprobs`] reports log-probabilities as the OpenAI API does: the log-softmax, in
//! f32, of the raw logits plus the logit bias (before penalties and temperature), with the
//! most likely tokens found by partial selection rather than a full sort.

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
///
/// `Default` is greedy decoding with every filter and penalty off. Check settings that come
/// from users with [`SamplingParams::validate`]; a [`Sampler`] never panics on bad settings
/// but its behaviour on them is unspecified.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = all).
    pub top_p: f32,
    /// Keep only tokens whose probability is at least `min_p` times the probability of the
    /// most likely token, after temperature (0 = off).
    pub min_p: f32,
    /// CTRL / Hugging Face repetition penalty (1 = off): for every token id present in the
    /// prompt or the generated text, a positive logit is divided by the penalty and a negative
    /// one multiplied by it.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty (0 = off): subtracted once from the logit of every token that
    /// has been generated at least once.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty (0 = off): subtracted from the logit of every generated token
    /// once per time it has been generated.
    pub frequency_penalty: f32,
    /// OpenAI logit bias: `(token id, bias)` pairs added to the logits before anything else
    /// (a bias of −100 in effect bans a token, +100 forces it). Ids outside the vocabulary
    /// are ignored; a token listed twice gets both biases.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Check that every setting is in its allowed range; the error names the field and the
    /// range.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(format!(
                "logit_bias must be in [-100, 100], got {b} for token {id}"
            ));
        }
        Ok(())
    }

    /// Whether these settings decode greedily (temperature 0, or not a positive number).
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    /// Whether any penalty or bias is switched on (so that the logits must be copied and
    /// edited).
    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
    }
}

/// Log-probabilities around one position: the chosen token's and the most likely tokens'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen (or, for a prompt, the token that follows).
    pub token: u32,
    /// Its log-probability (−∞ for a token whose logit is −∞).
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first (ties by
    /// increasing id); as many as asked for, or fewer when the vocabulary is smaller.
    pub top: Vec<(u32, f32)>,
}

/// Below this many candidates top-p sorts them all; above it, it sorts the most likely ones
/// in growing chunks until the nucleus is covered.
const TOP_P_CHUNK: usize = 256;

/// A token sampler with its own random state.
///
/// The sampler keeps scratch buffers between calls, so one sampler per request avoids
/// allocating per token. With the same seed, the same settings and the same sequence of
/// inputs, it makes the same choices.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `(token id, logit)` candidates, reused between calls.
    cand: Vec<(u32, f32)>,
    /// Scratch for token ids (deduplicated history, generated-token counts).
    ids: Vec<u32>,
    /// Scratch for biased logits (log-probabilities with a logit bias).
    biased: Vec<f32>,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(seed),
            cand: Vec::new(),
            ids: Vec::new(),
            biased: Vec::new(),
        }
    }

    /// The log-probability of `token` and of the `top` most likely tokens under `logits`
    /// plus this sampler's logit bias: `l_i - log Σ_j exp(l_j)`, in f32 (the sum is
    /// accumulated in f64), before penalties and temperature. The `top` tokens are found by
    /// partial selection (linear in the vocabulary) and only they are sorted. Non-finite
    /// logits count as −∞.
    pub fn logprobs(&mut self, logits: &[f32], token: u32, top: usize) -> TokenLogprob {
        let values: &[f32] = if self.params.logit_bias.is_empty() {
            logits
        } else {
            self.biased.clear();
            self.biased.extend_from_slice(logits);
            for &(id, b) in &self.params.logit_bias {
                if let Some(l) = self.biased.get_mut(id as usize) {
                    *l += b;
                }
            }
            &self.biased
        };
        let finite = |l: f32| if l.is_finite() { l } else { f32::NEG_INFINITY };
        let max = values
            .iter()
            .map(|&l| finite(l))
            .fold(f32::NEG_INFINITY, f32::max);
        let lse = if max == f32::NEG_INFINITY {
            0.0
        } else {
            let sum: f64 = values
                .iter()
                .map(|&l| f64::from((finite(l) - max).exp()))
                .sum();
            max + (sum.ln() as f32)
        };
        let lp = |l: f32| finite(l) - lse;
        let logprob = values
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l));
        let mut best = Vec::new();
        if top > 0 {
            let cand = &mut self.cand;
            cand.clear();
            cand.extend(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, finite(l))),
            );
            if top < cand.len() {
                cand.select_nth_unstable_by(top - 1, by_score_desc);
                cand.truncate(top);
            }
            cand.sort_unstable_by(by_score_desc);
            best.extend(cand.iter().map(|&(i, l)| (i, l - lse)));
        }
        TokenLogprob {
            token,
            logprob,
            top: best,
        }
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits` (one per vocabulary entry) with no history, so the
    /// penalties have nothing to act on.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_with_history(logits, &[], &[])
    }

    /// Pick the next token from `logits` (one per vocabulary entry), applying the repetition
    /// penalty to every token of `prompt` and `generated`, and the presence and frequency
    /// penalties to the tokens of `generated`.
    ///
    /// Token ids outside the vocabulary are ignored. Non-finite logits (after the penalties
    /// and temperature) are never sampled; if every logit is non-finite, or `logits` is empty,
    /// the result is [`argmax`] of `logits`.
    pub fn sample_with_history(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> u32 {
        let greedy = self.params.is_greedy();
        if greedy && !self.params.has_penalties() {
            return argmax(logits);
        }
        if !self.candidates(logits, prompt, generated) {
            return argmax(logits);
        }
        if greedy {
            // No temperature: the candidates are the penalised logits of the whole vocabulary.
            return self
                .cand
                .iter()
                .fold(None::<(u32, f32)>, |best, &(i, l)| match best {
                    Some((_, b)) if b >= l => best,
                    _ => Some((i, l)),
                })
                .map_or(0, |(i, _)| i);
        }
        self.draw()
    }

    /// Fill `self.cand` with the tokens that survive every filter: for greedy settings, the
    /// whole vocabulary with penalised logits; otherwise each kept token with its unnormalised
    /// probability `exp(logit / temperature - max)`. Returns false when no candidate is left.
    fn candidates(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> bool {
        let p = &self.params;
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        for &(id, b) in &p.logit_bias {
            if let Some(c) = cand.get_mut(id as usize) {
                c.1 += b;
            }
        }

        // Repetition penalty over the distinct ids of prompt and generated text.
        if p.repetition_penalty != 1.0 {
            self.ids.clear();
            self.ids.extend_from_slice(prompt);
            self.ids.extend_from_slice(generated);
            self.ids.sort_unstable();
            self.ids.dedup();
            for &id in &self.ids {
                if let Some(c) = cand.get_mut(id as usize) {
                    c.1 = if c.1 < 0.0 {
                        c.1 * p.repetition_penalty
                    } else {
                        c.1 / p.repetition_penalty
                    };
                }
            }
        }

        // Presence and frequency penalties over the counts of generated ids.
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.ids.clear();
            self.ids.extend_from_slice(generated);
            self.ids.sort_unstable();
            for run in self.ids.chunk_by(|a, b| a == b) {
                if let Some(c) = cand.get_mut(run[0] as usize) {
                    c.1 -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }

        let greedy = p.is_greedy();
        if !greedy {
            let t = p.temperature;
            cand.iter_mut().for_each(|c| c.1 /= t);
        }
        cand.retain(|c| c.1.is_finite());
        if cand.is_empty() {
            return false;
        }
        if greedy {
            return true;
        }

        // Top-k: partial selection, no full sort.
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_score_desc);
            cand.truncate(p.top_k);
        }

        // From here on the candidates carry unnormalised probabilities w = exp(l - max), in
        // (0, 1], the most likely token having exactly 1 (one exp per candidate in all).
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        cand.iter_mut().for_each(|c| c.1 = (c.1 - max).exp());

        // Top-p: the smallest prefix (by decreasing probability) whose mass reaches top_p.
        if p.top_p < 1.0 {
            let total: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
            let target = f64::from(p.top_p) * total;
            let n = cand.len();
            let mut sorted = 0usize;
            let mut acc = 0.0f64;
            let mut keep = n;
            'grow: while sorted < n {
                let end = if n <= TOP_P_CHUNK {
                    n
                } else {
                    (sorted.max(TOP_P_CHUNK / 2) * 2).min(n)
                };
                let rest = &mut cand[sorted..];
                let len = end - sorted;
                if len < rest.len() {
                    rest.select_nth_unstable_by(len - 1, by_score_desc);
                }
                rest[..len].sort_unstable_by(by_score_desc);
                for (i, c) in rest[..len].iter().enumerate() {
                    acc += f64::from(c.1);
                    if acc >= target {
                        keep = sorted + i + 1;
                        break 'grow;
                    }
                }
                sorted = end;
            }
            cand.truncate(keep.max(1));
        }

        // Min-p: p_i ≥ min_p · p_max  ⇔  w_i ≥ min_p (normalisation cancels; w_max = 1).
        if p.min_p > 0.0 {
            let min_p = p.min_p;
            cand.retain(|c| c.1 >= min_p || c.1 >= 1.0);
        }
        !cand.is_empty()
    }

    /// Draw one of `self.cand` with probability proportional to its weight.
    fn draw(&mut self) -> u32 {
        let total: f64 = self.cand.iter().map(|c| f64::from(c.1)).sum();
        let r: f64 = self.rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        for &(id, w) in &self.cand {
            acc += f64::from(w);
            if r < acc {
                return id;
            }
        }
        self.cand.last().map_or(0, |c| c.0)
    }
}

/// Order candidates by decreasing score (logit or weight), ties by increasing token id (a total order, so the
/// kept sets of top-k and top-p are well defined).
fn by_score_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Index of the largest value (the first one on ties; 0 for an empty slice).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    /// A small deterministic generator for test inputs.
    struct Lcg(u64);
    impl Lcg {
        fn next_u32(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn unit(&mut self) -> f32 {
            self.next_u32() as f32 / (1u64 << 31) as f32
        }
        fn below(&mut self, n: usize) -> usize {
            self.next_u32() as usize % n
        }
    }

    /// Plain reference of the penalties: one pass per history token, with a set for the
    /// repetition penalty and explicit counts for presence/frequency.
    fn reference_penalised(
        p: &SamplingParams,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> Vec<f32> {
        let mut out = logits.to_vec();
        let seen: BTreeSet<u32> = prompt.iter().chain(generated).copied().collect();
        for id in seen {
            if let Some(l) = out.get_mut(id as usize) {
                *l = if *l < 0.0 {
                    *l * p.repetition_penalty
                } else {
                    *l / p.repetition_penalty
                };
            }
        }
        for (id, l) in out.iter_mut().enumerate() {
            let count = generated.iter().filter(|&&g| g as usize == id).count();
            if count > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
        out
    }

    /// Brute-force kept set: full softmax, full stable sort, each filter as written in Hugging
    /// Face's warpers.
    fn reference_kept(
        p: &SamplingParams,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> BTreeSet<u32> {
        let pen = reference_penalised(p, logits, prompt, generated);
        let mut v: Vec<(u32, f32)> = pen
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .filter(|c| c.1.is_finite())
            .collect();
        v.sort_by(by_score_desc);
        if p.top_k > 0 {
            v.truncate(p.top_k);
        }
        let probs = |v: &[(u32, f32)]| -> Vec<f64> {
            let max = v[0].1;
            let e: Vec<f64> = v.iter().map(|c| f64::from((c.1 - max).exp())).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect()
        };
        if p.top_p < 1.0 {
            let pr = probs(&v);
            let mut before = 0.0;
            let mut keep = 0;
            for q in pr {
                if before < f64::from(p.top_p) {
                    keep += 1;
                }
                before += q;
            }
            v.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let pr = probs(&v);
            let top = pr[0];
            v = v
                .into_iter()
                .zip(pr)
                .filter(|(_, q)| *q >= f64::from(p.min_p) * top - 1e-12)
                .map(|(c, _)| c)
                .collect();
        }
        v.into_iter().map(|c| c.0).collect()
    }

    fn kept(s: &mut Sampler, logits: &[f32], prompt: &[u32], generated: &[u32]) -> BTreeSet<u32> {
        assert!(s.candidates(logits, prompt, generated));
        s.cand.iter().map(|c| c.0).collect()
    }

    fn random_logits(rng: &mut Lcg, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.unit() - 0.5) * scale).collect()
    }

    #[test]
    fn logprobs_are_log_softmax_with_bias_and_partial_top() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY, 3.0];
        let mut s = Sampler::new(SamplingParams::default(), 0);
        let lse = logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|l| f64::from(*l).exp())
            .sum::<f64>()
            .ln() as f32;
        let r = s.logprobs(&logits, 2, 3);
        assert_eq!(r.token, 2);
        assert!((r.logprob - (2.0 - lse)).abs() < 1e-6);
        // Ties by increasing id.
        let ids: Vec<u32> = r.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 4, 2]);
        assert!((r.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(s.logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert!(s.logprobs(&logits, 3, 0).top.is_empty());
        assert_eq!(s.logprobs(&logits, 0, 99).top.len(), logits.len());
        // The bias enters the distribution; penalties and temperature do not.
        let mut b = Sampler::new(
            SamplingParams {
                temperature: 0.5,
                repetition_penalty: 1.5,
                logit_bias: vec![(0, 10.0)],
                ..Default::default()
            },
            0,
        );
        let r = b.logprobs(&logits, 0, 1);
        assert_eq!(r.top[0].0, 0);
        let biased = [11.0f32, 3.0, 2.0, 3.0];
        let lse = biased.iter().map(|l| f64::from(*l).exp()).sum::<f64>().ln() as f32;
        assert!((r.logprob - (11.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut ban = Sampler::new(
            SamplingParams {
                logit_bias: vec![(1, -100.0)],
                ..Default::default()
            },
            0,
        );
        assert_eq!(ban.sample(&logits), 2);
        let mut force = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                logit_bias: vec![(0, 100.0), (77, 5.0)],
                ..Default::default()
            },
            7,
        );
        for _ in 0..50 {
            assert_eq!(force.sample(&logits), 0);
        }
        let bad = SamplingParams {
            logit_bias: vec![(0, 100.5)],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("logit_bias"));
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
        assert_eq!(s.sample(&[]), 0);
    }

    #[test]
    fn default_is_greedy_with_everything_off() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 0.0);
        assert_eq!(d.top_k, 0);
        assert_eq!(d.top_p, 1.0);
        assert_eq!(d.min_p, 0.0);
        assert_eq!(d.repetition_penalty, 1.0);
        assert_eq!(d.presence_penalty, 0.0);
        assert_eq!(d.frequency_penalty, 0.0);
        assert!(!d.has_penalties());
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 7);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, 2.9]), 1);
        }
        let p = params(1.0);
        let draw = |seed| {
            let mut s = Sampler::new(p.clone(), seed);
            (0..50)
                .map(|_| s.sample(&[1.0, 1.0, 1.0, 1.0]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert!(
            draw(3).iter().any(|&t| t != draw(3)[0]),
            "uniform logits should give varied samples"
        );
        assert_ne!(
            draw(3),
            draw(4),
            "different seeds should give different draws"
        );
    }

    #[test]
    fn seeded_draws_are_reproducible_with_every_filter_and_penalty() {
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: Vec::new(),
        };
        let mut rng = Lcg(11);
        let logits: Vec<Vec<f32>> = (0..30)
            .map(|_| random_logits(&mut rng, 1000, 8.0))
            .collect();
        let run = |seed| {
            let mut s = Sampler::new(p.clone(), seed);
            let mut gen = Vec::new();
            for l in &logits {
                let t = s.sample_with_history(l, &[1, 2, 3], &gen);
                gen.push(t);
            }
            gen
        };
        assert_eq!(run(5), run(5));
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 1);
        // token 2 holds ~84% of the mass: the nucleus at 0.5 is {2}.
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 3.0, 0.5]), 2);
        }
    }

    #[test]
    fn top_k_matches_brute_force() {
        let mut rng = Lcg(1);
        for case in 0..40 {
            let n = 1 + rng.below(3000);
            let mut logits = random_logits(&mut rng, n, 10.0);
            // Some ties, to exercise the tie-break.
            if case % 3 == 0 {
                logits.iter_mut().for_each(|l| *l = l.round());
            }
            let p = SamplingParams {
                temperature: 0.5 + rng.unit(),
                top_k: rng.below(n + 5),
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone(), 0);
            assert_eq!(
                kept(&mut s, &logits, &[], &[]),
                reference_kept(&p, &logits, &[], &[]),
                "case {case}"
            );
        }
    }

    #[test]
    fn top_p_matches_brute_force_small_and_large_vocabularies() {
        let mut rng = Lcg(2);
        for case in 0..60 {
            // Large vocabularies with flat logits make nuclei bigger than one sorting chunk.
            let n = if case % 2 == 0 {
                1 + rng.below(200)
            } else {
                1000 + rng.below(20000)
            };
            let scale = if case % 4 == 1 { 1.0 } else { 12.0 };
            let logits = random_logits(&mut rng, n, scale);
            let p = SamplingParams {
                temperature: 0.3 + 2.0 * rng.unit(),
                top_p: 0.05 + 0.94 * rng.unit(),
                top_k: if case % 5 == 0 { rng.below(n + 1) } else { 0 },
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone(), 0);
            let got = kept(&mut s, &logits, &[], &[]);
            let want = reference_kept(&p, &logits, &[], &[]);
            // Float summation order may differ at the exact boundary: allow one token of slack.
            let diff = got.symmetric_difference(&want).count();
            assert!(
                diff <= 1,
                "case {case}: {} vs {} tokens",
                got.len(),
                want.len()
            );
            assert!(!got.is_empty());
        }
    }

    #[test]
    fn large_nucleus_is_the_exact_top_tokens() {
        // Uniform logits on 5000 tokens: top_p 0.5 keeps exactly the 2500 lowest ids (ties
        // broken by id), well beyond one sorting chunk.
        let logits = vec![0.25f32; 5000];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 0);
        let got = kept(&mut s, &logits, &[], &[]);
        assert!((2500..=2501).contains(&got.len()), "{}", got.len());
        assert!(got.iter().all(|&i| i < 2501));
    }

    #[test]
    fn min_p_matches_brute_force() {
        let mut rng = Lcg(3);
        for case in 0..60 {
            let n = 1 + rng.below(500);
            let logits = random_logits(&mut rng, n, 8.0);
            let p = SamplingParams {
                temperature: 0.3 + 2.0 * rng.unit(),
                min_p: rng.unit(),
                top_k: if case % 3 == 0 { rng.below(n + 1) } else { 0 },
                top_p: if case % 4 == 0 {
                    0.5 + 0.5 * rng.unit()
                } else {
                    1.0
                },
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone(), 0);
            let got = kept(&mut s, &logits, &[], &[]);
            let want = reference_kept(&p, &logits, &[], &[]);
            let diff = got.symmetric_difference(&want).count();
            assert!(diff <= 1, "case {case}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn min_p_hand_computed() {
        // probabilities ∝ e^[2, 1, 0, -3]: relative to the max, 1, 0.368, 0.135, 0.0067.
        let logits = [2.0f32, 1.0, 0.0, -3.0];
        let keep = |min_p: f32| {
            let p = SamplingParams {
                temperature: 1.0,
                min_p,
                ..Default::default()
            };
            kept(&mut Sampler::new(p, 0), &logits, &[], &[])
        };
        assert_eq!(keep(0.5), BTreeSet::from([0]));
        assert_eq!(keep(0.3), BTreeSet::from([0, 1]));
        assert_eq!(keep(0.1), BTreeSet::from([0, 1, 2]));
        assert_eq!(keep(0.001), BTreeSet::from([0, 1, 2, 3]));
        assert_eq!(keep(1.0), BTreeSet::from([0]));
        // After temperature 2 the ratios are e^-0.5 = 0.607, e^-1 = 0.368, e^-2.5 = 0.082.
        let p = SamplingParams {
            temperature: 2.0,
            min_p: 0.3,
            ..Default::default()
        };
        assert_eq!(
            kept(&mut Sampler::new(p, 0), &logits, &[], &[]),
            BTreeSet::from([0, 1, 2])
        );
    }

    #[test]
    fn repetition_penalty_hand_computed() {
        // Greedy settings keep the penalised logits in the candidates.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 0);
        let logits = [4.0f32, -1.0, 3.0, 0.0, 1.0];
        // ids 0 (positive), 1 (negative), 3 (zero) seen; 0 twice counts once; 99 ignored.
        assert!(s.candidates(&logits, &[0, 1, 0], &[3, 0, 99]));
        let got: Vec<f32> = s.cand.iter().map(|c| c.1).collect();
        assert_eq!(got, vec![2.0, -2.0, 3.0, 0.0, 1.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_hand_computed() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 0);
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        // Prompt tokens do not count; token 2 generated three times, token 0 once.
        assert!(s.candidates(&logits, &[1, 1, 1], &[2, 0, 2, 2]));
        let got: Vec<f32> = s.cand.iter().map(|c| c.1).collect();
        assert_eq!(got, vec![1.0 - 0.75, 1.0, 1.0 - 0.5 - 0.75, 1.0]);
    }

    #[test]
    fn penalties_match_reference_on_random_histories() {
        let mut rng = Lcg(4);
        for _ in 0..30 {
            let n = 1 + rng.below(300);
            let logits = random_logits(&mut rng, n, 6.0);
            let prompt: Vec<u32> = (0..rng.below(40))
                .map(|_| rng.below(n + 3) as u32)
                .collect();
            let generated: Vec<u32> = (0..rng.below(40))
                .map(|_| rng.below(n + 3) as u32)
                .collect();
            let p = SamplingParams {
                repetition_penalty: 0.5 + 2.0 * rng.unit(),
                presence_penalty: 4.0 * rng.unit() - 2.0,
                frequency_penalty: 4.0 * rng.unit() - 2.0,
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone(), 0);
            assert!(s.candidates(&logits, &prompt, &generated));
            let got: Vec<f32> = s.cand.iter().map(|c| c.1).collect();
            let want = reference_penalised(&p, &logits, &prompt, &generated);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn greedy_applies_penalties_before_argmax() {
        let logits = [3.0f32, 2.5, -1.0];
        let mut plain = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(plain.sample_with_history(&logits, &[0], &[0]), 0);
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        // 3.0 / 1.5 = 2.0 < 2.5.
        assert_eq!(
            Sampler::new(p.clone(), 0).sample_with_history(&logits, &[0], &[]),
            1
        );
        // Without history the penalty has nothing to act on.
        assert_eq!(Sampler::new(p, 0).sample(&logits), 0);
        let p = SamplingParams {
            frequency_penalty: 0.3,
            ..Default::default()
        };
        // 3.0 - 2·0.3 = 2.4 < 2.5; prompt occurrences do not count.
        assert_eq!(
            Sampler::new(p.clone(), 0).sample_with_history(&logits, &[], &[0, 0]),
            1
        );
        assert_eq!(
            Sampler::new(p, 0).sample_with_history(&logits, &[0, 0], &[]),
            0
        );
    }

    #[test]
    fn non_finite_logits_are_never_sampled() {
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 9);
        let logits = [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0];
        for _ in 0..100 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 3);
        }
        // Nothing finite: falls back to argmax without panicking.
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(s.sample(&[]), 0);
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5];
        for &t in &[0.7f32, 1.0, 1.8] {
            let mut s = Sampler::new(params(t), 1234);
            let n = 40_000usize;
            let mut counts = [0usize; 6];
            for _ in 0..n {
                counts[s.sample(&logits) as usize] += 1;
            }
            let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f64> = logits
                .iter()
                .map(|&l| f64::from(((l - max) / t).exp()))
                .collect();
            let z: f64 = e.iter().sum();
            let chi2: f64 = counts
                .iter()
                .zip(&e)
                .map(|(&c, &w)| {
                    let expected = n as f64 * w / z;
                    (c as f64 - expected).powi(2) / expected
                })
                .sum();
            // 5 degrees of freedom: P(χ² > 25) ≈ 1.4e-4.
            assert!(
                chi2 < 25.0,
                "temperature {t}: chi2 {chi2}, counts {counts:?}"
            );
        }
    }

    #[test]
    fn filtered_sampling_follows_renormalised_softmax() {
        // top_k 3 keeps ids 2, 5, 0; their probabilities ∝ e^2, e^1.5, e^1.
        let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 77);
        let n = 30_000usize;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[1] + counts[3] + counts[4], 0);
        let w = [1.0f64.exp(), 2.0f64.exp(), 1.5f64.exp()];
        let z: f64 = w.iter().sum();
        let chi2: f64 = [counts[0], counts[2], counts[5]]
            .iter()
            .zip(&w)
            .map(|(&c, &w)| {
                let e = n as f64 * w / z;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 20.0, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn validate_rejects_out_of_range_settings() {
        let ok = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: Vec::new(),
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut SamplingParams), field: &str, range: &str| {
            let mut p = ok.clone();
            f(&mut p);
            let e = p.validate().expect_err(field);
            assert!(e.contains(field) && e.contains(range), "{e}");
        };
        bad(&|p| p.temperature = -0.1, "temperature", "≥ 0");
        bad(&|p| p.temperature = f32::NAN, "temperature", "≥ 0");
        bad(&|p| p.temperature = f32::INFINITY, "temperature", "≥ 0");
        bad(&|p| p.top_p = 0.0, "top_p", "(0, 1]");
        bad(&|p| p.top_p = 1.01, "top_p", "(0, 1]");
        bad(&|p| p.top_p = f32::NAN, "top_p", "(0, 1]");
        bad(&|p| p.min_p = -0.01, "min_p", "[0, 1]");
        bad(&|p| p.min_p = 1.5, "min_p", "[0, 1]");
        bad(&|p| p.min_p = f32::NAN, "min_p", "[0, 1]");
        bad(&|p| p.repetition_penalty = 0.0, "repetition_penalty", "> 0");
        bad(
            &|p| p.repetition_penalty = -1.0,
            "repetition_penalty",
            "> 0",
        );
        bad(
            &|p| p.repetition_penalty = f32::INFINITY,
            "repetition_penalty",
            "> 0",
        );
        bad(&|p| p.presence_penalty = 2.5, "presence_penalty", "[-2, 2]");
        bad(
            &|p| p.presence_penalty = f32::NAN,
            "presence_penalty",
            "[-2, 2]",
        );
        bad(
            &|p| p.frequency_penalty = -2.01,
            "frequency_penalty",
            "[-2, 2]",
        );
        let mut edge = ok.clone();
        edge.top_p = 1.0;
        edge.min_p = 1.0;
        edge.temperature = 0.0;
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn invalid_settings_do_not_panic() {
        let logits = [1.0f32, 2.0, 0.5];
        for p in [
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: f32::NAN,
                min_p: 5.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                repetition_penalty: f32::NAN,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p, 0);
            let t = s.sample_with_history(&logits, &[0, 1, 2], &[1]);
            assert!(t < 3);
        }
    }
}
