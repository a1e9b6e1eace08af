#!/usr/bin/env python3
"""Reference fixtures for scaled rotary position embeddings (`rope_scaling` / `rope_parameters`).

Every fixture reuses the weights of fixtures/reference/llama (LlamaForCausalLM, head_dim 16,
rope_theta 10000) and changes only the config: the rope type and its parameters, and a small
`max_position_embeddings` / `original_max_position_embeddings`, so that a 24-token sequence
lies beyond the original context and the scaling matters. For each type it writes

  fixtures/reference/rope/<name>/config.json
  fixtures/reference/rope/<name>/reference.safetensors   tokens [24] (int64), logits [24, vocab],
      loss (mean next-token cross-entropy) and grad.<name> for layer 0's q_proj and k_proj
      (the weights the rotary embedding sits behind)

and, for `dynamic`, also `logits_cached` [24, vocab]: a fresh model run with a KV cache,
prefilling the first 12 tokens and then decoding one token at a time (dynamic NTK recomputes
its base from the current length at every forward, so these differ from the one-pass logits).

The weights are not copied: the Rust tests load fixtures/reference/llama/model.safetensors
with each of these configs.

Logits come from transformers' LlamaForCausalLM (float32, CPU) loaded from the written
config.json, except `ntk`, a type transformers does not know: it is the fixed NTK-aware
scaling of Skywork-13B's remote modeling code (base' = base * factor^(d/(d-2))), computed here
with plain torch by replacing the default inverse frequencies of the rotary embedding.

Usage: python3 tools/reference/make_rope_fixtures.py [--out fixtures/reference/rope]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LLAMA = os.path.join(REPO, "fixtures", "reference", "llama")
SEQ = 24
PREFILL = 12
TOKEN_SEED = 4242

# name -> (changes to the llama config.json). Old (`rope_scaling` with `type`) and new
# (`rope_parameters` with `rope_type`) spellings are both exercised.
CASES: dict[str, dict] = {
    "linear": {
        "max_position_embeddings": 32,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    },
    "dynamic": {
        "max_position_embeddings": 8,
        "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    },
    "ntk": {
        "max_position_embeddings": 8,
        "rope_scaling": {"type": "ntk", "factor": 4.0},
    },
    "llama3": {
        # original 32: wavelengths 6.3 (high frequency, kept), 19.9 (smoothed), >= 62.8 (/ factor)
        "max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
    },
    "yarn": {
        "max_position_embeddings": 32,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 10000.0,
        },
    },
    "yarn_mscale": {
        # old spelling, mscale / mscale_all_dim, untruncated correction range, custom betas
        "max_position_embeddings": 64,
        "rope_theta": 20000.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 8.0,
            "beta_slow": 0.5,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    },
    "yarn_attention_factor": {
        "max_position_embeddings": 32,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "attention_factor": 1.25,
            "beta_fast": 4.0,
            "beta_slow": 1.0,
            "rope_theta": 10000.0,
        },
    },
}


def base_config() -> dict:
    with open(os.path.join(LLAMA, "config.json")) as f:
        cfg = json.load(f)
    for k in ("rope_parameters", "transformers_version", "dtype", "use_cache"):
        cfg.pop(k, None)
    cfg["rope_theta"] = 10000.0
    return cfg


def build(directory: str, weights: dict[str, torch.Tensor], ntk_factor: float | None) -> LlamaForCausalLM:
    if ntk_factor is not None:
        # transformers has no "ntk" type: build a default rope model, then replace its
        # frequencies by Skywork-13B's fixed NTK-aware ones.
        with open(os.path.join(directory, "config.json")) as f:
            raw = json.load(f)
        raw.pop("rope_scaling")
        config = LlamaConfig.from_dict(raw)
    else:
        config = LlamaConfig.from_pretrained(directory)
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
    model.tie_weights()
    if ntk_factor is not None:
        rot = model.model.rotary_emb
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"] * ntk_factor ** (dim / (dim - 2))
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        rot.inv_freq.copy_(inv)
        rot.original_inv_freq.copy_(inv)
    return model


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens[None], use_cache=False).logits[0].float()


GRAD_NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]


def loss_and_grads(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=tokens[None], use_cache=False).logits[0].float()
    loss = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])
    loss.backward()
    params = dict(model.named_parameters())
    grads = {f"grad.{n}": params[n].grad.detach().clone().contiguous() for n in GRAD_NAMES}
    return loss.detach(), grads


@torch.no_grad()
def cached_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    rows = [model(input_ids=tokens[None, :PREFILL], cache=cache, use_cache=True).logits[0]]
    for t in range(PREFILL, SEQ):
        rows.append(model(input_ids=tokens[None, t : t + 1], cache=cache, use_cache=True).logits[0])
    return torch.cat(rows, 0).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures", "reference", "rope"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    weights = load_file(os.path.join(LLAMA, "model.safetensors"))
    base = base_config()
    g = torch.Generator().manual_seed(TOKEN_SEED)
    tokens = torch.randint(2, base["vocab_size"], (SEQ,), generator=g, dtype=torch.int64)
    default_logits = full_logits(build(LLAMA, weights, None), tokens)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    for name, change in CASES.items():
        directory = os.path.join(args.out, name)
        os.makedirs(directory)
        cfg = dict(base)
        cfg.update(change)
        if "rope_parameters" in change:
            cfg.pop("rope_theta")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        scaling = change.get("rope_scaling") or change.get("rope_parameters")
        kind = scaling.get("rope_type") or scaling.get("type")
        ntk = scaling["factor"] if kind == "ntk" else None
        model = build(directory, weights, ntk)
        logits = full_logits(model, tokens)
        loss, grads = loss_and_grads(model, tokens)
        out = {"tokens": tokens, "logits": logits.contiguous(), "loss": loss, **grads}
        if kind == "dynamic":
            out["logits_cached"] = cached_logits(build(directory, weights, None), tokens).contiguous()
            gap = (out["logits_cached"] - logits).abs().max().item()
            assert gap > 1e-3, f"dynamic: cached decoding should differ from one pass ({gap})"
        diff = (logits - default_logits).abs().max().item()
        assert diff > 1e-3, f"{name}: the scaling changes nothing ({diff})"
        save_file(out, os.path.join(directory, "reference.safetensors"), metadata={"format": "pt"})
        print(f"{name:24s} max |logit| {logits.abs().max().item():.3f}  max |Δ vs default rope| {diff:.3f}")


if __name__ == "__main__":
    main()
