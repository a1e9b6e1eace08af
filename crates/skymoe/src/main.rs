//! The `skymoe` command-line tool.

mod alloc;
mod cmd;

use clap::{Parser, Subcommand};

/// skymoe: Mixture-of-Experts language models — load, inspect, run and generate.
#[derive(Parser)]
#[command(name = "skymoe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The Skywork-MoE recipe in miniature: dense → upcycle → MoE vs dense control, on Shakespeare.
    Demo(cmd::demo::Args),
    /// Reproduce one of the Skywork-MoE report's findings in miniature.
    Experiment(cmd::experiment::Args),
    /// Show a model's architecture, sizes and parameter counts.
    Inspect(cmd::inspect::Args),
    /// Write the logits of a token sequence to a safetensors file.
    Logits(cmd::logits::Args),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd::generate::Args),
    /// Write the loss of a token sequence and every parameter's gradient to a safetensors file.
    Grads(cmd::grads::Args),
    /// Train a model from a TOML run file.
    Train(cmd::train::Args),
    /// Perplexity of a model on a corpus.
    Eval(cmd::eval::Args),
    /// Train a tokenizer (byte-level BPE) on a corpus: `tokenizer train`.
    Tokenizer(cmd::tokenizer::Args),
    /// Plot a training run's metrics and write an HTML report.
    Report(cmd::report::Args),
    /// Choose the parallel layout (TP/EP/EDP/ETP/PP/DP/ZeRO) of an MoE training job on a cluster.
    Plan(cmd::plan::Args),
    /// Turn a dense Llama checkpoint into an MoE (experts start as copies of the dense FFN).
    Upcycle(cmd::upcycle::Args),
    /// Serving throughput of a model (prefill, decode, concurrent requests) and peak memory.
    Bench(cmd::bench::Args),
    /// Write a copy of a model with quantised projections (fp8, int8, q4, f16).
    Quantize(cmd::quantize::Args),
    /// Write the safetensors form of a PyTorch (pytorch_model*.bin) model directory.
    Convert(cmd::convert::Args),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(cmd::serve::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYMOE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    alloc::configure();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Experiment(a) => cmd::experiment::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Grads(a) => cmd::grads::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Tokenizer(a) => cmd::tokenizer::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Upcycle(a) => cmd::upcycle::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// already ends with (typed errors often name their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}
