//! The self-contained HTML pages of a report and of a comparison (plots linked relatively).

use std::fmt::Write;

use super::figures::NamedFigure;
use super::stats::RunSummary;

/// Escape text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number with four significant digits (scientific notation outside [1e-3, 1e6)).
pub fn num(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if (1e-3..1e6).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.3e}")
    }
}

/// An integer with thousands separators: 1234567 → `1,234,567`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut groups = Vec::new();
    let mut end = digits.len();
    while end > 3 {
        groups.push(&digits[end - 3..end]);
        end -= 3;
    }
    groups.push(&digits[..end]);
    groups.reverse();
    groups.join(",")
}

/// Seconds as `1h 02m 03s`, `2m 03s` or `3.0s`.
fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return num(s);
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else if m > 0 {
        format!("{m}m {sec:02}s")
    } else {
        format!("{s:.1}s")
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;\
max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}\
figcaption{color:#555;font-size:.92em;margin-top:.3em}\
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:1em;overflow-x:auto}\
.warn{background:#fff4e0;border:1px solid #f0c36d;padding:.5em 1em}.note{color:#555;font-style:italic}";

fn head(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
}

fn warnings(out: &mut String, warnings: &[String]) {
    if warnings.is_empty() {
        return;
    }
    out.push_str("<div class=\"warn\"><p>Warnings while reading the metrics:</p><ul>\n");
    for w in warnings {
        let _ = writeln!(out, "<li>{}</li>", escape(w));
    }
    out.push_str("</ul></div>\n");
}

fn figure(out: &mut String, f: &NamedFigure) {
    let stem = escape(f.stem);
    let _ = write!(
        out,
        "<h2 id=\"{stem}\">{}</h2>\n<figure>\n<a href=\"{stem}.svg\"><img src=\"{stem}.png\" alt=\"{}\"></a>\n\
         <figcaption>{} <a href=\"{stem}.png\">PNG</a> · <a href=\"{stem}.svg\">SVG</a></figcaption>\n</figure>\n",
        escape(f.heading),
        escape(f.heading),
        escape(&f.caption),
    );
}

fn row(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(
        out,
        "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
        escape(name),
        escape(value)
    );
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "—".into())
}

fn summary_table(out: &mut String, s: &RunSummary) {
    out.push_str("<table class=\"summary\">\n");
    row(
        out,
        "steps",
        &format!(
            "{} ({} training records)",
            grouped(s.last_step),
            s.train_records
        ),
    );
    row(
        out,
        "tokens",
        &opt(s.tokens.map(|t| t as f64), |t| grouped(t as u64)),
    );
    row(out, "final train loss", &num(s.final_loss));
    if let Some(ce) = s.final_ce {
        row(out, "final cross-entropy", &num(ce));
    }
    if let Some(aux) = s.final_aux_loss.filter(|&x| x != 0.0) {
        row(out, "final aux loss", &num(aux));
    }
    if let Some(z) = s.final_z_loss.filter(|&x| x != 0.0) {
        row(out, "final z-loss", &num(z));
    }
    match s.best_val {
        Some(b) => {
            row(
                out,
                "best validation loss",
                &format!("{} (step {})", num(b.loss), grouped(b.step)),
            );
            row(out, "best validation perplexity", &num(b.ppl));
        }
        None => row(out, "best validation loss", "no validation records"),
    }
    row(
        out,
        "mean throughput",
        &opt(s.mean_tokens_per_s, |t| format!("{} tokens/s", num(t))),
    );
    row(out, "elapsed at the last step", &opt(s.elapsed_s, duration));
    out.push_str("</table>\n");
}

fn layer_table(out: &mut String, s: &RunSummary) {
    let layers = s
        .final_drop_rate
        .len()
        .max(s.final_alpha.len())
        .max(s.late_load.len());
    let imbalance = s.load_imbalance();
    out.push_str(
        "<table class=\"layers\">\n<tr><th>MoE layer</th><th>final drop rate</th><th>final α</th>\
         <th>max / mean expert load (last 10%)</th></tr>\n",
    );
    let cell = |v: Option<&f64>| v.map(|&x| num(x)).unwrap_or_else(|| "—".into());
    for l in 0..layers {
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{l}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            cell(s.final_drop_rate.get(l)),
            cell(s.final_alpha.get(l)),
            cell(imbalance.get(l)),
        );
    }
    out.push_str("</table>\n");
}

/// What the run page shows.
pub struct RunPage<'a> {
    /// Run name (page title).
    pub name: &'a str,
    /// The run directory as given.
    pub run_dir: &'a str,
    /// Headline numbers.
    pub summary: &'a RunSummary,
    /// Whether the run has routing metrics.
    pub moe: bool,
    /// The figures, in page order (the first two are the loss and lr/grad-norm plots).
    pub figures: &'a [NamedFigure],
    /// The contents of `run.toml`, if any.
    pub run_toml: Option<&'a str>,
    /// Tolerated problems.
    pub warnings: &'a [String],
}

/// The run report page.
pub fn run_page(p: &RunPage<'_>) -> String {
    let mut out = String::new();
    head(&mut out, &format!("skymoe training report: {}", p.name));
    let _ = writeln!(
        out,
        "<p>Run directory <code>{}</code>.</p>",
        escape(p.run_dir)
    );
    warnings(&mut out, p.warnings);
    out.push_str("<h2 id=\"summary\">Summary</h2>\n");
    summary_table(&mut out, p.summary);
    if p.moe {
        layer_table(&mut out, p.summary);
    } else {
        out.push_str("<p class=\"note\">dense model: no routing metrics</p>\n");
    }
    for f in p.figures {
        figure(&mut out, f);
    }
    out.push_str("<h2 id=\"config\">Run configuration</h2>\n");
    match p.run_toml {
        Some(t) => {
            let _ = writeln!(out, "<pre>{}</pre>", escape(t));
        }
        None => out.push_str("<p class=\"note\">no run.toml in the run directory.</p>\n"),
    }
    out.push_str("<p class=\"note\">Generated by skymoe report.</p>\n</body>\n</html>\n");
    out
}

/// The comparison page: a summary table with one column per run, then the figures.
pub fn comparison_page(
    runs: &[(String, String, RunSummary)],
    figures: &[NamedFigure],
    warns: &[String],
) -> String {
    let mut out = String::new();
    head(&mut out, "skymoe run comparison");
    warnings(&mut out, warns);
    out.push_str("<h2 id=\"summary\">Summary</h2>\n<table class=\"summary\">\n<tr><th></th>");
    for (label, _, _) in runs {
        let _ = write!(out, "<th>{}</th>", escape(label));
    }
    out.push_str("</tr>\n");
    type Cell = fn(&RunSummary) -> String;
    let rows: [(&str, Cell); 6] = [
        ("steps", |s| grouped(s.last_step)),
        ("tokens", |s| {
            opt(s.tokens.map(|t| t as f64), |t| grouped(t as u64))
        }),
        ("final train loss", |s| num(s.final_loss)),
        ("best validation loss", |s| {
            s.best_val
                .map(|b| format!("{} (step {})", num(b.loss), grouped(b.step)))
                .unwrap_or_else(|| "—".into())
        }),
        ("best validation perplexity", |s| {
            opt(s.best_val.map(|b| b.ppl), num)
        }),
        ("mean tokens/s", |s| opt(s.mean_tokens_per_s, num)),
    ];
    let _ = write!(out, "<tr><th>run directory</th>");
    for (_, dir, _) in runs {
        let _ = write!(out, "<td><code>{}</code></td>", escape(dir));
    }
    out.push_str("</tr>\n");
    for (name, f) in rows {
        let _ = write!(out, "<tr><th>{}</th>", escape(name));
        for (_, _, s) in runs {
            let _ = write!(out, "<td class=\"n\">{}</td>", escape(&f(s)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    for f in figures {
        figure(&mut out, f);
    }
    out.push_str("<p class=\"note\">Generated by skymoe report.</p>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(num(3.21), "3.210");
        assert_eq!(num(29.96), "29.96");
        assert_eq!(num(0.004), "0.004000");
        assert_eq!(num(1.5e-5), "1.500e-5");
        assert_eq!(num(f64::NAN), "NaN");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
        assert_eq!(duration(3723.0), "1h 02m 03s");
        assert_eq!(duration(9.6), "9.6s");
    }
}
