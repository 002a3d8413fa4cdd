"""The evaluation's own numbers: the worker's peak memory, 95 % intervals, fine-tune retention,
generation agreement, task scores and the gate's use of the intervals; on the tiny model with
the real transformers, llama.cpp, MLflow and `evaluate`.

    .venv/bin/python -m pytest -q tests/test_eval_numbers.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from quantpipe.errors import ConfigError
from quantpipe.evaluate import metrics as M
from quantpipe.evaluate.tasks import load_tasks, score
from quantpipe.gate import check_gate
from quantpipe.pipeline import run
from quantpipe.tools import vm_hwm_mb


def test_worker_peak_memory_is_its_own_not_the_parents():
    # ru_maxrss of a child started by fork + exec keeps the parent's high-water mark: with this
    # 600 MiB held here, the worker reported >= 600 MB before it read its own VmHWM
    ballast = bytearray(b"\x01") * (600 << 20)  # every page written, so resident
    code = "from quantpipe.evaluate.worker import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    assert vm_hwm_mb() > 600 and len(ballast) == 600 << 20
    assert 5 < child < 200, child  # the worker's imports alone: numpy, omegaconf, quantpipe


def synthetic(windows: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """[windows, 127] per-token NLLs of FP16, a variant 0.05 nats worse, a base 0.2 nats worse,
    with per-window difficulty (as real text has) and a per-token KLD."""
    rng = np.random.default_rng(seed)
    shape = (windows, 127)
    ref = rng.gamma(2.0, 1.2, shape) + rng.normal(0, 0.5, (windows, 1))
    var = ref + 0.05 + rng.normal(0, 0.3, shape)
    base = ref + 0.2 + rng.normal(0, 0.3, shape)
    kld = rng.gamma(1.0, 0.03, shape) * rng.uniform(0.5, 1.5, (windows, 1))
    return var, ref, base, kld


def test_intervals_hold_the_estimate_and_narrow_with_more_windows():
    widths = {}
    for windows in (8, 64):
        var, ref, base, kld = synthetic(windows)
        ci = M.quality_intervals(var, ref, kld, base, resamples=2000, seed=0)
        delta = float(M.delta_ppl_pct(var.ravel(), ref.ravel()))
        kept = float(M.retention_pct(base.ravel(), var.ravel(), ref.ravel()))
        assert ci["delta_ppl_ci95_low"] < delta < ci["delta_ppl_ci95_high"]
        assert ci["kld_ci95_low"] < kld.mean() < ci["kld_ci95_high"]
        assert ci["finetune_retention_ci95_low"] < kept < ci["finetune_retention_ci95_high"]
        # paired: the variant's constant 0.05-nat loss shows through the windows' difficulty
        assert ci["delta_ppl_ci95_low"] > 0
        widths[windows] = ci["delta_ppl_ci95_high"] - ci["delta_ppl_ci95_low"]
        assert ci == M.quality_intervals(var, ref, kld, base, resamples=2000, seed=0)  # seeded
    assert widths[64] < 0.6 * widths[8]  # ~1/sqrt(8) expected
    var, ref, base, kld = synthetic(64)
    assert 60 < M.retention_pct(base.ravel(), var.ravel(), ref.ravel()) < 90  # ~0.15 / 0.2


def test_retention_never_divides_by_zero():
    var, ref, _, _ = synthetic(8)
    assert np.isnan(M.retention_pct(ref, var, ref)).all()  # base == merged: no gain
    assert not M.finetune_gain_is_measurable(ref, ref)


def test_generation_agreement_counts_matching_prefixes():
    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    out = np.array([[1, 2, 3, 4], [1, 2, 9, 4], [0, 6, 7, 8]])
    assert M.matched_prefix(ref, out).tolist() == [4, 2, 0]
    assert M.generation_agreement(ref, out, k=2) == {"gen_prefix_match_pct": pytest.approx(200 / 3),
                                                     "gen_mean_match_len": 2.0}


def test_the_reference_model_reproduces_its_own_continuations(tiny_base, tmp_path):
    """The greedy path a variant runs (prompts read back from reference.npz) matches FP16's
    stored continuations 100 % when the variant is the reference model itself."""
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    from quantpipe.evaluate.transformers_runtime import HFRuntime
    from quantpipe.evaluate.worker import greedy_continuations, run_reference
    ids = np.array(AutoTokenizer.from_pretrained(tiny_base)(topics_text("eval")[:4000])[
        "input_ids"], dtype=np.int32)
    spec = {"out": str(tmp_path / "reference.npz"), "kld_top_k": 8, "bos": None,
            "generation": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 12, "match_k": 8}}
    run_reference(spec, HFRuntime(tiny_base, 1, reference=True), M.windows(ids, 64, 2, None), ids)
    ref = np.load(spec["out"])
    assert ref["gen_prompts"].shape == (4, 16) and ref["gen_tokens"].shape == (4, 12)
    again = greedy_continuations(HFRuntime(tiny_base, 1, reference=True), ref["gen_prompts"], 12)
    assert M.generation_agreement(ref["gen_tokens"], again, 8) == {
        "gen_prefix_match_pct": 100.0, "gen_mean_match_len": 12.0}


def test_task_scores_through_the_evaluate_modules():
    got = score(["The answer is 42.", "  blue\n"], ["The answer is 42.", "blue"])
    assert got["task_exact_match_pct"] == 100.0 and got["task_rouge_l_pct"] == 100.0
    got = score(["the cat sat", "yes"], ["the cat sat down", "no"])
    # ROUGE-L F of "the cat sat" vs "the cat sat down": P 3/3, R 3/4 -> 6/7; "yes" vs "no": 0
    assert got["task_exact_match_pct"] == 0.0
    assert got["task_rouge_l_pct"] == pytest.approx(100 * (6 / 7) / 2)


def test_bad_tasks_file_names_the_key(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="eval.tasks_file.*line 1"):
        load_tasks(str(bad))
    with pytest.raises(ConfigError, match="eval.tasks_file"):
        load_tasks(str(tmp_path / "missing.jsonl"))


def test_gate_judges_the_interval_end_it_is_told_to():
    m = {"delta_ppl_pct": 9.0, "delta_ppl_ci95_low": 7.0, "delta_ppl_ci95_high": 11.0,
         "kld_mean": 0.01, "finetune_retention_pct": 60.0, "finetune_retention_ci95_low": 40.0,
         "finetune_retention_ci95_high": 80.0}
    gate = {"max_delta_ppl_pct": 10.0, "max_kld": None, "min_finetune_retention_pct": 50.0}
    passed, reason = check_gate({**gate, "use_interval": "pessimistic"}, m)
    assert not passed and "ΔPPL 95 % upper bound 11" in reason and "retention 95 % lower" in reason
    assert check_gate({**gate, "use_interval": "point"}, m)[0]
    assert check_gate({**gate, "use_interval": "optimistic"}, {**m, "delta_ppl_ci95_low": 10.5})[0] \
        is False
    no_adapter = {k: v for k, v in m.items() if not k.startswith("finetune")}
    passed, reason = check_gate({**gate, "max_delta_ppl_pct": 20.0}, no_adapter)
    assert passed and "no fine-tune" in reason
    with pytest.raises(ConfigError, match="gate.use_interval"):
        check_gate({**gate, "use_interval": "upper-ish"}, m)


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_variant_run_logs_intervals_retention_generation_and_tasks(cfg_factory, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "Name a colour.", "reference": "Blue."}\n'
                     '{"prompt": "What is 2 + 2?", "reference": "4"}\n')
    cfg = cfg_factory("+quant=gguf_q8_0", f"eval.tasks_file={tasks}")
    m = run(cfg)
    assert m["delta_ppl_ci95_low"] <= m["delta_ppl_pct"] <= m["delta_ppl_ci95_high"]
    assert m["kld_ci95_low"] <= m["kld_mean"] <= m["kld_ci95_high"]
    # the tiny adapter moves the tiny model: the base scores differently, retention is defined
    assert m["base_ppl"] != pytest.approx(m["ppl_fp16"], rel=1e-4)
    kept = 100 * (m["base_ppl"] - m["ppl"]) / (m["base_ppl"] - m["ppl_fp16"])
    assert m["finetune_retention_pct"] == pytest.approx(kept, rel=1e-4, abs=1e-3)
    # with 2 windows the point estimate is also a resample (both windows once): it may be the
    # interval's end, equal to float64 rounding (float32 put it 1e-4 outside)
    slack = 1e-9 * abs(m["finetune_retention_pct"])
    assert m["finetune_retention_ci95_low"] - slack <= m["finetune_retention_pct"] \
        <= m["finetune_retention_ci95_high"] + slack
    assert 0 <= m["gen_prefix_match_pct"] <= 100 and 0 <= m["gen_mean_match_len"] <= 16
    assert m["task_count"] == 2 and 0 <= m["task_rouge_l_pct"] <= 100
    assert 5 < m["peak_rss_mb"] < 1500
    (variant,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="tags.`quantpipe.kind` = 'variant'")
    assert variant.data.metrics["finetune_retention_pct"] == pytest.approx(kept, rel=1e-4)
    evaluate_run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string="tags.`quantpipe.stage` = 'evaluate'")[0]
    answers = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=evaluate_run.info.run_id, artifact_path="task_answers.json")).read_text())
    assert [a["reference"] for a in answers] == ["Blue.", "4"] and all("answer" in a for a in answers)
    # the base model's score is cached like the FP16 reference
    assert len(list((Path(cfg.paths.artifacts) / "base-nll").glob("[!.]*/base.npz"))) == 1


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_no_adapter_logs_no_retention(cfg_factory):
    m = run(cfg_factory("+quant=fp16", "adapter=none"))
    assert "base_ppl" not in m and not any(k.startswith("finetune") for k in m)
    assert "delta_ppl_ci95_high" in m and "gen_prefix_match_pct" in m


def test_paired_difference_is_the_mean_difference_with_a_bootstrap_interval():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.02, 0.2, 32)          # windows differ far more than the variants do
    a = b - 0.003 + rng.normal(0, 0.001, 32)
    d, low, high = M.paired_difference(a, b, resamples=2000, seed=0)
    assert abs(d - float((a - b).mean())) < 1e-15 and low < d < high < 0
    assert (d, low, high) == M.paired_difference(a, b, resamples=2000, seed=0)  # seeded
    d0, low0, high0 = M.paired_difference(b, b)
    assert d0 == low0 == high0 == 0
    with pytest.raises(ValueError, match="different windows"):
        M.paired_difference(a, b[:-1])
    assert M.window_means(np.array([[1.0, 3.0], [2.0, 2.0]])) == [2.0, 2.0]
    wins = np.arange(12).reshape(3, 4)
    assert M.windows_digest(wins) == M.windows_digest(wins.astype(np.int32))
    assert M.windows_digest(wins) != M.windows_digest(wins[:2])
