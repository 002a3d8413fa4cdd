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
    (adapter=none)."""
    from quantpipe.evaluate import (
        budget_s,
        check_budget,
        reference_artifact,
        run_worker,
        runtime_need,
        runtime_of,
    )
    if base is None:
        return None
    runtime = str(cfg.eval.reference_runtime)
    fp = art.fingerprint("base-nll", base["fingerprint"], merged["fingerprint"], protocol,
                         runtime, text_fp)

    def build(tmp: Path) -> dict:
        artifact = reference_artifact(cfg, base)
        float32 = runtime == "transformers-float32"
        n = json.loads((ref / "reference.json").read_text())["n_windows_planned"]
        rt = runtime_of(runtime)
        check_budget(artifact, rt, shape, cfg, n, "the base model's scoring", speed=False)
        run_worker({**protocol, "mode": "reference", "nll_only": True, "desc": "base (no adapter)",
                    "runtime": rt,
                    "artifact": str(artifact), "float32": float32, "max_seconds": budget_s(cfg),
                    "ids": str(ref / "ids.npy"), "out": str(tmp / "base.npz"), "text": None},
                   runtime_need(artifact, rt, shape, protocol["n_ctx"], float32),
                   cfg.memory.limit_gb,
                   f"the base model's scoring ({runtime})")
        return {"runtime": runtime}

    folder, _, _ = art.ensure_cached(Path(cfg.paths.artifacts), "base-nll", fp, build,
                                     {"base": base["fingerprint"], "merged": merged["fingerprint"]})
    return folder / "base.npz"
