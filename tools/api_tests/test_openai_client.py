#!/usr/bin/env python3
"""The OpenAI-compatible server through the official `openai` client.

Starts `skymoe serve` (target/release/skymoe, or $SKYMOE_BIN) on a free loopback port with
the tiny Mixtral fixture (random weights: the tests check shapes, counts and values, not
text quality) and exercises completions (string, list, token ids, echo + logprobs against
transformers' values, n, logit_bias, streaming), chat (logprobs streamed and not, n),
/tokenize and /detokenize, and the 400s for bad values.

Usage: pip install -r tools/api_tests/requirements.txt
       python3 -m pytest -q tools/api_tests/test_openai_client.py   (or run this file)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "fixtures/reference/mixtral"
REFERENCE = ROOT / "fixtures/reference/logprobs/mixtral.json"
MODEL = "tiny-mixtral"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self) -> None:
        binary = os.environ.get("SKYMOE_BIN", str(ROOT / "target/release/skymoe"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", str(MODEL_DIR), "--port", str(self.port),
             "--served-model-name", MODEL],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"skymoe serve exited: {self.proc.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("skymoe serve did not start in 60 s")
            time.sleep(0.1)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def greedy(**kw):
    return dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_completion_prompt_forms(client, server):
    one = client.completions.create(prompt="The quick brown fox", max_tokens=5, **greedy())
    assert len(one.choices) == 1 and one.choices[0].index == 0
    assert one.usage.completion_tokens == 5
    other = client.completions.create(prompt="Once upon a time", max_tokens=5, **greedy())
    ids = server.post("/tokenize", {"model": MODEL, "prompt": "The quick brown fox"})[1]["tokens"]
    by_ids = client.completions.create(prompt=ids, max_tokens=5, **greedy())
    assert by_ids.choices[0].text == one.choices[0].text
    ids2 = server.post("/tokenize", {"model": MODEL, "prompt": "Once upon a time"})[1]["tokens"]
    for prompt in (["The quick brown fox", "Once upon a time"], [ids, ids2]):
        r = client.completions.create(prompt=prompt, max_tokens=5, n=2, **greedy())
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        texts = [c.text for c in r.choices]
        assert texts == [one.choices[0].text] * 2 + [other.choices[0].text] * 2
        assert r.usage.prompt_tokens == len(ids) + len(ids2)
        assert r.usage.completion_tokens == 20


def test_echo_logprobs_match_transformers(client):
    ref = json.loads(REFERENCE.read_text())
    for p in ref["prompts"]:
        r = client.completions.create(prompt=p["tokens"], max_tokens=0, echo=True, logprobs=5,
                                      model=MODEL)
        lp = r.choices[0].logprobs
        assert r.choices[0].finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(p["tokens"]) == len(lp.text_offset)
        for got, want in zip(lp.token_logprobs[1:], p["token_logprobs"][1:]):
            assert abs(got - want) <= 1e-4
        for got, want in zip(lp.top_logprobs[1:], p["top_logprobs"][1:]):
            best = sorted(got.values(), reverse=True)[0]
            assert abs(best - want[0][1]) <= 1e-4


def test_n_logit_bias_and_stream(client, server):
    forced = server.post("/detokenize", {"model": MODEL, "tokens": [42]})[1]["prompt"]
    r = client.completions.create(prompt="Hello", max_tokens=4, logit_bias={"42": 100},
                                  logprobs=1, **greedy())
    assert r.choices[0].text == forced * 4
    plain = client.completions.create(prompt="Hello", max_tokens=4, logprobs=1, **greedy())
    first = plain.choices[0].logprobs.tokens[0]
    banned = {str(i): -100 for i in range(320)
              if server.post("/detokenize", {"tokens": [i]})[1]["prompt"] == first}
    r = client.completions.create(prompt="Hello", max_tokens=4, logit_bias=banned, logprobs=1,
                                  **greedy())
    assert r.choices[0].logprobs.tokens[0] != first

    sampled = client.completions.create(prompt="Hello", max_tokens=8, n=3, temperature=1.0,
                                        seed=3, model=MODEL)
    assert len({c.text for c in sampled.choices}) > 1

    full = client.completions.create(prompt=["Hello", "The"], max_tokens=6, n=2, logprobs=2,
                                     echo=True, **greedy())
    text = {}
    lps = {}
    for chunk in client.completions.create(prompt=["Hello", "The"], max_tokens=6, n=2,
                                           logprobs=2, echo=True, stream=True, **greedy()):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.logprobs:
                lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    for c in full.choices:
        assert text[c.index] == c.text
        assert len(lps[c.index]) == len(c.logprobs.token_logprobs)
        for a, b in zip(lps[c.index], c.logprobs.token_logprobs):
            assert (a is None and b is None) or abs(a - b) < 1e-5


def test_chat_logprobs_and_n(client):
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(messages=msgs, max_tokens=5, n=2, logprobs=True,
                                       top_logprobs=3, **greedy())
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 5
        assert "".join(t.token for t in content) == c.message.content
        for t in content:
            assert len(t.top_logprobs) == 3
            assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6
            assert bytes(t.bytes) == t.token.encode()
    got = {0: [], 1: []}
    for chunk in client.chat.completions.create(messages=msgs, max_tokens=5, n=2,
                                                logprobs=True, top_logprobs=3, stream=True,
                                                **greedy()):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                got[c.index].extend(c.logprobs.content)
    for c in r.choices:
        assert [t.token for t in got[c.index]] == [t.token for t in c.logprobs.content]
    plain = client.chat.completions.create(messages=msgs, max_tokens=3, **greedy())
    assert plain.choices[0].logprobs is None


def test_tokenize_detokenize(server):
    st, v = server.post("/tokenize", {"model": MODEL, "prompt": "The quick brown fox",
                                      "return_token_strs": True})
    assert st == 200 and v["count"] == len(v["tokens"]) == len(v["token_strs"])
    assert v["max_model_len"] == 256
    st, d = server.post("/detokenize", {"model": MODEL, "tokens": v["tokens"]})
    assert st == 200 and d["prompt"].endswith("The quick brown fox")
    st, v = server.post("/tokenize", {"model": MODEL,
                                      "messages": [{"role": "user", "content": "Hi"}]})
    assert st == 200 and v["count"] > 3


@pytest.mark.parametrize(
    "kind,param,kwargs",
    [
        ("completions", "logprobs", dict(prompt="x", logprobs=21)),
        ("chat", "top_logprobs", dict(top_logprobs=2)),
        ("completions", "n", dict(prompt="x", n=1000, max_tokens=1)),
        ("completions", "logit_bias", dict(prompt="x", logit_bias={"abc": 1})),
        ("completions", "logit_bias", dict(prompt="x", logit_bias={"320": 1})),
        ("chat", "logit_bias", dict(logit_bias={"5": 101})),
        ("completions", "prompt", dict(prompt=[5] * 300, echo=True, logprobs=1, max_tokens=0)),
        ("completions", "prompt", dict(prompt=[])),
        ("completions", "suffix", dict(prompt="x", suffix="y")),
    ],
)
def test_bad_values_are_400(client, kind, param, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
        else:
            client.completions.create(model=MODEL, **kwargs)
    body = e.value.body
    err = body.get("error", body) if isinstance(body, dict) else {}
    assert err.get("param") == param, body
    # The server is still up.
    assert client.models.list().data[0].id == MODEL


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", __file__]))
