//! ggml matrices: dequantisation against gguf's (committed fixtures, bit-exact; also the
//! integer values and group scales the bf16 tiles take), every fused
//! f32-activation kernel against the dequantise-then-multiply reference on every instruction
//! set this CPU supports, and malformed inputs (the 8-bit-activation kernels: `tests_q8`).

use super::*;

pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 32
    }
    /// Uniform in [-1, 1).
    pub(super) fn f32(&mut self) -> f32 {
        (self.next() as u32 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
}

pub(super) fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

/// Byte offsets of a type's f16 scale fields in a block.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
    }
}

/// Random blocks: random quant bytes, moderate random finite f16 scales.
pub(crate) fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed ^ 0x9E37_79B9_7F4A_7C15);
    let n = rows * ty.row_bytes(cols).unwrap();
    let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    for block in b.chunks_exact_mut(ty.block_bytes()) {
        for &off in f16_fields(ty) {
            let v = half::f16::from_f32(rng.f32() * 0.1).to_bits();
            block[off..off + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

pub(super) fn random_x(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..n).map(|_| rng.f32()).collect()
}

#[test]
fn type_table() {
    let sizes = [
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
    ];
    for (id, name, be, bb) in sizes {
        let ty = GgmlType::from_id(id).unwrap();
        assert_eq!(
            (ty.id(), ty.name(), ty.block_elems(), ty.block_bytes()),
            (id, name, be, bb)
        );
        assert_eq!(ty.to_string(), name);
        assert_eq!(ty.row_bytes(3 * be), Some(3 * bb));
        assert_eq!(ty.row_bytes(0), Some(0));
        assert_eq!(ty.row_bytes(be + 16), None);
    }
    for id in [0, 1, 4, 5, 9, 10, 11, 15, 16, 30, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}

/// Parse a fixture written by tools/reference/make_ggml_fixtures.py: the matrix (viewing the
/// file's bytes at the blocks' offset, as from a memory map) and gguf's dequantised values.
fn fixture(ty: GgmlType) -> (GgmlMatrix, Vec<f32>) {
    let path = format!(
        "{}/../../fixtures/reference/ggml/{}.bin",
        env!("CARGO_MANIFEST_DIR"),
        ty.name()
    );
    let file = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&file[..8], b"GGMLFIX1");
    let u32_at = |i: usize| u32::from_le_bytes(file[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(8), ty.id());
    let (rows, cols) = (u32_at(12) as usize, u32_at(16) as usize);
    let len = rows * ty.row_bytes(cols).unwrap();
    let want: Vec<f32> = file[20 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(want.len(), rows * cols, "{path}: value count");
    let mat = GgmlMatrix::from_type_id(ty.id(), rows, cols, Arc::new(file), 20).unwrap();
    (mat, want)
}

#[test]
fn dequantisation_matches_gguf_bit_for_bit() {
    for ty in GgmlType::ALL {
        let (mat, want) = fixture(ty);
        let cols = mat.cols();
        for isa in isas() {
            let mut row = vec![0f32; cols];
            for r in 0..mat.rows() {
                mat.dequantize_row_with(isa, r, &mut row);
                for (c, (a, b)) in row.iter().zip(&want[r * cols..]).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{ty} {isa:?} ({r},{c}): {a} vs gguf {b}"
                    );
                }
            }
        }
        let all = mat.dequantize();
        assert!(all
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn bf16_codes_rebuild_gguf_dequantisation_bit_for_bit() {
    if !crate::quant::bf16_tiles::supported() {
        return;
    }
    for ty in GgmlType::ALL {
        let (mat, want) = fixture(ty);
        let (cols, span) = (mat.cols(), blocks::group_span(ty));
        let blocks = mat.blocks();
        let rb = ty.row_bytes(cols).unwrap();
        let (mut pairs, mut s, mut o) = (
            vec![0u32; cols / 2],
            vec![f32::NAN; cols / span],
            vec![0f32; cols / span],
        );
        for r in 0..mat.rows() {
            codes_bf16(
                ty,
                &blocks[r * rb..(r + 1) * rb],
                &mut pairs,
                &mut s,
                &mut o,
            );
            for c in 0..cols {
                let bits = (pairs[c / 2] >> (16 * (c % 2))) & 0xFFFF;
                let code = f32::from_bits(bits << 16);
                assert!(
                    code.fract() == 0.0 && code.abs() <= 128.0,
                    "{ty} ({r},{c}): code {code}"
                );
                // Dequantisation's arithmetic: one rounding per operation.
                let g = c / span;
                let mut w = code * s[g];
                if blocks::has_min(ty) {
                    w += o[g];
                }
                let e = want[r * cols + c];
                assert_eq!(w.to_bits(), e.to_bits(), "{ty} ({r},{c}): {w} vs gguf {e}");
            }
        }
    }
}

#[test]
fn f16_conversion_is_exact() {
    for h in 0..=u16::MAX {
        let a = blocks::f16_to_f32(h);
        let b = half::f16::from_bits(h).to_f32();
        if b.is_nan() {
            assert!(a.is_nan(), "{h:#06x}");
        } else {
            assert_eq!(a.to_bits(), b.to_bits(), "{h:#06x}");
        }
    }
}

/// Every fused or tiled f32-activation product within f32-summation tolerance of the
/// reference, and the product [`activations`] chooses equal to the f32 or the 8-bit one.
fn check_products(ty: GgmlType, rows: usize, cols: usize, ms: &[usize]) {
    let mat = GgmlMatrix::from_vec(
        ty,
        rows,
        cols,
        random_blocks(ty, rows, cols, (rows * 1000 + cols) as u64),
    )
    .unwrap();
    let w = mat.dequantize();
    for &m in ms {
        let x = random_x(m * cols, (m * 7 + cols) as u64);
        let want = mat.matmul_reference(&x, m);
        for isa in isas() {
            let mut got = vec![f32::NAN; m * rows];
            mat.matmul_f32_into_with(isa, &x, m, &mut got, rows, 0);
            if activations() == GgmlActivations::Auto {
                let mut auto = vec![f32::NAN; m * rows];
                mat.matmul_with(isa, &x, m, &mut auto);
                if uses_int8(isa, ty, m) {
                    let a = Q8Activations::for_type(ty, &x, m, cols);
                    let mut q8 = vec![f32::NAN; m * rows];
                    mat.matmul_q8_with(isa, &a, &mut q8);
                    assert!(
                        same_bits(&auto, &q8),
                        "{ty} {isa:?} m={m}: auto is not int8"
                    );
                } else if cols.is_multiple_of(32)
                    && crate::quant::uses_bf16_tiles(effective(isa), m)
                {
                    // Many rows on AVX512-BF16: the dequantised weights times the
                    // activations rounded to bf16.
                    let xb: Vec<f32> = x
                        .iter()
                        .map(|&v| f32::from_bits((crate::quant::fp8_bf16::to_bf16(v) as u32) << 16))
                        .collect();
                    let want_b = mat.matmul_reference(&xb, m);
                    for i in 0..m {
                        for r in 0..rows {
                            let mag: f64 = (0..cols)
                                .map(|c| (xb[i * cols + c] as f64 * w[r * cols + c] as f64).abs())
                                .sum();
                            let (g, e) = (auto[i * rows + r], want_b[i * rows + r]);
                            assert!(
                                ((g - e) as f64).abs() <= 1e-5 * mag + 1e-30,
                                "{ty} {isa:?} m={m} ({i},{r}), bf16 activations: {g} vs {e}"
                            );
                        }
                    }
                } else {
                    assert!(
                        same_bits(&auto, &got),
                        "{ty} {isa:?} m={m}: auto is not f32"
                    );
                }
            }
            for i in 0..m {
                for r in 0..rows {
                    let mag: f64 = (0..cols)
                        .map(|c| (x[i * cols + c] as f64 * w[r * cols + c] as f64).abs())
                        .sum();
                    let (g, e) = (got[i * rows + r], want[i * rows + r]);
                    assert!(
                        ((g - e) as f64).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} {isa:?} {rows}x{cols} m={m} ({i},{r}): {g} vs {e} (sum |xw| {mag})"
                    );
                }
            }
        }
    }
}

pub(super) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn products_match_the_reference() {
    let ms = [1, 2, 3, 5, 8, 9, 16, 17, 40];
    for ty in GgmlType::ALL {
        for nb in 1..=3 {
            for rows in [1, 7, 19, 33] {
                check_products(ty, rows, nb * ty.block_elems(), &ms);
            }
        }
    }
}

#[test]
fn parallel_products_match_the_reference() {
    // Large enough for the row tasks to run on several threads.
    for ty in GgmlType::ALL {
        let cols = if ty.block_elems() == 32 { 576 } else { 768 };
        check_products(ty, 130, cols, &[1, 4, 17, 65, 129]);
    }
}

#[test]
fn dot_row_matches_the_product() {
    for ty in GgmlType::ALL {
        let cols = 2 * ty.block_elems();
        let mat = GgmlMatrix::from_vec(ty, 3, cols, random_blocks(ty, 3, cols, 5)).unwrap();
        let x = random_x(cols, 9);
        let want = mat.matmul_reference(&x, 1);
        for (r, &want) in want.iter().enumerate() {
            for isa in isas() {
                let d = dot_row_with(isa, ty, mat.row_bytes_of(r), &x);
                assert!(
                    (d - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{ty} {isa:?}"
                );
            }
            assert_eq!(
                dot_row(ty, mat.row_bytes_of(r), &x),
                dot_row_with(Isa::detect(), ty, mat.row_bytes_of(r), &x)
            );
        }
    }
}

#[test]
fn matrices_view_a_shared_buffer_at_an_offset() {
    let ty = GgmlType::Q4K;
    let blocks = random_blocks(ty, 4, 256, 1);
    let mut file = vec![0xAAu8; 100];
    file.extend_from_slice(&blocks);
    file.extend_from_slice(&[0x55; 7]);
    let shared: GgmlBytes = Arc::new(file);
    let a = GgmlMatrix::new(ty, 4, 256, shared.clone(), 100).unwrap();
    let b = GgmlMatrix::from_vec(ty, 4, 256, blocks.clone()).unwrap();
    assert_eq!(a.storage_bytes(), 4 * 144);
    assert_eq!(a.blocks(), &blocks[..]);
    assert_eq!(a.row_bytes_of(3), &blocks[3 * 144..]);
    assert_eq!(a.dequantize(), b.dequantize());
    // Two rows from the middle.
    let c = GgmlMatrix::new(ty, 2, 256, shared, 100 + 144).unwrap();
    assert_eq!(c.blocks(), &blocks[144..3 * 144]);
    assert_eq!((c.rows(), c.cols(), c.ty()), (2, 256, ty));
}

#[test]
fn empty_shapes() {
    for ty in GgmlType::ALL {
        let m = GgmlMatrix::from_vec(ty, 0, 64 * ty.block_elems() / 32, vec![]).unwrap();
        let mut out = vec![];
        m.matmul(&vec![0.0; 3 * m.cols()], 3, &mut out);
        let m = GgmlMatrix::from_vec(ty, 4, 0, vec![]).unwrap();
        let mut out = vec![f32::NAN; 8];
        m.matmul(&[], 2, &mut out);
        assert_eq!(out, vec![0.0; 8]);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let ty = GgmlType::Q4_0;
    let buf = |n: usize| -> GgmlBytes { Arc::new(vec![0u8; n]) };
    // Wrong length.
    let e = GgmlMatrix::from_vec(ty, 2, 64, vec![0; 71]).unwrap_err();
    assert_eq!(
        e,
        GgmlError::Length {
            ty,
            rows: 2,
            cols: 64,
            offset: 0,
            expected: 72,
            found: 71
        }
    );
    assert!(e.to_string().contains("expected 72 bytes"), "{e}");
    assert!(GgmlMatrix::from_vec(ty, 2, 64, vec![0; 73]).is_err());
    assert!(GgmlMatrix::from_vec(ty, 2, 64, vec![0; 72]).is_ok());
    // Tensor running past the end; offset past the end.
    assert!(matches!(
        GgmlMatrix::new(ty, 2, 64, buf(100), 29),
        Err(GgmlError::Length {
            expected: 72,
            found: 100,
            ..
        })
    ));
    assert!(GgmlMatrix::new(ty, 2, 64, buf(100), 28).is_ok());
    assert!(GgmlMatrix::new(ty, 0, 64, buf(100), 101).is_err());
    assert!(GgmlMatrix::new(ty, 1, 32, buf(100), usize::MAX).is_err());
    // Columns not a multiple of the block.
    let e = GgmlMatrix::new(GgmlType::Q6K, 1, 300, buf(1000), 0).unwrap_err();
    assert!(matches!(
        e,
        GgmlError::Cols {
            cols: 300,
            block: 256,
            ..
        }
    ));
    assert!(e.to_string().contains("Q6_K"), "{e}");
    assert!(GgmlMatrix::new(ty, 1, 33, buf(1000), 0).is_err());
    // Overflowing shapes.
    for (rows, cols, offset) in [
        (usize::MAX, 32, 0),
        (2, usize::MAX / 32 * 32, 0),
        (usize::MAX / 18, 32, 100),
        (1, 32, usize::MAX - 5),
    ] {
        let e = GgmlMatrix::new(ty, rows, cols, buf(100), offset).unwrap_err();
        assert!(
            matches!(e, GgmlError::Overflow { .. }),
            "{rows}x{cols}@{offset}: {e}"
        );
    }
    assert_eq!(
        GgmlMatrix::from_type_id(1, 1, 32, buf(100), 0).unwrap_err(),
        GgmlError::UnsupportedType(1)
    );
}

#[test]
fn strided_products_slices_and_gathers() {
    let (ty, rows, cols) = (GgmlType::Q5K, 12, 512);
    let m = GgmlMatrix::from_vec(ty, rows, cols, random_blocks(ty, rows, cols, 9)).unwrap();
    let dense = m.dequantize();
    for mm in [1, 5, 17] {
        let x = random_x(mm * cols, 4);
        let want = m.matmul_reference(&x, mm);
        for isa in isas() {
            // Columns 3..3+rows of a [mm, rows + 5] output; the rest stays untouched.
            let ld = rows + 5;
            let mut out = vec![7f32; mm * ld];
            m.matmul_f32_into_with(isa, &x, mm, &mut out, ld, 3);
            for i in 0..mm {
                for c in 0..ld {
                    let v = out[i * ld + c];
                    if (3..3 + rows).contains(&c) {
                        let w = want[i * rows + c - 3];
                        assert!((v - w).abs() <= 1e-4 * w.abs().max(1.0), "{isa:?}");
                    } else {
                        assert_eq!(v, 7.0);
                    }
                }
            }
        }
    }
    let s = m.slice_rows(4..9).unwrap();
    assert_eq!(s.dequantize(), dense[4 * cols..9 * cols]);
    assert!(m.slice_rows(4..13).is_none());
    let g = m.gather_rows(&[11, 0, 5]).unwrap();
    let want: Vec<f32> = [11, 0, 5]
        .iter()
        .flat_map(|&r| dense[r * cols..(r + 1) * cols].to_vec())
        .collect();
    assert_eq!(g.dequantize(), want);
    assert!(m.gather_rows(&[12]).is_none());
}

#[test]
#[should_panic(expected = "outside an output row")]
fn a_strided_product_past_the_row_panics() {
    let (ty, rows, cols) = (GgmlType::Q8_0, 4, 32);
    let m = GgmlMatrix::from_vec(ty, rows, cols, random_blocks(ty, rows, cols, 1)).unwrap();
    let mut out = vec![0f32; 8];
    m.matmul_into(&random_x(cols, 1), 1, &mut out, 6, 3);
}
