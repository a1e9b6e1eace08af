//! The process allocator: mimalloc, told to keep freed memory for a while.
//!
//! Training allocates and frees the same large tensor buffers every step. glibc's malloc and
//! mimalloc's defaults return such buffers to the kernel almost at once, and the next step pays
//! for page faults and zeroing again; keeping them for ten seconds cut page faults
//! from ~33,000 to ~1,000 in an 8-step run of the benchmark of BENCHMARKS.md and made training
//! about 30% faster.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds freed memory stays with the process before it is returned to the kernel.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Configure the allocator, unless the user set `MIMALLOC_PURGE_DELAY` themselves.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; it takes no
    // pointers, is thread-safe, and may be called at any time (the option is read on each purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}
