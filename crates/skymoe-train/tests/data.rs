//! The training-data pipeline: corpus reading, tokenizer training, token files, packing.

use std::fs;
use std::path::{Path, PathBuf};

use skymoe_train::data::{
    batch_tensors, train_tokenizer, Corpus, DataError, PackedDataset, TokenFile,
    TOKEN_FILE_HEADER_LEN,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn write(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(path, content).unwrap();
}

/// Every document of `inputs` as (text, file name, line).
fn read_all<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<(String, String, Option<u64>)>, DataError> {
    let corpus = Corpus::new(inputs)?;
    corpus
        .documents()
        .map(|d| {
            d.map(|d| {
                let name = d.path.file_name().unwrap().to_string_lossy().into_owned();
                (d.text, name, d.line)
            })
        })
        .collect()
}

/// A token file written by hand from the documented layout (independent of `TokenFile::build`).
fn handmade_token_file(path: &Path, tokens: &[u32], vocab: u32, eos: Option<u32>) {
    let mut b = Vec::new();
    b.extend_from_slice(b"SKYMOETK");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&64u32.to_le_bytes());
    b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    b.extend_from_slice(&7u64.to_le_bytes());
    b.extend_from_slice(&vocab.to_le_bytes());
    b.extend_from_slice(&eos.unwrap_or(u32::MAX).to_le_bytes());
    b.resize(64, 0);
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    fs::write(path, b).unwrap();
}

/// A packed dataset over the tokens `0..n`.
fn counting_dataset(
    dir: &Path,
    n: u32,
    seq_len: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<PackedDataset, DataError> {
    let path = dir.join(format!("count-{n}-{seed}-{seq_len}.tok"));
    let tokens: Vec<u32> = (0..n).collect();
    handmade_token_file(&path, &tokens, n.max(1), None);
    PackedDataset::new(TokenFile::open(&path)?, seq_len, val_fraction, seed)
}

const SAMPLE: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n\
    The king and the queen went to the castle, and the castle was large.\n\
    Les élèves étudient à l'école. Naïve café — 日本語のテキスト, emoji 🎉🎉.\n";

/// A small corpus: a JSONL file and a text file.
fn sample_corpus(dir: &Path) -> Vec<PathBuf> {
    let mut jsonl = String::new();
    for i in 0..40 {
        let text = format!("{SAMPLE} Line {i}: the the the end.");
        jsonl.push_str(&serde_json::json!({ "text": text, "id": i }).to_string());
        jsonl.push('\n');
    }
    write(&dir.join("corpus/a.jsonl"), jsonl);
    write(&dir.join("corpus/b.txt"), SAMPLE.repeat(5));
    vec![dir.join("corpus")]
}

// ---------------------------------------------------------------------------------------------
// Corpus reading

#[test]
fn corpus_reads_jsonl_text_and_nested_dirs_in_sorted_order() -> TestResult {
    let t = tempfile::tempdir()?;
    let root = t.path().join("data");
    write(
        &root.join("a.jsonl"),
        "{\"text\": \"one\"}\n\n   \n{\"id\": 3}\n{\"text\": 5}\n[1, 2]\n{\"text\": \"\"}\n{\"text\": \"two\\nlines\", \"x\": {\"y\": 1}}\r\n{\"text\": \"last, no newline\"}",
    );
    write(&root.join("b.txt"), "bee");
    write(&root.join("sub/c.md"), "\u{FEFF}sea");
    write(
        &root.join("sub/deeper/d.JSONL"),
        "\u{FEFF}{\"text\": \"dee\"}\n",
    );
    write(&root.join("sub/empty.txt"), "");
    write(&root.join("z.txt"), "zed");
    write(&root.join(".hidden.txt"), "hidden");
    write(&root.join(".git/e.txt"), "hidden too");
    write(&root.join("sub/.f.jsonl"), "{\"text\": \"hidden three\"}\n");
    let extra = t.path().join(".explicit.txt");
    write(&extra, "explicit");

    // Named twice (directly and inside the directory), and reached through a link: read once.
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("sub"), root.join("sub/deeper/loop"))?;
    let inputs = vec![root.clone(), extra.clone(), root.join("b.txt")];
    let corpus = Corpus::new(&inputs)?;
    let names: Vec<_> = corpus
        .files()
        .iter()
        .map(|p| p.strip_prefix(t.path()).unwrap().to_path_buf())
        .collect();
    let expect: Vec<PathBuf> = [
        "data/a.jsonl",
        "data/b.txt",
        "data/sub/c.md",
        "data/sub/deeper/d.JSONL",
        "data/sub/empty.txt",
        "data/z.txt",
        ".explicit.txt",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(names, expect);

    let docs = read_all(&inputs)?;
    let expect = vec![
        ("one".to_string(), "a.jsonl".to_string(), Some(1)),
        ("two\nlines".into(), "a.jsonl".into(), Some(8)),
        ("last, no newline".into(), "a.jsonl".into(), Some(9)),
        ("bee".into(), "b.txt".into(), None),
        ("sea".into(), "c.md".into(), None),
        ("dee".into(), "d.JSONL".into(), Some(1)),
        ("zed".into(), "z.txt".into(), None),
        ("explicit".into(), ".explicit.txt".into(), None),
    ];
    assert_eq!(docs, expect);

    let mut it = corpus.documents();
    for d in it.by_ref() {
        d?;
    }
    let stats = it.stats();
    assert_eq!(stats.files, 7);
    assert_eq!(stats.documents, 8);
    // {"id": 3}, {"text": 5}, [1, 2], {"text": ""}
    assert_eq!(stats.skipped_lines, 4);
    let bytes: usize = expect.iter().map(|d| d.0.len()).sum();
    assert_eq!(stats.bytes, bytes as u64);
    Ok(())
}

#[test]
fn non_utf8_text_file_is_an_error_naming_the_file() -> TestResult {
    let t = tempfile::tempdir()?;
    write(&t.path().join("a.txt"), "fine");
    let bad = t.path().join("b.txt");
    write(&bad, b"caf\xe9 latin-1");
    let got = read_all(&[t.path()]);
    match got {
        Err(ref e @ DataError::NotUtf8 { ref path, line }) => {
            assert_eq!(path, &bad);
            assert_eq!(line, None);
            assert!(e.to_string().contains("b.txt"), "{e}");
            assert!(e.to_string().contains("UTF-8"), "{e}");
        }
        other => panic!("expected NotUtf8, got {other:?}"),
    }
    Ok(())
}

#[test]
fn non_utf8_jsonl_line_is_an_error_naming_file_and_line() -> TestResult {
    let t = tempfile::tempdir()?;
    let bad = t.path().join("x.jsonl");
    write(
        &bad,
        b"{\"text\": \"ok\"}\n\n{\"text\": \"caf\xe9\"}\n{\"text\": \"after\"}\n",
    );
    let corpus = Corpus::new(&[&bad])?;
    let mut docs = corpus.documents();
    assert_eq!(docs.next().unwrap()?.text, "ok");
    match docs.next() {
        Some(Err(ref e @ DataError::NotUtf8 { ref path, line })) => {
            assert_eq!(path, &bad);
            assert_eq!(line, Some(3));
            assert!(e.to_string().contains("line 3"), "{e}");
        }
        other => panic!("expected NotUtf8, got {other:?}"),
    }
    // The stream stops after an error.
    assert!(docs.next().is_none());
    Ok(())
}

#[test]
fn malformed_jsonl_is_an_error_with_line_number() -> TestResult {
    let t = tempfile::tempdir()?;
    let bad = t.path().join("m.jsonl");
    write(
        &bad,
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"unterminated\n{\"text\": \"d\"}\n",
    );
    match read_all(&[&bad]) {
        Err(ref e @ DataError::BadJsonl { ref path, line, .. }) => {
            assert_eq!(path, &bad);
            assert_eq!(line, 3);
            let msg = e.to_string();
            assert!(msg.contains("m.jsonl") && msg.contains("line 3"), "{msg}");
        }
        other => panic!("expected BadJsonl, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_inputs_and_empty_corpora_are_errors() -> TestResult {
    let t = tempfile::tempdir()?;
    let none: [PathBuf; 0] = [];
    assert!(matches!(Corpus::new(&none), Err(DataError::NoInputs)));
    let missing = t.path().join("nope");
    match Corpus::new(&[&missing]) {
        Err(DataError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io, got {other:?}"),
    }

    // Only hidden files, blank JSONL lines, text-less objects and empty files.
    let dir = t.path().join("empty");
    write(&dir.join(".hidden.txt"), "not read");
    write(&dir.join("blank.jsonl"), "\n\n{\"meta\": 1}\n");
    write(&dir.join("void.txt"), "");
    assert!(read_all(&[&dir])?.is_empty());

    let out = t.path().join("tokenizer.json");
    match train_tokenizer(&[&dir], 300, &["<|endoftext|>"], &out) {
        Err(ref e @ DataError::EmptyCorpus { ref inputs }) => {
            assert_eq!(inputs, &vec![dir.clone()]);
            assert!(e.to_string().contains("no documents"), "{e}");
        }
        other => panic!("expected EmptyCorpus, got {other:?}"),
    }
    assert!(!out.exists());

    // A token file needs documents too.
    let tok_path = t.path().join("tok.json");
    train_tokenizer(&sample_corpus(t.path()), 300, &["<|endoftext|>"], &tok_path)?;
    let tok = tokenizers::Tokenizer::from_file(&tok_path)?;
    let tf = t.path().join("out.tok");
    assert!(matches!(
        TokenFile::build(&[&dir], &tok, Some(0), &tf),
        Err(DataError::EmptyCorpus { .. })
    ));
    assert!(!tf.exists());
    assert_no_temp_files(t.path());
    Ok(())
}

fn assert_no_temp_files(dir: &Path) {
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer training

#[test]
fn trained_tokenizer_round_trips_text_and_has_specials_first() -> TestResult {
    let t = tempfile::tempdir()?;
    let inputs = sample_corpus(t.path());
    let out = t.path().join("tokenizer.json");
    let specials = ["<|endoftext|>", "<|pad|>"];
    let stats = train_tokenizer(&inputs, 320, &specials, &out)?;
    assert_eq!(stats.corpus.documents, 41);
    assert_eq!(stats.corpus.files, 2);
    assert_eq!(stats.path, out);
    assert_no_temp_files(t.path());

    let tok = tokenizers::Tokenizer::from_file(&out)?;
    assert_eq!(tok.get_vocab_size(true), stats.vocab_size);
    assert!(stats.vocab_size <= 320, "{}", stats.vocab_size);
    assert!(
        stats.vocab_size > 258,
        "no merges learned: {}",
        stats.vocab_size
    );
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|pad|>"), Some(1));

    for text in [
        "Hello, world!",
        "  leading spaces and trailing   ",
        "naïve café — 日本語 🎉 Ελληνικά",
        "line one\nline two\r\n\ttabbed\n\n",
        "never seen: ¤ ǅ ₿ \u{1F9EC} \u{0}",
    ] {
        let enc = tok.encode(text, false)?;
        assert!(!enc.get_ids().is_empty());
        assert_eq!(tok.decode(enc.get_ids(), false)?, text);
    }
    // Merges are used: frequent words take fewer tokens than bytes.
    let enc = tok.encode("the castle and the king", false)?;
    assert!(enc.get_ids().len() < 12, "{:?}", enc.get_tokens());
    // Special tokens are matched as units inside text.
    let ids = tok.encode("a<|endoftext|>b", false)?.get_ids().to_vec();
    assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1, "{ids:?}");
    assert_eq!(tok.decode(&ids, false)?, "a<|endoftext|>b");

    // The model crate's tokenizer loader reads it too.
    let model_tok = skymoe_model::Tokenizer::from_file(&out)?;
    assert_eq!(
        model_tok.decode(&model_tok.encode_plain("the king")?)?,
        "the king"
    );
    Ok(())
}

#[test]
fn tokenizer_training_is_deterministic_and_checks_arguments() -> TestResult {
    let t = tempfile::tempdir()?;
    let inputs = sample_corpus(t.path());
    let a = t.path().join("a.json");
    let b = t.path().join("b.json");
    train_tokenizer(&inputs, 300, &["<|endoftext|>"], &a)?;
    train_tokenizer(&inputs, 300, &["<|endoftext|>"], &b)?;
    assert_eq!(fs::read(&a)?, fs::read(&b)?);

    // Overwriting an existing file works.
    train_tokenizer(&inputs, 280, &["<|endoftext|>"], &a)?;
    assert!(tokenizers::Tokenizer::from_file(&a)?.get_vocab_size(true) <= 280);

    let out = t.path().join("c.json");
    for (vocab, specials) in [
        (257, vec!["<|endoftext|>", "<|pad|>"]),
        (300, vec!["<|endoftext|>", "<|endoftext|>"]),
        (300, vec![""]),
    ] {
        assert!(
            matches!(
                train_tokenizer(&inputs, vocab, &specials, &out),
                Err(DataError::InvalidArgument(_))
            ),
            "{vocab} {specials:?}"
        );
    }
    // Exactly the byte alphabet plus the specials is allowed.
    train_tokenizer(&inputs, 257, &["<|endoftext|>"], &out)?;
    assert_eq!(
        tokenizers::Tokenizer::from_file(&out)?.get_vocab_size(true),
        257
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token files

#[test]
fn token_file_equals_direct_tokenization_with_eos_between_documents() -> TestResult {
    let t = tempfile::tempdir()?;
    let inputs = sample_corpus(t.path());
    let tok_path = t.path().join("tokenizer.json");
    train_tokenizer(&inputs, 300, &["<|endoftext|>"], &tok_path)?;
    let tok = tokenizers::Tokenizer::from_file(&tok_path)?;
    let eos = tok.token_to_id("<|endoftext|>").unwrap();

    // Expected: every document tokenized on its own, each followed by EOS.
    let corpus = Corpus::new(&inputs)?;
    let docs: Vec<String> = corpus
        .documents()
        .map(|d| d.map(|d| d.text))
        .collect::<Result<_, _>>()?;
    assert_eq!(docs.len(), 41);
    let mut expected = Vec::new();
    for d in &docs {
        expected.extend_from_slice(tok.encode(d.as_str(), false)?.get_ids());
        expected.push(eos);
    }

    let path = t.path().join("train.tok");
    let stats = TokenFile::build(&inputs, &tok, Some(eos), &path)?;
    assert_eq!(stats.tokens, expected.len() as u64);
    assert_eq!(stats.documents, 41);
    assert_eq!(stats.vocab_size as usize, tok.get_vocab_size(true));
    assert_no_temp_files(t.path());
    let tf = TokenFile::open(&path)?;
    assert_eq!(tf.len(), expected.len());
    assert_eq!(tf.tokens(), &expected[..]);
    assert_eq!(tf.get(3..10), Some(&expected[3..10]));
    assert_eq!(tf.get(0..expected.len() + 1), None);
    assert_eq!(tf.eos_id(), Some(eos));
    assert_eq!(tf.num_documents(), 41);
    assert_eq!(tf.vocab_size() as usize, tok.get_vocab_size(true));
    assert_eq!(
        tf.tokens().iter().filter(|&&x| x == eos).count(),
        docs.len()
    );
    tf.verify()?;
    // The token stream decodes back to the documents.
    let decoded = tok.decode(tf.tokens(), false)?;
    assert_eq!(decoded, docs.join("<|endoftext|>") + "<|endoftext|>");

    // Without EOS, and rebuilt over the same path.
    let stats = TokenFile::build(&inputs, &tok, None, &path)?;
    let tf2 = TokenFile::open(&path)?;
    let no_eos: Vec<u32> = expected.iter().copied().filter(|&x| x != eos).collect();
    assert_eq!(tf2.tokens(), &no_eos[..]);
    assert_eq!(stats.tokens, no_eos.len() as u64);
    assert_eq!(tf2.eos_id(), None);
    // The first map still reads the old file (it was replaced by a rename, not rewritten).
    assert_eq!(tf.tokens(), &expected[..]);

    // An EOS id the tokenizer does not have is refused.
    let bad = t.path().join("bad.tok");
    assert!(matches!(
        TokenFile::build(&inputs, &tok, Some(1_000_000), &bad),
        Err(DataError::InvalidArgument(_))
    ));
    assert!(!bad.exists());
    Ok(())
}

#[test]
fn corrupt_and_truncated_token_files_are_typed_errors() -> TestResult {
    let t = tempfile::tempdir()?;
    let good = t.path().join("good.tok");
    let tokens: Vec<u32> = (0..100).collect();
    handmade_token_file(&good, &tokens, 100, Some(99));
    let tf = TokenFile::open(&good)?;
    assert_eq!(tf.tokens(), &tokens[..]);
    assert_eq!(tf.eos_id(), Some(99));
    assert_eq!(tf.num_documents(), 7);
    let bytes = fs::read(&good)?;
    assert_eq!(bytes.len(), TOKEN_FILE_HEADER_LEN + 400);

    let expect_corrupt = |name: &str, content: &[u8], needle: &str| {
        let p = t.path().join(name);
        fs::write(&p, content).unwrap();
        match TokenFile::open(&p) {
            Err(
                ref e @ DataError::CorruptTokenFile {
                    ref path,
                    ref reason,
                },
            ) => {
                assert_eq!(path, &p);
                assert!(reason.contains(needle), "{name}: {reason}");
                assert!(e.to_string().contains(name), "{e}");
            }
            other => panic!("{name}: expected CorruptTokenFile, got {other:?}"),
        }
    };
    expect_corrupt("trunc2.tok", &bytes[..bytes.len() - 2], "truncated");
    expect_corrupt("trunc4.tok", &bytes[..bytes.len() - 4], "truncated");
    expect_corrupt(
        "header-only.tok",
        &bytes[..TOKEN_FILE_HEADER_LEN],
        "truncated",
    );
    expect_corrupt("short.tok", &bytes[..30], "shorter than");
    expect_corrupt("empty.tok", &[], "shorter than");
    let mut extra = bytes.clone();
    extra.extend_from_slice(&[0, 0, 0, 0]);
    expect_corrupt("extra.tok", &extra, "size mismatch");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    expect_corrupt("magic.tok", &magic, "magic");
    let mut version = bytes.clone();
    version[8] = 2;
    expect_corrupt("version.tok", &version, "version 2");
    let mut huge = bytes.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_corrupt("huge.tok", &huge, "size mismatch");
    let mut zero = bytes[..TOKEN_FILE_HEADER_LEN].to_vec();
    zero[16..24].copy_from_slice(&0u64.to_le_bytes());
    expect_corrupt("zero.tok", &zero, "no tokens");
    let mut eos = bytes.clone();
    eos[36..40].copy_from_slice(&100u32.to_le_bytes());
    expect_corrupt("eos.tok", &eos, "end-of-sequence");

    // Ids outside the vocabulary are caught by `verify`.
    let p = t.path().join("ids.tok");
    handmade_token_file(&p, &[1, 2, 50, 3], 10, None);
    let tf = TokenFile::open(&p)?;
    match tf.verify() {
        Err(DataError::CorruptTokenFile { reason, .. }) => assert!(reason.contains("50")),
        other => panic!("expected CorruptTokenFile, got {other:?}"),
    }

    match TokenFile::open(&t.path().join("missing.tok")) {
        Err(DataError::Io { .. }) => {}
        other => panic!("expected Io, got {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Packing and batching

#[test]
fn windows_tile_the_stream_and_split_covers_every_window_once() -> TestResult {
    let t = tempfile::tempdir()?;
    let n = 1003u32;
    let seq = 10usize;
    let ds = counting_dataset(t.path(), n, seq, 0.1, 42)?;
    assert_eq!(ds.seq_len(), seq);
    assert_eq!(ds.num_windows(), 100);
    assert_eq!(ds.num_val(), 10);
    assert_eq!(ds.num_train(), 90);

    let stream: Vec<u32> = (0..n).collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for i in 0..ds.num_windows() {
        let w = ds.window(i).unwrap();
        assert_eq!(w.len(), seq + 1);
        inputs.extend_from_slice(&w[..seq]);
        targets.extend_from_slice(&w[1..]);
    }
    assert!(ds.window(ds.num_windows()).is_none());
    assert_eq!(inputs, stream[..100 * seq]);
    assert_eq!(targets, stream[1..100 * seq + 1]);

    let mut all: Vec<usize> = ds
        .train_windows()
        .iter()
        .chain(ds.val_windows())
        .copied()
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert!(ds.val_windows().windows(2).all(|p| p[0] < p[1]));
    // The validation windows are spread out, not just the tail.
    assert_ne!(ds.val_windows(), (90..100).collect::<Vec<_>>());

    // Validation batches: fixed order, every validation window once.
    let batches: Vec<_> = ds.val_batches(3).collect();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 3, 3, 1]
    );
    assert_eq!(ds.val_batches(3).len(), 4);
    let seen: Vec<Vec<u32>> = batches.into_iter().flatten().collect();
    let want: Vec<Vec<u32>> = ds
        .val_windows()
        .iter()
        .map(|&i| ds.window(i).unwrap().to_vec())
        .collect();
    assert_eq!(seen, want);
    assert_eq!(ds.val_batches(3).flatten().collect::<Vec<_>>(), want);
    Ok(())
}

#[test]
fn shuffling_is_deterministic_per_seed_and_differs_across_seeds_and_epochs() -> TestResult {
    let t = tempfile::tempdir()?;
    let a = counting_dataset(t.path(), 2001, 4, 0.05, 7)?;
    let b = counting_dataset(t.path(), 2001, 4, 0.05, 7)?;
    let c = counting_dataset(t.path(), 2001, 4, 0.05, 8)?;
    assert_eq!(a.val_windows(), b.val_windows());
    assert_ne!(a.val_windows(), c.val_windows());
    assert_eq!(a.epoch_order(0), b.epoch_order(0));
    assert_eq!(a.epoch_order(3), b.epoch_order(3));
    assert_eq!(a.train_batch(123, 16), b.train_batch(123, 16));
    assert_ne!(a.train_batch(0, 16), c.train_batch(0, 16));

    let e0 = a.epoch_order(0);
    let e1 = a.epoch_order(1);
    assert_ne!(e0, e1);
    for order in [&e0, &e1] {
        assert_ne!(order.as_slice(), a.train_windows(), "not shuffled");
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            a.train_windows(),
            "not a permutation of the training windows"
        );
    }
    // Asking for other epochs in between does not change an epoch's order.
    for e in 2..6 {
        a.epoch_order(e);
    }
    assert_eq!(a.epoch_order(0), e0);
    Ok(())
}

#[test]
fn train_batch_is_a_pure_function_of_consumed_and_wraps_epochs() -> TestResult {
    let t = tempfile::tempdir()?;
    // 10 windows, 2 held out: 8 training sequences per epoch.
    let ds = counting_dataset(t.path(), 101, 10, 0.2, 3)?;
    assert_eq!((ds.num_train(), ds.num_val()), (8, 2));
    let tokens_of = |order: &[usize]| -> Vec<Vec<u32>> {
        order
            .iter()
            .map(|&w| ds.window(w).unwrap().to_vec())
            .collect()
    };
    let e0 = ds.epoch_order(0);
    let e1 = ds.epoch_order(1);

    let first = ds.train_batch(0, 4);
    let second = ds.train_batch(4, 4);
    assert_eq!([first.clone(), second].concat(), tokens_of(&e0));
    assert_eq!(ds.train_batch(0, 8), tokens_of(&e0));
    // Same call, same answer, whatever was asked in between.
    ds.train_batch(50, 7);
    assert_eq!(ds.train_batch(0, 4), first);
    // A fresh dataset agrees (nothing depends on call history).
    let again = counting_dataset(t.path(), 101, 10, 0.2, 3)?;
    assert_eq!(again.train_batch(4, 4), ds.train_batch(4, 4));

    // Across the epoch boundary: the last two of epoch 0, then the first two of epoch 1.
    let straddle = ds.train_batch(6, 4);
    let want = [tokens_of(&e0[6..]), tokens_of(&e1[..2])].concat();
    assert_eq!(straddle, want);
    assert_eq!(ds.epoch_of(7), 0);
    assert_eq!(ds.epoch_of(8), 1);
    assert_eq!(ds.train_window(9), e1[1]);

    // Three epochs in batches of 3: every training window exactly three times, never a
    // validation window.
    let mut counts = std::collections::HashMap::new();
    let mut consumed = 0u64;
    while consumed < 24 {
        for w in ds.train_batch(consumed, 3) {
            assert_eq!(w.len(), 11);
            *counts.entry(w[0] / 10).or_insert(0) += 1;
        }
        consumed += 3;
    }
    for &w in ds.train_windows() {
        assert_eq!(counts.get(&(w as u32)), Some(&3), "window {w}");
    }
    for &w in ds.val_windows() {
        assert_eq!(
            counts.get(&(w as u32)),
            None,
            "validation window {w} trained on"
        );
    }
    assert!(ds.train_batch(5, 0).is_empty());

    fn shareable<T: Send + Sync>(_: &T) {}
    shareable(&ds);
    Ok(())
}

#[test]
fn split_sizes_at_the_edges() -> TestResult {
    let t = tempfile::tempdir()?;
    // Exactly one window: everything trains, even with a validation fraction.
    let ds = counting_dataset(t.path(), 11, 10, 0.5, 1)?;
    assert_eq!((ds.num_windows(), ds.num_train(), ds.num_val()), (1, 1, 0));
    assert_eq!(ds.val_batches(4).count(), 0);
    assert_eq!(ds.train_batch(0, 3), vec![(0..11).collect::<Vec<u32>>(); 3]);
    // Two windows and a tiny fraction: validation still gets one.
    let ds = counting_dataset(t.path(), 21, 10, 0.001, 1)?;
    assert_eq!((ds.num_train(), ds.num_val()), (1, 1));
    // A large fraction still leaves one training window.
    let ds = counting_dataset(t.path(), 31, 10, 0.99, 1)?;
    assert_eq!((ds.num_train(), ds.num_val()), (1, 2));
    // No validation fraction: no validation.
    let ds = counting_dataset(t.path(), 1001, 10, 0.0, 1)?;
    assert_eq!((ds.num_train(), ds.num_val()), (100, 0));
    Ok(())
}

#[test]
fn too_few_tokens_and_bad_arguments_are_errors() -> TestResult {
    let t = tempfile::tempdir()?;
    match counting_dataset(t.path(), 10, 10, 0.1, 0) {
        Err(ref e @ DataError::TooFewTokens { have, need }) => {
            assert_eq!((have, need), (10, 11));
            let msg = e.to_string();
            assert!(msg.contains("10") && msg.contains("11"), "{msg}");
        }
        other => panic!("expected TooFewTokens, got {other:?}"),
    }
    for (seq, frac) in [(0, 0.1), (4, 1.0), (4, -0.1), (4, f64::NAN)] {
        assert!(
            matches!(
                counting_dataset(t.path(), 100, seq, frac, 0),
                Err(DataError::InvalidArgument(_))
            ),
            "{seq} {frac}"
        );
    }
    Ok(())
}

#[test]
fn batch_tensors_shift_targets_by_one() -> TestResult {
    let t = tempfile::tempdir()?;
    let ds = counting_dataset(t.path(), 101, 10, 0.2, 3)?;
    let batch = ds.train_batch(0, 4);
    let (x, y) = batch_tensors(&batch, &candle_core::Device::Cpu)?;
    assert_eq!(x.dims(), [4, 10]);
    assert_eq!(y.dims(), [4, 10]);
    let x = x.to_vec2::<u32>()?;
    let y = y.to_vec2::<u32>()?;
    for (b, w) in batch.iter().enumerate() {
        assert_eq!(x[b], w[..10]);
        assert_eq!(y[b], w[1..]);
    }
    assert!(batch_tensors(&[], &candle_core::Device::Cpu).is_err());
    assert!(batch_tensors(&[vec![1, 2, 3], vec![1, 2]], &candle_core::Device::Cpu).is_err());
    Ok(())
}
