#!/usr/bin/env python3
"""Deterministic PyTorch-checkpoint fixtures for skymoe (written with torch.save).

Reads the safetensors fixtures written by make_fixtures.py and writes under
fixtures/reference/pytorch/:

  llama/    pytorch_model.bin (float32, `lm_head.weight` shares the storage of
            `model.embed_tokens.weight`, as tied checkpoints used to be saved),
            config.json, tokenizer.json copied from ../llama
  mixtral/  pytorch_model-0000k-of-00004.bin (bfloat16, the same tensors per shard as the
            safetensors shards) + pytorch_model.bin.index.json in the hub's format,
            config.json, tokenizer.json copied from ../mixtral
  odd.bin   views and dtypes: transposed and sliced views of one storage (non-contiguous,
            non-zero offsets, strided), the same tensor object under two names, a parameter,
            float16, bfloat16, a 0-d tensor, an empty tensor, int64 and bool tensors
  odd_expected.safetensors   the same tensors made contiguous (what a reader must return)
  odd_protocol4.bin          odd.bin's tensors saved with pickle protocol 4
  odd_deflated.bin           odd.bin with every zip entry deflate-compressed
  nested.bin                 {"state_dict": {"w": base, "h": half}, "epoch": 3, "lr": 0.001}
  legacy.bin                 a tensor saved with _use_new_zipfile_serialization=False

Usage: python3 tools/reference/make_pytorch_fixtures.py [--fixtures fixtures/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import shutil
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def load_dir(d: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """All tensors of a safetensors model directory, and its weight map when sharded."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(os.path.join(d, shard)))
        return tensors, weight_map
    return load_file(os.path.join(d, "model.safetensors")), None


def copy_side_files(src: str, dst: str) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def make_llama(fixtures: str, out: str) -> None:
    src = os.path.join(fixtures, "llama")
    dst = os.path.join(out, "llama")
    os.makedirs(dst, exist_ok=True)
    sd, _ = load_dir(src)
    sd = {k: sd[k] for k in sorted(sd)}
    # A tied checkpoint: the head is a second tensor over the embedding's storage.
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].detach()
    torch.save(sd, os.path.join(dst, "pytorch_model.bin"))
    copy_side_files(src, dst)


def make_mixtral(fixtures: str, out: str) -> None:
    src = os.path.join(fixtures, "mixtral")
    dst = os.path.join(out, "mixtral")
    os.makedirs(dst, exist_ok=True)
    sd, weight_map = load_dir(src)
    assert weight_map is not None, "the mixtral fixture is sharded"
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    new_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{k:05d}-of-{n:05d}.bin"
        part = {
            t: sd[t].to(torch.bfloat16)
            for t in sorted(weight_map)
            if weight_map[t] == shard
        }
        torch.save(part, os.path.join(dst, name))
        for t, v in part.items():
            new_map[t] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    copy_side_files(src, dst)


def odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3.0
    half = torch.randn(3, 5, generator=g).to(torch.float16)
    bf = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    d: dict[str, torch.Tensor] = {
        "base": base,
        "transposed": base.t(),
        "rows": base[1:3],
        "columns": base[:, 2:5],
        "strided": base[::2, ::3],
        "half": half,
        "half_transposed": half.t(),
        "bf16_permuted": bf.permute(2, 0, 1),
        "bf16_slice": bf[1, :, 1:3],
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "int64": torch.arange(5, dtype=torch.int64) - 2,
        "bool": torch.tensor([True, False, True]),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g), requires_grad=False),
    }
    # The same object under two names: the pickle refers back to the first tensor.
    d["alias"] = d["base"]
    return d


def make_odd(out: str) -> None:
    d = odd_tensors()
    torch.save(d, os.path.join(out, "odd.bin"))
    torch.save(d, os.path.join(out, "odd_protocol4.bin"), pickle_protocol=4)
    expected = {k: v.detach().contiguous().clone() for k, v in d.items()}
    save_file(expected, os.path.join(out, "odd_expected.safetensors"))
    # The same archive with deflated entries (torch itself always stores them).
    src = os.path.join(out, "odd.bin")
    dst = os.path.join(out, "odd_deflated.bin")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            new = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            new.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(new, zin.read(info.filename))
    # A training checkpoint: the state dict nested under "state_dict" beside other entries.
    torch.save(
        {"state_dict": {"w": d["base"], "h": d["half"]}, "epoch": 3, "lr": 1e-3},
        os.path.join(out, "nested.bin"),
    )
    make_legacy(os.path.join(out, "legacy.bin"))
    os.chmod(os.path.join(out, "odd_expected.safetensors"), 0o644)


def make_legacy(path: str) -> None:
    """A legacy (pre-zip) torch file. Its storage key is a memory address, so it is replaced
    by a fixed string of the same length to make the file deterministic."""
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        for _ in pickletools.genops(f):  # skip the state dict without running it
            pass
        keys = pickle.load(f)
    with open(path, "rb") as f:
        data = f.read()
    for i, key in enumerate(keys):
        data = data.replace(key.encode(), str(i + 1).rjust(len(key), "0").encode())
    with open(path, "wb") as f:
        f.write(data)


def check(out: str) -> None:
    """torch.load of every file gives back the expected tensors."""
    expected = load_file(os.path.join(out, "odd_expected.safetensors"))
    legacy = torch.load(os.path.join(out, "legacy.bin"), weights_only=True)
    assert torch.equal(legacy["w"], torch.zeros(2))
    for name in ("odd.bin", "odd_protocol4.bin", "odd_deflated.bin"):
        # Our own files: the full unpickler (torch's weights-only one lacks FRAME).
        got = torch.load(os.path.join(out, name), weights_only=False)
        for k, v in expected.items():
            assert torch.equal(got[k], v), (name, k)
    llama = torch.load(os.path.join(out, "llama", "pytorch_model.bin"), weights_only=True)
    assert llama["lm_head.weight"].untyped_storage().data_ptr() == (
        llama["model.embed_tokens.weight"].untyped_storage().data_ptr()
    )
    with safe_open(os.path.join(out, "odd_expected.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(expected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="fixtures/reference")
    args = ap.parse_args()
    out = os.path.join(args.fixtures, "pytorch")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    make_llama(args.fixtures, out)
    make_mixtral(args.fixtures, out)
    make_odd(out)
    check(out)
    total = sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs
    )
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main()
