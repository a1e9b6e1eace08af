//! The report's figures, built from a run's metrics (no drawing here, see `plot`).

use plotters::style::RGBColor;

use super::metrics::{RunMetrics, TrainRecord};
use super::plot::{series_color, Columns, Figure, Heatmap, Legend, LineChart, Series, Stroke};
use super::stats::{
    decimate, ema, ema_span, finite, RunSummary, MAX_PLOT_POINTS, SMOOTH_MIN_RECORDS,
};

/// Above this many experts, per-expert load over time is drawn as a heatmap instead of lines.
const MAX_EXPERT_LINES: usize = 16;
/// Columns (time buckets) of the expert-load-over-time heatmap.
const TIME_BUCKETS: usize = 100;

const GREY: RGBColor = RGBColor(110, 110, 110);
const VAL_COLOR: RGBColor = RGBColor(214, 39, 40);

/// A figure with the file stem it is saved under and the text the HTML page shows with it.
pub struct NamedFigure {
    /// File stem (`loss` → `loss.png`, `loss.svg`).
    pub stem: &'static str,
    /// Heading on the HTML page.
    pub heading: &'static str,
    /// Caption on the HTML page.
    pub caption: String,
    /// The figure.
    pub figure: Figure,
}

/// `(step, value)` of the finite values of one metric, in step order.
fn curve(m: &RunMetrics, f: impl Fn(&TrainRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    finite(
        m.train
            .iter()
            .map(|r| (r.step as f64, f(r).unwrap_or(f64::NAN))),
    )
}

/// The EMA of a curve (same x values).
fn smooth(points: &[(f64, f64)], span: f64) -> Vec<(f64, f64)> {
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    finite(points.iter().map(|p| p.0).zip(ema(&ys, span)))
}

fn series(label: Option<String>, color: RGBColor, stroke: Stroke, points: &[(f64, f64)]) -> Series {
    Series {
        label,
        color,
        stroke,
        points: decimate(points, MAX_PLOT_POINTS),
    }
}

/// Smoothing for a run: `Some(span)` when it has enough records to be worth smoothing.
fn smoothing(m: &RunMetrics) -> Option<f64> {
    (m.train.len() >= SMOOTH_MIN_RECORDS).then(|| ema_span(m.train.len()))
}

/// Raw curve (pale when smoothed) plus its EMA when the run is long enough.
fn raw_and_smoothed(
    name: &str,
    color: RGBColor,
    points: &[(f64, f64)],
    span: Option<f64>,
) -> Vec<Series> {
    match span {
        Some(span) => vec![
            series(Some(format!("{name} (raw)")), color, Stroke::Faint, points),
            series(
                Some(format!("{name} (EMA, span {span:.0})")),
                color,
                Stroke::Solid(2),
                &smooth(points, span),
            ),
        ],
        None => vec![series(
            Some(name.to_string()),
            color,
            Stroke::Solid(2),
            points,
        )],
    }
}

fn ema_suffix(span: Option<f64>) -> String {
    span.map(|s| format!(" (EMA, span {s:.0})"))
        .unwrap_or_default()
}

/// Whether the logged cross-entropy differs from the total loss anywhere.
fn ce_differs(m: &RunMetrics) -> bool {
    m.train.iter().any(|r| match r.ce {
        Some(ce) if ce.is_finite() && r.loss.is_finite() => {
            (ce - r.loss).abs() > 1e-6 * r.loss.abs().max(1.0)
        }
        _ => false,
    })
}

fn val_curve(m: &RunMetrics) -> Vec<(f64, f64)> {
    finite(m.val.iter().map(|v| (v.step as f64, v.val_loss)))
}

/// Every figure of a single-run report; routing figures only for an MoE run.
pub fn run_figures(m: &RunMetrics, s: &RunSummary) -> Vec<NamedFigure> {
    let span = smoothing(m);
    let mut figs = vec![loss_figure(m, span), lr_gradnorm_figure(m, span)];
    let logged = |f: fn(&TrainRecord) -> bool| m.train.iter().any(f);
    if logged(|r| !r.drop_rate.is_empty()) {
        figs.push(per_layer_figure(
            m,
            span,
            "drop_rate",
            "Token drop rate",
            "Token drop rate per MoE layer",
            "fraction of tokens dropped",
            |r, l| r.drop_rate.get(l).copied(),
        ));
    }
    if logged(|r| !r.alpha.is_empty()) {
        figs.push(per_layer_figure(
            m,
            None,
            "alpha",
            "Auxiliary-loss coefficient α",
            "Adaptive aux-loss coefficient α per MoE layer",
            "α",
            |r, l| r.alpha.get(l).copied(),
        ));
    }
    if logged(|r| !r.expert_load.is_empty()) {
        figs.push(expert_load_figure(m, s));
        figs.push(expert_load_time_figure(m, span));
    }
    figs
}

fn loss_figure(m: &RunMetrics, span: Option<f64>) -> NamedFigure {
    let mut series_list = raw_and_smoothed(
        "train loss",
        series_color(0, 10),
        &curve(m, |r| Some(r.loss)),
        span,
    );
    let differs = ce_differs(m);
    if differs {
        let ce = curve(m, |r| r.ce);
        let (ce, suffix) = match span {
            Some(span) => (smooth(&ce, span), ema_suffix(Some(span))),
            None => (ce, String::new()),
        };
        series_list.push(series(
            Some(format!("cross-entropy{suffix}")),
            series_color(2, 10),
            Stroke::Dashed,
            &ce,
        ));
    }
    let val = val_curve(m);
    if !val.is_empty() {
        series_list.push(series(
            Some("validation loss".into()),
            VAL_COLOR,
            Stroke::Markers,
            &val,
        ));
    }
    let mut caption = String::from("Training loss");
    if differs {
        caption.push_str(" and its cross-entropy part (dashed green)");
    }
    if let Some(span) = span {
        caption.push_str(&format!(
            " per step (pale) with an exponential moving average (span {span:.0} steps)"
        ));
    } else {
        caption.push_str(" per step");
    }
    if !val.is_empty() {
        caption.push_str("; validation loss in red");
    }
    caption.push('.');
    NamedFigure {
        stem: "loss",
        heading: "Loss",
        caption,
        figure: Figure::Lines(LineChart {
            title: "Loss".into(),
            x_desc: "step".into(),
            y_desc: "loss (nats/token)".into(),
            series: series_list,
            legend: Legend::Inside,
            y_from_zero: false,
        }),
    }
}

fn lr_gradnorm_figure(m: &RunMetrics, span: Option<f64>) -> NamedFigure {
    let lr = LineChart {
        title: "Learning rate".into(),
        x_desc: "step".into(),
        y_desc: "learning rate".into(),
        series: vec![series(
            None,
            series_color(0, 10),
            Stroke::Solid(2),
            &curve(m, |r| r.lr),
        )],
        legend: Legend::Inside,
        y_from_zero: true,
    };
    let grad = LineChart {
        title: "Gradient norm".into(),
        x_desc: "step".into(),
        y_desc: "global gradient norm".into(),
        series: raw_and_smoothed(
            "grad norm",
            series_color(1, 10),
            &curve(m, |r| r.grad_norm),
            span,
        ),
        legend: Legend::Inside,
        y_from_zero: true,
    };
    NamedFigure {
        stem: "lr_gradnorm",
        heading: "Learning rate and gradient norm",
        caption: "Learning-rate schedule (top) and global gradient norm (bottom).".into(),
        figure: Figure::Grid {
            title: "Learning rate and gradient norm".into(),
            cols: 1,
            panel: (960, 380),
            panels: vec![Figure::Lines(lr), Figure::Lines(grad)],
        },
    }
}

/// One line per MoE layer of a per-layer metric (smoothed when `span` is given).
#[allow(clippy::too_many_arguments)]
fn per_layer_figure(
    m: &RunMetrics,
    span: Option<f64>,
    stem: &'static str,
    heading: &'static str,
    title: &str,
    y_desc: &str,
    get: impl Fn(&TrainRecord, usize) -> Option<f64> + Copy,
) -> NamedFigure {
    let layers = m.moe_layers();
    let series_list = (0..layers)
        .map(|l| {
            let raw = curve(m, |r| get(r, l));
            let pts = match span {
                Some(span) => smooth(&raw, span),
                None => raw,
            };
            series(
                Some(format!("MoE layer {l}")),
                series_color(l, layers),
                Stroke::Solid(2),
                &pts,
            )
        })
        .collect();
    let suffix = ema_suffix(span);
    NamedFigure {
        stem,
        heading,
        caption: format!("{title}{suffix}."),
        figure: Figure::Lines(LineChart {
            title: format!("{title}{suffix}"),
            x_desc: "step".into(),
            y_desc: y_desc.into(),
            series: series_list,
            legend: Legend::Right,
            y_from_zero: true,
        }),
    }
}

fn expert_load_figure(m: &RunMetrics, s: &RunSummary) -> NamedFigure {
    let n = m.train.len();
    let k = s.late_records;
    let experts = s.late_load.iter().map(Vec::len).max().unwrap_or(0);
    let uniform = if experts > 0 {
        format!(
            "; the colour scale runs from 0 to at least twice the uniform load 1/E = 1/{experts} = {:.3}, \
             marked on the scale",
            1.0 / experts as f64
        )
    } else {
        String::new()
    };
    NamedFigure {
        stem: "expert_load",
        heading: "Expert load",
        caption: format!(
            "Fraction of each MoE layer's routed assignments that went to each expert, averaged over \
             the last {k} of {n} training records{uniform}."
        ),
        figure: Figure::Heatmap(Heatmap {
            title: format!("Expert load, mean of the last {k} of {n} steps"),
            x_desc: "expert".into(),
            y_desc: "MoE layer".into(),
            cells: s.late_load.clone(),
            row_labels: (0..s.late_load.len()).map(|l| l.to_string()).collect(),
            top_down: true,
            columns: Columns::Labels((0..experts).map(|e| e.to_string()).collect()),
            annotate: true,
            scale_desc: "fraction of assignments".into(),
            scale_max_at_least: uniform_scale_max(experts),
            scale_mark: uniform_mark(experts),
        }),
    }
}

fn expert_load_time_figure(m: &RunMetrics, span: Option<f64>) -> NamedFigure {
    let per_layer = m.experts_per_layer();
    let layers = per_layer.len();
    let experts = per_layer.iter().copied().max().unwrap_or(0);
    let as_lines = experts <= MAX_EXPERT_LINES;
    let panels: Vec<Figure> = (0..layers)
        .map(|l| {
            let n_e = per_layer[l];
            if as_lines {
                expert_lines_panel(m, span, l, n_e)
            } else {
                expert_time_heatmap_panel(m, l, n_e)
            }
        })
        .collect();
    let (caption, panel) = if as_lines {
        (
            format!(
                "Load of each expert over time, one panel per MoE layer{}; the dashed grey line \
                 is the uniform load 1/E.",
                ema_suffix(span)
            ),
            (780, 400),
        )
    } else {
        (
            format!(
                "Load of each expert over time, one panel per MoE layer: rows are experts, \
                 columns are up to {TIME_BUCKETS} consecutive groups of steps (mean load per \
                 group); the colour scale is centred on the uniform load 1/E."
            ),
            (780, 440),
        )
    };
    NamedFigure {
        stem: "expert_load_time",
        heading: "Expert load over time",
        caption,
        figure: Figure::Grid {
            title: format!(
                "Expert load over time{}",
                ema_suffix(span.filter(|_| as_lines))
            ),
            cols: if layers > 1 { 2 } else { 1 },
            panel,
            panels,
        },
    }
}

fn expert_lines_panel(m: &RunMetrics, span: Option<f64>, layer: usize, n_e: usize) -> Figure {
    let mut series_list: Vec<Series> = (0..n_e)
        .map(|e| {
            let raw = curve(m, |r| {
                r.expert_load.get(layer).and_then(|x| x.get(e)).copied()
            });
            let pts = match span {
                Some(span) => smooth(&raw, span),
                None => raw,
            };
            series(
                Some(format!("expert {e}")),
                series_color(e, n_e),
                Stroke::Solid(2),
                &pts,
            )
        })
        .collect();
    if n_e > 0 {
        let (x0, x1) = (
            m.train.first().map_or(0.0, |r| r.step as f64),
            m.train.last().map_or(0.0, |r| r.step as f64),
        );
        let u = 1.0 / n_e as f64;
        series_list.push(series(
            Some("uniform 1/E".into()),
            GREY,
            Stroke::Dashed,
            &[(x0, u), (x1, u)],
        ));
    }
    Figure::Lines(LineChart {
        title: format!("MoE layer {layer}"),
        x_desc: "step".into(),
        y_desc: "fraction of assignments".into(),
        series: series_list,
        legend: Legend::Right,
        y_from_zero: false,
    })
}

fn expert_time_heatmap_panel(m: &RunMetrics, layer: usize, n_e: usize) -> Figure {
    let n = m.train.len();
    let buckets = n.clamp(1, TIME_BUCKETS);
    let size = n.div_ceil(buckets).max(1);
    let chunks: Vec<&[TrainRecord]> = m.train.chunks(size).collect();
    let cells =
        (0..n_e)
            .map(|e| {
                chunks
                    .iter()
                    .map(|c| {
                        super::stats::mean(c.iter().filter_map(|r| {
                            r.expert_load.get(layer).and_then(|x| x.get(e)).copied()
                        }))
                        .unwrap_or(f64::NAN)
                    })
                    .collect()
            })
            .collect();
    let mut edges: Vec<i64> = chunks
        .iter()
        .map(|c| c.first().map_or(0, |r| step_i64(r.step)))
        .collect();
    edges.push(
        m.train
            .last()
            .map_or(0, |r| step_i64(r.step).saturating_add(1)),
    );
    Figure::Heatmap(Heatmap {
        title: format!("MoE layer {layer}"),
        x_desc: "step".into(),
        y_desc: "expert".into(),
        cells,
        row_labels: (0..n_e).map(|e| e.to_string()).collect(),
        top_down: false,
        columns: Columns::Steps(edges),
        annotate: false,
        scale_desc: "fraction of assignments".into(),
        scale_max_at_least: uniform_scale_max(n_e),
        scale_mark: uniform_mark(n_e),
    })
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX / 2)
}

/// Load colour scales run to at least twice the uniform load, so a balanced layer sits in the
/// middle of the scale.
fn uniform_scale_max(experts: usize) -> f64 {
    if experts > 0 {
        2.0 / experts as f64
    } else {
        0.0
    }
}

fn uniform_mark(experts: usize) -> Option<(f64, String)> {
    (experts > 0).then(|| (1.0 / experts as f64, "1/E".to_string()))
}

/// The figures of a comparison: train and validation loss of every run on one plot, and
/// validation loss alone when any run has it.
pub fn comparison_figures(runs: &[(String, RunMetrics)]) -> Vec<NamedFigure> {
    let n = runs.len();
    let mut both = Vec::new();
    let mut val_only = Vec::new();
    for (i, (label, m)) in runs.iter().enumerate() {
        let color = series_color(i, n);
        let span = smoothing(m);
        let train = curve(m, |r| Some(r.loss));
        let (train, suffix) = match span {
            Some(span) => (smooth(&train, span), format!(" (EMA, span {span:.0})")),
            None => (train, String::new()),
        };
        both.push(series(
            Some(format!("{label}: train{suffix}")),
            color,
            Stroke::Solid(2),
            &train,
        ));
        let val = val_curve(m);
        if !val.is_empty() {
            both.push(series(
                Some(format!("{label}: validation")),
                color,
                Stroke::DashedMarkers,
                &val,
            ));
            val_only.push(series(Some(label.clone()), color, Stroke::Markers, &val));
        }
    }
    let mut figs = vec![NamedFigure {
        stem: "loss",
        heading: "Loss",
        caption: "Training loss (solid; smoothed for long runs) and validation loss (dashed, \
                  with points) of every run."
            .into(),
        figure: Figure::Lines(LineChart {
            title: "Loss: training (solid) and validation (dashed)".into(),
            x_desc: "step".into(),
            y_desc: "loss (nats/token)".into(),
            series: both,
            legend: Legend::Right,
            y_from_zero: false,
        }),
    }];
    if !val_only.is_empty() {
        figs.push(NamedFigure {
            stem: "val_loss",
            heading: "Validation loss",
            caption: "Validation loss of every run that has validation records.".into(),
            figure: Figure::Lines(LineChart {
                title: "Validation loss".into(),
                x_desc: "step".into(),
                y_desc: "validation loss (nats/token)".into(),
                series: val_only,
                legend: Legend::Inside,
                y_from_zero: false,
            }),
        });
    }
    figs
}
