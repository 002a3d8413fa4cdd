"""Which runs the report shows, read from MLflow with `search_runs` (the report reads nothing else).

By default the newest sweep (tag quantpipe.kind=sweep) and its variant runs; with no sweep in
the experiment, the newest finished variant run of each quant.name. GPU rows come from runs
tagged quantpipe.kind=gpu_bench: the newest finished one per (GPU, shape, quant.name); deployment
rows from kind=deploy, benchmarks from the newest finished kind=benchmark run of each name. Every run
becomes a plain dict (a "row") that the other report modules read: ids, tags, params, metrics,
times, plus the row's stage runs and dataset inputs.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from quantpipe.errors import ConfigError
from quantpipe.names import Artifact, Kind, Metric, Stage, Tag

log = logging.getLogger(__name__)


@dataclass
class Selection:
    experiment: str
    tracking_uri: str
    sweep: dict | None
    variants: list[dict]                    # finished CPU variant runs, one per quant.name
    failed: list[dict] = field(default_factory=list)
    gpu: list[dict] = field(default_factory=list)
    deploy: list[dict] = field(default_factory=list)   # newest deploy (make smoke) run per format
    # the newest finished benchmark run per benchmark.name (`make bench`: a format's section)
    benchmarks: dict[str, dict] = field(default_factory=dict)
    scale: list[dict] = field(default_factory=list)  # benchmarks/scale.py --pipeline, per size
    # every finished variant run of the experiment, newest first (any sweep, subject or eval
    # text): the verdicts across subjects and texts (report/subjects.py)
    everything: list[dict] = field(default_factory=list)
    # where a plug-in section writes its plots (write_report sets it: <report folder>/report/)
    figures: Path | None = None


def as_row(run: Run) -> dict[str, Any]:
    tags = dict(run.data.tags)
    name = tags.get(Tag.QUANT_NAME, run.info.run_name)
    return {"run_id": run.info.run_id, "name": name,
            "label": f"{name} ({tags[Tag.SHAPE]})" if Tag.SHAPE in tags else name,
            "family": tags.get(Tag.QUANT_FAMILY, ""), "method": tags.get(Tag.QUANT_METHOD, ""),
            "gate": tags.get(Tag.GATE, ""), "status": run.info.status,
            "start_ms": run.info.start_time, "end_ms": run.info.end_time,
            "tags": tags, "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "datasets": datasets(run), "stages": []}


def datasets(run: Run) -> list[dict[str, str]]:
    out = []
    for d in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "")
        out.append({"name": d.dataset.name, "digest": d.dataset.digest,
                    "source": _source(d.dataset.source), "context": context,
                    "run_id": run.info.run_id})
    return out


def _source(source: str) -> str:
    """A local dataset source is stored as JSON ({"uri": path}); show the path."""
    try:
        return str(json.loads(source).get("uri", source))
    except (ValueError, AttributeError):
        return source


def _search(client: MlflowClient, exp_id: str, filter_string: str) -> list[Run]:
    return client.search_runs([exp_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=5000)


def _newest_per(rows: list[dict], *keys: str) -> list[dict]:
    """Rows come newest first: keep the first row of each key combination."""
    seen, out = set(), []
    for r in rows:
        k = tuple(r["tags"].get(key, "") for key in keys)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def select(client: MlflowClient, experiment: str, sweep_id: str | None = None,
           per_window: bool = True) -> Selection:
    """The runs the report shows; `per_window=False` skips reading the per-window records the
    paired comparisons need (the sweep run's own comparison table does without them)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError("--experiment", f"no MLflow experiment {experiment!r} at "
                          f"{client.tracking_uri}", "run `make sweep` first, or name the "
                          "experiment and store (tracking=remote) the runs went to")
    kind = f"tags.`{Tag.KIND}`"
    found = []
    # several sweeps (comma-separated): their variants together, the newest run of each wins
    for one in [s.strip() for s in (sweep_id or "").split(",") if s.strip()]:
        run = _search(client, exp.experiment_id, f"attributes.run_id = '{one}'")
        if not run:
            raise ConfigError("--sweep", f"no run {one} in experiment {experiment!r}",
                              "copy a sweep run id from `make ui` or leave --sweep out")
        found += run
    if not sweep_id:
        found = _search(client, exp.experiment_id, f"{kind} = '{Kind.SWEEP}'")[:1]
    sweep = as_row(found[0]) if found else None
    if sweep is not None:
        sweep["also"] = [r.info.run_id for r in found[1:]]
        runs = [r for f in found for r in _search(
            client, exp.experiment_id, f"{kind} = '{Kind.VARIANT}' and "
            f"tags.`{Tag.PARENT_RUN}` = '{f.info.run_id}'")]
        runs.sort(key=lambda r: -r.info.start_time)  # newest first, across the sweeps
    else:
        runs = _search(client, exp.experiment_id, f"{kind} = '{Kind.VARIANT}'")
    rows = [as_row(r) for r in runs]
    finished = _newest_per([r for r in rows if r["status"] == "FINISHED"], Tag.QUANT_NAME)
    done = {r["name"] for r in finished}
    failed = [r for r in rows if r["status"] != "FINISHED" and r["name"] not in done]
    for r in finished:
        r["stages"] = [as_row(s) for s in _search(
            client, exp.experiment_id,
            f"tags.`{Tag.PARENT_RUN}` = '{r['run_id']}' and {kind} = '{Kind.STAGE}'")]
    gpu = _newest_per([as_row(r) for r in _search(
        client, exp.experiment_id,
        f"{kind} = '{Kind.GPU_BENCH}' and attributes.status = 'FINISHED'")],
        Tag.HARDWARE_GPU, Tag.SHAPE, Tag.QUANT_NAME)
    gpu.sort(key=lambda r: (r["metrics"].get(Metric.FP16_SIZE_MB, 0.0),
                            r["tags"].get(Tag.SHAPE, ""),
                            -r["metrics"].get(Metric.SIZE_MB, 0.0)))  # small models first
    deploy = _newest_per([as_row(r) for r in _search(client, exp.experiment_id,
                                                     f"{kind} = '{Kind.DEPLOY}'")],
                         Tag.QUANT_NAME, Tag.DEPLOY_SERVER, Tag.DEPLOY_CONCURRENCY)
    deploy.sort(key=lambda r: (r["name"], r["tags"].get(Tag.DEPLOY_SERVER, ""),
                               int(r["tags"].get(Tag.DEPLOY_CONCURRENCY, "0") or 0)))
    benchmarks = {}
    for b in _search(client, exp.experiment_id,
                     f"{kind} = '{Kind.BENCHMARK}' and attributes.status = 'FINISHED'"):
        benchmarks.setdefault(b.data.tags.get(Tag.BENCHMARK_NAME, ""), as_row(b))
    scale = _newest_per([as_row(r) for r in _search(
        client, exp.experiment_id, f"{kind} = '{Kind.BENCHMARK}' and "
        f"tags.`{Tag.BENCHMARK_NAME}` = 'scale_pipeline'")], "scale.size", "quant.name")
    scale.sort(key=lambda r: (r["metrics"].get("fp16_gb", 0.0), r["name"]))
    everything = [as_row(r) for r in _search(
        client, exp.experiment_id, f"{kind} = '{Kind.VARIANT}' and attributes.status = 'FINISHED'")]
    if per_window:
        from quantpipe.report.subjects import cells  # (it imports this module)
        compared = [r for runs in cells(everything).values() for r in runs.values()]  # verdicts
        attach_per_window(client, exp.experiment_id, compared + finished)
    return Selection(experiment, client.tracking_uri, sweep, order(finished), failed, gpu, deploy,
                     benchmarks, scale, everything)


def attach_per_window(client: MlflowClient, exp_id: str, rows: list[dict]) -> None:
    """Give each of `rows` its evaluation's per-window means (`row["per_window"]`, the evaluate
    stage's per_window.json), for paired comparisons; runs evaluated before that record have
    none."""
    got: dict[str, dict | None] = {}
    for row in rows:
        if row["run_id"] not in got:
            got[row["run_id"]] = _per_window(client, exp_id, row["run_id"])
        if got[row["run_id"]] is not None:
            row["per_window"] = got[row["run_id"]]


def _per_window(client: MlflowClient, exp_id: str, run_id: str) -> dict | None:
    stage = _search(client, exp_id, f"tags.`{Tag.PARENT_RUN}` = '{run_id}' and "
                                    f"tags.`{Tag.STAGE}` = '{Stage.EVALUATE}'")
    try:
        if not stage or Artifact.PER_WINDOW not in {
                a.path for a in client.list_artifacts(stage[0].info.run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(
                stage[0].info.run_id, Artifact.PER_WINDOW, tmp)).read_text())
    except (MlflowException, OSError, ValueError) as e:  # unreadable: the overlap test instead
        log.warning("run %s: its %s could not be read (%s); its comparisons fall back to the "
                    "overlap of 95 %% intervals", run_id, Artifact.PER_WINDOW, e)
        return None


def order(rows: list[dict]) -> list[dict]:
    """The seeds' workflow order: transformers formats (FP16 -> INT8 -> INT4), then those llama.cpp
    runs (GGUF), largest first."""
    return sorted(rows, key=lambda r: (r["tags"].get("eval.runtime") == "llama.cpp",
                                       -r["metrics"].get("size_mb", 0.0), r["name"]))


def all_datasets(row: dict) -> list[dict[str, str]]:
    """Dataset inputs of a variant run and of its stage runs (evaluation, calibration)."""
    return row["datasets"] + [d for s in row["stages"] for d in s["datasets"]]
