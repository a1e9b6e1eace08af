//! Data parallelism for the trainer.
