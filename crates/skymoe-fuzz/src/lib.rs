//! Fuzzing of skymoe's file parsers.
//!
//! * [`targets`]: one target per parser (safetensors headers and indexes, GGUF with its
//!   tokenizer, PyTorch zip archives, the pickle machine, SentencePiece `tokenizer.model`),
//!   each a function from arbitrary bytes that must return normally, and the seeds for each,
//!   taken from the committed fixtures.
//! * [`alloc`]: a global allocator that makes an allocation over a limit a finding.
//! * [`mutate`] and [`runner`]: a mutation fuzzer that needs only the stable toolchain; the
//!   `skymoe-fuzz` binary runs it (CI runs each target for about a minute).
//!
//! The coverage-guided `cargo fuzz` targets in the repository's `fuzz/` directory call the
//! same [`targets::Target::run`]; `docs/FUZZING.md` says how to run both.

pub mod alloc;
pub mod mutate;
pub mod runner;
pub mod targets;

pub use targets::Target;
