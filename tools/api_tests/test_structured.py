#!/usr/bin/env python3
"""Structured outputs and tool calling through the official `openai` client.

Starts `skymoe serve` (target/release/skymoe, or $SKYMOE_BIN) on a copy of the tiny Mixtral
fixture whose context is raised to 4096 positions (a tool prompt does not fit its 256 in a
320-token byte-level vocabulary; the weights are random, so RoPE at any position is as good),
then checks that outputs of the random model always parse and validate:
`client.chat.completions.parse` with a pydantic model (`response_format` `json_schema`,
strict), tools with `tool_choice` `required` and a named function (arguments parsed into
pydantic models by the client), and streamed tool calls assembled from their deltas.

Usage: pip install -r tools/api_tests/requirements.txt
       python3 -m pytest -q tools/api_tests/test_structured.py   (or run this file)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "fixtures/reference/mixtral"
MODEL = "tiny-mixtral"


class Person(BaseModel):
    name: Annotated[str, Field(max_length=8)]
    age: Annotated[int, Field(ge=0, le=150)]
    role: Literal["admin", "user", "guest"]
    admin: bool


class GetWeather(BaseModel):
    """Weather in a city."""

    city: Annotated[str, Field(max_length=10)]
    unit: Literal["c", "f"]


class Add(BaseModel):
    """Add two integers."""

    a: Annotated[int, Field(ge=-100, le=100)]
    b: Annotated[int, Field(ge=-100, le=100)]


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Add)]
MODELS = {"GetWeather": GetWeather, "Add": Add}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_copy(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE.iterdir():
        if f.name == "tokenizer.json" or f.name.startswith("model"):
            shutil.copy(f, dest / f.name)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (dest / "config.json").write_text(json.dumps(config))
    return dest


class Server:
    def __init__(self, model_dir: Path) -> None:
        binary = os.environ.get("SKYMOE_BIN", str(ROOT / "target/release/skymoe"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", str(model_dir), "--port", str(self.port),
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = Server(model_copy(tmp_path_factory.mktemp("model")))
    yield openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    server.stop()


def sampled(seed: int, **kw):
    return dict(model=MODEL, temperature=1.0, seed=seed, **kw)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        messages=[{"role": "user", "content": "A person, please."}],
        response_format=Person, max_tokens=300, n=3, **sampled(1),
    )
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert isinstance(c.message.parsed, Person), c.message.content
        assert Person.model_validate_json(c.message.content) == c.message.parsed


def test_json_object(client):
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "JSON!"}], response_format={"type": "json_object"},
        max_tokens=1500, n=4, **sampled(3),
    )
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 2
    for c in done:
        assert isinstance(json.loads(c.message.content), dict)


def test_tool_choice_required(client):
    r = client.chat.completions.parse(
        messages=[{"role": "user", "content": "Weather in Paris, and 2 + 3?"}],
        tools=TOOLS, tool_choice="required", max_tokens=600, n=2, **sampled(5),
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        assert c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            model = MODELS[call.function.name]
            assert isinstance(call.function.parsed_arguments, model)
            model.model_validate_json(call.function.arguments)


def test_named_tool_choice(client):
    r = client.chat.completions.parse(
        messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "Add"}},
        max_tokens=300, **sampled(7),
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "Add"
    assert isinstance(call.function.parsed_arguments, Add)


def test_streamed_tool_calls(client):
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", max_tokens=600, stream=True, **sampled(9),
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                if d.function and d.function.arguments:
                    calls[d.index]["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        MODELS[call["name"]].model_validate_json(call["arguments"])


def test_bad_schema_and_unknown_tool(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}},
        )
    assert e.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "Nope"}},
        )
    assert e.value.body["param"] == "tool_choice.function.name"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2)
    assert r.choices[0].message.content is not None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
