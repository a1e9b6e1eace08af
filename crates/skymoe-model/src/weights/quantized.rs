//! Quantised tensors in safetensors checkpoints, as `skymoe quantize` writes them and as
//! vLLM / Skywork FP8 checkpoints store them: the weight `X.weight` in a narrow dtype and its
//! scale `X.weight_scale` in f32.
//!
//! | format | `X.weight`                       | `X.weight_scale`                     |
//! |--------|----------------------------------|--------------------------------------|
//! | fp8    | `F8_E4M3` `[rows, cols]`         | `[]`/`[1]` (per tensor), `[rows]`/`[rows, 1]` (per row) |
//! | int8   | `I8` `[rows, cols]`              | `[rows]`/`[rows, 1]` or per tensor    |
//! | q4     | `U8` `[rows, ceil(cols/32)·16]`  | `[rows, ceil(cols/32)]`              |
//!
//! Activation scales (`input_scale`, `act_scale`) are ignored: activations stay in f32.

use safetensors::Dtype;
use skymoe_kernels::quant::{q4_groups, QMatrix, Store};

use super::SafetensorsCheckpoint;
use crate::error::{ModelError, Result};

/// The name of the scale tensor of a quantised weight.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale")
}

fn bad(name: &str, reason: String) -> ModelError {
    ModelError::InvalidInput(format!("quantised tensor {name}: {reason}"))
}

/// Read `name` as a quantised matrix of `rows × cols` if it is stored in a quantised dtype
/// (`None` when it is stored as a float).
pub fn read_qmatrix(
    st: &SafetensorsCheckpoint,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Option<QMatrix>> {
    if !matches!(st.dtype(name)?, Dtype::F8_E4M3 | Dtype::I8 | Dtype::U8) {
        return Ok(None);
    }
    // The weight stays in the file's memory map: served as stored, it is never copied.
    let (dtype, shape, map, offset, len) = st.mapped(name)?;
    let scale_tensor = scale_name(name);
    if !st.contains(&scale_tensor) {
        return Err(ModelError::MissingTensor { name: scale_tensor });
    }
    let (sd, sshape, sbytes) = st.raw(&scale_tensor)?;
    let scales: Vec<f32> = match sd {
        Dtype::F32 => sbytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => sbytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => sbytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: scale_tensor,
                dtype: format!("{other:?}"),
            })
        }
    };
    let per_row_ok = |n: usize| n == 1 || n == rows;
    let mismatch = |expected: Vec<usize>| ModelError::ShapeMismatch {
        name: name.to_string(),
        expected,
        found: shape.clone(),
    };
    let m = match dtype {
        Dtype::F8_E4M3 | Dtype::I8 => {
            if shape != [rows, cols] {
                return Err(mismatch(vec![rows, cols]));
            }
            if !per_row_ok(scales.len()) {
                return Err(bad(
                    name,
                    format!(
                        "{} has shape {sshape:?}; expected one scale or {rows}",
                        scale_tensor
                    ),
                ));
            }
            let stored = || {
                bad(
                    name,
                    format!("{len} bytes do not hold {rows}x{cols} values"),
                )
            };
            if dtype == Dtype::F8_E4M3 {
                let q = Store::<u8>::shared(map, offset, len).ok_or_else(stored)?;
                QMatrix::from_fp8(q, &scales, rows, cols)
            } else {
                let q = Store::<i8>::shared(map, offset, len).ok_or_else(stored)?;
                QMatrix::from_int8(q, &scales, rows, cols)
            }
        }
        _ => {
            let groups = q4_groups(cols);
            if shape != [rows, groups * 16] {
                return Err(mismatch(vec![rows, groups * 16]));
            }
            let packed = Store::<u8>::shared(map, offset, len)
                .ok_or_else(|| bad(name, format!("{len} bytes lie outside the file")))?;
            QMatrix::from_q4(packed, scales, rows, cols)
        }
    }
    .map_err(|e| bad(name, e.to_string()))?;
    Ok(Some(m))
}

/// Read `name` as an f16 matrix of `rows × cols` left in place in the file's memory map (copied
/// only where its bytes are not aligned for u16) when it is stored as `F16`; `None` for other
/// dtypes.
pub fn read_f16_matrix(
    st: &SafetensorsCheckpoint,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Option<QMatrix>> {
    if st.dtype(name)? != Dtype::F16 {
        return Ok(None);
    }
    let (_, shape, map, offset, len) = st.mapped(name)?;
    if shape != [rows, cols] || len != rows * cols * 2 {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: vec![rows, cols],
            found: shape,
        });
    }
    let bits = match Store::<u16>::shared(map.clone(), offset, rows * cols) {
        Some(s) => s,
        None => (*map).as_ref()[offset..offset + len]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect::<Vec<u16>>()
            .into(),
    };
    Ok(Some(
        QMatrix::from_f16(bits, rows, cols).map_err(|e| bad(name, e.to_string()))?,
    ))
}
