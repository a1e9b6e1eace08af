//! What constrained decoding costs per token: the time to compute and apply a grammar's token
//! mask, beside the time to sample without one, over generations from random logits.
//!
//! ```sh
//! cargo run --release -p skymoe-serve --example constrained_cost -- [TOKENIZER_OR_MODEL] [TOKENS]
//! ```
//!
//! The tokenizer defaults to the Mixtral test fixture's (320 tokens); pass a model directory
//! or `tokenizer.json` with a real vocabulary. Compare the mask time with a decode step of the
//! model (`skymoe bench`): constrained decoding stays within 10% while the mask takes less
//! than a tenth of a step.
//!
//! Given a model directory, it then serves the model with the engine and measures decode
//! tokens/s end to end with and without a constraint (a JSON string of fixed length, so both
//! generate the same number of tokens), for 1 and 8 concurrent requests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use skymoe_model::sampling::{Sampler, SamplingParams};
use skymoe_model::Tokenizer;
use skymoe_serve::constrained::{ConstraintVocab, Grammar, Step};
use skymoe_serve::engine::{EngineConfig, EngineHandle, GenerationEvent, GenerationRequest};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral")
    });
    let budget: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4000);
    let tok = Tokenizer::from_path(&path)?;
    let n = tok.vocab_size();
    let eos = tok.eos_ids.clone();
    let t0 = Instant::now();
    let vocab = ConstraintVocab::from_tokenizer(&tok, n, &eos)?;
    println!(
        "vocabulary: {n} tokens, prepared in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
            "role": {"enum": ["admin", "user", "guest"]}
        },
        "required": ["name", "age", "tags", "role"],
        "additionalProperties": false
    });
    let params = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    for (label, grammar) in [
        ("json_schema", Grammar::json_schema(schema, true)),
        ("json_object", Grammar::JsonObject),
    ] {
        let t0 = Instant::now();
        let base = vocab.compile(&grammar)?;
        let compile = t0.elapsed();
        let mut rng = StdRng::seed_from_u64(1);
        let (mut masked, mut plain) = (Duration::ZERO, Duration::ZERO);
        let (mut tokens, mut outputs) = (0usize, 0usize);
        while tokens < budget {
            let mut c = base.clone();
            let mut sampler = Sampler::new(params.clone(), outputs as u64);
            outputs += 1;
            for _ in 0..2000 {
                let logits: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
                // Unconstrained: sampling alone.
                let t = Instant::now();
                let _ = sampler.sample(&logits);
                plain += t.elapsed();
                // Constrained: mask, sample, commit.
                let mut l = logits;
                let t = Instant::now();
                let step = c.apply(&mut l)?;
                if step == Step::Finished {
                    masked += t.elapsed();
                    break;
                }
                let mut id = sampler.sample(&l);
                if !c.allows(id)? {
                    id = c.first_allowed()?.unwrap_or(id);
                }
                c.commit(id)?;
                masked += t.elapsed();
                tokens += 1;
                if c.is_finished() || c.is_eos(id) {
                    break;
                }
            }
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / tokens.max(1) as f64;
        println!(
            "{label}: compiled in {:.2} ms; {tokens} tokens in {outputs} outputs; \
             sample alone {:.1} us/token, mask + sample + commit {:.1} us/token \
             (constraint adds {:.1} us/token)",
            compile.as_secs_f64() * 1e3,
            per(plain),
            per(masked),
            per(masked) - per(plain)
        );
    }
    if path.join("config.json").is_file() {
        engine_tokens_per_s(&path)?;
    }
    Ok(())
}

/// Repetitions of each engine measurement.
const ROUNDS: usize = 20;

/// Decode tokens/s of the served model with and without a constraint (`ROUNDS` waves of
/// `batch` concurrent requests).
fn engine_tokens_per_s(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let engine = EngineHandle::load(path, None, EngineConfig::default())?;
    let len = 160.min(engine.context_length().saturating_sub(16) / 2);
    // `"` + `len` characters + `"`: the same length with or without the grammar.
    let schema = json!({"type": "string", "minLength": len, "maxLength": len});
    let constraint = engine
        .constraint_vocab()?
        .compile(&Grammar::json_schema(schema, true))?;
    let prompt = engine.tokenizer().encode_plain("The weather today")?;
    for batch in [1usize, 8] {
        for constrained in [false, true] {
            let t0 = Instant::now();
            let mut tokens = 0;
            for round in 0..ROUNDS {
                let streams = (0..batch)
                    .map(|i| {
                        let req = GenerationRequest {
                            sampling: skymoe_model::sampling::SamplingParams {
                                temperature: 1.0,
                                ..Default::default()
                            },
                            seed: Some((round * batch + i) as u64),
                            ignore_eos: true,
                            constraint: constrained.then(|| constraint.clone()),
                            ..GenerationRequest::greedy(prompt.clone(), len)
                        };
                        engine.submit(req)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                for mut s in streams {
                    while let Some(ev) = s.blocking_next() {
                        match ev {
                            GenerationEvent::Finished { usage, .. } => {
                                tokens += usage.completion_tokens
                            }
                            GenerationEvent::Failed { message } => return Err(message.into()),
                            GenerationEvent::Delta { .. } => {}
                        }
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "engine, {batch} request(s), {}: {tokens} tokens in {:.3} s, {:.0} tokens/s",
                if constrained {
                    "constrained"
                } else {
                    "unconstrained"
                },
                secs,
                tokens as f64 / secs
            );
        }
    }
    Ok(())
}
