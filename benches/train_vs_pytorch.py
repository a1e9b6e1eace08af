#!/usr/bin/env python3
"""Training throughput: skymoe against PyTorch (transformers MixtralForCausalLM, eager and
`torch.compile` with the default inductor backend) on the same model configuration, batch,
sequence length and optimiser, on this machine, one after the other. Prints a table and the
ratios; records nothing by itself (copy the table into BENCHMARKS.md).

Usage: python3 benches/train_vs_pytorch.py [--skymoe target/release/skymoe] [--steps 8] [--rounds 1]
       [--hidden 256 --layers 4 --experts 8 --top-k 2 --ffn 512 --heads 8 --kv-heads 4
        --vocab 1024 --seq-len 256 --batch 4] [--threads N] [--micro-batches M] [--no-compile]

Each PyTorch mode runs in a process of its own (so that each peak RSS is its own). The compiled
model's first two steps compile (forward and backward graphs; the optimiser step stays eager)
and are timed apart as the compile time, not counted in its tokens/s.

skymoe runs twice: the batch as one micro-batch, and the same batch as M micro-batches of
batch/M sequences (grad_accum = M, default 2) that run concurrently, one per thread. Both take
one optimiser step per batch of the same sequences; the mean cross-entropy over equal-length
micro-batches is the mean over the batch, so the gradients are the same up to rounding.

Both sides: f32 on CPU, dropless routing, AdamW (lr 1e-3, betas 0.9/0.95, wd 0.1), gradient
clipping at 1.0, no auxiliary loss term in the timing difference that matters (skymoe adds its
Skywork aux loss; transformers adds none when router_aux_loss_coef = 0). The first step of each
side is a warm-up and is not timed; the median of the remaining step times is reported. With
--rounds R every engine runs R times, the engines interleaved (the order reversed every other
round), and each engine's timed steps are pooled over its runs; the compile time is the median.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_pytorch(a, compiled=False):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=max(1024, a.seq_len), tie_word_embeddings=True,
        router_aux_loss_coef=0.0, output_router_logits=False,
    )
    cfg._attn_implementation = "eager"
    model = MixtralForCausalLM(cfg).float().train()
    forward = torch.compile(model) if compiled else model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=g)
        t0 = time.perf_counter()
        out = forward(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    warm = 2 if compiled else 1
    return times[warm:], rss, sum(times[:warm])


def run_pytorch_child(a, mode):
    """Run one PyTorch mode in a child process; returns (step times, peak RSS MiB, warm-up s)."""
    args = [sys.executable, os.path.abspath(__file__), "--pytorch-only", mode]
    for k in ("steps", "hidden", "layers", "experts", "top_k", "ffn", "heads", "kv_heads", "vocab",
              "seq_len", "batch", "threads"):
        args += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["times"], r["rss"], r["warmup"]


def run_skymoe(a, corpus_dir, micro_batches=1):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cfg = f"""
[model]
arch = "mixtral"
hidden_size = {a.hidden}
intermediate_size = {a.ffn}
layers = {a.layers}
heads = {a.heads}
kv_heads = {a.kv_heads}
experts = {a.experts}
top_k = {a.top_k}
max_position_embeddings = {max(1024, a.seq_len)}
[router]
capacity_factor = 0.0
[aux]
balance = "none"
[data]
inputs = ["{corpus_dir}"]
vocab_size = {a.vocab}
seq_len = {a.seq_len}
val_fraction = 0.01
[optim]
lr = 0.001
warmup_steps = 0
grad_clip = 1.0
[train]
steps = {a.steps}
batch_size = {a.batch // micro_batches}
grad_accum = {micro_batches}
eval_every = 0
eval_batches = 1
checkpoint_every = 0
out_dir = "{run_dir}"
"""
        path = os.path.join(tmp, "run.toml")
        with open(path, "w") as f:
            f.write(cfg)
        env = dict(os.environ)
        if a.threads:
            env["RAYON_NUM_THREADS"] = str(a.threads)
        child = subprocess.Popen([a.skymoe, "train", "--config", path, "--quiet"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"skymoe train failed (status {status})")
        steps = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
        steps = [s for s in steps if s["kind"] == "train"]
        tokens = a.batch * a.seq_len
        times = [tokens / s["tokens_per_s"] for s in steps]
        return times[1:], usage.ru_maxrss / 1024.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skymoe", default="target/release/skymoe")
    p.add_argument("--corpus", default="fixtures/corpus")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, interleaved; step times pooled")
    p.add_argument("--pytorch-only", choices=["eager", "compile"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 4:
        p.error("--steps must be at least 4 (the compiled run's first two steps compile)")
    if a.pytorch_only:
        times, rss, warm = run_pytorch(a, compiled=a.pytorch_only == "compile")
        print(json.dumps({"times": times, "rss": rss, "warmup": warm}))
        return 0
    if a.micro_batches < 1 or a.batch % a.micro_batches:
        p.error("--micro-batches must divide --batch")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    tokens = a.batch * a.seq_len
    corpus = os.path.abspath(a.corpus)
    engines = {
        "one": lambda: run_skymoe(a, corpus) + (0.0,),
        "split": lambda: run_skymoe(a, corpus, a.micro_batches) + (0.0,),
        "eager": lambda: run_pytorch_child(a, "eager"),
    }
    if not a.no_compile:
        engines["compile"] = lambda: run_pytorch_child(a, "compile")
    # Every engine once per round, the order reversed every other round, so that a machine
    # whose speed drifts over minutes weighs on all of them alike; each engine's step times
    # are pooled over the rounds.
    runs = {k: ([], [], []) for k in engines}
    for r in range(a.rounds):
        for key in list(engines) if r % 2 == 0 else list(reversed(list(engines))):
            times, rss, warm = engines[key]()
            runs[key][0].extend(times)
            runs[key][1].append(rss)
            runs[key][2].append(warm)
    rate = lambda key: tokens / statistics.median(runs[key][0])
    peak = lambda key: max(runs[key][1])
    one, one_rss = rate("one"), peak("one")
    sk, split_rss = rate("split"), peak("split")
    pt, pt_rss = rate("eager"), peak("eager")
    if not a.no_compile:
        pc, pc_rss, pc_compile = rate("compile"), peak("compile"), statistics.median(runs["compile"][2])
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; date {time.strftime('%Y-%m-%d')}")
    print(f"model: mixtral hidden {a.hidden}, {a.layers} layers, {a.experts} experts top-{a.top_k}, ffn {a.ffn}, "
          f"heads {a.heads}/{a.kv_heads}, vocab {a.vocab}; batch {a.batch} x seq {a.seq_len}; {a.steps} steps (first untimed), {a.rounds} round(s)")
    print("| engine | tokens/s (median) | peak RSS MiB |")
    print("| --- | --- | --- |")
    m = a.micro_batches
    print(f"| skymoe, 1 micro-batch of {a.batch} | {one:.0f} | {one_rss:.0f} |")
    print(f"| skymoe, {m} concurrent micro-batches of {a.batch // m} | {sk:.0f} | {split_rss:.0f} |")
    import torch

    print(f"| PyTorch {torch.__version__} eager, batch {a.batch} | {pt:.0f} | {pt_rss:.0f} |")
    if not a.no_compile:
        print(f"| PyTorch {torch.__version__} torch.compile (inductor), batch {a.batch} | {pc:.0f} | {pc_rss:.0f} |")
    print(f"ratio skymoe / PyTorch eager: {sk / pt:.2f}x ({m} micro-batches), {one / pt:.2f}x (1 micro-batch)")
    if not a.no_compile:
        print(f"ratio skymoe / torch.compile: {sk / pc:.2f}x ({m} micro-batches), {one / pc:.2f}x (1 micro-batch); "
              f"compile (first two steps) {pc_compile:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
