//! A global allocator that turns unbounded allocation into a finding.
//!
//! [`LimitAlloc`] forwards to the system allocator and keeps count of the bytes that are live.
//! A single request above its per-allocation limit, or a request that would take the live
//! total above its total limit, is refused: the registered hook (see [`set_oversize_hook`])
//! is told about it and then the process aborts, so that no parser can hide a
//! size-from-the-header allocation behind a machine with plenty of memory.
//!
//! Install it in a fuzzing binary with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: skymoe_fuzz::alloc::LimitAlloc = skymoe_fuzz::alloc::LimitAlloc::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Default limit on one allocation: 512 MiB.
pub const DEFAULT_SINGLE_LIMIT: usize = 512 << 20;
/// Default limit on the bytes live at once: 2 GiB.
pub const DEFAULT_TOTAL_LIMIT: usize = 2 << 30;

static SINGLE_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_SINGLE_LIMIT);
static TOTAL_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_TOTAL_LIMIT);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static IN_HOOK: AtomicBool = AtomicBool::new(false);
static HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// What went over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// One allocation of this many bytes was requested.
    Single(usize),
    /// This allocation would have taken the live total to the second number of bytes.
    Total(usize, usize),
}

impl std::fmt::Display for Oversize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Oversize::Single(n) => write!(
                f,
                "a single allocation of {n} bytes (limit {} bytes)",
                SINGLE_LIMIT.load(Ordering::Relaxed)
            ),
            Oversize::Total(n, total) => write!(
                f,
                "an allocation of {n} bytes taking the live heap to {total} bytes (limit {} bytes)",
                TOTAL_LIMIT.load(Ordering::Relaxed)
            ),
        }
    }
}

/// Set the limits: on one allocation and on the bytes live at once.
pub fn set_limits(single: usize, total: usize) {
    SINGLE_LIMIT.store(single, Ordering::Relaxed);
    TOTAL_LIMIT.store(total, Ordering::Relaxed);
}

/// Register the function called (once) before the process aborts on an allocation over a
/// limit. It may allocate (small amounts) and do I/O; it should not return if it wants to
/// choose the exit status itself.
pub fn set_oversize_hook(hook: fn(Oversize)) {
    HOOK.store(hook as *mut (), Ordering::SeqCst);
}

/// Bytes live now (as seen by [`LimitAlloc`]; zero when it is not the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The largest number of bytes live at once so far.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Forget the peak (start measuring again from what is live now).
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The system allocator with a limit on one allocation and on the live total.
pub struct LimitAlloc;

impl LimitAlloc {
    /// The allocator, with the default limits (change them with [`set_limits`]).
    pub const fn new() -> Self {
        LimitAlloc
    }
}

impl Default for LimitAlloc {
    fn default() -> Self {
        Self::new()
    }
}

#[cold]
fn over_limit(what: Oversize) -> ! {
    // Allocation inside the hook goes through `check` again; the flag keeps a second finding
    // (or one raised by the hook itself) from recursing.
    if !IN_HOOK.swap(true, Ordering::SeqCst) {
        let hook = HOOK.load(Ordering::SeqCst);
        if hook.is_null() {
            eprintln!(
                "allocation over the limit: {what}\n{}",
                std::backtrace::Backtrace::force_capture()
            );
        } else {
            // SAFETY: the pointer was stored by `set_oversize_hook` from a `fn(Oversize)`.
            let hook: fn(Oversize) = unsafe { std::mem::transmute::<*mut (), fn(Oversize)>(hook) };
            hook(what);
        }
    }
    std::process::abort()
}

/// Refuse a request for a block of `size` bytes that adds `grows` bytes to the live total.
fn check(size: usize, grows: usize) {
    if IN_HOOK.load(Ordering::Relaxed) {
        return;
    }
    if size > SINGLE_LIMIT.load(Ordering::Relaxed) {
        over_limit(Oversize::Single(size));
    }
    let total = LIVE.load(Ordering::Relaxed).saturating_add(grows);
    if total > TOTAL_LIMIT.load(Ordering::Relaxed) {
        over_limit(Oversize::Total(size, total));
    }
}

fn added(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; the bookkeeping around the
// calls touches only atomics, and a refused request aborts instead of unwinding.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size(), layout.size());
        // SAFETY: forwarded from the caller, who upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size(), layout.size());
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller: `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size, new_size.saturating_sub(layout.size()));
        // SAFETY: forwarded from the caller, who upholds `GlobalAlloc::realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                added(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}
