"""GPU bench records -> MLflow runs: benchmarks/gpu_bench.py run for real on CPU (tiny shape,
bitsandbytes' CPU kernels), imported into a tmp MLflow store by pipelines/gpu_import.py; the
runs' tags, params and metrics must equal the file, and importing twice must add nothing.
The committed H100 result file is checked and imported the same way.

    .venv/bin/python -m pytest -q tests/test_gpu_import.py
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from benchmarks import gpu_bench  # noqa: E402  (namespace package at the project root)
from pipelines import gpu_import  # noqa: E402
from quantpipe import PROJECT_ROOT
from quantpipe.errors import ConfigError

RESULTS = sorted((PROJECT_ROOT / "benchmarks" / "results").glob("gpu-*.json"))


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-bench") / "tiny.json"
    rc = gpu_bench.main(["--cpu", "--shapes", "tiny", "--out", str(out), "--prompt-tokens", "8",
                         "--new-tokens", "4", "--warmup", "0", "--repeats", "2", "--label", "ci"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """One MLflow store for the module (creating a SQLite store costs ~10 s of migrations);
    each test imports into its own experiment."""
    return tmp_path_factory.mktemp("mlflow-store")


def tracking(root: Path, experiment: str):
    return gpu_import.compose([f"paths.root={root}", f"tracking.experiment={experiment}"]).tracking


def bench_runs(tracking_cfg) -> list:
    import mlflow
    exp = mlflow.get_experiment_by_name(tracking_cfg.experiment)
    return mlflow.MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`quantpipe.kind` = '{gpu_import.KIND}'")


def test_bench_writes_one_record_per_variant(bench_file):
    records = json.loads(bench_file.read_text())
    assert [r["variant"] for r in records] == ["fp16", "int8", "int4"]
    for r in records:
        m = r["metrics"]
        assert set(gpu_import.REQUIRED_METRICS) <= set(m)
        assert m["decode_tok_s_min"] <= m["decode_tok_s"] <= m["decode_tok_s_max"]
        assert m["prefill_tok_s"] == pytest.approx(8 / (m["ttft_ms"] / 1000))
        assert r["hardware"]["gpu"] == "none" and "peak_gpu_mb" not in m
        assert r["shape_config"]["hidden_size"] == 64
    size = {r["variant"]: r["metrics"]["size_mb"] for r in records}
    assert size["int4"] < size["int8"] < size["fp16"]  # quantised linears shrink the footprint


def test_import_matches_file_and_is_idempotent(bench_file, store_root):
    cfg = tracking(store_root, "idempotent")
    first = gpu_import.import_file(bench_file, cfg)
    assert len(first["created"]) == 3 and first["skipped"] == []
    records = json.loads(bench_file.read_text())
    sha = hashlib.sha256(bench_file.read_bytes()).hexdigest()
    runs = {r.data.tags["quant.name"]: r for r in bench_runs(cfg)}
    assert sorted(runs) == ["fp16", "int4", "int8"]
    for rec in records:
        run = runs[rec["variant"]]
        assert run.info.status == "FINISHED"
        assert run.data.metrics == pytest.approx(rec["metrics"], rel=1e-12)
        assert run.data.tags["shape"] == "tiny"
        assert run.data.tags["hardware.gpu"] == "none"
        assert run.data.tags["source.sha256"] == sha
        assert run.data.tags["version.bitsandbytes"] == rec["hardware"]["bitsandbytes"]
        assert run.data.params["shape.hidden_size"] == "64"
        assert run.data.params["eval.speed.new_tokens"] == "4"

    again = gpu_import.import_file(bench_file, cfg)
    assert again["created"] == [] and sorted(again["skipped"]) == sorted(first["created"])
    assert len(bench_runs(cfg)) == 3


def test_unfinished_import_is_replaced(bench_file, store_root):
    """A run an import left RUNNING (it died mid-way) does not count; the next import redoes it."""
    import mlflow
    cfg = tracking(store_root, "unfinished")
    records, sha = gpu_import.load_records(bench_file)
    from quantpipe.tracking import setup
    exp_id = setup(cfg)
    key = f"{sha}:0:{records[0]['shape']}/{records[0]['variant']}"
    stale = mlflow.MlflowClient().create_run(exp_id, tags={"quantpipe.kind": gpu_import.KIND,
                                                           gpu_import.KEY_TAG: key})
    res = gpu_import.import_file(bench_file, cfg)
    assert len(res["created"]) == 3
    ids = {r.info.run_id for r in bench_runs(cfg)}
    assert stale.info.run_id not in ids and len(ids) == 3


def test_bad_file_names_what_is_wrong(tmp_path, store_root):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"shape": "tiny", "variant": "int4", "hardware": {"gpu": "H100"},
                                "metrics": {"load_s": 1.0}}]))
    with pytest.raises(ConfigError, match="lacks metrics .*size_mb"):
        gpu_import.import_file(bad, tracking(store_root, "bad"))
    with pytest.raises(ConfigError, match="does not exist"):
        gpu_import.load_records(tmp_path / "missing.json")


@pytest.mark.skipif(not RESULTS, reason="no GPU result file committed yet")
@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_committed_gpu_results(path, store_root):
    records, _ = gpu_import.load_records(path)
    by = {(r["shape"], r["variant"]): r["metrics"] for r in records}
    for shape in {r["shape"] for r in records if (r["shape"], "gguf_q4_0") in by}:
        # llama.cpp on CUDA: fewer bits, smaller file; q4 decodes faster than f16 from 1B up
        # (memory-bound); token embeddings stay in host memory, so no peak >= size here
        q8, q4, f16 = (by[(shape, f"gguf_{t}")] for t in ("q8_0", "q4_0", "f16"))
        assert q4["size_mb"] < q8["size_mb"] < f16["size_mb"]
        if shape != "smollm2-135m":
            assert q4["decode_tok_s"] > f16["decode_tok_s"]
    for shape in {r["shape"] for r in records if (r["shape"], "w4a16_gemlite") in by}:
        # the compressed-tensors formats on gemlite's kernels: 4 < 8 < 16 bits resident, and
        # each kernel computes its format (output against its own weights dequantised)
        fp16, w4, w8 = (by[(shape, v)] for v in ("fp16", "w4a16_gemlite", "w8a8_dynamic_gemlite"))
        assert w4["size_mb"] < w8["size_mb"] < fp16["size_mb"]
        assert w4["kernel_max_rel_err"] < 0.05 and w8["kernel_max_rel_err"] < 0.05
    for shape in {r["shape"] for r in records if (r["shape"], "int4") in by}:
        fp16, int8, int4 = (by[(shape, v)] for v in ("fp16", "int8", "int4"))
        assert int4["size_mb"] < int8["size_mb"] < fp16["size_mb"]
        assert int4["peak_gpu_mb"] < int8["peak_gpu_mb"] < fp16["peak_gpu_mb"]
        for m in (fp16, int8, int4):
            assert m["peak_gpu_mb"] >= m["size_mb"]  # weights are resident during the speed runs
            assert m["compression"] == pytest.approx(m["fp16_size_mb"] / m["size_mb"])
    cfg = tracking(store_root, f"committed-{path.stem}")
    assert len(gpu_import.import_file(path, cfg)["created"]) == len(records)
    assert {r.data.tags["hardware.gpu"] for r in bench_runs(cfg)} == {records[0]["hardware"]["gpu"]}


def test_committed_results_all_import_once(store_root):
    """`make gpu-import` / `make report` import every committed file; a second pass adds nothing,
    and the GGUF-on-CUDA rows arrive tagged with their runtime."""
    cfg = tracking(store_root, "committed-all")
    first = gpu_import.import_results(cfg)
    again = gpu_import.import_results(cfg)
    assert again["created"] == [] and sorted(again["skipped"]) == sorted(first["created"])
    gguf = {(r.data.tags["shape"], r.data.tags["quant.name"]) for r in bench_runs(cfg)
            if r.data.tags["eval.runtime"] == "llama.cpp"}
    if any("gguf" in p.read_text() for p in RESULTS):
        assert {("llama-3.1-8b", t) for t in ("gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m")} <= gguf
