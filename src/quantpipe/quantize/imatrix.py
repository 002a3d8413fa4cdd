"""Calibrated ("static") GGUF quantisation: llama.cpp's importance matrix.

    make tools && make pipeline +quant=gguf_imatrix_q4_k_m

llama-imatrix runs the F16 model over calibration text (by default the "calib" topics of
pydoc_data.topics, disjoint from the training and evaluation topics) and records, per weight
column, the mean squared activation that multiplies it; llama-quantize --imatrix then chooses
each block's scales to minimise the error weighted by those importances, rather than the plain
weight error. llama-cpp-python's llama_model_quantize cannot pass an imatrix, hence the tools.
The matrix is cached in artifacts/imatrix/<fp>/ keyed by the F16 file, the calibration text and
the settings, so re-quantising to another type reuses it.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from quantpipe import artifacts as art
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.tools import run_tool, tool_path

log = logging.getLogger(__name__)
SETTINGS = {"text_file": None, "chunks": 32, "n_ctx": 256}  # defaults; conf/quant overrides
IMATRIX_FILE = "imatrix.gguf"  # llama-imatrix writes its GGUF format for a .gguf name
RECIPE = 2  # bump when the matrix written changes (2: its dataset recorded by name, no path)


def imatrix_settings(imatrix: dict) -> dict:
    unknown = set(imatrix) - set(SETTINGS)
    if unknown:
        raise ConfigError("quant.backend.imatrix", f"unknown keys {sorted(unknown)}",
                          f"use only {sorted(SETTINGS)}")
    s = {**SETTINGS, **imatrix}
    for key in ("chunks", "n_ctx"):
        if not isinstance(s[key], int) or s[key] <= 0:
            raise ConfigError(f"quant.backend.imatrix.{key}", f"{s[key]!r} is not a positive "
                              "integer", "set a whole number above 0")
    return s


def compute_imatrix(tools: Path, f16: Path, text: str, tmp: Path, chunks: int, n_ctx: int,
                    threads: int | None) -> dict:
    """llama-imatrix over `text` into tmp/imatrix.gguf; returns what its log tells."""
    exe = tool_path(tools, "llama-imatrix")
    calib = tmp / "calibration.txt"   # kept beside the matrix: what it was computed on
    calib.write_text(text, encoding="utf-8")
    # run in tmp with relative names: the matrix records its dataset's path, and llama-quantize
    # copies it into every file it writes (a host's temp path in a published GGUF otherwise)
    args = ["-m", Path(f16).resolve(), "-f", calib.name, "-o", IMATRIX_FILE, "-c", n_ctx,
            "--chunks", chunks, "-ngl", 0]
    if threads:
        args += ["-t", threads]
    r = run_tool(exe, args, cwd=tmp)
    logtext = r.stdout + r.stderr
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", logtext)
    if m is None:
        raise RuntimeError(f"llama-imatrix did not report its chunks:\n{logtext[-2000:]}")
    n_chunks = int(m.group(1))
    if n_chunks < chunks:
        log.warning("calibration text holds only %d chunks of %d tokens (asked for %d)",
                    n_chunks, n_ctx, chunks)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", logtext)
    out = {"imatrix_s": r.seconds, "calib_chunks": n_chunks, "calib_tokens": n_chunks * n_ctx,
           "imatrix_peak_rss_mb": r.peak_rss_mb}
    if ppl:
        out["imatrix_calib_ppl_f16"] = float(ppl.group(1))
    return {"metrics": out}


def cached_imatrix(f16: Path, imatrix: dict, ctx) -> tuple[Path, dict, bool]:
    """(imatrix file, the metrics of its computation, reused?) for `f16` over the calibration
    text the settings name, computed once per F16 file, text and settings."""
    s = imatrix_settings(dict(imatrix))
    tool_path(ctx.tools, "llama-imatrix")
    text, source = load_text(s["text_file"], "calib", "quant.backend.imatrix.text_file")
    _log_calibration(text, source)
    # the F16 cache folder's name is its fingerprint; the quick file fingerprint covers an F16
    # given from elsewhere (crosscheck, tests)
    fp = art.fingerprint("imatrix", RECIPE, f16.parent.name, art.quick_file_fingerprint(f16),
                         art.fingerprint(text), s["chunks"], s["n_ctx"], _tools_version(ctx.tools))
    folder, prov, reused = art.ensure_cached(
        ctx.artifacts, "imatrix", fp,
        lambda tmp: compute_imatrix(ctx.tools, f16, text, tmp, s["chunks"], s["n_ctx"],
                                    ctx.threads),
        {"f16": art.portable_path(f16, ctx.artifacts), "calibration_source": source,
         "settings": s})
    log.info("imatrix: %s %s", "reusing" if reused else "computed", folder)
    return folder / IMATRIX_FILE, prov["result"]["metrics"], reused


def quantize_with_imatrix(f16: Path, out: Path, type: str, imatrix: dict, ctx) -> dict:
    """Quantise `f16` to `type` at `out` with an importance matrix; returns metrics."""
    imatrix_settings(dict(imatrix))
    quantize = tool_path(ctx.tools, "llama-quantize")  # fail before the long imatrix run
    matrix, made, reused = cached_imatrix(f16, imatrix, ctx)
    args = ["--imatrix", matrix.name, Path(f16).resolve(), Path(out).resolve(), type.upper()]
    if ctx.threads:
        args.append(ctx.threads)
    t0 = time.perf_counter()
    run_tool(quantize, args, cwd=matrix.parent)  # the file records the matrix's name as given
    return {**made, "imatrix_reused": float(reused),
            "imatrix_quantize_s": time.perf_counter() - t0}


def _log_calibration(text: str, source: str) -> None:
    import mlflow

    from quantpipe import tracking
    if mlflow.active_run() is not None:  # the quantise stage's run, when the pipeline calls
        tracking.log_dataset("calibration-text", text, source, context="calibration")


def _tools_version(tools: Path) -> str:
    """The build stamp scripts/build_llama_tools.sh leaves (the llama-cpp-python version)."""
    stamps = sorted(p.name for p in Path(tools).glob(".llama-cpp-python-*"))
    return stamps[-1] if stamps else "unknown"
