//! `skymoe tokenizer`: train a byte-level BPE tokenizer on a corpus.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `skymoe tokenizer`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

/// The `tokenizer` sub-verbs.
#[derive(clap::Subcommand)]
enum Command {
    /// Train a byte-level BPE tokenizer (GPT-2 style) and write tokenizer.json.
    Train(TrainArgs),
}

/// Arguments of `skymoe tokenizer train`.
#[derive(clap::Args)]
struct TrainArgs {
    /// Corpus files or directories (recursed, hidden entries skipped): `.jsonl` files hold one
    /// {"text": ...} object per line, any other file is one document.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Vocabulary size, special tokens and the 256 byte symbols included.
    #[arg(long)]
    vocab_size: usize,
    /// A special token such as "<|endoftext|>" (repeatable); special tokens come first in the
    /// vocabulary, in the order given.
    #[arg(long = "special")]
    special: Vec<String>,
    /// Output: a directory (tokenizer.json is written inside, created if needed) or a file
    /// path ending in .json.
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Command::Train(t) => train(t),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let out = if a.out.is_dir() {
        a.out.join("tokenizer.json")
    } else if a
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        a.out.clone()
    } else {
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("cannot create directory {}", a.out.display()))?;
        a.out.join("tokenizer.json")
    };
    let stats = skymoe_train::data::train_tokenizer(&a.data, a.vocab_size, &a.special, &out)
        .context("tokenizer training failed")?;
    eprintln!(
        "wrote {}: vocab size {} ({} special), {} documents, {} bytes from {} files",
        stats.path.display(),
        stats.vocab_size,
        a.special.len(),
        stats.corpus.documents,
        stats.corpus.bytes,
        stats.corpus.files
    );
    Ok(())
}
