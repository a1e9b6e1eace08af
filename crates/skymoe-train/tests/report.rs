//! The training report: plots, HTML page and comparison from synthetic run directories.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use skymoe_train::report::{
    default_out_dir, render_comparison, render_report, ReportError, RunMetrics,
};

const STEPS: u64 = 60;
const VAL_EVERY: u64 = 20;
const TOKENS_PER_STEP: u64 = 4096;

/// One training line: 2 MoE layers × 4 experts (or dense), with a key the reader must ignore.
fn train_line(step: u64, moe: bool) -> String {
    let s = step as f64;
    let loss = if step == STEPS { 2.5 } else { 3.0 + 5.0 / s };
    let (alpha, drop, load) = if moe {
        let last = step == STEPS;
        (
            json!(if last {
                vec![0.004, 0.0025]
            } else {
                vec![0.01, 0.02]
            }),
            json!(if last {
                vec![0.125, 0.0625]
            } else {
                vec![0.3 / s, 0.2 / s]
            }),
            // Layer 0 is always skewed towards expert 0; layer 1 is uniform.
            json!([[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]]),
        )
    } else {
        (json!([]), json!([]), json!([]))
    };
    json!({
        "kind": "train", "step": step, "tokens": step * TOKENS_PER_STEP,
        "loss": loss, "ce": loss - if moe { 0.002 } else { 0.0 },
        "aux_loss": if moe { 0.002 } else { 0.0 }, "z_loss": 0.0,
        "alpha": alpha, "drop_rate": drop, "expert_load": load,
        "grad_norm": 1.0 + 1.0 / s, "lr": 3e-4 * (s / STEPS as f64).min(1.0),
        "tokens_per_s": 5000.0, "elapsed_s": s * 0.5,
        "future_key": {"nested": [1, 2, 3]}
    })
    .to_string()
}

/// Validation at steps 20, 40, 60 with losses 2.9, 2.75 (the best), 2.8.
fn val_line(step: u64) -> String {
    let val_loss = match step {
        40 => 2.75,
        60 => 2.8,
        _ => 2.9,
    };
    json!({"kind": "val", "step": step, "val_loss": val_loss, "val_ppl": f64::exp(val_loss)})
        .to_string()
}

fn metrics_text(moe: bool) -> String {
    let mut out = String::new();
    for step in 1..=STEPS {
        out.push_str(&train_line(step, moe));
        out.push('\n');
        if step % VAL_EVERY == 0 {
            out.push_str(&val_line(step));
            out.push('\n');
        }
    }
    out
}

/// A run directory `root/name` with the given metrics log and a run.toml needing escaping.
fn make_run(root: &Path, name: &str, metrics: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        "[model]\nname = \"tiny <script>alert(1)</script> & co\"\n",
    )
    .unwrap();
    dir
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert!(
        bytes.len() > 5_000,
        "{} is suspiciously small ({} bytes)",
        path.display(),
        bytes.len()
    );
}

fn assert_svg(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains("<svg"), "{} is not an SVG", path.display());
    assert!(text.contains("<text"), "{} has no text", path.display());
    text
}

const MOE_PLOTS: [&str; 4] = ["drop_rate", "alpha", "expert_load", "expert_load_time"];
const COMMON_PLOTS: [&str; 2] = ["loss", "lr_gradnorm"];

#[test]
fn moe_report_writes_every_plot_and_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path(), "moe", &metrics_text(true));
    let out = default_out_dir(&run);
    let report = render_report(&run, &out).unwrap();

    assert_eq!(report.index_html, out.join("index.html"));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    for stem in COMMON_PLOTS.iter().chain(&MOE_PLOTS) {
        let png = out.join(format!("{stem}.png"));
        let svg = out.join(format!("{stem}.svg"));
        assert_png(&png);
        assert_svg(&svg);
        assert!(report.files.contains(&png) && report.files.contains(&svg));
    }
    // No temporary files are left behind.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp"), "left over {name}");
    }

    let s = &report.summary;
    assert_eq!((s.train_records, s.val_records, s.last_step), (60, 3, 60));
    assert_eq!(s.tokens, Some(STEPS * TOKENS_PER_STEP));
    assert_eq!(s.final_loss, 2.5);
    let best = s.best_val.unwrap();
    assert_eq!((best.step, best.loss), (40, 2.75));
    assert_eq!(s.final_drop_rate, [0.125, 0.0625]);
    assert_eq!(s.final_alpha, [0.004, 0.0025]);
    assert_eq!(s.mean_tokens_per_s, Some(5000.0));
    assert_eq!(s.late_records, 6);
    for (got, want) in s.late_load[0].iter().zip([0.4, 0.2, 0.2, 0.2]) {
        assert!((got - want).abs() < 1e-12, "{:?}", s.late_load);
    }
    let imbalance = s.load_imbalance();
    assert!((imbalance[0] - 1.6).abs() < 1e-9 && (imbalance[1] - 1.0).abs() < 1e-9);

    let html = std::fs::read_to_string(&report.index_html).unwrap();
    for stem in COMMON_PLOTS.iter().chain(&MOE_PLOTS) {
        assert!(
            html.contains(&format!("src=\"{stem}.png\"")),
            "page lacks {stem}.png"
        );
        assert!(
            html.contains(&format!("href=\"{stem}.svg\"")),
            "page lacks {stem}.svg"
        );
    }
    for number in [
        "60 (60 training records)", // steps
        "245,760",                  // tokens
        "2.500",                    // final train loss
        "2.750 (step 40)",          // best validation loss
        "15.64",                    // best validation perplexity, exp(2.75)
        "5000 tokens/s",            // mean throughput
        "0.1250",                   // final drop rate, layer 0
        "0.06250",                  // final drop rate, layer 1
        "0.004000",                 // final α, layer 0
        "0.002500",                 // final α, layer 1
        "1.600",                    // max/mean load, layer 0
    ] {
        assert!(html.contains(number), "page lacks {number}");
    }
    assert!(html.contains(
        "<pre>[model]\nname = &quot;tiny &lt;script&gt;alert(1)&lt;/script&gt; &amp; co&quot;"
    ));
    assert!(!html.contains("<script>"));
    assert!(!html.contains("dense model"));
    // The loss plot has an EMA line (60 ≥ 50 records) and the validation curve.
    let loss_svg = assert_svg(&out.join("loss.svg"));
    for label in ["train loss (EMA", "validation loss", "cross-entropy"] {
        assert!(loss_svg.contains(label), "loss.svg lacks {label}");
    }
    let drop_svg = assert_svg(&out.join("drop_rate.svg"));
    assert!(drop_svg.contains("MoE layer 0") && drop_svg.contains("MoE layer 1"));
}

#[test]
fn dense_report_omits_routing_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path(), "dense", &metrics_text(false));
    let out = tmp.path().join("elsewhere/report");
    let report = render_report(&run, &out).unwrap();
    for stem in COMMON_PLOTS {
        assert_png(&out.join(format!("{stem}.png")));
        assert_svg(&out.join(format!("{stem}.svg")));
    }
    for stem in MOE_PLOTS {
        assert!(
            !out.join(format!("{stem}.png")).exists(),
            "{stem}.png written"
        );
    }
    assert!(report.summary.final_drop_rate.is_empty());
    let html = std::fs::read_to_string(&report.index_html).unwrap();
    assert!(html.contains("dense model: no routing metrics"));
    assert!(html.contains("src=\"loss.png\""));
    for stem in MOE_PLOTS {
        assert!(
            !html.contains(&format!("{stem}.png")),
            "page links {stem}.png"
        );
    }
    // CE equals the loss in a dense run: no separate cross-entropy curve.
    assert!(!assert_svg(&out.join("loss.svg")).contains("cross-entropy"));
}

#[test]
fn truncated_last_line_is_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = metrics_text(true);
    let partial = train_line(STEPS + 1, true);
    text.push_str(&partial[..partial.len() / 2]); // a killed writer: no closing brace, no newline
    let run = make_run(tmp.path(), "killed", &text);
    let report = render_report(&run, &default_out_dir(&run)).unwrap();
    assert_eq!(report.summary.last_step, STEPS);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let last_line = text.lines().count();
    assert!(
        report.warnings[0].contains(&format!("line {last_line}")),
        "{}",
        report.warnings[0]
    );
    let html = std::fs::read_to_string(&report.index_html).unwrap();
    assert!(html.contains("truncated last line"));
}

#[test]
fn malformed_middle_line_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let good = metrics_text(true);
    let mut lines: Vec<&str> = good.lines().collect();
    lines[4] = "{\"kind\":\"train\",\"step\":5,\"loss\":"; // truncated, but not the last line
    let run = make_run(tmp.path(), "bad_json", &(lines.join("\n") + "\n"));
    let err = render_report(&run, &default_out_dir(&run)).unwrap_err();
    assert!(
        matches!(err, ReportError::Malformed { line: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("line 5"), "{err}");

    // Valid JSON that is not a valid record: a train line without its loss.
    lines[4] = "{\"kind\":\"train\",\"step\":5}";
    let run = make_run(tmp.path(), "no_loss", &(lines.join("\n") + "\n"));
    let err = render_report(&run, &default_out_dir(&run)).unwrap_err();
    assert!(
        matches!(err, ReportError::Malformed { line: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("loss"), "{err}");
    assert!(!default_out_dir(&run).join("index.html").exists());
}

#[test]
fn missing_run_dir_metrics_or_train_records_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nowhere");
    let err = render_report(&nowhere, &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, ReportError::MissingRunDir { .. }), "{err}");
    assert!(err.to_string().contains("nowhere"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = render_report(&empty, &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, ReportError::MissingMetrics { .. }), "{err}");
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");

    let val_only = make_run(tmp.path(), "val_only", &(val_line(20) + "\n"));
    let err = render_report(&val_only, &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, ReportError::NoTrainRecords { .. }), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn unwritable_out_dir_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path(), "moe", &metrics_text(true));
    // A directory cannot be created under a regular file (whoever runs the test).
    let blocker = tmp.path().join("file");
    std::fs::File::create(&blocker)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let err = render_report(&run, &blocker.join("report")).unwrap_err();
    assert!(matches!(err, ReportError::Write { .. }), "{err}");
    assert!(err.to_string().contains("report"), "{err}");
}

#[test]
fn comparison_overlays_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = make_run(tmp.path(), "moe", &metrics_text(true));
    let dense = make_run(tmp.path(), "dense", &metrics_text(false));
    let out = tmp.path().join("cmp");
    let cmp = render_comparison(&[("MoE 8x", &moe), ("dense control", &dense)], &out).unwrap();
    for stem in ["loss", "val_loss"] {
        assert_png(&out.join(format!("{stem}.png")));
        let svg = assert_svg(&out.join(format!("{stem}.svg")));
        for label in ["MoE 8x", "dense control"] {
            assert!(svg.contains(label), "{stem}.svg lacks {label}");
        }
    }
    let loss_svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(loss_svg.contains("MoE 8x: validation") && loss_svg.contains("dense control: train"));
    assert_eq!(cmp.summaries.len(), 2);
    assert_eq!(cmp.summaries[0].0, "MoE 8x");
    let html = std::fs::read_to_string(&cmp.index_html).unwrap();
    assert!(html.contains("<th>MoE 8x</th><th>dense control</th>"));
    assert!(html.contains("src=\"loss.png\"") && html.contains("src=\"val_loss.png\""));
    assert!(html.contains("2.750 (step 40)"));

    let none: [(&str, &Path); 0] = [];
    assert!(matches!(
        render_comparison(&none, &out),
        Err(ReportError::NoRuns)
    ));
    let err = render_comparison(&[("x", tmp.path().join("missing"))], &out).unwrap_err();
    assert!(matches!(err, ReportError::MissingRunDir { .. }), "{err}");
}

#[test]
fn metrics_reader_ignores_unknown_kinds_and_reads_null_as_nan() {
    let text = format!(
        "{}\n{{\"kind\":\"checkpoint\",\"step\":1,\"path\":\"c\"}}\n\n{}\n",
        train_line(1, true),
        json!({"kind": "train", "step": 2, "loss": null}),
    );
    let m = RunMetrics::parse(text.as_bytes(), Path::new("metrics.jsonl")).unwrap();
    assert_eq!(m.train.len(), 2);
    assert!(m.train[1].loss.is_nan());
    assert_eq!(m.moe_layers(), 2);
    assert!(m.warnings.is_empty());
}

#[test]
fn a_diverged_run_still_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = metrics_text(true);
    text.push_str(
        &json!({"kind": "train", "step": STEPS + 1, "loss": null, "grad_norm": null,
                "alpha": [null, 0.1], "drop_rate": [0.1, 0.1],
                "expert_load": [[1.0, 0.0, 0.0, 0.0], [null, 0.5, 0.5, 0.0]]})
        .to_string(),
    );
    text.push('\n');
    let run = make_run(tmp.path(), "nan", &text);
    let report = render_report(&run, &default_out_dir(&run)).unwrap();
    assert!(report.summary.final_loss.is_nan());
    let html = std::fs::read_to_string(&report.index_html).unwrap();
    assert!(html.contains("<td class=\"n\">NaN</td>"));
    assert_png(&default_out_dir(&run).join("loss.png"));
}
