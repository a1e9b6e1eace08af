#!/usr/bin/env python3
"""GGUF files quantised by llama.cpp, for the "served as stored" tests
(`crates/skymoe-serve/tests/gguf_stored.rs`).

Writes `fixtures/reference/gguf_quant/`:

* `llama-q4_k_m.gguf`: `fixtures/reference/gguf/llama-f32.gguf` (64-wide rows, not divisible by
  256) quantised to Q4_K_M by llama.cpp, which falls back to Q5_0/Q5_1/Q8_0 for such rows;
* `mixtral-q4_k_m.gguf`: `fixtures/reference/gguf/mixtral-f16.gguf` (stacked `ffn_*_exps`
  experts) quantised the same way;
* `wide-q4_k_m.gguf`, `wide-q5_k_m.gguf`: a tiny random llama with 256-wide rows (written here
  with the gguf writer, F32) quantised to Q4_K_M (Q4_K and Q6_K) and Q5_K_M (Q5_K and Q6_K);
* `llama_cpp_logits.safetensors`: llama.cpp's own logits for every quantised fixture (those
  above and `fixtures/reference/gguf/llama-q{8_0,4_0,4_1}.gguf`) on `LOGIT_TOKENS` tokens
  (`<stem>.tokens`), computed as one prompt (`<stem>.prefill`) and one token at a time
  (`<stem>.decode`), with llama.cpp's default f16 KV cache, and both again with an f32 KV
  cache and no flash attention (`<stem>.prefill_f32kv`, `<stem>.decode_f32kv`), where
  llama.cpp's attention is plain f32 arithmetic.

Needs `gguf` 0.19.0 and `llama-cpp-python` 0.3.36 (its `llama_model_quantize`); the tests need
neither: the generated files are committed. Run from the repository root:

    python3 tools/reference/make_gguf_quant_fixtures.py [--out DIR] [--logits-only]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import tempfile

import numpy as np
import gguf
import llama_cpp
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SRC = os.path.join(ROOT, "fixtures", "reference", "gguf")

#: Tokens of each logits fixture: ids (i * 37 + 5) mod vocab, as the Rust tests build them.
LOGIT_TOKENS = 16

#: Quantised files outside `--out` whose llama.cpp logits are recorded too.
OTHER_QUANTISED = ["llama-q8_0.gguf", "llama-q4_0.gguf", "llama-q4_1.gguf"]


def quantize(src: str, dst: str, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}) failed: {rc}")


def copy_tokenizer(w: gguf.GGUFWriter, path: str) -> int:
    """The tokenizer of an existing fixture; returns its vocabulary size."""
    r = gguf.GGUFReader(path)
    f = r.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    return len(tokens)


def write_wide_llama(path: str) -> None:
    """One layer, hidden 256 (4 heads of 64, one KV head), FFN 256, tied embeddings, F32."""
    rng = np.random.default_rng(20240611)
    hidden, heads, kv_heads, ffn, layers = 256, 4, 1, 256, 1
    head_dim = hidden // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("skymoe-tiny-wide-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)
    vocab = copy_tokenizer(w, os.path.join(SRC, "llama-f32.gguf"))
    w.add_vocab_size(vocab)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, hidden) * 4)
    w.add_tensor("output_norm.weight", norm(hidden))
    for l in range(layers):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", norm(hidden))
        w.add_tensor(p + "attn_q.weight", mat(heads * head_dim, hidden))
        w.add_tensor(p + "attn_k.weight", mat(kv_heads * head_dim, hidden))
        w.add_tensor(p + "attn_v.weight", mat(kv_heads * head_dim, hidden))
        w.add_tensor(p + "attn_output.weight", mat(hidden, heads * head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(hidden))
        w.add_tensor(p + "ffn_gate.weight", mat(ffn, hidden))
        w.add_tensor(p + "ffn_up.weight", mat(ffn, hidden))
        w.add_tensor(p + "ffn_down.weight", mat(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(path: str) -> dict[str, np.ndarray]:
    """llama.cpp's logits for `LOGIT_TOKENS` tokens: as one prompt and one token at a time,
    with the default f16 KV cache and with an f32 one."""
    stem = os.path.basename(path).removesuffix(".gguf")
    out: dict[str, np.ndarray] = {}
    for suffix, cache in (("", {}), ("_f32kv", {"type_k": 0, "type_v": 0, "flash_attn": False})):
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                              seed=0, verbose=False, **cache)
        vocab = llm.n_vocab()
        tokens = [(i * 37 + 5) % vocab for i in range(LOGIT_TOKENS)]
        llm.eval(tokens)
        out[f"{stem}.prefill{suffix}"] = np.array(llm.scores[:LOGIT_TOKENS], dtype=np.float32)
        llm.reset()
        for t in tokens:
            llm.eval([t])
        out[f"{stem}.decode{suffix}"] = np.array(llm.scores[:LOGIT_TOKENS], dtype=np.float32)
        out[f"{stem}.tokens"] = np.array(tokens, dtype=np.int64)
    return out


def write_logits(out: str) -> None:
    paths = [os.path.join(out, n) for n in sorted(os.listdir(out)) if n.endswith(".gguf")]
    paths += [os.path.join(SRC, n) for n in OTHER_QUANTISED]
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        tensors.update(llama_cpp_logits(path))
    meta = {"llama_cpp_python": llama_cpp.__version__, "tokens": str(LOGIT_TOKENS)}
    save_file(tensors, os.path.join(out, "llama_cpp_logits.safetensors"), metadata=meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "reference", "gguf_quant"))
    ap.add_argument("--logits-only", action="store_true",
                    help="only (re)write llama_cpp_logits.safetensors for the files in --out")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    if args.logits_only:
        write_logits(out)
        return
    q4km, q5km = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    quantize(os.path.join(SRC, "llama-f32.gguf"), os.path.join(out, "llama-q4_k_m.gguf"), q4km)
    quantize(os.path.join(SRC, "mixtral-f16.gguf"), os.path.join(out, "mixtral-q4_k_m.gguf"), q4km)
    with tempfile.TemporaryDirectory() as tmp:
        wide = os.path.join(tmp, "wide-f32.gguf")
        write_wide_llama(wide)
        quantize(wide, os.path.join(out, "wide-q4_k_m.gguf"), q4km)
        quantize(wide, os.path.join(out, "wide-q5_k_m.gguf"), q5km)
    summary = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".gguf"):
            continue
        path = os.path.join(out, name)
        r = gguf.GGUFReader(path)
        types: dict[str, int] = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        summary[name] = {"bytes": os.path.getsize(path), "tensor_types": types, "sha256": digest}
        print(name, os.path.getsize(path), types)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    write_logits(out)


if __name__ == "__main__":
    main()
