//! `skymoe experiment balancing` at a tiny budget with two seeds: every variant and capacity
//! setting is run and reported, losses are finite, the drop rate at capacity 1.25 computed from
//! the expert loads agrees with the one measured, and the aux-loss-free selection bias moves
//! (the bias runs route differently from the runs without balancing).

mod common;

use std::collections::BTreeMap;

use common::{corpus, skymoe};

const VARIANTS: [&str; 5] = ["none", "switch", "skywork", "bias", "bias+skywork"];
const CAPACITIES: [&str; 2] = ["cf1.25", "dropless"];

fn rows(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn num(r: &BTreeMap<String, String>, k: &str) -> f64 {
    r[k].parse().unwrap_or_else(|_| panic!("{k} = {}", r[k]))
}

#[test]
fn balancing_runs_every_variant_and_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let o = skymoe(&[
        "experiment",
        "balancing",
        "--quiet",
        "--steps",
        "3",
        "--seeds",
        "2",
        "--data",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = out.join("balancing");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    for v in VARIANTS {
        for c in CAPACITIES {
            assert!(md.contains(&format!("| {v} | {c} |")), "{md}");
        }
    }
    assert!(md.contains("mean over 2 seeds"), "{md}");
    for plot in [
        "val_loss_cf1.25",
        "drop_rate_dropless",
        "load_cf1.25",
        "alpha",
    ] {
        assert!(dir.join(format!("{plot}.png")).exists(), "{plot}");
    }

    // One row per variant, capacity and seed, with finite losses.
    let results = rows(&std::fs::read_to_string(dir.join("results.csv")).unwrap());
    assert_eq!(results.len(), VARIANTS.len() * CAPACITIES.len() * 2);
    for r in &results {
        assert!(num(r, "val_loss").is_finite(), "{r:?}");
        let bias = num(r, "bias_range");
        if r["variant"].starts_with("bias") {
            assert!(bias > 0.0, "the selection bias did not move: {r:?}");
        } else {
            assert_eq!(bias, 0.0, "{r:?}");
        }
    }

    // Time series: the drop rate recomputed from the loads equals the measured one at cf 1.25;
    // the bias runs' loads differ from the unbalanced run of the same seed and capacity.
    let series = rows(&std::fs::read_to_string(dir.join("series.csv")).unwrap());
    assert_eq!(series.len(), VARIANTS.len() * CAPACITIES.len() * 2 * 3);
    for r in series.iter().filter(|r| r["capacity"] == "cf1.25") {
        let (d, at) = (num(r, "drop_rate"), num(r, "drop_rate_at_1.25"));
        assert!((d - at).abs() < 1e-6, "{r:?}");
    }
    let loads = |variant: &str, cap: &str, seed: &str| -> Vec<f64> {
        series
            .iter()
            .filter(|r| r["variant"] == variant && r["capacity"] == cap && r["seed"] == seed)
            .map(|r| num(r, "max_mean_load"))
            .collect()
    };
    for cap in CAPACITIES {
        for seed in ["1234", "1235"] {
            let none = loads("none", cap, seed);
            assert_eq!(none.len(), 3);
            // Step 1 routes before any bias update: identical.
            assert_eq!(none[0], loads("bias", cap, seed)[0]);
            assert_ne!(none, loads("bias", cap, seed), "{cap} seed {seed}");
        }
    }
    // The dense model and the upcycled models are reused by a second invocation.
    let o = skymoe(&[
        "experiment",
        "balancing",
        "--quiet",
        "--steps",
        "3",
        "--seeds",
        "2",
        "--data",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("done before, reusing"));
    assert_eq!(
        std::fs::read_to_string(dir.join("results.csv")).unwrap(),
        results_text(&results)
    );
}

fn results_text(rows: &[BTreeMap<String, String>]) -> String {
    let header = "variant,capacity,seed,val_loss,drop_rate_at_1.25_tail,drop_rate_at_1.25_all,max_mean_load_tail,gate_ratio_tail,alpha_end_mean,alpha_below_cap_share,bias_range";
    let mut s = format!("{header}\n");
    for r in rows {
        let line: Vec<&str> = header.split(',').map(|h| r[h].as_str()).collect();
        s.push_str(&line.join(","));
        s.push('\n');
    }
    s
}
