#!/usr/bin/env python3
"""SentencePiece tokenizer fixtures: small models trained with the sentencepiece library on the
bundled Shakespeare plays, their vocabulary-only GGUF files, and reference encodings.

For every model `<name>` it writes `fixtures/reference/sentencepiece/<name>/`:

* `tokenizer.model`: the SentencePiece ModelProto;
* `tokenizer_config.json`: a Llama/Skywork-style config (`add_bos_token: true`,
  `add_eos_token: false`, `legacy: true`, `tokenizer_class: "LlamaTokenizer"`);
* `vocab.gguf` (byte-fallback models only): the vocabulary as llama.cpp's converter writes it (`tokenizer.ggml.model =
  "llama"`, tokens, scores, token types, `add_space_prefix`, special ids and flags) plus the
  minimal `llama.*` hyper-parameters llama.cpp needs to open a vocabulary-only file;
* `cases.json`: for each text, the sentencepiece ids (`spm_ids`, no BOS), the sentencepiece
  decoding of those ids (`spm_decoded`), llama.cpp's ids for the GGUF file without and with BOS
  (`gguf_ids`, `gguf_ids_bos`) and llama.cpp's decoding (`gguf_decoded`); the `gguf_*` keys
  only where there is a GGUF file.

Deterministic: training runs on one thread from an in-memory sentence list, so the model files
carry no file names. Run from the repository root:

    python3 tools/reference/make_tokenizer_fixtures.py [--out DIR]

llama.cpp's reference needs llama-cpp-python (see requirements.txt); without it the GGUF ids
are not produced and the script stops with an error.
"""

import argparse
import ctypes
import io
import json
import os
import sys

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import gguf

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Lines with characters outside the plays, so that the models learn a few of them and fall back
# to bytes (or <unk>) for the rest.
UNICODE_LINES = [
    "Café, naïve, façade, résumé, coöperate, jalapeño.",
    "Ünïcödé wörds: Straße, Größe, Fußball, Äpfel, Öl.",
    "日本語のテキストです。東京は大きい都市です。",
    "Привет, мир! Как дела?",
    "Γειά σου κόσμε. Καλημέρα.",
    "Numbers: 0123456789, 3.14159, 2.71828, 1,000,000.",
    "Full width: ＡＢＣ１２３ and ligatures: ﬁne ﬂow.",
    "Emoji: 🤖 🎉 🚀 are rare.",
]

CASES = [
    "",
    " ",
    "   ",
    "Hello world",
    "To be, or not to be, that is the question:",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "runs   of    spaces     inside",
    "tabs\tand\ttabs",
    "new\nlines\n\nand blank lines\n",
    "\n",
    "mixed \t \n whitespace",
    "digits 1234567890 and 3.14159 and 2026",
    "Café naïve façade",
    "日本語のテキスト",
    "Привет, мир",
    "Emoji 🤖🎉🚀 and ☃ snowman",
    "Unseen: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ༀ",
    "Full width ＡＢＣ１２３ and ﬁne ligatures",
    "ideographic\u3000space and nbsp\u00a0here",
    "carriage\r\nreturn",
    "a<sep>b and <mask> here",
    "before <sep> after",
    "KING LEAR. Blow, winds, and crack your cheeks! rage! blow!",
    "O Romeo, Romeo! wherefore art thou Romeo?",
    "x",
    "▁ already escaped ▁▁",
    "End.",
]

# name -> trainer options.
MODELS = {
    # Like Llama / Skywork: BPE, byte fallback, identity normalisation, whitespace kept.
    "bpe": dict(
        model_type="bpe",
        vocab_size=512,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        user_defined_symbols=["<sep>", "<mask>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    ),
    # SentencePiece's defaults for Unigram: nmt_nfkc, whitespace runs collapsed, byte fallback.
    "unigram": dict(
        model_type="unigram",
        vocab_size=800,
        byte_fallback=True,
        character_coverage=0.9995,
        user_defined_symbols=["<sep>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    ),
    # Unigram without byte fallback (unknown characters become <unk>), identity normalisation
    # but SentencePiece's whitespace clean-up.
    "unigram_unk": dict(
        model_type="unigram",
        vocab_size=400,
        byte_fallback=False,
        normalization_rule_name="identity",
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    ),
}


def corpus():
    d = os.path.join(ROOT, "data", "shakespeare")
    lines = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(d, name), encoding="utf-8") as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    # The unicode lines are repeated so that their common characters pass character_coverage.
    return lines + UNICODE_LINES * 20


def train(name, opts, sentences):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
        **opts,
    )
    return buf.getvalue()


def tokenizer_config(proto):
    piece = lambda i: proto.pieces[i].piece
    added = {}
    for i, p in enumerate(proto.pieces):
        if p.type in (sp_pb2.ModelProto.SentencePiece.CONTROL, sp_pb2.ModelProto.SentencePiece.UNKNOWN,
                      sp_pb2.ModelProto.SentencePiece.USER_DEFINED):
            added[str(i)] = {
                "content": p.piece,
                "lstrip": False,
                "normalized": p.type == sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
                "rstrip": False,
                "single_word": False,
                "special": p.type != sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
            }
    ts = proto.trainer_spec
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": piece(ts.bos_id),
        "clean_up_tokenization_spaces": False,
        "eos_token": piece(ts.eos_id),
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": piece(ts.unk_id),
        "use_default_system_prompt": False,
    }


def write_gguf(path, proto, cfg):
    """The vocabulary as convert_hf_to_gguf.py's `_set_vocab_sentencepiece` writes it."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("sentencepiece vocabulary fixture")
    # llama.cpp reads these hyper-parameters even for a vocabulary-only load.
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(proto.pieces))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    ts = proto.trainer_spec
    w.add_bos_token_id(ts.bos_id)
    w.add_eos_token_id(ts.eos_id)
    w.add_unk_token_id(ts.unk_id)
    w.add_add_bos_token(cfg["add_bos_token"])
    w.add_add_eos_token(cfg["add_eos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_reference(gguf_path, texts):
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is needed for the GGUF reference: pip install -r tools/reference/requirements.txt")
    llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for text in texts:
        plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        with_bos = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        arr = (llama_cpp.llama_token * max(1, len(plain)))(*plain)
        cap = 64 + 8 * len(text.encode("utf-8"))
        buf = (ctypes.c_char * cap)()
        n = llama_cpp.llama_detokenize(vocab, arr, len(plain), buf, cap, False, False)
        decoded = bytes(buf[:n]).decode("utf-8", errors="replace")
        out.append((list(plain), list(with_bos), decoded))
    del llm
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "reference", "sentencepiece"))
    args = ap.parse_args()
    sentences = corpus()
    for name, opts in MODELS.items():
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        model = train(name, opts, sentences)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(model)
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(model)
        assert len(proto.pieces) == opts["vocab_size"], (name, len(proto.pieces))
        cfg = tokenizer_config(proto)
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
        gguf_path = os.path.join(d, "vocab.gguf")
        # llama.cpp aborts on a character outside a vocabulary without byte pieces, so only
        # byte-fallback vocabularies get a GGUF file.
        with_gguf = opts["byte_fallback"]
        if with_gguf:
            write_gguf(gguf_path, proto, cfg)
            llama = llama_cpp_reference(gguf_path, CASES)
        elif os.path.exists(gguf_path):
            os.remove(gguf_path)
        sp = spm.SentencePieceProcessor(model_proto=model)
        cases = []
        for i, text in enumerate(CASES):
            ids = sp.encode(text)
            case = {"text": text, "spm_ids": ids, "spm_decoded": sp.decode(ids)}
            if with_gguf:
                g_plain, g_bos, g_dec = llama[i]
                case.update(gguf_ids=g_plain, gguf_ids_bos=g_bos, gguf_decoded=g_dec)
            cases.append(case)
        with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
            json.dump(cases, f, indent=1, ensure_ascii=False)
            f.write("\n")
        diff = sum(c["spm_ids"] != c.get("gguf_ids", c["spm_ids"]) for c in cases)
        print(f"{name}: {len(proto.pieces)} pieces, {len(model)} bytes, {len(cases)} cases, "
              f"llama.cpp differs from sentencepiece on {diff}")


if __name__ == "__main__":
    main()
