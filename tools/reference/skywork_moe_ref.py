"""Self-contained PyTorch reference for Skywork-MoE (``SkyworkForCausalLM``, model_type ``skywork_moe``).

Skywork-MoE is not in transformers; its Hugging Face checkpoint ships remote code
(``modeling_skywork_moe.py`` in Skywork/Skywork-MoE-Base) that could not be downloaded here.
This module re-implements its semantics from the public sources that could be read; see
tools/reference/README.md ("Skywork-MoE semantics") for the citation of every rule.

Summary of what this module computes (parameter names == checkpoint tensor names):

* Llama/Mixtral-style decoder: ``model.embed_tokens``, per layer ``input_layernorm`` (RMSNorm,
  computed in f32), ``self_attn.{q,k,v,o}_proj`` (no bias, rotate-half RoPE, GQA allowed),
  ``post_attention_layernorm``, FFN, residuals; ``model.norm``; ``lm_head`` (tied iff
  ``tie_word_embeddings``).
* FFN of layer ``i`` (0-based) is MoE iff ``moe_expert_interval == 1`` or
  ``(i + 1) % moe_expert_interval == 0``; MoE layers live under ``block_sparse_moe``
  (``gate`` + ``experts.E.{w1,w2,w3}``), dense layers under ``mlp.{gate,up,down}_proj``.
  Both use ``intermediate_size``.
* Router (always f32 or wider): ``z = gate(x)``; one bias-free Linear ``gate.weight [E,H]``, or
  with ``moe_2layer_gate`` Linear(H, 8E) -> tanh -> Linear(8E, E), bias-free, named
  ``gate.wg.0.weight [8E,H]`` and ``gate.wg.2.weight [E,8E]``.
* ``moe_use_logits_norm``: ``z <- z / (std(z) / moe_gate_norm_std)`` with the unbiased
  (N-1) std over the experts of a token (equal after softmax to ``lambda*(z-mean)/std``).
* default gating: ``softmax(z)`` -> top-2 of the probabilities -> divide by their sum.
  ``moe_use_mixtral_gating``: top-2 of the (normalised) logits -> softmax over those two.
* Unless ``moe_use_mixtral_gating or moe_feature_no_mul_topk``, the tokens fed to the experts
  are ``x * 2`` (MOE_TOP_K); the router always sees the unscaled ``x``.
* ``y = sum_j g_j * w2(silu(w1 x_in) * w3 x_in)`` (dropless).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

MOE_TOP_K = 2  # hard-coded in the Skywork code family (MoE++: MOE_TOP_K = 2, vLLM: TOPK = 2)


@dataclass
class SkyworkMoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    moe_expert_interval: int = 1
    moe_use_mixtral_gating: bool = False
    moe_2layer_gate: bool = True
    moe_use_logits_norm: bool = False
    moe_gate_norm_std: float = 1.0
    moe_feature_no_mul_topk: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return is_moe_layer(layer_idx, self.moe_expert_interval)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkyworkMoeConfig":
        # rope_theta: top-level key (transformers 4.x style, as the real checkpoint has it) or
        # rope_parameters.rope_theta (transformers 5.x style).
        theta = d.get("rope_theta")
        if theta is None:
            theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        ne = d["num_experts"]
        n_exp = int(ne[0] if isinstance(ne, (list, tuple)) else ne)
        n_heads = int(d["num_attention_heads"])
        # Class defaults of the Skywork config (SkyworkMoeConfig / MoE++ MoeConfig): note
        # moe_2layer_gate defaults to True there; the real checkpoint sets it to false.
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_experts=n_exp,
            moe_expert_interval=int(d.get("moe_expert_interval", 1)),
            moe_use_mixtral_gating=bool(d.get("moe_use_mixtral_gating", False)),
            moe_2layer_gate=bool(d.get("moe_2layer_gate", True)),
            moe_use_logits_norm=bool(d.get("moe_use_logits_norm", False)),
            moe_gate_norm_std=float(d.get("moe_gate_norm_std", 1.0)),
            moe_feature_no_mul_topk=bool(d.get("moe_feature_no_mul_topk", False)),
            raw=dict(d),
        )


def is_moe_layer(layer_idx: int, interval: int) -> bool:
    """Rule of the Skywork/MoE++ DecoderLayer: interval 1 -> every layer; otherwise the layers
    with (layer_idx + 1) % interval == 0 (0-based idx), i.e. the interval-th, 2*interval-th, ..."""
    if interval == 1:
        return True
    return (layer_idx + 1) % interval == 0


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32) if dtype != torch.float64 else x
        var = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(var + self.eps)
        return self.weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(head_dim: int, theta: float, positions: torch.Tensor, dtype: torch.dtype):
    # Same arithmetic as HF's default RoPE: inv_freq in f32, angles in f32 (f64 when the
    # model runs in f64), emb = cat(freqs, freqs).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = positions.to(work)[:, None] * inv_freq.to(work)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, H] (single sequence)
        cfg = self.cfg
        T = x.shape[0]
        hd = cfg.head_dim
        q = self.q_proj(x).view(T, cfg.num_attention_heads, hd).transpose(0, 1)
        k = self.k_proj(x).view(T, cfg.num_key_value_heads, hd).transpose(0, 1)
        v = self.v_proj(x).view(T, cfg.num_key_value_heads, hd).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(hd)
        mask = torch.full((T, T), float("-inf"), dtype=scores.dtype).triu(1)
        scores = scores + mask
        work = torch.float64 if scores.dtype == torch.float64 else torch.float32
        probs = F.softmax(scores, dim=-1, dtype=work).to(q.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(T, cfg.num_attention_heads * hd)
        return self.o_proj(out)


class DenseMLP(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router. 1-layer: parameter ``weight`` [E, H]. 2-layer: ``wg`` = Sequential(Linear(H,8E),
    Tanh, Linear(8E,E)), all bias-free. Runs in f32 (or f64 when the input is f64)."""

    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        E, H = cfg.num_experts, cfg.hidden_size
        self.two_layer = cfg.moe_2layer_gate
        if self.two_layer:
            self.wg = nn.Sequential(nn.Linear(H, 8 * E, bias=False), nn.Tanh(), nn.Linear(8 * E, E, bias=False))
        else:
            self.weight = nn.Parameter(torch.empty(E, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(work)
        if self.two_layer:
            h = F.linear(xf, self.wg[0].weight.to(work))
            h = torch.tanh(h)
            return F.linear(h, self.wg[2].weight.to(work))
        return F.linear(xf, self.weight.to(work))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList([Expert(cfg) for _ in range(cfg.num_experts)])
        self.last_routing: dict[str, torch.Tensor] | None = None

    def route(self, x: torch.Tensor):
        """Returns (scores used for the top-k choice [N,E], top-k weights [N,k], top-k ids [N,k])."""
        cfg = self.cfg
        logits = self.gate(x)  # [N, E], f32/f64
        if cfg.moe_use_logits_norm:
            std = logits.std(dim=-1, keepdim=True)  # unbiased (N-1), torch default
            logits = logits / (std / cfg.moe_gate_norm_std)
        if cfg.moe_use_mixtral_gating:
            top_vals, top_idx = torch.topk(logits, MOE_TOP_K, dim=-1)
            weights = F.softmax(top_vals, dim=-1)
            scores = logits
        else:
            probs = F.softmax(logits, dim=-1)
            weights, top_idx = torch.topk(probs, MOE_TOP_K, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            scores = probs
        return logits, scores, weights, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        logits, scores, weights, top_idx = self.route(x)
        self.last_routing = {
            "logits": logits.detach(),
            "scores": scores.detach(),
            "weights": weights.detach(),
            "experts": top_idx.detach(),
        }
        x_in = x
        if not (cfg.moe_use_mixtral_gating or cfg.moe_feature_no_mul_topk):
            x_in = x * MOE_TOP_K  # expert input scaled by top_k; router saw unscaled x
        out = torch.zeros_like(x)
        for e in range(cfg.num_experts):
            tok, pos = torch.nonzero(top_idx == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            y = self.experts[e](x_in[tok]) * weights[tok, pos, None].to(x.dtype)
            out = out.index_add(0, tok, y)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(cfg)
        else:
            self.mlp = DenseMLP(cfg)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        n = self.post_attention_layernorm(h)
        ffn = self.block_sparse_moe(n) if self.is_moe else self.mlp(n)
        return h + ffn


class SkyworkInner(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SkyworkForCausalLM(nn.Module):
    def __init__(self, cfg: SkyworkMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.model = SkyworkInner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [T] -> logits [T, V] (one sequence, positions 0..T-1)."""
        dtype = self.model.embed_tokens.weight.dtype
        T = tokens.shape[0]
        cos, sin = rope_cos_sin(self.cfg.head_dim, self.cfg.rope_theta, torch.arange(T), dtype)
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))

    def moe_blocks(self):
        return [(i, l.block_sparse_moe) for i, l in enumerate(self.model.layers) if l.is_moe]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (names == parameter names; tied lm_head omitted)."""
        return {n: p.detach() for n, p in self.named_parameters()}


def load_checkpoint(directory: str, dtype=torch.float32) -> SkyworkForCausalLM:
    """Loads config.json + model.safetensors (or the sharded index) written by make_fixtures."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        cfg = SkyworkMoeConfig.from_dict(json.load(f))
    model = SkyworkForCausalLM(cfg)
    index = os.path.join(directory, "model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for fn in files:
        state.update(load_file(os.path.join(directory, fn)))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    return model.to(dtype)
