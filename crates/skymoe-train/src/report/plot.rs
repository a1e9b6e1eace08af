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
    /// Start the y axis at 0 when every value is non-negative.
    pub y_from_zero: bool,
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
    /// `cells[row][col]`; row 0 is drawn at the top. Non-finite cells are left grey.
    pub cells: Vec<Vec<f64>>,
    /// One label per row.
    pub row_labels: Vec<String>,
    /// One label per column.
    pub col_labels: Vec<String>,
    /// Write each cell's value into it (when the cells are large enough).
    pub annotate: bool,
    /// Description of the colour scale.
    pub scale_desc: String,
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
const COLORBAR_W: u32 = 120;

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

/// Axis range covering the finite `values`, padded by `pad` of the span on each side (from 0
/// when `from_zero`); never empty.
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
    if from_zero && lo < 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    lo..hi
}

/// Tick label formatter for an axis spanning `lo..hi`: fixed decimals suited to the tick
/// spacing, scientific notation for very small or large magnitudes.
fn tick_format(lo: f64, hi: f64, sci_above: f64) -> impl Fn(&f64) -> String {
    let mag = lo.abs().max(hi.abs());
    let step = (hi - lo).abs() / 8.0;
    let sci = mag > 0.0 && (mag < 1e-3 || mag >= sci_above);
    let digits = |x: f64| {
        if x.is_finite() && x > 0.0 {
            x.log10().ceil().clamp(0.0, 8.0) as usize
        } else {
            2
        }
    };
    let decimals = if step > 0.0 { digits(1.0 / step) } else { 2 };
    let sci_decimals = if step > 0.0 {
        digits(mag / step).clamp(1, 6) - 1
    } else {
        2
    };
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
                    .map(|&p| Circle::new(p, 3, s.color.filled())),
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
    ((900 / cols).clamp(3, 90), (560 / rows).clamp(6, 60))
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
    let mut vmax = finite().fold(f64::NEG_INFINITY, f64::max);
    if !(vmax > vmin) {
        vmax = vmin + 1.0;
    }

    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(0..cols as i32, 0..rows as i32)?;
    let (pw, ph) = chart.plotting_area().dim_in_pixel();
    let cell_w = pw as f64 / cols as f64;
    let cell_h = ph as f64 / rows as f64;
    let col_label = |v: &i32| {
        usize::try_from(*v)
            .ok()
            .and_then(|i| h.col_labels.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let row_label = |v: &i32| {
        usize::try_from(rows as i32 - 1 - *v)
            .ok()
            .and_then(|i| h.row_labels.get(i))
            .cloned()
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(h.x_desc.as_str())
        .y_desc(h.y_desc.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_labels(cols.min(16) + 1)
        .y_labels(rows.min(24) + 1)
        .x_label_offset((cell_w / 2.0) as i32)
        .y_label_offset(-(cell_h / 2.0) as i32)
        .x_label_formatter(&col_label)
        .y_label_formatter(&row_label)
        .draw()?;
    let norm = |v: f64| (v - vmin) / (vmax - vmin);
    chart.draw_series(h.cells.iter().enumerate().flat_map(|(r, row)| {
        let y = (rows - 1 - r) as i32;
        row.iter().enumerate().map(move |(c, &v)| {
            let color = if v.is_finite() {
                viridis(norm(v))
            } else {
                RGBColor(200, 200, 200)
            };
            Rectangle::new([(c as i32, y), (c as i32 + 1, y + 1)], color.filled())
        })
    }))?;
    if h.annotate && cell_w >= 44.0 && cell_h >= 20.0 {
        let size = (cell_h * 0.4).clamp(11.0, 16.0);
        for (r, row) in h.cells.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let t = norm(v);
                let color = if t > 0.6 { BLACK } else { WHITE };
                let (px, py) = chart.backend_coord(&(c as i32, (rows - r) as i32));
                let center = (
                    px + (cell_w / 2.0) as i32 - main.get_base_pixel().0,
                    py + (cell_h / 2.0) as i32 - main.get_base_pixel().1,
                );
                let style = TextStyle::from((FONT, size).into_font())
                    .color(&color)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                main.draw(&Text::new(format!("{v:.3}"), center, style))?;
            }
        }
    }
    draw_colorbar(&bar, vmin, vmax, &h.scale_desc)
}

fn draw_colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    vmin: f64,
    vmax: f64,
    desc: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let fmt = tick_format(vmin, vmax, 1e5);
    let chart = ChartBuilder::on(area)
        .margin_top(46)
        .margin_bottom(60)
        .margin_left(4)
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
        let f = tick_format(2.0, 4.0, 1e5);
        assert_eq!(f(&2.5), "2.50");
        let f = tick_format(0.0, 1000.0, 1e7);
        assert_eq!(f(&500.0), "500");
    }
}
