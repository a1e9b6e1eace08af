#!/usr/bin/env python3
"""Reference fixtures of the DeepSeek-V2 and DeepSeek-V3 families, made with transformers >= 5.

Writes, next to make_fixtures.py's families (run that one first: it replaces
fixtures/reference/ and with it these files):

  fixtures/reference/deepseek_v2/  DeepseekV2ForCausalLM: latent attention without a query
                                   bottleneck (q_proj, as DeepSeek-V2-Lite), v_head_dim 12 vs
                                   qk_head_dim 24, layer 0 dense (first_k_dense_replace 1),
                                   8 experts top-2 in `group_limited_greedy` (4 groups, 2
                                   kept), 2 shared experts, routed_scaling_factor 1.5
  fixtures/reference/deepseek_v3/  DeepseekV3ForCausalLM: query bottleneck (q_lora_rank 24),
                                   YaRN rotary scaling with mscale_all_dim (softmax scale
                                   changed), sigmoid router with a non-zero
                                   e_score_correction_bias that changes selections, 4 groups
                                   with 2 kept (top-2-sum group scores), norm_topk_prob,
                                   routed_scaling_factor 2.5, one shared expert
  fixtures/reference/gguf/deepseek2-v2-f32.gguf  (+ .reference.safetensors): llama.cpp's older
                                   layout with attn_kv_b
  fixtures/reference/gguf/deepseek2-v3-f16.gguf  (+ .reference.safetensors): llama.cpp's
                                   current layout, kv_b split into attn_k_b (transposed) and
                                   attn_v_b, exp_probs_b, sigmoid gating, yarn log multiplier

Each family directory holds config.json as transformers writes it, model.safetensors from
save_pretrained (hub names: experts unfused, the selection bias included), tokenizer.json (the
llama fixture's), reference.safetensors (tokens, logits, loss, grad.<name> of every parameter
from a float64 backward) and routing.json (per layer: chosen experts and weights, the
selection margins, and for V3 how many tokens the bias moved).

    python3 tools/reference/make_deepseek_fixtures.py [--out fixtures/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import gguf
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

N_EXPERTS = 8
TOP_K = 2
N_GROUP = 4
TOPK_GROUP = 2
EXPERT_FF = 16
DENSE_FF = 96
KV_LORA = 32
Q_LORA = 24
NOPE = 16
ROPE = 8
V_DIM = 12
BIAS_STD = 0.15
SEEDS = {"deepseek_v2": 9000, "deepseek_v3": 9500}
CLASSES = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}


def family_config(family: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=mf.HIDDEN,
        intermediate_size=DENSE_FF,
        moe_intermediate_size=EXPERT_FF,
        num_hidden_layers=mf.N_LAYERS,
        num_attention_heads=mf.N_HEADS,
        num_key_value_heads=mf.N_HEADS,
        max_position_embeddings=mf.MAX_POS,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
        experts_implementation="eager",
        n_routed_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V_DIM,
        first_k_dense_replace=1,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    if family == "deepseek_v2":
        return DeepseekV2Config(
            q_lora_rank=None,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            rope_parameters={"rope_type": "default", "rope_theta": mf.ROPE_THETA},
            **common,
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            q_lora_rank=Q_LORA,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            num_mtp_layers=0,
            rope_parameters={"rope_type": "yarn", "rope_theta": mf.ROPE_THETA, "factor": 4.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
            **common,
        )
    raise KeyError(family)


def selection(mod, hidden: torch.Tensor):
    """The router's selection scores (masked to the kept groups), its group scores, and the
    unbiased choice, recomputed from the module as transformers computes them."""
    x = hidden.view(-1, mod.hidden_dim).double()
    logits = x @ mod.weight.double().t()
    if hasattr(mod, "e_score_correction_bias"):
        scores = logits.sigmoid()
        choice = scores + mod.e_score_correction_bias.double()
        groups = choice.view(-1, mod.num_group, mod.num_experts // mod.num_group).topk(2, dim=-1)[0].sum(-1)
    else:
        scores = logits.softmax(-1)
        choice = scores
        groups = choice.view(-1, mod.num_group, mod.num_experts // mod.num_group).max(-1).values
    kept = groups.topk(mod.topk_group, dim=-1)[1]
    mask = torch.zeros_like(groups).scatter_(1, kept, 1).bool()
    mask = mask.unsqueeze(-1).expand(-1, mod.num_group, mod.num_experts // mod.num_group).reshape(-1, mod.num_experts)
    masked = choice.masked_fill(~mask, float("-inf"))
    unbiased = scores.masked_fill(~mask, float("-inf")).topk(mod.top_k, dim=-1)[1]
    return masked, groups, unbiased


def forward_with_routing(model, tokens: torch.Tensor):
    """The model's logits on one sequence, and every router's choice with its margins."""
    captured: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopkRouter"):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))

            def hook(m, inp, out, layer=layer):
                _, w, idx = out
                masked, groups, unbiased = selection(m, inp[0].detach())
                captured[layer] = {"scores": masked, "groups": groups, "weights": w.detach(),
                                   "experts": idx.detach(), "unbiased": unbiased}

            hooks.append(mod.register_forward_hook(hook))
    try:
        logits = model(input_ids=tokens[None], use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, captured


def routing_ok(routing: dict[int, dict], family: str) -> tuple[bool, dict]:
    ok, summary = mf.routing_summary(routing, N_EXPERTS)
    moved = 0
    for layer, r in routing.items():
        g = r["groups"].sort(dim=-1, descending=True).values
        gm = (g[:, TOPK_GROUP - 1] - g[:, TOPK_GROUP]).min().item()
        summary["layers"][str(layer)]["min_group_margin"] = gm
        ok = ok and gm >= mf.MIN_MARGIN
        changed = int((r["unbiased"].sort(-1).values != r["experts"].sort(-1).values).any(-1).sum())
        summary["layers"][str(layer)]["tokens_moved_by_bias"] = changed
        moved += changed
    if family == "deepseek_v3":
        ok = ok and moved >= 2
    summary["tokens_moved_by_bias"] = moved
    return ok, summary


@torch.no_grad()
def init(model, seed: int) -> None:
    mf.init_params(model, seed)
    g = torch.Generator().manual_seed(seed + 17)
    for _, mod in model.named_modules():
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.copy_(BIAS_STD * torch.randn(mod.e_score_correction_bias.shape, generator=g))


def state_of(model, family: str) -> dict[str, torch.Tensor]:
    """Hub-named tensors: parameters (experts unfused) and the selection-bias buffers."""
    out = mf.canonical_state(family, model.named_parameters())
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out[name] = buf.detach().float().contiguous().clone()
    return out


def build(family: str, vocab: int, tokens: torch.Tensor):
    for attempt in range(mf.MAX_ATTEMPTS):
        seed = SEEDS[family] + attempt
        torch.manual_seed(seed)
        model = CLASSES[family](family_config(family, vocab))
        init(model, seed)
        model.eval()
        with torch.no_grad():
            _, routing = forward_with_routing(model, tokens)
        ok, summary = routing_ok(routing, family)
        if ok:
            summary["seed"] = seed
            summary["attempts"] = attempt + 1
            return model, seed, summary
        mf.log(f"  [{family}] seed {seed}: routing too fragile, reseeding")
    raise RuntimeError(f"{family}: no seed with acceptable routing")


def grads_f64(model, family: str, tokens: torch.Tensor):
    import copy
    m64 = copy.deepcopy(model).to(torch.float64)
    m64.zero_grad(set_to_none=True)
    logits64, routing64 = forward_with_routing(m64, tokens)
    loss64 = mf.ce_loss(logits64, tokens)
    loss64.backward()
    named = [(n, p.grad) for n, p in m64.named_parameters()]
    for n, g in named:
        assert g is not None, f"no grad for {n}"
    return mf.canonical_state(family, named), loss64.item(), routing64, logits64.detach()


def run_family(family: str, out_root: str, vocab: int, tok_path: str, tokens: torch.Tensor,
               summary: dict[str, Any]):
    mf.log(f"== {family}")
    d = os.path.join(out_root, family)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model, seed, routing = build(family, vocab, tokens)
    model.save_pretrained(d)
    mf.remove_extras(d)
    expected = state_of(model, family)
    on_disk = mf.read_checkpoint(d)
    assert set(on_disk) == set(expected), (set(on_disk) ^ set(expected))
    assert all(torch.equal(on_disk[n], expected[n]) for n in expected)
    shutil.copy(tok_path, os.path.join(d, "tokenizer.json"))
    with torch.no_grad():
        logits, routing32 = forward_with_routing(model, tokens)
    loss32 = mf.ce_loss(logits, tokens)
    reloaded = CLASSES[family].from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                               experts_implementation="eager")
    reloaded.eval()
    with torch.no_grad():
        logits_re, _ = forward_with_routing(reloaded, tokens)
    reload_diff = (logits_re - logits).abs().max().item()
    assert reload_diff <= 1e-6, f"reload mismatch {reload_diff}"
    grads, loss64, routing64, logits64 = grads_f64(model, family, tokens)
    assert mf.same_routing(routing32, routing64), "f32/f64 routing differs"
    assert set(grads) | {n for n in expected if n.endswith("e_score_correction_bias")} == set(expected)
    meta = {
        "family": family,
        "seed": seed,
        "loss_definition": "mean cross-entropy of logits[:-1] vs tokens[1:], no aux loss",
        "grad_precision": "float64 forward/backward (router logits at float32 as transformers casts them), cast to float32",
        "loss_f64": repr(loss64),
        "torch": torch.__version__,
        "transformers": mf.transformers.__version__,
    }
    mf.save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, loss32.item(), grads, meta)
    for r in routing["layers"].values():
        r.pop("groups", None)
    mf.dump_json(routing, os.path.join(d, "routing.json"))
    summary[family] = {
        "seed": seed,
        "loss": loss32.item(),
        "loss_f64": loss64,
        "max_abs_logit_diff_f64_vs_f32": (logits64 - logits.double()).abs().max().item(),
        "reload_max_abs_logit_diff": reload_diff,
        "parameters": int(sum(t.numel() for t in expected.values())),
        "min_selection_margin": routing["min_selection_margin"],
        "tokens_moved_by_bias": routing["tokens_moved_by_bias"],
    }
    mf.log(f"  seed={seed} loss={loss32.item():.6f} moved_by_bias={routing['tokens_moved_by_bias']}")
    return model, expected


def gguf_tensors(cfg, state: dict[str, torch.Tensor], split_kv_b: bool) -> list[tuple[str, np.ndarray]]:
    """Hub tensors under llama.cpp's deepseek2 names: experts stacked, shared experts as
    *_shexp, the selection bias as exp_probs_b.bias; kv_b_proj whole (older files) or split
    into attn_k_b (each head's key rows transposed, [heads, r, nope]) and attn_v_b."""
    s = {k: v.numpy().astype(np.float32) for k, v in state.items()}
    out = [("token_embd.weight", s["model.embed_tokens.weight"]),
           ("output_norm.weight", s["model.norm.weight"]),
           ("output.weight", s["lm_head.weight"])]
    h = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        out += [(b + "attn_norm.weight", s[p + "input_layernorm.weight"]),
                (b + "ffn_norm.weight", s[p + "post_attention_layernorm.weight"]),
                (b + "attn_kv_a_mqa.weight", s[a + "kv_a_proj_with_mqa.weight"]),
                (b + "attn_kv_a_norm.weight", s[a + "kv_a_layernorm.weight"]),
                (b + "attn_output.weight", s[a + "o_proj.weight"])]
        if a + "q_proj.weight" in s:
            out.append((b + "attn_q.weight", s[a + "q_proj.weight"]))
        else:
            out += [(b + "attn_q_a.weight", s[a + "q_a_proj.weight"]),
                    (b + "attn_q_a_norm.weight", s[a + "q_a_layernorm.weight"]),
                    (b + "attn_q_b.weight", s[a + "q_b_proj.weight"])]
        kv_b = s[a + "kv_b_proj.weight"]
        if split_kv_b:
            per = kv_b.reshape(h, NOPE + V_DIM, KV_LORA)
            out.append((b + "attn_k_b.weight", np.ascontiguousarray(per[:, :NOPE, :].transpose(0, 2, 1))))
            out.append((b + "attn_v_b.weight", np.ascontiguousarray(per[:, NOPE:, :])))
        else:
            out.append((b + "attn_kv_b.weight", kv_b))
        if p + "mlp.gate.weight" in s:
            out.append((b + "ffn_gate_inp.weight", s[p + "mlp.gate.weight"]))
            if p + "mlp.gate.e_score_correction_bias" in s:
                out.append((b + "exp_probs_b.bias", s[p + "mlp.gate.e_score_correction_bias"]))
            for src, dst in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out.append((b + dst + "_exps.weight",
                            np.stack([s[f"{p}mlp.experts.{e}.{src}.weight"] for e in range(N_EXPERTS)])))
                out.append((b + dst + "_shexp.weight", s[f"{p}mlp.shared_experts.{src}.weight"]))
        else:
            for src, dst in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out.append((b + dst + ".weight", s[f"{p}mlp.{src}.weight"]))
    return out


def canonical_from_stored(cfg, stored: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    s = {"model.embed_tokens.weight": t(stored["token_embd.weight"]),
         "model.norm.weight": t(stored["output_norm.weight"]),
         "lm_head.weight": t(stored["output.weight"])}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
             "attn_output": "self_attn.o_proj", "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
             "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
             "attn_kv_b": "self_attn.kv_b_proj", "ffn_gate_inp": "mlp.gate", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
             "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    h = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for g, n in names.items():
            if b + g + ".weight" in stored:
                s[p + n + ".weight"] = t(stored[b + g + ".weight"])
        if b + "attn_k_b.weight" in stored:
            kb = stored[b + "attn_k_b.weight"].transpose(0, 2, 1)
            vb = stored[b + "attn_v_b.weight"]
            s[p + "self_attn.kv_b_proj.weight"] = t(np.concatenate([kb, vb], axis=1).reshape(h * (NOPE + V_DIM), KV_LORA))
        if b + "exp_probs_b.bias" in stored:
            s[p + "mlp.gate.e_score_correction_bias"] = t(stored[b + "exp_probs_b.bias"])
        for src, dst in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            if b + dst + ".weight" in stored:
                for e in range(N_EXPERTS):
                    s[f"{p}mlp.experts.{e}.{src}.weight"] = t(stored[b + dst + ".weight"][e])
    return s


def write_gguf(path: str, family: str, cfg, tensors, matmul_type: QT, tok_meta) -> dict[str, np.ndarray]:
    """A deepseek2 GGUF as llama.cpp's converter writes it (MLA as one-kv-head attention over
    [latent | rope key]); returns the tensors as stored, dequantised to f32."""
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_name(family)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(mf.FILE_TYPE[matmul_type]))
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(KV_LORA)
    if family == "deepseek_v3":
        w.add_key_length(KV_LORA + ROPE)
        w.add_value_length(KV_LORA)
        w.add_key_length_mla(NOPE + ROPE)
        w.add_value_length_mla(V_DIM)
    else:
        # The older converter's lengths: a head's key and value.
        w.add_key_length(NOPE + ROPE)
        w.add_value_length(V_DIM)
    w.add_expert_feed_forward_length(EXPERT_FF)
    w.add_expert_count(N_EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if cfg.norm_topk_prob and family == "deepseek_v3":
        w.add_expert_weights_norm(True)
    w.add_expert_group_count(N_GROUP)
    w.add_expert_group_used_count(TOPK_GROUP)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if family == "deepseek_v3"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(ROPE)
    rp = cfg.rope_parameters
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))
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
        if mf.storage_type(name, arr, matmul_type) == QT.F16 and not name.endswith(".bias"):
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
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        got = np.asarray(t.data).astype(np.float32).reshape(stored[t.name].shape)
        assert np.array_equal(got, stored[t.name]), t.name
    assert {t.name for t in r.tensors} == set(stored)
    return stored


def run_gguf(family: str, out_root: str, model, state, tokens, tok_meta, summary) -> None:
    cfg = model.config
    split = family == "deepseek_v3"
    qt = QT.F16 if split else QT.F32
    stem = f"deepseek2-{family.split('_')[1]}-{qt.name.lower()}"
    gdir = os.path.join(out_root, "gguf")
    os.makedirs(gdir, exist_ok=True)
    stored = write_gguf(os.path.join(gdir, stem + ".gguf"), family, cfg, gguf_tensors(cfg, state, split), qt, tok_meta)
    deq = canonical_from_stored(cfg, stored)
    assert set(deq) == set(state), set(deq) ^ set(state)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(out_root, family, "config.json"), tmp)
        save_file(deq, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        m2 = CLASSES[family].from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager")
        m2.eval()
        with torch.no_grad():
            logits, _ = forward_with_routing(m2, tokens)
    ref = os.path.join(gdir, stem + ".reference.safetensors")
    mf.save_reference(ref, tokens, logits, None, None,
                      {"family": family, "gguf": stem, "weights": "as stored in the GGUF file"})
    summary[family]["gguf"] = {"file": stem + ".gguf", "bytes": os.path.getsize(os.path.join(gdir, stem + ".gguf"))}
    mf.log(f"  wrote gguf/{stem}.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(mf.REPO, "fixtures", "reference"))
    args = ap.parse_args()
    out_root = os.path.abspath(args.out)
    mf.setup_determinism()
    mf.N_EXPERTS = N_EXPERTS
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
    for family in ("deepseek_v2", "deepseek_v3"):
        model, state = run_family(family, out_root, vocab, tok_path, tokens, summary)
        run_gguf(family, out_root, model, state, tokens, tok_meta, summary)
    mf.dump_json(summary, os.path.join(out_root, "deepseek_summary.json"))


if __name__ == "__main__":
    main()
