"""The pipeline, top to bottom: base -> adapter -> merge -> quantise -> evaluate -> publish.

`run(cfg)` is what `make pipeline +quant=int4` ends up calling (through pipelines/run.py); tests
call it directly with a shrunken config. Each stage is a nested MLflow run; a stage whose
fingerprint (inputs + config) matches a finished artefact reuses it, so a sweep merges once and
quantises once per format. Any exception ends the stage run, and the pipeline run, FAILED.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from quantpipe import artifacts as art
from quantpipe import recovery, schema, tracking
from quantpipe.console import print_summary
from quantpipe.errors import ConfigError
from quantpipe.names import Gate, Kind, Metric, Stage, Tag

log = logging.getLogger(__name__)
WEIGHT_FILES = (".safetensors", ".bin")
# version of the backend result's keys (artifact, runtime, calibration, speed, publish): part of
# the quantise fingerprint, so a cache entry written before a key existed is rebuilt, not misread
RESULT_CONTRACT = 2
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline by default: nothing is fetched at run time
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
import mlflow  # noqa: E402


def run(cfg: DictConfig, parent_run_id: str | None = None) -> dict[str, float]:
    """Run every stage for `cfg.quant`; return the variant's metrics."""
    schema.check(cfg)  # types, ranges and backend options: before any run or stage
    quant = require_quant(cfg)
    set_threads(cfg.threads)
    # a sweep job: the launcher found the server up, so a restart is waited out (bounded)
    tracking.setup(cfg.tracking, wait_s=tracking.RETRY_WAIT_S if parent_run_id else 0.0)
    recovery.recover(cfg)  # close runs of killed pipelines, clean their temporaries
    tags = {Tag.KIND: Kind.VARIANT, Tag.QUANT_NAME: str(quant.name),
            Tag.QUANT_FAMILY: str(quant.family), Tag.QUANT_METHOD: str(quant.method),
            **tracking.provenance_tags(), **recovery.process_tags()}
    with mlflow.start_run(run_name=str(quant.name), parent_run_id=parent_run_id, tags=tags,
                          nested=parent_run_id is not None) as variant_run, tracking.error_tag():
        mlflow.log_params(tracking.flat_params(cfg))
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.json")
        preflight(cfg)
        base = stage_base(cfg)
        adapter = stage_adapter(cfg, base)
        merged = stage_merge(cfg, base, adapter)
        variant = stage_quantise(cfg, merged)
        metrics = stage_evaluate(cfg, merged, variant, base if adapter else None)
        published = stage_publish(cfg, variant, metrics)
        mlflow.log_metrics(metrics)
        log.info("done: run %s, %s", variant_run.info.run_id, _summary(metrics))
    print_summary(str(quant.name), metrics, published, variant_run.info.run_id)
    return metrics


def require_quant(cfg: DictConfig) -> DictConfig:
    if "quant" not in cfg or cfg.quant is None:
        from quantpipe.config import quant_options
        raise ConfigError("quant", "no quantisation variant chosen",
                          f"add +quant=<name>, one of: {', '.join(quant_options())}")
    return cfg.quant


def preflight(cfg: DictConfig) -> None:
    """Bad input that can be seen in seconds, refused before hours of merging and converting:
    output folders that cannot be written, a publish name leading out of paths.quantized, a
    backend's own check of its arguments (e.g. an unknown llama.cpp type) and of this machine
    (its `check_machine`: llama.cpp's tools, llm-compressor's environment), a calibration text
    that is missing, a tasks file that is not JSONL of prompts and references, lm-eval task
    names it does not know or whose local data files are missing, an eval text
    missing or shorter than one window (counted with the model's tokenizer, cached by digest),
    and the memory and time the stages will need."""
    from quantpipe.data import load_text
    from quantpipe.evaluate import harness
    from quantpipe.evaluate import vllm_runtime as vllm
    from quantpipe.evaluate.tasks import load_tasks
    from quantpipe.token_count import check_eval_text
    # the backend's options were checked by schema.check at the top of run()
    art.check_writable(Path(cfg.paths.artifacts), "paths.artifacts")
    art.check_writable(Path(cfg.paths.quantized), "paths.quantized")
    art.inside(Path(cfg.paths.quantized), str(cfg.quant.publish), "quant.publish")
    check, options = backend_need(cfg, "check_machine")
    if check is not None:
        check(Path(cfg.paths.tools), **options)
    for key, text_file in _text_files(options, "quant.backend"):
        load_text(text_file, "calib", key)
    load_tasks(cfg.eval.tasks_file)
    harness.check(cfg)  # lm-eval's settings, task names and the tasks' local data files
    vllm.check(cfg)  # eval.vllm.enabled=true needs .venv-vllm
    preflight_adapter(cfg)
    check_eval_text(cfg)
    preflight_memory(cfg)


def preflight_adapter(cfg: DictConfig) -> None:
    """A user's adapter folder (adapter.path) is a peft folder whose target modules the base
    has, by the names in the base's safetensors headers (the shapes are checked by the merge,
    which reads the tensors)."""
    from quantpipe import adapter, base, streaming
    if cfg.adapter.name == "none" or cfg.adapter.path is None:
        return
    path = adapter.validate_adapter_folder(Path(cfg.adapter.path), cfg.model.allow_pickle)
    if cfg.model.path is None:
        return  # the embedded base's names are known once the base stage has built it
    shards = streaming.shard_files(base.validate_hf_folder(Path(cfg.model.path), "model.path",
                                                           cfg.model.allow_pickle))
    if shards:
        streaming.check_targets(path, {k for s in shards for k in streaming.read_header(s)})


def _text_files(options: Any, prefix: str) -> list[tuple[str, str]]:
    """(config key, path) of every `text_file` a backend's options set (calibration texts)."""
    if not isinstance(options, dict):
        return []
    found = [(f"{prefix}.text_file", options["text_file"])] if options.get("text_file") else []
    return found + [kv for k, v in options.items() if k != "text_file"
                    for kv in _text_files(v, f"{prefix}.{k}")]


def preflight_memory(cfg: DictConfig) -> None:
    """Every stage's estimated peak RAM against what the machine has, before any stage runs:
    the merge, the variant's own stages (its backend's `memory_need`), the FP16 reference. The
    embedded default (135M parameters) is not checked: it needs under 2 GB anywhere."""
    from quantpipe import base, memory
    if cfg.model.path is None:
        return
    path = base.validate_hf_folder(Path(cfg.model.path), "model.path", cfg.model.allow_pickle)
    if not any(path.glob("*.safetensors")):
        return  # pickle weights (allow_pickle): no headers to read the shape from
    shape = memory.shape_of(path)
    stream_gb = cfg.merge.stream_above_gb
    streams = stream_gb is not None and shape.fp16_bytes / 2**30 > stream_gb
    needs = [("the LoRA merge" + (" (streamed)" if streams else " (in RAM, float32)"),
              memory.estimate_merge(shape, streams),
              "merge.stream_above_gb=0 merges tensor by tensor in far less memory")]
    need, options = backend_need(cfg, "memory_need")
    needs += need(shape, cfg.eval.n_ctx, **options)
    from quantpipe.evaluate import runtimes
    ref_rt, float32 = runtimes.reference_runtime(str(cfg.eval.reference_runtime))
    ref = ref_rt.memory_for(shape.fp16_bytes, shape, cfg.eval.n_ctx, float32)
    needs.append((f"the FP16 reference ({cfg.eval.reference_runtime})", ref,
                  "eval.reference_runtime=llama.cpp scores it memory-mapped from the F16 file"))
    for what, nbytes, fix in needs:
        memory.check(what, nbytes, cfg.memory.limit_gb, fix)
    log.info("memory: largest stage estimate %s, %s", memory.fmt_gib(max(n for _, n, _ in needs)),
             memory.available_note(cfg.memory.limit_gb))
    need, options = backend_need(cfg, "eval_need")
    preflight_time(cfg, shape, *need(shape, **options))


def backend_need(cfg: DictConfig, name: str) -> tuple[Callable | None, dict]:
    """A part of the variant's registered format (`memory_need`, `eval_need`, `check_machine`;
    None where the format has none) and the backend's options, `_target_` and friends left
    out."""
    from quantpipe.quantize import backend_options, format_of
    fmt = format_of(str(cfg.quant.backend.get("_target_", "")))
    return getattr(fmt, name), backend_options(cfg.quant)


def preflight_time(cfg: DictConfig, shape, runtime: str, weights: int) -> None:
    """The variant's evaluation against eval.max_minutes, before any stage: refused as the
    evaluation itself would refuse it (the speed runs, generation prompts and one window over
    twice the budget), from the backend's estimate of its runtime and weight bytes
    (`eval_need`)."""
    from quantpipe import evaluate
    from quantpipe.evaluate.runtimes import throughput_of
    what = (f"the evaluation of {cfg.quant.name} ({throughput_of(runtime).name}, about "
            f"{weights / 2**30:.1f} GiB)")
    full = evaluate.estimate_seconds_for(weights, runtime, shape, cfg, cfg.eval.n_windows)
    log.info("time: %s about %.0f min estimated for %d windows (eval.max_minutes=%s)", what,
             full / 60, cfg.eval.n_windows, cfg.eval.max_minutes)
    evaluate.refuse_over_budget(evaluate.estimate_seconds_for(weights, runtime, shape, cfg, 1),
                                cfg, what)
    from quantpipe.evaluate import harness
    if requests := harness.estimate_requests(harness.settings(cfg)):
        # the variant, then (once, cached) the FP16 and base models on the reference runtime
        from quantpipe.evaluate import runtimes
        ref = runtimes.reference_runtime(str(cfg.eval.reference_runtime))[0].name
        total = (evaluate.task_seconds(weights, runtime, shape, cfg, requests)
                 + (1 if cfg.adapter.name == "none" else 2)
                 * evaluate.task_seconds(shape.fp16_bytes, ref, shape, cfg, requests))
        log.info("time: eval.lm_eval tasks about %.0f min estimated (variant, FP16 and base "
                 "scored once each; cached)", total / 60)
        if cfg.eval.max_minutes is not None and total > 60 * cfg.eval.max_minutes:
            log.warning("eval.lm_eval: the tasks alone need about %.0f min on this model "
                        "(estimate), over eval.max_minutes=%s; eval.lm_eval.limit=<documents> "
                        "bounds them", total / 60, cfg.eval.max_minutes)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for the stages run in this process (merge, training, bnb).
    torch is not imported for this: its import is 3 s of a run that reuses every stage. If it
    is not loaded yet, OMP_NUM_THREADS sets them when a stage first imports it."""
    if not threads:
        return
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _summary(m: dict[str, float]) -> str:
    keys = (Metric.SIZE_MB, Metric.COMPRESSION, Metric.PPL, Metric.DELTA_PPL_PCT, Metric.KLD_MEAN,
            Metric.DECODE_TOK_S)
    return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def _provenance(cfg: DictConfig, inputs: dict[str, str]) -> dict[str, Any]:
    """provenance.json of a stage's artefact: paths in it relative to paths.root (or named by
    their package), so the same artefact built in another checkout says the same."""
    return art.portable({"inputs": inputs, "versions": tracking.library_versions(),
                         "git": tracking.git_sha(),
                         "config": OmegaConf.to_container(cfg, resolve=True)}, cfg.paths.root)


def made_by(module: Any) -> dict[str, Any]:
    """What makes a stage's artefact besides its inputs: the producing module's RECIPE (bumped
    when its code writes something else) and the versions of the LIBRARIES it declares. Part of
    the stage's cache key, so after `pip install -U peft` the merge is built again, not reused.
    A quantised variant's come from its registered format (quantpipe.quantize.Format.made_by)."""
    return {"recipe": getattr(module, "RECIPE", 0),
            "versions": tracking.versions_of(getattr(module, "LIBRARIES", ()))}


def quantise_key(backend_cfg: Any) -> Any:
    """The backend's settings as the quantise stage's cache key: any `text_file` a backend
    names (a calibration text) enters by its content digest, not its path (an edited file
    rebuilds; the same text elsewhere does not). null (the default calibration mix) and
    `builtin:<name>` enter by the digest of the text they stand for, so a changed default
    rebuilds too."""
    if isinstance(backend_cfg, dict):
        return {k: (_content(v) if k == "text_file" else quantise_key(v))
                for k, v in backend_cfg.items()}
    return backend_cfg


def _content(path: str | None) -> str | None:
    from quantpipe.data import load_text
    try:
        return art.fingerprint(load_text(path, "calib", "text_file")[0])
    except ConfigError:  # missing or unreadable: the backend's own check names it
        return path


def cached_stage(cfg: DictConfig, name: str, fp: str, build: Callable[[Path], dict],
                 inputs: dict[str, str], need_bytes: int = 0,
                 then: Callable[[Path], Any] | None = None) -> tuple[Path, dict]:
    """Run `build` as stage `name` inside its own MLflow run, or reuse a finished artefact.
    `need_bytes` estimates its output: the disk must hold it plus disk.margin_gb first.
    `then(folder)`, if given, runs inside the stage's run once the artefact is there."""
    params = {f"input.{k}": v for k, v in inputs.items()}
    with tracking.stage_run(name, **{Tag.FINGERPRINT: fp}):
        try:
            folder, prov, reused = art.ensure_cached(
                Path(cfg.paths.artifacts), name, fp,
                lambda tmp: art.portable(build(tmp), cfg.paths.root),
                lambda: _provenance(cfg, inputs),
                need_bytes=need_bytes, margin_bytes=int(cfg.disk.margin_gb * 2**30))
        except BaseException:
            mlflow.log_params(params)  # what the failed stage was given
            raise
        log.info("%s: %s %s", name, "reusing" if reused else "built", folder)
        # one write to the store, not four: 60 stage runs of a sweep each write these
        tracking.log_batch(params=params, metrics=prov["result"].get("metrics", {}),
                           tags={Tag.REUSED: str(reused).lower(),
                                 Tag.ARTIFACT: art.portable_path(folder, cfg.paths.root)})
        mlflow.log_dict(prov, "provenance.json")
        if then is not None:
            then(folder)
    return folder, prov


# --- stages ---------------------------------------------------------------------------------

def stage_base(cfg: DictConfig) -> dict[str, Any]:
    """The FP16 base: the user's folder as it is, or the embedded GGUF dequantised once."""
    from quantpipe import base
    if cfg.model.path is not None:
        path = base.validate_hf_folder(Path(cfg.model.path), "model.path", cfg.model.allow_pickle)
        fp = art.tree_fingerprint(path)
        shown = art.portable_path(path, cfg.paths.root)
        with tracking.stage_run(Stage.BASE, **{Tag.FINGERPRINT: fp}):
            mlflow.set_tags({Tag.REUSED: "external", Tag.ARTIFACT: shown})
            mlflow.set_tag(Tag.BASE_SOURCE, f"local folder {shown}")
            grid = grid_check(cfg, path, fp)
        mlflow.set_tag(Tag.BASE_SOURCE, f"local folder {shown}")
        mlflow.log_metrics(grid)  # on the variant run too: the report reads it there
        return {"path": path, "fingerprint": fp}
    source, inputs, need_bytes, build = base.embedded_source(cfg.model.embedded)
    fp = art.fingerprint(Stage.BASE, art.quick_file_fingerprint(source), made_by(base))
    grid = {}
    folder, _ = cached_stage(cfg, Stage.BASE, fp, build, inputs, need_bytes=need_bytes,
                             then=lambda built: grid.update(grid_check(cfg, built, fp)))
    mlflow.set_tag(Tag.BASE_SOURCE, base.embedded_note(cfg.model.embedded, source))
    mlflow.log_metrics(grid)
    return {"path": folder, "fingerprint": fp}


def grid_check(cfg: DictConfig, path: Path, base_fp: str) -> dict[str, float]:
    """Inside the base stage's run: the share of the base's weights on a 4-bit block grid
    (quantpipe.gridcheck), logged as a metric with its per-tensor table as an artefact. Built
    once per base and kept in artifacts/base-grid/<fp>/ beside the base's own cache entry, so
    a reused base (or a user's folder, which has no cache entry) logs it without reading its
    weights again: 0.4 s for SmolLM2's 135M weights, about 30 s for 7B (benchmarks/gridcheck.py)."""
    from quantpipe import gridcheck

    def build(tmp: Path) -> dict:
        table = gridcheck.check_folder(path)
        (tmp / gridcheck.TABLE).write_text(json.dumps(table, indent=1))
        pct = table["grid_aligned_pct"]  # None: no safetensors weights to read
        return {"metrics": {} if pct is None else {Metric.GRID_ALIGNED_PCT: pct},
                "seconds": table["seconds"]}

    folder, prov, reused = art.ensure_cached(
        Path(cfg.paths.artifacts), "base-grid", art.fingerprint(base_fp, made_by(gridcheck)),
        build, {"base": base_fp})
    metrics = prov["result"]["metrics"]
    if metrics:
        log.info("base: %.1f %% of its blocks of %d weights hold <= %d values (grid check %s)",
                 metrics[Metric.GRID_ALIGNED_PCT], gridcheck.BLOCK, gridcheck.LEVELS,
                 "cached" if reused else f"{prov['result']['seconds']:.1f} s")
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(folder / gridcheck.TABLE))
    return metrics


def stage_adapter(cfg: DictConfig, base: dict) -> dict[str, Any] | None:
    """The Day-2 LoRA adapter: the user's folder, none, or the demo adapter (trained once)."""
    from quantpipe import adapter
    if cfg.adapter.name == "none":
        return None
    if cfg.adapter.path is not None:
        path = adapter.validate_adapter_folder(Path(cfg.adapter.path), cfg.model.allow_pickle)
        return {"path": path, "fingerprint": art.tree_fingerprint(path)}
    train = OmegaConf.to_container(cfg.adapter.train, resolve=True)
    fp = art.fingerprint(Stage.ADAPTER, base["fingerprint"], train, cfg.seed, made_by(adapter))
    folder, _ = cached_stage(
        cfg, Stage.ADAPTER, fp,
        lambda tmp: adapter.train_demo_adapter(base["path"], tmp, train, cfg.seed, cfg.threads),
        {"base": base["fingerprint"]})
    return {"path": folder, "fingerprint": fp}


def stage_merge(cfg: DictConfig, base: dict, adapter_: dict | None) -> dict[str, Any]:
    """Merge the adapter into the base (float32), save FP16, check parity with the unmerged."""
    from quantpipe import merge
    from quantpipe.data import topics_text
    settings = OmegaConf.to_container(cfg.merge, resolve=True)
    adapter_fp = adapter_["fingerprint"] if adapter_ else "none"
    # streamed or in RAM, the merged weights are the same (tests/test_streaming.py checks it)
    fp = art.fingerprint(Stage.MERGE, base["fingerprint"], adapter_fp,
                         {k: v for k, v in settings.items() if k != "stream_above_gb"},
                         made_by(merge))
    folder, _ = cached_stage(
        cfg, Stage.MERGE, fp,
        lambda tmp: merge.merge_adapter(base["path"], adapter_ and adapter_["path"], tmp,
                                        topics_text("eval"), **settings),
        {"base": base["fingerprint"], "adapter": adapter_fp},
        need_bytes=art.size_bytes(base["path"], WEIGHT_FILES))
    return {"path": folder, "fingerprint": fp}


def stage_quantise(cfg: DictConfig, merged: dict) -> dict[str, Any]:
    """Quantise the merged FP16 model with the backend the quant config names (`_target_`)."""
    from quantpipe.quantize import QuantContext, build_backend, format_of
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    fmt = format_of(str(quant["backend"].get("_target_")))
    backend = build_backend(cfg.quant)
    ctx = QuantContext(artifacts=Path(cfg.paths.artifacts), tools=Path(cfg.paths.tools),
                       src_fingerprint=merged["fingerprint"], threads=cfg.threads)
    fp = art.fingerprint(Stage.QUANTISE, merged["fingerprint"], quantise_key(quant["backend"]),
                         fmt.made_by(quant["backend"]), RESULT_CONTRACT)
    # at most 2x the FP16 input (a backend may write a full-precision copy before quantising)
    folder, prov = cached_stage(cfg, Stage.QUANTISE, fp,
                                lambda tmp: backend(merged["path"], tmp, ctx),
                                {"merged": merged["fingerprint"]},
                                need_bytes=2 * art.size_bytes(merged["path"], WEIGHT_FILES))
    result = fmt.check_result(prov["result"])
    # the metrics the format shares with the variant run (the report reads them there, across
    # subjects and sweeps, without opening stage runs)
    mlflow.log_metrics({k: v for k, v in result.get("metrics", {}).items()
                        if k in fmt.variant_metrics})
    for rel in result.get("log_files", ()):  # e.g. the recipe that re-creates the artefact
        (mlflow.log_artifacts if (folder / rel).is_dir() else mlflow.log_artifact)(
            str(folder / rel), rel)
    for ds in result.get("calibration", []):
        # calibrated: the calibration text is an input of the variant, built or reused
        from quantpipe.data import load_text
        text, source = load_text(ds["text_file"], ds["split"], ds["key"])
        tracking.log_dataset(ds["name"], text, source, context="calibration")
    path = folder / result["artifact"]
    variant = {"path": path.resolve(), "fingerprint": fp, "folder": folder,
               "runtime": result["runtime"], "speed": result.get("speed", {"native": True}),
               "publish": result.get("publish", {})}
    from quantpipe import memory
    options = {k: v for k, v in quant["backend"].items() if not k.startswith("_")}
    variant["throughput"] = fmt.eval_need(memory.shape_of(Path(merged["path"])), **options)[0]
    return variant


def native_speed_only(metrics: dict[str, float], speed: dict) -> dict[str, float]:
    """Where no real kernel ran the format (e.g. compressed-tensors decompressed on CPU), its
    tokens/s are not the format's speed: kept under a suffixed name, never as decode_tok_s."""
    if speed.get("native", True):
        return metrics
    suffix = speed.get("rename_suffix", "_not_native")
    keys = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max")
    return {(k + suffix if k in keys else k): v for k, v in metrics.items()}


def stage_evaluate(cfg: DictConfig, merged: dict, variant: dict,
                   base: dict | None = None) -> dict[str, float]:
    """Size, speed and quality of the variant against the merged FP16 reference; with `base`
    (None when there is no adapter), the share of the fine-tune's gain it keeps."""
    from quantpipe.evaluate import evaluate_variant
    speed = variant["speed"]
    tags = {"eval.runtime": variant["runtime"]}
    if not speed.get("native", True):
        tags["eval.speed"] = f"not the format's speed: {speed.get('why')}"
    with tracking.stage_run("evaluate"):
        metrics = native_speed_only(evaluate_variant(cfg, merged, variant, base), speed)
        mlflow.log_metrics(metrics)
    mlflow.set_tags(tags)  # on the variant run: the report reads them there
    return metrics


def stage_publish(cfg: DictConfig, variant: dict, metrics: dict[str, float]) -> dict[str, str]:
    """Expose the variant under quantized/ and record whether it passes the quality gate;
    return the gate tags and where it was published."""
    from quantpipe.gate import check_gate
    from quantpipe.registry import publish_to_registry
    with tracking.stage_run(Stage.PUBLISH) as publish_run:
        passed, reason = check_gate(cfg.gate, metrics)
        gate_tags = {Tag.GATE: Gate.PASSED if passed else Gate.FAILED, Tag.GATE_REASON: reason}
        mlflow.set_tags(gate_tags)
        out = Path(cfg.paths.quantized)
        final = art.publish(variant["path"], out / str(cfg.quant.publish))
        publish_extras(variant, out)
        model_uri = tracking.log_model(final, cfg.tracking.log_model_max_mb, "model",
                                       variant["fingerprint"])
        published = art.portable_path(final, cfg.paths.root)  # resolved against paths.root
        mlflow.set_tag(Tag.PUBLISHED, published)
        publish_to_registry(cfg.registry, publish_run.info.run_id, model_uri,
                            publish_run.data.tags[Tag.PARENT_RUN], str(cfg.quant.name),
                            art.read_provenance(variant["folder"])["inputs"]["merged"], passed,
                            metrics)
    mlflow.set_tags({**gate_tags, Tag.PUBLISHED: published})  # on the variant run
    log.info("published %s (quality gate %s: %s)", final, "passed" if passed else "FAILED", reason)
    return {**gate_tags, "published": str(final)}


def publish_extras(variant: dict, out: Path) -> None:
    """What the backend asked for beside the published name: `aliases` (also published as these
    names, e.g. the runtime's default file) and `hooks` {artifact path: "module.function"}, each
    called on the last alias and its returned file logged (e.g. an Ollama Modelfile)."""
    from hydra.utils import get_method
    extra = variant["publish"]
    target = Path(variant["path"])
    for alias in extra.get("aliases", []):
        target = art.publish(variant["path"], out / alias)
    for artifact_path, fn in extra.get("hooks", {}).items():
        mlflow.log_artifact(str(get_method(fn)(target)), artifact_path)


def run_adapter(cfg: DictConfig) -> Path | None:
    """Only the base and adapter stages (make adapter): trains the demo adapter if missing."""
    tracking.setup(cfg.tracking)
    with mlflow.start_run(run_name="day2-adapter",
                          tags={Tag.KIND: Kind.ADAPTER, **tracking.provenance_tags()}):
        mlflow.log_params(tracking.flat_params(cfg))
        adapter_ = stage_adapter(cfg, stage_base(cfg))
    path = adapter_ and adapter_["path"]
    log.info("adapter: %s", path)
    return path
