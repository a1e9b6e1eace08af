//! Time the fused causal attention forward and backward:
//! `cargo run --release -p skymoe-kernels --example attention -- batch heads kv_heads seq head_dim iters`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().filter(|&v| v > 0).unwrap_or(d);
    let (b, h, kvh, t, hd, iters) = (
        arg(0, 2),
        arg(1, 8),
        arg(2, 4),
        arg(3, 256),
        arg(4, 32),
        arg(5, 50),
    );
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kvh, t, hd), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kvh, t, hd), &dev)?)?;
    let probe = Tensor::randn(0f32, 1.0, (b, t, h * hd), &dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t0 = Instant::now();
        let y = skymoe_kernels::causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            scale,
            0,
        )?;
        let loss = (y * &probe)?.sum_all()?;
        let t1 = Instant::now();
        let _g = loss.backward()?;
        fwd.push((t1 - t0).as_secs_f64());
        bwd.push(t1.elapsed().as_secs_f64());
    }
    fwd.sort_by(f64::total_cmp);
    bwd.sort_by(f64::total_cmp);
    println!(
        "batch {b} heads {h}/{kvh} seq {t} head_dim {hd}: forward {:.2} ms, backward {:.2} ms (medians of {iters})",
        fwd[iters / 2] * 1e3,
        bwd[iters / 2] * 1e3
    );
    Ok(())
}
