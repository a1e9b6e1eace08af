//! Throughput of the ggml quantised products: `cargo run --release -p skymoe-kernels --example
//! ggml_matmul -- [ROWS COLS ITERS MiB M...]` times `y = x·Wᵀ` for every ggml type (median of
//! ITERS calls, all threads) with f32 activations, with 8-bit activations (their quantisation
//! included) and as the default path chooses (on CPUs with AVX512-BF16, the bf16 tiles beyond
//! 16 rows, their activations' conversion included), for M activation rows (default 1, 4 and
//! 16), and prints GB/s of weight bytes read, Gweights/s and the path
//! [`skymoe_kernels::ggml::activations`] picks;
//! then the int8 and q4 [`QMatrix`] formats. The weights are spread over copies of the matrix
//! totalling about MiB of storage per type (default 128) so that they stream from memory as in
//! a decode step. Types whose block does not divide COLS (default 576) use the next multiple of
//! their block. The products run on a worker of the pool, as the serving engine's do.

use std::sync::Arc;
use std::time::Instant;

use skymoe_kernels::ggml::{uses_int8, GgmlMatrix, GgmlType, Q8Activations};
use skymoe_kernels::quant::{uses_bf16_tiles, Isa, QMatrix, WeightFormat};

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

fn report(name: &str, rows: usize, cols: usize, m: usize, bytes: usize, s: f64) -> f64 {
    let gbs = bytes as f64 / s / 1e9;
    print!(
        "{name:>5} {rows}x{cols} m={m:<2}: {gbs:7.2} GB/s {:7.2} Gweights/s {:9.1} us/product",
        (rows * cols) as f64 / s / 1e9,
        s * 1e6
    );
    gbs
}

fn main() {
    // On a worker of the pool, as the serving engine runs its forward passes: a product called
    // from another thread would pay for handing its tasks to the pool and waking it each time.
    rayon::scope(|_| run());
}

fn run() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: ROWS COLS ITERS MiB M..."))
        .collect();
    let rows = args.first().copied().unwrap_or(3072);
    let cols0 = args.get(1).copied().unwrap_or(576);
    let iters = args.get(2).copied().unwrap_or(200).max(1);
    let total = args.get(3).copied().unwrap_or(128) << 20;
    let ms: Vec<usize> = if args.len() > 4 {
        args[4..].to_vec()
    } else {
        vec![1, 4, 16]
    };
    let isa = Isa::detect();
    println!(
        "isa {}, {} threads, {} MiB of weights per type",
        isa.name(),
        rayon::current_num_threads(),
        total >> 20
    );
    let mut rng = Lcg(42);
    for ty in GgmlType::ALL {
        let cols = cols0
            .next_multiple_of(ty.block_elems())
            .max(ty.block_elems());
        let rb = ty.row_bytes(cols).expect("whole blocks");
        let bytes = rows * rb;
        let copies = (total / bytes.max(1)).max(1);
        // One buffer holding every copy back to back, viewed at offsets (as a memory map).
        let buf = Arc::new(random_blocks(ty, bytes * copies, &mut rng));
        let mats: Vec<GgmlMatrix> = (0..copies)
            .map(|c| GgmlMatrix::new(ty, rows, cols, buf.clone(), c * bytes).unwrap())
            .collect();
        for &m in &ms {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * rows];
            let s = median_secs(iters, copies, |i| {
                mats[i % copies].matmul_f32_into_with(isa, &x, m, &mut out, rows, 0)
            });
            let f = report(ty.name(), rows, cols, m, bytes, s);
            println!("  f32 activations");
            let s = median_secs(iters, copies, |i| {
                let a = Q8Activations::for_type(ty, &x, m, cols);
                mats[i % copies].matmul_q8_with(isa, &a, &mut out)
            });
            let q = report(ty.name(), rows, cols, m, bytes, s);
            println!(
                " int8 activations: {:.2}x{}",
                q / f,
                if uses_int8(isa, ty, m) { " (used)" } else { "" }
            );
            let s = median_secs(iters, copies, |i| {
                mats[i % copies].matmul_with(isa, &x, m, &mut out)
            });
            let d = report(ty.name(), rows, cols, m, bytes, s);
            let path = if uses_int8(isa, ty, m) {
                "int8 activations"
            } else if uses_bf16_tiles(isa, m) {
                "bf16 tiles"
            } else {
                "f32 activations"
            };
            println!(" default ({path}): {:.2}x", d / f);
        }
    }
    let cols = cols0;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for &m in &ms {
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let mut out = vec![0f32; m * rows];
        for format in [WeightFormat::Int8, WeightFormat::Q4] {
            let first = QMatrix::quantize(&w, rows, cols, format).unwrap();
            let bytes = first.storage_bytes();
            let copies = (total / bytes.max(1)).max(1);
            let mats: Vec<QMatrix> = (0..copies).map(|_| first.clone()).collect();
            let s = median_secs(iters, copies, |i| mats[i % copies].matmul(&x, m, &mut out));
            report(format.name(), rows, cols, m, bytes, s);
            println!();
        }
    }
}
