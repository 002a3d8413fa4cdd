"""Calibrated GPTQ / AWQ / SmoothQuant variants through vllm-project's llm-compressor.

    make llmc && make pipeline +quant=gptq_w4a16   (also rtn_w4a16, rtn_w4a16_asym, awq_w4a16,
                                                 awq_w4a16_asym, w8a8_int8, w8a8_int8_dynamic)

llmcompressor 0.14.0.1 pins transformers <=5.17.0 and compressed-tensors ==0.19.0 while the
pipeline pins transformers 5.23.0, so its oneshot runs as a subprocess in the isolated
.venv-llmc (requirements/llmc.txt; quantpipe/quantize/llmc_oneshot.py). The result is a
compressed-tensors folder (the format vLLM serves) that the main environment's transformers 5.23
loads with compressed-tensors 0.19 and decompresses on CPU, so evaluation gives the format's
quality; its CPU speed is that of decompressed fp16 matmuls, not of an int4/int8 kernel, and is
logged under *_decompressed names, never as the format's speed.

The calibration run is cached per (merged model, weight recipe, calibration text and settings,
llm-compressor version) in artifacts/llmc/. `serve_activations` swaps the activation scheme of
that cached result without recalibrating: w8a8_int8_dynamic is w8a8_int8's very weights with
dynamic per-token activation scales (static input scales dropped), so the two differ only in
how activations are scaled.

Logged on the quantise stage, from the oneshot's checks on calibration windows: `calib_kld`
(output error against the float model; GPTQ and AWQ must stay below their round-to-nearest
control rtn_w4a16) and, where activations are quantised, every Linear input's range and int8
error (per tensor, per token, with the calibrated scale): the table
llmc/activation_int8_error.csv, the worst layer as tag llmc.act_worst_layer and act_* metrics.
Where AWQ runs, its scale search per mapping (llmc/awq_scale_search.csv) and awq_* metrics: what
its scales left of plain rounding's output error, and how much the input channels stand out.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantpipe import PROJECT_ROOT
from quantpipe import artifacts as art
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.quantize import register

log = logging.getLogger(__name__)
ONESHOT = Path(__file__).with_name("llmc_oneshot.py")
CALIBRATION = {"text_file": None, "samples": 64, "seq_len": 256}
STATIC_INPUT_KEYS = (".input_scale", ".input_zero_point")
# the oneshot's scores of the quantised model on calibration windows (calib_kld, ...)
CALIB_SCORE_PREFIX = ("calib_kld", "calib_top1", "calib_tokens_scored")
# speed of a folder run by transformers on CPU: decompressed weights, fp16 matmuls


# The oneshot's own folder and result (the llmc cache): 2: calibration computed in float32
# (COMPUTE_DTYPE); 3: the result holds the calibration-text output error and the Linear inputs'
# int8 error. Bump when the oneshot writes something else.
ONESHOT_RECIPE = 3
# Per modifier, a version of what the oneshot writes for it, bumped for that modifier's results
# only (the others stay cached): AWQModifier 1: the result holds its scale search (AwqProbe).
MODIFIER_RECIPE = {"AWQModifier": 1}
# The published folder made from it (the quantise stage): 4: the dynamic twin stores its
# formerly weight-only groups int-quantized (swap_activations). Bump when that changes.
RECIPE = 4
LIBRARIES = ("transformers", "compressed-tensors")  # the main venv's, that load the folder


def other_versions() -> dict[str, str]:
    """Part of the quantise stage's cache key besides LIBRARIES: the isolated venv's
    llm-compressor, compressed-tensors and transformers, which make the folder."""
    try:
        return {"llmc": llmc_version(llmc_python())}
    except ConfigError:  # no .venv-llmc: the backend itself says so, with the fix
        return {"llmc": "missing"}


# the calibration runs on CPU (the pipeline's machine): float32 there is faster than float16 and
# does not overflow in AWQ's scale search; the folder is saved in float16 either way
COMPUTE_DTYPE = "float32"


def llmc_python() -> Path:
    """The isolated environment's interpreter ($QUANTPIPE_LLMC_PYTHON or .venv-llmc)."""
    py = Path(os.environ.get("QUANTPIPE_LLMC_PYTHON", PROJECT_ROOT / ".venv-llmc/bin/python"))
    if not py.is_file():
        raise ConfigError("quant.backend", f"llm-compressor's environment {py} does not exist",
                          "run `make llmc` (builds .venv-llmc from requirements/llmc.txt, ~3 min)")
    return py


def llmc_version(py: Path) -> str:
    r = subprocess.run([py, "-c", "from importlib.metadata import version as v; "
                        "print(v('llmcompressor'), v('compressed-tensors'), v('transformers'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def calibration_settings(calibration: dict | None) -> dict:
    s = {**CALIBRATION, **(calibration or {})}
    if unknown := set(s) - set(CALIBRATION):
        raise ConfigError("quant.backend.calibration", f"unknown keys {sorted(unknown)}",
                          f"use only {sorted(CALIBRATION)}")
    for key in ("samples", "seq_len"):
        if not isinstance(s[key], int) or s[key] <= 0:
            raise ConfigError(f"quant.backend.calibration.{key}", f"{s[key]!r} is not a positive "
                              "integer", "set a whole number above 0")
    return s


def run_oneshot(py: Path, src: Path, tmp: Path, text: str, spec: dict) -> dict:
    """llm-compressor's oneshot in the isolated venv, writing the folder into `tmp`."""
    result = run_isolated(py, ONESHOT, src, tmp, text, spec, "llmc", "llm-compressor oneshot")
    result["metrics"]["llmc_s"] = result.pop("wall_s")
    return result


def run_isolated(py: Path, script: Path, src: Path, tmp: Path, text: str, spec: dict,
                 name: str, what: str) -> dict:
    """`script` SPEC.json in the isolated venv (spec + src, dst=tmp and the calibration text as
    a file); its progress reaches the terminal as it comes and tmp/logs/<name>.log; returns the
    tmp/<name>_result.json it writes, with wall_s."""
    with tempfile.TemporaryDirectory() as work:
        text_file = Path(work) / "calibration.txt"
        text_file.write_text(text, encoding="utf-8")
        spec_file = Path(work) / "spec.json"
        spec_file.write_text(json.dumps({**spec, "src": str(src), "dst": str(tmp),
                                         "text_file": str(text_file)}))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own packages only
        t0 = time.perf_counter()
        # in a subfolder: the published copies take the folder's files only (a log holds paths)
        log_file = tmp / "logs" / f"{name}.log"
        log_file.parent.mkdir()
        with open(log_file, "wb") as log_out:
            proc = subprocess.Popen([py, script, spec_file], stdout=log_out,
                                    stderr=subprocess.PIPE,
                                    env={**env, "TOKENIZERS_PARALLELISM": "false"})
            # its progress bars (one per layer: minutes on CPU) reach the terminal as they come
            while chunk := proc.stderr.read1(4096):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log_out.write(chunk)
            returncode = proc.wait()
    if returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{what} failed (exit {returncode}):\n{tail}")
    result = json.loads((tmp / f"{name}_result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def swap_activations(folder: Path, dst: Path, acts: dict) -> None:
    """Copy `folder` to `dst` with every group's input activations set to `acts`; dynamic
    activations carry no stored scales, so the static input_scale tensors are left out.

    A group saved weight-only (a layer whose inputs the static recipe kept 16-bit) is stored
    pack-quantized; with activations now quantised it becomes int-quantized, the format of an
    activation-quantised group: vLLM reads a pack-quantized group as weight-only whatever its
    input_activations say (W8A16, which its CPU build has no kernel for). Its int8 values are
    unpacked by compressed-tensors' own helper, unchanged."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file, save_file
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                          art.PROVENANCE):
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    packed_bits = []  # (target patterns, bits) of the groups stored pack-quantized
    for group in qcfg["config_groups"].values():
        group["input_activations"] = dict(acts)
        if group.get("format", qcfg.get("format")) == "pack-quantized":
            packed_bits.append((group["targets"], int(group["weights"]["num_bits"])))
            group["format"] = "int-quantized"
    if {g.get("format") for g in qcfg["config_groups"].values()} == {"int-quantized"}:
        qcfg["format"] = "int-quantized"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))

    def bits_of(layer: str) -> int:
        for targets, bits in packed_bits:
            if any(re.fullmatch(t[3:], layer) if t.startswith("re:") else t == layer
                   for t in targets):
                return bits
        raise ValueError(f"{folder}: {layer} is stored pack-quantized but in no such group")

    for f in folder.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(f).items() if not k.endswith(STATIC_INPUT_KEYS)}
        for key in [k for k in tensors if k.endswith(".weight_packed")]:
            layer = key.removesuffix(".weight_packed")
            shape = torch.Size(tensors.pop(f"{layer}.weight_shape").tolist())
            tensors[f"{layer}.weight"] = unpack_from_int32(tensors.pop(key), bits_of(layer),
                                                           shape).to(torch.int8).contiguous()
        save_file(tensors, dst / f.name, metadata={"format": "pt"})


def served_error(rows: list[dict], serve_activations: dict | None) -> list[dict]:
    """Each Linear input's int8 error under the scheme the folder is served with: the oneshot's
    own (calibrated static scale, or dynamic), or per token / per tensor where
    `serve_activations` swaps in dynamic scales."""
    if not serve_activations:
        return rows
    key = "relmse_token" if serve_activations.get("strategy") == "token" else "relmse_tensor"
    return [{**r, "relmse_served": r[key]} for r in rows]


def activation_summary(rows: list[dict]) -> tuple[dict, str | None]:
    """Metrics of the Linear inputs' int8 error (llmc_oneshot.InputStats) and the worst layer,
    by the error of the scale it is served with; none where activations are not quantised."""
    if not rows:
        return {}, None
    worst = max(rows, key=lambda r: r["relmse_served"])
    served = [r["relmse_served"] for r in rows]
    return {"act_layers_quantised": float(len(rows)),
            "act_relmse_served_worst": worst["relmse_served"],
            "act_relmse_served_mean": sum(served) / len(served),
            "act_relmse_tensor_worst": max(r["relmse_tensor"] for r in rows),
            "act_relmse_token_worst": max(r["relmse_token"] for r in rows),
            "act_worst_absmax_over_p999": worst["absmax_over_p999"]}, worst["layer"]


def csv_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """rows as CSV text with `columns` in order (floats to 6 digits, a missing value empty)."""
    lines = [",".join(columns)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else
                              (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                              for c in columns))
    return "\n".join(lines) + "\n"


ACT_COLUMNS = ("layer", "absmax", "p999", "absmax_over_p999", "channel_max_over_median",
               "static_scale_absmax", "relmse_tensor", "relmse_token", "relmse_static",
               "relmse_served")


def log_activations(rows: list[dict], worst: str | None) -> None:
    """The per-layer table (CSV, worst first) and the worst layer's name on the active run."""
    import mlflow
    if not rows or mlflow.active_run() is None:
        return
    mlflow.log_text(csv_table(sorted(rows, key=lambda r: -r["relmse_served"]), ACT_COLUMNS),
                    "llmc/activation_int8_error.csv")
    mlflow.set_tag("llmc.act_worst_layer", worst)


AWQ_COLUMNS = ("smooth", "balance", "channel_max_over_median", "scale_max_over_min",
               "error_identity", "error_best", "error_left")


AWQ_METRICS = ("awq_mappings", "awq_error_left_median", "awq_error_left_min",
               "awq_channel_peak_median")  # awq_summary's, on the variant run too


def awq_summary(rows: list[dict]) -> dict:
    """AWQ's scale search in four numbers (llmc_oneshot.AwqProbe): the mappings searched, the
    median and least share of plain rounding's module output error its scales left (1 = they
    bought nothing), and the median input-channel peak (max over median of mean |x|)."""
    from statistics import median
    left = [r["error_left"] for r in rows if r.get("error_left") is not None]
    peak = [r["channel_max_over_median"] for r in rows if r.get("channel_max_over_median")]
    if not left:
        return {}
    mappings, left_median, left_min, peak_median = AWQ_METRICS
    return {mappings: float(len(rows)), left_median: median(left), left_min: min(left),
            **({peak_median: median(peak)} if peak else {})}


def log_awq(rows: list[dict]) -> None:
    """The per-mapping table of AWQ's scale search (CSV, in the model's order) on the run."""
    import mlflow
    if not rows or mlflow.active_run() is None:
        return
    mlflow.log_text(csv_table(rows, AWQ_COLUMNS), "llmc/awq_scale_search.csv")


def modifier_recipes(options: dict) -> dict[str, int]:
    """The versions (MODIFIER_RECIPE) of the modifiers these options run, {} for none: in the
    oneshot's cache key and the quantise stage's (a stage reusing an older oneshot result would
    keep that result's metrics)."""
    names = [next(iter(m)) for m in plain(options.get("modifiers")) or []]
    return {n: MODIFIER_RECIPE[n] for n in names if n in MODIFIER_RECIPE}


def eval_need(shape, **_) -> tuple[str, int]:
    """(runtime, weight bytes) of the evaluation: transformers decompresses to FP16 on CPU."""
    return "transformers", shape.fp16_bytes


def check_machine(tools: Path, **_) -> None:
    """Before any stage: llm-compressor's own environment exists (make llmc)."""
    llmc_python()


def memory_need(shape, n_ctx: int, **_) -> list[tuple[str, int, str]]:
    """Peak RAM of this variant's stages (quantpipe.memory): the calibration holds the model in
    float32 (COMPUTE_DTYPE), the evaluation the decompressed FP16 weights."""
    from quantpipe.evaluate.transformers_runtime import HFRuntime
    fix = ("calibrate on a machine with more memory (llm-compressor on a GPU), or drop this "
           "variant; GGUF variants quantise in far less")
    return [(f"llm-compressor calibration ({COMPUTE_DTYPE})",
             HFRuntime.memory_for(2 * shape.fp16_bytes, shape, n_ctx), fix),
            ("the evaluation of the decompressed folder (transformers)",
             HFRuntime.memory_for(shape.fp16_bytes, shape, n_ctx), fix)]


def plain(value):
    """Hydra hands a partial's arguments over as DictConfig / ListConfig: plain JSON-able data."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@register(recipe=RECIPE, libraries=LIBRARIES, other_versions=other_versions,
          recipe_of=modifier_recipes, variant_metrics=AWQ_METRICS,
          check_machine=check_machine, memory_need=memory_need, eval_need=eval_need)
def quantize_llmc(src: Path, dst: Path, ctx, modifiers: list, weights: dict,
                  input_activations: dict | None = None, serve_activations: dict | None = None,
                  ignore: tuple = ("lm_head",), calibration: dict | None = None,
                  activation_overrides: list | None = None, save_format: str | None = None) -> dict:
    """`activation_overrides`: [{targets: [names or re:regexes], input_activations: scheme or
    null}], the layers named served with other activations than `input_activations` (e.g.
    those whose inputs one static int8 scale cannot hold: dynamic per token, or 16-bit).
    `save_format`: the compressed-tensors format of the folder (null: the one llm-compressor
    infers, pack-quantized for int4 weights, int-quantized for W8A8)."""
    py = llmc_python()
    (modifiers, weights, input_activations, serve_activations, ignore, calibration,
     activation_overrides) = map(plain, (modifiers, weights, input_activations, serve_activations,
                                         ignore, calibration, activation_overrides))
    s = calibration_settings(calibration)
    key = "quant.backend.calibration.text_file"
    text, source = load_text(s["text_file"], "calib", key)
    # round-to-nearest of the weights (QuantizationModifier, no static activations) calibrates
    # nothing: the oneshot runs data-free, and the text is only scored (calib_kld), not an input
    calibrated = any(next(iter(m)) != "QuantizationModifier" for m in modifiers) or any(
        a and not a.get("dynamic") for a in [input_activations] + [
            o["input_activations"] for o in activation_overrides or []])
    spec = {"modifiers": modifiers, "weights": weights, "input_activations": input_activations,
            "ignore": list(ignore), "samples": s["samples"], "seq_len": s["seq_len"],
            "threads": ctx.threads, "compute_dtype": COMPUTE_DTYPE,
            "activation_overrides": activation_overrides or [], "calibrate": calibrated,
            "save_format": save_format}
    extra = modifier_recipes({"modifiers": modifiers})
    fp = art.fingerprint("llmc", ctx.src_fingerprint, spec, art.fingerprint(text), llmc_version(py),
                         ONESHOT_RECIPE, *([extra] if extra else []))
    folder, prov, reused = art.ensure_cached(
        ctx.artifacts, "llmc", fp, lambda tmp: run_oneshot(py, Path(src), tmp, text, spec),
        {"merged": ctx.src_fingerprint, "calibration_source": source, "spec": spec})
    log.info("llm-compressor: %s %s", "reusing" if reused else "calibrated", folder)
    if serve_activations:
        swap_activations(folder, dst, serve_activations)
    else:  # the cached folder itself, hard-linked (as the fp16 baseline is)
        from quantpipe.quantize.hf import save_fp16
        save_fp16(folder, dst, ctx)
    res = prov["result"]
    metrics = dict(res["metrics"])
    if serve_activations:  # the oneshot scored the calibrated scheme, not the one swapped in
        metrics = {k: v for k, v in metrics.items() if not k.startswith(CALIB_SCORE_PREFIX)}
    rows = served_error(res.get("activations", []), serve_activations)
    act_metrics, worst = activation_summary(rows)
    log_activations(rows, worst)
    if res.get("awq_missing"):
        log.warning("llm-compressor: AWQ's scale search was not recorded (%s)", res["awq_missing"])
    awq_metrics = awq_summary(res.get("awq", []))
    log_awq(res.get("awq", []))
    return {"artifact": ".",
            "metrics": {**metrics, **act_metrics, **awq_metrics, "llmc_reused": float(reused)},
            "runtime": "transformers",
            "calibration": [{"name": "calibration-text", "text_file": s["text_file"],
                             "split": "calib", "key": key}] if calibrated else [],
            # no int4/int8 kernel runs these on CPU: transformers decompresses to fp16
            "speed": {"native": False, "rename_suffix": "_decompressed",
                      "why": "compressed-tensors decompressed to fp16 on CPU; the format's speed "
                             "needs vLLM's kernels on a GPU"},
            "group_sizes": res.get("group_sizes", {})}
