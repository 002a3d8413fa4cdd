"""Evaluation of one variant: size on disk, speed, memory and quality against FP16.

One protocol for every format. The eval text is tokenised once with the merged model's
tokenizer; those ids feed both runtimes (transformers for HF folders, llama.cpp for GGUF). The
FP16 reference (top-k log-probs per scored position) is computed once per merged model and
eval setting and cached; by default on llama.cpp over the F16 GGUF of the merged model (the
one the GGUF variants are quantised from), memory-mapped, so it needs no more RAM than the
model's own storage: transformers would need float32 for a reference as exact (4 bytes a
weight: 27.5 GB for a 7B), and its FP16 matmuls run at a quarter of float32's speed on this
AVX2 CPU (`eval.reference_runtime`, README "Evaluation at scale").

Each measurement runs in a fresh worker process (quantpipe.evaluate.worker) whose peak memory
is estimated first and refused up front when it cannot fit (quantpipe.memory). A variant's
results are cached by its fingerprint + protocol + eval-text digest: an unchanged sweep reuses
them (the log says `reusing`); `eval.speed.remeasure=true` re-measures the speed only.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quantpipe import artifacts as art
from quantpipe import memory
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.evaluate import harness, runtimes
from quantpipe.evaluate import vllm_runtime as vllm
from quantpipe.evaluate.finetune import score_base
from quantpipe.evaluate.metrics import first_scored, windows
from quantpipe.evaluate.tasks import load_tasks
from quantpipe.names import Artifact, Metric, Tag

log = logging.getLogger(__name__)
# bump when the worker's protocol or metrics change: cached evaluations are then recomputed
EVAL_RECIPE = "eval-3"
# what a variant's evaluation records beyond the recipe (a new one re-scores the variants, not
# the FP16 reference): per-window means for the report's paired comparisons
VARIANT_RECORD = "per-window-1"
SPEED_KEYS = (Metric.LOAD_S, Metric.TTFT_MS, Metric.PREFILL_TOK_S, Metric.DECODE_TOK_S,
              Metric.DECODE_TOK_S_MIN, Metric.DECODE_TOK_S_MAX, Metric.PEAK_RSS_MB,
              Metric.PEAK_GPU_MB)


def weights_size(path: Path) -> int:
    return art.size_bytes(path, None if Path(path).is_file() else runtimes.weight_suffixes())


def libraries() -> tuple[str, ...]:
    """The runtimes' libraries: a new llama.cpp or transformers recomputes the cached figures."""
    return (*runtimes.libraries(), "numpy")


def run_worker(spec: dict, need: int, limit_gb: float | None, what: str) -> None:
    """Run one measurement in a fresh process; its own peak RSS goes to the stage's record.
    A worker ended by a signal is explained: SIGKILL is almost always the kernel's OOM killer."""
    memory.check(what, need, limit_gb, _memory_fix(spec))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "parent_pid": os.getpid()}, f)
    try:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen([sys.executable, "-m", "quantpipe.evaluate.worker", f.name],
                                env=env)
        try:
            status, peak_mb = _wait_sampling(proc)
        except BaseException:  # SIGTERM (recovery.Terminated) or Ctrl-C: the worker goes too
            proc.kill()
            proc.wait()
            raise
    finally:
        os.unlink(f.name)
    memory.note_child_peak(peak_mb)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = signal.Signals(-code).name
        why = (" - SIGKILL with no message is almost always the kernel's out-of-memory killer"
               if -code == signal.SIGKILL else "")
        raise ConfigError("memory", f"{what} was killed by {sig}{why}; its peak was estimated at "
                          f"{memory.fmt_gib(need)} ({memory.available_note(limit_gb)} when it "
                          f"started, {peak_mb / 1024:.1f} GiB reached)", _memory_fix(spec))
    if code != 0:
        raise RuntimeError(f"{what} failed (worker exit {code}; its error is printed above)")


def _wait_sampling(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for the worker, sampling its own VmHWM (a signal-killed process leaves none)."""
    peak = 0.0
    while True:
        peak = max(peak, memory.own_peak_mb(proc.pid))
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, peak
        time.sleep(0.05)


def _memory_fix(spec: dict) -> str:
    return ("evaluate on a machine with more memory, lower eval.n_ctx, drop this variant from "
            "the sweep, or score the reference with eval.reference_runtime=llama.cpp (memory-"
            "mapped F16 file)" if spec.get("mode") == "reference" else
            "evaluate on a machine with more memory (or a GPU), lower eval.n_ctx, or drop this "
            "variant from the sweep; variants on llama.cpp run memory-mapped in far less")


def prepare_ids(cfg: DictConfig, merged: Path, text: str) -> tuple[np.ndarray, int | None]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged)
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    if len(ids) < cfg.eval.n_ctx:
        raise ConfigError("eval.text_file", f"the eval text has {len(ids)} tokens, fewer than "
                          f"one window (eval.n_ctx={cfg.eval.n_ctx})",
                          "use a longer text or a smaller eval.n_ctx")
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    return ids, bos


def _vllm_key(cfg: DictConfig) -> dict:
    """What decides vLLM's figures: its settings, its venv's versions, its script."""
    return {"vllm": OmegaConf.to_container(cfg.eval.vllm), "recipe": vllm.RECIPE,
            "versions": vllm.versions(),
            "script": art.fingerprint(vllm.SCRIPT.read_bytes())}


def _protocol(cfg: DictConfig) -> dict:
    """What decides the FP16 reference's content (and so its cache key)."""
    e = cfg.eval
    return {"n_ctx": e.n_ctx, "n_windows": e.n_windows, "kld_top_k": e.kld_top_k,
            "threads": cfg.threads, "max_minutes": e.max_minutes,
            "generation": OmegaConf.to_container(e.generation)}


def budget_s(cfg: DictConfig) -> float | None:
    return None if cfg.eval.max_minutes is None else 60.0 * cfg.eval.max_minutes


def evaluate_variant(cfg: DictConfig, merged: dict, variant: dict,
                     base: dict | None = None) -> dict:
    """Metrics for `variant` (a dict with path and fingerprint) against the FP16 `merged` model;
    with `base` (the model before the adapter was merged), also how much of the fine-tune it
    keeps. Reused from the evaluation cache when nothing that decides them changed."""
    import mlflow

    from quantpipe import tracking
    e = cfg.eval
    text, source = load_text(e.text_file, "eval", "eval.text_file")
    tracking.log_dataset("eval-text", text, source, context="evaluation")
    text_fp = art.fingerprint(text)
    tasks = load_tasks(e.tasks_file)
    lm = harness.check(cfg)  # lm-eval tasks (None: none asked for)
    versions = tracking.versions_of(libraries())
    key = art.fingerprint("evaluation", EVAL_RECIPE, VARIANT_RECORD, versions,
                          variant["fingerprint"], merged["fingerprint"],
                          base and base["fingerprint"], _protocol(cfg), e.reference_runtime,
                          OmegaConf.to_container(e.ci), tasks, e.tasks_max_new_tokens, text_fp,
                          *([lm, tracking.versions_of(harness.LIBRARIES)] if lm else []),
                          *([_vllm_key(cfg)] if vllm.wanted(cfg, variant["runtime"]) else []))

    def build(tmp: Path) -> dict:
        return _measure(cfg, merged, variant, base, tasks, text, source, text_fp, lm)

    folder, prov, reused = art.ensure_cached(Path(cfg.paths.artifacts), "evaluation", key, build,
                                             {"variant": variant["fingerprint"],
                                              "merged": merged["fingerprint"]})
    result = prov["result"]
    metrics = dict(result["metrics"])
    if reused:
        log.info("evaluate: reusing %s (quality%s)", folder,
                 "" if cfg.eval.speed.remeasure else " and speed; eval.speed.remeasure=true "
                 "measures the speed again")
        if cfg.eval.speed.remeasure:
            metrics.update(_remeasure_speed(cfg, merged, variant, folder))
        elif (folder / "speed.json").exists():  # the latest re-measurement
            metrics.update(json.loads((folder / "speed.json").read_text()))
    mlflow.set_tags(result.get("vllm_tags") or {})
    mlflow.set_tags({Tag.EVAL_RUNTIME: result["runtime"],
                     "eval.reference_runtime": result["reference_runtime"],
                     "eval.reused": str(reused).lower(), "eval.scored": result["scored"]})
    mlflow.log_dict(result["sample"], "sample.json")  # prompt, output, stopped_at_eos
    if result.get("task_answers"):
        mlflow.log_dict(result["task_answers"], "task_answers.json")
    if result.get("lm_eval_samples"):  # lm-eval's per-document record, for each task
        mlflow.log_dict(result["lm_eval_samples"], "lm_eval_samples.json")
    if result.get("per_window"):  # the report's paired comparisons of two variants
        mlflow.log_dict(result["per_window"], Artifact.PER_WINDOW)
    return metrics


def _measure(cfg, merged: dict, variant: dict, base: dict | None, tasks: list | None, text: str,
             source: str, text_fp: str, lm: dict | None = None) -> dict:
    e = cfg.eval
    vpath = Path(variant["path"])
    runtime = variant["runtime"]  # the backend's result names it
    rt = runtimes.get(runtime)
    rt.check_artifact(vpath)  # refuse a broken artefact before any worker runs
    shape = memory.shape_of(merged["path"])
    ids, bos = prepare_ids(cfg, merged["path"], text)
    # the variant's budget first: refused before the reference is scored for it
    # the format's own speed profile (its eval_need) where it gives one, else its runtime's
    check_budget(vpath, variant.get("throughput", runtime), shape, cfg,
                 len(windows(ids, e.n_ctx, e.n_windows, bos)),
                 f"the evaluation of {vpath.name}")
    ref = reference(cfg, merged, ids, bos, shape, source, text_fp)
    base_nll = score_base(cfg, base, merged, {**_protocol(cfg), "bos": bos}, ref, shape, text_fp)
    if lm:  # the FP16 and base models' task scores, each cached: the paired comparisons' sides
        lm = {**lm, "reference": str(harness.task_scores(cfg, merged, merged, lm, ref, bos, shape,
                                                         "FP16 tasks")),
              "base": base and str(harness.task_scores(cfg, base, merged, lm, ref, bos, shape,
                                                       "base tasks (no adapter)"))}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        run_job(cfg, "variant", vpath, runtime, out, shape, f"the evaluation of {vpath.name}",
                bos=bos, speed=OmegaConf.to_container(e.speed),
                sample=OmegaConf.to_container(e.sample), ci=OmegaConf.to_container(e.ci),
                tasks=tasks, tasks_max_new_tokens=e.tasks_max_new_tokens,
                desc=f"score {cfg.quant.name}",  # a folder variant is named by its digest
                ids=str(ref / "ids.npy"), reference=str(ref / "reference.npz"),
                text=text if rt.checks_tokenizer else None,
                base_nll=base_nll and str(base_nll), lm_eval=lm, tokenizer=str(merged["path"]))
        result = json.loads(out.read_text())
    metrics = result["metrics"]
    fp16_bytes = weights_size(merged["path"])
    size = weights_size(vpath)
    metrics.update({Metric.SIZE_MB: size / 2**20, Metric.FP16_SIZE_MB: fp16_bytes / 2**20,
                    Metric.COMPRESSION: fp16_bytes / size,
                    Metric.BITS_PER_WEIGHT: 8 * size / shape.n_params})
    vllm_tags = None
    if vllm.wanted(cfg, runtime):  # the same windows the worker scored, through vLLM
        n = int(metrics[Metric.EVAL_WINDOWS_SCORED])
        wins = windows(ids, e.n_ctx, e.n_windows, bos)[:n]
        tok = lm and _tokenizer(merged)
        requests = lm and _task_requests(tok, lm, e.n_ctx, bos)
        got, vllm_tags, answers = vllm.measure(cfg, vpath, wins,
                                               ids[: e.speed.prompt_tokens].tolist(),
                                               first_scored(e.n_ctx), cfg.memory.limit_gb, requests)
        if "vllm_ppl" in got:
            got["vllm_ppl_diff_pct"] = 100 * (got["vllm_ppl"] / metrics["ppl"] - 1)
        if answers is not None:
            got.update(_vllm_task_metrics(tok, lm, e.n_ctx, bos, requests, answers, metrics))
        metrics.update(got)
    elif vllm.mode(cfg) == "auto" and vllm.serves(runtime):  # said, not silently dropped
        vllm_tags = {"vllm.skipped": f"no vLLM environment: {vllm.FIX}"}
    ref_meta = json.loads((ref / "reference.json").read_text())
    scored = (f"{int(metrics[Metric.EVAL_WINDOWS_SCORED])} of "
              f"{int(metrics[Metric.EVAL_WINDOWS_PLANNED])} windows x {e.n_ctx} tokens "
              f"({int(metrics[Metric.EVAL_TOKENS_SCORED])} scored tokens)")
    return {"metrics": metrics, "runtime": result["runtime"], "sample": result["sample"],
            "reference_runtime": ref_meta["runtime"], "scored": scored,
            "task_answers": result.get("task_answers"),
            "lm_eval_samples": result.get("lm_eval_samples"), "vllm_tags": vllm_tags,
            "per_window": result.get("per_window")}


def _tokenizer(merged: dict):
    """The merged model's tokenizer: the token ids of every runtime's task requests."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(merged["path"])


def _task_requests(tok, lm: dict, n_ctx: int, bos: int | None) -> dict:
    """The eval.lm_eval tasks' requests as token ids, for vLLM (task_lm.record)."""
    from quantpipe.evaluate import task_lm
    return task_lm.record(tok, lm, n_ctx, bos)


def _vllm_task_metrics(tok, lm: dict, n_ctx: int, bos: int | None, requests: dict,
                       answers: dict, metrics: dict) -> dict:
    """vllm_task_<task>_<metric> (and _stderr) from vLLM's answers, scored by lm-eval as every
    runtime's are; `_diff_pts`: vLLM minus the project's runtime on the same variant, in points
    (the runtimes' arithmetic: bfloat16 kernels against float16 or llama.cpp)."""
    from quantpipe.evaluate import task_lm
    res = task_lm.replay(tok, lm, n_ctx, bos, requests, answers, "vLLM tasks")
    out = {f"vllm_{k}": v for k, v in res["metrics"].items()}
    for k, v in res["metrics"].items():
        if not k.endswith("_stderr") and k in metrics:
            out[f"vllm_{k}_diff_pts"] = 100 * (v - metrics[k])
    return out


def estimate_seconds(path: Path, runtime: str, shape: memory.Shape, cfg: DictConfig,
                     n_windows: int, speed: bool = True) -> float:
    """Rough wall time of one worker on `path`: see estimate_seconds_for."""
    return estimate_seconds_for(weights_size(path), runtime, shape, cfg, n_windows, speed)


def estimate_seconds_for(weights: int, runtime: str, shape: memory.Shape, cfg: DictConfig,
                         n_windows: int, speed: bool = True) -> float:
    """Rough wall time of one worker on `weights` bytes (`runtime` a runtime's name or a format's
    own Throughput, quantpipe.evaluate.runtimes): loading
    (disk at ~1 GB/s), the chat sample and the speed runs, then `n_windows` windows, the
    greedy continuations of the generation prompts and the answers to eval.tasks_file's prompts
    (both decoded token by token: at 3B on CPU, bitsandbytes' 8 x 16 generation tokens alone
    are ~13 min). Used for the ETA and, before any stage and again before scoring, to refuse
    what cannot fit the budget. The lm-eval tasks are not in it (task_seconds): their cost is
    bounded by eval.lm_eval.limit, not by eval.max_minutes."""
    e = cfg.eval
    _, flops, bps, decode_bytes = runtimes.throughput_of(runtime)
    read = weights if decode_bytes == "file" else shape.fp16_bytes
    per_token = 2 * shape.n_params / flops
    decode_token = read / bps
    g = e.generation
    t = (weights / 1e9 + n_windows * e.n_ctx * per_token
         + g.prompts * (g.prompt_tokens * per_token + g.new_tokens * decode_token)
         + n_tasks(e.tasks_file) * e.tasks_max_new_tokens * decode_token)
    if speed:
        runs = e.speed.warmup + e.speed.repeats
        t += runs * (e.speed.prompt_tokens * per_token + e.speed.new_tokens * decode_token)
        t += e.sample.max_new_tokens * decode_token
    return t


def task_seconds(weights: int, runtime: str, shape: memory.Shape, cfg: DictConfig,
                 requests: int | None = None) -> float:
    """Rough wall time of one scoring of the eval.lm_eval tasks: one forward of about
    harness.REQUEST_TOKENS tokens per request (on SmolLM2-135M the shipped task's 672 requests
    took 27 s on llama.cpp F16 and 100 s on transformers FP16 at 2 threads; this estimates 42 s
    and 215 s)."""
    if requests is None:  # `requests`: harness.estimate_requests, when the caller has it
        requests = harness.estimate_requests(harness.settings(cfg))
    return (requests * harness.REQUEST_TOKENS * 2 * shape.n_params
            / runtimes.throughput_of(runtime).flops)


def n_tasks(tasks_file: str | None) -> int:
    """Prompts in an eval.tasks_file (0 without one; ConfigError on a bad file)."""
    return len(load_tasks(tasks_file) or [])


def check_budget(path: Path, runtime: str, shape: memory.Shape, cfg: DictConfig, n_windows: int,
                 what: str, speed: bool = True) -> None:
    """Log the ETA; refuse up front when even one window (and the speed runs) would overrun
    eval.max_minutes."""
    full = estimate_seconds(path, runtime, shape, cfg, n_windows, speed)
    log.info("%s: about %.0f min estimated for %d windows (eval.max_minutes=%s)", what,
             full / 60, n_windows, cfg.eval.max_minutes)
    refuse_over_budget(estimate_seconds(path, runtime, shape, cfg, 1, speed), cfg, what)


def refuse_over_budget(least_s: float, cfg: DictConfig, what: str) -> None:
    """ConfigError when `least_s` (the speed runs, generation prompts and one window) is over
    twice the budget."""
    budget = budget_s(cfg)
    if budget is not None and least_s > 2 * budget:
        raise ConfigError("eval.max_minutes", f"{what} needs about {least_s / 60:.0f} min for the "
                          f"speed runs, generation prompts and one window alone (estimate), over "
                          f"twice the budget of {cfg.eval.max_minutes} min",
                          "raise eval.max_minutes, evaluate on a GPU or a faster machine, or "
                          "drop this variant; variants on llama.cpp run several times faster on CPU")


def run_job(cfg: DictConfig, mode: str, artifact: Path, runtime: str, out: Path,
            shape: memory.Shape, what: str, float32: bool = False, **fields) -> None:
    """One worker job, one spec for every mode (variant, reference, tasks, speed): the
    evaluation's protocol, the artefact and the runtime that opens it, where to write, then
    the mode's own `fields`. Its peak memory is the runtime's estimate, refused up front when
    it cannot fit."""
    spec = {**_protocol(cfg), "bos": None, "max_seconds": budget_s(cfg), "text": None,
            "mode": mode, "artifact": str(artifact), "runtime": runtime, "float32": float32,
            "out": str(out), **fields}
    need = runtimes.get(runtime).memory_for(weights_size(artifact), shape, cfg.eval.n_ctx,
                                            float32)
    run_worker(spec, need, cfg.memory.limit_gb, what)


def reference_pass(cfg: DictConfig, kind: str, fp: str, model: dict, inputs: dict, label: str,
                   shape: memory.Shape, ids_file: Callable[[Path], Path], n_windows: int,
                   out_name: str, bos: int | None, finish: Callable[[Path, Path], dict],
                   **fields) -> tuple[Path, bool]:
    """`model` scored on the FP16 reference's runtime (eval.reference_runtime) over the
    evaluation's windows, cached under artifacts/<kind>/<fp>/<out_name>: the FP16 reference
    itself (top-k log-probs) and the base model's NLL take this one path. `ids_file(tmp)` is
    where the token ids lie, `finish(tmp, artifact)` the cache entry's result."""
    setting = str(cfg.eval.reference_runtime)
    rt, float32 = runtimes.reference_runtime(setting)
    what = f"{label} ({setting})"

    def build(tmp: Path) -> dict:
        artifact = rt.reference_artifact(cfg, model)
        ids = ids_file(tmp)
        check_budget(artifact, rt.name, shape, cfg, n_windows, what, speed=False)
        run_job(cfg, "reference", artifact, rt.name, tmp / out_name, shape, what, float32,
                bos=bos, ids=str(ids), **fields)
        return finish(tmp, artifact)

    folder, _, reused = art.ensure_cached(Path(cfg.paths.artifacts), kind, fp, build, inputs)
    return folder, reused


def reference(cfg: DictConfig, merged: dict, ids: np.ndarray, bos: int | None,
              shape: memory.Shape, source: str, text_fp: str) -> Path:
    """The cached FP16 reference folder (ids.npy, reference.npz, reference.json)."""
    e = cfg.eval
    runtime = str(e.reference_runtime)
    if runtime not in runtimes.reference_settings():
        raise ConfigError("eval.reference_runtime", f"{runtime!r} is not a reference runtime",
                          f"choose one of {', '.join(runtimes.reference_settings())}")
    from quantpipe.tracking import versions_of
    fp = art.fingerprint("reference", EVAL_RECIPE, versions_of(libraries()), merged["fingerprint"],
                         {**_protocol(cfg), "bos": bos}, runtime, text_fp)
    n_planned = int(len(windows(ids, e.n_ctx, e.n_windows, bos)))

    def save_ids(tmp: Path) -> Path:
        np.save(tmp / "ids.npy", ids)
        return tmp / "ids.npy"

    def finish(tmp: Path, artifact: Path) -> dict:
        meta = {"runtime": runtime, "artifact": Path(artifact).name,
                "n_windows_planned": n_planned}
        (tmp / "reference.json").write_text(json.dumps(meta))
        return meta

    folder, reused = reference_pass(cfg, "reference", fp, merged,
                                    {"merged": merged["fingerprint"], "text_source": source},
                                    "the FP16 reference", shape, save_ids, n_planned,
                                    "reference.npz", bos, finish)
    log.info("reference: %s %s", "reusing" if reused else "built", folder)
    return folder


def reference_artifact(cfg: DictConfig, model: dict) -> Path:
    """What a reference pass of `model` (the merged model's, or the base's for fine-tune
    retention) runs on, as eval.reference_runtime's runtime builds it."""
    rt, _ = runtimes.reference_runtime(str(cfg.eval.reference_runtime))
    return rt.reference_artifact(cfg, model)


def _remeasure_speed(cfg, merged: dict, variant: dict, folder: Path) -> dict:
    """Load time, speed and peak memory measured again; the quality figures stay cached."""
    e = cfg.eval
    vpath = Path(variant["path"])
    shape = memory.shape_of(merged["path"])
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.npy"
        text, _ = load_text(e.text_file, "eval", "eval.text_file")
        np.save(ids, prepare_ids(cfg, merged["path"], text)[0])
        out = Path(tmp) / "metrics.json"
        run_job(cfg, "speed", vpath, variant["runtime"], out, shape,
                f"the speed measurement of {vpath.name}", ci={}, tasks=None, ids=str(ids),
                speed=OmegaConf.to_container(e.speed), sample=OmegaConf.to_container(e.sample))
        speed = {k: v for k, v in json.loads(out.read_text())["metrics"].items() if k in SPEED_KEYS}
    art.write_json(folder / "speed.json", speed)
    return speed
