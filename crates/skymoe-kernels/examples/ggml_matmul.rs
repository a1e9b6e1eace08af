//! Throughput of the ggml quantised products: `cargo run --release -p skymoe-kernels --example
//! ggml_matmul -- [ROWS COLS M ITERS MiB]` times `y = x·Wᵀ` for every ggml type (median of
//! ITERS calls, all threads) and prints GB/s of weight bytes read and Gweights/s, next to the
//! int8 and q4 [`QMatrix`] formats. The weights are spread over copies of the matrix totalling
//! about MiB of storage per type (default 128) so that they stream from memory as in a decode
//! step; types whose block does not divide COLS are skipped.

use std::sync::Arc;
use std::time::Instant;

use skymoe_kernels::ggml::{GgmlMatrix, GgmlType};
use skymoe_kernels::quant::{Isa, QMatrix, WeightFormat};

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 32
    }
}

/// Random blocks with small finite f16 scales at the type's scale fields.
fn random_blocks(ty: GgmlType, n: usize, rng: &mut Lcg) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6K => &[208],
        _ => &[0, 2],
    };
    for block in b.chunks_exact_mut(ty.block_bytes()) {
        for &off in fields {
            let v = half::f16::from_f32((rng.next() % 1000) as f32 * 1e-5).to_bits();
            block[off..off + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Median seconds of `iters` calls of `f(i)`, after one warm-up pass over `warm` calls.
fn median_secs(iters: usize, warm: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..warm {
        f(i);
    }
    let mut t: Vec<f64> = (0..iters)
        .map(|i| {
            let s = Instant::now();
            f(i);
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn report(name: &str, rows: usize, cols: usize, m: usize, bytes: usize, s: f64) {
    println!(
        "{name:>5} {rows}x{cols} m={m}: {:7.2} GB/s {:7.2} Gweights/s {:9.1} us/product",
        bytes as f64 / s / 1e9,
        (rows * cols) as f64 / s / 1e9,
        s * 1e6
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: ROWS COLS M ITERS [MiB]"))
        .collect();
    let rows = args.first().copied().unwrap_or(3072);
    let cols = args.get(1).copied().unwrap_or(576);
    let m = args.get(2).copied().unwrap_or(1);
    let iters = args.get(3).copied().unwrap_or(200).max(1);
    let total = args.get(4).copied().unwrap_or(128) << 20;
    println!(
        "isa {}, {} threads, {} MiB of weights per type",
        Isa::detect().name(),
        rayon::current_num_threads(),
        total >> 20
    );
    let mut rng = Lcg(42);
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
        .collect();
    let mut out = vec![0f32; m * rows];
    for ty in GgmlType::ALL {
        let Some(rb) = ty.row_bytes(cols) else {
            println!(
                "{:>5} {rows}x{cols}: skipped ({cols} is not a multiple of {})",
                ty.name(),
                ty.block_elems()
            );
            continue;
        };
        let bytes = rows * rb;
        let copies = (total / bytes.max(1)).max(1);
        // One buffer holding every copy back to back, viewed at offsets (as a memory map).
        let buf = Arc::new(random_blocks(ty, bytes * copies, &mut rng));
        let mats: Vec<GgmlMatrix> = (0..copies)
            .map(|c| GgmlMatrix::new(ty, rows, cols, buf.clone(), c * bytes).unwrap())
            .collect();
        let s = median_secs(iters, copies, |i| mats[i % copies].matmul(&x, m, &mut out));
        report(ty.name(), rows, cols, m, bytes, s);
    }
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for format in [WeightFormat::Int8, WeightFormat::Q4] {
        let first = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let bytes = first.storage_bytes();
        let copies = (total / bytes.max(1)).max(1);
        let mats: Vec<QMatrix> = (0..copies).map(|_| first.clone()).collect();
        let s = median_secs(iters, copies, |i| mats[i % copies].matmul(&x, m, &mut out));
        report(format.name(), rows, cols, m, bytes, s);
    }
}
