//! `skymoe report`: plots and an HTML page from a run's metrics log.
//!
//! A run directory holds `metrics.jsonl` (see [`metrics`] for the format) and optionally
//! `run.toml`. [`render_report`] writes, into an output directory (by default
//! [`default_out_dir`], `RUN/report/`):
//!
//! - `loss.{png,svg}`: training loss (and cross-entropy when it differs) against step, with an
//!   EMA line over the raw values for long runs and the validation loss overlaid;
//! - `lr_gradnorm.{png,svg}`: learning rate and gradient norm against step;
//! - for an MoE run, `drop_rate`, `alpha` (one line per MoE layer), `expert_load` (a layer ×
//!   expert heatmap of the load averaged over the last 10% of steps) and `expert_load_time`
//!   (each expert's load over time, one panel per layer);
//! - `index.html`: a self-contained page with a summary table, the plots and `run.toml`.
//!
//! [`render_comparison`] overlays the training and validation loss of several runs.
//!
//! Text in the PNGs is drawn with an embedded Liberation Sans (SIL Open Font License), which
//! this module registers with plotters under the family name `sans-serif`.

mod error;
mod figures;
mod html;
pub mod metrics;
mod plot;
mod stats;

use std::path::{Path, PathBuf};

pub use error::ReportError;
pub use metrics::{RunMetrics, TrainRecord, ValRecord, METRICS_FILE};
pub use stats::{BestVal, RunSummary};

/// Name of the optional run configuration shown on the report page.
pub const RUN_CONFIG_FILE: &str = "run.toml";

/// Name of the report page inside the output directory.
pub const INDEX_FILE: &str = "index.html";

/// The default output directory of a run's report: `RUN/report`.
pub fn default_out_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("report")
}

/// What [`render_report`] wrote.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The HTML page.
    pub index_html: PathBuf,
    /// Every file written (images and the page).
    pub files: Vec<PathBuf>,
    /// The run's headline numbers.
    pub summary: RunSummary,
    /// Tolerated problems in the metrics log (also logged with `tracing::warn!`).
    pub warnings: Vec<String>,
}

/// What [`render_comparison`] wrote.
#[derive(Debug, Clone)]
pub struct ComparisonReport {
    /// The HTML page.
    pub index_html: PathBuf,
    /// Every file written (images and the page).
    pub files: Vec<PathBuf>,
    /// Each run's label and headline numbers, in the order given.
    pub summaries: Vec<(String, RunSummary)>,
    /// Tolerated problems in the metrics logs.
    pub warnings: Vec<String>,
}

/// Read `run_dir/metrics.jsonl` (and `run.toml` if present) and write the plots and
/// `index.html` into `out_dir`, creating it if needed.
pub fn render_report(run_dir: &Path, out_dir: &Path) -> Result<RunReport, ReportError> {
    let metrics = RunMetrics::load(run_dir)?;
    let summary = RunSummary::of(&metrics);
    let run_toml = read_run_config(run_dir)?;
    create_dir(out_dir)?;

    let figs = figures::run_figures(&metrics, &summary);
    let mut files = Vec::new();
    for f in &figs {
        files.extend(plot::save(&f.figure, out_dir, f.stem)?);
    }
    let name = run_name(run_dir);
    let page = html::run_page(&html::RunPage {
        name: &name,
        run_dir: &run_dir.display().to_string(),
        summary: &summary,
        moe: metrics.is_moe(),
        figures: &figs,
        run_toml: run_toml.as_deref(),
        warnings: &metrics.warnings,
    });
    let index_html = out_dir.join(INDEX_FILE);
    write_atomically(&index_html, page.as_bytes())?;
    files.push(index_html.clone());
    Ok(RunReport {
        index_html,
        files,
        summary,
        warnings: metrics.warnings,
    })
}

/// Overlay the training and validation loss of several runs, each given as
/// `(label, run directory)`, and write `loss.{png,svg}`, `val_loss.{png,svg}` (when any run
/// has validation records) and `index.html` into `out_dir`.
pub fn render_comparison<L, P>(
    runs: &[(L, P)],
    out_dir: &Path,
) -> Result<ComparisonReport, ReportError>
where
    L: AsRef<str>,
    P: AsRef<Path>,
{
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    let mut loaded = Vec::with_capacity(runs.len());
    let mut rows = Vec::with_capacity(runs.len());
    let mut warnings = Vec::new();
    for (label, dir) in runs {
        let (label, dir) = (label.as_ref().to_string(), dir.as_ref());
        let metrics = RunMetrics::load(dir)?;
        warnings.extend(metrics.warnings.iter().map(|w| format!("{label}: {w}")));
        rows.push((
            label.clone(),
            dir.display().to_string(),
            RunSummary::of(&metrics),
        ));
        loaded.push((label, metrics));
    }
    create_dir(out_dir)?;
    let figs = figures::comparison_figures(&loaded);
    let mut files = Vec::new();
    for f in &figs {
        files.extend(plot::save(&f.figure, out_dir, f.stem)?);
    }
    let page = html::comparison_page(&rows, &figs, &warnings);
    let index_html = out_dir.join(INDEX_FILE);
    write_atomically(&index_html, page.as_bytes())?;
    files.push(index_html.clone());
    Ok(ComparisonReport {
        index_html,
        files,
        summaries: rows.into_iter().map(|(l, _, s)| (l, s)).collect(),
        warnings,
    })
}

/// The last component of the run directory (after resolving `.` and `..`), else the path.
fn run_name(run_dir: &Path) -> String {
    run_dir
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string())
}

fn read_run_config(run_dir: &Path) -> Result<Option<String>, ReportError> {
    let path = run_dir.join(RUN_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|source| ReportError::Read { path, source })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Write `bytes` to a temporary file beside `path` and rename it into place, so an interrupted
/// run never leaves a half-written file under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Draw a simple line chart (one solid line per labelled series, legend on the right) to
/// `out_dir/stem.png` and `out_dir/stem.svg`; returns both paths. Used by experiments to plot
/// quantities that are not in a run's metrics log.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    out_dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(out_dir).map_err(|e| ReportError::Write {
        path: out_dir.to_path_buf(),
        source: e,
    })?;
    let n = series.len();
    let chart = plot::LineChart {
        title: title.to_string(),
        x_desc: x_desc.to_string(),
        y_desc: y_desc.to_string(),
        series: series
            .iter()
            .enumerate()
            .map(|(i, (label, points))| plot::Series {
                label: Some(label.clone()),
                color: plot::series_color(i, n),
                stroke: if points.len() <= 12 {
                    plot::Stroke::Markers
                } else {
                    plot::Stroke::Solid(2)
                },
                points: stats::finite(points.iter().copied()),
            })
            .collect(),
        legend: plot::Legend::Right,
        y_from_zero: false,
    };
    plot::save(&plot::Figure::Lines(chart), out_dir, stem)
}
