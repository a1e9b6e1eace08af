//! The autograd rules the trainer relies on, through the workspace's candle-core (whose
//! backward pass stores a tensor's first gradient as it is instead of adding it to zeroes, see
//! vendor/candle-core/SKYMOE-PATCH.md): gradients reaching a variable through shared nodes,
//! narrowed and transposed views, broadcasts and gathers add up exactly.

use candle_core::{Device, Tensor, Var, D};

#[test]
fn gradients_through_views_broadcasts_gathers_and_shared_nodes_add_up() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[[1f32, -2.0, 3.0], [0.5, 4.0, -1.0]], &dev)?)?;
    let xt = x.as_tensor();
    // Both operands of one addition are the same variable: 2 per element.
    let shared = (xt + xt)?.sum_all()?;
    // A narrowed view: 3 on the first two columns.
    let narrowed = (xt.narrow(1, 0, 2)? * 3.0)?.sum_all()?;
    // A row sum broadcast back over the row: 3 per element.
    let broadcast = xt.sum_keepdim(D::Minus1)?.broadcast_as((2, 3))?.sum_all()?;
    // A gather: 1 at (0, 2) and (1, 0) (its backward scatters into a contiguous gradient).
    let idx = Tensor::new(&[[2u32], [0]], &dev)?;
    let gathered = xt.gather(&idx, 1)?.sum_all()?;
    // A transposed view multiplied by c [2, 2]: Σ (xᵀ·c) has gradient Σ_k c[i][k] at x[i][j].
    let c = Tensor::new(&[[1f32, 2.0], [10.0, 20.0]], &dev)?;
    let product = xt.t()?.matmul(&c)?.sum_all()?;
    let loss = ((((shared + narrowed)? + broadcast)? + gathered)? + product)?;
    let grads = loss.backward()?;
    let got = grads.get(xt).expect("x has a gradient").to_vec2::<f32>()?;
    let c_row_sums = [3.0f32, 30.0];
    for (i, row) in got.iter().enumerate() {
        for (j, &g) in row.iter().enumerate() {
            let mut want = 2.0 + 3.0 + c_row_sums[i];
            if j < 2 {
                want += 3.0;
            }
            if (i, j) == (0, 2) || (i, j) == (1, 0) {
                want += 1.0;
            }
            assert_eq!(g, want, "gradient of x[{i}][{j}]");
        }
    }
    // The gradient of an unused variable is absent, not zeroes.
    let unused = Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &dev)?)?;
    assert!(grads.get(unused.as_tensor()).is_none());
    Ok(())
}

/// Values for a test tensor of `n` elements, different for each `seed`.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13) % 23) as f32 / 8.0 - 1.375)
        .collect()
}

/// A linear layer's product `x·Wᵀ` (the right operand a transposed view of the weight, shared
/// by two products) and a product whose left operand is a transposed view, in two and three
/// dimensions: the workspace's candle-core computes such operands' gradients in the layout of
/// the tensor they view (no element-by-element copy of a transposed gradient); the gradients
/// equal the products written out and arrive contiguous.
#[test]
fn gradients_through_transposed_product_operands() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (m, k, o) = (5, 4, 3);
    for batch in [None, Some(2usize)] {
        let shape = |r: usize, c: usize| match batch {
            None => vec![r, c],
            Some(b) => vec![b, r, c],
        };
        let tensor = |r: usize, c: usize, seed: usize| {
            Tensor::from_vec(values(r * c * batch.unwrap_or(1), seed), shape(r, c), &dev)
        };
        let x = Var::from_tensor(&tensor(m, k, 1)?)?;
        let w = Var::from_tensor(&tensor(o, k, 2)?)?;
        // Used as its transpose [m, k].
        let a = Var::from_tensor(&tensor(k, m, 3)?)?;
        let (g1, g2) = (tensor(m, o, 4)?, tensor(m, o, 5)?);
        let wt = w.t()?;
        let y1 = x.matmul(&wt)?;
        let y2 = a.t()?.matmul(&wt)?;
        let loss = ((y1 * &g1)?.sum_all()? + (y2 * &g2)?.sum_all()?)?;
        let grads = loss.backward()?;
        let want_w = (g1.t()?.matmul(x.as_tensor())? + g2.t()?.matmul(&a.t()?)?)?;
        let want_x = g1.matmul(w.as_tensor())?;
        let want_a = g2.matmul(w.as_tensor())?.t()?;
        for (name, var, want) in [("w", &w, want_w), ("x", &x, want_x), ("a", &a, want_a)] {
            let got = grads.get(var.as_tensor()).expect("a gradient");
            assert_eq!(got.dims(), var.dims(), "shape of the gradient of {name}");
            assert!(got.is_contiguous(), "gradient of {name} is contiguous");
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "gradient of {name} ({batch:?}): off by {diff}");
        }
    }
    Ok(())
}
