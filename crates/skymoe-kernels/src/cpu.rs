//! Helpers to read and write contiguous f32 CPU storage.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 elements a contiguous layout covers.
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernel expects a contiguous tensor"),
    }
}

/// The u32 elements a contiguous layout covers.
pub fn slice_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernel expects a contiguous tensor"),
    }
}

/// Rows of at least this many elements in total are worth splitting across threads.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 14;

/// A CPU f32 tensor owning `data`, outside the autograd graph.
pub fn cpu_tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cpu(CpuStorage::F32(data)),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Call `f` with the f32 elements of four CPU tensors (made contiguous first), as a custom
/// op's backward pass needs them.
pub fn slices<R>(ts: [&Tensor; 4], f: impl FnOnce([&[f32]; 4]) -> Result<R>) -> Result<R> {
    with_slices(&ts, |s| f([s[0], s[1], s[2], s[3]]))
}

/// Call `f` with the f32 elements of CPU tensors (made contiguous first), in order.
pub fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<Tensor>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut out: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("fused kernel expects CPU tensors");
        };
        out.push(slice(cpu, layout)?);
    }
    f(&out)
}
