"""What the MLflow UI shows: the experiment opens on its runs, a sweep run carries the
comparison table and the report's plots, and `make ui` prints the newest sweep's compare view.

    python -m pipelines.ui               # make ui: prints the compare URL, then serves the UI

MLflow 3.17's UI opens an experiment on the GenAI overview ("0 traces"), empty here. Two things
move it to the runs: the experiment tag mlflow.experimentKind=custom_model_development (what the
UI's experiment-type choice writes; older 3.x UIs go by it) and, since the UI's global
"GenAI | Model training" switch decides in 3.17 (stored in the browser, GenAI by default), the
query parameter workflowType=machine_learning on every URL printed here.
"""
from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from mlflow import MlflowClient  # noqa: E402

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
WORKFLOW = "workflowType=machine_learning"  # the UI's "Model training" side, from the URL
TABLE_FILE = "comparison.json"   # the sweep run's mlflow.log_table artefact
# the comparison's columns: the metrics every variant logs, in the report's order
TABLE_METRICS = ("size_mb", "compression", "bits_per_weight", "ppl", "delta_ppl_pct", "kld_mean",
                 "top1_agree_pct", "decode_tok_s", "ttft_ms", "peak_rss_mb", "load_s")


# A saved view of the runs table (the UI's "share view": an experiment tag named by the URL's
# viewStateShareKey): the variant runs with the key metrics as columns. Without it the table
# shows no metric until the columns are picked by hand.
VIEW_KEY = "quantpipe"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_METRICS = ("size_mb", "delta_ppl_pct", "kld_mean", "decode_tok_s", "top1_agree_pct",
                "ttft_ms", "peak_rss_mb")
VIEW_STATE = json.dumps({"selectedColumns": [f"metrics.`{m}`" for m in VIEW_METRICS],
                         "searchFilter": "tags.`quantpipe.kind` = 'variant'"})


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Open the experiment on its runs in MLflow 3's UI, and keep the runs view with the key
    metrics as columns (idempotent)."""
    tags = client.get_experiment(experiment_id).tags
    for key, value in ((EXPERIMENT_KIND_TAG, EXPERIMENT_KIND), (VIEW_TAG, VIEW_STATE)):
        if tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def comparison_rows(variants: list[dict]) -> list[dict]:
    """One row per variant of the sweep (the report's selection): name, gate, metrics, run id."""
    return [{"variant": r["name"], "gate": r["gate"] or "-",
             **{k: r["metrics"].get(k) for k in TABLE_METRICS}, "run_id": r["run_id"]}
            for r in variants]


def log_sweep_comparison(client: MlflowClient, sweep_id: str) -> None:
    """On the sweep run: the comparison table (mlflow.log_table, shown in the run's Artifacts
    tab and the Evaluation view) and the report's two plots, under report/."""
    import pandas as pd

    from quantpipe.report import plots, recommend
    from quantpipe.report.query import select
    run = client.get_run(sweep_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    variants = select(client, experiment, sweep_id, per_window=False).variants
    if not variants:
        return
    client.log_table(sweep_id, pd.DataFrame(comparison_rows(variants)), TABLE_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        size = plots.size_vs_delta_ppl(variants, recommend.pareto_front(variants),
                                       Path(tmp) / "size_vs_delta_ppl.png")
        speed = plots.decode_speed(variants, [], Path(tmp) / "decode_tok_s.png")
        for png in (size, speed):
            client.log_artifact(sweep_id, str(png), "report")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare view: #/compare-runs?runs=[...]&experiments=[...] (URL-encoded JSON)."""
    q = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                "experiments": json.dumps([experiment_id])},
                               quote_via=urllib.parse.quote)
    return f"{base.rstrip('/')}/#/compare-runs?{q}&{WORKFLOW}"


def runs_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The experiment's runs table with the key metrics as columns (or one run), on the UI's
    model-training side."""
    if run_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            f"&{WORKFLOW}")


def newest_sweep(client: MlflowClient, experiment: str) -> tuple[str, str, list[str]] | None:
    """(experiment id, sweep run id, its variant run ids) of the newest sweep, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    sweeps = client.search_runs([exp.experiment_id], "tags.`quantpipe.kind` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        return None
    sweep_id = sweeps[0].info.run_id
    children = client.search_runs([exp.experiment_id], "tags.`quantpipe.kind` = 'variant' and "
                                  f"tags.`mlflow.parentRunId` = '{sweep_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    return exp.experiment_id, sweep_id, [c.info.run_id for c in children]
