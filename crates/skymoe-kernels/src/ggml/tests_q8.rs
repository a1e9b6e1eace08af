//! The 8-bit-activation products: the activation quantisation, every SIMD kernel equal to
//! the portable integer code bit for bit (every type, odd row counts, one to many activation
//! rows, partial groups of blocks), the portable code equal to the dequantised weights times
//! the dequantised activations, and the distance to the f32-activation product bounded by
//! the activations' rounding.

use super::tests::{isas, random_blocks, random_x, same_bits, Lcg};
use super::*;

/// Blocks per row covering whole groups of eight 32-weight blocks, partial ones and both.
fn block_counts(ty: GgmlType) -> &'static [usize] {
    if ty.block_elems() == 32 {
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 18, 27]
    } else {
        &[1, 2, 3]
    }
}

/// Activations with varied magnitudes per block (so that scales differ), some zero blocks.
fn varied_x(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    let mut x = random_x(n, seed ^ 77);
    for (b, block) in x.chunks_mut(32).enumerate() {
        let scale = match rng.next() % 8 {
            0 if b > 0 => 0.0,
            1 => 1e-3,
            2 => 40.0,
            _ => 1.0,
        };
        block.iter_mut().for_each(|v| *v *= scale);
    }
    x
}

/// `v` rounded to the nearest f16.
fn f16_rounded(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

#[test]
fn activations_quantise_within_half_a_step() {
    for cols in [32, 256, 288, 576, 768] {
        let rows = 3;
        let x = varied_x(rows * cols, cols as u64);
        let k = cols % 256 == 0;
        let a = Q8Activations::new(&x, rows, cols, true, k);
        assert_eq!((a.rows(), a.cols()), (rows, cols));
        assert!(a.serves(GgmlType::Q8_0) && a.serves(GgmlType::Q4K) == k);
        for size in [32, 256] {
            if size == 256 && !k {
                continue;
            }
            let ty = if size == 32 {
                GgmlType::Q8_0
            } else {
                GgmlType::Q4K
            };
            let (q, d): (&[i8], &[f32]) = if size == 32 {
                let b = a.b32.as_ref().unwrap();
                (&b.q, &b.d)
            } else {
                let b = a.b256.as_ref().unwrap();
                (&b.q, &b.d)
            };
            let deq = a.dequantize_for(ty).unwrap();
            for (blk, ((xs, qs), &d)) in x.chunks(size).zip(q.chunks(size)).zip(d).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                // llama.cpp's scales: `block_q8_0`'s f16, `block_q8_K`'s `1 / iscale`.
                let step = amax / 127.0;
                let want = match (size, amax) {
                    (_, 0.0) => 0.0,
                    (32, _) => f16_rounded(step),
                    _ => 1.0 / (127.0 / amax),
                };
                assert_eq!(d, want, "block {blk}");
                assert!(qs.iter().all(|&v| v != i8::MIN));
                if amax > 0.0 {
                    assert_eq!(qs.iter().map(|v| v.abs()).max(), Some(127));
                }
                // Half a step, plus what the scale's rounding moves the largest values.
                let bound = (0.5 * step + 127.0 * (d - step).abs()) * (1.0 + 1e-5);
                for (l, (&xv, &qv)) in xs.iter().zip(qs).enumerate() {
                    let e = (xv - deq[blk * size + l]).abs();
                    assert!(e <= bound, "{size} block {blk}: {xv} vs {qv}·{d}");
                }
            }
        }
        let b = a.b32.as_ref().unwrap();
        for (k, (qs, xs)) in b.q.chunks(32).zip(x.chunks(32)).enumerate() {
            let s: i32 = qs.iter().map(|&v| v as i32).sum();
            assert_eq!(b.sum[k], s);
            // llama.cpp's `block_q8_1::s`: the f32 scale times the sum, rounded to f16.
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(b.dsum[k], f16_rounded(amax / 127.0 * s as f32));
        }
        if let Some(b) = &a.b256 {
            for (k, qs) in b.q.chunks(16).enumerate() {
                assert_eq!(b.bsums[k] as i32, qs.iter().map(|&v| v as i32).sum::<i32>());
            }
        }
    }
}

#[test]
fn activation_quantisation_rounds_half_to_even_and_survives_odd_values() {
    // amax 127: the values are their own quantisation; halves round to even.
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.5;
    x[4] = -126.5;
    let a = Q8Activations::new(&x, 1, 32, true, false);
    let b = a.b32.as_ref().unwrap();
    assert_eq!(b.d[0], 1.0);
    assert_eq!(&b.q[..5], &[127, 2, -4, 0, -126]);
    // Zeros, values too small for a finite inverse scale, and non-finite values quantise
    // without panicking (to zeros where no scale exists).
    for v in [0.0, 1e-40, f32::MIN_POSITIVE / 4.0] {
        let a = Q8Activations::new(&[v; 256], 1, 256, true, true);
        let b = a.b32.as_ref().unwrap();
        assert!(b.d[0].is_finite());
        if v < 1e-37 {
            assert!(b.q.iter().all(|&q| q == 0) && b.d[0] == 0.0, "{v}");
        }
    }
    // Activations whose f16 scale would overflow keep the f32 one (llama.cpp's would be
    // infinite), in both the scale and the scaled sum; the products stay finite.
    let x = [1e9f32; 32];
    let a = Q8Activations::new(&x, 1, 32, true, false);
    let b = a.b32.as_ref().unwrap();
    assert_eq!((b.d[0], b.q[0]), (1e9 / 127.0, 127));
    assert_eq!(b.dsum[0], 1e9 / 127.0 * (32.0 * 127.0));
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let mat = GgmlMatrix::from_vec(ty, 1, 32, random_blocks(ty, 1, 32, 2)).unwrap();
        for isa in isas() {
            assert!(q8_product(&mat, isa, &a)[0].is_finite(), "{ty} {isa:?}");
        }
    }
    // A NaN or an infinity makes the block's scale NaN (and its products NaN, as with f32
    // activations); the other blocks are unaffected.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![1f32; 64];
        x[5] = bad;
        let a = Q8Activations::new(&x, 1, 64, true, false);
        let b = a.b32.as_ref().unwrap();
        assert!(
            b.d[0].is_nan() && b.q[..32].iter().all(|&q| q == 0),
            "{bad}"
        );
        assert_eq!((b.d[1], b.q[32]), (f16_rounded(1.0 / 127.0), 127));
        let mat = GgmlMatrix::from_vec(
            GgmlType::Q8_0,
            1,
            64,
            random_blocks(GgmlType::Q8_0, 1, 64, 1),
        )
        .unwrap();
        for isa in isas() {
            assert!(q8_product(&mat, isa, &a)[0].is_nan(), "{bad} {isa:?}");
        }
    }
}

#[test]
fn simd_activation_quantisation_equals_the_portable_code() {
    let (portable, Some(simd)) = q8::block_fns() else {
        return;
    };
    let (rows, cols) = (5, 768);
    let mut x = varied_x(rows * cols, 3);
    // Non-finite values in some blocks, exact halves and tiny values in others.
    x[40] = f32::NAN;
    x[300] = f32::INFINITY;
    x[600] = f32::NEG_INFINITY;
    x[1000..1032].fill(1e-40);
    for (k, v) in x[1100..1132].iter_mut().enumerate() {
        *v = k as f32 - 15.5;
    }
    let (s32, p32) = (
        q8::quantize32(&x, rows, cols, simd),
        q8::quantize32(&x, rows, cols, portable),
    );
    assert_eq!((s32.q, s32.sum), (p32.q, p32.sum));
    assert!(same_bits(&s32.d, &p32.d) && same_bits(&s32.dsum, &p32.dsum));
    let (s256, p256) = (
        q8::quantize256(&x, rows, cols, simd),
        q8::quantize256(&x, rows, cols, portable),
    );
    assert_eq!((s256.q, s256.bsums), (p256.q, p256.bsums));
    assert!(same_bits(&s256.d, &p256.d));
}

/// A random matrix and its 8-bit activations of `m` rows.
fn case(ty: GgmlType, rows: usize, nb: usize, m: usize) -> (GgmlMatrix, Vec<f32>, Q8Activations) {
    let cols = nb * ty.block_elems();
    let seed = (rows * 1000 + cols * 7 + m) as u64;
    let mat = GgmlMatrix::from_vec(ty, rows, cols, random_blocks(ty, rows, cols, seed)).unwrap();
    let x = varied_x(m * cols, seed + 1);
    let a = Q8Activations::for_type(ty, &x, m, cols);
    (mat, x, a)
}

fn q8_product(mat: &GgmlMatrix, isa: Isa, a: &Q8Activations) -> Vec<f32> {
    let mut out = vec![f32::NAN; a.rows() * mat.rows()];
    mat.matmul_q8_with(isa, a, &mut out);
    out
}

#[test]
fn simd_int_products_equal_the_portable_ones_bit_for_bit() {
    for ty in GgmlType::ALL {
        for &nb in block_counts(ty) {
            for rows in [1, 7, 19] {
                for m in [1, 2, 3, 4, 5, 7, 8, 9, 13] {
                    let (mat, _, a) = case(ty, rows, nb, m);
                    let want = q8_product(&mat, Isa::Scalar, &a);
                    assert!(want.iter().all(|v| v.is_finite()));
                    for isa in isas() {
                        let got = q8_product(&mat, isa, &a);
                        assert!(
                            same_bits(&got, &want),
                            "{ty} {isa:?} {rows}x{nb} blocks m={m}:\n{got:?}\nvs\n{want:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn parallel_int_products_equal_the_portable_ones() {
    // Large enough for the row tasks to run on several threads.
    for ty in GgmlType::ALL {
        let nb = if ty.block_elems() == 32 { 18 } else { 3 };
        for m in [1, 4, 17] {
            let (mat, _, a) = case(ty, 130, nb, m);
            let want = q8_product(&mat, Isa::Scalar, &a);
            for isa in isas() {
                assert!(
                    same_bits(&q8_product(&mat, isa, &a), &want),
                    "{ty} {isa:?} m={m}"
                );
            }
        }
    }
}

/// `Σ_c |w[r, c]·x[i, c]|` for every (i, r).
fn magnitudes(w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            out[i * rows + r] = (0..cols)
                .map(|c| (x[i * cols + c] as f64 * w[r * cols + c] as f64).abs())
                .sum();
        }
    }
    out
}

#[test]
fn portable_int_products_equal_the_dequantised_product() {
    for ty in GgmlType::ALL {
        for &nb in block_counts(ty) {
            for (rows, m) in [(1, 1), (7, 3), (19, 9)] {
                let (mat, _, a) = case(ty, rows, nb, m);
                let got = q8_product(&mat, Isa::Scalar, &a);
                let want = mat.matmul_q8_reference(&a);
                let xq = a.dequantize_for(ty).unwrap();
                let mag = magnitudes(&mat.dequantize(), &xq, rows, mat.cols(), m);
                for (k, ((g, e), mag)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    assert!(
                        ((g - e) as f64).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} {rows}x{nb} blocks m={m} #{k}: {g} vs {e} (sum |wx| {mag})"
                    );
                }
            }
        }
    }
}

#[test]
fn int_products_differ_from_f32_ones_by_the_activation_rounding() {
    for ty in GgmlType::ALL {
        for &nb in block_counts(ty) {
            let (rows, m) = (11, 3);
            let (mat, x, a) = case(ty, rows, nb, m);
            let cols = mat.cols();
            let got = q8_product(&mat, Isa::detect(), &a);
            let want = mat.matmul_reference(&x, m);
            let w = mat.dequantize();
            let mag = magnitudes(&w, &x, rows, cols, m);
            let be = ty.block_elems();
            for i in 0..m {
                // Half a quantisation step of each activation's block.
                let step: Vec<f64> = x[i * cols..(i + 1) * cols]
                    .chunks(be)
                    .flat_map(|b| {
                        let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                        std::iter::repeat_n(0.5 * d, be)
                    })
                    .collect();
                for r in 0..rows {
                    let bound: f64 = (0..cols)
                        .map(|c| (w[r * cols + c] as f64).abs() * step[c])
                        .sum::<f64>()
                        * (1.0 + 1e-4)
                        + 1e-5 * mag[i * rows + r];
                    let (g, e) = (got[i * rows + r], want[i * rows + r]);
                    assert!(
                        ((g - e) as f64).abs() <= bound,
                        "{ty} {nb} blocks ({i},{r}): {g} vs f32 {e}, bound {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn stacked_segments_share_one_quantisation_and_equal_each_segment_alone() {
    // A Q4_K_M-like qkv (Q4_K, Q4_K, Q6_K), every type stacked, 32-weight types with k-quants
    // (both kinds of activation blocks at once), and segments large enough that their products
    // run over the pool at one activation row.
    let cols = 512;
    let stacks: Vec<Vec<(GgmlType, usize)>> = vec![
        vec![(GgmlType::Q4K, 9), (GgmlType::Q4K, 5), (GgmlType::Q6K, 3)],
        GgmlType::ALL.iter().map(|&t| (t, 5)).collect(),
        vec![
            (GgmlType::Q5_0, 96),
            (GgmlType::Q8_0, 40),
            (GgmlType::Q4K, 67),
        ],
    ];
    for parts in stacks {
        let mats: Vec<GgmlMatrix> = parts
            .iter()
            .enumerate()
            .map(|(k, &(t, r))| {
                GgmlMatrix::from_vec(t, r, cols, random_blocks(t, r, cols, k as u64)).unwrap()
            })
            .collect();
        let rows: usize = parts.iter().map(|p| p.1).sum();
        // 8-bit activations up to 16 rows (where chosen), the bf16 tiles or f32 tiles beyond.
        for m in [1, 3, 8, 12, 17, 40] {
            let x = varied_x(m * cols, m as u64);
            for isa in isas() {
                let mut got = vec![f32::NAN; m * rows];
                matmul_segments_with(isa, &mats, &x, m, &mut got, rows);
                // Each segment alone, into its own columns, through its path's own product.
                let mut want = vec![f32::NAN; m * rows];
                let mut col0 = 0;
                for s in &mats {
                    if uses_int8(isa, s.ty(), m) {
                        let a = Q8Activations::for_type(s.ty(), &x, m, cols);
                        s.matmul_q8_into_with(isa, &a, &mut want, rows, col0);
                    } else if crate::quant::uses_bf16_tiles(isa, m) {
                        s.matmul_into_with(isa, &x, m, &mut want, rows, col0);
                    } else {
                        s.matmul_f32_into_with(isa, &x, m, &mut want, rows, col0);
                    }
                    col0 += s.rows();
                }
                assert!(same_bits(&got, &want), "{isa:?} m={m} {parts:?}");
            }
        }
    }
}

#[test]
fn zero_activations_give_zero_products() {
    for ty in GgmlType::ALL {
        let (mat, _, _) = case(ty, 5, 2, 1);
        let a = Q8Activations::for_type(ty, &vec![0.0; 2 * mat.cols()], 2, mat.cols());
        for isa in isas() {
            assert!(
                q8_product(&mat, isa, &a).iter().all(|&v| v == 0.0),
                "{ty} {isa:?}"
            );
        }
    }
}

#[test]
#[should_panic(expected = "activations without the 256 blocks")]
fn k_quants_need_256_value_blocks() {
    let (mat, x, _) = case(GgmlType::Q4K, 2, 1, 1);
    let a = Q8Activations::new(&x, 1, mat.cols(), true, false);
    q8_product(&mat, Isa::detect(), &a);
}

#[test]
#[should_panic(expected = "activation width")]
fn activations_of_another_width_panic() {
    let (mat, _, _) = case(GgmlType::Q8_0, 2, 2, 1);
    let a = Q8Activations::new(&[0.5; 32], 1, 32, true, false);
    q8_product(&mat, Isa::detect(), &a);
}
