//! Helpers to read and write contiguous f32 CPU storage.

use std::mem::MaybeUninit;

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

/// `n` floats for outputs that products overwrite whole, allocated without zeroing.
pub(crate) fn unfilled(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // Under test an element left unwritten shows as NaN in the results.
    #[cfg(test)]
    v.resize(n, MaybeUninit::new(f32::NAN));
    #[cfg(not(test))]
    v.resize_with(n, MaybeUninit::uninit);
    v
}

/// The floats of `v` once every one has been written.
///
/// # Safety
/// Every element of `v` must be initialised.
pub(crate) unsafe fn filled(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, every element is initialised (the
    // caller's contract), and the allocation passes whole from one vector to the other.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// The floats of `s` once every one has been written.
///
/// # Safety
/// Every element of `s` must be initialised.
pub(crate) unsafe fn filled_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: as in `filled`.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The largest absolute difference between two tensors' elements, infinite where either has
/// a NaN (candle's own maximum may skip NaNs) or the two cannot be read as f32.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
    let (Ok(a), Ok(b)) = (values(a), values(b)) else {
        return f32::INFINITY;
    };
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(&b).fold(0.0, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}
