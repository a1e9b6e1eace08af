//! Every kernel against the plain dequantise-then-multiply reference, on every instruction
//! set this CPU supports.

use super::*;
use crate::ggml::GgmlType;

fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn fused_and_tiled_products_match_the_reference() {
    for format in WeightFormat::ALL {
        for &(rows, cols) in &[(7, 64), (33, 48), (20, 100), (130, 576), (3, 31)] {
            let w = lcg_values(rows * cols, (rows * 31 + cols) as u64);
            let mat = QMatrix::quantize(&w, rows, cols, format).unwrap();
            for m in [1, 2, 3, 4, 5, 8, 9, 16, 17, 40, 64, 128, 129] {
                let x = lcg_values(m * cols, m as u64 + 7);
                let want_f32 = mat.matmul_reference(&x, m);
                // int8 rows with few activation rows multiply 8-bit activations: their
                // reference is the dequantised weights times the dequantised activations.
                let x8 = cols
                    .is_multiple_of(32)
                    .then(|| crate::ggml::Q8Activations::for_type(GgmlType::Q8_0, &x, m, cols));
                for isa in isas() {
                    let want = if format == WeightFormat::Int8
                        && crate::ggml::int8_rows_use_q8(isa, cols, m)
                    {
                        let x8 = x8.as_ref().expect("rows of whole blocks");
                        mat.matmul_reference(&x8.dequantize_for(GgmlType::Q8_0).unwrap(), m)
                    } else if (format == WeightFormat::Fp8
                        && super::kernels::fp8_uses_bf16(isa, cols, m))
                        || (matches!(format, WeightFormat::Int8 | WeightFormat::Fp8)
                            && super::kernels::uses_bf16_tiles(isa, m))
                    {
                        // FP8 with few rows, and int8 and FP8 with many, on AVX-512 BF16: the
                        // activations rounded to bf16.
                        let xb: Vec<f32> = x
                            .iter()
                            .map(|&v| f32::from_bits((super::fp8_bf16::to_bf16(v) as u32) << 16))
                            .collect();
                        mat.matmul_reference(&xb, m)
                    } else {
                        want_f32.clone()
                    };
                    let mut got = vec![f32::NAN; m * rows];
                    mat.matmul_with(isa, &x, m, &mut got);
                    let e = rel_err(&got, &want);
                    assert!(
                        e < 2e-6,
                        "{format} {isa:?} {rows}x{cols} m={m}: rel err {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn f16_and_f32_rows_take_the_register_blocked_kernels_for_8_to_128_rows_on_avx512() {
    // The products themselves are checked against the reference above; this pins which
    // kernels they ran on, so that the blocked kernels stay covered.
    let w = lcg_values(6 * 64, 3);
    for format in [WeightFormat::F16, WeightFormat::F32] {
        let mat = QMatrix::quantize(&w, 6, 64, format).unwrap();
        for (m, want) in [
            (1, false),
            (7, false),
            (8, true),
            (40, true),
            (128, true),
            (129, false),
        ] {
            assert_eq!(
                super::kernels::blocked_rows(Isa::Avx512, &mat, m),
                want,
                "{format} m={m}"
            );
            assert!(!super::kernels::blocked_rows(Isa::Avx2, &mat, m));
        }
    }
    let int8 = QMatrix::quantize(&w, 6, 64, WeightFormat::Int8).unwrap();
    assert!(!super::kernels::blocked_rows(Isa::Avx512, &int8, 40));
}

#[test]
fn int8_fp8_and_ggml_rows_take_the_bf16_tiles_beyond_16_rows_on_avx512_bf16() {
    // The products are checked against the reference above; this pins the path, so that the
    // BF16 tiles stay covered where the CPU has them. (Under `SKYMOE_GGML_ACTIVATIONS=f32` the
    // f32 tiles keep every product.)
    if crate::ggml::activations() != crate::ggml::GgmlActivations::Auto {
        return;
    }
    let here = super::bf16_tiles::supported();
    for (m, want) in [
        (1, false),
        (16, false),
        (17, here),
        (64, here),
        (129, here),
        (4096, here),
    ] {
        assert_eq!(
            super::kernels::uses_bf16_tiles(Isa::Avx512, m),
            want,
            "m={m}"
        );
        assert!(!super::kernels::uses_bf16_tiles(Isa::Avx2, m));
        assert!(!super::kernels::uses_bf16_tiles(Isa::Scalar, m));
        // The 8-bit and the few-row bf16 products give way to the tiles.
        if want {
            assert!(!crate::ggml::int8_rows_use_q8(Isa::Avx512, 576, m), "m={m}");
            assert!(!super::kernels::fp8_uses_bf16(Isa::Avx512, 576, m), "m={m}");
        }
        // The ggml blocks: 8-bit activations with SIMD up to 64 rows, where the tiles do not
        // take them.
        // (An unsupported AVX-512 runs AVX2.)
        let simd = Isa::Avx2.supported();
        for ty in GgmlType::ALL {
            assert_eq!(
                crate::ggml::uses_int8(Isa::Avx512, ty, m),
                simd && m <= 64 && !want,
                "{ty} m={m}"
            );
        }
    }
}

#[test]
fn simd_dequantisation_matches_scalar() {
    for format in WeightFormat::ALL {
        let (rows, cols) = (5, 100);
        let w = lcg_values(rows * cols, 3);
        let mat = QMatrix::quantize(&w, rows, cols, format).unwrap();
        for isa in isas() {
            for r in 0..rows {
                let mut a = vec![0f32; cols];
                let mut b = vec![0f32; cols];
                kernels::dequantize_row(isa, &mat, r, &mut a);
                mat.dequantize_row_reference(r, &mut b);
                for (x, y) in a.iter().zip(&b) {
                    // q4 computes d·q − 8d by FMA in SIMD, d·(q − 8) in scalar code.
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                        "{format} {isa:?} row {r}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn quantisation_error_is_within_half_a_step() {
    let (rows, cols) = (6, 80);
    let w: Vec<f32> = lcg_values(rows * cols, 11)
        .iter()
        .map(|v| v * 3.0)
        .collect();
    for format in [
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Q4,
        WeightFormat::F16,
    ] {
        let mat = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let d = mat.dequantize();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
            for c in 0..cols {
                let (x, y) = (row[c], d[r * cols + c]);
                let bound = match format {
                    WeightFormat::Int8 => amax / 127.0 / 2.0 * 1.0001,
                    // 3 mantissa bits: half a step is 2^-4 of the value (or of 2^-6·scale).
                    WeightFormat::Fp8 => {
                        (x.abs() / 16.0).max(amax / 448.0 * 2f32.powi(-10)) * 1.0001
                    }
                    WeightFormat::Q4 => {
                        let g = c / Q4_GROUP;
                        let grp = &row[g * Q4_GROUP..((g + 1) * Q4_GROUP).min(cols)];
                        // Half a step, or a whole one at +8·d, clamped to 7·d (as llama.cpp's Q4_0).
                        grp.iter().fold(0f32, |a, x| a.max(x.abs())) / 8.0 * 1.0001
                    }
                    _ => x.abs() / 2048.0,
                };
                assert!(
                    (x - y).abs() <= bound,
                    "{format} ({r},{c}): {x} -> {y}, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn representable_values_survive_exactly() {
    // Per-row scale 1 when the largest magnitude is 448 (fp8) / 127 (int8).
    let row_fp8 = [448.0f32, -1.0, 0.5, 2f32.powi(-9), -3.5, 0.0, 12.0, -448.0];
    let m = QMatrix::quantize(&row_fp8, 1, 8, WeightFormat::Fp8).unwrap();
    assert_eq!(m.dequantize(), row_fp8.to_vec());
    let row_i8 = [127.0f32, -127.0, 0.0, 5.0, -64.0, 1.0];
    let m = QMatrix::quantize(&row_i8, 1, 6, WeightFormat::Int8).unwrap();
    assert_eq!(m.dequantize(), row_i8.to_vec());
}

#[test]
fn per_tensor_fp8_scales_and_bad_buffers() {
    let q: Vec<u8> = (0..12u8).map(|i| i * 9).collect();
    let m = QMatrix::from_fp8(q.clone(), &[0.5], 3, 4).unwrap();
    let d = m.dequantize();
    for (v, b) in d.iter().zip(&q) {
        assert_eq!(*v, fp8::e4m3_to_f32(*b) * 0.5);
    }
    assert!(matches!(
        QMatrix::from_fp8(q.clone(), &[0.5, 1.0], 3, 4),
        Err(QuantError::Length { .. })
    ));
    assert!(matches!(
        QMatrix::from_fp8(q[..5].to_vec(), &[0.5], 3, 4),
        Err(QuantError::Length { .. })
    ));
    assert!(matches!(
        QMatrix::from_fp8(q, &[f32::NAN], 3, 4),
        Err(QuantError::NonFinite(_))
    ));
    assert!(matches!(
        QMatrix::quantize(&[1.0, f32::INFINITY], 1, 2, WeightFormat::Int8),
        Err(QuantError::NonFinite(_))
    ));
    assert!("q5".parse::<WeightFormat>().is_err());
    assert_eq!("FP8".parse::<WeightFormat>().unwrap(), WeightFormat::Fp8);
}

#[test]
fn zero_rows_and_columns() {
    let m = QMatrix::quantize(&[0.0; 8], 2, 4, WeightFormat::Q4).unwrap();
    let mut out = vec![1.0f32; 2];
    m.matmul(&[1.0, 2.0, 3.0, 4.0], 1, &mut out);
    assert_eq!(out, vec![0.0, 0.0]);
}

#[test]
fn stacked_matrices_multiply_like_their_parts() {
    for format in WeightFormat::ALL {
        let a = QMatrix::quantize(&lcg_values(3 * 40, 1), 3, 40, format).unwrap();
        let b = QMatrix::quantize(&lcg_values(5 * 40, 2), 5, 40, format).unwrap();
        let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((ab.rows(), ab.cols()), (8, 40));
        let mut want = a.dequantize();
        want.extend(b.dequantize());
        assert_eq!(ab.dequantize(), want, "{format}");
        let c = QMatrix::quantize(&lcg_values(2 * 41, 2), 2, 41, format).unwrap();
        assert!(QMatrix::concat_rows(&[a, c]).is_err());
    }
}

#[test]
fn every_finite_fp8_code_decodes_exactly_on_every_isa() {
    // Row 0 holds the 254 finite codes (0x7F and 0xFF are NaN), padded to 256 with zeros.
    let mut q: Vec<u8> = (0..=255u8).filter(|b| b & 0x7F != 0x7F).collect();
    q.resize(256, 0);
    let mat = QMatrix::from_fp8(q.clone(), &[1.0], 1, 256).unwrap();
    let table = fp8::e4m3_table();
    for isa in isas() {
        let mut row = vec![f32::NAN; 256];
        kernels::dequantize_row(isa, &mat, 0, &mut row);
        for (b, v) in q.iter().zip(&row) {
            assert_eq!(
                v.to_bits(),
                table[*b as usize].to_bits(),
                "{isa:?} code {b:#04x}"
            );
        }
        // One-hot activations pick each weight out of the dot product exactly.
        for (c, b) in q.iter().enumerate() {
            let mut x = vec![0f32; 256];
            x[c] = 1.0;
            let mut out = [f32::NAN];
            mat.matmul_with(isa, &x, 1, &mut out);
            assert_eq!(out[0], table[*b as usize], "{isa:?} dot, code {b:#04x}");
        }
    }
}

/// Random ggml blocks with small finite f16 scales (at each type's scale fields).
fn ggml_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let n = rows * ty.row_bytes(cols).unwrap();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6K => &[208],
        _ => &[0, 2],
    };
    for block in b.chunks_exact_mut(ty.block_bytes()) {
        for &off in fields {
            let v = half::f16::from_f32((next() % 2000) as f32 * 1e-5 - 0.01).to_bits();
            block[off..off + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn ggml_matrix(ty: crate::ggml::GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let bytes = ggml_blocks(ty, rows, cols, seed);
    QMatrix::from_ggml(crate::ggml::GgmlMatrix::from_vec(ty, rows, cols, bytes).unwrap())
}

#[test]
fn ggml_matrices_and_mixed_stacks_match_the_reference() {
    use crate::ggml::GgmlType;
    let cols = 256;
    // A Q4_K_M-like qkv: q in Q4_K, k in Q4_K, v in Q6_K; then every type stacked.
    let stacks: Vec<Vec<(GgmlType, usize)>> = vec![
        vec![(GgmlType::Q4K, 24)],
        vec![(GgmlType::Q4K, 32), (GgmlType::Q4K, 8), (GgmlType::Q6K, 8)],
        GgmlType::ALL.iter().map(|&t| (t, 5)).collect(),
    ];
    for (k, parts) in stacks.iter().enumerate() {
        let mats: Vec<QMatrix> = parts
            .iter()
            .enumerate()
            .map(|(i, &(t, r))| ggml_matrix(t, r, cols, (k * 10 + i) as u64))
            .collect();
        let stacked = QMatrix::concat_rows(&mats).unwrap();
        let rows: usize = parts.iter().map(|p| p.1).sum();
        assert_eq!((stacked.rows(), stacked.cols()), (rows, cols));
        assert_eq!(
            stacked.storage_bytes(),
            mats.iter().map(|m| m.storage_bytes()).sum::<usize>()
        );
        let want_format = if parts.iter().all(|p| p.0 == parts[0].0) {
            MatrixFormat::Ggml(parts[0].0)
        } else {
            MatrixFormat::GgmlMixed
        };
        assert_eq!(stacked.format(), want_format);
        assert!(stacked.format().is_ggml());
        assert!(WeightFormat::ALL.iter().all(|&f| stacked.format() != f));
        assert!(stacked.try_data().is_none());
        // Rows dequantise as their own part's rows.
        let dense: Vec<f32> = mats.iter().flat_map(|m| m.dequantize()).collect();
        assert_eq!(stacked.dequantize(), dense);
        let mut row = vec![0f32; cols];
        stacked.dequantize_row(rows - 1, &mut row);
        assert_eq!(row, dense[(rows - 1) * cols..]);
        for m in [1, 3, 8, 9, 16, 17, 33] {
            let x = lcg_values(m * cols, m as u64 + 11);
            for isa in isas() {
                let mut got = vec![f32::NAN; m * rows];
                stacked.matmul_with(isa, &x, m, &mut got);
                // Each part's reference: the dequantised weights times the activations its
                // product uses (f32, or 8-bit ones dequantised).
                let mut want = vec![0f32; m * rows];
                let mut col0 = 0;
                for part in &mats {
                    let [seg] = part.ggml_segments().unwrap() else {
                        panic!("one segment")
                    };
                    let ty = seg.ty();
                    let w = if crate::ggml::uses_int8(isa, ty, m) {
                        let a = crate::ggml::Q8Activations::for_type(ty, &x, m, cols);
                        seg.matmul_q8_reference(&a)
                    } else if super::kernels::uses_bf16_tiles(isa, m) {
                        // Many rows on AVX-512 BF16: the activations rounded to bf16.
                        let xb: Vec<f32> = x
                            .iter()
                            .map(|&v| f32::from_bits((super::fp8_bf16::to_bf16(v) as u32) << 16))
                            .collect();
                        seg.matmul_reference(&xb, m)
                    } else {
                        seg.matmul_reference(&x, m)
                    };
                    for i in 0..m {
                        want[i * rows + col0..i * rows + col0 + seg.rows()]
                            .copy_from_slice(&w[i * seg.rows()..(i + 1) * seg.rows()]);
                    }
                    col0 += seg.rows();
                }
                let e = rel_err(&got, &want);
                assert!(e < 2e-6, "stack {k} {isa:?} m={m}: rel err {e}");
            }
        }
    }
}

#[test]
fn ggml_and_skymoe_matrices_do_not_stack() {
    let g = ggml_matrix(crate::ggml::GgmlType::Q8_0, 4, 64, 1);
    let f = QMatrix::quantize(&lcg_values(4 * 64, 2), 4, 64, WeightFormat::F32).unwrap();
    assert!(QMatrix::concat_rows(&[g.clone(), f.clone()]).is_err());
    assert!(QMatrix::concat_rows(&[f, g]).is_err());
    let narrow = ggml_matrix(crate::ggml::GgmlType::Q8_0, 4, 32, 3);
    let g = ggml_matrix(crate::ggml::GgmlType::Q8_0, 4, 64, 1);
    assert!(QMatrix::concat_rows(&[g, narrow]).is_err());
}

#[test]
fn skymoe_formats_compare_with_weight_formats() {
    for format in WeightFormat::ALL {
        let m = QMatrix::quantize(&lcg_values(2 * 32, 5), 2, 32, format).unwrap();
        assert_eq!(m.format(), format);
        assert_eq!(format, m.format());
        assert_eq!(m.format().weight_format(), Some(format));
        assert!(m.try_data().is_some());
    }
}

#[test]
fn int8_rows_with_8_bit_activations_are_the_same_bits_on_every_isa() {
    let (rows, cols) = (37, 576);
    let mut w = lcg_values(rows * cols, 11);
    // An all-zero row and one of the largest magnitudes.
    w[..cols].fill(0.0);
    w[cols..2 * cols].iter_mut().for_each(|v| *v *= 1e4);
    let mat = QMatrix::quantize(&w, rows, cols, WeightFormat::Int8).unwrap();
    let QData::Int8 { q, scales } = mat.data() else {
        unreachable!("int8 data")
    };
    for m in [1, 2, 3, 4, 5, 7, 8, 9, 17, 40, 64] {
        let mut x = lcg_values(m * cols, m as u64);
        // A zero block and an outlier in the activations.
        x[..32].fill(0.0);
        x[40] = 300.0;
        let a = crate::ggml::Q8Activations::for_type(GgmlType::Q8_0, &x, m, cols);
        let mut want = vec![f32::NAN; m * rows];
        crate::ggml::int8_rows_matmul_q8(Isa::Scalar, q, scales, &a, &mut want, rows, 0);
        let reference = mat.matmul_reference(&a.dequantize_for(GgmlType::Q8_0).unwrap(), m);
        assert!(rel_err(&want, &reference) < 1e-6, "m={m}");
        for isa in isas() {
            let mut got = vec![f32::NAN; m * rows];
            crate::ggml::int8_rows_matmul_q8(isa, q, scales, &a, &mut got, rows, 0);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{isa:?} m={m}: differs from the portable code");
        }
    }
}

/// A matrix of `format` whose values are read in place from shared bytes (as a served
/// checkpoint's memory map), at an odd offset for the byte formats.
fn shared_copy(mat: &QMatrix) -> QMatrix {
    let (rows, cols) = (mat.rows(), mat.cols());
    let lead = 3;
    let shared = |payload: &[u8]| -> SharedBytes {
        let mut v = vec![0xAAu8; lead];
        v.extend_from_slice(payload);
        std::sync::Arc::new(v)
    };
    match mat.data() {
        QData::F16(bits) => {
            // One leading value: the f16 values stay aligned in a Vec<u16>'s allocation.
            let mut v: Vec<u16> = vec![0; 1];
            v.extend_from_slice(bits);
            let words: SharedBytes = std::sync::Arc::new(VecU16(v));
            QMatrix::from_f16(Store::shared(words, 2, rows * cols).unwrap(), rows, cols).unwrap()
        }
        QData::Int8 { q, scales } => {
            let raw: Vec<u8> = q.iter().map(|&b| b as u8).collect();
            let s = Store::<i8>::shared(shared(&raw), lead, rows * cols).unwrap();
            QMatrix::from_int8(s, scales, rows, cols).unwrap()
        }
        QData::Fp8 { q, scales } => {
            let s = Store::<u8>::shared(shared(q), lead, rows * cols).unwrap();
            QMatrix::from_fp8(s, scales, rows, cols).unwrap()
        }
        QData::Q4 { packed, scales } => {
            let s = Store::<u8>::shared(shared(packed), lead, packed.len()).unwrap();
            QMatrix::from_q4(s, scales.clone(), rows, cols).unwrap()
        }
        QData::F32(_) => unreachable!("f32 is always owned"),
    }
}

#[test]
fn matrices_read_in_place_stack_without_copying_and_multiply_like_owned_ones() {
    for format in [
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Q4,
    ] {
        let cols = 96;
        let parts: Vec<QMatrix> = [(40, 1u64), (9, 2), (23, 3)]
            .iter()
            .map(|&(rows, seed)| {
                QMatrix::quantize(&lcg_values(rows * cols, seed), rows, cols, format).unwrap()
            })
            .collect();
        let owned = QMatrix::concat_rows(&parts).unwrap();
        assert!(!owned.is_shared() && owned.stacked_parts().is_none());
        // The first part owned, the others read in place.
        let mixed = [
            parts[0].clone(),
            shared_copy(&parts[1]),
            shared_copy(&parts[2]),
        ];
        assert!(mixed[1].is_shared() && mixed[2].is_shared());
        let stacked = QMatrix::concat_rows(&mixed).unwrap();
        assert_eq!(
            stacked.stacked_parts().map(|p| p.len()),
            Some(3),
            "{format}"
        );
        assert_eq!(stacked.format(), format);
        assert_eq!(stacked.rows(), 72);
        assert_eq!(stacked.storage_bytes(), owned.storage_bytes());
        assert!(stacked.try_data().is_none());
        assert_eq!(stacked.dequantize(), owned.dequantize(), "{format}");
        // Stacking a stack flattens it.
        let again = QMatrix::concat_rows(&[stacked.clone(), shared_copy(&parts[1])]).unwrap();
        assert_eq!(again.stacked_parts().map(|p| p.len()), Some(4));
        for m in [1, 3, 17, 40] {
            let x = lcg_values(m * cols, 50 + m as u64);
            for isa in isas() {
                let mut want = vec![f32::NAN; m * 72];
                owned.matmul_with(isa, &x, m, &mut want);
                let mut got = vec![f32::NAN; m * 72];
                stacked.matmul_with(isa, &x, m, &mut got);
                let e = rel_err(&got, &want);
                assert!(e < 2e-6, "{format} {isa:?} m={m}: rel err {e}");
            }
        }
    }
}

/// u16 values seen as their (little-endian, on the targets that read in place) bytes.
struct VecU16(Vec<u16>);

impl AsRef<[u8]> for VecU16 {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: u16 has no padding and any u8 alignment is satisfied; the slice covers the
        // same initialised memory for as long as `self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 2) }
    }
}

/// Products kept on the calling thread give the bits of the parallel ones, for skymoe's
/// formats and for ggml blocks; the setting ends with the scope, also when it unwinds.
#[test]
fn products_kept_on_this_thread_match_the_parallel_ones() {
    let (rows, cols) = (512, 576);
    let w = lcg_values(rows * cols, 91);
    let mut mats: Vec<QMatrix> = WeightFormat::ALL
        .iter()
        .map(|&f| QMatrix::quantize(&w, rows, cols, f).unwrap())
        .collect();
    let ty = GgmlType::Q8_0;
    let blocks = crate::ggml::tests::random_blocks(ty, rows, cols, 92);
    mats.push(QMatrix::from_ggml(
        GgmlMatrix::from_vec(ty, rows, cols, blocks).unwrap(),
    ));
    for mat in &mats {
        for m in [1, 4] {
            let x = lcg_values(m * cols, 93 + m as u64);
            let mut parallel = vec![f32::NAN; m * rows];
            mat.matmul(&x, m, &mut parallel);
            let mut serial = vec![f32::NAN; m * rows];
            on_this_thread(|| {
                assert!(kept_on_this_thread());
                mat.matmul(&x, m, &mut serial);
            });
            assert!(!kept_on_this_thread());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&parallel), bits(&serial), "{:?}, m {m}", mat.format());
        }
    }
    let unwound = std::panic::catch_unwind(|| on_this_thread(|| panic!("inside")));
    assert!(unwound.is_err() && !kept_on_this_thread());
}

#[test]
fn dequantised_tiles_hold_whole_micro_kernel_panels_within_their_budget() {
    for cols in [
        1, 31, 64, 100, 576, 960, 1536, 4096, 4097, 5000, 8192, 9000, 70_000,
    ] {
        let rows = super::kernels::tile_rows(cols);
        assert!((8..=128).contains(&rows), "{cols} columns: {rows} rows");
        // About 256 KiB of f32 (65536 values), or the 8-row minimum for very wide rows.
        assert!(
            rows * cols <= 65536 || rows == 8,
            "{cols} columns: {rows} rows"
        );
        if rows >= 16 {
            assert_eq!(rows % 16, 0, "{cols} columns: {rows} rows");
        }
    }
    // Rows of SmolLM2's widths: 112 for 576 columns (113 before), 32 for 1536 (42 before).
    assert_eq!(super::kernels::tile_rows(576), 112);
    assert_eq!(super::kernels::tile_rows(1536), 32);
}
