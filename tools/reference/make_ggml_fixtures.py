#!/usr/bin/env python3
"""Reference dequantisation of ggml quantised blocks, for skymoe_kernels::ggml.

Generated with gguf==0.19.0 (pinned in tools/reference/requirements.txt) and numpy; the values
are those of `gguf.quants.dequantize`, the Python port of llama.cpp's `dequantize_row_*`.

For each type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) this writes
`fixtures/reference/ggml/<NAME>.bin`:

    offset 0   8 bytes  magic b"GGMLFIX1"
    offset 8   u32 LE   ggml type id
    offset 12  u32 LE   rows
    offset 16  u32 LE   cols
    offset 20           rows * row_bytes block bytes (ggml's layout, rows back to back)
    then                rows * cols f32 LE: gguf.quants.dequantize of those bytes

The rows are random block bytes (every quant bit pattern equally likely) whose f16 scale
fields were replaced by random finite f16 values (normals, subnormals, zeros, both signs), and
for the types gguf can quantise (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) further rows quantised from
random normal weights, i.e. realistic blocks. `manifest.json` lists the files, their shapes
and sha256. Deterministic: re-running gives identical bytes.

Usage: python3 tools/reference/make_ggml_fixtures.py [OUT_DIR]
"""

import hashlib
import importlib.metadata
import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

GGUF_VERSION = "0.19.0"
SEED = 20240611

# type -> (byte offsets of the f16 scale fields inside a block)
TYPES = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
QUANTISABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def random_finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random f16 bit patterns that are finite: mostly moderate values, some extremes."""
    kind = rng.integers(0, 8, size=n)
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    moderate = (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint16)
    out = np.where(kind < 6, moderate, bits)
    # Exponent all ones (inf / NaN) -> clear the top exponent bit.
    inf_nan = (out & 0x7C00) == 0x7C00
    out = np.where(inf_nan, out & ~np.uint16(0x4000), out).astype(np.uint16)
    out[0] = 0x0001  # smallest subnormal
    if n > 1:
        out[1] = 0x8000  # negative zero
    return out


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "..", "fixtures", "reference", "ggml")
    os.makedirs(out_dir, exist_ok=True)
    found = importlib.metadata.version("gguf")
    if found != GGUF_VERSION:
        sys.exit(f"gguf {found} is installed; these fixtures are pinned to gguf=={GGUF_VERSION}")
    rng = np.random.default_rng(SEED)
    manifest = {"gguf_version": GGUF_VERSION, "seed": SEED, "format": __doc__.split("\n\n")[2],
                "files": {}}
    for ty, f16_offsets in TYPES.items():
        block_elems, block_bytes = GGML_QUANT_SIZES[ty]
        blocks_per_row = 2
        cols = block_elems * blocks_per_row
        random_rows = 6 if block_elems == 32 else 4
        row_bytes = blocks_per_row * block_bytes
        raw = rng.integers(0, 256, size=(random_rows * blocks_per_row, block_bytes), dtype=np.uint8)
        for off in f16_offsets:
            f16 = random_finite_f16(rng, raw.shape[0])
            raw[:, off:off + 2] = f16.view(np.uint8).reshape(-1, 2)
        rows_bytes = [raw.reshape(random_rows, row_bytes)]
        if ty in QUANTISABLE:
            w = (rng.standard_normal((4, cols)) * 0.02).astype(np.float32)
            w[0, :5] = [0.0, 1.0, -1.0, 0.5, -0.25]
            w[1, :] = 0.0  # all-zero blocks (d = 0)
            q = gguf.quants.quantize(w, ty)
            assert q.dtype == np.uint8 and q.shape == (4, row_bytes), q.shape
            rows_bytes.append(q)
        data = np.ascontiguousarray(np.concatenate(rows_bytes, axis=0))
        rows = data.shape[0]
        deq = gguf.quants.dequantize(data, ty)
        assert deq.dtype == np.float32 and deq.shape == (rows, cols), deq.shape
        assert np.isfinite(deq).all()
        blob = (b"GGMLFIX1" + struct.pack("<III", int(ty), rows, cols) + data.tobytes()
                + deq.astype("<f4").tobytes())
        name = f"{ty.name}.bin"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(blob)
        manifest["files"][name] = {"type": ty.name, "type_id": int(ty), "rows": rows, "cols": cols,
                                   "quantised_rows": rows - random_rows,
                                   "sha256": hashlib.sha256(blob).hexdigest()}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
