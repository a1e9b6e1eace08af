#!/usr/bin/env python3
"""Perplexity of one GGUF file in skymoe (served as stored, or dequantised to f32) and in
llama.cpp (llama-cpp-python), on the same token windows of a held-out text.

The windows: the text tokenised once by skymoe (no special tokens), cut into windows of
--window + 1 tokens; each engine predicts the window's last --window tokens from a fresh
context. Example (SmolLM2-135M quantised to Q4_K_M by llama.cpp's own quantiser):

    python3 benches/gguf_perplexity.py MODEL.gguf --text fixtures/corpus/macbeth-act1.txt
    python3 benches/gguf_perplexity.py MODEL.gguf --weights f32   # skymoe dequantised
"""

import argparse
import json
import pathlib
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKYMOE = ROOT / "target" / "release" / "skymoe"


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--text", default=str(ROOT / "fixtures/corpus/macbeth-act1.txt"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--weights", default="stored", help="skymoe's --weights (stored, f32, ...)")
    a = ap.parse_args()
    import llama_cpp

    text = pathlib.Path(a.text).read_text()
    ids = json.loads(subprocess.run([str(SKYMOE), "tokenizer", "encode", "--model", a.model, "--text", text,
                                     "--no-special"], check=True, capture_output=True, text=True).stdout)
    w = a.window
    wins = [ids[i * w:i * w + w + 1] for i in range(min(a.windows, (len(ids) - 1) // w))]
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=w + 8, n_batch=w + 8, logits_all=True, verbose=False)
    nll = {"skymoe": 0.0, "llama.cpp": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "logits.safetensors"
        for win in wins:
            subprocess.run([str(SKYMOE), "logits", "--model", a.model, "--tokens", ",".join(map(str, win[:-1])),
                            "--weights", a.weights, "--out", str(out)], check=True, capture_output=True)
            ours = log_softmax(load_file(str(out))["logits"].astype(np.float64))
            llm.reset()
            llm.eval(win[:-1])
            theirs = log_softmax(np.array(llm.scores[:w], dtype=np.float64))
            for name, lp in (("skymoe", ours), ("llama.cpp", theirs)):
                nll[name] -= sum(lp[i, win[i + 1]] for i in range(w))
    n = len(wins) * w
    ps, pl = np.exp(nll["skymoe"] / n), np.exp(nll["llama.cpp"] / n)
    print(json.dumps({"model": a.model, "windows": len(wins), "window": w, "skymoe_weights": a.weights,
                      "perplexity_skymoe": ps, "perplexity_llama_cpp": pl, "ratio": ps / pl}))


if __name__ == "__main__":
    main()
