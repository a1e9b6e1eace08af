//! Turning a strided view of a storage into row-major bytes.

use super::records::{TensorRecord, TorchDtype};

/// The elements of the view `t` in row-major order. `span` holds the storage's bytes from the
/// view's first element on (as [`TensorRecord::byte_span`] delimits them). Returns `None` when
/// the view does not fit its storage or `span` is too short for it.
pub fn gather(t: &TensorRecord, span: &[u8]) -> Option<Vec<u8>> {
    // Bounds every index computed below by the view's last byte.
    t.byte_span().ok()?;
    let es = t.dtype.size();
    let numel = t.numel()?;
    let out_len = numel.checked_mul(es)?;
    if numel == 0 {
        return Some(Vec::new());
    }
    if t.is_contiguous() {
        return span.get(..out_len).map(<[u8]>::to_vec);
    }
    let (&last, outer) = t.shape.split_last()?;
    let (&last_stride, outer_strides) = t.strides.split_last()?;
    let mut out = Vec::with_capacity(out_len);
    let mut index = vec![0usize; outer.len()];
    loop {
        let base: usize = index.iter().zip(outer_strides).map(|(&i, &s)| i * s).sum();
        if last_stride == 1 {
            let start = base * es;
            out.extend_from_slice(span.get(start..start + last * es)?);
        } else {
            for j in 0..last {
                let start = (base + j * last_stride) * es;
                out.extend_from_slice(span.get(start..start + es)?);
            }
        }
        // Advance the odometer over the outer dimensions.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            let (Some(i), Some(&n)) = (index.get_mut(d), outer.get(d)) else {
                return None;
            };
            *i += 1;
            if *i < n {
                break;
            }
            *i = 0;
        }
    }
}

/// Reverse the bytes of each element (for storages written on a big-endian machine).
pub fn swap_to_little_endian(bytes: &mut [u8], dtype: TorchDtype) {
    let unit = match dtype {
        TorchDtype::Complex64 | TorchDtype::Complex128 => dtype.size() / 2,
        _ => dtype.size(),
    };
    if unit > 1 {
        for c in bytes.chunks_exact_mut(unit) {
            c.reverse();
        }
    }
}
