"""End to end on the tiny model: the real stages, MLflow contents, stage reuse, failure states."""
from pathlib import Path

import mlflow
import pytest
from transformers import AutoModelForCausalLM

from quantpipe import tracking
from quantpipe.pipeline import run


def runs(cfg, filter_string=""):
    tracking.setup(cfg.tracking)
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string,
                              output_format="list")


def test_int4_end_to_end_then_int8_reuses_the_merge(cfg_factory):
    cfg = cfg_factory("+quant=int4")
    m4 = run(cfg)
    out = Path(cfg.paths.quantized) / "model-int4"
    assert AutoModelForCausalLM.from_pretrained(out, device_map="cpu") is not None
    assert (out / "provenance.json").is_file()
    for key in ("size_mb", "compression", "ppl", "ppl_err", "delta_ppl_pct", "kld_mean",
                "top1_agree_pct", "ttft_ms", "decode_tok_s", "prefill_tok_s", "peak_rss_mb",
                "load_s", "bits_per_weight"):
        assert key in m4, key
    assert m4["compression"] > 1 and m4["kld_mean"] >= 0

    variant = runs(cfg, "tags.`quantpipe.kind` = 'variant'")[0]
    assert variant.info.status == "FINISHED"
    assert variant.data.tags["quant.name"] == "int4"
    assert variant.data.params["quant.backend.quant_type"] == "nf4"
    assert variant.data.metrics["ppl"] == pytest.approx(m4["ppl"])
    assert variant.data.tags["git.sha"] and "version.peft" in variant.data.tags
    stages = {r.data.tags["quantpipe.stage"]: r for r in runs(cfg, "tags.`quantpipe.kind` = 'stage'")}
    assert set(stages) >= {"merge", "quantise", "evaluate", "publish"}
    assert stages["merge"].data.metrics["merge_top1_agreement"] == 1.0
    # random float weights: almost no block of 32 holds <= 16 values (tests/test_gridcheck.py)
    assert stages["base"].data.metrics["grid_aligned_pct"] < 1
    assert variant.data.metrics["grid_aligned_pct"] == stages["base"].data.metrics[
        "grid_aligned_pct"]

    m8 = run(cfg_factory("+quant=int8"))
    merges = runs(cfg, "tags.`quantpipe.stage` = 'merge'")
    assert sorted(r.data.tags["quantpipe.reused"] for r in merges) == ["false", "true"]
    assert m4["size_mb"] < m8["size_mb"]

    # each evaluation logs its per-window means; the report pairs the two variants on them
    from quantpipe.report import subjects
    from quantpipe.report.query import select
    sel = select(mlflow.MlflowClient(), str(cfg.tracking.experiment))
    rows = {r["name"]: r for r in sel.everything}
    for name, m in (("int4", m4), ("int8", m8)):
        pw = rows[name]["per_window"]
        assert len(pw["kld"]) == len(pw["nll"]) == m["eval_windows_scored"]
        assert sum(pw["kld"]) / len(pw["kld"]) == pytest.approx(m["kld_mean"], rel=1e-9)
    assert rows["int4"]["per_window"]["windows_sha256"] == rows["int8"]["per_window"][
        "windows_sha256"]
    d, low, high = subjects.paired(rows["int4"], rows["int8"])
    assert d == pytest.approx(m4["kld_mean"] - m8["kld_mean"], rel=1e-9) and low <= d <= high


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_fp16_baseline_differs_from_reference_only_by_rounding(cfg_factory):
    # the reference computes the FP16 weights in float32; the variant runs them in FP16
    m = run(cfg_factory("+quant=fp16"))
    assert 0 <= m["kld_mean"] < 1e-3
    # a random-weight model has near-ties in its logits: FP16 rounding flips a few of 62 argmaxes
    assert m["top1_agree_pct"] >= 90.0
    assert abs(m["delta_ppl_pct"]) < 0.5
    assert m["compression"] == pytest.approx(1.0)


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_failed_stage_marks_runs_failed_and_keeps_published_model(cfg_factory, monkeypatch):
    from quantpipe import evaluate
    cfg = cfg_factory("+quant=int8")
    run(cfg)
    published = Path(cfg.paths.quantized) / "model-int8"
    before = sorted(p.name for p in published.iterdir())

    def fails(*args, **kwargs):  # what the preflight cannot see: the worker dies, say
        raise RuntimeError("the evaluation worker failed")
    monkeypatch.setattr(evaluate, "evaluate_variant", fails)
    with pytest.raises(RuntimeError, match="the evaluation worker failed"):
        run(cfg)
    assert sorted(p.name for p in published.iterdir()) == before
    statuses = {r.info.run_name: r.info.status for r in runs(cfg) if r.info.status == "FAILED"}
    assert statuses.get("evaluate") == "FAILED" and statuses.get("int8") == "FAILED"
    assert not list(Path(cfg.paths.quantized).glob(".*tmp*"))
