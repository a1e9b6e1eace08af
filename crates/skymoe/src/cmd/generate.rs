//! `skymoe generate`: stream a completion of a prompt to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use skymoe_model::sampling::{Sampler, SamplingParams};
use skymoe_model::tokenizer::TextStream;
use skymoe_model::Tokenizer;

/// Arguments of `skymoe generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty on tokens of the prompt and the output (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.prompt.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        ..Default::default()
    };
    if let Err(e) = params.validate() {
        anyhow::bail!("invalid sampling settings: --{}", e.replace('_', "-"));
    }
    let device = super::device()?;
    let (ckpt, model) = super::load_model(&a.model, &device)?;
    let tok = Tokenizer::for_model(&ckpt.path, ckpt.gguf_metadata.as_ref())
        .context("cannot load the tokenizer")?;
    let mut eos = tok.eos_ids.clone();
    eos.extend(model.config.eos_token_ids.iter().copied());
    let prompt = tok.encode_prompt(&a.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let mut sampler = Sampler::new(params, a.seed);
    let mut cache = model.new_cache();
    let mut stream = TextStream::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    write!(out, "{}", a.prompt)?;
    out.flush()?;
    let t0 = Instant::now();
    let logits = model
        .forward_last(&prompt, Some(&mut cache))?
        .to_vec1::<f32>()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut output: Vec<u32> = Vec::with_capacity(a.max_tokens);
    let mut next = sampler.sample_with_history(&logits, &prompt, &output);
    let t1 = Instant::now();
    let mut generated = 0usize;
    let limit = model.config.max_position_embeddings;
    while generated < a.max_tokens {
        if eos.contains(&next) {
            break;
        }
        generated += 1;
        output.push(next);
        if let Some(text) = stream.push(&tok, next)? {
            write!(out, "{text}")?;
            out.flush()?;
        }
        if generated == a.max_tokens || cache.len() + 1 > limit {
            break;
        }
        let logits = model
            .forward_last(&[next], Some(&mut cache))?
            .to_vec1::<f32>()?;
        next = sampler.sample_with_history(&logits, &prompt, &output);
    }
    writeln!(out)?;
    out.flush()?;
    let decode_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | decode: {} tokens, {:.1} tokens/s",
        prompt.len(),
        prompt.len() as f64 / prefill_s.max(1e-9),
        generated,
        generated as f64 / decode_s.max(1e-9)
    );
    Ok(())
}
