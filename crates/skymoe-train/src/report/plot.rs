//! Figures (line charts, heatmaps, grids of them) drawn with plotters to PNG and SVG.
//!
//! A [`Figure`] is plain data; [`save`] draws it twice, once per backend, with the embedded
//! Liberation Sans font registered under the family name `sans-serif`.

use std::error::Error;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use super::{write_atomically, ReportError};

/// Font family name under which the embedded font is registered (also written into SVGs).
const FONT: &str = "sans-serif";

/// Liberation Sans Regular (SIL Open Font License 1.1, see `assets/LiberationSans-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/LiberationSans-Regular.ttf");

type DrawResult = Result<(), Box<dyn Error + Send + Sync>>;

/// Register the embedded font with plotters (once per process).
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font)
    }
}

/// How a series is stroked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stroke {
    /// A solid line of the given width.
    Solid(u32),
    /// A thin, pale line (raw values under a smoothed one).
    Faint,
    /// A dashed line of width 2.
    Dashed,
    /// A line of width 2 with a filled circle on every point.
    Markers,
    /// A dashed line of width 2 with a filled circle on every point.
    DashedMarkers,
}

/// One curve of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text; `None` keeps the series out of the legend.
    pub label: Option<String>,
    /// Line colour.
    pub color: RGBColor,
    /// Line style.
    pub stroke: Stroke,
    /// Finite `(x, y)` points in x order.
    pub points: Vec<(f64, f64)>,
}

/// Where a line chart's legend goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Legend {
    /// In the upper-right corner of the plot.
    Inside,
    /// In a column (or several) to the right of the plot.
    Right,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Caption.
    pub title: String,
    /// X-axis description.
    pub x_desc: String,
    /// Y-axis description.
    pub y_desc: String,
    /// Curves, drawn in order.
    pub series: Vec<Series>,
    /// Legend placement.
    pub legend: Legend,
    /// Start the y axis at 0 (when every value is non-negative).
    pub y_from_zero: bool,
}

/// The columns of a heatmap.
#[derive(Debug, Clone)]
pub enum Columns {
    /// Categorical columns, one label each, labels centred under the cells.
    Labels(Vec<String>),
    /// Columns spanning consecutive step ranges: `edges[c]..edges[c + 1]` (one more edge than
    /// columns, increasing); the x axis is a numeric step axis.
    Steps(Vec<i64>),
}

/// A matrix of values drawn as coloured cells with a colour scale (viridis).
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// Caption.
    pub title: String,
    /// X-axis description.
    pub x_desc: String,
    /// Y-axis description.
    pub y_desc: String,
    /// `cells[row][col]`. Non-finite cells are left grey.
    pub cells: Vec<Vec<f64>>,
    /// One label per row.
    pub row_labels: Vec<String>,
    /// Row 0 at the top (a matrix) rather than at the bottom.
    pub top_down: bool,
    /// The columns.
    pub columns: Columns,
    /// Write each cell's value into it (when the cells are large enough).
    pub annotate: bool,
    /// Description of the colour scale.
    pub scale_desc: String,
    /// The colour scale runs from 0 to at least this value.
    pub scale_max_at_least: f64,
    /// A value marked on the colour scale, with its label.
    pub scale_mark: Option<(f64, String)>,
}

/// Something to draw.
#[derive(Debug, Clone)]
pub enum Figure {
    /// A line chart.
    Lines(LineChart),
    /// A heatmap.
    Heatmap(Heatmap),
    /// Panels in a grid under a common title.
    Grid {
        /// Common title.
        title: String,
        /// Panels per row.
        cols: usize,
        /// Size of each panel in pixels.
        panel: (u32, u32),
        /// The panels, row by row.
        panels: Vec<Figure>,
    },
}

const LINE_SIZE: (u32, u32) = (960, 540);
const TITLE_H: u32 = 44;
const COLORBAR_W: u32 = 150;

impl Figure {
    /// Size in pixels.
    pub fn size(&self) -> (u32, u32) {
        match self {
            Figure::Lines(c) => (LINE_SIZE.0 + legend_width(c, LINE_SIZE.1), LINE_SIZE.1),
            Figure::Heatmap(h) => {
                let (cw, ch) = cell_size(h);
                let rows = h.cells.len() as u32;
                let cols = n_cols(h) as u32;
                (
                    (130 + cols * cw + COLORBAR_W).max(520),
                    (TITLE_H + 110 + rows * ch).max(300),
                )
            }
            Figure::Grid {
                cols,
                panel,
                panels,
                ..
            } => {
                let cols = (*cols).clamp(1, panels.len().max(1));
                let rows = panels.len().div_ceil(cols).max(1);
                (panel.0 * cols as u32, TITLE_H + panel.1 * rows as u32)
            }
        }
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        match self {
            Figure::Lines(c) => draw_lines(area, c),
            Figure::Heatmap(h) => draw_heatmap(area, h),
            Figure::Grid {
                title,
                cols,
                panels,
                ..
            } => {
                let cols = (*cols).clamp(1, panels.len().max(1));
                let rows = panels.len().div_ceil(cols).max(1);
                let body = area.titled(title, (FONT, 24))?;
                for (panel, sub) in panels.iter().zip(body.split_evenly((rows, cols))) {
                    panel.draw(&sub)?;
                }
                Ok(())
            }
        }
    }
}

/// Draw `fig` to `out_dir/stem.png` and `out_dir/stem.svg`; returns both paths.
pub fn save(fig: &Figure, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>, ReportError> {
    ensure_font()?;
    let size = fig.size();
    let svg_path = out_dir.join(format!("{stem}.svg"));
    let png_path = out_dir.join(format!("{stem}.png"));
    let plot_err = |path: &Path, e: Box<dyn Error + Send + Sync>| ReportError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw_root(fig, &root).map_err(|e| plot_err(&svg_path, e))?;
    }
    write_atomically(&svg_path, svg.as_bytes())?;

    // The bitmap backend picks the encoder from the extension, so the temporary file ends in .png.
    let tmp = out_dir.join(format!(".{stem}.tmp.png"));
    let drawn = {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        draw_root(fig, &root)
    };
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(plot_err(&png_path, e));
    }
    std::fs::rename(&tmp, &png_path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::Write {
            path: png_path.clone(),
            source,
        }
    })?;
    Ok(vec![png_path, svg_path])
}

fn draw_root<DB: DrawingBackend>(fig: &Figure, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    fig.draw(root)?;
    root.present()?;
    Ok(())
}

/// The i-th of `n` distinct series colours: Tableau 10 for up to ten series, evenly spaced hues
/// beyond.
pub fn series_color(i: usize, n: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    if n <= TAB10.len() {
        let (r, g, b) = TAB10[i % TAB10.len()];
        RGBColor(r, g, b)
    } else {
        let (r, g, b) = HSLColor(i as f64 / n as f64 * 0.9, 0.75, 0.42).rgb();
        RGBColor(r, g, b)
    }
}

fn style(color: RGBColor, stroke: Stroke) -> ShapeStyle {
    match stroke {
        Stroke::Solid(w) => color.stroke_width(w),
        Stroke::Faint => color.mix(0.3).stroke_width(1),
        Stroke::Dashed | Stroke::Markers | Stroke::DashedMarkers => color.stroke_width(2),
    }
}

/// Axis range covering the finite `values`, padded by `pad` of the span on each side, starting
/// at 0 when `from_zero` (for non-negative data); never empty.
fn padded_range(values: impl Iterator<Item = f64>, from_zero: bool, pad: f64) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let (mut lo, mut hi) = if hi > lo {
        let p = (hi - lo) * pad;
        (lo - p, hi + p)
    } else {
        let p = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - p, hi + p)
    };
    if from_zero {
        lo = 0.0;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    lo..hi
}

/// Most tick labels plotters puts on a numeric axis (its default, which the charts keep).
const TICKS: f64 = 11.0;

/// The tick spacing plotters picks for a float axis `lo..hi`: the smallest of 1, 2, 5 × 10^k
/// whose multiples inside the range number at most `TICKS`.
fn tick_step(lo: f64, hi: f64) -> Option<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return None;
    }
    let mut base = 10f64.powf(span.log10().floor() - 2.0);
    for _ in 0..6 {
        for m in [1.0, 2.0, 5.0] {
            let step = base * m;
            let n = 1.0 + ((hi / step).floor() - (lo / step).ceil());
            if n <= TICKS {
                return Some(step);
            }
        }
        base *= 10.0;
    }
    None
}

/// Tick label formatter for an axis spanning `lo..hi`: just enough decimals for the tick
/// spacing, scientific notation for magnitudes below 1e-3 or from `sci_above` on.
fn tick_format(lo: f64, hi: f64, sci_above: f64) -> impl Fn(&f64) -> String {
    let mag = lo.abs().max(hi.abs());
    let sci = mag > 0.0 && (mag < 1e-3 || mag >= sci_above);
    let step = tick_step(lo.min(hi), lo.max(hi));
    let exp10 = |x: f64| x.log10().floor() as i32;
    let decimals = step.map_or(2, |st| (-exp10(st)).clamp(0, 8) as usize);
    let sci_decimals = step.map_or(2, |st| (exp10(mag) - exp10(st)).clamp(0, 6) as usize);
    move |v: &f64| {
        if *v == 0.0 {
            "0".to_string()
        } else if sci {
            format!("{v:.sci_decimals$e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

fn legend_entries(c: &LineChart) -> Vec<(&str, ShapeStyle)> {
    c.series
        .iter()
        .filter_map(|s| {
            s.label
                .as_deref()
                .map(|l| (l, style(s.color, s.stroke).stroke_width(3)))
        })
        .collect()
}

const LEGEND_ROW_H: u32 = 20;

/// Width of the legend column(s) to the right of a chart of height `h` (0 for other legends).
fn legend_width(c: &LineChart, h: u32) -> u32 {
    if c.legend != Legend::Right {
        return 0;
    }
    let entries = legend_entries(c);
    if entries.is_empty() {
        return 0;
    }
    let per_col = ((h.saturating_sub(80)) / LEGEND_ROW_H).max(1) as usize;
    let cols = entries.len().div_ceil(per_col) as u32;
    let chars = entries
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0) as u32;
    cols * (44 + chars * 8)
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &LineChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let lw = legend_width(c, h).min(w / 2);
    let (plot_area, legend_area) = area.split_horizontally(w - lw);
    let xs = || c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let xr = padded_range(xs(), false, 0.0);
    let yr = padded_range(ys(), c.y_from_zero && ys().all(|y| y >= 0.0), 0.05);
    let xfmt = tick_format(xr.start, xr.end, 1e7);
    let yfmt = tick_format(yr.start, yr.end, 1e5);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&c.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(xr, yr)?;
    chart
        .configure_mesh()
        .x_desc(c.x_desc.as_str())
        .y_desc(c.y_desc.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(RGBColor(244, 244, 244))
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .draw()?;
    let inside = c.legend == Legend::Inside;
    for s in &c.series {
        if s.points.is_empty() {
            continue;
        }
        let st = style(s.color, s.stroke);
        if matches!(s.stroke, Stroke::Markers | Stroke::DashedMarkers) {
            chart.draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 4, s.color.filled())),
            )?;
        }
        let anno = match s.stroke {
            Stroke::Dashed | Stroke::DashedMarkers => {
                chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, st))?
            }
            Stroke::Solid(_) | Stroke::Faint | Stroke::Markers => {
                chart.draw_series(LineSeries::new(s.points.iter().copied(), st))?
            }
        };
        if let (true, Some(label)) = (inside, &s.label) {
            let legend_style = st.stroke_width(3);
            anno.label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], legend_style));
        }
    }
    if inside && c.series.iter().any(|s| s.label.is_some()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    if lw > 0 {
        draw_legend_column(&legend_area, &legend_entries(c))?;
    }
    Ok(())
}

fn draw_legend_column<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(&str, ShapeStyle)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let per_col = ((h.saturating_sub(80)) / LEGEND_ROW_H).max(1) as usize;
    let cols = entries.len().div_ceil(per_col).max(1);
    let col_w = (w / cols as u32) as i32;
    for (i, (label, st)) in entries.iter().enumerate() {
        let x = 6 + (i / per_col) as i32 * col_w;
        let y = 50 + (i % per_col) as i32 * LEGEND_ROW_H as i32;
        area.draw(&PathElement::new(vec![(x, y), (x + 24, y)], *st))?;
        let text = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(label.to_string(), (x + 30, y), text))?;
    }
    Ok(())
}

fn n_cols(h: &Heatmap) -> usize {
    h.cells.iter().map(Vec::len).max().unwrap_or(0).max(1)
}

/// Cell size in pixels: large for small matrices, shrinking (down to a few pixels) for big ones.
fn cell_size(h: &Heatmap) -> (u32, u32) {
    let rows = h.cells.len().max(1) as u32;
    let cols = n_cols(h) as u32;
    ((900 / cols).clamp(3, 110), (560 / rows).clamp(6, 90))
}

/// Viridis colour of `t` in [0, 1] (clamped; non-finite values give the low end).
fn viridis(t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ViridisRGB::get_color(t)
}

fn draw_heatmap<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, h: &Heatmap) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, _) = area.dim_in_pixel();
    let (main, bar) = area.split_horizontally(w.saturating_sub(COLORBAR_W));
    let rows = h.cells.len().max(1);
    let cols = n_cols(h);
    let finite = || h.cells.iter().flatten().copied().filter(|v| v.is_finite());
    let vmin = finite().fold(f64::INFINITY, f64::min).min(0.0);
    let mut vmax = finite()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(h.scale_max_at_least);
    if vmax.is_nan() || vmax <= vmin {
        vmax = vmin + 1.0;
    }
    // Column c spans x_edge(c)..x_edge(c + 1).
    let edges: Vec<i64> = match &h.columns {
        Columns::Steps(e) if e.len() == cols + 1 => e.clone(),
        _ => (0..=cols as i64).collect(),
    };
    let categorical = !matches!(&h.columns, Columns::Steps(e) if e.len() == cols + 1);
    let (x0, x1) = (edges[0], edges[cols].max(edges[0] + 1));

    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(x0..x1, 0..rows as i32)?;
    let (pw, ph) = chart.plotting_area().dim_in_pixel();
    let cell_w = pw as f64 / cols as f64;
    let cell_h = ph as f64 / rows as f64;
    // Plot row of data row r (row 0 at the top when `top_down`).
    let y_of = |r: usize| {
        if h.top_down {
            (rows - 1 - r) as i32
        } else {
            r as i32
        }
    };
    let col_label = |v: &i64| match &h.columns {
        Columns::Labels(labels) if categorical => usize::try_from(*v)
            .ok()
            .and_then(|i| labels.get(i))
            .cloned()
            .unwrap_or_default(),
        _ => v.to_string(),
    };
    let row_label = |v: &i32| {
        let r = if h.top_down { rows as i32 - 1 - *v } else { *v };
        usize::try_from(r)
            .ok()
            .and_then(|i| h.row_labels.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_mesh()
        .x_desc(h.x_desc.as_str())
        .y_desc(h.y_desc.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .y_labels(rows.min(24) + 1)
        .y_label_offset(-(cell_h / 2.0) as i32)
        .x_label_formatter(&col_label)
        .y_label_formatter(&row_label);
    if categorical {
        mesh.x_labels(cols.min(16) + 1)
            .x_label_offset((cell_w / 2.0) as i32);
    } else {
        mesh.x_labels(10);
    }
    mesh.draw()?;
    let norm = |v: f64| (v - vmin) / (vmax - vmin);
    chart.draw_series(h.cells.iter().enumerate().flat_map(|(r, row)| {
        let y = y_of(r);
        let edges = &edges;
        row.iter().enumerate().map(move |(c, &v)| {
            let color = if v.is_finite() {
                viridis(norm(v))
            } else {
                RGBColor(200, 200, 200)
            };
            Rectangle::new([(edges[c], y), (edges[c + 1], y + 1)], color.filled())
        })
    }))?;
    if h.annotate && cell_w >= 44.0 && cell_h >= 20.0 {
        let size = (cell_h * 0.4).clamp(11.0, 16.0);
        let base = main.get_base_pixel();
        for (r, row) in h.cells.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let color = if norm(v) > 0.6 { BLACK } else { WHITE };
                let (px, py) = chart.backend_coord(&(edges[c], y_of(r) + 1));
                let center = (
                    px + (cell_w / 2.0) as i32 - base.0,
                    py + (cell_h / 2.0) as i32 - base.1,
                );
                let style = TextStyle::from((FONT, size).into_font())
                    .color(&color)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                main.draw(&Text::new(format!("{v:.3}"), center, style))?;
            }
        }
    }
    draw_colorbar(&bar, vmin, vmax, &h.scale_desc, h.scale_mark.as_ref())
}

fn draw_colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    vmin: f64,
    vmax: f64,
    desc: &str,
    mark: Option<&(f64, String)>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let fmt = tick_format(vmin, vmax, 1e5);
    let chart = ChartBuilder::on(area)
        .margin_top(46)
        .margin_bottom(60)
        .margin_left(34)
        .margin_right(4)
        .y_label_area_size(0)
        .right_y_label_area_size(72)
        .build_cartesian_2d(0f64..1f64, vmin..vmax)?;
    let mut chart = chart.set_secondary_coord(0f64..1f64, vmin..vmax);
    const STEPS: usize = 128;
    let dv = (vmax - vmin) / STEPS as f64;
    chart.draw_series((0..STEPS).map(|i| {
        let lo = vmin + dv * i as f64;
        Rectangle::new(
            [(0.0, lo), (1.0, lo + dv)],
            viridis((i as f64 + 0.5) / STEPS as f64).filled(),
        )
    }))?;
    if let Some((v, label)) = mark.filter(|(v, _)| (vmin..=vmax).contains(v)) {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.15, *v), (1.15, *v)],
            BLACK.stroke_width(2),
        )))?;
        let text = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        let (x, y) = chart.backend_coord(&(0.0, *v));
        let base = area.get_base_pixel();
        area.draw(&Text::new(
            label.clone(),
            (x - base.0 - 4, y - base.1),
            text,
        ))?;
    }
    chart
        .configure_secondary_axes()
        .y_desc(desc)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .y_label_formatter(&fmt)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_never_empty() {
        assert_eq!(padded_range([].into_iter(), false, 0.05), 0.0..1.0);
        let r = padded_range([3.0].into_iter(), false, 0.05);
        assert!(r.start < 3.0 && r.end > 3.0);
        let r = padded_range([0.0, 1.0].into_iter(), true, 0.05);
        assert_eq!(r.start, 0.0);
        let r = padded_range([f64::NAN, 2.0, f64::INFINITY].into_iter(), false, 0.05);
        assert!(r.start < 2.0 && r.end > 2.0 && r.end.is_finite());
    }

    #[test]
    fn tick_labels_suit_the_scale() {
        let f = tick_format(0.0, 3e-4, 1e5);
        assert_eq!(f(&3e-4), "3.0e-4");
        assert_eq!(f(&2.5e-4), "2.5e-4");
        let f = tick_format(2.0, 4.0, 1e5);
        assert_eq!(f(&2.5), "2.5");
        let f = tick_format(0.19, 0.38, 1e5);
        assert_eq!(f(&0.25), "0.25");
        assert_eq!(tick_step(0.19, 0.38), Some(0.02));
        // 0.05..0.55 holds 11 multiples of 0.05, as many labels as plotters allows.
        let f = tick_format(0.001, 0.551, 1e5);
        assert_eq!(f(&0.15), "0.15");
        let f = tick_format(0.0, 1000.0, 1e7);
        assert_eq!(f(&500.0), "500");
    }
}
