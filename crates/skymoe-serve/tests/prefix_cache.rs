//! Automatic prefix caching on the tiny Mixtral fixture: with caching on, every output equals
//! the output with caching off and plain one-at-a-time greedy decoding — for requests that
//! share a long prefix (one after another and all at once), a hit on a finished request's
//! blocks, eviction under a tiny KV budget, preemption and cancellation — and an idle engine
//! holds no block. The logits of a prompt computed after cached blocks equal those of the
//! prompt computed whole.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::Checkpoint;
use skymoe_serve::engine::{
    EngineConfig, EngineHandle, EngineStats, FinishReason, GenerationEvent, GenerationRequest,
    RequestStream,
};
use skymoe_serve::kv_cache::BlockPool;
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral")
}

fn model() -> ServeModel {
    let ckpt = Checkpoint::open(&fixture(), &Device::Cpu).unwrap();
    ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap()
}

fn engine(config: EngineConfig) -> EngineHandle {
    EngineHandle::load(&fixture(), Some(WeightFormat::F32), config).unwrap()
}

/// Greedy continuation computed directly with the model, one token at a time.
fn greedy_direct(model: &ServeModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut kv = model.new_kv_cache(16, 16, None);
    let blocks = kv.allocate(16).unwrap();
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

fn request(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        ignore_eos: true,
        ..GenerationRequest::greedy(prompt, n)
    }
}

/// The generated ids of a request, and why it finished.
fn collect(mut s: RequestStream) -> (Vec<u32>, Option<FinishReason>) {
    let (mut ids, mut reason) = (Vec::new(), None);
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Delta { token_ids, .. } => ids.extend(token_ids),
            GenerationEvent::Finished { reason: r, .. } => reason = Some(r),
            GenerationEvent::Failed { message } => panic!("failed: {message}"),
        }
    }
    (ids, reason)
}

/// Wait until the engine is idle and has published it; its counters then.
fn idle(e: &EngineHandle) -> EngineStats {
    let t0 = Instant::now();
    loop {
        let st = e.stats();
        if e.in_flight() == 0 && st.running == 0 && st.waiting == 0 && st.kv_blocks_used == 0 {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the engine does not come back to idle: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A shared prefix of `len` tokens followed by a tail of `tail` tokens for request `k`.
fn shared(len: usize, k: u32, tail: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|j| (j * 37 + 11) % 300)
        .chain((0..tail as u32).map(|j| (k * 61 + j * 13 + 5) % 300))
        .collect()
}

/// Run `prompts` (`n` tokens each) on an engine with `config`, submitted `together` or one
/// after another; the ids and the idle engine's counters.
fn run(
    config: &EngineConfig,
    prompts: &[Vec<u32>],
    n: usize,
    together: bool,
) -> (Vec<Vec<u32>>, EngineStats) {
    let e = engine(config.clone());
    let ids = if together {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(request(p.clone(), n)).unwrap())
            .collect();
        streams.into_iter().map(|s| collect(s).0).collect()
    } else {
        prompts
            .iter()
            .map(|p| collect(e.submit(request(p.clone(), n)).unwrap()).0)
            .collect()
    };
    (ids, idle(&e))
}

/// Runs with caching on and off give the same ids, both the direct greedy ones; the
/// counters of the run with caching on.
fn same_with_and_without(
    config: EngineConfig,
    prompts: &[Vec<u32>],
    n: usize,
    together: bool,
) -> EngineStats {
    let m = model();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_direct(&m, p, n)).collect();
    let (on, st_on) = run(&config, prompts, n, together);
    let off_config = EngineConfig {
        enable_prefix_caching: false,
        ..config
    };
    let (off, st_off) = run(&off_config, prompts, n, together);
    assert_eq!(on, off, "caching on vs off");
    assert_eq!(on, want, "caching on vs direct greedy decoding");
    assert_eq!(st_off.prefix_cache.hit_tokens, 0);
    assert_eq!(st_off.prefix_cache_blocks, 0);
    st_on
}

#[test]
fn requests_sharing_a_long_prefix_one_after_another() {
    let prompts: Vec<Vec<u32>> = (0..5).map(|k| shared(70, k, 3 + k as usize)).collect();
    let st = same_with_and_without(EngineConfig::default(), &prompts, 10, false);
    // 70 shared tokens = 4 full blocks of 16, found by the 4 later requests.
    assert_eq!(st.prefix_cache.hit_blocks, 16, "{st:?}");
    assert_eq!(st.prefix_cache.hit_tokens, 4 * 64);
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(st.prefix_cache.queried_tokens, total as u64);
    assert_eq!(st.prompt_tokens_total, (total - 4 * 64) as u64);
    assert!(st.prefix_cache_blocks >= 4);
}

#[test]
fn concurrent_requests_sharing_a_prefix_wait_for_it_once() {
    let prompts: Vec<Vec<u32>> = (0..6).map(|k| shared(50, k, 2 + k as usize)).collect();
    let config = EngineConfig {
        block_size: 8,
        max_step_tokens: 20,
        ..EngineConfig::default()
    };
    let st = same_with_and_without(config, &prompts, 8, true);
    // 50 shared tokens = 6 full blocks of 8: the first request computes them, the other five
    // wait for them rather than computing them again.
    assert_eq!(st.prefix_cache.hit_blocks, 5 * 6, "{st:?}");
}

#[test]
fn a_finished_request_leaves_its_prefix_for_later_ones() {
    let m = model();
    let e = engine(EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    });
    let first = shared(30, 0, 2);
    assert_eq!(
        collect(e.submit(request(first.clone(), 6)).unwrap()).0,
        greedy_direct(&m, &first, 6)
    );
    let st = idle(&e);
    assert_eq!(st.prefix_cache.hit_blocks, 0);
    // Its prompt and the generated tokens are cached (full blocks only): a follow-up turn
    // that extends the conversation finds them.
    let (ids, _) = collect(e.submit(request(first.clone(), 6)).unwrap());
    let mut turn = first.clone();
    turn.extend(&ids);
    turn.extend([7, 8, 9]);
    assert_eq!(
        collect(e.submit(request(turn.clone(), 6)).unwrap()).0,
        greedy_direct(&m, &turn, 6)
    );
    let st = idle(&e);
    // The repeat hits the 7 blocks before its last token (32 tokens); the turn (41 tokens)
    // hits 9: the first run computed 37 positions (the last generated token is never fed
    // back), 9 full blocks.
    assert_eq!(st.prefix_cache.hit_blocks, 7 + 9, "{st:?}");
}

#[test]
fn eviction_under_a_tiny_budget_never_reuses_stale_blocks() {
    // 12 blocks of 4 positions: each request needs 6-7, so every request evicts the cached
    // blocks of earlier ones; prefixes recur in an order that makes some blocks be found
    // again and others be found gone.
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: Some(12),
        max_batch: 1,
        ..EngineConfig::default()
    };
    let a = shared(17, 0, 1);
    let b: Vec<u32> = a.iter().map(|t| (t + 101) % 300).collect();
    let prompts = vec![
        a.clone(),
        b.clone(),
        a.clone(),
        shared(17, 3, 2),
        b,
        a.clone(),
        a[..9].to_vec(),
    ];
    let st = same_with_and_without(config, &prompts, 6, false);
    assert!(st.prefix_cache.evictions > 0, "{st:?}");
    assert!(st.prefix_cache.hit_blocks > 0, "{st:?}");
}

#[test]
fn preemption_mid_generation_gives_the_same_outputs() {
    // 10 blocks of 4 positions for 4 sequences of ~40 positions: sequences are preempted
    // while generating and recompute from what is still cached when readmitted.
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: Some(14),
        max_batch: 4,
        ..EngineConfig::default()
    };
    let prompts: Vec<Vec<u32>> = (0..4).map(|k| shared(13, k, 2 + k as usize)).collect();
    let st = same_with_and_without(config.clone(), &prompts, 24, true);
    assert!(st.preemptions_total > 0, "{st:?}");
    assert!(st.prefix_cache.hit_blocks > 0, "{st:?}");
}

#[test]
fn cancelled_requests_release_shared_blocks() {
    let m = model();
    let e = engine(EngineConfig {
        block_size: 4,
        kv_blocks: Some(30),
        ..EngineConfig::default()
    });
    let p = shared(24, 0, 3);
    // Two requests hold the prefix; one hangs up after its first token.
    let mut s1 = e.submit(request(p.clone(), 40)).unwrap();
    let s2 = e.submit(request(shared(24, 1, 2), 40)).unwrap();
    assert!(matches!(
        s1.blocking_next(),
        Some(GenerationEvent::Delta { .. })
    ));
    drop(s1);
    assert_eq!(collect(s2).0, greedy_direct(&m, &shared(24, 1, 2), 40));
    let st = idle(&e);
    // On a fast machine the first request may have generated all its tokens before the
    // engine sees the hang-up; either way its blocks must be released (checked below).
    assert!(st.requests_cancelled <= 1, "{st:?}");
    // The same prefix again, and then a request that needs every block of the cache: the
    // cached blocks are all reusable.
    assert_eq!(
        collect(e.submit(request(p.clone(), 8)).unwrap()).0,
        greedy_direct(&m, &p, 8)
    );
    let long: Vec<u32> = (0..100).map(|j| (j * 7 + 3) % 300).collect();
    let (ids, reason) = collect(e.submit(request(long.clone(), 19)).unwrap());
    assert_eq!(reason, Some(FinishReason::Length));
    assert_eq!(ids, greedy_direct(&m, &long, 19));
    let st = idle(&e);
    assert!(st.prefix_cache.evictions > 0, "{st:?}");
    assert_eq!(st.kv_blocks_used, 0);
}

/// The logits after a prefix taken from the cache equal those of the whole prompt computed
/// at once (and the cached blocks are never written).
#[test]
fn logits_after_cached_blocks_equal_the_whole_prompt() {
    let m = model();
    let bs = 4;
    let mut kv = m.new_kv_cache(bs, 32, None);
    let mut pool = BlockPool::new(32, bs, true);
    // Request A computes its prompt and registers its full blocks.
    let a = shared(21, 0, 3);
    let mut keys_a = Vec::new();
    pool.extend_keys(&a, &mut keys_a);
    let table_a = pool.allocate(pool.blocks_for(a.len() + 1)).unwrap();
    let logits_a = m
        .forward(
            &[SeqChunk {
                tokens: &a,
                start: 0,
                blocks: &table_a,
                logits: LogitsFor::Last,
            }],
            &mut kv,
        )
        .unwrap();
    let mut chain = None;
    for i in 0..a.len() / bs {
        chain = pool.register(chain, table_a[i], keys_a[i], &a[i * bs..(i + 1) * bs]);
        assert!(chain.is_some());
    }
    // Request B shares A's first 21 tokens: 5 blocks come from the cache.
    let b = shared(21, 1, 6);
    let mut keys_b = Vec::new();
    pool.extend_keys(&b, &mut keys_b);
    let hits = pool.lookup(&b, &keys_b);
    assert_eq!(hits.len(), 5);
    let fresh = pool.blocks_for(b.len() + 1) - hits.len();
    let table_b = pool.acquire(&hits, fresh).unwrap();
    let start = hits.len() * bs;
    let cached = m
        .forward(
            &[SeqChunk {
                tokens: &b[start..],
                start,
                blocks: &table_b,
                logits: LogitsFor::All,
            }],
            &mut kv,
        )
        .unwrap();
    // A's blocks still hold A's keys and values: its last position computed again over
    // them gives the same logits.
    let again = m
        .forward(
            &[SeqChunk {
                tokens: &a[a.len() - 1..],
                start: a.len() - 1,
                blocks: &table_a,
                logits: LogitsFor::Last,
            }],
            &mut kv,
        )
        .unwrap();
    let close = |x: &[f32], y: &[f32]| {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0f32, f32::max)
    };
    assert!(
        close(&again[0], &logits_a[0]) < 1e-5,
        "shared blocks written"
    );
    // B computed whole in a cache of its own.
    let mut kv2 = m.new_kv_cache(bs, 32, None);
    let own = kv2.allocate(8).unwrap();
    let whole = m
        .forward(
            &[SeqChunk {
                tokens: &b,
                start: 0,
                blocks: &own,
                logits: LogitsFor::All,
            }],
            &mut kv2,
        )
        .unwrap();
    let vocab = m.config.vocab_size;
    let tail = &whole[0][start * vocab..];
    let worst = close(&cached[0], tail);
    assert!(worst < 1e-5, "max relative difference {worst}");
    pool.release(&table_a);
    pool.release(&table_b);
    assert!(pool.is_idle());
}
