"""Small checkpoints in the layouts the Skywork models are published in, with reference outputs.

Writes under fixtures/reference/skywork_files/:

  skywork_13b/        Skywork-13B's layout: `SkyworkForCausalLM` / model_type `skywork` with no
                      `num_experts` (a dense Llama block), bf16 weights in two PyTorch `.bin`
                      shards + `pytorch_model.bin.index.json`, SentencePiece `tokenizer.model`.
                      Reference: transformers' LlamaForCausalLM on the same weights.
  skywork_moe_base/   Skywork-MoE-Base's layout: every published config key, bf16 `.bin` shards,
                      `tokenizer.model`. Reference: tools/reference/skywork_moe_ref.py.
  skywork_moe_fp8/    Skywork-MoE-Base-FP8's layout: the same model with q/k/v/o and every
                      expert's w1/w2/w3 in F8_E4M3 with a per-tensor `weight_scale` and an
                      `act_scale` (scalars), gate/norms/embeddings/LM head bf16, two safetensors
                      shards + index, `quantization_config` fp8 / dynamic. Reference: the
                      dequantised weights through skywork_moe_ref.py.

Each directory has reference.safetensors: `tokens` [12], `logits` [12, V] (float32 forward of
the weights exactly as stored, bf16 and fp8 widened exactly), `loss`, and for the bf16 models
`grad.<name>` for every tensor (float64 forward/backward, cast to float32).

The tokenizer is the SentencePiece BPE model of fixtures/reference/sentencepiece/bpe/ (written
by make_tokenizer_fixtures.py; run that first). Vocabulary 515 (not a multiple of 8, like the
real 65519 / 65532): the tokenizer's 512 pieces plus 3 unused embedding rows.

Usage: python3 tools/reference/make_skywork_fixtures.py [--out fixtures/reference/skywork_files]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import json
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
import skywork_moe_ref as sky  # noqa: E402

VOCAB = 515
HIDDEN = 64
N_HEADS = 4  # MHA, as both published models (36 heads, 36 kv heads)
N_LAYERS = 2
FF = 64  # Skywork: intermediate_size is the dense FFN and every expert alike
N_EXPERTS = 4
MAX_POS = 256
TOKENS = [1, 45, 319, 17, 290, 128, 256, 3, 511, 77, 2, 514]  # <s>=1, </s>=2, 514 past the tokenizer
FP8_MAX = 448.0
SEEDS = {"skywork_13b": 7000, "skywork_moe_base": 7100}

SPM_DIR = os.path.join(mf.REPO, "fixtures", "reference", "sentencepiece", "bpe")


def skywork_13b_config() -> dict:
    """config.json as Skywork-13B publishes it (remote code, transformers 4.33)."""
    return {
        "architectures": ["SkyworkForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_skywork.SkyworkConfig",
            "AutoModelForCausalLM": "modeling_skywork.SkyworkForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.01,
        "intermediate_size": FF,
        "max_position_embeddings": MAX_POS,
        "model_type": "skywork",
        "num_attention_heads": N_HEADS,
        "num_hidden_layers": N_LAYERS,
        "num_key_value_heads": N_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "use_flash_attention_2": False,
        "vocab_size": VOCAB,
    }


def skywork_moe_base_config() -> dict:
    """config.json with every key Skywork-MoE-Base publishes."""
    return {
        "architectures": ["SkyworkForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_skywork_moe.SkyworkMoeConfig",
            "AutoModelForCausalLM": "modeling_skywork_moe.SkyworkForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.01,
        "intermediate_size": FF,
        "max_position_embeddings": MAX_POS,
        "model_type": "skywork_moe",
        "moe_2layer_gate": False,
        "moe_expert_interval": 1,
        "moe_feature_no_mul_topk": True,
        "moe_gate_norm_std": 1.0,
        "moe_use_logits_norm": True,
        "moe_use_skywork_gating": False,
        "num_attention_heads": N_HEADS,
        "num_experts": [N_EXPERTS],
        "num_hidden_layers": N_LAYERS,
        "num_key_value_heads": N_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000,
        "rotary_percent": 1.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def tokenizer_config() -> dict:
    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": True,
        "model_max_length": MAX_POS,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    }


def write_tokenizer(d: str) -> None:
    src = os.path.join(SPM_DIR, "tokenizer.model")
    if not os.path.exists(src):
        raise SystemExit(f"{src} is missing: run tools/reference/make_tokenizer_fixtures.py first")
    shutil.copy(src, os.path.join(d, "tokenizer.model"))
    write_json(tokenizer_config(), os.path.join(d, "tokenizer_config.json"))
    write_json({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
               os.path.join(d, "special_tokens_map.json"))


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def fresh_dir(d: str) -> None:
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)


def shard_names(names: list[str], n_shards: int) -> list[list[str]]:
    """Spread tensors over shards so that a layer's tensors straddle files, as on the hub."""
    return [names[k::n_shards] for k in range(n_shards)]


def write_bin_shards(d: str, state: dict[str, torch.Tensor], n_shards: int) -> None:
    """`pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json` (the hub's format)."""
    names = sorted(state)
    weight_map = {}
    for k, group in enumerate(shard_names(names, n_shards)):
        fn = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({n: state[n].clone().contiguous() for n in group}, os.path.join(d, fn))
        weight_map.update({n: fn for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
               os.path.join(d, "pytorch_model.bin.index.json"))


def write_safetensors_shards(d: str, state: dict[str, torch.Tensor], n_shards: int) -> None:
    names = sorted(state)
    weight_map = {}
    for k, group in enumerate(shard_names(names, n_shards)):
        fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in group}, os.path.join(d, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
               os.path.join(d, "model.safetensors.index.json"))


def bf16_round(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])


# ----------------------------------------------------------------------------- Skywork-13B


def make_skywork_13b(out: str, tokens: torch.Tensor) -> dict:
    d = os.path.join(out, "skywork_13b")
    fresh_dir(d)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, max_position_embeddings=MAX_POS,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(SEEDS["skywork_13b"])
    model = LlamaForCausalLM(cfg)
    mf.init_params(model, SEEDS["skywork_13b"])
    bf16_round(model)
    model.eval()
    state = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    write_bin_shards(d, state, 2)
    write_json(skywork_13b_config(), os.path.join(d, "config.json"))
    write_tokenizer(d)
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]
    m64 = copy.deepcopy(model).to(torch.float64)
    loss64 = ce(m64(tokens[None]).logits[0], tokens)
    loss64.backward()
    grads = {n: p.grad.detach() for n, p in m64.named_parameters()}
    mf.save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, ce(logits, tokens).item(), grads,
                      {"layout": "skywork_13b", "reference": "transformers LlamaForCausalLM",
                       "weights": "bf16 as stored, widened to float32", "loss_f64": repr(loss64.item())})
    return {"loss": ce(logits, tokens).item(), "max_abs_logit": logits.abs().max().item()}


# ----------------------------------------------------------------------------- Skywork-MoE


def build_moe(tokens: torch.Tensor):
    cfg_json = skywork_moe_base_config()
    cfg = sky.SkyworkMoeConfig.from_dict(cfg_json)
    for attempt in range(mf.MAX_ATTEMPTS):
        seed = SEEDS["skywork_moe_base"] + attempt
        torch.manual_seed(seed)
        model = sky.SkyworkForCausalLM(cfg)
        mf.init_params(model, seed)
        bf16_round(model)
        model.eval()
        with torch.no_grad():
            model(tokens)
        ok, summary = mf.routing_summary(mf.sky_routing(model), cfg.num_experts)
        # The FP8 copy of these weights must route robustly too (f16 KV caches and fp8 products
        # move logits by ~1e-4).
        fp8 = fp8_model(cfg_json, dequantized(model.checkpoint_state())[1])
        with torch.no_grad():
            fp8(tokens)
        ok8, summary8 = mf.routing_summary(mf.sky_routing(fp8), cfg.num_experts)
        if ok and ok8 and min(summary["min_selection_margin"], summary8["min_selection_margin"]) >= 2e-3:
            return cfg_json, model, seed, summary
    raise RuntimeError("no seed with acceptable routing")


def make_skywork_moe_base(out: str, tokens: torch.Tensor):
    d = os.path.join(out, "skywork_moe_base")
    fresh_dir(d)
    cfg_json, model, seed, routing = build_moe(tokens)
    state = {n: t.to(torch.bfloat16) for n, t in model.checkpoint_state().items()}
    write_bin_shards(d, state, 3)
    write_json(cfg_json, os.path.join(d, "config.json"))
    write_tokenizer(d)
    with torch.no_grad():
        logits = model(tokens)
    m64 = copy.deepcopy(model).to(torch.float64)
    loss64 = ce(m64(tokens), tokens)
    loss64.backward()
    assert mf.same_routing(mf.sky_routing(model), mf.sky_routing(m64)), "f32/f64 routing differs"
    grads = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for n, p in m64.named_parameters()}
    mf.save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, ce(logits, tokens).item(), grads,
                      {"layout": "skywork_moe_base", "reference": "tools/reference/skywork_moe_ref.py",
                       "seed": seed, "weights": "bf16 as stored, widened to float32",
                       "loss_f64": repr(loss64.item())})
    return model, state, {"seed": seed, "loss": ce(logits, tokens).item(),
                          "min_selection_margin": routing["min_selection_margin"]}


def is_fp8_tensor(name: str) -> bool:
    return name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                          "w1.weight", "w2.weight", "w3.weight"))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3 as vLLM's Fp8 layout: scale = amax / 448, q = w / scale."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().max() / FP8_MAX).clamp(min=1e-12)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(())


def dequantized(bf16_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The FP8 layout's tensors as stored, and the same widened to float32."""
    stored: dict[str, torch.Tensor] = {}
    dequant: dict[str, torch.Tensor] = {}
    for n, t in bf16_state.items():
        if is_fp8_tensor(n):
            q, s = quantize_fp8(t)
            stored[n] = q
            stored[n + "_scale"] = s
            # Activation scales as a static calibration would store them; unused under dynamic.
            stored[n.replace(".weight", ".act_scale")] = torch.tensor(0.05, dtype=torch.float32)
            dequant[n] = q.to(torch.float32) * s
        else:
            stored[n] = t.to(torch.bfloat16)
            dequant[n] = t.to(torch.bfloat16).to(torch.float32)
    return stored, dequant


def fp8_model(cfg_json: dict, dequant: dict[str, torch.Tensor]) -> sky.SkyworkForCausalLM:
    model = sky.SkyworkForCausalLM(sky.SkyworkMoeConfig.from_dict(cfg_json))
    model.load_state_dict(dequant)
    return model.eval()


def make_skywork_moe_fp8(out: str, tokens: torch.Tensor, bf16_state: dict[str, torch.Tensor]) -> dict:
    d = os.path.join(out, "skywork_moe_fp8")
    fresh_dir(d)
    stored, dequant = dequantized(bf16_state)
    write_safetensors_shards(d, stored, 2)
    cfg_json = skywork_moe_base_config()
    cfg_json["quantization_config"] = {"activation_scheme": "dynamic", "quant_method": "fp8"}
    write_json(cfg_json, os.path.join(d, "config.json"))
    write_tokenizer(d)
    model = fp8_model(cfg_json, dequant)
    with torch.no_grad():
        logits = model(tokens)
    ok, routing = mf.routing_summary(mf.sky_routing(model), N_EXPERTS)
    assert routing["min_selection_margin"] >= 2e-3, routing["min_selection_margin"]
    mf.save_reference(os.path.join(d, "reference.safetensors"), tokens, logits, ce(logits, tokens).item(), None,
                      {"layout": "skywork_moe_fp8", "reference": "tools/reference/skywork_moe_ref.py",
                       "weights": "F8_E4M3 x weight_scale (per tensor), bf16 elsewhere, widened to float32"})
    return {"loss": ce(logits, tokens).item(), "min_selection_margin": routing["min_selection_margin"],
            "fp8_tensors": sum(is_fp8_tensor(n) for n in bf16_state)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(mf.REPO, "fixtures", "reference", "skywork_files"))
    a = p.parse_args()
    mf.setup_determinism()
    os.makedirs(a.out, exist_ok=True)
    tokens = torch.tensor(TOKENS, dtype=torch.int64)
    summary = {"skywork_13b": make_skywork_13b(a.out, tokens)}
    _, bf16_state, summary["skywork_moe_base"] = make_skywork_moe_base(a.out, tokens)
    summary["skywork_moe_fp8"] = make_skywork_moe_fp8(a.out, tokens, bf16_state)
    summary["versions"] = {"torch": torch.__version__, "transformers": mf.transformers.__version__}
    write_json(summary, os.path.join(a.out, "summary.json"))
    for k, v in summary.items():
        print(k, v)


if __name__ == "__main__":
    main()
