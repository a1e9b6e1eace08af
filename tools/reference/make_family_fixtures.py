#!/usr/bin/env python3
"""Reference fixtures of the Qwen3-MoE and OLMoE families, made with transformers >= 5.

Writes, next to make_fixtures.py's families (run that one first: it replaces
fixtures/reference/ and with it these files):

  fixtures/reference/qwen3_moe/   Qwen3MoeForCausalLM: per-head q/k RMSNorm, head_dim 32
                                  (hidden 64 / 4 heads would give 16), 8 experts top-2,
                                  norm_topk_prob, layer 1 dense (mlp_only_layers)
  fixtures/reference/olmoe/       OlmoeForCausalLM: q/k RMSNorm over the whole projections,
                                  clip_qkv small enough to clip, 8 experts top-2, no
                                  renormalisation
  fixtures/reference/gguf/qwen3moe-f16.gguf, olmoe-f32.gguf  (+ .reference.safetensors)

Each family directory holds config.json as transformers writes it, model.safetensors from
save_pretrained (hub names: experts unfused), tokenizer.json (the llama fixture's),
reference.safetensors (tokens, logits, loss, grad.<name> of every tensor from a float64
backward) and routing.json. The GGUF files use llama.cpp's layout for the two
architectures (q/k not permuted: NEOX rotary; stacked experts; attn_q_norm/attn_k_norm);
their logits come from transformers run on the weights as stored (f16 rounded).

    python3 tools/reference/make_family_fixtures.py [--out fixtures/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import gguf
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

N_EXPERTS = 8
TOP_K = 2
EXPERT_FF = 16
QWEN3_DENSE_FF = 96
QWEN3_HEAD_DIM = 32
OLMOE_CLIP = 1.1
SEEDS = {"qwen3_moe": 7000, "olmoe": 8000}
CLASSES = {"qwen3_moe": Qwen3MoeForCausalLM, "olmoe": OlmoeForCausalLM}
GGUF_ARCH = {"qwen3_moe": ("qwen3moe", QT.F16), "olmoe": ("olmoe", QT.F32)}


def family_config(family: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=mf.HIDDEN,
        num_hidden_layers=mf.N_LAYERS,
        num_attention_heads=mf.N_HEADS,
        num_key_value_heads=mf.N_KV,
        max_position_embeddings=mf.MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": mf.ROPE_THETA},
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
        experts_implementation="eager",
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=QWEN3_DENSE_FF,
            moe_intermediate_size=EXPERT_FF,
            head_dim=QWEN3_HEAD_DIM,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            attention_bias=False,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            **common,
        )
    if family == "olmoe":
        return OlmoeConfig(
            intermediate_size=EXPERT_FF,
            norm_topk_prob=False,
            clip_qkv=OLMOE_CLIP,
            # OlmoeConfig defaults pad_token_id to 1, which makes the embedding's row 1 get no
            # gradient in PyTorch (padding_idx); skymoe trains every row.
            pad_token_id=None,
            attention_bias=False,
            rms_norm_eps=1e-5,
            **common,
        )
    raise KeyError(family)


def clipped_fraction(model, tokens: torch.Tensor) -> float:
    """The fraction of OLMoE's q, k, v values (after the norms) that clip_qkv clamps."""
    seen: list[torch.Tensor] = []
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("self_attn"):
            def pre(m, args, kwargs):
                x = kwargs.get("hidden_states", args[0] if args else None)
                with torch.no_grad():
                    seen.append(m.q_norm(m.q_proj(x)).flatten())
                    seen.append(m.k_norm(m.k_proj(x)).flatten())
                    seen.append(m.v_proj(x).flatten())
            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=tokens[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    allv = torch.cat(seen)
    return float((allv.abs() > OLMOE_CLIP).double().mean())


def gguf_tensors(family: str, cfg, state: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """Canonical (hub) tensors in llama.cpp's names for qwen3moe / olmoe: no q/k permutation,
    experts stacked, layers without a router dense."""
    s = {k: v.numpy().astype(np.float32) for k, v in state.items()}
    out = [("token_embd.weight", s["model.embed_tokens.weight"]),
           ("output_norm.weight", s["model.norm.weight"]),
           ("output.weight", s["lm_head.weight"])]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [
            (b + "attn_norm.weight", s[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", s[p + "self_attn.q_proj.weight"]),
            (b + "attn_k.weight", s[p + "self_attn.k_proj.weight"]),
            (b + "attn_v.weight", s[p + "self_attn.v_proj.weight"]),
            (b + "attn_output.weight", s[p + "self_attn.o_proj.weight"]),
            (b + "attn_q_norm.weight", s[p + "self_attn.q_norm.weight"]),
            (b + "attn_k_norm.weight", s[p + "self_attn.k_norm.weight"]),
            (b + "ffn_norm.weight", s[p + "post_attention_layernorm.weight"]),
        ]
        if p + "mlp.gate.weight" in s:
            out.append((b + "ffn_gate_inp.weight", s[p + "mlp.gate.weight"]))
            for src, dst in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                             ("down_proj", "ffn_down_exps")):
                out.append((b + dst + ".weight",
                            np.stack([s[f"{p}mlp.experts.{e}.{src}.weight"] for e in range(N_EXPERTS)])))
        else:
            for src, dst in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out.append((b + dst + ".weight", s[f"{p}mlp.{src}.weight"]))
    return out


def write_family_gguf(path: str, family: str, cfg, tensors, matmul_type: QT, tok_meta) -> dict[str, np.ndarray]:
    """One GGUF file as llama.cpp's converter writes the architecture; returns the tensors as
    stored (dequantised to f32), under llama.cpp's names."""
    arch, _ = GGUF_ARCH[family]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(family)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(mf.FILE_TYPE[matmul_type]))
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if family == "qwen3_moe":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    else:
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_clamp_kqv(float(cfg.clip_qkv))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok_meta["pre"])
    w.add_token_list(tok_meta["tokens"])
    w.add_token_types(tok_meta["token_types"])
    w.add_token_merges(tok_meta["merges"])
    w.add_bos_token_id(tok_meta["bos"])
    w.add_eos_token_id(tok_meta["eos"])
    stored: dict[str, np.ndarray] = {}
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if mf.storage_type(name, arr, matmul_type) == QT.F16:
            a16 = arr.astype(np.float16)
            w.add_tensor(name, a16)
            stored[name] = a16.astype(np.float32)
        else:
            w.add_tensor(name, arr)
            stored[name] = arr.copy()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Read back: every tensor as stored, names and shapes in ggml order.
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == arch
    for t in r.tensors:
        got = np.asarray(t.data).astype(np.float32).reshape(stored[t.name].shape)
        assert np.array_equal(got, stored[t.name]), t.name
    assert {t.name for t in r.tensors} == set(stored)
    return stored


def canonical_from_stored(cfg, stored: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of gguf_tensors (hub names)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    s = {"model.embed_tokens.weight": t(stored["token_embd.weight"]),
         "model.norm.weight": t(stored["output_norm.weight"]),
         "lm_head.weight": t(stored["output.weight"])}
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
             "ffn_gate_inp": "mlp.gate", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for g, h in names.items():
            if b + g + ".weight" in stored:
                s[p + h + ".weight"] = t(stored[b + g + ".weight"])
        for src, dst in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            if b + dst + ".weight" in stored:
                for e in range(N_EXPERTS):
                    s[f"{p}mlp.experts.{e}.{src}.weight"] = t(stored[b + dst + ".weight"][e])
    return s


def run_family(family: str, out_root: str, vocab: int, tok_path: str, tokens: torch.Tensor,
               tok_meta: dict[str, Any], summary: dict[str, Any]) -> None:
    # make_fixtures' per-family pipeline (seeded init with N(0, 0.3) routers, reseeding until
    # routing margins are safe, save_pretrained checked against the hub names, f64 grads),
    # pointed at these families.
    mf.HF_CLASSES[family] = CLASSES[family]
    mf.HF_SEEDS[family] = SEEDS[family]
    mf.N_EXPERTS = N_EXPERTS
    base_config = mf.hf_config

    def hf_config(fam: str, v: int):
        return family_config(fam, v) if fam in CLASSES else base_config(fam, v)

    mf.hf_config = hf_config
    part: dict[str, Any] = {}
    model, state = mf.run_hf_family(family, out_root, vocab, tok_path, tokens, part)
    summary[family] = part[family]
    cfg = model.config
    if family == "olmoe":
        frac = clipped_fraction(model, tokens)
        assert 0.005 < frac < 0.5, f"clip_qkv clips {frac:.3%} of q/k/v"
        summary[family]["clipped_fraction"] = frac
        mf.log(f"  clip_qkv {OLMOE_CLIP} clamps {frac:.2%} of q/k/v values")
    # The on-disk config must be what the Rust side reads back.
    on_disk = json.load(open(os.path.join(out_root, family, "config.json")))
    assert on_disk["model_type"] == family, on_disk["model_type"]

    # GGUF in llama.cpp's layout, logits from transformers on the weights as stored.
    arch, qt = GGUF_ARCH[family]
    gdir = os.path.join(out_root, "gguf")
    os.makedirs(gdir, exist_ok=True)
    stem = f"{arch}-{qt.name.lower()}"
    stored = write_family_gguf(os.path.join(gdir, stem + ".gguf"), family, cfg,
                               gguf_tensors(family, cfg, state), qt, tok_meta)
    deq = canonical_from_stored(cfg, stored)
    assert set(deq) == set(state), set(deq) ^ set(state)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(out_root, family, "config.json"), tmp)
        from safetensors.torch import save_file
        save_file(deq, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        m2 = CLASSES[family].from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager")
        m2.eval()
        with torch.no_grad():
            logits, _ = mf.hf_forward_with_routing(m2, tokens)
    ref_path = os.path.join(gdir, stem + ".reference.safetensors")
    mf.save_reference(ref_path, tokens, logits, None, None,
                      {"family": family, "gguf": stem, "weights": "as stored in the GGUF file"})
    os.chmod(ref_path, 0o644)
    summary[family]["gguf"] = {"file": stem + ".gguf", "bytes": os.path.getsize(os.path.join(gdir, stem + ".gguf"))}
    mf.log(f"  wrote gguf/{stem}.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(mf.REPO, "fixtures", "reference"))
    args = ap.parse_args()
    out_root = os.path.abspath(args.out)
    mf.setup_determinism()
    tok_path = os.path.join(out_root, "llama", "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    vocab = tok.get_vocab_size()
    tok_json = json.load(open(tok_path, encoding="utf-8"))
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tok_meta = {
        "pre": "gpt-2",
        "tokens": [id_to_tok[i] for i in range(vocab)],
        "token_types": [3 if id_to_tok[i] in special else 1 for i in range(vocab)],
        "merges": mf.tokenizer_merges(tok_json),
        "bos": tok.token_to_id("<s>"),
        "eos": tok.token_to_id("</s>"),
    }
    tokens = torch.tensor(mf.token_ids(vocab), dtype=torch.int64)
    summary: dict[str, Any] = {}
    for family in ("qwen3_moe", "olmoe"):
        run_family(family, out_root, vocab, tok_path, tokens, tok_meta, summary)
    mf.dump_json(summary, os.path.join(out_root, "family_summary.json"))


if __name__ == "__main__":
    main()
