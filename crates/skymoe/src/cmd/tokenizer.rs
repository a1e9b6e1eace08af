//! `skymoe tokenizer`: train a byte-level BPE tokenizer on a corpus, and encode or decode text
//! with the tokenizer of a model (a model directory or a GGUF file).

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
    /// Encode text and print the ids as a JSON array, with the special tokens the model's
    /// tokenizer config asks for (BOS if add_bos_token, EOS if add_eos_token).
    Encode(EncodeArgs),
    /// Decode comma-separated ids and print the text (special tokens skipped).
    Decode(DecodeArgs),
}

/// Arguments of `skymoe tokenizer encode`.
#[derive(clap::Args)]
struct EncodeArgs {
    /// A model directory (tokenizer.json or tokenizer.model, plus tokenizer_config.json) or a
    /// .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// The text to encode.
    #[arg(long)]
    text: String,
    /// Encode without any special tokens.
    #[arg(long)]
    no_special: bool,
}

/// Arguments of `skymoe tokenizer decode`.
#[derive(clap::Args)]
struct DecodeArgs {
    /// A model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma-separated (e.g. 1,2,3); empty for none.
    #[arg(long, allow_hyphen_values = true)]
    ids: String,
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
        Command::Encode(e) => encode(e),
        Command::Decode(d) => decode(d),
    }
}

fn load(model: &std::path::Path) -> anyhow::Result<skymoe_model::Tokenizer> {
    skymoe_model::Tokenizer::from_path(model)
        .with_context(|| format!("cannot load the tokenizer of {}", model.display()))
}

fn encode(a: EncodeArgs) -> anyhow::Result<()> {
    let tok = load(&a.model)?;
    let ids = if a.no_special {
        tok.encode_plain(&a.text)
    } else {
        tok.encode_with_special_tokens(&a.text)
    }
    .context("encoding failed")?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn parse_ids(s: &str, vocab: usize) -> anyhow::Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let id: u32 = t
                .parse()
                .map_err(|_| anyhow::anyhow!("invalid token id `{t}` in --ids"))?;
            anyhow::ensure!(
                (id as usize) < vocab,
                "token id {id} is outside the vocabulary of {vocab} tokens"
            );
            Ok(id)
        })
        .collect()
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let tok = load(&a.model)?;
    let ids = parse_ids(&a.ids, tok.vocab_size())?;
    let text = tok.decode(&ids).context("decoding failed")?;
    println!("{text}");
    Ok(())
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
