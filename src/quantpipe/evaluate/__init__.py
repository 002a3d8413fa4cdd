"""Evaluation of one variant: size on disk, speed, memory and quality against FP16.

One protocol for every format. The eval text is tokenised once with the merged model's
tokenizer; those ids feed both runtimes (transformers for HF folders, llama.cpp for GGUF). The
FP16 reference (top-k log-probs per scored position) is computed once per merged model and eval
setting and cached. Each measurement runs in a fresh worker process (quantpipe.evaluate.worker).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quantpipe import artifacts as art
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.evaluate.metrics import windows

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weights_size(path: Path) -> int:
    return art.size_bytes(path, None if Path(path).is_file() else WEIGHT_SUFFIXES)


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF before llama.cpp opens it: llama.cpp reads a
    truncated file through mmap and can crash the worker with no useful message. Checks the
    magic, then parses every header, key and tensor record with the gguf package and checks the
    file holds each tensor's bytes."""
    import gguf
    path = Path(path)
    fix = ("delete it (and its cache folder under artifacts/quantise/) and run the pipeline "
           "again to rebuild it")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(str(path), f"is not a GGUF file (starts with {magic!r}, not b'GGUF')", fix)
    try:
        reader = gguf.GGUFReader(str(path), "r")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ConfigError(str(path), f"is truncated or corrupt ({e})", fix) from e
    size = path.stat().st_size
    if end > size:
        raise ConfigError(str(path), f"is truncated: {size} bytes, its tensors need {end}", fix)


def run_worker(spec: dict) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        res = subprocess.run([sys.executable, "-m", "quantpipe.evaluate.worker", f.name], env=env)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"evaluation of {spec['artifact']} failed (worker exit "
                           f"{res.returncode}; its error is printed above)")


def prepare_ids(cfg: DictConfig, merged: Path) -> tuple[str, str, np.ndarray, int | None]:
    from transformers import AutoTokenizer
    text, source = load_text(cfg.eval.text_file, "eval", "eval.text_file")
    tok = AutoTokenizer.from_pretrained(merged)
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    if len(ids) < cfg.eval.n_ctx:
        raise ConfigError("eval.text_file", f"the eval text has {len(ids)} tokens, fewer than "
                          f"one window (eval.n_ctx={cfg.eval.n_ctx})",
                          "use a longer text or a smaller eval.n_ctx")
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    return text, source, ids, bos


def evaluate_variant(cfg: DictConfig, merged: dict, variant: dict) -> dict:
    """Metrics for `variant` (a dict with path) against the FP16 `merged` model."""
    import mlflow
    from quantpipe import tracking
    e = cfg.eval
    llama = variant["runtime"] == "llama.cpp"  # the backend's result names its runtime
    if llama:  # refuse a broken file before any worker runs
        check_gguf(Path(variant["path"]))
    text, source, ids, bos = prepare_ids(cfg, merged["path"])
    tracking.log_dataset("eval-text", text, source, context="evaluation")
    protocol = {"n_ctx": e.n_ctx, "n_windows": e.n_windows, "kld_top_k": e.kld_top_k, "bos": bos,
                "threads": cfg.threads}
    fp = art.fingerprint("reference", merged["fingerprint"], protocol, art.fingerprint(text))
    base_spec = {**protocol, "speed": OmegaConf.to_container(e.speed),
                 "sample": OmegaConf.to_container(e.sample)}

    def build_reference(tmp: Path) -> dict:
        np.save(tmp / "ids.npy", ids)
        run_worker({**base_spec, "mode": "reference", "artifact": str(merged["path"]),
                    "runtime": "transformers",
                    "ids": str(tmp / "ids.npy"), "out": str(tmp / "reference.npz"), "text": None})
        return {"n_windows": int(len(windows(ids, e.n_ctx, e.n_windows, bos)))}

    ref, _, _ = art.ensure_cached(Path(cfg.paths.artifacts), "reference", fp, build_reference,
                                  {"merged": merged["fingerprint"], "text_source": source})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        run_worker({**base_spec, "mode": "variant", "artifact": str(variant["path"]),
                    "runtime": variant["runtime"],
                    "ids": str(ref / "ids.npy"), "reference": str(ref / "reference.npz"),
                    "out": str(out), "text": text if llama else None})
        result = json.loads(out.read_text())
    metrics = result["metrics"]
    fp16_bytes = weights_size(merged["path"])
    size = weights_size(variant["path"])
    n_params = _n_params(merged["path"])
    metrics.update({"size_mb": size / 2**20, "fp16_size_mb": fp16_bytes / 2**20,
                    "compression": fp16_bytes / size, "bits_per_weight": 8 * size / n_params})
    mlflow.set_tag("eval.runtime", result["runtime"])
    mlflow.log_dict(result["sample"], "sample.json")  # prompt, output, stopped_at_eos
    return metrics


def _n_params(merged: Path) -> int:
    """Parameter count of the FP16 model, from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open
    total = 0
    for f in Path(merged).glob("*.safetensors"):
        with safe_open(f, "np") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    return total
