#!/usr/bin/env python3
"""Deterministic reference-fixture generator for skymoe.

Builds tiny random-weight checkpoints (Llama, Mixtral, Qwen2-MoE x2, Skywork-MoE x2), runs them
in PyTorch (transformers for the HF families, tools/reference/skywork_moe_ref.py for Skywork)
in float32, and writes under fixtures/reference/:

  tokenizer_cases.json, summary.json, README.md
  <family>/config.json, model.safetensors (or sharded + index), tokenizer.json,
           reference.safetensors (tokens, logits, loss, grad.<tensor name>), routing.json (MoE)
  gguf/llama-f32.gguf, llama-q8_0.gguf, llama-q4_0.gguf, llama-q4_1.gguf, mixtral-f16.gguf
       and <name>.reference.safetensors (tokens, logits) for each.

Usage: python3 tools/reference/make_fixtures.py [--out fixtures/reference]
See tools/reference/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import hashlib
import json
import random
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

import gguf
import safetensors
import tokenizers
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import skywork_moe_ref as sky  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# ----------------------------------------------------------------------------- sizes
VOCAB_TARGET = 320  # 2 special + 256 byte symbols + 62 merges
HIDDEN = 64
N_HEADS = 4  # head_dim 16
N_KV = 2
N_LAYERS = 3
MAX_POS = 256
LLAMA_FF = 96  # dense FFN (multiple of 32 so ffn_down rows quantise in Q4/Q8 blocks)
EXPERT_FF = 32  # Mixtral / Qwen2-MoE routed experts
QWEN_DENSE_FF = 96  # Qwen2-MoE dense (mlp_only) layer
QWEN_SHARED_FF = 48  # Qwen2-MoE shared expert
SKY_FF = 32  # Skywork: intermediate_size, used by experts and by dense layers alike
N_EXPERTS = 4
TOP_K = 2
ROPE_THETA = 10000.0
SKY_VARIANT_ROPE_THETA = 25000.0  # deliberately non-default: only reachable via rope_parameters

# ----------------------------------------------------------------------------- init / checks
WEIGHT_STD = 0.08
ROUTER_STD = 0.3
NORM_JITTER = 0.1
BIAS_STD = 0.1
MIN_MARGIN = 1e-3  # minimum gap between the k-th and (k+1)-th routing score
MAX_ATTEMPTS = 64

# fixed token ids (T = 12), several high ids near vocab-1 and the two specials
T = 12


def token_ids(vocab: int) -> list[int]:
    return [0, 45, vocab - 1, 17, 290 % vocab, 128, 256, 3, vocab - 2, 77, 1, vocab - 5]


# ============================================================================= utilities


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def setup_determinism() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    transformers.set_seed(0)


def is_router_param(name: str) -> bool:
    return bool(
        re.search(r"\.mlp\.gate\.weight$", name)
        or "shared_expert_gate" in name
        or re.search(r"block_sparse_moe\.gate\.", name)
    )


@torch.no_grad()
def init_params(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init independent of transformers' own init: N(0, 0.08) for matrices and the
    embedding, N(0, 0.3) for routers (incl. Qwen's shared_expert_gate), 1 + N(0, 0.1) for norm
    weights, N(0, 0.1) for biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1 and "norm" in name:
            v = 1.0 + NORM_JITTER * noise
        elif name.endswith(".bias"):
            v = BIAS_STD * noise
        elif is_router_param(name):
            v = ROUTER_STD * noise
        else:
            v = WEIGHT_STD * noise
        p.copy_(v.to(p.dtype))


def dump_json(obj: Any, path: str) -> None:
    """JSON with lists of scalars kept on one line (readable routing / tokenizer-case files)."""

    def enc(o: Any, ind: int) -> str:
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}  {json.dumps(k)}: {enc(v, ind + 2)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(x, (dict, list, tuple)) for x in o):
                return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in o) + "]"
            return "[\n" + ",\n".join(f"{pad}  {enc(x, ind + 2)}" for x in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)

    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")


def ce_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: predict tokens[1:] from positions [:-1]."""
    return F.cross_entropy(logits[:-1], tokens[1:])


def margin_stats(scores: torch.Tensor, k: int = TOP_K) -> dict[str, float]:
    """scores [N, E]: the values the top-k is taken over (probabilities, or logits for
    Mixtral-style gating). selection margin = s_(k) - s_(k+1) (what decides *which* experts);
    order margin = s_(1) - s_(2) (irrelevant to the output, logged for information)."""
    s = scores.double().sort(dim=-1, descending=True).values
    sel = (s[:, k - 1] - s[:, k]).min().item()
    order = (s[:, 0] - s[:, 1]).min().item()
    return {"min_selection_margin": sel, "min_order_margin": order}


def routing_summary(per_layer: dict[int, dict[str, torch.Tensor]], n_experts: int) -> tuple[bool, dict]:
    """per_layer[layer] = {"scores": [N,E], "experts": [N,k], "weights": [N,k]}."""
    out: dict[str, Any] = {"layers": {}}
    ok = True
    used_global: set[int] = set()
    gmin = float("inf")
    for layer, r in sorted(per_layer.items()):
        experts = r["experts"].tolist()
        pairs = {tuple(sorted(p)) for p in experts}
        used = {e for p in experts for e in p}
        used_global |= used
        ms = margin_stats(r["scores"])
        gmin = min(gmin, ms["min_selection_margin"])
        counts = [sum(e in p for p in experts) for e in range(n_experts)]
        layer_ok = ms["min_selection_margin"] >= MIN_MARGIN and len(pairs) >= 3 and len(used) >= 3
        ok = ok and layer_ok
        out["layers"][str(layer)] = {
            "experts": experts,
            "weights": [[round(float(x), 6) for x in row] for row in r["weights"].tolist()],
            "distinct_pairs": len(pairs),
            "tokens_per_expert": counts,
            **ms,
        }
    ok = ok and len(used_global) == n_experts
    out["experts_used"] = sorted(used_global)
    out["min_selection_margin"] = gmin
    return ok, out


# ============================================================================= tokenizer

_SUBJECTS = ["The cat", "A small robot", "My neighbour", "The old river", "Every engineer", "The model",
             "A quiet student", "The red train", "Our team", "The mountain wind", "Each expert", "The router"]
_VERBS = ["reads", "builds", "watches", "carries", "follows", "measures", "routes", "remembers",
          "writes", "counts", "trains", "serves"]
_OBJECTS = ["the long letter", "a bright lamp", "the morning news", "three green apples", "the last token",
            "a heavy box", "the open window", "its own shadow", "the weights", "a tiny checkpoint",
            "the sharded files", "every layer"]
_TAILS = ["before dinner", "with great care", "in the rain", "every single day", "without a sound",
          "near the station", "on a Monday", "for the first time", "at 10:45", "in 2024"]
_FIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 65536.",
    "Mixture-of-Experts models route each token to the top-2 experts.",
    "She said: \"It's fine, isn't it?\" and he replied 'yes'.",
    "def forward(self, x):\n    return self.w2(silu(self.w1(x)) * self.w3(x))",
    "Café, naïve, résumé, Zürich, 日本語, Ελληνικά, emoji 🦀 and ✓.",
    "Tabs\tand  double  spaces   and\n\nblank lines.",
]


def corpus_lines() -> list[str]:
    rng = random.Random(20240603)
    lines = list(_FIXED)
    for _ in range(160):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        if rng.random() < 0.25:
            s = s.lower()
        lines.append(s)
    return lines


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading, trailing   and multiple   spaces  ",
    "line one\nline two\n\n\ttabbed line",
    "café naïve 日本",
    " ",
    "",
    "tokens 12345 & symbols: !?$%^",
]


def tokenizer_merges(tok_json: dict) -> list[str]:
    merges = tok_json["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# ============================================================================= HF families


def hf_config(family: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
        experts_implementation="eager",  # the per-expert loop (default would be grouped_mm, f32/bf16 only)
    )
    if family == "llama":
        return LlamaConfig(intermediate_size=LLAMA_FF, rms_norm_eps=1e-5, tie_word_embeddings=True, **common)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=EXPERT_FF, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    if family in ("qwen2_moe", "qwen2_moe_norm"):
        norm = family == "qwen2_moe_norm"
        return Qwen2MoeConfig(
            intermediate_size=QWEN_DENSE_FF,
            moe_intermediate_size=EXPERT_FF,
            shared_expert_intermediate_size=QWEN_SHARED_FF,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=norm,
            decoder_sparse_step=1,
            mlp_only_layers=[1] if norm else [],
            qkv_bias=True,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            **common,
        )
    raise KeyError(family)


HF_CLASSES = {
    "llama": LlamaForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen2_moe_norm": Qwen2MoeForCausalLM,
}
HF_SEEDS = {"llama": 1000, "mixtral": 2000, "qwen2_moe": 3000, "qwen2_moe_norm": 4000}
SHARD_SIZE = {"mixtral": "200KB"}


def hf_to_canonical(family: str, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    """Maps one in-memory transformers-5 parameter (experts fused as gate_up_proj [E,2F,H] and
    down_proj [E,H,F]) to the canonical hub tensor names. Validated against what
    save_pretrained writes (bitwise) for the weights; the same mapping is used for the grads."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
    if m:
        i, kind = m.group(1), m.group(2)
        if family == "mixtral":
            prefix, (g, u, d) = f"model.layers.{i}.block_sparse_moe.experts", ("w1", "w3", "w2")
        else:
            prefix, (g, u, d) = f"model.layers.{i}.mlp.experts", ("gate_proj", "up_proj", "down_proj")
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                f = t.shape[1] // 2
                yield f"{prefix}.{e}.{g}.weight", t[e, :f]
                yield f"{prefix}.{e}.{u}.weight", t[e, f:]
            else:
                yield f"{prefix}.{e}.{d}.weight", t[e]
        return
    if family == "mixtral":
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", name)
        if m:
            yield f"model.layers.{m.group(1)}.block_sparse_moe.gate.weight", t
            return
    yield name, t


def canonical_state(family: str, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, t in named:
        for cn, ct in hf_to_canonical(family, n, t):
            assert cn not in out, cn
            out[cn] = ct.detach().to(torch.float32).contiguous().clone()
    return out


def read_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for fn in files:
        part = load_file(os.path.join(directory, fn))
        assert not (set(part) & set(out)), "tensor in two shards"
        out.update(part)
    return out


def hf_forward_with_routing(model, tokens: torch.Tensor):
    """Runs the HF model on one sequence; captures every *TopKRouter output."""
    captured: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for mname, mod in model.named_modules():
        if type(mod).__name__.endswith("TopKRouter"):
            layer = int(re.search(r"layers\.(\d+)\.", mname).group(1))

            def hook(_m, _inp, out, layer=layer):
                logits, w, idx = out
                captured[layer] = {
                    "scores": torch.softmax(logits.detach().double(), dim=-1),
                    "weights": w.detach(),
                    "experts": idx.detach(),
                }

            hooks.append(mod.register_forward_hook(hook))
    try:
        logits = model(input_ids=tokens[None], use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, captured


def is_moe_family(family: str) -> bool:
    return family != "llama"


def build_hf_family(family: str, vocab: int, tokens: torch.Tensor):
    cls = HF_CLASSES[family]
    for attempt in range(MAX_ATTEMPTS):
        seed = HF_SEEDS[family] + attempt
        torch.manual_seed(seed)
        model = cls(hf_config(family, vocab))
        init_params(model, seed)
        model.eval()
        with torch.no_grad():
            _, routing = hf_forward_with_routing(model, tokens)
        if not is_moe_family(family):
            return model, seed, None
        ok, summary = routing_summary(routing, N_EXPERTS)
        if ok:
            summary["seed"] = seed
            summary["attempts"] = attempt + 1
            return model, seed, summary
        log(f"  [{family}] seed {seed}: routing too fragile/uniform "
            f"(min margin {summary['min_selection_margin']:.2e}), reseeding")
    raise RuntimeError(f"{family}: no seed with acceptable routing")


def remove_extras(directory: str) -> None:
    for fn in ("generation_config.json",):
        p = os.path.join(directory, fn)
        if os.path.exists(p):
            os.remove(p)


def write_own_checkpoint(directory: str, state: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    """Fallback writer (canonical names, unfused); used only if save_pretrained's layout differs."""
    for fn in os.listdir(directory):
        if fn.endswith(".safetensors") or fn.endswith(".index.json"):
            os.remove(os.path.join(directory, fn))
    names = sorted(state)
    if not shard_bytes:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = state[n].numel() * 4
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    wm = {}
    for k, group in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in group}, os.path.join(directory, fn), metadata={"format": "pt"})
        wm.update({n: fn for n in group})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": wm}, f, indent=2)


def grads_f64_hf(model, family: str, tokens: torch.Tensor):
    m64 = copy.deepcopy(model).to(torch.float64)
    m64.zero_grad(set_to_none=True)
    logits64, routing64 = hf_forward_with_routing(m64, tokens)
    loss64 = ce_loss(logits64, tokens)
    loss64.backward()
    named = [(n, p.grad) for n, p in m64.named_parameters()]
    for n, g in named:
        assert g is not None, f"no grad for {n}"
    grads = canonical_state(family, named)
    return grads, loss64.item(), routing64, logits64.detach()


def save_reference(path: str, tokens, logits, loss, grads: dict[str, torch.Tensor] | None, meta: dict[str, str]):
    tensors = {
        "tokens": tokens.to(torch.int64).contiguous(),
        "logits": logits.detach().to(torch.float32).contiguous(),
    }
    if loss is not None:
        tensors["loss"] = torch.tensor(float(loss), dtype=torch.float32)
    if grads:
        for n, g in grads.items():
            tensors[f"grad.{n}"] = g.to(torch.float32).contiguous()
    # one metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make the file bytes differ between runs
    save_file(tensors, path, metadata={"reference_info": json.dumps({k: str(v) for k, v in meta.items()}, sort_keys=True)})


def same_routing(a: dict[int, dict], b: dict[int, dict]) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        ea = a[k]["experts"].sort(dim=-1).values
        eb = b[k]["experts"].sort(dim=-1).values
        if not torch.equal(ea, eb):
            return False
    return True


def run_hf_family(family: str, out_root: str, vocab: int, tok_json_path: str, tokens: torch.Tensor, summary: dict):
    log(f"== {family}")
    d = os.path.join(out_root, family)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model, seed, routing = build_hf_family(family, vocab, tokens)
    cfg = model.config

    # --- checkpoint: save_pretrained, then check the on-disk layout is canonical and bitwise equal
    shard = SHARD_SIZE.get(family)
    if shard:
        model.save_pretrained(d, max_shard_size=shard)
    else:
        model.save_pretrained(d)
    remove_extras(d)
    expected = canonical_state(family, model.named_parameters())
    on_disk = read_checkpoint(d)
    layout_ok = set(on_disk) == set(expected) and all(torch.equal(on_disk[n], expected[n]) for n in expected)
    wrote_own = False
    if not layout_ok:
        log(f"  save_pretrained layout differs from canonical: extra={sorted(set(on_disk) - set(expected))[:5]} "
            f"missing={sorted(set(expected) - set(on_disk))[:5]}; writing safetensors ourselves")
        write_own_checkpoint(d, expected, 200_000 if shard else None)
        wrote_own = True
        on_disk = read_checkpoint(d)
        assert set(on_disk) == set(expected)
    if shard:
        n_shards = len(set(json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"].values()))
        assert n_shards >= 2, "mixtral must be sharded"
    shutil.copy(tok_json_path, os.path.join(d, "tokenizer.json"))

    # --- f32 forward (reference logits / loss)
    with torch.no_grad():
        logits, routing32 = hf_forward_with_routing(model, tokens)
    loss32 = ce_loss(logits, tokens)

    # --- reload from disk with transformers: identical logits
    reloaded = HF_CLASSES[family].from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager")
    reloaded.eval()
    with torch.no_grad():
        logits_re, _ = hf_forward_with_routing(reloaded, tokens)
    reload_diff = (logits_re - logits).abs().max().item()
    assert reload_diff <= 1e-6, f"reload mismatch {reload_diff}"

    # --- grads in float64
    grads, loss64, routing64, logits64 = grads_f64_hf(model, family, tokens)
    assert set(grads) == set(expected), "grad names != checkpoint names"
    if is_moe_family(family):
        assert same_routing(routing32, routing64), "f32/f64 routing differs"
    f64_logit_diff = (logits64 - logits.double()).abs().max().item()

    meta = {
        "family": family,
        "seed": seed,
        "loss_definition": "mean cross-entropy of logits[:-1] vs tokens[1:], no aux loss",
        "grad_precision": "float64 forward/backward (HF RMSNorm and router softmax internally at float32), cast to float32",
        "loss_f64": repr(loss64),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, loss32.item(), grads, meta)
    if routing is not None:
        dump_json(routing, os.path.join(d, "routing.json"))
    files = sorted(os.listdir(d))
    nbytes = sum(os.path.getsize(os.path.join(d, fn)) for fn in files)
    s = {
        "seed": seed,
        "max_abs_logit": logits.abs().max().item(),
        "loss": loss32.item(),
        "loss_f64": loss64,
        "max_abs_logit_diff_f64_vs_f32": f64_logit_diff,
        "reload_max_abs_logit_diff": reload_diff,
        "checkpoint_tensors": len(expected),
        "parameters": int(sum(t.numel() for t in expected.values())),
        "save_pretrained_layout_canonical": layout_ok,
        "wrote_safetensors_ourselves": wrote_own,
        "files": files,
        "bytes": nbytes,
        "min_selection_margin": None if routing is None else routing["min_selection_margin"],
    }
    summary[family] = s
    log(f"  seed={seed} max|logit|={s['max_abs_logit']:.4f} loss={s['loss']:.6f} (f64 {loss64:.6f}) "
        f"tensors={s['checkpoint_tensors']} params={s['parameters']} bytes={nbytes} "
        f"reload_diff={reload_diff:.1e} canonical_layout={layout_ok}")
    if routing is not None:
        for layer, r in routing["layers"].items():
            log(f"  layer {layer}: min sel margin {r['min_selection_margin']:.4e}, order margin "
                f"{r['min_order_margin']:.4e}, distinct pairs {r['distinct_pairs']}, per-expert {r['tokens_per_expert']}")
    return model, expected


# ============================================================================= Skywork


def skywork_config_json(variant: str, vocab: int) -> dict[str, Any]:
    base = {
        "architectures": ["SkyworkForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_skywork_moe.SkyworkMoeConfig",
            "AutoModelForCausalLM": "modeling_skywork_moe.SkyworkForCausalLM",
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": None,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.01,
        "intermediate_size": SKY_FF,
        "max_position_embeddings": MAX_POS,
        "model_type": "skywork_moe",
        "num_attention_heads": N_HEADS,
        "num_hidden_layers": N_LAYERS,
        "num_experts": [N_EXPERTS],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if variant == "skywork_moe":
        # Like the released Skywork-MoE-Base: MHA, every layer MoE, logits norm with lambda 1,
        # 1-layer gate, no top-k input multiplication; rope_theta at top level (4.x style).
        base.update({
            "num_key_value_heads": N_HEADS,
            "moe_expert_interval": 1,
            "moe_use_mixtral_gating": False,
            "moe_2layer_gate": False,
            "moe_use_logits_norm": True,
            "moe_gate_norm_std": 1.0,
            "moe_feature_no_mul_topk": True,
            "rope_theta": ROPE_THETA,
            "torch_dtype": "float32",
        })
    elif variant == "skywork_moe_variant":
        # GQA, MoE only on layer 1 (interval 2), lambda 2, 2-layer tanh gate, expert input x*2;
        # rope only via rope_parameters (5.x style) with a non-default theta.
        base.update({
            "num_key_value_heads": N_KV,
            "moe_expert_interval": 2,
            "moe_use_mixtral_gating": False,
            "moe_2layer_gate": True,
            "moe_use_logits_norm": True,
            "moe_gate_norm_std": 2.0,
            "moe_feature_no_mul_topk": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": SKY_VARIANT_ROPE_THETA},
            "dtype": "float32",
        })
        base.pop("rope_scaling")
    else:
        raise KeyError(variant)
    return base


SKY_SEEDS = {"skywork_moe": 5000, "skywork_moe_variant": 6000}


def sky_routing(model: sky.SkyworkForCausalLM) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for i, blk in model.moe_blocks():
        r = blk.last_routing
        out[i] = {"scores": r["scores"], "weights": r["weights"], "experts": r["experts"]}
    return out


def build_skywork(variant: str, vocab: int, tokens: torch.Tensor):
    cfg_json = skywork_config_json(variant, vocab)
    cfg = sky.SkyworkMoeConfig.from_dict(cfg_json)
    for attempt in range(MAX_ATTEMPTS):
        seed = SKY_SEEDS[variant] + attempt
        torch.manual_seed(seed)
        model = sky.SkyworkForCausalLM(cfg)
        init_params(model, seed)
        model.eval()
        with torch.no_grad():
            model(tokens)
        ok, summary = routing_summary(sky_routing(model), cfg.num_experts)
        if ok:
            summary["seed"] = seed
            summary["attempts"] = attempt + 1
            return cfg_json, model, seed, summary
        log(f"  [{variant}] seed {seed}: routing too fragile/uniform "
            f"(min margin {summary['min_selection_margin']:.2e}), reseeding")
    raise RuntimeError(f"{variant}: no seed with acceptable routing")


@torch.no_grad()
def manual_moe_layer(blk: sky.SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Independent per-token re-statement of the Skywork MoE formula (SPEC.md form, with the
    explicit mean subtraction) used to cross-check skywork_moe_ref.SparseMoeBlock."""
    cfg = blk.cfg
    out = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        if cfg.moe_2layer_gate:
            z = blk.gate.wg[2].weight.double() @ torch.tanh(blk.gate.wg[0].weight.double() @ xt)
        else:
            z = blk.gate.weight.double() @ xt
        if cfg.moe_use_logits_norm:
            mu = z.mean()
            sd = torch.sqrt(((z - mu) ** 2).sum() / (z.numel() - 1))
            z = cfg.moe_gate_norm_std * (z - mu) / sd
        g = torch.exp(z - z.max())
        g = g / g.sum()
        order = sorted(range(len(g)), key=lambda e: -float(g[e]))[:TOP_K]
        wsum = sum(float(g[e]) for e in order)
        xin = xt * (1.0 if (cfg.moe_use_mixtral_gating or cfg.moe_feature_no_mul_topk) else float(TOP_K))
        y = torch.zeros_like(xt)
        for e in order:
            ex = blk.experts[e]
            h = F.silu(ex.w1.weight.double() @ xin) * (ex.w3.weight.double() @ xin)
            y = y + (float(g[e]) / wsum) * (ex.w2.weight.double() @ h)
        out.append(y)
    return torch.stack(out)


def skywork_selftests(vocab: int, tokens: torch.Tensor) -> dict[str, float]:
    """(1) With logits-norm off, no top-k multiplication, 1-layer gate and interval 1 the
    Skywork module must equal HF MixtralForCausalLM on the same (canonically named) weights.
    (2) z/(std/lambda) gives the same softmax as lambda*(z-mean)/std.
    (3) The module's MoE block equals an explicit per-token loop (done per variant later)."""
    res = {}
    mcfg = hf_config("mixtral", vocab)
    mcfg.intermediate_size = SKY_FF
    torch.manual_seed(77)
    mix = MixtralForCausalLM(mcfg)
    init_params(mix, 77)
    mix.eval()
    with torch.no_grad():
        ref = mix(input_ids=tokens[None], use_cache=False).logits[0]
    sj = skywork_config_json("skywork_moe", vocab)
    sj.update({"num_key_value_heads": N_KV, "moe_use_logits_norm": False, "rms_norm_eps": mcfg.rms_norm_eps})
    sm = sky.SkyworkForCausalLM(sky.SkyworkMoeConfig.from_dict(sj))
    state = canonical_state("mixtral", mix.named_parameters())
    sm.load_state_dict(state, strict=True)
    sm.eval()
    with torch.no_grad():
        got = sm(tokens)
    res["skywork_vs_hf_mixtral_max_abs_diff"] = (got - ref).abs().max().item()
    assert res["skywork_vs_hf_mixtral_max_abs_diff"] < 1e-5, res

    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, N_EXPERTS, generator=g, dtype=torch.float64) * 3
    for lam in (1.0, 2.0):
        a = torch.softmax(z / (z.std(dim=-1, keepdim=True) / lam), dim=-1)
        b = torch.softmax(lam * (z - z.mean(dim=-1, keepdim=True)) / z.std(dim=-1, keepdim=True), dim=-1)
        res[f"lognorm_forms_max_diff_lambda{lam:g}"] = (a - b).abs().max().item()
        assert (a - b).abs().max().item() < 1e-12
    return res


def run_skywork(variant: str, out_root: str, vocab: int, tok_json_path: str, tokens: torch.Tensor, summary: dict):
    log(f"== {variant}")
    d = os.path.join(out_root, variant)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg_json, model, seed, routing = build_skywork(variant, vocab, tokens)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=True)
        f.write("\n")
    state = model.checkpoint_state()
    save_file({n: t.contiguous() for n, t in state.items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(tok_json_path, os.path.join(d, "tokenizer.json"))

    with torch.no_grad():
        logits = model(tokens)
    routing32 = sky_routing(model)
    loss32 = ce_loss(logits, tokens)

    # independent MoE-formula check on the hidden states entering each MoE block
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, (i[0].detach(), o.detach())))
             for idx, blk in model.moe_blocks()]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    manual_diff = 0.0
    for idx, blk in model.moe_blocks():
        x, y = captured[idx]
        manual_diff = max(manual_diff, (manual_moe_layer(blk, x) - y.double()).abs().max().item())
    assert manual_diff < 1e-5, manual_diff

    # reload from disk
    re_model = sky.load_checkpoint(d)
    re_model.eval()
    with torch.no_grad():
        reload_diff = (re_model(tokens) - logits).abs().max().item()
    assert reload_diff == 0.0, reload_diff

    # grads in float64 (the Skywork module runs norms / router / softmax in f64 too)
    m64 = copy.deepcopy(model).to(torch.float64)
    logits64 = m64(tokens)
    loss64 = ce_loss(logits64, tokens)
    loss64.backward()
    assert same_routing(routing32, sky_routing(m64)), "f32/f64 routing differs"
    # an expert that no token selected gets no autograd grad: its gradient is exactly zero
    grads = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).to(torch.float32)
             for n, p in m64.named_parameters()}
    assert set(grads) == set(state)

    meta = {
        "family": variant,
        "seed": seed,
        "loss_definition": "mean cross-entropy of logits[:-1] vs tokens[1:], no aux loss",
        "grad_precision": "float64 forward/backward throughout, cast to float32",
        "loss_f64": repr(loss64.item()),
        "torch": torch.__version__,
        "implementation": "tools/reference/skywork_moe_ref.py",
    }
    save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, loss32.item(), grads, meta)
    dump_json(routing, os.path.join(d, "routing.json"))
    files = sorted(os.listdir(d))
    nbytes = sum(os.path.getsize(os.path.join(d, fn)) for fn in files)
    s = {
        "seed": seed,
        "max_abs_logit": logits.abs().max().item(),
        "loss": loss32.item(),
        "loss_f64": loss64.item(),
        "max_abs_logit_diff_f64_vs_f32": (logits64.detach() - logits.double()).abs().max().item(),
        "manual_moe_formula_max_abs_diff": manual_diff,
        "reload_max_abs_logit_diff": reload_diff,
        "checkpoint_tensors": len(state),
        "parameters": int(sum(t.numel() for t in state.values())),
        "moe_layers": [i for i, _ in model.moe_blocks()],
        "files": files,
        "bytes": nbytes,
        "min_selection_margin": routing["min_selection_margin"],
    }
    summary[variant] = s
    log(f"  seed={seed} max|logit|={s['max_abs_logit']:.4f} loss={s['loss']:.6f} (f64 {s['loss_f64']:.6f}) "
        f"tensors={s['checkpoint_tensors']} params={s['parameters']} bytes={nbytes} moe_layers={s['moe_layers']} "
        f"manual_diff={manual_diff:.1e}")
    for layer, r in routing["layers"].items():
        log(f"  layer {layer}: min sel margin {r['min_selection_margin']:.4e}, order margin "
            f"{r['min_order_margin']:.4e}, distinct pairs {r['distinct_pairs']}, per-expert {r['tokens_per_expert']}")
    return model


# ============================================================================= GGUF


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors_from_canonical(state: dict[str, torch.Tensor], n_head: int, n_kv: int, n_layers: int,
                                n_experts: int | None) -> list[tuple[str, np.ndarray]]:
    """canonical HF tensors -> [(gguf name, numpy array in HF orientation, q/k permuted)]."""
    s = {k: v.numpy().astype(np.float32) for k, v in state.items()}
    out = [("token_embd.weight", s["model.embed_tokens.weight"]),
           ("output_norm.weight", s["model.norm.weight"])]
    if "lm_head.weight" in s:
        out.append(("output.weight", s["lm_head.weight"]))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", s[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", permute_qk(s[p + "self_attn.q_proj.weight"], n_head, n_head)),
            (b + "attn_k.weight", permute_qk(s[p + "self_attn.k_proj.weight"], n_head, n_kv)),
            (b + "attn_v.weight", s[p + "self_attn.v_proj.weight"]),
            (b + "attn_output.weight", s[p + "self_attn.o_proj.weight"]),
            (b + "ffn_norm.weight", s[p + "post_attention_layernorm.weight"]),
        ]
        if n_experts:
            ep = p + "block_sparse_moe."
            out.append((b + "ffn_gate_inp.weight", s[ep + "gate.weight"]))
            for src, dst in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                out.append((b + dst + ".weight",
                            np.stack([s[f"{ep}experts.{e}.{src}.weight"] for e in range(n_experts)])))
        else:
            out += [
                (b + "ffn_gate.weight", s[p + "mlp.gate_proj.weight"]),
                (b + "ffn_up.weight", s[p + "mlp.up_proj.weight"]),
                (b + "ffn_down.weight", s[p + "mlp.down_proj.weight"]),
            ]
    return out


def canonical_from_gguf(tensors: dict[str, np.ndarray], n_head: int, n_kv: int, n_layers: int,
                        n_experts: int | None) -> dict[str, torch.Tensor]:
    """Inverse of gguf_tensors_from_canonical (un-permutes q/k, unstacks experts)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    s = {"model.embed_tokens.weight": t(tensors["token_embd.weight"]),
         "model.norm.weight": t(tensors["output_norm.weight"])}
    if "output.weight" in tensors:
        s["lm_head.weight"] = t(tensors["output.weight"])
    for i in range(n_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        s[p + "input_layernorm.weight"] = t(tensors[b + "attn_norm.weight"])
        s[p + "self_attn.q_proj.weight"] = t(unpermute_qk(tensors[b + "attn_q.weight"], n_head, n_head))
        s[p + "self_attn.k_proj.weight"] = t(unpermute_qk(tensors[b + "attn_k.weight"], n_head, n_kv))
        s[p + "self_attn.v_proj.weight"] = t(tensors[b + "attn_v.weight"])
        s[p + "self_attn.o_proj.weight"] = t(tensors[b + "attn_output.weight"])
        s[p + "post_attention_layernorm.weight"] = t(tensors[b + "ffn_norm.weight"])
        if n_experts:
            ep = p + "block_sparse_moe."
            s[ep + "gate.weight"] = t(tensors[b + "ffn_gate_inp.weight"])
            for src, dst in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                for e in range(n_experts):
                    s[f"{ep}experts.{e}.{src}.weight"] = t(tensors[b + dst + ".weight"][e])
        else:
            s[p + "mlp.gate_proj.weight"] = t(tensors[b + "ffn_gate.weight"])
            s[p + "mlp.up_proj.weight"] = t(tensors[b + "ffn_up.weight"])
            s[p + "mlp.down_proj.weight"] = t(tensors[b + "ffn_down.weight"])
    return s


def storage_type(name: str, arr: np.ndarray, matmul_type: QT) -> QT:
    # As llama.cpp's converter/quantizer: 1-D tensors (norms) and the MoE router stay F32.
    if arr.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return QT.F32
    return matmul_type


FILE_TYPE = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
             QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
             QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


def write_gguf(path: str, name: str, hf_cfg, tensors: list[tuple[str, np.ndarray]], matmul_type: QT,
               tok_meta: dict[str, Any]) -> dict[str, tuple[QT, np.ndarray]]:
    """Writes one llama-arch GGUF; returns {gguf name: (stored type, dequantised f32 array)}."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_rope_freq_base(float(hf_cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(hf_cfg.rms_norm_eps))
    w.add_rope_dimension_count(hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_file_type(int(FILE_TYPE[matmul_type]))
    n_exp = getattr(hf_cfg, "num_local_experts", None)
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(hf_cfg.num_experts_per_tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok_meta["pre"])
    w.add_token_list(tok_meta["tokens"])
    w.add_token_types(tok_meta["token_types"])
    w.add_token_merges(tok_meta["merges"])
    w.add_bos_token_id(tok_meta["bos"])
    w.add_eos_token_id(tok_meta["eos"])
    stored: dict[str, tuple[QT, np.ndarray]] = {}
    for tname, arr in tensors:
        qt = storage_type(tname, arr, matmul_type)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qt == QT.F32:
            w.add_tensor(tname, arr)
            deq = arr.copy()
        elif qt == QT.F16:
            a16 = arr.astype(np.float16)
            w.add_tensor(tname, a16)
            deq = a16.astype(np.float32)
        else:
            q = gguf.quants.quantize(arr, qt)
            w.add_tensor(tname, q, raw_dtype=qt)
            deq = gguf.quants.dequantize(q, qt).reshape(arr.shape).astype(np.float32)
        stored[tname] = (qt, deq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def field_value(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


def verify_gguf(path: str, hf_cfg, stored: dict[str, tuple[QT, np.ndarray]], tok_meta) -> list[dict[str, Any]]:
    r = gguf.GGUFReader(path)
    expect_kv = {
        "general.architecture": "llama",
        "llama.context_length": hf_cfg.max_position_embeddings,
        "llama.embedding_length": hf_cfg.hidden_size,
        "llama.block_count": hf_cfg.num_hidden_layers,
        "llama.feed_forward_length": hf_cfg.intermediate_size,
        "llama.attention.head_count": hf_cfg.num_attention_heads,
        "llama.attention.head_count_kv": hf_cfg.num_key_value_heads,
        "llama.rope.dimension_count": hf_cfg.hidden_size // hf_cfg.num_attention_heads,
        "llama.vocab_size": hf_cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": tok_meta["pre"],
        "tokenizer.ggml.bos_token_id": tok_meta["bos"],
        "tokenizer.ggml.eos_token_id": tok_meta["eos"],
    }
    if getattr(hf_cfg, "num_local_experts", None):
        expect_kv["llama.expert_count"] = hf_cfg.num_local_experts
        expect_kv["llama.expert_used_count"] = hf_cfg.num_experts_per_tok
    for k, v in expect_kv.items():
        got = field_value(r, k)
        assert got == v, (path, k, got, v)
    assert abs(field_value(r, "llama.rope.freq_base") - hf_cfg.rope_parameters["rope_theta"]) < 1e-3
    assert abs(field_value(r, "llama.attention.layer_norm_rms_epsilon") - hf_cfg.rms_norm_eps) < 1e-12
    assert field_value(r, "tokenizer.ggml.tokens") == tok_meta["tokens"]
    assert field_value(r, "tokenizer.ggml.merges") == tok_meta["merges"]
    assert field_value(r, "tokenizer.ggml.token_type") == tok_meta["token_types"]
    rows = []
    seen = set()
    for t in r.tensors:
        qt, deq = stored[t.name]
        seen.add(t.name)
        assert t.tensor_type == qt, (t.name, t.tensor_type, qt)
        ne = [int(x) for x in t.shape]  # ggml ne order (ne0 = fastest = last numpy dim)
        assert ne == list(reversed(deq.shape)), (t.name, ne, deq.shape)
        got = gguf.quants.dequantize(np.asarray(t.data), qt).reshape(deq.shape)
        assert np.array_equal(got.astype(np.float32), deq), t.name
        rows.append({"name": t.name, "type": qt.name, "ne": ne, "numpy_shape": list(deq.shape),
                     "reader_data_shape": list(np.asarray(t.data).shape), "nbytes": int(t.n_bytes)})
    assert seen == set(stored), set(stored) ^ seen
    return rows


def np_gguf_forward(t: dict[str, np.ndarray], hf_cfg, tokens: list[int]) -> np.ndarray:
    """Independent float64 numpy forward over the GGUF tensors *as stored* (q/k permuted), using
    llama.cpp's llama-arch RoPE convention (rotate adjacent pairs (2i, 2i+1)). Validates that the
    permutation + interleaved RoPE equals HF's rotate-half on the unpermuted weights."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    nh, nkv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    hd = hf_cfg.hidden_size // nh
    eps = float(hf_cfg.rms_norm_eps)
    base = float(hf_cfg.rope_parameters["rope_theta"])
    n_exp = getattr(hf_cfg, "num_local_experts", None)
    k_used = getattr(hf_cfg, "num_experts_per_tok", None)
    T_ = len(tokens)
    pos = np.arange(T_, dtype=np.float64)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # x [T, heads, hd]; pairs (2i, 2i+1), theta_i = base^(-2i/hd)
        inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = pos[:, None] * inv[None, :]
        c, s_ = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s_
        out[..., 1::2] = x0 * s_ + x1 * c
        return out

    def silu(x):
        return x / (1.0 + np.exp(-x))

    h = t["token_embd.weight"][tokens]
    mask = np.triu(np.full((T_, T_), -np.inf), 1)
    for i in range(hf_cfg.num_hidden_layers):
        b = f"blk.{i}."
        x = rms(h, t[b + "attn_norm.weight"])
        q = rope((x @ t[b + "attn_q.weight"].T).reshape(T_, nh, hd))
        k = rope((x @ t[b + "attn_k.weight"].T).reshape(T_, nkv, hd))
        v = (x @ t[b + "attn_v.weight"].T).reshape(T_, nkv, hd)
        o = np.empty((T_, nh, hd))
        for j in range(nh):
            kv = j // (nh // nkv)
            sc = q[:, j] @ k[:, kv].T / np.sqrt(hd) + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            o[:, j] = sc @ v[:, kv]
        h = h + o.reshape(T_, nh * hd) @ t[b + "attn_output.weight"].T
        x = rms(h, t[b + "ffn_norm.weight"])
        if n_exp:
            z = x @ t[b + "ffn_gate_inp.weight"].T
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for r in range(T_):
                sel = np.argsort(-p[r], kind="stable")[:k_used]
                w = p[r, sel] / p[r, sel].sum()
                for e, we in zip(sel, w):
                    g = t[b + "ffn_gate_exps.weight"][e] @ x[r]
                    u = t[b + "ffn_up_exps.weight"][e] @ x[r]
                    y[r] += we * (t[b + "ffn_down_exps.weight"][e] @ (silu(g) * u))
        else:
            y = (silu(x @ t[b + "ffn_gate.weight"].T) * (x @ t[b + "ffn_up.weight"].T)) @ t[b + "ffn_down.weight"].T
        h = h + y
    h = rms(h, t["output_norm.weight"])
    out_w = t["output.weight"] if "output.weight" in t else t["token_embd.weight"]
    return h @ out_w.T


def hf_model_from_state(family: str, hf_cfg, state: dict[str, torch.Tensor]):
    """Loads canonical tensors through transformers' own from_pretrained (via a temp dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        m = HF_CLASSES[family].from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                                   experts_implementation="eager")
    m.eval()
    return m


def run_gguf(out_root: str, tok_meta: dict, tokens: torch.Tensor, hf_models: dict, canon: dict, summary: dict):
    d = os.path.join(out_root, "gguf")
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    jobs = [("llama-f32", "llama", QT.F32), ("llama-q8_0", "llama", QT.Q8_0), ("llama-q4_0", "llama", QT.Q4_0),
            ("llama-q4_1", "llama", QT.Q4_1), ("mixtral-f16", "mixtral", QT.F16)]
    gsum: dict[str, Any] = {}
    for fname, family, qt in jobs:
        log(f"== gguf/{fname}.gguf")
        hf_cfg = hf_models[family].config
        n_exp = getattr(hf_cfg, "num_local_experts", None)
        tensors = gguf_tensors_from_canonical(canon[family], hf_cfg.num_attention_heads,
                                              hf_cfg.num_key_value_heads, hf_cfg.num_hidden_layers, n_exp)
        # sanity: the q/k permutation round-trips
        for tn, arr in tensors:
            if tn.endswith(("attn_q.weight", "attn_k.weight")):
                kv = hf_cfg.num_attention_heads if tn.endswith("attn_q.weight") else hf_cfg.num_key_value_heads
                assert np.array_equal(permute_qk(unpermute_qk(arr, hf_cfg.num_attention_heads, kv),
                                                 hf_cfg.num_attention_heads, kv), arr)
        path = os.path.join(d, f"{fname}.gguf")
        stored = write_gguf(path, f"skymoe-tiny-{family}", hf_cfg, tensors, qt, tok_meta)
        rows = verify_gguf(path, hf_cfg, stored, tok_meta)
        deq = {n: a for n, (_, a) in stored.items()}
        state = canonical_from_gguf(deq, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads,
                                    hf_cfg.num_hidden_layers, n_exp)
        assert set(state) == set(canon[family]), set(state) ^ set(canon[family])
        model = hf_model_from_state(family, hf_cfg, state)
        with torch.no_grad():
            logits, routing = hf_forward_with_routing(model, tokens)
        ref_logits = None
        with torch.no_grad():
            ref_logits, ref_routing = hf_forward_with_routing(hf_models[family], tokens)
        diff_vs_f32 = (logits - ref_logits).abs().max().item()
        np_logits = np_gguf_forward(deq, hf_cfg, tokens.tolist())
        np_diff = float(np.abs(np_logits - logits.double().numpy()).max())
        assert np_diff < 1e-4, (fname, np_diff)
        if qt == QT.F32:
            assert diff_vs_f32 == 0.0, diff_vs_f32
        entry: dict[str, Any] = {
            "file_bytes": os.path.getsize(path),
            "max_abs_logit": logits.abs().max().item(),
            "max_abs_logit_diff_vs_f32_checkpoint": diff_vs_f32,
            "numpy_llamacpp_rope_forward_max_abs_diff": np_diff,
            "tensors": rows,
        }
        if n_exp:
            ok, rsum = routing_summary(routing, n_exp)
            entry["min_selection_margin"] = rsum["min_selection_margin"]
            entry["routing_same_as_f32_checkpoint"] = same_routing(routing, ref_routing)
            assert rsum["min_selection_margin"] >= MIN_MARGIN, rsum["min_selection_margin"]
        save_reference(os.path.join(d, f"{fname}.reference.safetensors"), tokens, logits, None, None, {
            "source": f"{family} family weights as stored in {fname}.gguf (dequantised with gguf.quants, "
                      "q/k un-permuted), run with transformers in float32",
            "gguf_matmul_type": qt.name,
            "family": family,
        })
        gsum[fname] = entry
        log(f"  {len(rows)} tensors, {entry['file_bytes']} bytes, max|logit|={entry['max_abs_logit']:.4f}, "
            f"max|dlogit| vs f32 checkpoint={diff_vs_f32:.3e}, numpy interleaved-rope forward diff={np_diff:.1e}"
            + (f", min sel margin {entry['min_selection_margin']:.3e}, routing same as f32: "
               f"{entry['routing_same_as_f32_checkpoint']}" if n_exp else ""))
    summary["gguf"] = gsum


# ============================================================================= main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures", "reference"))
    args = ap.parse_args()
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    setup_determinism()

    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, tokenizers {tokenizers.__version__}, numpy {np.__version__}, "
        f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else _pkg_version('gguf')}")

    # --- tokenizer
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    tok_path = os.path.join(out_root, "tokenizer.json")
    tok.save(tok_path)
    tok_json = json.load(open(tok_path, encoding="utf-8"))
    cases = []
    for text in TOKENIZER_CASES:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc.ids) == text, text
        cases.append({"text": text, "ids": enc.ids, "tokens": enc.tokens})
    dump_json(cases, os.path.join(out_root, "tokenizer_cases.json"))
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tok_meta = {
        "pre": "gpt-2",
        "tokens": [id_to_tok[i] for i in range(vocab)],
        "token_types": [3 if id_to_tok[i] in special else 1 for i in range(vocab)],
        "merges": tokenizer_merges(tok_json),
        "bos": tok.token_to_id("<s>"),
        "eos": tok.token_to_id("</s>"),
    }
    log(f"tokenizer: vocab {vocab}, merges {len(tok_meta['merges'])}, specials {sorted(special)}")

    tokens = torch.tensor(token_ids(vocab), dtype=torch.int64)
    assert tokens.numel() == T and int(tokens.max()) < vocab
    summary: dict[str, Any] = {
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__, "gguf": _pkg_version("gguf")},
        "tokens": tokens.tolist(),
        "vocab_size": vocab,
    }

    # --- skywork self-tests, then every family
    summary["skywork_selftests"] = skywork_selftests(vocab, tokens)
    log(f"skywork self-tests: {summary['skywork_selftests']}")
    hf_models, canon = {}, {}
    for fam in ("llama", "mixtral", "qwen2_moe", "qwen2_moe_norm"):
        hf_models[fam], canon[fam] = run_hf_family(fam, out_root, vocab, tok_path, tokens, summary)
    for variant in ("skywork_moe", "skywork_moe_variant"):
        run_skywork(variant, out_root, vocab, tok_path, tokens, summary)
    run_gguf(out_root, tok_meta, tokens, hf_models, canon, summary)
    os.remove(tok_path)  # the shared tokenizer is copied into every family directory

    # --- manifest
    files = []
    for root, _, fns in os.walk(out_root):
        for fn in fns:
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, out_root)
            if rel in ("summary.json", "README.md"):
                continue
            files.append({"path": rel, "bytes": os.path.getsize(p), "sha256": sha256(p)})
    files.sort(key=lambda x: x["path"])
    summary["files"] = files
    summary["total_bytes"] = sum(f["bytes"] for f in files)
    dump_json(summary, os.path.join(out_root, "summary.json"))
    log("")
    log(f"wrote {len(files)} files, {summary['total_bytes']} bytes under {out_root}")
    for fi in files:
        log(f"  {fi['bytes']:>9}  {fi['path']}")


def _pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
