//! Coverage-guided fuzzing of the `gguf` target (see `docs/FUZZING.md`).
#![no_main]

use skymoe_fuzz::alloc::LimitAlloc;
use skymoe_fuzz::Target;

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    Target::Gguf.run(data);
});
