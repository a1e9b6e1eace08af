//! Tensor-parallel serving with uneven shares, ranks as threads of one process (the same
//! code runs over MPI under `mpirun`; see crates/skymoe/tests/serve_tp.rs): every rank's
//! logits equal one process's.

use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::Checkpoint;
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel, TensorParallel, TpComm};

/// A group of threads summing through shared memory.
struct Threads {
    barrier: Barrier,
    buf: Mutex<Vec<f32>>,
}

struct Rank {
    group: Arc<Threads>,
    rank: usize,
    size: usize,
}

impl TpComm for Rank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), String> {
        let g = &self.group;
        if g.barrier.wait().is_leader() {
            *g.buf.lock().unwrap() = vec![0.0; data.len()];
        }
        g.barrier.wait();
        {
            let mut b = g.buf.lock().unwrap();
            b.iter_mut().zip(data.iter()).for_each(|(s, x)| *s += x);
        }
        g.barrier.wait();
        data.copy_from_slice(&g.buf.lock().unwrap());
        g.barrier.wait();
        Ok(())
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), String> {
        let g = &self.group;
        g.barrier.wait();
        if self.rank == root {
            *g.buf.lock().unwrap() = data.to_vec();
        }
        g.barrier.wait();
        data.copy_from_slice(&g.buf.lock().unwrap());
        g.barrier.wait();
        Ok(())
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(name)
}

fn logits(model: &ServeModel, a: &[u32], b: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = model.new_kv_cache(4, 8, None);
    let (ba, bb) = (kv.allocate(4).unwrap(), kv.allocate(4).unwrap());
    let mut out = model
        .forward(
            &[
                SeqChunk {
                    tokens: &a[..5],
                    start: 0,
                    blocks: &ba,
                    logits: LogitsFor::All,
                },
                SeqChunk {
                    tokens: b,
                    start: 0,
                    blocks: &bb,
                    logits: LogitsFor::Last,
                },
            ],
            &mut kv,
        )
        .unwrap();
    // Then one decode step of `a` (reads the cache written above).
    out.extend(
        model
            .forward(
                &[SeqChunk {
                    tokens: &a[5..6],
                    start: 5,
                    blocks: &ba,
                    logits: LogitsFor::Last,
                }],
                &mut kv,
            )
            .unwrap(),
    );
    out
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn sharded_logits(fam: &str, format: WeightFormat, weights: Vec<f64>) -> Vec<Vec<Vec<f32>>> {
    let size = weights.len();
    let group = Arc::new(Threads {
        barrier: Barrier::new(size),
        buf: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let group = group.clone();
            let weights = weights.clone();
            let fam = fam.to_string();
            std::thread::spawn(move || {
                let comm: Arc<dyn TpComm> = Arc::new(Rank { group, rank, size });
                let tp = TensorParallel::new(comm, Some(weights)).unwrap();
                let ckpt = Checkpoint::open(&fixture(&fam), &Device::Cpu).unwrap();
                let model = ServeModel::load_sharded(&ckpt, Some(format), Some(tp)).unwrap();
                logits(&model, &[3, 17, 42, 99, 7, 250], &[11, 5, 8])
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn uneven_tensor_parallel_equals_one_process() {
    // 4 heads on 3 ranks (2,1,1; kv heads shared between ranks 1 and 2 where there are 2),
    // FFN columns 11/11/10; and rank weights 1:2:1 (1,2,1 heads). DeepSeek's latent attention
    // splits its heads the same way, each rank caching the whole latent; OLMoE's q/k norm
    // over the whole projections sums each row's squares over the ranks.
    for fam in [
        "mixtral",
        "qwen2_moe",
        "skywork_moe_variant",
        "llama",
        "deepseek_v2",
        "deepseek_v3",
        "qwen3_moe",
        "olmoe",
    ] {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let alone = logits(
            &ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap(),
            &[3, 17, 42, 99, 7, 250],
            &[11, 5, 8],
        );
        for weights in [vec![1.0; 3], vec![1.0, 2.0, 1.0], vec![1.0; 2]] {
            for (rank, got) in sharded_logits(fam, WeightFormat::F32, weights.clone())
                .iter()
                .enumerate()
            {
                for (g, w) in got.iter().zip(&alone) {
                    let e = max_rel(g, w);
                    assert!(e < 1e-5, "{fam} {weights:?} rank {rank}: {e}");
                }
            }
        }
    }
}

#[test]
fn quantised_shards_stay_close_and_bad_splits_are_refused() {
    let ckpt = Checkpoint::open(&fixture("mixtral"), &Device::Cpu).unwrap();
    let alone = logits(
        &ServeModel::load(&ckpt, Some(WeightFormat::Int8)).unwrap(),
        &[3, 17, 42, 99, 7, 250],
        &[11, 5, 8],
    );
    let got = sharded_logits("mixtral", WeightFormat::Int8, vec![1.0; 3]);
    // Column shards get their own per-row scales: close to, not equal to, one process.
    assert!(max_rel(&got[0][0], &alone[0]) < 2e-2);
    // Five ranks for four heads cannot work.
    let group = Arc::new(Threads {
        barrier: Barrier::new(1),
        buf: Mutex::new(Vec::new()),
    });
    let comm: Arc<dyn TpComm> = Arc::new(Rank {
        group,
        rank: 0,
        size: 5,
    });
    let tp = TensorParallel::new(comm.clone(), None).unwrap();
    let e = ServeModel::load_sharded(&ckpt, Some(WeightFormat::F32), Some(tp)).unwrap_err();
    assert!(e.to_string().contains("cannot split 4"), "{e}");
    assert!(TensorParallel::new(comm, Some(vec![1.0; 2])).is_err());
}

#[test]
fn engine_leads_follower_ranks_to_the_same_generations() {
    use skymoe_serve::chat_template::ChatTemplate;
    use skymoe_serve::engine::{EngineConfig, EngineHandle, GenerationEvent, GenerationRequest};

    let dir = fixture("mixtral");
    let prompts: Vec<Vec<u32>> = vec![vec![3, 17, 42], vec![99, 7, 250, 11, 5], vec![8]];
    let generate = |model: ServeModel| -> Vec<Vec<u32>> {
        let tok = skymoe_model::Tokenizer::for_model(&dir, None).unwrap();
        let config = EngineConfig {
            kv_blocks: Some(16),
            block_size: 4,
            ..EngineConfig::default()
        };
        let e = EngineHandle::start(model, tok, ChatTemplate::chatml(), config);
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| {
                let r = GenerationRequest {
                    ignore_eos: true,
                    ..GenerationRequest::greedy(p.clone(), 9)
                };
                e.submit(r).unwrap()
            })
            .collect();
        streams
            .into_iter()
            .map(|mut s| {
                let mut ids = Vec::new();
                while let Some(ev) = s.blocking_next() {
                    if let GenerationEvent::Delta { token_ids, .. } = ev {
                        ids.extend(token_ids);
                    }
                }
                ids
            })
            .collect()
    };
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let alone = generate(ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap());
    let size = 3;
    let group = Arc::new(Threads {
        barrier: Barrier::new(size),
        buf: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let group = group.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let comm: Arc<dyn TpComm> = Arc::new(Rank { group, rank, size });
                let tp = TensorParallel::new(comm, None).unwrap();
                let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
                let model =
                    ServeModel::load_sharded(&ckpt, Some(WeightFormat::F32), Some(tp)).unwrap();
                if rank == 0 {
                    return (Some(model), 0);
                }
                let mut kv = model.new_kv_cache(4, 16, None);
                let passes = model.follow(&mut kv).unwrap();
                (None, passes)
            })
        })
        .collect();
    // The leading rank's model serves from the test thread's engine.
    let mut results = handles.into_iter();
    let lead = results.next().unwrap().join().unwrap().0.unwrap();
    let got = generate(lead);
    assert_eq!(got, alone);
    for h in results {
        let (_, passes) = h.join().unwrap();
        assert!(passes > 0, "a follower ran no forward pass");
    }
}
