"""The FP16 baseline "backend": the merged FP16 folder itself, hard-linked, not re-saved."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from quantpipe.artifacts import PROVENANCE
from quantpipe.quantize import register

RECIPE = 1
LIBRARIES = ()  # the files are linked as they are: no library touches them


def eval_need(shape) -> tuple[str, int]:
    """(runtime, weight bytes) of the evaluation, for the time estimate before any stage."""
    return "transformers", shape.fp16_bytes


def memory_need(shape, n_ctx: int) -> list[tuple[str, int, str]]:
    """Peak RAM of this variant's stages (quantpipe.memory): evaluating FP16 on transformers."""
    from quantpipe.evaluate.transformers_runtime import HFRuntime
    return [("the evaluation of the FP16 variant (transformers)",
             HFRuntime.memory_for(shape.fp16_bytes, shape, n_ctx),
             "evaluate on a machine with more memory, or drop fp16 from the sweep: the FP16 "
             "reference is scored memory-mapped by llama.cpp and needs no fp16 variant")]


@register(recipe=RECIPE, libraries=LIBRARIES, memory_need=memory_need, eval_need=eval_need)
def save_fp16(src: Path, dst: Path, ctx) -> dict:
    for f in Path(src).iterdir():
        if f.is_file() and f.name != PROVENANCE:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return {"artifact": ".", "runtime": "transformers", "metrics": {}}
