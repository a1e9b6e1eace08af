//! The device mesh: which ranks form each group of a parallel layout.
