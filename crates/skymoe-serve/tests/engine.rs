//! The engine end to end on the tiny Mixtral fixture: continuous batching, preemption,
//! cancellation, stop strings and refusals, each checked against plain one-at-a-time greedy
//! decoding with the served model.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::Checkpoint;
use skymoe_serve::engine::{
    EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, SubmitError,
};
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral")
}

fn engine(config: EngineConfig) -> EngineHandle {
    EngineHandle::load(&fixture(), Some(WeightFormat::F32), config).unwrap()
}

/// Greedy continuation computed directly with the model, one token at a time.
fn greedy_direct(prompt: &[u32], n: usize) -> Vec<u32> {
    let ckpt = Checkpoint::open(&fixture(), &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
    let mut kv = model.new_kv_cache(16, 8, None);
    let blocks = kv.allocate(8).unwrap();
    let mut tokens = prompt.to_vec();
    let mut start = 0;
    for _ in 0..n {
        let chunk = SeqChunk {
            tokens: &tokens[start..],
            start,
            blocks: &blocks,
            logits: LogitsFor::Last,
        };
        let logits = model.forward(&[chunk], &mut kv).unwrap().remove(0);
        start = tokens.len();
        tokens.push(skymoe_model::sampling::argmax(&logits));
    }
    tokens[prompt.len()..].to_vec()
}

struct Collected {
    text: String,
    ids: Vec<u32>,
    reason: Option<FinishReason>,
    completion_tokens: usize,
}

fn collect(mut s: skymoe_serve::engine::RequestStream) -> Collected {
    let mut c = Collected {
        text: String::new(),
        ids: Vec::new(),
        reason: None,
        completion_tokens: 0,
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Delta {
                text, token_ids, ..
            } => {
                c.text.push_str(&text);
                c.ids.extend(token_ids);
            }
            GenerationEvent::Finished { reason, usage } => {
                c.reason = Some(reason);
                c.completion_tokens = usage.completion_tokens;
            }
            GenerationEvent::Failed { message } => panic!("failed: {message}"),
        }
    }
    c
}

fn request(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        ignore_eos: true,
        ..GenerationRequest::greedy(prompt, n)
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6u32)
        .map(|i| {
            (0..(3 + i * 2))
                .map(|j| (i * 53 + j * 17 + 1) % 300)
                .collect()
        })
        .collect()
}

#[test]
fn continuous_batches_and_preemption_give_one_at_a_time_results() {
    let want: Vec<Vec<u32>> = prompts().iter().map(|p| greedy_direct(p, 12)).collect();
    // Plenty of cache, batch of 4 for 6 requests: later ones join as earlier ones finish.
    let e = engine(EngineConfig {
        max_batch: 4,
        ..EngineConfig::default()
    });
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| e.submit(request(p, 12)).unwrap())
        .collect();
    for (s, w) in streams.into_iter().zip(&want) {
        let c = collect(s);
        assert_eq!(&c.ids, w);
        assert_eq!(c.reason, Some(FinishReason::Length));
        assert_eq!(c.completion_tokens, 12);
    }
    // A cache of 7 blocks of 4 positions cannot hold all of them: sequences are preempted and
    // recomputed, with the same results.
    let e = engine(EngineConfig {
        max_batch: 6,
        kv_blocks: Some(7),
        block_size: 4,
        ..EngineConfig::default()
    });
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| e.submit(request(p, 12)).unwrap())
        .collect();
    for (s, w) in streams.into_iter().zip(&want) {
        assert_eq!(&collect(s).ids, w);
    }
    let st = e.stats();
    assert!(st.preemptions_total > 0, "expected preemptions: {st:?}");
    assert_eq!(st.requests_finished, 6);
    // Long prompts are prefilled over several steps.
    let e = engine(EngineConfig {
        max_step_tokens: 3,
        ..EngineConfig::default()
    });
    let p = prompts().pop().unwrap();
    assert_eq!(
        collect(e.submit(request(p.clone(), 12)).unwrap()).ids,
        greedy_direct(&p, 12)
    );
}

#[test]
fn cancelled_requests_free_their_place() {
    let e = engine(EngineConfig::default());
    let mut s = e.submit(request(vec![1, 2, 3], 200)).unwrap();
    // Wait for the first token, then hang up.
    assert!(matches!(
        s.blocking_next(),
        Some(GenerationEvent::Delta { .. })
    ));
    drop(s);
    let t0 = Instant::now();
    while e.in_flight() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the cancelled request still runs"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = e.stats();
    assert_eq!(st.requests_cancelled, 1);
    assert!(st.generated_tokens_total < 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.stats().kv_blocks_used, 0);
}

#[test]
fn stop_strings_cut_the_text() {
    let e = engine(EngineConfig::default());
    let full = collect(e.submit(request(vec![5, 6, 7], 24)).unwrap());
    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() > 8,
        "the fixture should produce some text: {:?}",
        full.text
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = &full.text[..full.text.find(&stop).unwrap()];
    let mut req = request(vec![5, 6, 7], 24);
    req.stop = vec![stop.clone()];
    let got = collect(e.submit(req).unwrap());
    assert_eq!(got.text, cut, "stop {stop:?}");
    assert_eq!(got.reason, Some(FinishReason::Stop));
}

#[test]
fn bad_requests_are_refused() {
    let e = engine(EngineConfig {
        max_queue: 1,
        ..EngineConfig::default()
    });
    assert!(matches!(
        e.submit(request(vec![], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        e.submit(request(vec![100_000], 4)),
        Err(SubmitError::Invalid(_))
    ));
    let ctx = e.context_length();
    assert!(matches!(
        e.submit(request(vec![1; 4], ctx)),
        Err(SubmitError::TooLong { .. })
    ));
    let mut bad = request(vec![1], 4);
    bad.sampling.top_p = 0.0;
    assert!(matches!(e.submit(bad), Err(SubmitError::Invalid(_))));
    let first = e.submit(request(vec![1, 2], 50)).unwrap();
    assert!(matches!(
        e.submit(request(vec![1, 2], 4)),
        Err(SubmitError::Saturated { limit: 1 })
    ));
    drop(first);
    e.begin_shutdown();
    assert!(matches!(
        e.submit(request(vec![1], 4)),
        Err(SubmitError::ShuttingDown)
    ));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let e = engine(EngineConfig::default());
    let run = |seed| {
        let mut r = request(vec![9, 8, 7], 16);
        r.sampling.temperature = 1.0;
        r.sampling.top_p = 0.9;
        r.seed = Some(seed);
        collect(e.submit(r).unwrap()).ids
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}
