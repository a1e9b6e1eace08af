//! The throughput measurement runs, reports every level, and refuses impossible settings.

use std::path::PathBuf;

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::Checkpoint;
use skymoe_serve::bench::{prompt_token, run, BenchConfig};
use skymoe_serve::model::ServeModel;

#[test]
fn bench_measures_each_level_and_refuses_bad_settings() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral");
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, Some(WeightFormat::Int8)).unwrap();
    let cfg = BenchConfig {
        prompt_tokens: 5,
        gen_tokens: 3,
        concurrency: vec![2, 3],
        repeats: 1,
        // Prompts split over steps: 3 prompts of 5 tokens in steps of 4.
        step_tokens: 4,
        kv_dtype: None,
    };
    let runs = run(&model, &cfg).unwrap();
    assert_eq!(
        runs.iter().map(|r| r.requests).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for r in &runs {
        for v in [
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.total_tokens_per_s,
        ] {
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
    }
    let too_long = BenchConfig {
        prompt_tokens: model.context_length(),
        ..cfg.clone()
    };
    assert!(run(&model, &too_long)
        .unwrap_err()
        .to_string()
        .contains("context"));
    assert!(run(
        &model,
        &BenchConfig {
            gen_tokens: 1,
            ..cfg
        }
    )
    .is_err());
    let vocab = model.config.vocab_size;
    assert!((0..100).all(|j| (prompt_token(j, 7, vocab) as usize) < vocab));
}
