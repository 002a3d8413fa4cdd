"""The FP16 baseline "backend": the merged FP16 folder itself, hard-linked, not re-saved."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from quantpipe.artifacts import PROVENANCE


def save_fp16(src: Path, dst: Path, ctx) -> dict:
    for f in Path(src).iterdir():
        if f.is_file() and f.name != PROVENANCE:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return {"artifact": ".", "runtime": "transformers", "metrics": {}}
