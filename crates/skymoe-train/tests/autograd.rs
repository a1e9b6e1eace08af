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
