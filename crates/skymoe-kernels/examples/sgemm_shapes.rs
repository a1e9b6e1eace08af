//! Time the single-threaded f32 product (`skymoe_kernels::sgemm`) on the layouts and shapes a
//! training step multiplies: `cargo run --release -p skymoe-kernels --example sgemm_shapes -- [iters]`.

use std::time::Instant;

use skymoe_kernels::sgemm::{sgemm, View};

/// One product's shape and operand layouts (`true`: the operand is stored transposed).
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
}

fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> View<'_> {
    if transposed {
        View::transpose_of(data, rows, cols, rows)
    } else {
        View::row_major(data, rows, cols, cols)
    }
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let cases = [
        Case {
            name: "expert up   x·W13ᵀ",
            m: 128,
            k: 256,
            n: 1024,
            a_t: false,
            b_t: true,
        },
        Case {
            name: "expert up, W13ᵀ stored",
            m: 128,
            k: 256,
            n: 1024,
            a_t: false,
            b_t: false,
        },
        Case {
            name: "expert down a·W2ᵀ",
            m: 128,
            k: 512,
            n: 256,
            a_t: false,
            b_t: true,
        },
        Case {
            name: "expert dA dY·W2",
            m: 128,
            k: 256,
            n: 512,
            a_t: false,
            b_t: false,
        },
        Case {
            name: "expert dX dGU·W13",
            m: 128,
            k: 1024,
            n: 256,
            a_t: false,
            b_t: false,
        },
        Case {
            name: "expert dW13 dGUᵀ·X",
            m: 512,
            k: 128,
            n: 256,
            a_t: true,
            b_t: false,
        },
        Case {
            name: "expert dW2 dYᵀ·A",
            m: 256,
            k: 128,
            n: 512,
            a_t: true,
            b_t: false,
        },
        Case {
            name: "proj x·Wᵀ 512x256x256",
            m: 512,
            k: 256,
            n: 256,
            a_t: false,
            b_t: true,
        },
        Case {
            name: "lm head 512x256x1024",
            m: 512,
            k: 256,
            n: 1024,
            a_t: false,
            b_t: true,
        },
        Case {
            name: "square 256",
            m: 256,
            k: 256,
            n: 256,
            a_t: false,
            b_t: false,
        },
    ];
    for c in &cases {
        let a: Vec<f32> = (0..c.m * c.k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        // Right-hand sides (weights) cycled through 64 MiB, more than the cache holds, as a
        // training step's expert weights are: each product reads its operand from memory.
        let copies = (64 << 20) / (4 * c.k * c.n);
        let b: Vec<Vec<f32>> = (0..copies.max(1))
            .map(|j| {
                (0..c.k * c.n)
                    .map(|i| (((i + j) * 5 % 11) as f32 - 5.0) * 0.1)
                    .collect()
            })
            .collect();
        let mut out = vec![0f32; c.m * c.n];
        let mut times = Vec::with_capacity(iters);
        for it in 0..iters {
            let b = &b[it % b.len()];
            let t = Instant::now();
            sgemm(
                view(&a, c.m, c.k, c.a_t),
                view(b, c.k, c.n, c.b_t),
                1.0,
                &mut out,
                c.n,
            );
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[iters / 2];
        println!(
            "{:<26} {:>4}x{:>4}x{:>4}: {:>7.1} us {:>6.1} GFLOP/s",
            c.name,
            c.m,
            c.k,
            c.n,
            t * 1e6,
            2.0 * (c.m * c.k * c.n) as f64 / t / 1e9
        );
    }
}
