#!/usr/bin/env python3
"""lm-evaluation-harness through `skymoe serve` against transformers on the same checkpoint.

Run by hand (lm-eval pulls in torch and datasets; not part of CI):

  pip install lm-eval==0.4.13 tenacity==9.2.1 accelerate==1.16.0
  cargo build --release -p skymoe
  python3 tools/api_tests/lm_eval_check.py [--model DIR]

Two tasks defined from local files (no hub downloads; HF_HUB_OFFLINE=1):
  skymoe_mc   multiple choice over lm_eval/mc.jsonl (loglikelihood of each choice, accuracy)
  skymoe_ppl  loglikelihood_rolling over lm_eval/text.jsonl (perplexity)
each run with `--model local-completions` against a `skymoe serve` started on a free port and
with `--model hf` (float32, CPU). The per-sample log-likelihoods must agree within 1e-3 and
the accuracies exactly. The default checkpoint is the tiny Mixtral fixture (random weights:
the numbers say nothing about quality, only that both paths compute the same thing).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MAX_LENGTH = 128

MC_YAML = """task: skymoe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

PPL_YAML = """task: skymoe_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval(model: str, model_args: str, tasks_dir: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", "skymoe_mc,skymoe_ppl", "--include_path", str(tasks_dir),
           "--log_samples", "--output_path", str(out), "--batch_size", "1"]
    if model == "hf":
        cmd += ["--device", "cpu"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def samples(out: Path, task: str) -> list[dict]:
    files = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    if len(files) != 1:
        raise SystemExit(f"expected one samples file for {task} under {out}, found {files}")
    with open(files[0]) as f:
        return sorted((json.loads(l) for l in f), key=lambda d: d["doc_id"])


def loglikelihoods(rows: list[dict]) -> list[float]:
    out = []
    for r in rows:
        for resp in r["resps"]:
            v = resp[0]
            out.append(float(v[0] if isinstance(v, (list, tuple)) else v))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "fixtures/reference/mixtral"))
    ap.add_argument("--bin", default=str(ROOT / "target/release/skymoe"))
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="lm-eval-check-"))
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "skymoe_mc.yaml").write_text(MC_YAML.format(data=HERE / "lm_eval/mc.jsonl"))
    (tasks / "skymoe_ppl.yaml").write_text(PPL_YAML.format(data=HERE / "lm_eval/text.jsonl"))

    port = free_port()
    server = subprocess.Popen([args.bin, "serve", "--model", args.model, "--port", str(port),
                               "--served-model-name", "served"])
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        api_args = (f"model=served,base_url=http://127.0.0.1:{port}/v1/completions,"
                    f"tokenizer={args.model},tokenizer_backend=huggingface,num_concurrent=1,"
                    f"max_retries=1,max_length={MAX_LENGTH},custom_prefix_token_id=0")
        run_lm_eval("local-completions", api_args, tasks, work / "api")
    finally:
        server.terminate()
        server.wait(timeout=30)
    run_lm_eval("hf", f"pretrained={args.model},dtype=float32,max_length={MAX_LENGTH},prefix_token_id=0", tasks,
                work / "hf")

    worst = 0.0
    ok = True
    for task in ("skymoe_mc", "skymoe_ppl"):
        a = loglikelihoods(samples(work / "api", task))
        b = loglikelihoods(samples(work / "hf", task))
        if len(a) != len(b):
            print(f"{task}: {len(a)} vs {len(b)} log-likelihoods")
            ok = False
            continue
        d = max(abs(x - y) for x, y in zip(a, b))
        worst = max(worst, d)
        print(f"{task}: {len(a)} log-likelihoods, max |difference| {d:.2e}")
        ok &= d <= 1e-3
    acc = []
    for run in ("api", "hf"):
        files = glob.glob(str(work / run / "**" / "results_*.json"), recursive=True)
        res = json.loads(Path(files[0]).read_text())["results"]
        acc.append(res["skymoe_mc"]["acc,none"])
        print(f"{run}: acc {res['skymoe_mc']['acc,none']:.4f}, word_perplexity "
              f"{res['skymoe_ppl']['word_perplexity,none']:.4f}")
    ok &= acc[0] == acc[1]
    print("PASS" if ok else "FAIL", f"(largest |Δ loglikelihood| {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
