//! Several optimiser steps of the trainer against a PyTorch re-implementation of the same
//! recipe (tools/reference/make_train_fixtures.py): capacity dropping, Skywork / Switch
//! balancing losses, DeepSeek-V3's sequence-wise and Megatron-Core's global-batch losses, the
//! aux-loss-free selection bias, z-loss, adaptive α, clipping, schedules, AdamW, gradient
//! accumulation.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use skymoe_model::Checkpoint;
use skymoe_train::aux_loss::BalanceLoss;
use skymoe_train::optim::Decay;
use skymoe_train::{RunConfig, TrainableParams, Trainer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference")
}

fn scalar(map: &std::collections::HashMap<String, Tensor>, k: &str) -> f64 {
    map.get(k)
        .unwrap_or_else(|| panic!("missing {k}"))
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn vec1(map: &std::collections::HashMap<String, Tensor>, k: &str) -> Vec<f64> {
    map.get(k)
        .unwrap_or_else(|| panic!("missing {k}"))
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn close(a: f64, b: f64, rel: f64, what: &str) {
    assert!(
        (a - b).abs() <= rel * b.abs().max(1e-3),
        "{what}: {a} vs {b}"
    );
}

/// Train on the fixture's batches, compare every step and the final weights with PyTorch's,
/// and return the losses and the final weights.
fn check(family: &str, case: &str, concurrent: usize) -> (Vec<f64>, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let dir = fixtures().join(family);
    let refmap =
        candle_core::safetensors::load(dir.join(format!("train_{case}.safetensors")), &dev)
            .unwrap();
    let bytes: Vec<u8> = refmap["config_json"].to_vec1::<u8>().unwrap();
    let c: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let f = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("config lacks {k}"));
    let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config lacks {k}"));

    let mut cfg = RunConfig::default();
    cfg.router.capacity_factor = f("capacity_factor");
    cfg.aux.balance = match c["balance"].as_str().unwrap() {
        "skywork" => BalanceLoss::Skywork,
        "switch" => BalanceLoss::Switch,
        "sequence" => BalanceLoss::Sequence,
        "global" => BalanceLoss::Global,
        other => panic!("balance {other}"),
    };
    cfg.aux.bias_update_rate = c["bias_update_rate"].as_f64().unwrap_or(0.0);
    cfg.aux.adaptive = c["adaptive"].as_bool().unwrap();
    cfg.aux.coef = c["coef"].as_f64().unwrap_or(0.0);
    if cfg.aux.adaptive {
        cfg.aux.alpha_init = f("alpha_init");
        cfg.aux.xi = f("xi");
        cfg.aux.alpha_max = f("alpha_max");
        cfg.aux.beta = f("beta");
    }
    cfg.aux.z_loss_coef = f("z_loss_coef");
    cfg.optim.lr = f("lr");
    cfg.optim.min_lr = f("min_lr");
    cfg.optim.warmup_steps = u("warmup_steps");
    cfg.optim.decay = match c["decay"].as_str().unwrap() {
        "cosine" => Decay::Cosine,
        "linear" => Decay::Linear,
        _ => Decay::Constant,
    };
    cfg.optim.weight_decay = f("weight_decay");
    cfg.optim.beta1 = f("beta1");
    cfg.optim.beta2 = f("beta2");
    cfg.optim.eps = f("eps");
    cfg.optim.grad_clip = f("grad_clip");
    cfg.train.steps = u("total_steps");
    cfg.train.concurrent_micro_batches = concurrent;

    let ckpt = Checkpoint::open(&dir, &dev).unwrap();
    let params = TrainableParams::from_checkpoint(&ckpt, &dev).unwrap();
    let mut trainer = Trainer::in_memory(cfg, ckpt.config.clone(), params).unwrap();

    let batches = refmap["batches"].to_dtype(DType::I64).unwrap();
    let (steps, micro, _, _) = batches.dims4().unwrap();
    let start = Instant::now();
    let mut losses = Vec::new();
    for s in 0..steps {
        let mb: Vec<Vec<Vec<u32>>> = (0..micro)
            .map(|m| {
                batches
                    .get(s)
                    .unwrap()
                    .get(m)
                    .unwrap()
                    .to_vec2::<i64>()
                    .unwrap()
                    .into_iter()
                    .map(|r| r.into_iter().map(|t| t as u32).collect())
                    .collect()
            })
            .collect();
        let m = trainer.step_on_batches(&mb, start, &None).unwrap();
        losses.push(m.loss);
        let k = |n: &str| format!("step{s}.{n}");
        close(m.loss, scalar(&refmap, &k("loss")), 1e-5, &k("loss"));
        close(m.ce, scalar(&refmap, &k("ce")), 1e-5, &k("ce"));
        close(m.aux_loss, scalar(&refmap, &k("aux")), 1e-4, &k("aux"));
        close(m.z_loss, scalar(&refmap, &k("z")), 1e-4, &k("z"));
        close(
            m.grad_norm,
            scalar(&refmap, &k("grad_norm")),
            1e-4,
            &k("grad_norm"),
        );
        close(m.lr, scalar(&refmap, &k("lr")), 1e-6, &k("lr"));
        if cfg_has_bias(&refmap) {
            // The selection biases after the step's update, MoE layer by layer.
            let want = vec1(&refmap, &k("bias"));
            let got: Vec<f64> = trainer
                .params
                .vars
                .iter()
                .filter(|(n, _)| n.ends_with(".e_score_correction_bias"))
                .flat_map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
                .map(f64::from)
                .collect();
            assert_eq!(got.len(), want.len(), "{}", k("bias"));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{}: {got:?} vs {want:?}", k("bias"));
            }
        }
        for (l, (a, b)) in m.alpha.iter().zip(vec1(&refmap, &k("alpha"))).enumerate() {
            close(*a, b, 1e-6, &format!("{} layer {l}", k("alpha")));
        }
        assert_eq!(m.drop_rate.len(), vec1(&refmap, &k("drop_rate")).len());
        for (l, (a, b)) in m
            .drop_rate
            .iter()
            .zip(vec1(&refmap, &k("drop_rate")))
            .enumerate()
        {
            assert!(
                (a - b).abs() < 1e-6,
                "{} layer {l}: {a} vs {b}",
                k("drop_rate")
            );
        }
    }
    // Weights after the last step. AdamW moves an element whose gradient is ~0 by about ±lr, so
    // f32 rounding may flip a few such steps: bound the worst element loosely and the mean tightly.
    let (mut worst, mut sum, mut n) = (0.0f32, 0.0f64, 0usize);
    for (name, var) in &trainer.params.vars {
        let want = refmap
            .get(&format!("final.{name}"))
            .unwrap_or_else(|| panic!("no final.{name}"));
        let diff = (var.as_tensor() - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let err = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
        worst = worst.max(err);
        sum += diff
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        n += diff.elem_count();
        assert!(err <= 2e-3, "final {name}: max |Δ| {err}");
    }
    let mean = sum / n as f64;
    eprintln!("{family}/{case}: final weights max |Δ| {worst:e}, mean |Δ| {mean:e}");
    assert!(mean <= 1e-6, "mean |Δ| of the final weights {mean}");
    let weights = trainer
        .params
        .vars
        .values()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    (losses, weights)
}

/// Whether the fixture's run updates a selection bias.
fn cfg_has_bias(map: &std::collections::HashMap<String, Tensor>) -> bool {
    map.contains_key("step0.bias")
}

#[test]
fn mixtral_selection_bias_and_sequence_loss_steps_match_pytorch() {
    check("mixtral", "bias_sequence", 0);
}

#[test]
fn skywork_global_loss_and_selection_bias_steps_match_pytorch() {
    check("skywork_moe", "global_bias", 0);
}

#[test]
fn skywork_adaptive_capacity_steps_match_pytorch() {
    check("skywork_moe", "adaptive", 0);
}

#[test]
fn mixtral_switch_accumulation_steps_match_pytorch() {
    check("mixtral", "switch_accum", 0);
}

#[test]
fn concurrent_micro_batches_train_exactly_as_sequential_ones() {
    // The same steps with the micro-batches one after the other and two at a time: gradients
    // add up in micro-batch order either way, so losses and weights agree to the bit.
    let (seq_losses, seq_weights) = check("mixtral", "switch_accum", 1);
    let (par_losses, par_weights) = check("mixtral", "switch_accum", 2);
    assert_eq!(seq_losses, par_losses);
    assert!(seq_weights == par_weights, "final weights differ");
}
