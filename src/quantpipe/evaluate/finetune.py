"""The base model before fine-tuning, scored on the evaluation's token ids: what the fine-tune
gained, so each variant can be told how much of that gain it keeps (finetune_retention_pct).

Scored once per (base, merged model, protocol, eval text) and cached under
artifacts/base-nll/<fingerprint>/ like the FP16 reference, by the reference worker mode with
only the per-token NLL kept. With no adapter there is no fine-tune and nothing is scored.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from quantpipe import artifacts as art


def score_base(cfg: DictConfig, base: dict | None, merged: dict, protocol: dict, ref: Path,
               shape, text_fp: str) -> Path | None:
    """Path of the base model's NLL (base.npz, key "nll") on the ids in `ref`/ids.npy, the
    same windows the reference scored, on the reference's runtime (eval.reference_runtime:
    llama.cpp over the base's own F16 GGUF, memory-mapped); None without a base
    (adapter=none). The FP16 reference's own path (quantpipe.evaluate.reference_pass)."""
    from quantpipe.evaluate import reference_pass
    if base is None:
        return None
    runtime = str(cfg.eval.reference_runtime)
    fp = art.fingerprint("base-nll", base["fingerprint"], merged["fingerprint"], protocol,
                         runtime, text_fp)
    n = json.loads((ref / "reference.json").read_text())["n_windows_planned"]
    folder, _ = reference_pass(cfg, "base-nll", fp, base,
                               {"base": base["fingerprint"], "merged": merged["fingerprint"]},
                               "the base model's scoring", shape, lambda tmp: ref / "ids.npy",
                               n, "base.npz", protocol["bos"],
                               lambda tmp, artifact: {"runtime": runtime},
                               nll_only=True, desc="base (no adapter)")
    return folder / "base.npz"
