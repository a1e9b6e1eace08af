//! The element storage of a [`super::QMatrix`]: a vector it owns, or elements read in place
//! from shared bytes — typically a checkpoint's memory map, so that a model served as stored
//! is not copied at load and its resident memory is the weights' pages actually touched.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

/// Bytes shared by several readers: a memory map, a `Vec<u8>`, … (`as_ref` must return the
/// same slice every time, as both do).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
    impl Sealed for u8 {}
    impl Sealed for i8 {}
}

/// A plain element type a [`Store`] can read from bytes: every bit pattern is a valid value
/// and the type has no padding (f32, u16, u8, i8).
pub trait Element: Copy + Send + Sync + 'static + sealed::Sealed {}
impl Element for f32 {}
impl Element for u16 {}
impl Element for u8 {}
impl Element for i8 {}

/// Elements of a quantised matrix, owned or read in place from [`SharedBytes`]
/// (little-endian, as checkpoints store them). Dereferences to `[T]`.
#[derive(Clone)]
pub struct Store<T: Element> {
    inner: Inner<T>,
}

#[derive(Clone)]
enum Inner<T> {
    Owned(Vec<T>),
    Shared {
        bytes: SharedBytes,
        /// Byte offset of the first element.
        offset: usize,
        /// Elements.
        len: usize,
        _elem: PhantomData<T>,
    },
}

impl<T: Element> Store<T> {
    /// `len` elements at byte `offset` of `bytes`, read in place; `None` when they are not
    /// all inside `bytes`, not aligned for `T`, or on a big-endian target (where the stored
    /// little-endian values would need converting).
    pub fn shared(bytes: SharedBytes, offset: usize, len: usize) -> Option<Self> {
        if cfg!(target_endian = "big") && size_of::<T>() > 1 {
            return None;
        }
        let size = len.checked_mul(size_of::<T>())?;
        let end = offset.checked_add(size)?;
        let all = (*bytes).as_ref();
        if end > all.len() || !(all.as_ptr() as usize + offset).is_multiple_of(align_of::<T>()) {
            return None;
        }
        Some(Store {
            inner: Inner::Shared {
                bytes,
                offset,
                len,
                _elem: PhantomData,
            },
        })
    }

    /// Whether the elements are read in place from shared bytes (not owned).
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, Inner::Shared { .. })
    }
}

impl<T: Element> From<Vec<T>> for Store<T> {
    fn from(v: Vec<T>) -> Self {
        Store {
            inner: Inner::Owned(v),
        }
    }
}

impl<T: Element> Deref for Store<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            Inner::Shared {
                bytes, offset, len, ..
            } => {
                let all = (**bytes).as_ref();
                let end = offset + len * size_of::<T>();
                let p = all[*offset..end].as_ptr();
                // Checked when the store was made; checked again in case `as_ref` moved.
                assert!(
                    (p as usize).is_multiple_of(align_of::<T>()),
                    "shared bytes moved to a misaligned address"
                );
                // SAFETY: `p` points at `len · size_of::<T>()` bytes inside `all` (sliced just
                // above), aligned for `T` (asserted); `T` is a plain type for which every bit
                // pattern is valid (`Element`), and the bytes live as long as `self` holds the
                // `Arc` (shared bytes are never written).
                unsafe { std::slice::from_raw_parts(p as *const T, *len) }
            }
        }
    }
}

impl<T: Element + fmt::Debug> fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("shared", &self.is_shared())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_stores_read_in_place_and_refuse_bad_ranges() {
        let raw: Vec<u8> = (0u8..64).collect();
        let bytes: SharedBytes = Arc::new(raw.clone());
        let s = Store::<i8>::shared(bytes.clone(), 3, 10).unwrap();
        assert!(s.is_shared());
        assert_eq!(
            &s[..],
            &raw[3..13].iter().map(|&b| b as i8).collect::<Vec<_>>()[..]
        );
        let base = (*bytes).as_ref().as_ptr() as usize;
        let even = if base.is_multiple_of(2) { 0 } else { 1 };
        let h = Store::<u16>::shared(bytes.clone(), even, 4).unwrap();
        let want: Vec<u16> = raw[even..even + 8]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(&h[..], &want[..]);
        // Misaligned, past the end, overflowing.
        assert!(Store::<u16>::shared(bytes.clone(), even + 1, 4).is_none());
        assert!(Store::<i8>::shared(bytes.clone(), 60, 5).is_none());
        assert!(Store::<f32>::shared(bytes.clone(), 0, usize::MAX / 2).is_none());
        assert!(Store::<u8>::shared(bytes, usize::MAX, 1).is_none());
        let owned = Store::from(vec![1.5f32, 2.5]);
        assert!(!owned.is_shared());
        assert_eq!(&owned[..], &[1.5, 2.5]);
    }
}
