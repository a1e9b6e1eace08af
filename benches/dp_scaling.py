#!/usr/bin/env python3
"""Data-parallel scaling on this machine: skymoe training tokens/s with 1 process and with
N processes under mpirun (the same global batch: one process accumulates N micro-batches,
N processes take one each), the bytes each rank hands to the gradient all-reduce per step,
and the planner's prediction for both runs from a calibrated machine file.

Usage: cargo build --release --features mpi && python3 benches/dp_scaling.py [--np 2] [--steps 12]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKYMOE = os.path.join(ROOT, "target", "release", "skymoe")

CONFIG = """
[model]
arch = "mixtral"
hidden_size = 256
intermediate_size = 512
layers = 4
heads = 8
kv_heads = 4
experts = 8
top_k = 2
max_position_embeddings = 1024
[router]
capacity_factor = 0.0
[aux]
balance = "none"
[data]
inputs = ["{data}"]
vocab_size = 1024
seq_len = 256
val_fraction = 0.01
[optim]
lr = 0.001
warmup_steps = 0
[train]
steps = {steps}
batch_size = {batch}
grad_accum = {accum}
eval_every = 0
eval_batches = 1
checkpoint_every = 0
out_dir = "{out}"
"""


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def train(tmp, name, np_, batch, accum, steps):
    out = os.path.join(tmp, name)
    cfg = os.path.join(tmp, name + ".toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(data=os.path.join(ROOT, "data", "shakespeare"), steps=steps,
                              batch=batch, accum=accum, out=out))
    cmd = [SKYMOE, "train", "--config", cfg, "--quiet"]
    if np_ > 1:
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd = ["mpirun", "-np", str(np_), "--oversubscribe"] + cmd + ["--parallel", f"dp={np_}"]
    else:
        env = dict(os.environ)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if r["kind"] == "train"][2:]
    ckpt = sorted(os.listdir(os.path.join(out, "checkpoints")))[-1]
    return (statistics.median(r["tokens_per_s"] for r in rows),
            statistics.median(r.get("sync_bytes", 0) for r in rows),
            os.path.join(out, "checkpoints", ckpt))


def plan(model, machine, np_, tokens, seq, micro):
    out = subprocess.run([SKYMOE, "plan", "--model", model, "--cluster", machine, "--nodes", "1",
                          "--gpus-per-node", str(np_), "--global-batch-tokens", str(tokens),
                          "--seq-len", str(seq), "--micro-batch", str(micro), "--precision", "fp32",
                          "--capacity-factor", "0", "--layout", f"dp={np_},zero=0", "--json"],
                         check=True, capture_output=True, text=True).stdout
    p = json.loads(out)[0]
    return p["step_time_s"], p["tokens_per_gpu_s"] * np_, p["traffic"]["dp_gib"] + p["traffic"]["expert_dp_gib"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    batch, seq = 2, 256
    tokens = a.np * batch * seq
    with tempfile.TemporaryDirectory() as tmp:
        machine = os.path.join(tmp, "machine.json")
        subprocess.run([SKYMOE, "plan", "--calibrate", "--out", machine], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one, _, ckpt = train(tmp, "np1", 1, batch, a.np, a.steps)
        many, sync, _ = train(tmp, f"np{a.np}", a.np, batch, 1, a.steps)
        p1 = plan(ckpt, machine, 1, tokens, seq, batch)
        pn = plan(ckpt, machine, a.np, tokens, seq, batch)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}")
    print(f"model: mixtral hidden 256, 4 layers, 8 experts top-2; global batch {a.np} x {batch} x {seq} tokens; f32; median of steps 3-{a.steps}")
    print("| processes | tokens/s measured | tokens/s planned | all-reduce payload per rank per step | planned DP traffic per rank per step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| 1 | {one:.0f} | {p1[1]:.0f} | - | - |")
    print(f"| {a.np} (dp={a.np}) | {many:.0f} | {pn[1]:.0f} | {sync / 2**20:.1f} MiB | {pn[2] * 1024:.1f} MiB |")
    print(f"speed-up x{many / one:.2f}")


if __name__ == "__main__":
    main()
