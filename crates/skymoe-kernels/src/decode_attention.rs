//! The two products of a decoding step's attention over one block of cached positions, for
//! every query head of a kv group at once (grouped-query attention reads each cached key and
//! value once for the whole group):
//!
//! - [`scores_by_dim`]: the scores of the group's query rows against keys stored dimension by
//!   dimension (element `d` of the block's position `j` at `d·stride + j`), so that the CPU
//!   computes the scores of 16 positions (8 with AVX2) in one register with one multiply-add
//!   per dimension and head, and converts each cached f16 once, with no horizontal sums;
//! - [`add_weighted_rows`]: the probability-weighted sum of value rows stored position by
//!   position, every head of the group accumulated from one conversion of each row.
//!
//! Both read f32, f16 or scaled int8 entries ([`Cached`]) and pick AVX-512, AVX2 or portable code at run
//! time ([`Isa::detect`]).

use half::f16;

use crate::quant::Isa;

/// Cached keys or values as stored.
#[derive(Debug, Clone, Copy)]
pub enum Cached<'a> {
    /// Exactly the computed values.
    F32(&'a [f32]),
    /// Rounded to f16.
    F16(&'a [f16]),
    /// Integers, each position's times its scale: `scales[j]` for the `j`-th position the
    /// entries cover (the positions' order is the reader's: a column of keys stored by
    /// dimension, or a row of values).
    Int8 {
        /// The integers.
        q: &'a [i8],
        /// One scale per position, from the entries' first.
        scales: &'a [f32],
    },
}

impl Cached<'_> {
    /// Entries held.
    pub fn len(&self) -> usize {
        match self {
            Cached::F32(s) => s.len(),
            Cached::F16(s) => s.len(),
            Cached::Int8 { q, .. } => q.len(),
        }
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ask the CPU to bring every cache line of the entries into its caches (a hint: the
    /// reads that follow need not wait for memory where the next entries are not where the
    /// hardware prefetchers look, such as a block table in no particular order).
    pub fn prefetch(&self) {
        let (p, bytes) = match self {
            Cached::F32(s) => (s.as_ptr().cast::<u8>(), std::mem::size_of_val(*s)),
            Cached::F16(s) => (s.as_ptr().cast::<u8>(), std::mem::size_of_val(*s)),
            Cached::Int8 { q, .. } => (q.as_ptr().cast::<u8>(), q.len()),
        };
        #[cfg(target_arch = "x86_64")]
        for at in (0..bytes).step_by(64) {
            // SAFETY: `at` is inside the entries' allocation; a prefetch reads nothing and
            // cannot fault.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.add(at).cast(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (p, bytes);
    }

    /// Entry `i` in f32, before its position's scale ([`Cached::scale`]).
    fn get(&self, i: usize) -> f32 {
        match self {
            Cached::F32(s) => s[i],
            Cached::F16(s) => s[i].to_f32(),
            Cached::Int8 { q, .. } => q[i] as f32,
        }
    }

    /// The scale of the `j`-th position (1 but for int8 entries).
    fn scale(&self, j: usize) -> f32 {
        match self {
            Cached::Int8 { scales, .. } => scales[j],
            _ => 1.0,
        }
    }

    /// Check that `n` positions have a scale.
    fn check_scales(&self, n: usize) {
        if let Cached::Int8 { scales, .. } = self {
            assert!(n <= scales.len(), "{n} positions, {} scales", scales.len());
        }
    }

    /// The scales' first (null but for int8 entries).
    #[cfg(target_arch = "x86_64")]
    fn scales_ptr(&self) -> *const f32 {
        match self {
            Cached::Int8 { scales, .. } => scales.as_ptr(),
            _ => std::ptr::null(),
        }
    }
}

/// Call the x86 kernel `$avx512` or `$avx2` (as `$isa` says), compiled for the type of
/// `$cached`'s entries, with `$args`, in which `$entries` names a pointer to the first entry.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernel {
    ($isa:expr, $cached:expr, $avx512:ident, $avx2:ident, |$entries:ident, $scales:ident| ($($arg:expr),* $(,)?)) => {{
        let $scales = $cached.scales_ptr();
        match ($isa, $cached) {
            (Isa::Avx512, Cached::F32(e)) => {
                let $entries = e.as_ptr().cast();
                x86::$avx512::<{ x86::F32 }>($($arg),*)
            }
            (Isa::Avx512, Cached::F16(e)) => {
                let $entries = e.as_ptr().cast();
                x86::$avx512::<{ x86::F16 }>($($arg),*)
            }
            (Isa::Avx512, Cached::Int8 { q, .. }) => {
                let $entries = q.as_ptr().cast();
                x86::$avx512::<{ x86::I8 }>($($arg),*)
            }
            (_, Cached::F32(e)) => {
                let $entries = e.as_ptr().cast();
                x86::$avx2::<{ x86::F32 }>($($arg),*)
            }
            (_, Cached::F16(e)) => {
                let $entries = e.as_ptr().cast();
                x86::$avx2::<{ x86::F16 }>($($arg),*)
            }
            (_, Cached::Int8 { q, .. }) => {
                let $entries = q.as_ptr().cast();
                x86::$avx2::<{ x86::I8 }>($($arg),*)
            }
        }
    }};
}

/// Query heads one kernel call keeps in registers; larger groups are taken in tiles of this
/// many.
const HEAD_TILE: usize = 4;

/// Where keys stored dimension by dimension lie: in blocks of `block` positions, element `d`
/// of a block's position `j` at entry `d·block + j` of the block, consecutive blocks `pitch`
/// entries apart. Position `j` of a run is position `j % block` of its block `j / block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBlocks {
    /// Positions per block (the distance between a position's consecutive elements).
    pub block: usize,
    /// Entries from one block's first to the next's (at least `dim·block` where a run spans
    /// blocks).
    pub pitch: usize,
}

impl KeyBlocks {
    /// One block of keys whose elements lie `stride` entries apart.
    pub fn single(stride: usize) -> KeyBlocks {
        KeyBlocks {
            block: stride,
            pitch: 0,
        }
    }

    /// The entry of element `d` of position `j`.
    pub fn entry(&self, d: usize, j: usize) -> usize {
        (j / self.block) * self.pitch + d * self.block + j % self.block
    }
}

impl<'a> Cached<'a> {
    /// The entries from `at` on, the scales from position `first` on.
    fn from(&self, at: usize, first: usize) -> Cached<'a> {
        match *self {
            Cached::F32(s) => Cached::F32(&s[at..]),
            Cached::F16(s) => Cached::F16(&s[at..]),
            Cached::Int8 { q, scales } => Cached::Int8 {
                q: &q[at..],
                scales: &scales[first..],
            },
        }
    }
}

/// The scores of a group of query heads against `n` cached keys of width `dim` stored
/// dimension by dimension in blocks ([`KeyBlocks`]): `out[h·out_stride + j] = scale ·
/// Σ_d q[h·dim + d] · keys[layout.entry(d, j)]` for every head `h < q.len() / dim` and
/// position `j < n`.
///
/// # Panics
/// If `q` is not whole heads of `dim`, the blocks overlap, the keys do not hold `dim`
/// dimensions of `n` positions, or `out` does not hold every head's `n` scores.
#[allow(clippy::too_many_arguments)]
pub fn scores_by_dim(
    q: &[f32],
    dim: usize,
    scale: f32,
    keys: Cached<'_>,
    layout: KeyBlocks,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    scores_by_dim_on(
        Isa::detect(),
        q,
        dim,
        scale,
        keys,
        layout,
        n,
        out,
        out_stride,
    );
}

/// [`scores_by_dim`] with the instructions of `isa` (portable code where it is not
/// supported).
#[allow(clippy::too_many_arguments)]
fn scores_by_dim_on(
    isa: Isa,
    q: &[f32],
    dim: usize,
    scale: f32,
    keys: Cached<'_>,
    layout: KeyBlocks,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        dim > 0 && q.len().is_multiple_of(dim),
        "query heads of {dim}"
    );
    let heads = q.len() / dim;
    if n == 0 || heads == 0 {
        return;
    }
    let stride = layout.block;
    assert!(
        n <= stride || (stride > 0 && layout.pitch >= dim * stride),
        "{n} positions in blocks of {stride}, {} apart, for {dim} dimensions",
        layout.pitch
    );
    assert!(
        layout.entry(dim - 1, n - 1) < keys.len(),
        "keys hold {} entries, {dim} dimensions of {n} positions need more",
        keys.len()
    );
    assert!(
        n <= out_stride && (heads - 1) * out_stride + n <= out.len(),
        "scores of {heads} heads of {n} positions do not fit"
    );
    keys.check_scales(n);
    #[cfg(target_arch = "x86_64")]
    {
        if isa.supported() && matches!(isa, Isa::Avx2 | Isa::Avx512) {
            for j0 in (0..n).step_by(stride) {
                // One block: its positions j0..j0 + m.
                let m = (n - j0).min(stride);
                let keys = keys.from(layout.entry(0, j0), j0);
                for h0 in (0..heads).step_by(HEAD_TILE) {
                    let tile = (heads - h0).min(HEAD_TILE);
                    let (qp, op) = (
                        q[h0 * dim..].as_ptr(),
                        out[h0 * out_stride + j0..].as_mut_ptr(),
                    );
                    // SAFETY: `isa` is supported (checked just above); the block's key rows
                    // `d < dim` of `m` entries at `d·stride` are inside `keys` (its last
                    // entry is at most the run's last), the tile's query rows inside `q` and
                    // its score rows inside `out` (all checked above).
                    unsafe {
                        x86_kernel!(isa, keys, scores_avx512, scores_avx2, |entries, scales| (
                            qp, tile, dim, scale, entries, scales, stride, m, op, out_stride
                        ))
                    }
                }
            }
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for h in 0..heads {
        let qh = &q[h * dim..(h + 1) * dim];
        for j in 0..n {
            let s: f32 = (0..dim).map(|d| qh[d] * keys.get(layout.entry(d, j))).sum();
            out[h * out_stride + j] = scale * keys.scale(j) * s;
        }
    }
}

/// `y[h·dim + i] += Σ_j a[h·a_stride + j] · rows[j·stride + i]` for every head
/// `h < y.len() / dim`, position `j < n` and element `i < dim`: the weighted sum of `n` value
/// rows stored position by position, the rows added in order (one multiply-add each).
///
/// # Panics
/// If `y` is not whole heads of `dim`, the rows overlap or do not fit in `rows`, or `a` does
/// not hold every head's `n` weights.
pub fn add_weighted_rows(
    a: &[f32],
    a_stride: usize,
    rows: Cached<'_>,
    stride: usize,
    n: usize,
    y: &mut [f32],
    dim: usize,
) {
    add_weighted_rows_on(Isa::detect(), a, a_stride, rows, stride, n, y, dim);
}

/// [`add_weighted_rows`] with the instructions of `isa` (portable code where it is not
/// supported).
#[allow(clippy::too_many_arguments)]
fn add_weighted_rows_on(
    isa: Isa,
    a: &[f32],
    a_stride: usize,
    rows: Cached<'_>,
    stride: usize,
    n: usize,
    y: &mut [f32],
    dim: usize,
) {
    assert!(
        dim > 0 && y.len().is_multiple_of(dim),
        "output heads of {dim}"
    );
    let heads = y.len() / dim;
    if n == 0 || heads == 0 {
        return;
    }
    assert!(
        dim <= stride || n == 1,
        "rows of {dim} overlap at a stride of {stride}"
    );
    assert!(
        (n - 1) * stride + dim <= rows.len(),
        "{n} rows of {dim} at a stride of {stride} do not fit in {}",
        rows.len()
    );
    assert!(
        n <= a_stride && (heads - 1) * a_stride + n <= a.len(),
        "weights of {heads} heads of {n} positions do not fit"
    );
    rows.check_scales(n);
    #[cfg(target_arch = "x86_64")]
    {
        if isa.supported() && matches!(isa, Isa::Avx2 | Isa::Avx512) {
            for h0 in (0..heads).step_by(HEAD_TILE) {
                let tile = (heads - h0).min(HEAD_TILE);
                let (ap, yp) = (a[h0 * a_stride..].as_ptr(), y[h0 * dim..].as_mut_ptr());
                // SAFETY: `isa` is supported (checked just above); rows `j < n` of
                // `dim` entries at `j·stride` are inside `rows`, the tile's weights inside
                // `a` and its outputs inside `y` (all checked above).
                unsafe {
                    x86_kernel!(
                        isa,
                        rows,
                        weighted_rows_avx512,
                        weighted_rows_avx2,
                        |entries, scales| (ap, a_stride, tile, entries, scales, stride, n, yp, dim)
                    )
                }
            }
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for h in 0..heads {
        let yh = &mut y[h * dim..(h + 1) * dim];
        for j in 0..n {
            let w = a[h * a_stride + j] * rows.scale(j);
            for (i, v) in yh.iter_mut().enumerate() {
                *v = w.mul_add(rows.get(j * stride + i), *v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 and AVX2 kernels. `E` selects the entry type ([`F32`], [`F16`] bits or
    //! [`I8`] integers, each position's scaled by its entry of `scales`, which is null for
    //! the other types); `p` points at the first entry either way.

    // The heads' registers are indexed alongside their query and weight rows.
    #![allow(clippy::needless_range_loop)]

    use std::arch::x86_64::*;

    use super::HEAD_TILE;

    /// Entries stored as f32.
    pub(super) const F32: u8 = 0;
    /// Entries stored as f16 bits.
    pub(super) const F16: u8 = 1;
    /// Entries stored as int8, one scale per position.
    pub(super) const I8: u8 = 2;

    /// The weight at `a` of row `j`, times the row's scale for [`I8`] entries.
    ///
    /// # Safety
    /// `a` is readable, and for [`I8`] entries `scales[j]` too.
    #[inline(always)]
    unsafe fn weight<const E: u8>(a: *const f32, scales: *const f32, j: usize) -> f32 {
        // SAFETY: the caller's guarantees.
        unsafe {
            if E == I8 {
                *a * *scales.add(j)
            } else {
                *a
            }
        }
    }

    /// [`scores_avx512_h`] for `heads` (1 to [`HEAD_TILE`]) query heads.
    ///
    /// # Safety
    /// As [`scores_avx512_h`] for `heads` heads.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx512<const E: u8>(
        q: *const f32,
        heads: usize,
        dim: usize,
        scale: f32,
        keys: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the caller's guarantees for `heads` heads, `heads` being the tile's size.
        unsafe {
            match heads {
                1 => {
                    scores_avx512_h::<E, 1>(q, dim, scale, keys, scales, stride, n, out, out_stride)
                }
                2 => {
                    scores_avx512_h::<E, 2>(q, dim, scale, keys, scales, stride, n, out, out_stride)
                }
                3 => {
                    scores_avx512_h::<E, 3>(q, dim, scale, keys, scales, stride, n, out, out_stride)
                }
                _ => scores_avx512_h::<E, HEAD_TILE>(
                    q, dim, scale, keys, scales, stride, n, out, out_stride,
                ),
            }
        }
    }

    /// [`scores_avx2_h`] for `heads` (1 to [`HEAD_TILE`]) query heads.
    ///
    /// # Safety
    /// As [`scores_avx2_h`] for `heads` heads.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx2<const E: u8>(
        q: *const f32,
        heads: usize,
        dim: usize,
        scale: f32,
        keys: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the caller's guarantees for `heads` heads, `heads` being the tile's size.
        unsafe {
            match heads {
                1 => scores_avx2_h::<E, 1>(q, dim, scale, keys, scales, stride, n, out, out_stride),
                2 => scores_avx2_h::<E, 2>(q, dim, scale, keys, scales, stride, n, out, out_stride),
                3 => scores_avx2_h::<E, 3>(q, dim, scale, keys, scales, stride, n, out, out_stride),
                _ => scores_avx2_h::<E, HEAD_TILE>(
                    q, dim, scale, keys, scales, stride, n, out, out_stride,
                ),
            }
        }
    }

    /// [`weighted_rows_avx512_h`] for `heads` (1 to [`HEAD_TILE`]) query heads.
    ///
    /// # Safety
    /// As [`weighted_rows_avx512_h`] for `heads` heads.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_rows_avx512<const E: u8>(
        a: *const f32,
        a_stride: usize,
        heads: usize,
        rows: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        y: *mut f32,
        dim: usize,
    ) {
        // SAFETY: the caller's guarantees for `heads` heads, `heads` being the tile's size.
        unsafe {
            match heads {
                1 => weighted_rows_avx512_h::<E, 1>(a, a_stride, rows, scales, stride, n, y, dim),
                2 => weighted_rows_avx512_h::<E, 2>(a, a_stride, rows, scales, stride, n, y, dim),
                3 => weighted_rows_avx512_h::<E, 3>(a, a_stride, rows, scales, stride, n, y, dim),
                _ => weighted_rows_avx512_h::<E, HEAD_TILE>(
                    a, a_stride, rows, scales, stride, n, y, dim,
                ),
            }
        }
    }

    /// [`weighted_rows_avx2_h`] for `heads` (1 to [`HEAD_TILE`]) query heads.
    ///
    /// # Safety
    /// As [`weighted_rows_avx2_h`] for `heads` heads.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_rows_avx2<const E: u8>(
        a: *const f32,
        a_stride: usize,
        heads: usize,
        rows: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        y: *mut f32,
        dim: usize,
    ) {
        // SAFETY: the caller's guarantees for `heads` heads, `heads` being the tile's size.
        unsafe {
            match heads {
                1 => weighted_rows_avx2_h::<E, 1>(a, a_stride, rows, scales, stride, n, y, dim),
                2 => weighted_rows_avx2_h::<E, 2>(a, a_stride, rows, scales, stride, n, y, dim),
                3 => weighted_rows_avx2_h::<E, 3>(a, a_stride, rows, scales, stride, n, y, dim),
                _ => weighted_rows_avx2_h::<E, HEAD_TILE>(
                    a, a_stride, rows, scales, stride, n, y, dim,
                ),
            }
        }
    }

    /// Lanes `0..m` (m ≤ 16) of the 16 entries at `p + i`, the rest zero.
    ///
    /// # Safety
    /// AVX-512 F, F16C; entries `i..i + m` at `p` are readable.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline]
    unsafe fn load16<const E: u8>(p: *const u8, i: usize, m: usize) -> __m512 {
        // SAFETY (whole body): the caller guarantees entries i..i + m are readable; a full
        // load reads exactly 16 of them, a partial one only m.
        unsafe {
            match E {
                F16 => {
                    let p = (p as *const u16).add(i);
                    if m == 16 {
                        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
                    } else {
                        let mut buf = [0u16; 16];
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                        _mm512_cvtph_ps(_mm256_loadu_si256(buf.as_ptr() as *const __m256i))
                    }
                }
                I8 => {
                    let p = p.add(i);
                    let bytes = if m == 16 {
                        _mm_loadu_si128(p as *const __m128i)
                    } else {
                        let mut buf = [0u8; 16];
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                        _mm_loadu_si128(buf.as_ptr() as *const __m128i)
                    };
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))
                }
                _ => {
                    let p = (p as *const f32).add(i);
                    if m == 16 {
                        _mm512_loadu_ps(p)
                    } else {
                        _mm512_maskz_loadu_ps(((1u32 << m) - 1) as u16, p)
                    }
                }
            }
        }
    }

    /// Lanes `0..m` (m ≤ 8) of the 8 entries at `p + i`, the rest zero.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; entries `i..i + m` at `p` are readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const E: u8>(p: *const u8, i: usize, m: usize) -> __m256 {
        // SAFETY (whole body): as in `load16`, for 8 entries.
        unsafe {
            match E {
                F16 => {
                    let p = (p as *const u16).add(i);
                    if m == 8 {
                        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
                    } else {
                        let mut buf = [0u16; 8];
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                        _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
                    }
                }
                I8 => {
                    let p = p.add(i);
                    let bytes = if m == 8 {
                        _mm_loadl_epi64(p as *const __m128i)
                    } else {
                        let mut buf = [0u8; 16];
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                        _mm_loadu_si128(buf.as_ptr() as *const __m128i)
                    };
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
                }
                _ => {
                    let p = (p as *const f32).add(i);
                    if m == 8 {
                        _mm256_loadu_ps(p)
                    } else {
                        let mut buf = [0f32; 8];
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                        _mm256_loadu_ps(buf.as_ptr())
                    }
                }
            }
        }
    }

    /// Store lanes `0..m` (m ≤ 8) of `v` at `p`.
    ///
    /// # Safety
    /// AVX2; `p[..m]` is writable.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn store8(p: *mut f32, v: __m256, m: usize) {
        // SAFETY: the caller guarantees `p[..m]` is writable; a full store writes 8, a
        // partial one copies m lanes from a local buffer.
        unsafe {
            if m == 8 {
                _mm256_storeu_ps(p, v);
            } else {
                let mut buf = [0f32; 8];
                _mm256_storeu_ps(buf.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(buf.as_ptr(), p, m);
            }
        }
    }

    /// [`super::scores_by_dim`] for `heads ≤ HEAD_TILE` query rows at `q`, 16 positions a
    /// step; each head's dimensions alternate between two accumulators (two dependency
    /// chains).
    ///
    /// # Safety
    /// AVX-512 F, FMA, F16C; `q[..heads·dim]`, the keys `d·stride + j` (`d < dim`, `j < n`)
    /// and `out[h·out_stride + j]` are in bounds.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_avx512_h<const E: u8, const H: usize>(
        q: *const f32,
        dim: usize,
        scale: f32,
        keys: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let scale = _mm512_set1_ps(scale);
        // SAFETY (whole body): every access stays in the bounds the caller guarantees.
        unsafe {
            for j0 in (0..n).step_by(16) {
                let m = (n - j0).min(16);
                let mut even = [_mm512_setzero_ps(); H];
                let mut odd = [_mm512_setzero_ps(); H];
                let mut d = 0;
                while d + 2 <= dim {
                    let k0 = load16::<E>(keys, d * stride + j0, m);
                    let k1 = load16::<E>(keys, (d + 1) * stride + j0, m);
                    for h in 0..H {
                        let qh = q.add(h * dim + d);
                        even[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qh), k0, even[h]);
                        odd[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qh.add(1)), k1, odd[h]);
                    }
                    d += 2;
                }
                if d < dim {
                    let k0 = load16::<E>(keys, d * stride + j0, m);
                    for h in 0..H {
                        let qh = *q.add(h * dim + d);
                        even[h] = _mm512_fmadd_ps(_mm512_set1_ps(qh), k0, even[h]);
                    }
                }
                let mask = ((1u32 << m) - 1) as u16;
                let scale = if E == I8 {
                    _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(mask, scales.add(j0)))
                } else {
                    scale
                };
                for h in 0..H {
                    let s = _mm512_mul_ps(_mm512_add_ps(even[h], odd[h]), scale);
                    _mm512_mask_storeu_ps(out.add(h * out_stride + j0), mask, s);
                }
            }
        }
    }

    /// [`super::scores_by_dim`] with AVX2: 8 positions a step.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; as [`scores_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_avx2_h<const E: u8, const H: usize>(
        q: *const f32,
        dim: usize,
        scale: f32,
        keys: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let scale = _mm256_set1_ps(scale);
        // SAFETY (whole body): every access stays in the bounds the caller guarantees.
        unsafe {
            for j0 in (0..n).step_by(8) {
                let m = (n - j0).min(8);
                let mut even = [_mm256_setzero_ps(); H];
                let mut odd = [_mm256_setzero_ps(); H];
                let mut d = 0;
                while d + 2 <= dim {
                    let k0 = load8::<E>(keys, d * stride + j0, m);
                    let k1 = load8::<E>(keys, (d + 1) * stride + j0, m);
                    for h in 0..H {
                        let qh = q.add(h * dim + d);
                        even[h] = _mm256_fmadd_ps(_mm256_set1_ps(*qh), k0, even[h]);
                        odd[h] = _mm256_fmadd_ps(_mm256_set1_ps(*qh.add(1)), k1, odd[h]);
                    }
                    d += 2;
                }
                if d < dim {
                    let k0 = load8::<E>(keys, d * stride + j0, m);
                    for h in 0..H {
                        let qh = *q.add(h * dim + d);
                        even[h] = _mm256_fmadd_ps(_mm256_set1_ps(qh), k0, even[h]);
                    }
                }
                let scale = if E == I8 {
                    _mm256_mul_ps(scale, load8::<F32>(scales.add(j0) as *const u8, 0, m))
                } else {
                    scale
                };
                for h in 0..H {
                    let s = _mm256_mul_ps(_mm256_add_ps(even[h], odd[h]), scale);
                    store8(out.add(h * out_stride + j0), s, m);
                }
            }
        }
    }

    /// [`super::add_weighted_rows`] for `heads ≤ HEAD_TILE` outputs: 64 columns at a time in
    /// registers for every head over all rows, then 16, then a masked tail.
    ///
    /// # Safety
    /// AVX-512 F, FMA, F16C; rows `j < n` of `dim` entries at `j·stride`,
    /// `a[h·a_stride + j]` and `y[..heads·dim]` are in bounds.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_rows_avx512_h<const E: u8, const H: usize>(
        a: *const f32,
        a_stride: usize,
        rows: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        y: *mut f32,
        dim: usize,
    ) {
        // SAFETY (whole body): every access stays in the bounds the caller guarantees.
        unsafe {
            let mut c = 0;
            while c + 64 <= dim {
                let mut acc = [[_mm512_setzero_ps(); 4]; H];
                for h in 0..H {
                    for (k, v) in acc[h].iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(y.add(h * dim + c + 16 * k));
                    }
                }
                for j in 0..n {
                    let at = j * stride + c;
                    let r = [
                        load16::<E>(rows, at, 16),
                        load16::<E>(rows, at + 16, 16),
                        load16::<E>(rows, at + 32, 16),
                        load16::<E>(rows, at + 48, 16),
                    ];
                    for h in 0..H {
                        let w = _mm512_set1_ps(weight::<E>(a.add(h * a_stride + j), scales, j));
                        for (v, rk) in acc[h].iter_mut().zip(&r) {
                            *v = _mm512_fmadd_ps(w, *rk, *v);
                        }
                    }
                }
                for h in 0..H {
                    for (k, v) in acc[h].iter().enumerate() {
                        _mm512_storeu_ps(y.add(h * dim + c + 16 * k), *v);
                    }
                }
                c += 64;
            }
            while c < dim {
                let m = (dim - c).min(16);
                let mask = ((1u32 << m) - 1) as u16;
                let mut acc = [_mm512_setzero_ps(); H];
                for (h, v) in acc.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, y.add(h * dim + c));
                }
                for j in 0..n {
                    let r = load16::<E>(rows, j * stride + c, m);
                    for (h, v) in acc.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(
                            _mm512_set1_ps(weight::<E>(a.add(h * a_stride + j), scales, j)),
                            r,
                            *v,
                        );
                    }
                }
                for (h, v) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(y.add(h * dim + c), mask, *v);
                }
                c += m;
            }
        }
    }

    /// [`super::add_weighted_rows`] with AVX2: 16 columns at a time for every head, then a
    /// tail of up to 8 at a time.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; as [`weighted_rows_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_rows_avx2_h<const E: u8, const H: usize>(
        a: *const f32,
        a_stride: usize,
        rows: *const u8,
        scales: *const f32,
        stride: usize,
        n: usize,
        y: *mut f32,
        dim: usize,
    ) {
        // SAFETY (whole body): every access stays in the bounds the caller guarantees.
        unsafe {
            let mut c = 0;
            while c + 16 <= dim {
                let mut acc = [[_mm256_setzero_ps(); 2]; H];
                for h in 0..H {
                    for (k, v) in acc[h].iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(y.add(h * dim + c + 8 * k));
                    }
                }
                for j in 0..n {
                    let at = j * stride + c;
                    let r = [load8::<E>(rows, at, 8), load8::<E>(rows, at + 8, 8)];
                    for h in 0..H {
                        let w = _mm256_set1_ps(weight::<E>(a.add(h * a_stride + j), scales, j));
                        for (v, rk) in acc[h].iter_mut().zip(&r) {
                            *v = _mm256_fmadd_ps(w, *rk, *v);
                        }
                    }
                }
                for h in 0..H {
                    for (k, v) in acc[h].iter().enumerate() {
                        _mm256_storeu_ps(y.add(h * dim + c + 8 * k), *v);
                    }
                }
                c += 16;
            }
            while c < dim {
                let m = (dim - c).min(8);
                let mut acc = [_mm256_setzero_ps(); H];
                for (h, v) in acc.iter_mut().enumerate() {
                    *v = load8::<F32>(y.add(h * dim + c) as *const u8, 0, m);
                }
                for j in 0..n {
                    let r = load8::<E>(rows, j * stride + c, m);
                    for (h, v) in acc.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(
                            _mm256_set1_ps(weight::<E>(a.add(h * a_stride + j), scales, j)),
                            r,
                            *v,
                        );
                    }
                }
                for (h, v) in acc.iter().enumerate() {
                    store8(y.add(h * dim + c), *v, m);
                }
                c += m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize, seed: usize) -> f32 {
        (((i + seed) * 7919) % 2003) as f32 / 1001.0 - 1.0
    }

    /// `raw` as int8 entries with one scale per position (`positions` of them): integers
    /// over the whole range, scales of several magnitudes.
    fn int8_entries(raw: &[f32], positions: usize) -> (Vec<i8>, Vec<f32>) {
        let q = raw.iter().map(|&x| (x * 127.0).round() as i8).collect();
        let scales = (0..positions).map(|j| 0.01 * (1 + j % 7) as f32).collect();
        (q, scales)
    }

    #[test]
    fn every_int8_value_loads_as_itself_times_its_scale() {
        let codes: Vec<i8> = (-128..=127).collect();
        let n = codes.len();
        // Powers of two: the products are exact.
        let scales: Vec<f32> = (0..n).map(|j| 2f32.powi(j as i32 % 9 - 4)).collect();
        let entries = Cached::Int8 {
            q: &codes,
            scales: &scales,
        };
        each_isa(|isa| {
            // One dimension, n positions: the scores are the keys' values.
            let mut out = vec![0f32; n];
            scores_by_dim_on(
                isa,
                &[1.0],
                1,
                1.0,
                entries,
                KeyBlocks::single(n),
                n,
                &mut out,
                n,
            );
            // n rows of width 1, each weighted by 1: their sum.
            let mut y = vec![0f32; 1];
            add_weighted_rows_on(isa, &vec![1.0; n], n, entries, 1, n, &mut y, 1);
            let mut sum = 0f32;
            for j in 0..n {
                let want = codes[j] as f32 * scales[j];
                assert_eq!(out[j], want, "{isa:?} score of {}", codes[j]);
                sum += want;
            }
            assert!((y[0] - sum).abs() <= 1e-3, "{isa:?}: {} vs {sum}", y[0]);
        });
    }

    #[test]
    #[should_panic(expected = "scales")]
    fn int8_entries_need_a_scale_per_position() {
        let q = [1i8; 8];
        let mut out = [0f32; 4];
        let keys = Cached::Int8 {
            q: &q,
            scales: &[1.0; 3],
        };
        scores_by_dim(
            &[1.0, 1.0],
            2,
            1.0,
            keys,
            KeyBlocks::single(4),
            4,
            &mut out,
            4,
        );
    }

    /// Every instruction set this CPU has, the portable code first.
    fn each_isa(mut f: impl FnMut(Isa)) {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if isa.supported() {
                f(isa);
            }
        }
    }

    #[test]
    fn scores_equal_the_sums_written_out() {
        // Widths with and without a tail of dimensions, positions with and without a tail
        // of lanes, head counts across a tile, f32, f16 and int8 entries; one block, and
        // runs of blocks (whole and partial registers, a partial last block, a gap between
        // blocks).
        each_isa(|isa| {
            let cases = [
                (64, 16, 3, None),
                (7, 5, 1, None),
                (33, 29, 6, None),
                (128, 32, 4, None),
                (64, 40, 3, Some(16)),
                (9, 13, 2, Some(5)),
                (16, 51, 4, Some(24)),
            ];
            for (dim, n, heads, block) in cases {
                let layout = match block {
                    None => KeyBlocks::single(n + 3),
                    Some(b) => KeyBlocks {
                        block: b,
                        pitch: dim * b + 3,
                    },
                };
                let q: Vec<f32> = (0..heads * dim).map(|i| value(i, 1)).collect();
                let len = layout.entry(dim - 1, n - 1) + 1;
                let raw: Vec<f32> = (0..len).map(|i| value(i, 2)).collect();
                let halves: Vec<f16> = raw.iter().map(|&x| f16::from_f32(x)).collect();
                let (ints, scales) = int8_entries(&raw, n);
                let int8 = Cached::Int8 {
                    q: &ints,
                    scales: &scales,
                };
                for keys in [Cached::F32(&raw), Cached::F16(&halves), int8] {
                    let out_stride = n + 1;
                    let mut out = vec![f32::NAN; heads * out_stride];
                    scores_by_dim_on(isa, &q, dim, 0.5, keys, layout, n, &mut out, out_stride);
                    for h in 0..heads {
                        for j in 0..n {
                            let terms = (0..dim).map(|d| {
                                q[h * dim + d] as f64
                                    * keys.get(layout.entry(d, j)) as f64
                                    * keys.scale(j) as f64
                            });
                            let want: f64 = 0.5 * terms.clone().sum::<f64>();
                            let size: f64 = 0.5 * terms.map(f64::abs).sum::<f64>();
                            let got = out[h * out_stride + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + size),
                                "{isa:?} {keys:?}: dim {dim} head {h} pos {j}: {got} vs {want}"
                            );
                        }
                        assert!(out[h * out_stride + n].is_nan(), "wrote past the positions");
                    }
                }
            }
        });
    }

    #[test]
    fn weighted_rows_equal_the_sums_written_out() {
        each_isa(|isa| {
            for (dim, n, heads) in [(64, 16, 3), (7, 5, 1), (40, 9, 6), (128, 1, 4), (96, 17, 2)] {
                let stride = dim + 5;
                let raw: Vec<f32> = (0..n * stride).map(|i| value(i, 3)).collect();
                let halves: Vec<f16> = raw.iter().map(|&x| f16::from_f32(x)).collect();
                let (ints, scales) = int8_entries(&raw, n);
                let a_stride = n + 2;
                let a: Vec<f32> = (0..heads * a_stride).map(|i| value(i, 4)).collect();
                let int8 = Cached::Int8 {
                    q: &ints,
                    scales: &scales,
                };
                for rows in [Cached::F32(&raw), Cached::F16(&halves), int8] {
                    let start: Vec<f32> = (0..heads * dim).map(|i| value(i, 5)).collect();
                    let mut y = start.clone();
                    add_weighted_rows_on(isa, &a, a_stride, rows, stride, n, &mut y, dim);
                    for h in 0..heads {
                        for i in 0..dim {
                            let terms = (0..n).map(|j| {
                                a[h * a_stride + j] as f64
                                    * rows.scale(j) as f64
                                    * rows.get(j * stride + i) as f64
                            });
                            let want = start[h * dim + i] as f64 + terms.clone().sum::<f64>();
                            let size =
                                start[h * dim + i].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                            let got = y[h * dim + i] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + size),
                                "{isa:?} {rows:?}: dim {dim} head {h} col {i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        });
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn rows_past_the_entries_are_refused() {
        let rows = [0f32; 10];
        let mut y = [0f32; 4];
        // Three rows of 4 at a stride of 4 need 12 entries.
        add_weighted_rows(&[1.0, 1.0, 1.0], 3, Cached::F32(&rows), 4, 3, &mut y, 4);
    }

    #[test]
    #[should_panic(expected = "keys hold")]
    fn keys_past_the_entries_are_refused() {
        let keys = [0f32; 10];
        let mut out = [0f32; 4];
        scores_by_dim(
            &[1.0; 4],
            4,
            1.0,
            Cached::F32(&keys),
            KeyBlocks::single(3),
            3,
            &mut out,
            4,
        );
    }
}
