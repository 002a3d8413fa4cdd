"""Grid check: how much of a base model's weights already sit on a 4-bit block grid.

A block of 32 consecutive weights along a row that holds at most 16 distinct values is what a
4-bit quantiser with blocks of 32 leaves behind after dequantisation (the embedded default is
SmolLM2 dequantised from a Q4_1 GGUF); a float model has nearly no such block (32 float16
weights drawn from a smooth distribution are almost always 32 distinct values). A base on
such a grid is re-expressed almost losslessly by the formats that share its blocks, which
favours them in any comparison made on it; the report says so (`warning`).

`check_folder` reads every safetensors file of a folder tensor by tensor (safe_open), a slice of
rows at a time, so a 7B base never holds more than CHUNK weights in RAM; each block is sorted
as integers of the weights' own width (distinct bit patterns = distinct values) and its
distinct values counted. The base stage runs it once per base and caches the table
(quantpipe.pipeline.stage_base); `python -m quantpipe.gridcheck FOLDER` prints it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

BLOCK = 32        # weights per block, along a row (the last dimension, as llama.cpp blocks it)
LEVELS = 16       # 4 bits: a block on the grid holds at most 16 distinct values
WARN_PCT = 50.0   # the report warns from this share of aligned blocks up
CHUNK = 1 << 22   # weights read and sorted at a time: 8 MiB of float16 and its sorted copy
TABLE = "grid_check.json"  # the per-tensor table, in the cache folder and the base stage's run
RECIPE = 1        # bump when the figures change for the same weights
LIBRARIES = ("safetensors", "torch", "numpy")


def block_counts(w) -> tuple[int, int]:
    """(blocks with <= LEVELS distinct values, all blocks) of a torch tensor whose last
    dimension is the row; the tail of a row shorter than BLOCK is left out. numpy sorts the
    blocks: about 6x faster than torch.sort on rows of 32 (0.37 s against 2.4 s on SmolLM2)."""
    import numpy as np
    import torch
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    cols = w.shape[-1] // BLOCK * BLOCK
    blocks = w[..., :cols].contiguous().view(ints).reshape(-1, BLOCK).numpy()
    if blocks.shape[0] == 0:
        return 0, 0
    s = np.sort(blocks, axis=1)
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)
    return int((distinct <= LEVELS).sum()), int(blocks.shape[0])


def tensor_counts(st, name: str) -> tuple[list[int], int, int] | None:
    """(shape, aligned blocks, blocks) of tensor `name` of an open safetensors file, read
    CHUNK weights at a time along its first dimension; None for a tensor without a full
    block in its rows (1-D norms and biases, rows under BLOCK)."""
    sl = st.get_slice(name)
    shape = list(sl.get_shape())
    if len(shape) < 2 or shape[-1] < BLOCK:
        return None
    step = max(1, CHUNK // math.prod(shape[1:]))
    aligned = total = 0
    for start in range(0, shape[0], step):
        a, n = block_counts(sl[start:start + step])
        aligned, total = aligned + a, total + n
    return shape, aligned, total


def check_folder(folder: Path) -> dict[str, Any]:
    """The grid table of every safetensors file in `folder`: per tensor its shape, blocks and
    aligned %, and over all of them `grid_aligned_pct` (aligned blocks / blocks: every block
    holds BLOCK weights, so it is the share weighted by weight count). None where the folder
    has no safetensors weights (a pickle-only base)."""
    import torch  # noqa: F401  (safe_open's "pt" needs it: 3 s when no stage loaded it yet)
    from safetensors import safe_open
    t0 = time.perf_counter()
    tensors: dict[str, dict[str, Any]] = {}
    aligned = total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                counts = tensor_counts(st, name)
                if counts is None:
                    continue
                shape, a, n = counts
                tensors[name] = {"shape": shape, "blocks": n, "aligned_pct": pct(a, n)}
                aligned, total = aligned + a, total + n
    return {"block": BLOCK, "levels": LEVELS, "grid_aligned_pct": pct(aligned, total) if total
            else None, "blocks": total, "seconds": round(time.perf_counter() - t0, 3),
            "tensors": tensors}


def pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 3) if whole else 0.0


def warning(aligned_pct: float | None) -> str | None:
    """What the report says about a base with `aligned_pct` % of its blocks on the grid (None
    below WARN_PCT). Here, not in the report's shared code: it names the formats concerned."""
    if aligned_pct is None or aligned_pct < WARN_PCT:
        return None
    return (f"the base's weights sit on a 4-bit block grid ({aligned_pct:.1f} % of blocks of "
            f"{BLOCK} hold <= {LEVELS} values): block-32 GGUF types (q4_0, q4_1, q4_k, q5_0 and "
            "similar) re-express it almost losslessly; group-64/128 formats (GPTQ, AWQ, NF4) "
            "cannot, so cross-format comparisons on this base favour GGUF")


if __name__ == "__main__":
    table = check_folder(Path(sys.argv[1]))
    for name, t in table["tensors"].items():
        print(f"{t['aligned_pct']:8.3f} %  {name} {t['shape']}")
    print(json.dumps({k: v for k, v in table.items() if k != "tensors"}))
