//! What a decoding step's attention costs: one sequence's query row against `POSITIONS`
//! cached positions in every layer of an f16 KV cache shaped like SmolLM2-135M's (30 layers,
//! 9 query heads over 3 kv heads of 64, blocks of 16 stored head by head as the served model
//! stores them), with the CPU's caches evicted between steps as a decode step's weights evict
//! them (a 256 MiB read), timed per step (median of 50).
//!
//! ```sh
//! cargo run --release -p skymoe-serve --example decode_attention -- [POSITIONS] [warm] [f32|f16|int8]
//! ```
//!
//! `warm` skips the eviction: the cache then stays in the CPU's caches when it fits. The
//! entries are f16 unless another element type is named.

use std::time::Instant;

use skymoe_serve::kv_cache::{KvCache, KvDtype};
use skymoe_serve::model::{attend, ChunkPlacement, HeadShape};

fn main() {
    let mut args = std::env::args().skip(1);
    let positions: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1200);
    let (mut warm, mut dtype) = (false, KvDtype::F16);
    for a in args {
        if a == "warm" {
            warm = true;
        } else {
            dtype = a.parse().unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let (layers, heads, kv_heads, hd, block) = (30, 9, 3, 64, 16);
    let shape = HeadShape {
        heads,
        kv_heads,
        head_dim: hd,
        value_dim: hd,
        scale: 0.125,
        first_head: 0,
        first_kv_head: 0,
        group: heads / kv_heads,
    };
    let kv_dim = kv_heads * hd;
    let kv = KvCache::new(layers, kv_dim, block, positions.div_ceil(block) + 64, dtype)
        .with_head_width(hd);
    // `SKYMOE_KEYS_BY_POSITION=1`: keys stored position by position, as before the served
    // model stored them by dimension.
    let mut kv = if std::env::var_os("SKYMOE_KEYS_BY_POSITION").is_some() {
        kv
    } else {
        kv.with_keys_by_dimension()
    };
    // Blocks in the order a growing sequence takes them from a fresh pool.
    let mut blocks = kv.allocate(positions.div_ceil(block) + 64).expect("blocks");
    // `SKYMOE_BLOCKS_REVERSED=1`: the block table in decreasing order.
    if std::env::var_os("SKYMOE_BLOCKS_REVERSED").is_some() {
        blocks.reverse();
    }
    let value = |i: usize| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0;
    for layer in 0..layers {
        for pos in 0..positions {
            let row: Vec<f32> = (0..kv_dim)
                .map(|i| value(pos * kv_dim + i + layer))
                .collect();
            kv.write(layer, &blocks, pos, &row, &row);
        }
    }
    let q: Vec<f32> = (0..heads * hd).map(|i| value(i * 3)).collect();
    let chunk = ChunkPlacement {
        row: 0,
        len: 1,
        start: positions - 1,
        blocks: &blocks,
    };
    let evict: Vec<u64> = vec![1; 32 << 20];
    let mut times = Vec::new();
    // On a worker of the thread pool, as the model's forward pass runs.
    rayon::scope(|_| {
        for step in 0..55 {
            if !warm {
                std::hint::black_box(evict.iter().sum::<u64>());
            }
            let t = Instant::now();
            for layer in 0..layers {
                std::hint::black_box(attend(&q, &[chunk], &kv, layer, shape));
            }
            if step >= 5 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    });
    times.sort_by(f64::total_cmp);
    let bytes = (layers
        * positions
        * KvCache::bytes_per_position(1, 2 * kv_dim, 2 * kv_heads, dtype)) as f64;
    let ms = times[times.len() / 2];
    println!(
        "{positions} positions, {dtype}, {}: {ms:.3} ms per step (median), {:.1} GB/s of keys and values",
        if warm { "warm" } else { "evicted" },
        bytes / ms / 1e6
    );
}
