//! `skymoe demo`: the Skywork-MoE recipe in miniature, on built-in defaults and the bundled
//! Shakespeare corpus.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use skymoe_train::demo::{run_demo, DemoOptions, DemoSize};

use super::train::ProgressObserver;

/// Arguments of `skymoe demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Output directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Corpus (files or directories); default: the bundled plays in data/shakespeare.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// small (minutes on 2 cores) | medium | large.
    #[arg(long, default_value = "small")]
    size: DemoSize,
    /// Steps of the dense pre-training and of each continued run, e.g. 300,200.
    #[arg(long, value_parser = parse_steps)]
    steps: Option<(u64, u64)>,
    /// Seed.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn parse_steps(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or("expected PRE,CONTINUED, e.g. 300,200")?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("`{a}` is not a step count"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("`{b}` is not a step count"))?;
    if a == 0 || b == 0 {
        return Err("step counts must be at least 1".into());
    }
    Ok((a, b))
}

/// The bundled corpus, looked up beside the working directory and beside the executable's
/// source tree.
pub fn default_corpus() -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from("data/shakespeare"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_dir())
        .context("the bundled corpus data/shakespeare was not found; pass --data DIR")
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let corpus = if a.data.is_empty() {
        vec![default_corpus()?]
    } else {
        a.data.clone()
    };
    let t0 = Instant::now();
    let mut obs = ProgressObserver::new(a.quiet);
    let opts = DemoOptions {
        corpus,
        out: a.out.clone(),
        size: a.size,
        seed: a.seed,
        steps: a.steps,
    };
    let r = run_demo(&opts, &mut obs).context("the demo failed")?;
    drop(obs);
    let val = |s: &skymoe_train::trainer::TrainSummary| {
        s.final_val
            .as_ref()
            .map(|v| (v.val_loss, v.val_ppl))
            .unwrap_or((f64::NAN, f64::NAN))
    };
    let (dv, dp) = val(&r.dense);
    let (mv, mp) = val(&r.moe);
    let (cv, cp) = val(&r.control);
    let ((dt, da), (mt, ma)) = r.params;
    println!();
    println!(
        "Skywork-MoE recipe in miniature ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    println!("| model | parameters (active/token) | steps | validation loss | perplexity | train tokens/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| dense, pre-trained | {:.2}M ({:.2}M) | {} | {dv:.4} | {dp:.2} | {:.0} |",
        dt as f64 / 1e6,
        da as f64 / 1e6,
        r.dense.steps,
        r.dense.tokens_per_s
    );
    println!(
        "| dense control, continued | {:.2}M ({:.2}M) | +{} | {cv:.4} | {cp:.2} | {:.0} |",
        dt as f64 / 1e6,
        da as f64 / 1e6,
        r.control.steps,
        r.control.tokens_per_s
    );
    println!(
        "| MoE 8x top-2, upcycled, continued | {:.2}M ({:.2}M) | +{} | {mv:.4} | {mp:.2} | {:.0} |",
        mt as f64 / 1e6,
        ma as f64 / 1e6,
        r.moe.steps,
        r.moe.tokens_per_s
    );
    println!();
    println!("MoE minus control validation loss: {:+.4}", mv - cv);
    println!("report: {}", r.report.display());
    println!();
    println!(
        "--- sample from the MoE (temperature 0.8, top-k 40) ---\n{}",
        r.samples.0
    );
    println!("--- sample from the dense control ---\n{}", r.samples.1);
    Ok(())
}
