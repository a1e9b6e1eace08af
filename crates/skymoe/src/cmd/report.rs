//! `skymoe report`: plots and an HTML page from a training run's metrics log.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `skymoe report`.
#[derive(clap::Args)]
pub struct Args {
    /// The run directory (holds metrics.jsonl and optionally run.toml).
    run: PathBuf,
    /// Output directory [default: RUN/report].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Label of RUN in a comparison [default: the directory name].
    #[arg(long)]
    label: Option<String>,
    /// Another run to overlay on the loss curves, as LABEL=RUN (repeatable); the comparison is
    /// written to OUT/compare/.
    #[arg(long, value_name = "LABEL=RUN", value_parser = parse_compare)]
    compare: Vec<(String, PathBuf)>,
}

/// Parse `LABEL=RUN`.
fn parse_compare(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((label, run)) if !label.trim().is_empty() && !run.is_empty() => {
            Ok((label.trim().to_string(), PathBuf::from(run)))
        }
        _ => Err(format!("`{s}` is not LABEL=RUN")),
    }
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| skymoe_train::report::default_out_dir(&a.run));
    let report = skymoe_train::report::render_report(&a.run, &out)
        .with_context(|| format!("cannot report on run {}", a.run.display()))?;
    println!("{}", report.index_html.display());
    if !a.compare.is_empty() {
        let label = a.label.clone().unwrap_or_else(|| default_label(&a.run));
        let mut runs = vec![(label, a.run.clone())];
        runs.extend(a.compare.iter().cloned());
        let cmp_dir = out.join("compare");
        let cmp = skymoe_train::report::render_comparison(&runs, &cmp_dir)
            .context("cannot write the comparison")?;
        println!("{}", cmp.index_html.display());
    }
    Ok(())
}

/// The run directory's name (after resolving `.` and `..`), else the path as given.
fn default_label(run: &std::path::Path) -> String {
    run.canonicalize()
        .ok()
        .as_deref()
        .and_then(std::path::Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string())
}
