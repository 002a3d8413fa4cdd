"""The base model before fine-tuning, scored on the evaluation's token ids: what the fine-tune
gained, so each variant can be told how much of that gain it keeps (finetune_retention_pct).

Scored once per (base, merged model, protocol, eval text) and cached under
artifacts/base-nll/<fingerprint>/ like the FP16 reference, by the reference worker mode with
only the per-token NLL kept. With no adapter there is no fine-tune and nothing is scored.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from quantpipe import artifacts as art


def score_base(cfg: DictConfig, base: dict | None, merged: dict, spec: dict, ref: Path,
               text_fp: str) -> Path | None:
    """Path of the base model's NLL (base.npz, key "nll") on the ids in `ref`/ids.npy, the
    same windows the reference scored; None without a base (adapter=none)."""
    from quantpipe.evaluate import run_worker  # the package imports this module
    if base is None:
        return None
    protocol = {k: spec[k] for k in ("n_ctx", "n_windows", "bos", "threads")}
    fp = art.fingerprint("base-nll", base["fingerprint"], merged["fingerprint"], protocol, text_fp)

    def build(tmp: Path) -> dict:
        run_worker({**spec, "mode": "reference", "nll_only": True, "desc": "base (no adapter)",
                    "artifact": str(base["path"]), "ids": str(ref / "ids.npy"),
                    "out": str(tmp / "base.npz"), "text": None})
        return {}

    folder, _, _ = art.ensure_cached(Path(cfg.paths.artifacts), "base-nll", fp, build,
                                     {"base": base["fingerprint"], "merged": merged["fingerprint"]})
    return folder / "base.npz"
