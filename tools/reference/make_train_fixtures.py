#!/usr/bin/env python3
"""Training-step reference fixtures for skymoe.

Starting from two existing fixture checkpoints (fixtures/reference/skywork_moe and
fixtures/reference/mixtral), this script runs a few optimiser steps of skymoe's training step in
PyTorch float64 and writes everything a Rust test needs to replay them:

  fixtures/reference/skywork_moe/train_adaptive.safetensors
  fixtures/reference/mixtral/train_switch_accum.safetensors
  fixtures/reference/mixtral/train_bias_sequence.safetensors
  fixtures/reference/skywork_moe/train_global_bias.safetensors

One step = per micro-batch: batched forward with training-time routing (top-k on the softmax
probabilities, renormalised combine weights, capacity dropping by probability priority),
loss = CE + sum_l alpha_l * A_l + z_coef * sum_l Z_l, backward of loss / micro_batches
(accumulated); then global-norm clipping (torch.nn.utils.clip_grad_norm_ semantics), the
learning-rate schedule, torch.optim.AdamW (decoupled weight decay on matrices only) and the
adaptive update of the per-layer alpha. The exact rules are in tools/reference/README.md
("Training-step fixtures").

Usage: python3 tools/reference/make_train_fixtures.py [--out fixtures/reference] [--case NAME ...]
It only writes the train_*.safetensors files (it never rewrites other fixtures). Two runs give
byte-identical files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import json
import math
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import safetensors
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import skywork_moe_ref as sky  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DTYPE = torch.float64
TOP_K = 2  # both fixtures (Skywork hard-codes 2; the Mixtral fixture has num_experts_per_tok 2)

# Robustness of the discrete decisions against f32 evaluation in Rust (weights drift by ~1e-7
# relative per step between an f32 and an f64 run): every top-k selection gap p_(k) - p_(k+1)
# and every capacity cut gap (last kept vs first dropped priority of an overflowing expert), at
# every step, must be at least this large. Batch seeds are tried in order until they pass.
MIN_DECISION_MARGIN = 1e-4
MAX_SEED_ATTEMPTS = 64

# ----------------------------------------------------------------------------- cases

CASES: dict[str, dict[str, Any]] = {
    "skywork_adaptive": {
        "family": "skywork_moe",
        "file": "train_adaptive.safetensors",
        "batch_seed": 9100,
        "require_drops": True,
        "require_clipping": True,
        "hp": {
            "steps": 3, "micro_batches": 1, "batch_size": 4, "seq_len": 12,
            "capacity_factor": 1.0,
            "balance": "skywork", "adaptive": True,
            "alpha_init": 0.005, "xi": 0.2, "alpha_max": 0.01, "beta": 0.9,
            "coef": 0.005,  # unused when adaptive; set equal to alpha_init
            "z_loss_coef": 0.001,
            "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1, "total_steps": 3, "decay": "cosine",
            "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
            "grad_clip": 0.5,
        },
    },
    "mixtral_switch_accum": {
        "family": "mixtral",
        "file": "train_switch_accum.safetensors",
        "batch_seed": 9200,
        "require_drops": False,
        "require_clipping": False,
        "hp": {
            "steps": 3, "micro_batches": 2, "batch_size": 2, "seq_len": 10,
            "capacity_factor": 0.0,
            "balance": "switch", "adaptive": False,
            "alpha_init": 0.01,  # = coef (fixed alpha); xi/alpha_max/beta are unused (skymoe defaults)
            "xi": 0.2, "alpha_max": 0.01, "beta": 0.99,
            "coef": 0.01,
            "z_loss_coef": 0.0,
            "lr": 5e-3, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 3, "decay": "linear",
            "weight_decay": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "grad_clip": 0.0,
        },
    },
    # Aux-loss-free selection bias (DeepSeek-V3) with the sequence-wise balance loss, capacity
    # dropping, z-loss and two micro-batches.
    "mixtral_bias_sequence": {
        "family": "mixtral",
        "file": "train_bias_sequence.safetensors",
        "batch_seed": 9300,
        "require_drops": True,
        "require_clipping": False,
        "require_bias_effect": True,
        "hp": {
            "steps": 3, "micro_batches": 2, "batch_size": 2, "seq_len": 10,
            "capacity_factor": 1.0,
            "balance": "sequence", "adaptive": False,
            "alpha_init": 0.01, "xi": 0.2, "alpha_max": 0.01, "beta": 0.99,
            "coef": 0.01,
            "z_loss_coef": 0.001,
            "bias_update_rate": 0.02,
            "lr": 5e-3, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 3, "decay": "linear",
            "weight_decay": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "grad_clip": 0.0,
        },
    },
    # Megatron-Core's global-batch balance loss over three micro-batches with the adaptive
    # coefficient, capacity dropping, clipping and the selection bias.
    "skywork_global_bias": {
        "family": "skywork_moe",
        "file": "train_global_bias.safetensors",
        "batch_seed": 9400,
        "require_drops": True,
        "require_clipping": True,
        "require_bias_effect": True,
        "hp": {
            "steps": 3, "micro_batches": 3, "batch_size": 2, "seq_len": 8,
            "capacity_factor": 1.0,
            "balance": "global", "adaptive": True,
            "alpha_init": 0.005, "xi": 0.2, "alpha_max": 0.01, "beta": 0.9,
            "coef": 0.005,
            "z_loss_coef": 0.0,
            "bias_update_rate": 0.02,
            "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1, "total_steps": 3, "decay": "cosine",
            "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
            "grad_clip": 0.5,
        },
    },
}

# Keys only the newer cases set (written into config_json only when present, so that the older
# cases' files stay byte-identical).
EXTRA_HP_KEYS = ["bias_update_rate"]

HP_KEYS = ["capacity_factor", "balance", "adaptive", "alpha_init", "xi", "alpha_max", "beta", "coef",
           "z_loss_coef", "lr", "min_lr", "warmup_steps", "total_steps", "decay", "weight_decay", "beta1",
           "beta2", "eps", "grad_clip", "steps", "micro_batches", "batch_size", "seq_len"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def setup_determinism() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)


# ----------------------------------------------------------------------------- model loading


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


def sky_config_for(directory: str) -> sky.SkyworkMoeConfig:
    """Skywork config as is; a Mixtral config mapped onto the Skywork module (1-layer gate, no
    logits norm, no x top_k), which make_fixtures.py verified equals HF MixtralForCausalLM."""
    with open(os.path.join(directory, "config.json")) as f:
        d = json.load(f)
    if d["model_type"] == "mixtral":
        assert d["num_experts_per_tok"] == TOP_K and not d.get("router_jitter_noise")
        d = dict(d)
        d.update(num_experts=[d["num_local_experts"]], moe_expert_interval=1, moe_use_mixtral_gating=False,
                 moe_2layer_gate=False, moe_use_logits_norm=False, moe_feature_no_mul_topk=True)
    else:
        assert d["model_type"] == "skywork_moe"
    cfg = sky.SkyworkMoeConfig.from_dict(d)
    assert not cfg.moe_use_mixtral_gating, "mixtral-style gating is not part of the training spec"
    assert not cfg.tie_word_embeddings
    return cfg


def load_model(family: str, dtype: torch.dtype = DTYPE) -> sky.SkyworkForCausalLM:
    directory = os.path.join(REPO, "fixtures", "reference", family)
    cfg = sky_config_for(directory)
    model = sky.SkyworkForCausalLM(cfg)
    state = read_checkpoint(directory)
    model.load_state_dict(state, strict=True)
    model = model.to(dtype)
    assert set(n for n, _ in model.named_parameters()) == set(state)
    return model


# ----------------------------------------------------------------------------- training forward


def moe_forward(block: sky.SparseMoeBlock, x: torch.Tensor, cf: float, k: int = TOP_K, bias=None):
    """x: [N, H], the N = B*T tokens of the micro-batch, token-major. Returns (y [N, H], info).
    bias: the layer's selection bias [E] (DeepSeek-V3's e_score_correction_bias) or None: the
    top-k is taken on probs + bias, the combine weights are the unbiased probs renormalised."""
    cfg = block.cfg
    N, E = x.shape[0], cfg.num_experts
    z = block.gate(x)  # raw logits [N, E]
    zt = z
    if cfg.moe_use_logits_norm:
        zt = cfg.moe_gate_norm_std * (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True)  # unbiased std
    probs = F.softmax(zt, dim=-1)
    pd = probs.detach()
    order = torch.sort(pd, dim=-1, descending=True, stable=True)  # ties -> lower expert index
    sel = order.indices[:, :k]  # [N, k]
    sel_margin = float((order.values[:, k - 1] - order.values[:, k]).min()) if k < E else float("inf")
    score_sel = sel  # top-k of the unbiased probabilities: what the balance losses count
    if bias is not None:
        border = torch.sort(pd + bias.to(pd.dtype), dim=-1, descending=True, stable=True)
        sel = border.indices[:, :k]
        if k < E:
            sel_margin = min(sel_margin, float((border.values[:, k - 1] - border.values[:, k]).min()))
    psel = probs.gather(1, sel)  # un-renormalised selected probs [N, k]
    w = psel / psel.sum(-1, keepdim=True)  # renormalised combine weights

    counts = torch.bincount(sel.reshape(-1), minlength=E)  # before dropping
    score_counts = torch.bincount(score_sel.reshape(-1), minlength=E)
    kept = torch.ones(N * k, dtype=torch.bool)
    cap_margin = float("inf")
    cap = None
    if cf > 0:
        cap = math.ceil(cf * k * N / E)
        flat_e = sel.reshape(-1).tolist()
        flat_p = psel.detach().reshape(-1).tolist()
        for e in range(E):
            assigned = [a for a in range(N * k) if flat_e[a] == e]
            assigned.sort(key=lambda a: (-flat_p[a], a))  # priority: prob desc, then smaller a
            for a in assigned[cap:]:
                kept[a] = False
            if len(assigned) > cap:
                cap_margin = min(cap_margin, flat_p[assigned[cap - 1]] - flat_p[assigned[cap]])
    kept = kept.view(N, k)
    dropped = int((~kept).sum())

    x_in = x if cfg.moe_feature_no_mul_topk else x * k
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.nonzero((sel == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = y.index_add(0, tok, block.experts[e](x_in[tok]) * w[tok, slot, None])
    info = {
        "logits": z, "probs": probs, "sel": sel, "kept": kept, "counts": counts, "dropped": dropped,
        "score_sel": score_sel, "score_counts": score_counts,
        "drop_rate": dropped / (N * k), "cap": cap, "sel_margin": sel_margin, "cap_margin": cap_margin,
    }
    return y, info


def forward_batch(model: sky.SkyworkForCausalLM, inputs: torch.Tensor, cf: float, biases=None):
    """inputs: int64 [B, T]; every sequence at positions 0..T-1 with its own causal attention;
    MoE routing over the B*T tokens flattened batch-major. Returns (logits [B, T, V], infos)."""
    cfg = model.cfg
    B, T = inputs.shape
    cos, sin = sky.rope_cos_sin(cfg.head_dim, cfg.rope_theta, torch.arange(T), model.lm_head.weight.dtype)
    h = model.model.embed_tokens(inputs)
    infos = []
    for layer in model.model.layers:
        a = torch.stack([layer.self_attn(layer.input_layernorm(h[b]), cos, sin) for b in range(B)])
        h = h + a
        n = layer.post_attention_layernorm(h)
        if layer.is_moe:
            bias = biases[len(infos)] if biases is not None else None
            y, info = moe_forward(layer.block_sparse_moe, n.reshape(B * T, -1), cf, bias=bias)
            info["sequences"] = B
            infos.append(info)
            h = h + y.view(B, T, -1)
        else:
            h = h + layer.mlp(n)
    return model.lm_head(model.model.norm(h)), infos


def balance_loss(kind: str, info: dict, gstate: dict | None = None, layer: int = 0, k: int = TOP_K) -> torch.Tensor:
    probs = info["probs"]
    N, E = probs.shape
    p_mean = probs.mean(0)
    if kind == "skywork":
        return ((1.0 / E - p_mean) ** 2).sum()
    if kind == "switch":
        f = info["score_counts"].to(probs.dtype) / N  # constants; sum_e f_e = k
        return E * (f * p_mean).sum()
    if kind == "sequence":
        # DeepSeek-V3 / Megatron-Core seq_aux_loss: per sequence sum_e f_e P_e with
        # f_e = E/(k T) * (tokens of the sequence choosing e), P_e = mean_t s'_te (softmax scores
        # already sum to 1 per token), averaged over the sequences.
        S = info["sequences"]
        T = N // S
        onehot = torch.zeros(N, E, dtype=probs.dtype).scatter(1, info["score_sel"], 1.0)
        f = onehot.view(S, T, E).sum(1) * (E / (k * T))
        P = probs.view(S, T, E).mean(1)
        return (f * P).sum(1).mean()
    if kind == "global":
        # Megatron-Core global_aux_loss: running mean of the tokens per expert over the step's
        # micro-batches so far, then E/(k T^2) * sum_e c_e * sum_t p_te.
        c = info["score_counts"].to(probs.dtype)
        st = gstate.setdefault(layer, {"sum": torch.zeros(E, dtype=probs.dtype), "n": 0})
        st["sum"] = st["sum"] + c
        st["n"] += 1
        mean = st["sum"] / st["n"]
        return (probs.sum(0) * mean).sum() * (E / (k * N * N))
    raise KeyError(kind)


def z_loss(info: dict) -> torch.Tensor:
    return (torch.logsumexp(info["logits"], dim=-1) ** 2).mean()


def microbatch_loss(model, seqs: torch.Tensor, hp: dict, alpha: list[float], biases=None, gstate=None):
    """seqs: int64 [B, T+1]. Returns (total, parts) with total differentiable. biases: per MoE
    layer selection bias or None; gstate: the step's running load counts (global loss)."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    logits, infos = forward_batch(model, inputs, hp["capacity_factor"], biases)
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    gstate = {} if gstate is None else gstate
    aux = sum(alpha[l] * balance_loss(hp["balance"], info, gstate, l) for l, info in enumerate(infos))
    zterm = hp["z_loss_coef"] * sum(z_loss(info) for info in infos)
    total = ce + aux + zterm
    return total, {"ce": ce, "aux": aux, "z": zterm, "infos": infos, "logits": logits}


def lr_at(hp: dict, s: int) -> float:
    lr, min_lr, warm, total = hp["lr"], hp["min_lr"], hp["warmup_steps"], hp["total_steps"]
    if s < warm:
        return lr * (s + 1) / warm
    t = min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)
    if hp["decay"] == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
    if hp["decay"] == "linear":
        return lr + (min_lr - lr) * t
    if hp["decay"] == "constant":
        return lr
    raise KeyError(hp["decay"])


def decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.endswith(".bias") and "norm" not in name


# ----------------------------------------------------------------------------- independent checks


def check_capacity_by_rank(info: dict, cf: float, k: int = TOP_K) -> None:
    """Independent O(n^2) formulation of the dropping rule: an assignment is kept iff fewer than
    cap assignments of the same expert have a higher priority (larger prob, or equal prob and a
    smaller flat index a = token*k + slot)."""
    sel = info["sel"].reshape(-1).tolist()
    p = info["probs"].detach().gather(1, info["sel"]).reshape(-1).tolist()
    kept = info["kept"].reshape(-1).tolist()
    N, E = info["probs"].shape
    cap = math.ceil(cf * k * N / E) if cf > 0 else None
    for a in range(len(sel)):
        if cap is None:
            assert kept[a]
            continue
        rank = sum(1 for b in range(len(sel)) if sel[b] == sel[a] and (p[b] > p[a] or (p[b] == p[a] and b < a)))
        assert kept[a] == (rank < cap), (a, rank, cap)


def finite_difference_check(model, seqs: torch.Tensor, hp: dict, alpha: list[float], seed: int) -> float:
    """Directional derivative of the micro-batch total loss (autograd vs central difference) along
    a random unit direction over all parameters; the routing decisions are asserted unchanged at
    theta +- eps. Returns the relative error."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.grad = None
    total, parts = microbatch_loss(m, seqs, hp, alpha)
    total.backward()
    g = torch.Generator().manual_seed(seed)
    dirs = {n: torch.randn(p.shape, generator=g, dtype=DTYPE) for n, p in m.named_parameters()}
    scale = math.sqrt(sum(float((d * d).sum()) for d in dirs.values()))
    dirs = {n: d / scale for n, d in dirs.items()}
    analytic = sum(float((p.grad * dirs[n]).sum()) for n, p in m.named_parameters() if p.grad is not None)
    eps = 1e-5
    vals = []
    for sgn in (1.0, -1.0):
        mm = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in mm.named_parameters():
                p.add_(sgn * eps * dirs[n])
            t2, parts2 = microbatch_loss(mm, seqs, hp, alpha)
        for i1, i2 in zip(parts["infos"], parts2["infos"]):
            assert torch.equal(i1["sel"], i2["sel"]) and torch.equal(i1["kept"], i2["kept"]), "routing moved"
        vals.append(float(t2))
    numeric = (vals[0] - vals[1]) / (2 * eps)
    rel = abs(numeric - analytic) / max(abs(analytic), 1e-12)
    assert rel < 1e-6, (numeric, analytic, rel)
    return rel


def check_against_skywork_module(model, seqs: torch.Tensor) -> float:
    """Dropless batched forward == the Skywork module's own per-sequence forward."""
    with torch.no_grad():
        logits, _ = forward_batch(model, seqs[:, :-1], 0.0)
        ref = torch.stack([model(seqs[b, :-1]) for b in range(seqs.shape[0])])
    d = float((logits - ref).abs().max())
    assert d < 1e-12, d
    return d


def hf_mixtral_checks(model, seqs: torch.Tensor, hp: dict) -> dict[str, Any]:
    """On the first micro-batch of step 0 (initial weights): HF MixtralForCausalLM (float64, eager)
    vs our forward, and transformers' load_balancing_loss_func vs our Switch loss."""
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    directory = os.path.join(REPO, "fixtures", "reference", "mixtral")
    hf = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                            experts_implementation="eager").to(DTYPE)
    hf.eval()
    E = hf.config.num_local_experts
    with torch.no_grad():
        out = hf(input_ids=seqs[:, :-1], output_router_logits=True)
        logits, infos = forward_batch(model, seqs[:, :-1], hp["capacity_factor"])
    # HF's RMSNorm rounds through f32 even in a float64 model, hence the small tolerance.
    logit_diff = float((out.logits - logits).abs().max())
    router_diff = max(float((a - b["logits"]).abs().max()) for a, b in zip(out.router_logits, infos))
    hf_sel = [torch.topk(torch.softmax(a.double(), -1), TOP_K, -1).indices.sort(-1).values for a in out.router_logits]
    same_sel = all(torch.equal(a, b["sel"].sort(-1).values) for a, b in zip(hf_sel, infos))
    assert logit_diff < 1e-5 and router_diff < 1e-5 and same_sel, (logit_diff, router_diff, same_sel)

    ours_layers = [float(balance_loss("switch", i)) for i in infos]
    ours_mean = sum(ours_layers) / len(ours_layers)
    gate_logits = tuple(i["logits"].detach() for i in infos)
    hf_all = float(load_balancing_loss_func(gate_logits, E, TOP_K))
    hf_per_layer = [float(load_balancing_loss_func((g,), E, TOP_K)) for g in gate_logits]
    hf_on_hf_logits = float(load_balancing_loss_func(tuple(out.router_logits), E, TOP_K))
    # HF pools all layers: E * sum_e (sum_l count_le / (L N)) * (sum_l P_le / L)
    N, L = gate_logits[0].shape[0], len(infos)
    f_pool = sum(i["counts"].to(DTYPE) for i in infos) / (L * N)
    p_pool = sum(i["probs"].detach().mean(0) for i in infos) / L
    ours_pooled = float(E * (f_pool * p_pool).sum())
    res = {
        "hf_logits_max_abs_diff": logit_diff,
        "hf_router_logits_max_abs_diff": router_diff,
        "hf_same_expert_selection": same_sel,
        "our_switch_loss_per_layer": ours_layers,
        "our_switch_loss_mean": ours_mean,
        "hf_load_balancing_loss": hf_all,
        "hf_load_balancing_loss_on_hf_router_logits": hf_on_hf_logits,
        "hf_load_balancing_loss_per_layer": hf_per_layer,
        "our_switch_loss_pooled_like_hf": ours_pooled,
        "hf_model_aux_loss": float(out.aux_loss) if getattr(out, "aux_loss", None) is not None else None,
    }
    # per layer, and pooled, the two formulas are the same (HF sums probabilities in float32)
    assert all(abs(a - b) < 1e-6 for a, b in zip(ours_layers, hf_per_layer)), (ours_layers, hf_per_layer)
    assert abs(ours_pooled - hf_all) < 1e-6, (ours_pooled, hf_all)
    return res


def compare_with_f32_run(family: str, batches: torch.Tensor, hp: dict, model64, steps64) -> dict[str, Any]:
    """The same steps run entirely in float32 (as skymoe does): same routing / dropping decisions
    at every step, and how far the float32 results land from the float64 reference (a guide for
    the tolerances of the Rust test)."""
    m32 = load_model(family, torch.float32)
    steps32 = train(m32, batches, hp)
    same = all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for s64, s32 in zip(steps64, steps32)
        for mb64, mb32 in zip(s64["decisions"], s32["decisions"])
        for a, b in zip(mb64, mb32)
    )
    p64 = dict(model64.named_parameters())
    diffs = {n: (p.detach().double() - p64[n].detach()).abs() for n, p in m32.named_parameters()}
    max_abs = max(float(d.max()) for d in diffs.values())
    worst = max(diffs, key=lambda n: float(diffs[n].max()))
    n_elems = sum(d.numel() for d in diffs.values())
    over = {str(t): int(sum(int((d > t).sum()) for d in diffs.values())) for t in (1e-6, 1e-5, 1e-4)}
    scal = {}
    for k in ("loss", "ce", "aux", "z", "grad_norm"):
        scal[k] = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for a, b in zip(steps64, steps32))
    return {"same_decisions": same, "final_param_max_abs_diff": max_abs, "worst_param": worst,
            "final_param_elements": n_elems, "final_param_elements_over": over,
            "step_scalar_max_rel_diff": scal}


# ----------------------------------------------------------------------------- one case


def make_batches(hp: dict, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (hp["steps"], hp["micro_batches"], hp["batch_size"], hp["seq_len"] + 1)
    return torch.randint(0, vocab, shape, generator=g, dtype=torch.int64)


def train(model, batches: torch.Tensor, hp: dict):
    """Runs hp['steps'] optimiser steps on `model` (modified in place). Returns per-step records."""
    params = list(model.named_parameters())
    f64 = params[0][1].dtype == torch.float64
    tol_norm, tol_adam = (1e-12, 1e-14) if f64 else (1e-5, 1e-6)
    decay_params = [p for n, p in params if decays(n, p)]
    other_params = [p for n, p in params if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": hp["weight_decay"]}, {"params": other_params, "weight_decay": 0.0}],
        lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], foreach=False, fused=False,
    )
    # shadow AdamW written from the formulas, to cross-check torch's implementation
    shadow = {n: p.detach().clone() for n, p in params}
    m1 = {n: torch.zeros_like(p) for n, p in params}
    m2 = {n: torch.zeros_like(p) for n, p in params}

    n_moe = len(model.moe_blocks())
    alpha = [hp["alpha_init"] if hp["adaptive"] else hp["coef"]] * n_moe
    M = hp["micro_batches"]
    rate = hp.get("bias_update_rate", 0.0)
    E = model.cfg.num_experts
    biases = [torch.zeros(E, dtype=DTYPE) for _ in range(n_moe)] if rate > 0 else None
    steps = []
    for s in range(hp["steps"]):
        opt.zero_grad(set_to_none=True)
        gstate: dict = {}  # the global loss's running counts start afresh each optimiser step
        rec = {"alpha": list(alpha), "loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0,
               "drop_rate": [0.0] * n_moe, "expert_counts": None, "sel_margin": float("inf"),
               "cap_margin": float("inf"), "dropped": [0] * n_moe, "decisions": []}
        counts = None
        for mb in range(M):
            total, parts = microbatch_loss(model, batches[s, mb], hp, alpha, biases, gstate)
            (total / M).backward()
            rec["loss"] += float(total.detach()) / M
            rec["ce"] += float(parts["ce"].detach()) / M
            rec["aux"] += float(parts["aux"].detach()) / M
            rec["z"] += float(parts["z"].detach()) / M if torch.is_tensor(parts["z"]) else float(parts["z"]) / M
            c = torch.stack([i["counts"] for i in parts["infos"]])
            counts = c if counts is None else counts + c
            rec["decisions"].append([(i["sel"], i["kept"]) for i in parts["infos"]])
            rec.setdefault("bias_moved", False)
            rec["bias_moved"] |= any(not torch.equal(i["sel"], i["score_sel"]) for i in parts["infos"])
            for l, info in enumerate(parts["infos"]):
                rec["drop_rate"][l] += info["drop_rate"] / M
                rec["dropped"][l] += info["dropped"]
                rec["sel_margin"] = min(rec["sel_margin"], info["sel_margin"])
                rec["cap_margin"] = min(rec["cap_margin"], info["cap_margin"])
                check_capacity_by_rank(info, hp["capacity_factor"])
        rec["expert_counts"] = counts
        missing = [n for n, p in params if p.grad is None]
        rec["params_without_grad"] = missing
        grads = {n: p.grad for n, p in params}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        rec["grad_norm"] = norm
        clip = hp["grad_clip"]
        scale = 1.0
        if clip > 0:
            tn = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], clip, foreach=False))
            assert abs(tn - norm) <= tol_norm * norm, (tn, norm)
            scale = min(1.0, clip / (norm + 1e-6))
        rec["clip_scale"] = scale
        rec["clipped"] = scale < 1.0
        lr = lr_at(hp, s)
        rec["lr"] = lr
        for group in opt.param_groups:
            group["lr"] = lr
        # shadow update from the formulas (grads already clipped in place by clip_grad_norm_)
        t = s + 1
        with torch.no_grad():
            for n, p in params:
                g = p.grad
                wd = hp["weight_decay"] if decays(n, p) else 0.0
                shadow[n].mul_(1.0 - lr * wd)
                m1[n] = hp["beta1"] * m1[n] + (1 - hp["beta1"]) * g
                m2[n] = hp["beta2"] * m2[n] + (1 - hp["beta2"]) * g * g
                mhat = m1[n] / (1 - hp["beta1"] ** t)
                vhat = m2[n] / (1 - hp["beta2"] ** t)
                shadow[n] -= lr * mhat / (vhat.sqrt() + hp["eps"])
        opt.step()
        rec["adamw_vs_formula_max_abs_diff"] = max(float((p.detach() - shadow[n]).abs().max()) for n, p in params)
        assert rec["adamw_vs_formula_max_abs_diff"] < tol_adam, rec["adamw_vs_formula_max_abs_diff"]
        with torch.no_grad():  # keep the shadow exactly on torch's trajectory
            for n, p in params:
                shadow[n].copy_(p)
        if hp["adaptive"]:
            alpha = [hp["beta"] * a + (1 - hp["beta"]) * min(hp["xi"] * d, hp["alpha_max"])
                     for a, d in zip(alpha, rec["drop_rate"])]
        rec["alpha_next"] = list(alpha)
        if biases is not None:
            # DeepSeek-V3 / Megatron-Core: b_e += rate * sign(mean load - load_e), from the tokens
            # routed to each expert in the step (all micro-batches, before capacity dropping).
            loads = counts.to(DTYPE)
            biases = [b + rate * torch.sign(ld.mean() - ld) for b, ld in zip(biases, loads)]
            rec["bias"] = torch.stack(biases)
        steps.append(rec)
    return steps


def run_case(name: str, out_root: str) -> dict[str, Any]:
    case = CASES[name]
    hp = case["hp"]
    log(f"== {name} ({case['family']})")
    base = load_model(case["family"])
    vocab = base.cfg.vocab_size
    init_state = {n: p.detach().clone() for n, p in base.named_parameters()}

    chosen = None
    for attempt in range(MAX_SEED_ATTEMPTS):
        seed = case["batch_seed"] + attempt
        batches = make_batches(hp, vocab, seed)
        model = copy.deepcopy(base)
        steps = train(model, batches, hp)
        problems = []
        if any(st["params_without_grad"] for st in steps):
            problems.append("an expert got no token in some step (parameter without gradient)")
        if min(st["sel_margin"] for st in steps) < MIN_DECISION_MARGIN:
            problems.append(f"top-k margin {min(st['sel_margin'] for st in steps):.2e}")
        if min(st["cap_margin"] for st in steps) < MIN_DECISION_MARGIN:
            problems.append(f"capacity margin {min(st['cap_margin'] for st in steps):.2e}")
        if case["require_drops"] and not any(sum(st["dropped"]) > 0 for st in steps):
            problems.append("no drops")
        if case["require_clipping"] and not any(st["clipped"] for st in steps):
            problems.append("clipping never engaged")
        if case.get("require_bias_effect") and not any(st.get("bias_moved") for st in steps):
            problems.append("the selection bias never changed a selection")
        if not problems:
            f32_cmp = compare_with_f32_run(case["family"], batches, hp, model, steps)
            if not f32_cmp["same_decisions"]:
                problems.append("a float32 run of the same steps routes or drops differently")
        if not problems:
            chosen = (seed, batches, model, steps, f32_cmp)
            break
        log(f"  batch seed {seed} rejected: {', '.join(problems)}")
    assert chosen is not None, f"{name}: no batch seed passed"
    seed, batches, model, steps, f32_cmp = chosen
    log(f"  batch seed {seed}")

    # ---- checks
    checks: dict[str, Any] = {"batch_seed": seed, "float32_run": f32_cmp}
    alpha0 = steps[0]["alpha"]
    if case["family"] == "skywork_moe":
        checks["dropless_forward_vs_skywork_module_max_abs_diff"] = check_against_skywork_module(base, batches[0, 0])
    elif hp["capacity_factor"] <= 0:  # transformers' Mixtral is dropless
        checks["hf"] = hf_mixtral_checks(base, batches[0, 0], hp)
    checks["finite_difference_rel_err"] = finite_difference_check(base, batches[0, 0], hp, alpha0, seed=12345)
    for st in steps:
        for k in ("loss", "ce", "aux", "z", "grad_norm"):
            assert math.isfinite(st[k]), (k, st[k])
    final = {n: p.detach() for n, p in model.named_parameters()}
    changed = {n: float((final[n] - init_state[n]).abs().max()) for n in final}
    assert all(v > 0 for v in changed.values()), [n for n, v in changed.items() if v == 0]
    checks["min_param_change"] = min(changed.values())
    checks["max_param_change"] = max(changed.values())

    # ---- write
    f32 = torch.float32
    tensors: dict[str, torch.Tensor] = {"batches": batches.contiguous()}
    cfg_json = json.dumps({k: hp[k] for k in HP_KEYS + [k for k in EXTRA_HP_KEYS if k in hp]}, sort_keys=True)
    tensors["config_json"] = torch.tensor(list(cfg_json.encode("utf-8")), dtype=torch.uint8)
    for s, st in enumerate(steps):
        p = f"step{s}."
        for k in ("loss", "ce", "aux", "z", "grad_norm", "lr"):
            tensors[p + k] = torch.tensor(st[k], dtype=DTYPE).to(f32)
        tensors[p + "alpha"] = torch.tensor(st["alpha"], dtype=DTYPE).to(f32)
        tensors[p + "drop_rate"] = torch.tensor(st["drop_rate"], dtype=DTYPE).to(f32)
        tensors[p + "expert_counts"] = st["expert_counts"].to(f32).contiguous()
        if "bias" in st:
            tensors[p + "bias"] = st["bias"].to(f32).contiguous()  # after the step's update
    for n, t in final.items():
        tensors["final." + n] = t.to(f32).contiguous()
    if "bias" in steps[-1]:
        moe_layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
        for l, i in enumerate(moe_layers):
            name = f"model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias"
            tensors["final." + name] = steps[-1]["bias"][l].to(f32).contiguous()
    if "hf" in checks:
        tensors["hf_load_balancing_loss"] = torch.tensor(checks["hf"]["hf_load_balancing_loss"], dtype=DTYPE).to(f32)
        tensors["our_switch_loss_mean"] = torch.tensor(checks["hf"]["our_switch_loss_mean"], dtype=DTYPE).to(f32)
    info = {
        "generator": "tools/reference/make_train_fixtures.py",
        "case": name,
        "source_checkpoint": f"fixtures/reference/{case['family']}",
        "precision": "float64 throughout, cast to float32 when written",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
    }
    path = os.path.join(out_root, case["family"], case["file"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # one metadata key only (safetensors writes the metadata map in hash order)
    save_file(tensors, path, metadata={"reference_info": json.dumps(info, sort_keys=True)})

    # ---- report
    log(f"  wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes, {len(tensors)} tensors)")
    log(f"  config_json: {cfg_json}")
    for s, st in enumerate(steps):
        log(f"  step {s}: loss {st['loss']:.9f} ce {st['ce']:.9f} aux {st['aux']:.9e} z {st['z']:.9e} "
            f"lr {st['lr']:.6g} grad_norm {st['grad_norm']:.9f} clip_scale {st['clip_scale']:.9f} "
            f"(clipped: {st['clipped']})")
        log(f"          alpha {[f'{a:.9g}' for a in st['alpha']]} -> {[f'{a:.9g}' for a in st['alpha_next']]}")
        if "bias" in st:
            log(f"          bias after the step {st['bias'].tolist()} (changed a selection: {st['bias_moved']})")
        log(f"          drop_rate {[f'{d:.6f}' for d in st['drop_rate']]} dropped {st['dropped']} "
            f"expert_counts {st['expert_counts'].tolist()}")
        log(f"          min top-k margin {st['sel_margin']:.3e}, min capacity margin {st['cap_margin']:.3e}, "
            f"AdamW vs formula {st['adamw_vs_formula_max_abs_diff']:.1e}")
    log(f"  checks: {json.dumps(checks, indent=None)}")
    return {"path": path, "steps": steps, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures", "reference"))
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: all cases")
    args = ap.parse_args()
    setup_determinism()
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    for name in args.case or list(CASES):
        run_case(name, os.path.abspath(args.out))


if __name__ == "__main__":
    main()
