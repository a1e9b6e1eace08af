//! Time the grouped SwiGLU experts forward and backward:
//! `cargo run --release -p skymoe-kernels --example grouped_experts -- rows hidden ffn experts iters`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().filter(|&v| v > 0).unwrap_or(d);
    let (n, h, f, e, iters) = (
        arg(0, 1024),
        arg(1, 256),
        arg(2, 512),
        arg(3, 8),
        arg(4, 20),
    );
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h), &dev)?)?;
    let w13 = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (e, 2 * f, h), &dev)? * 0.05)?)?;
    let w2 = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (e, h, f), &dev)? * 0.05)?)?;
    let offsets: Vec<usize> = (0..=e).map(|i| i * n / e).collect();
    let probe = Tensor::randn(0f32, 1.0, (n, h), &dev)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t0 = Instant::now();
        let y = skymoe_kernels::grouped_swiglu(
            x.as_tensor(),
            w13.as_tensor(),
            w2.as_tensor(),
            &offsets,
        )?;
        let loss = (y * &probe)?.sum_all()?;
        let t1 = Instant::now();
        let _g = loss.backward()?;
        let t2 = Instant::now();
        fwd.push((t1 - t0).as_secs_f64());
        bwd.push((t2 - t1).as_secs_f64());
    }
    fwd.sort_by(f64::total_cmp);
    bwd.sort_by(f64::total_cmp);
    let flops = 2.0 * 3.0 * (n * h * f) as f64;
    let (tf, tb) = (fwd[iters / 2], bwd[iters / 2]);
    println!(
        "rows {n} hidden {h} ffn {f} experts {e}: forward {:.2} ms ({:.1} GFLOP/s), backward {:.2} ms ({:.1} GFLOP/s)",
        tf * 1e3,
        flops / tf / 1e9,
        tb * 1e3,
        2.0 * flops / tb / 1e9
    );
    Ok(())
}
