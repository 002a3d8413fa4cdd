"""Import GPU benchmark records (the JSON of benchmarks/gpu_bench.py) into MLflow, one run each.

    make gpu-import                    # every benchmarks/results/gpu-*.json (make report does it too)
    make gpu-import FILE=benchmarks/results/gpu-nvidia-h100-x1-2026-11-22.json
    python -m pipelines.gpu_import [FILE] [Hydra overrides, e.g. paths.root=/tmp/x]

The store and experiment come from the project's config (conf/tracking, via
quantpipe.tracking.setup), so the runs sit beside the CPU variant runs and the report can show
both. Each run: tags quantpipe.kind=gpu_bench, quant.name/family/method, shape, hardware.gpu and
the rest of the record's hardware (library versions as version.*), source.file/source.sha256;
params shape.* (the LlamaConfig fields), quant.*, eval.speed.* and bench.* (the protocol);
metrics under the pipeline's own names (load_s, peak_gpu_mb, size_mb, ttft_ms, prefill_tok_s,
decode_tok_s, ...); the record itself as the artefact gpu_bench_record.json.
Idempotent: a run carries tag quantpipe.import_key = <file sha256>:<index>:<shape>/<variant>;
a record whose key already has a finished run is skipped, and a half-written one (an import
that died) is replaced.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sys
from pathlib import Path

from omegaconf import DictConfig

from quantpipe import PROJECT_ROOT
from quantpipe.errors import ConfigError
from quantpipe.names import Kind, Tag

KIND = Kind.GPU_BENCH
KEY_TAG = Tag.IMPORT_KEY
LIBRARY_KEYS = ("torch", "transformers", "bitsandbytes", "accelerate", "python")
# every record must have these (names fixed by the pipeline's variant runs); load_s too where
# transformers ran it (llama-bench, for the llama.cpp rows, reports no load time)
REQUIRED_METRICS = ("size_mb", "ttft_ms", "prefill_tok_s", "decode_tok_s",
                    "decode_tok_s_min", "decode_tok_s_max")
RUNTIME_METRICS = {"transformers": ("load_s",), "llama.cpp": ()}
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
SPEED_KEYS = ("prompt_tokens", "new_tokens", "warmup", "repeats")  # = conf/eval speed.*
FIX = "pass a JSON file written by benchmarks/gpu_bench.py"


def compose(overrides: list[str] = ()) -> DictConfig:
    """The project's Hydra config (as `make pipeline` composes it), with overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def load_records(path: Path) -> tuple[list[dict], str]:
    """The file's records, checked, and the sha256 of its bytes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("FILE", f"{path} does not exist", FIX)
    raw = path.read_bytes()
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError("FILE", f"{path} is not JSON ({e})", FIX) from None
    if not isinstance(records, list) or not records:
        raise ConfigError("FILE", f"{path} holds no list of records", FIX)
    for i, r in enumerate(records):
        where = f"{path} record {i}"
        missing = [k for k in ("shape", "variant", "hardware", "metrics") if k not in r]
        if missing or "gpu" not in r["hardware"]:
            raise ConfigError("FILE", f"{where} lacks {missing or ['hardware.gpu']}", FIX)
        runtime = r.get("quant", {}).get("runtime", "transformers")
        need = REQUIRED_METRICS + RUNTIME_METRICS.get(runtime, ()) + (
            ("peak_gpu_mb",) if r["hardware"]["gpu"] != "none" else ())
        if lacking := [m for m in need if m not in r["metrics"]]:
            raise ConfigError("FILE", f"{where} lacks metrics {lacking}", FIX)
        bad = {k: v for k, v in r["metrics"].items()
               if not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ConfigError("FILE", f"{where} has non-numeric metrics {bad}", FIX)
    return records, hashlib.sha256(raw).hexdigest()


def run_tags(r: dict, source: str, sha: str, key: str) -> dict[str, str]:
    q = r.get("quant", {"name": r["variant"]})
    tags = {"quantpipe.kind": KIND, KEY_TAG: key, "quant.name": r["variant"],
            "quant.family": q.get("family", "hf"), "quant.method": q.get("method", ""),
            "eval.runtime": q.get("runtime", "transformers"),
            "shape": r["shape"], "source.file": source, "source.sha256": sha,
            "bench.label": r.get("label", ""), "bench.git_sha": r.get("git_sha", "unknown"),
            "bench.measured_at": r.get("measured_at", "")}
    for k, v in r["hardware"].items():
        prefix = Tag.VERSION_PREFIX if k in LIBRARY_KEYS else Tag.HARDWARE_PREFIX
        tags[f"{prefix}{k}"] = str(v)
    return tags


def run_params(r: dict) -> dict[str, str]:
    params = {f"shape.{k}": v for k, v in r.get("shape_config", {}).items()}
    params.update({f"quant.{k}": v for k, v in r.get("quant", {}).items()})
    for k, v in r.get("protocol", {}).items():
        params[f"eval.speed.{k}" if k in SPEED_KEYS else f"bench.{k}"] = v
    return {k: str(v) for k, v in params.items()}


def _millis(iso: str | None) -> int | None:
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def import_file(path: Path, tracking: DictConfig) -> dict[str, list[str]]:
    """Import every record of `path`; returns the run ids {"created": [...], "skipped": [...]}."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from quantpipe.tracking import setup
    path = Path(path).resolve()
    records, sha = load_records(path)
    exp_id = setup(tracking)
    client = MlflowClient()
    source = str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)
    out: dict[str, list[str]] = {"created": [], "skipped": []}
    for i, r in enumerate(records):
        key = f"{sha}:{i}:{r['shape']}/{r['variant']}"
        done = None
        for old in client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'"):
            if old.info.status == "FINISHED" and done is None:
                done = old
            else:  # a run an earlier import left unfinished, or a duplicate: replace it
                client.delete_run(old.info.run_id)
        if done is not None:
            out["skipped"].append(done.info.run_id)
            continue
        t = _millis(r.get("measured_at"))
        run = client.create_run(exp_id, start_time=t, run_name=f"gpu {r['variant']} {r['shape']}",
                                tags=run_tags(r, source, sha, key))
        rid = run.info.run_id
        t = t or run.info.start_time
        client.log_batch(rid, metrics=[Metric(k, float(v), t, 0) for k, v in r["metrics"].items()],
                         params=[Param(k, v) for k, v in run_params(r).items()])
        client.log_dict(rid, r, "gpu_bench_record.json")
        # FINISHED last: only a finished run counts as imported (see the search above)
        client.set_terminated(rid, "FINISHED", end_time=t)
        out["created"].append(rid)
    return out


def import_results(tracking: DictConfig, files: list[Path] | None = None) -> dict[str, list]:
    """Import every committed GPU result file (benchmarks/results/gpu-*.json); idempotent, so
    `make report` runs it on a fresh clone and the GPU section never depends on a local store."""
    out: dict[str, list] = {"created": [], "skipped": []}
    for f in files if files is not None else sorted(RESULTS.glob("gpu-*.json")):
        res = import_file(f, tracking)
        out["created"] += res["created"]
        out["skipped"] += res["skipped"]
    return out


def main(argv: list[str]) -> int:
    if argv and (argv[0].startswith("-") or argv[0] in ("help",)):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    files = [Path(argv.pop(0))] if argv and "=" not in argv[0] else None
    cfg = compose(argv)
    res = import_results(cfg.tracking, files)
    print(f"{'all of ' + str(RESULTS) if files is None else files[0]}: {len(res['created'])} runs "
          f"created, {len(res['skipped'])} already there (experiment {cfg.tracking.experiment!r}, "
          f"{cfg.tracking.uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
