//! Training data: corpora, tokenizer training, memory-mapped token files, packed batches.
