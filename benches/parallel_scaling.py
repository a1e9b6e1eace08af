#!/usr/bin/env python3
"""Multi-process training on this machine: skymoe training tokens/s with 1 process and with
N processes under mpirun for each strategy (data, tensor with experts split, EDP, pipeline,
data with ZeRO-1, experts spread over the data-parallel ranks), on the same global batch (one process accumulates N micro-batches; data
parallelism gives each process one; model parallelism splits every micro-batch's work), the
bytes each rank hands to the data-parallel all-reduce per step, and the planner's prediction
for every run from a calibrated machine file.

Usage: cargo build --release --features mpi && python3 benches/parallel_scaling.py [--np 2] [--steps 12]
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


def train(tmp, name, np_, batch, accum, steps, layout):
    out = os.path.join(tmp, name)
    cfg = os.path.join(tmp, name + ".toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(data=os.path.join(ROOT, "data", "shakespeare"), steps=steps,
                              batch=batch, accum=accum, out=out))
    cmd = [SKYMOE, "train", "--config", cfg, "--quiet"]
    if np_ > 1:
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd = ["mpirun", "-np", str(np_), "--oversubscribe"] + cmd + ["--parallel", layout]
    else:
        env = dict(os.environ)
    done = subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent = None
    for line in done.stderr.splitlines():
        if line.startswith("communication: rank 0 handed"):
            sent = float(line.split()[4]) * 2**20
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if r["kind"] == "train"][2:]
    ckpt = sorted(os.listdir(os.path.join(out, "checkpoints")))[-1]
    return (statistics.median(r["tokens_per_s"] for r in rows), sent,
            os.path.join(out, "checkpoints", ckpt))


def plan(model, machine, np_, tokens, seq, micro, layout):
    out = subprocess.run([SKYMOE, "plan", "--model", model, "--cluster", machine, "--nodes", "1",
                          "--gpus-per-node", str(np_), "--global-batch-tokens", str(tokens),
                          "--seq-len", str(seq), "--micro-batch", str(micro), "--precision", "fp32",
                          "--capacity-factor", "0", "--layout", layout, "--json"],
                         check=True, capture_output=True, text=True).stdout
    p = json.loads(out)[0]
    t = p["traffic"]
    return (p["step_time_s"], p["tokens_per_gpu_s"] * np_,
            t["dp_gib"] + t["expert_dp_gib"] + t["tp_gib"] + t["ep_intra_gib"] + t["ep_inter_gib"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    n = a.np
    batch, seq = 2, 256
    tokens = n * batch * seq
    layouts = [(f"dp={n}", 1), (f"dp={n},zero=1", 1), (f"ep={n},dp={n}", 1), (f"tp={n}", n),
               (f"edp={n}", n), (f"pp={n}", n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        machine = os.path.join(tmp, "machine.json")
        subprocess.run([SKYMOE, "plan", "--calibrate", "--out", machine], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one, _, ckpt = train(tmp, "np1", 1, batch, n, a.steps, None)
        p1 = plan(ckpt, machine, 1, tokens, seq, batch, "dp=1,zero=0")
        rows.append(("1 process", one, p1[1], None, None))
        for layout, accum in layouts:
            name = layout.replace(",", "-").replace("=", "")
            got, sync, _ = train(tmp, name, n, batch, accum, a.steps, layout)
            planned = plan(ckpt, machine, n, tokens, seq, batch, layout if "zero" in layout else layout + ",zero=0")
            rows.append((layout, got, planned[1], sync, planned[2]))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}")
    print(f"model: mixtral hidden 256, 4 layers, 8 experts top-2; global batch {n} x {batch} x {seq} tokens; f32; median of steps 3-{a.steps}")
    print("| run | tokens/s measured | tokens/s planned | speed-up | payload rank 0 hands to MPI per step | planned traffic per rank per step (DP, TP, EP) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, got, planned, sync, traffic in rows:
        s1 = "-" if sync is None else f"{sync / 2**20:.1f} MiB"
        s2 = "-" if traffic is None else f"{traffic * 1024:.1f} MiB"
        print(f"| {label} | {got:.0f} | {planned:.0f} | x{got / rows[0][1]:.2f} | {s1} | {s2} |")


if __name__ == "__main__":
    main()
