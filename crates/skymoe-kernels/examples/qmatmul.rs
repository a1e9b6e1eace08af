//! Throughput of the quantised products: `cargo run --release -p skymoe-kernels --example
//! qmatmul -- [rows cols m iters MiB]` prints weights/s and GB/s of weight storage for every
//! format, one thread and all threads.

use std::time::Instant;

use skymoe_kernels::quant::{QMatrix, WeightFormat};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: rows cols m iters MiB"))
        .collect();
    let rows = args.first().copied().unwrap_or(3072);
    let cols = args.get(1).copied().unwrap_or(576);
    let m = args.get(2).copied().unwrap_or(1);
    let iters = args.get(3).copied().unwrap_or(200);
    // Many matrices (256 MiB of f32 weights unless told) so that they do not fit in cache, as
    // in a decode step; a small total measures the kernel on cached weights.
    let total_mib = args.get(4).copied().unwrap_or(256);
    let copies = (total_mib << 20) / (rows * cols);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
        .collect();
    let mut out = vec![0f32; m * rows];
    for format in [
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::F16,
        WeightFormat::Q4,
    ] {
        let mats: Vec<QMatrix> = (0..copies.max(1))
            .map(|_| QMatrix::quantize(&w, rows, cols, format).unwrap())
            .collect();
        let bytes = mats[0].storage_bytes();
        for threads in [1, 0] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for mat in &mats {
                    mat.matmul(&x, m, &mut out);
                }
                let t = Instant::now();
                for i in 0..iters {
                    mats[i % mats.len()].matmul(&x, m, &mut out);
                }
                let s = t.elapsed().as_secs_f64();
                println!(
                    "{format:>5} {rows}x{cols} m={m} threads={}: {:.2} Gweights/s, {:.2} GB/s, {:.1} us/product",
                    pool.current_num_threads(),
                    (rows * cols * iters) as f64 / s / 1e9,
                    (bytes * iters) as f64 / s / 1e9,
                    s / iters as f64 * 1e6
                );
            });
        }
    }
}
