#!/usr/bin/env python3
"""Prefill saved by automatic prefix caching: runs `skymoe bench --scenario lm-eval` and
`--scenario chat` (each with caching off and on, alternating, on fresh engines) and prints a
Markdown table of the medians.

The model is a randomly initialised Mixtral-layout MoE written by transformers (hidden 256,
4 layers, 8 experts top-2, expert FFN 512, 8 heads / 4 kv heads, 1024 positions) with the
Mixtral fixture's 320-token tokenizer; the weights do not matter for the time a forward pass
takes. Needs `pip install torch transformers`.

    cargo build --release && python3 benches/prefix_cache.py [--repeats 5] [--weights int8]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "target", "bench-models", "prefix-cache-moe")


def make_model(path):
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
    )
    MixtralForCausalLM(cfg).save_pretrained(path)
    shutil.copy(
        os.path.join(ROOT, "fixtures", "reference", "mixtral", "tokenizer.json"),
        os.path.join(path, "tokenizer.json"),
    )


def bench(args, scenario, extra):
    cmd = [
        os.path.join(ROOT, "target", "release", "skymoe"),
        "bench",
        "--model",
        MODEL,
        "--weights",
        args.weights,
        "--scenario",
        scenario,
        "--repeats",
        str(args.repeats),
    ] + extra
    print("$", " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), file=sys.stderr)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", default="int8")
    args = ap.parse_args()
    make_model(MODEL)
    runs = [
        ("lm-eval: 8 contexts of 400 tokens x 4 continuations of 16, 1 token each",
         bench(args, "lm-eval", ["--items", "8", "--context-tokens", "400", "--branches", "4",
                                 "--branch-tokens", "16", "--gen-tokens", "1"])),
        ("chat: 4 conversations x 6 turns, first prompt 200 tokens, +32 user tokens and 32 "
         "generated per turn",
         bench(args, "chat", ["--items", "4", "--context-tokens", "200", "--branches", "6",
                              "--branch-tokens", "32", "--gen-tokens", "32"])),
    ]
    print("| scenario | prompt tokens | computed, off | computed, on | cached, on | wall s, off | wall s, on | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs:
        off, on = r["caching_off"], r["caching_on"]
        print(f"| {name} | {off['prompt_tokens']} | {off['computed_prompt_tokens']} | "
              f"{on['computed_prompt_tokens']} | {on['cached_prompt_tokens']} | "
              f"{off['wall_s']:.3f} | {on['wall_s']:.3f} | {off['wall_s'] / on['wall_s']:.2f} |")
    print(json.dumps([r for _, r in runs]), file=sys.stderr)


if __name__ == "__main__":
    main()
