//! Every fused kernel against its plain composition: values and gradients, on shapes small
//! (single-threaded path) and large (multi-threaded path).

use candle_core::{DType, Device, Result, Tensor, Var};
use skymoe_kernels::{
    causal_attention, causal_softmax, cross_entropy, grouped_swiglu, grouped_swiglu_to_sink,
    reference, reference_causal_attention, reference_grouped_swiglu, rms_norm, rope, rope_to_heads,
    silu_mul, softmax_last_dim, WeightGradSink,
};

/// Deterministic pseudo-random values in [-scale, scale).
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // A NaN on either side is an infinite difference (a maximum over candle's ops may skip it).
    a.iter().zip(&b).fold(0.0, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// Compare `fused` and `plain` (both functions of the vars) in value and in the gradient of
/// `Σ out · probe` with respect to every var.
fn check(
    vars: &[Var],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    plain: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused(&ts).unwrap();
    let b = plain(&ts).unwrap();
    let d = max_diff(&a, &b);
    assert!(d <= tol, "values differ by {d}");
    let probe = rand(a.dims(), 99, 1.0);
    let ga = (&a * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (&b * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let x = ga
            .get(v)
            .unwrap_or_else(|| panic!("fused op gave no gradient for input {i}"));
        let y = gb.get(v).expect("reference gradient");
        let scale = y
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = max_diff(x, y) / scale;
        assert!(d <= tol, "gradient of input {i} differs by {d} (relative)");
    }
}

#[test]
fn rms_norm_matches_reference() {
    for (rows, h, seed) in [(3, 8, 1u64), (300, 256, 2)] {
        let x = Var::from_tensor(&rand(&[rows, h], seed, 2.0)).unwrap();
        let w = Var::from_tensor(&(rand(&[h], seed + 7, 0.5) + 1.0).unwrap()).unwrap();
        check(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-5),
            |t| reference::rms_norm(&t[0], &t[1], 1e-5),
            2e-5,
        );
    }
}

#[test]
fn softmax_matches_reference() {
    for (shape, seed) in [(vec![2, 5], 3u64), (vec![4, 8, 64, 64], 4)] {
        let x = Var::from_tensor(&rand(&shape, seed, 6.0)).unwrap();
        check(
            &[x],
            |t| softmax_last_dim(&t[0]),
            |t| reference::softmax_last_dim(&t[0]),
            2e-5,
        );
    }
}

#[test]
fn causal_softmax_matches_masked_reference() {
    for (shape, offset, seed) in [
        (vec![1, 2, 4, 4], 0usize, 5u64),
        (vec![2, 4, 3, 7], 4, 6),
        (vec![2, 8, 128, 128], 0, 7),
    ] {
        let x = Var::from_tensor(&rand(&shape, seed, 6.0)).unwrap();
        check(
            std::slice::from_ref(&x),
            |t| causal_softmax(&t[0], offset),
            |t| reference::causal_softmax(&t[0], offset),
            2e-5,
        );
        // Masked entries are exactly zero.
        let y = causal_softmax(x.as_tensor(), offset).unwrap();
        let (t, s) = (shape[2], shape[3]);
        let rows = y
            .flatten_to(1)
            .unwrap()
            .reshape(((), t, s))
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            assert!(row[(offset + i + 1).min(s)..].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn silu_mul_matches_reference() {
    for (shape, seed) in [(vec![3, 5], 8u64), (vec![512, 96], 9)] {
        let a = Var::from_tensor(&rand(&shape, seed, 4.0)).unwrap();
        let b = Var::from_tensor(&rand(&shape, seed + 1, 2.0)).unwrap();
        check(
            &[a, b],
            |t| silu_mul(&t[0], &t[1]),
            |t| reference::silu_mul(&t[0], &t[1]),
            2e-5,
        );
    }
}

/// Each expert's rows through its own SwiGLU, one plain candle product chain per expert.
fn experts_one_by_one(t: &[Tensor], offsets: &[usize], ffn: usize) -> Result<Tensor> {
    let mut parts = Vec::new();
    for e in 0..offsets.len() - 1 {
        let n = offsets[e + 1] - offsets[e];
        if n == 0 {
            continue;
        }
        let x = t[0].narrow(0, offsets[e], n)?;
        let w13 = t[1].get(e)?;
        let gate = w13.narrow(0, 0, ffn)?;
        let up = w13.narrow(0, ffn, ffn)?;
        let act = (x.matmul(&gate.t()?)?.silu()? * x.matmul(&up.t()?)?)?;
        parts.push(act.matmul(&t[2].get(e)?.t()?)?);
    }
    Tensor::cat(&parts, 0)
}

#[test]
fn grouped_swiglu_matches_experts_one_by_one() {
    // Experts with no rows, one row, several row blocks; widths that the weight blocks do not
    // divide.
    for (offsets, h, f, seed) in [
        (vec![0usize, 3, 3, 4], 8usize, 6usize, 20u64),
        (vec![0, 70, 70, 370, 371, 400], 40, 300, 21),
        (vec![0, 5, 9], 520, 8, 22),
    ] {
        let e = offsets.len() - 1;
        let n = *offsets.last().unwrap();
        let x = Var::from_tensor(&rand(&[n, h], seed, 1.0)).unwrap();
        let w13 = Var::from_tensor(&rand(&[e, 2 * f, h], seed + 1, 0.3)).unwrap();
        let w2 = Var::from_tensor(&rand(&[e, h, f], seed + 2, 0.3)).unwrap();
        let o = offsets.clone();
        check(
            &[x.clone(), w13.clone(), w2.clone()],
            |t| grouped_swiglu(&t[0], &t[1], &t[2], &o),
            |t| experts_one_by_one(t, &o, f),
            2e-5,
        );
        check(
            &[x, w13, w2],
            |t| reference_grouped_swiglu(&t[0], &t[1], &t[2], &o),
            |t| experts_one_by_one(t, &o, f),
            2e-5,
        );
    }
    // Offsets that do not cover the rows, and mismatched shapes, are errors.
    let x = rand(&[4, 8], 1, 1.0);
    let w13 = rand(&[2, 12, 8], 2, 1.0);
    let w2 = rand(&[2, 8, 6], 3, 1.0);
    assert!(grouped_swiglu(&x, &w13, &w2, &[0, 2, 3]).is_err());
    assert!(grouped_swiglu(&x, &w13, &w2, &[0, 3, 2, 4]).is_err());
    assert!(grouped_swiglu(&x, &w13, &rand(&[2, 8, 5], 3, 1.0), &[0, 2, 4]).is_err());
    assert!(grouped_swiglu(&x, &w13, &w2, &[0, 2, 4]).is_ok());
}

/// Attention one head at a time with plain candle ops and an explicit mask.
fn attention_head_by_head(t: &[Tensor], scale: f64, offset: usize) -> Result<Tensor> {
    let (b, heads, tq, hd) = t[0].dims4()?;
    let (_, kv_heads, s, _) = t[1].dims4()?;
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (tq, s), &Device::Cpu)?;
    let mut rows = Vec::new();
    for bi in 0..b {
        let mut per_head = Vec::new();
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let q = t[0].get(bi)?.get(h)?;
            let k = t[1].get(bi)?.get(kv)?;
            let v = t[2].get(bi)?.get(kv)?;
            let scores = ((q.matmul(&k.t()?)? * scale)? + &mask)?;
            let max = scores.max_keepdim(1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(1)?)?;
            per_head.push(p.matmul(&v)?);
        }
        // [t, heads · hd]
        rows.push(Tensor::cat(&per_head, 1)?);
    }
    Tensor::stack(&rows, 0).map(|x| x.reshape((b, tq, heads * hd)).unwrap())
}

#[test]
fn causal_attention_matches_head_by_head() {
    // One query block, a cache offset, several query blocks with grouped heads.
    for (b, heads, kv_heads, t, offset, hd, seed) in [
        (1usize, 2usize, 1usize, 3usize, 0usize, 4usize, 30u64),
        (2, 4, 2, 3, 4, 8, 31),
        (2, 8, 4, 150, 0, 16, 32),
    ] {
        let s = offset + t;
        let q = Var::from_tensor(&rand(&[b, heads, t, hd], seed, 1.0)).unwrap();
        let k = Var::from_tensor(&rand(&[b, kv_heads, s, hd], seed + 1, 1.0)).unwrap();
        let v = Var::from_tensor(&rand(&[b, kv_heads, s, hd], seed + 2, 1.0)).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let vars = [q, k, v];
        check(
            &vars,
            |t| causal_attention(&t[0], &t[1], &t[2], scale, offset),
            |t| attention_head_by_head(t, scale, offset),
            2e-5,
        );
        check(
            &vars,
            |t| reference_causal_attention(&t[0], &t[1], &t[2], scale, offset),
            |t| attention_head_by_head(t, scale, offset),
            2e-5,
        );
    }
    // Shapes that disagree are errors.
    let q = rand(&[1, 3, 4, 8], 1, 1.0);
    let k = rand(&[1, 2, 4, 8], 2, 1.0);
    assert!(causal_attention(&q, &k, &k, 1.0, 0).is_err());
    let k = rand(&[1, 1, 4, 8], 2, 1.0);
    assert!(causal_attention(&q, &k, &k, 1.0, 1).is_err());
    assert!(causal_attention(&q, &k, &k, 1.0, 0).is_ok());
}

#[test]
fn grouped_swiglu_hands_weight_gradients_to_its_sink() {
    let offsets = [0usize, 3, 3, 10];
    let (h, f) = (12, 9);
    let x = Var::from_tensor(&rand(&[10, h], 40, 1.0)).unwrap();
    let w13 = Var::from_tensor(&rand(&[3, 2 * f, h], 41, 0.3)).unwrap();
    let w2 = Var::from_tensor(&rand(&[3, h, f], 42, 0.3)).unwrap();
    let probe = rand(&[10, h], 43, 1.0);
    let objective = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap();
    let graph = objective(grouped_swiglu(&x, &w13, &w2, &offsets).unwrap())
        .backward()
        .unwrap();
    // Each expert's weights as tensors of their own (views into the stacked ones here).
    let weights: Vec<(Tensor, Tensor, Tensor)> = (0..3)
        .map(|e| {
            let w13e = w13.get(e).unwrap();
            (
                w13e.narrow(0, 0, f).unwrap(),
                w13e.narrow(0, f, f).unwrap(),
                w2.get(e).unwrap(),
            )
        })
        .collect();
    let sink = WeightGradSink::default();
    let y = grouped_swiglu_to_sink(&x, &weights, &offsets, &sink).unwrap();
    let stacked = grouped_swiglu(&x, &w13, &w2, &offsets).unwrap();
    assert_eq!(max_diff(&y, &stacked), 0.0);
    let sunk = objective(y).backward().unwrap();
    assert!(sunk.get(&w13).is_none() && sunk.get(&w2).is_none());
    assert_eq!(max_diff(sunk.get(&x).unwrap(), graph.get(&x).unwrap()), 0.0);
    let grads = sink.take().expect("the backward pass filled the sink");
    assert_eq!(grads.len(), 3);
    let (d13, d2) = (graph.get(&w13).unwrap(), graph.get(&w2).unwrap());
    for (e, (gate, up, down)) in grads.iter().enumerate() {
        let d13e = d13.get(e).unwrap();
        assert_eq!(gate.dims(), [f, h]);
        assert_eq!(down.dims(), [h, f]);
        assert_eq!(max_diff(gate, &d13e.narrow(0, 0, f).unwrap()), 0.0);
        assert_eq!(max_diff(up, &d13e.narrow(0, f, f).unwrap()), 0.0);
        assert_eq!(max_diff(down, &d2.get(e).unwrap()), 0.0);
    }
    // The expert without rows (the second) gets zero gradients.
    assert_eq!(
        grads[1]
            .0
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(sink.take().is_none(), "taking empties the sink");
    // Weights of different shapes, and no experts, are errors.
    let odd = vec![
        weights[0].clone(),
        (
            weights[1].0.clone(),
            weights[1].1.clone(),
            rand(&[h, f + 1], 44, 0.3),
        ),
        weights[2].clone(),
    ];
    assert!(grouped_swiglu_to_sink(&x, &odd, &offsets, &sink).is_err());
    assert!(grouped_swiglu_to_sink(&x, &[], &offsets, &sink).is_err());
    assert!(grouped_swiglu_to_sink(&x, &weights[..2], &offsets, &sink).is_err());
}

#[test]
fn cross_entropy_matches_reference() {
    for (n, v, seed) in [(4usize, 7usize, 10u64), (256, 1000, 11)] {
        let x = Var::from_tensor(&rand(&[n, v], seed, 5.0)).unwrap();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect();
        let t = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
        let a = cross_entropy(x.as_tensor(), &t).unwrap();
        let b = reference::cross_entropy(x.as_tensor(), &t).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{a} vs {b}");
        let ga = a.backward().unwrap();
        let gb = b.backward().unwrap();
        let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(d < 1e-7, "gradient differs by {d}");
    }
    // A target outside the vocabulary is an error, not a panic.
    let x = rand(&[2, 3], 1, 1.0);
    let t = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    assert!(cross_entropy(&x, &t).is_err());
}

#[test]
fn other_dtypes_fall_back_to_the_reference() {
    let x = rand(&[4, 6], 12, 3.0).to_dtype(DType::F64).unwrap();
    let a = softmax_last_dim(&x).unwrap();
    assert_eq!(a.dtype(), DType::F64);
    let b = reference::softmax_last_dim(&x).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn rope_matches_reference() {
    for (shape, seed) in [(vec![1, 2, 3, 8], 13u64), (vec![4, 8, 128, 32], 14)] {
        let (t, d) = (shape[2], shape[3]);
        // "rotate_half" tables: both halves of each row equal.
        let half: Vec<f32> = (0..t * d / 2).map(|i| (i as f32 * 0.37).sin()).collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..t)
                .flat_map(|r| (0..d).map(move |c| (r, c % (d / 2))))
                .map(|(r, c)| f(half[r * d / 2 + c] * 3.0))
                .collect();
            Tensor::from_vec(v, (t, d), &Device::Cpu).unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let x = Var::from_tensor(&rand(&shape, seed, 2.0)).unwrap();
        check(
            &[x],
            |ts| rope(&ts[0], &cos, &sin),
            |ts| reference::rope(&ts[0], &cos, &sin),
            2e-5,
        );
        // From a projection's [batch, seq, heads, head_dim] into heads: the rotation of the
        // transpose, values and gradient.
        let (b, h) = (shape[0], shape[1]);
        let y = Var::from_tensor(&rand(&[b, t, h, d], seed + 7, 2.0)).unwrap();
        check(
            &[y],
            |ts| rope_to_heads(&ts[0], &cos, &sin),
            |ts| reference::rope(&ts[0].transpose(1, 2)?.contiguous()?, &cos, &sin),
            2e-5,
        );
    }
    // Shapes that are not [batch, seq, heads, head_dim] are errors.
    let table = Tensor::zeros((3, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(rope_to_heads(&rand(&[3, 8], 1, 1.0), &table, &table).is_err());
}
