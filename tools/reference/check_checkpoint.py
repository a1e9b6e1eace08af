#!/usr/bin/env python3
"""Check that transformers loads a checkpoint skymoe wrote and computes the same logits.

Usage: python3 tools/reference/check_checkpoint.py CHECKPOINT_DIR [--skymoe target/release/skymoe]
       [--tokens 5,17,99,3,250,7] [--tol 1e-4]

Runs `skymoe logits` and transformers' AutoModelForCausalLM (eager attention, float32) on the
same tokens and prints the largest absolute logit difference; exits 1 above the tolerance.
Works for the llama, mixtral and qwen2_moe layouts, and for Skywork-MoE checkpoints written by
skymoe, which carry transformers remote code (tools/reference/skywork_remote/, loaded with
trust_remote_code=True).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--skymoe", default="target/release/skymoe")
    p.add_argument("--tokens", default="5,17,99,3,250,7")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()
    ids = [int(t) for t in a.tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.safetensors")
        subprocess.run([a.skymoe, "logits", "--model", a.checkpoint, "--tokens", a.tokens, "--out", out], check=True)
        ours = load_file(out)["logits"]
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, attn_implementation="eager", trust_remote_code=True).float().eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    d = (ref - ours).abs().max().item()
    print(f"{type(model).__name__}: max |Δlogit| = {d:.3e} (tolerance {a.tol:g})")
    return 0 if d <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
