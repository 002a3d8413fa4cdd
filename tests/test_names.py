"""One module of names (quantpipe.names): the report reads only metrics that a run writes.

A tiny GGUF pipeline runs once; the report is then generated from its MLflow run with every
variant row's metrics wrapped in a dict that records each name looked up. Every name the report
looked up must be one the run logged, so a metric renamed on the writing side (or misspelt on
the reading side) fails here instead of printing "—".

    .venv/bin/python -m pytest -q tests/test_names.py
"""
from __future__ import annotations

import mlflow
import pytest

from quantpipe import names
from quantpipe.names import Kind, Metric, Tag
from quantpipe.pipeline import run
from quantpipe.report import tables, write_report
from quantpipe.report.query import select


class Recorded(dict):
    """A metrics dict that remembers every key the report asks for."""

    def __init__(self, data: dict, asked: set[str]):
        super().__init__(data)
        self.asked = asked

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)


def test_report_columns_are_names_of_the_module():
    known = names.values(Metric)
    for columns in (tables.COLUMNS, tables.GPU_COLUMNS, tables.DEPLOY_COLUMNS):
        assert {key for _, key, _ in columns} <= known


def test_names_are_unique_within_each_group():
    for group in (Kind, Tag, Metric):
        spelled = [v for k, v in vars(group).items() if k.isupper()]
        assert len(spelled) == len(set(spelled)), group.__name__


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_every_metric_the_report_reads_is_one_the_pipeline_writes(cfg_factory, tmp_path):
    cfg = cfg_factory("+quant=gguf_q8_0")
    written = set(run(cfg))
    client = mlflow.MlflowClient()
    sel = select(client, str(cfg.tracking.experiment))
    (row,) = sel.variants
    assert row["tags"][Tag.KIND] == Kind.VARIANT and written <= set(row["metrics"])
    asked: set[str] = set()
    row["metrics"] = Recorded(row["metrics"], asked)
    md = write_report(sel, tmp_path / "R.md").read_text()
    assert {key for _, key, _ in tables.COLUMNS} <= asked  # the table was really built
    # written only when eval.tasks_file gives the user's own examples (tests/test_eval_numbers)
    only_with_tasks = {Metric.TASK_EXACT_MATCH_PCT, Metric.TASK_ROUGE_L_PCT}
    # written only when the vLLM pass runs (eval.vllm, off in the shrunk config: tests/test_vllm)
    only_with_vllm = {key for key in asked if key.startswith("vllm_")}
    missing = sorted(asked - set(row["metrics"]) - only_with_tasks - only_with_vllm)
    assert not missing, f"the report reads metrics no variant run writes: {missing}"
    table = md.split("## Comparison (CPU)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert tables.NA not in cells[2:-2]  # every metric column of the variant shows a number

