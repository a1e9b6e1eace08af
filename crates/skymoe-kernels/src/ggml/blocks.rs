//! The block layouts of ggml's types, decoded in portable code: per block, the scale and offset
//! of every 16 weights ([`Prep`]), and per 32 weights ("chunk") the integer values. A weight is
//! `q·s` (types without a minimum) or `q·s + o` (Q4_1, Q5_1, Q4_K, Q5_K), with one rounding per
//! operation: exactly the arithmetic of `gguf.quants.dequantize` (and of ggml's
//! `dequantize_row_*`, where the compiler does not contract it into an FMA).
//!
//! The SIMD kernels share [`Prep`] and decode the chunks themselves.

use super::GgmlType;

/// An IEEE half (bits) as f32, exactly (subnormals, infinities and NaN included).
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    // The exponent and mantissa moved into an f32 whose exponent bias is 127 instead of 15:
    // multiplying by 2^112 rebiases normals and normalises subnormals, both exactly.
    let em = ((h & 0x7FFF) as u32) << 13;
    let mut v = f32::from_bits(em) * f32::from_bits(0x7780_0000); // 2^112
    if h & 0x7C00 == 0x7C00 {
        v = f32::from_bits(0x7F80_0000 | em); // infinity or NaN (payload kept)
    }
    let sign = ((h & 0x8000) as u32) << 16;
    f32::from_bits(v.to_bits() | sign)
}

/// Read the little-endian f16 at `b[i..i + 2]` as f32.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// The multiplier `s` and offset `o` of each 16 weights of a block (2 for 32-blocks, 16 for
/// super-blocks; only the first `block_elems / 16` are meaningful).
#[derive(Clone, Copy)]
pub(super) struct Prep {
    pub s: [f32; 16],
    pub o: [f32; 16],
}

/// Whether the type's weights carry an offset (`q·s + o`).
pub(super) const fn has_min(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K
    )
}

/// How many weights share a multiplier (and offset) at most: Q6_K scales every 16 weights,
/// the other types every 32 (the K-quants: their sub-blocks; the 32-weight types: whole
/// blocks).
pub(super) const fn group_span(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6K => 16,
        _ => 32,
    }
}

/// The 6-bit scales and minima of a Q4_K / Q5_K super-block (`b` is the 12 packed bytes):
/// sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (minima); sub-blocks 4-7
/// take their low 4 bits from the nibbles of bytes 8-11 and their high 2 bits from the top
/// bits of bytes 0-3 (scales) and 4-7 (minima).
#[inline(always)]
pub(super) fn k_scales(b: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = b[j] & 0x3F;
        mn[j] = b[j + 4] & 0x3F;
        sc[j + 4] = (b[j + 8] & 0x0F) | ((b[j] >> 6) << 4);
        mn[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// The scales of the block `b` (its `block_bytes` bytes).
#[inline(always)]
pub(super) fn prep(ty: GgmlType, b: &[u8]) -> Prep {
    let mut p = Prep {
        s: [0.0; 16],
        o: [0.0; 16],
    };
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            p.s[0] = d;
            p.s[1] = d;
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            p.s[0] = d;
            p.s[1] = d;
            p.o[0] = m;
            p.o[1] = m;
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let packed: &[u8; 12] = b[4..16].try_into().expect("12 scale bytes");
            let (sc, mn) = k_scales(packed);
            for j in 0..8 {
                let s = d * sc[j] as f32;
                let o = -(dmin * mn[j] as f32);
                p.s[2 * j] = s;
                p.s[2 * j + 1] = s;
                p.o[2 * j] = o;
                p.o[2 * j + 1] = o;
            }
        }
        GgmlType::Q6K => {
            let d = f16_at(b, 208);
            for k in 0..16 {
                p.s[k] = d * (b[192 + k] as i8) as f32;
            }
        }
    }
    p
}

/// The integer values of weights `32·j .. 32·j + 32` of the block `b` (offsets such as Q4_0's
/// 8 already subtracted).
#[inline(always)]
pub(super) fn chunk(ty: GgmlType, b: &[u8], j: usize, q: &mut [i8; 32]) {
    /// Low nibbles of 16 bytes then their high nibbles, plus bit `l` of `qh` times 16, minus
    /// `off`.
    fn nibbles(qs: &[u8], qh: u32, off: i8, q: &mut [i8; 32]) {
        for l in 0..16 {
            let lo = (qs[l] & 0x0F) | ((((qh >> l) & 1) as u8) << 4);
            let hi = (qs[l] >> 4) | ((((qh >> (l + 16)) & 1) as u8) << 4);
            q[l] = lo as i8 - off;
            q[l + 16] = hi as i8 - off;
        }
    }
    let qh32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match ty {
        GgmlType::Q4_0 => nibbles(&b[2..18], 0, 8, q),
        GgmlType::Q4_1 => nibbles(&b[4..20], 0, 0, q),
        GgmlType::Q5_0 => nibbles(&b[6..22], qh32(2), 16, q),
        GgmlType::Q5_1 => nibbles(&b[8..24], qh32(4), 0, q),
        GgmlType::Q8_0 => {
            for (d, &s) in q.iter_mut().zip(&b[2..34]) {
                *d = s as i8;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            // Sub-block j: the low (j even) or high (j odd) nibbles of 32 bytes; Q5_K adds bit
            // j of each of its 32 high-bit bytes as the fifth bit.
            let (qs, qh) = if ty == GgmlType::Q4K {
                (&b[16 + (j / 2) * 32..16 + (j / 2) * 32 + 32], None)
            } else {
                (
                    &b[48 + (j / 2) * 32..48 + (j / 2) * 32 + 32],
                    Some(&b[16..48]),
                )
            };
            let shift = 4 * (j % 2);
            for l in 0..32 {
                let mut v = (qs[l] >> shift) & 0x0F;
                if let Some(qh) = qh {
                    v |= ((qh[l] >> j) & 1) << 4;
                }
                q[l] = v as i8;
            }
        }
        GgmlType::Q6K => {
            // Half h of 128 weights, quarter t: low 4 bits from the low (t < 2) or high
            // nibbles of ql[64h + 32(t % 2) ..][..32], high 2 bits from bits 2t of
            // qh[32h ..][..32]; minus 32.
            let (h, t) = (j / 4, j % 4);
            let ql = &b[h * 64 + (t % 2) * 32..h * 64 + (t % 2) * 32 + 32];
            let qh = &b[128 + h * 32..128 + h * 32 + 32];
            for l in 0..32 {
                let v = ((ql[l] >> (4 * (t / 2))) & 0x0F) | (((qh[l] >> (2 * t)) & 3) << 4);
                q[l] = v as i8 - 32;
            }
        }
    }
}

/// Dequantise the blocks of one row into `out` (as many weights as the blocks hold).
pub(super) fn dequantize_scalar(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let with_min = has_min(ty);
    let mut q = [0i8; 32];
    for (b, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        let p = prep(ty, b);
        for (j, oc) in o.chunks_exact_mut(32).enumerate() {
            chunk(ty, b, j, &mut q);
            for (l, (w, &v)) in oc.iter_mut().zip(&q).enumerate() {
                let k = 2 * j + l / 16;
                *w = if with_min {
                    v as f32 * p.s[k] + p.o[k]
                } else {
                    v as f32 * p.s[k]
                };
            }
        }
    }
}

/// Dot products of the `dots.len()` rows of `x` (rows of `cols`) with one weight row.
pub(super) fn dots_scalar(ty: GgmlType, row: &[u8], x: &[f32], cols: usize, dots: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let mut acc = [[0f32; 8]; super::FUSED_MAX_ROWS];
    let mut q = [0i8; 32];
    let mut w = [0f32; 32];
    for (bi, b) in row.chunks_exact(bb).enumerate() {
        let p = prep(ty, b);
        for j in 0..be / 32 {
            let c0 = bi * be + j * 32;
            chunk(ty, b, j, &mut q);
            for (l, (wv, &v)) in w.iter_mut().zip(&q).enumerate() {
                let k = 2 * j + l / 16;
                *wv = v as f32 * p.s[k] + p.o[k];
            }
            for (i, a) in acc.iter_mut().enumerate().take(dots.len()) {
                let xs = &x[i * cols + c0..i * cols + c0 + 32];
                for (l, (xv, wv)) in xs.iter().zip(&w).enumerate() {
                    a[l % 8] += xv * wv;
                }
            }
        }
    }
    for (d, a) in dots.iter_mut().zip(&acc) {
        *d = a.iter().sum();
    }
}
