#!/usr/bin/env python3
"""Reference prompt log-probabilities for the OpenAI API tests.

Runs the tiny Mixtral fixture (fixtures/reference/mixtral, random weights) in transformers in
float32 over a few prompts tokenised with its tokenizer.json (BOS first) and writes, for every
prompt position after the first, the log-softmax of the previous position's logits at the
prompt token and the 5 most likely tokens with their log-probabilities:

  fixtures/reference/logprobs/mixtral.json
    {"model": "mixtral", "top": 5,
     "prompts": [{"text", "tokens": [ids], "token_logprobs": [null, lp, ...],
                  "top_logprobs": [null, [[id, lp] x 5], ...]}]}

The test `crates/skymoe-serve/tests/openai_api.rs` compares `echo=true, logprobs=5,
max_tokens=0` against these values. Deterministic: no sampling, weights read from the fixture.

Usage: python3 tools/reference/make_logprob_fixtures.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "fixtures/reference/mixtral"
OUT = ROOT / "fixtures/reference/logprobs/mixtral.json"
TOP = 5
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a king",
]


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    cfg = json.loads((MODEL / "config.json").read_text())
    bos = int(cfg["bos_token_id"])
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    prompts = []
    for text in PROMPTS:
        ids = [bos] + tok.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = F.log_softmax(logits, dim=-1)
        token_lps: list = [None]
        tops: list = [None]
        for i in range(1, len(ids)):
            row = lp[i - 1]
            token_lps.append(float(row[ids[i]]))
            values, idx = torch.topk(row, TOP)
            tops.append([[int(j), float(v)] for j, v in zip(idx, values)])
        prompts.append(
            {"text": text, "tokens": ids, "token_logprobs": token_lps, "top_logprobs": tops}
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"model": "mixtral", "top": TOP, "prompts": prompts}, indent=1) + "\n"
    )
    print(f"wrote {OUT.relative_to(ROOT)}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
