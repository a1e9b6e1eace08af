//! Helpers to read and write contiguous f32 CPU storage.

use candle_core::{CpuStorage, Layout, Result};

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
