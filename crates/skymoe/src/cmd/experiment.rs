//! `skymoe experiment NAME`: the Skywork-MoE report's findings in miniature (see
//! docs/EXPERIMENTS.md).

use std::path::PathBuf;

use anyhow::Context;
use skymoe_train::demo::DemoSize;
use skymoe_train::experiments::{run_experiment, Experiment, ExperimentOptions};

use super::train::ProgressObserver;

/// Arguments of `skymoe experiment`.
#[derive(clap::Args)]
pub struct Args {
    /// gating-norm | adaptive-aux | upcycle-vs-scratch | expert-similarity | balancing | all
    name: String,
    /// Output directory (each experiment writes OUT/NAME/).
    #[arg(long, default_value = "runs/experiments")]
    out: PathBuf,
    /// Corpus; default: the bundled plays in data/shakespeare.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// small (minutes each on 2 cores) | medium | large.
    #[arg(long, default_value = "small")]
    size: DemoSize,
    /// First seed.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Seeds per variant (SEED, SEED+1, …); tables report the mean and the min–max range.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Training steps per run (default: the size's budget).
    #[arg(long)]
    steps: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let list: Vec<Experiment> = if a.name == "all" {
        Experiment::ALL.to_vec()
    } else {
        vec![a.name.parse().map_err(anyhow::Error::msg)?]
    };
    let corpus = if a.data.is_empty() {
        vec![super::demo::default_corpus()?]
    } else {
        a.data.clone()
    };
    let opts = ExperimentOptions {
        corpus,
        out: a.out.clone(),
        size: a.size,
        seed: a.seed,
        seeds: a.seeds as usize,
        steps: a.steps,
    };
    for exp in list {
        let mut obs = ProgressObserver::new(a.quiet);
        let r = run_experiment(exp, &opts, &mut obs)
            .with_context(|| format!("experiment {} failed", exp.name()))?;
        drop(obs);
        println!(
            "## {}\n\n{}\nresults: {}\n",
            exp.name(),
            r.table,
            r.results.display()
        );
    }
    Ok(())
}
