"""Task accuracy through lm-evaluation-harness: the real lm-eval on the project's runtimes.

The tiny model scores a user's task (a YAML + JSONL folder, offline) through transformers on its
FP16 folder and through llama.cpp on its F16 GGUF with the same token ids; the two agree. A whole
pipeline run logs the task metrics, their paired change against FP16 and the samples; bad
settings are refused before any stage.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from quantpipe.errors import ConfigError
from quantpipe.evaluate import harness
from quantpipe.gate import check_gate
from quantpipe.pipeline import run
from tests.test_bad_input import no_stage_ran, refused, world  # noqa: F401 (fixture)

TASK_YAML = """task: colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: colours.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory) -> Path:
    """A user's own task folder: one multiple-choice YAML and its JSONL beside it (30 docs from
    the shipped cloze data, so the texts are real sentences)."""
    folder = tmp_path_factory.mktemp("my-tasks")
    (folder / "colours.yaml").write_text(TASK_YAML)
    shipped = (harness.SHIPPED / "pydoc_cloze" / "pydoc_cloze.jsonl").read_text().splitlines()
    with open(folder / "colours.jsonl", "w") as f:
        for line in shipped[:30]:
            d = json.loads(line)
            f.write(json.dumps({"question": d["context"], "choices": d["choices"],
                                "label": d["label"]}) + "\n")
    return folder


def task_cfg(cfg_factory, folder: Path, *more: str):
    return cfg_factory(f"eval.lm_eval.include_path={folder}", "eval.lm_eval.tasks=[colours]",
                       *more)


def test_settings_and_names_are_checked(cfg_factory, user_tasks, tmp_path):
    assert harness.check(cfg_factory()) is None  # no task asked for: nothing to do
    s = harness.check(task_cfg(cfg_factory, user_tasks))
    assert s["tasks"] == ["colours"] and s["digest"]
    with pytest.raises(ConfigError, match="not a task lm-eval knows") as e:
        harness.check(task_cfg(cfg_factory, user_tasks, "eval.lm_eval.tasks=[colors]"))
    assert e.value.key == "eval.lm_eval.tasks" and "include_path" in e.value.fix
    with pytest.raises(ConfigError, match="not a folder") as e:
        harness.check(task_cfg(cfg_factory, tmp_path / "nowhere"))
    missing = tmp_path / "missing-data"
    missing.mkdir()
    (missing / "colours.yaml").write_text(TASK_YAML)  # its JSONL is not beside it
    with pytest.raises(ConfigError, match="colours.jsonl") as e:
        harness.check(task_cfg(cfg_factory, missing))
    assert e.value.key == "eval.lm_eval.tasks"
    with pytest.raises(ConfigError, match="fraction") as e:
        harness.check(task_cfg(cfg_factory, user_tasks, "eval.lm_eval.limit=2.5"))
    # the data's bytes are in the digest: an edited JSONL scores again
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "colours.yaml").write_text(TASK_YAML)
    (edited / "colours.jsonl").write_text((user_tasks / "colours.jsonl").read_text()[:-200]
                                          .rsplit("\n", 1)[0] + "\n")
    assert harness.check(task_cfg(cfg_factory, edited))["digest"] != s["digest"]


def test_shipped_task_is_known_without_lm_eval_s_own_index(cfg_factory):
    t0 = time.perf_counter()
    s = harness.check(cfg_factory("eval.lm_eval.tasks=[pydoc_cloze]"))
    assert s["tasks"] == ["pydoc_cloze"]
    n = sum(1 for line in (harness.SHIPPED / "pydoc_cloze" / "pydoc_cloze.jsonl").open() if line)
    assert harness.estimate_requests(s) == 4 * n
    print(f"check of the shipped task: {time.perf_counter() - t0:.2f} s")


def test_shipped_task_does_not_overlap_training_or_calibration_text():
    from quantpipe.data import calibration_mix, topics_text
    docs = [json.loads(x) for x in
            (harness.SHIPPED / "pydoc_cloze" / "pydoc_cloze.jsonl").read_text().splitlines()]
    assert len(docs) >= 150 and all(len(d["choices"]) == 4 for d in docs)
    seen = " ".join((topics_text("train") + "\n" + calibration_mix()).split())
    leaked = [d for d in docs
              if f"{d['context']} {d['choices'][d['label']]}" in seen]
    assert not leaked, leaked[:3]


def test_transformers_and_llama_cpp_score_a_task_alike(tiny_base, user_tasks, tmp_path):
    """The same task through transformers (FP16 folder) and llama.cpp (its F16 GGUF), fed the
    same token ids: the per-choice log-likelihoods agree to FP16 rounding and the accuracies
    within one point."""
    from transformers import AutoTokenizer

    from quantpipe.evaluate import task_lm
    from quantpipe.evaluate.runtimes import open_runtime
    from quantpipe.quantize import QuantContext
    from quantpipe.quantize.gguf import quantize_gguf
    ctx = QuantContext(artifacts=tmp_path / "artifacts", tools=Path("/nonexistent"),
                       src_fingerprint="tiny", threads=2)
    res = quantize_gguf(tiny_base, tmp_path / "f16", ctx, type="f16")
    tok = AutoTokenizer.from_pretrained(tiny_base)
    s = {"tasks": ["colours"], "include_path": str(user_tasks), "limit": None,
         "num_fewshot": None}
    hf = task_lm.run(open_runtime(tiny_base, 2, 64), tok, s, 64, None, "transformers")
    cpp = task_lm.run(open_runtime(tmp_path / "f16" / res["artifact"], 2, 64, runtime="llama.cpp"),
                      tok, s, 64, None, "llama.cpp")
    for metric in ("acc", "acc_norm"):
        a, b = hf["metrics"][f"task_colours_{metric}"], cpp["metrics"][f"task_colours_{metric}"]
        assert abs(a - b) <= 0.01 + 1e-9, (metric, a, b)
        assert f"task_colours_{metric}_stderr" in hf["metrics"]
    assert len(hf["per_doc"]["colours"]["acc"]) == 30
    assert sorted(hf["per_doc"]["colours"]) == ["acc", "acc_norm"]  # metrics, not the label
    # the chosen answers are the same document by document
    assert hf["per_doc"]["colours"]["acc"] == cpp["per_doc"]["colours"]["acc"]


def test_paired_delta_and_retention():
    ref = {"t": {"acc": [1, 1, 1, 1, 0, 0, 1, 1, 0, 1] * 5}}
    var = {"t": {"acc": [1, 0, 1, 1, 0, 0, 1, 1, 0, 1] * 5}}
    base = {"t": {"acc": [0, 0, 1, 1, 0, 0, 1, 1, 0, 1] * 5}}  # FP16 gains 10 of 50 docs
    out = harness.paired(var, ref, base, 2000, 0)
    assert out["task_t_acc_delta_pts"] == pytest.approx(-10.0)
    assert out["task_t_acc_delta_ci95_low"] < -10 < out["task_t_acc_delta_ci95_high"] <= 0
    assert out["task_t_acc_retention_pct"] == pytest.approx(50.0)  # one of the two docs gained
    # base == FP16: no gain, no retention; a gain of one document is not measurable either
    assert "task_t_acc_retention_pct" not in harness.paired(var, ref, ref, 100, 0)
    one = {"t": {"acc": [0] + ref["t"]["acc"][1:]}}
    assert "task_t_acc_retention_pct" not in harness.paired(var, ref, one, 2000, 0)


def test_gate_bounds_the_task_drop():
    m = {"task_t_acc_delta_pts": -2.0, "task_t_acc_delta_ci95_low": -6.0,
         "task_t_acc_delta_ci95_high": 1.0}
    passed, reason = check_gate({"max_task_drop_pts": 5}, m)
    assert not passed and "t_acc drop" in reason and "6" in reason
    assert check_gate({"max_task_drop_pts": 5, "use_interval": "point"}, m)[0]
    passed, reason = check_gate({"max_task_drop_pts": 5}, {})
    assert passed and "not applied" in reason


def test_unknown_task_is_refused_before_any_stage(world, user_tasks):  # noqa: F811
    t0 = time.perf_counter()
    refused(world, f"eval.lm_eval.include_path={user_tasks}", "eval.lm_eval.tasks=[colors]",
            key="eval.lm_eval.tasks", match="'colors' is not a task")
    assert no_stage_ran(world)
    print(f"refused in {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow  # a whole pipeline run on the tiny model with tasks: make test-slow
def test_pipeline_logs_task_metrics_deltas_and_samples(cfg_factory, user_tasks):
    cfg = task_cfg(cfg_factory, user_tasks, "+quant=gguf_q8_0", "eval.lm_eval.limit=20")
    m = run(cfg)
    for metric in ("acc", "acc_norm"):
        assert 0 <= m[f"task_colours_{metric}"] <= 1
        assert f"task_colours_{metric}_stderr" in m
        d = m[f"task_colours_{metric}_delta_pts"]
        assert m[f"task_colours_{metric}_delta_ci95_low"] <= d \
            <= m[f"task_colours_{metric}_delta_ci95_high"]
    ev = mlflow.search_runs(search_all_experiments=True, output_format="list",
                            filter_string="tags.`quantpipe.stage` = 'evaluate'")[0]
    samples = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=ev.info.run_id, artifact_path="lm_eval_samples.json")).read_text())
    assert len(samples["colours"]) == 20
    # the FP16 and base models' task scores are cached; an unchanged re-run scores nothing
    scored = sorted((Path(cfg.paths.artifacts) / "task-scores").glob("[!.]*/tasks.json"))
    assert len(scored) == 2
    stamps = [p.stat().st_mtime_ns for p in scored]
    again = run(cfg)
    assert again["task_colours_acc"] == m["task_colours_acc"]
    assert [p.stat().st_mtime_ns for p in scored] == stamps
    assert np.isfinite(again["task_colours_acc_delta_pts"])


def test_report_task_table_and_recommendation():
    from quantpipe.evaluate import harness_report as tasks

    def row(name, size, acc, low, high, method="dynamic"):
        return {"name": name, "run_id": name * 4, "method": method, "params": {}, "tags": {},
                "metrics": {"size_mb": size, "task_t_acc": acc, "task_t_acc_stderr": 0.03,
                            "task_t_acc_delta_pts": (low + high) / 2,
                            "task_t_acc_delta_ci95_low": low, "task_t_acc_delta_ci95_high": high}}
    rows = [row("fp16", 256, 0.70, 0, 0, "none"), row("q8", 138, 0.70, -1.2, 1.2),
            row("q4", 100, 0.66, -6.5, -1.5), row("nf4", 107, 0.69, -3.0, 0.6)]
    text = "\n".join(tasks.section(rows))
    assert "| **q4** | 66.0 ± 3.0 | -4.0 [-6.5, -1.5] |" in text
    ((scenario, chosen, reason),) = tasks.recommendation(rows)
    assert chosen["name"] == "nf4" and "q4 (-4.0 [-6.5, -1.5])" in reason
    assert tasks.section([row("fp16", 1, 0.7, 0, 0)][:0]) == []


ROLLING_YAML = """task: prose_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: prose.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""

GENERATE_YAML = """task: echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: echo.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_rolling_and_generation_requests_run_on_both_runtimes(tiny_base, tmp_path):
    """lm-eval's other two request types: loglikelihood_rolling (a document's perplexity, cut
    into windows of n_ctx) and generate_until (greedy, stopped at `until`), through the same
    RuntimeLM, agree between transformers and llama.cpp."""
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    from quantpipe.evaluate import task_lm
    from quantpipe.evaluate.runtimes import open_runtime
    from quantpipe.quantize import QuantContext
    from quantpipe.quantize.gguf import quantize_gguf
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "prose_ppl.yaml").write_text(ROLLING_YAML)
    (folder / "echo.yaml").write_text(GENERATE_YAML)
    text = topics_text("eval")
    with open(folder / "prose.jsonl", "w") as f:  # 300 words: several 64-token windows each
        for i in range(3):
            f.write(json.dumps({"text": " ".join(text.split()[i * 300:(i + 1) * 300])}) + "\n")
    with open(folder / "echo.jsonl", "w") as f:
        for p in ("The cat", "A list of", "def main"):
            f.write(json.dumps({"prompt": p, "answer": "x"}) + "\n")
    ctx = QuantContext(artifacts=tmp_path / "artifacts", tools=Path("/nonexistent"),
                       src_fingerprint="tiny", threads=2)
    res = quantize_gguf(tiny_base, tmp_path / "f16", ctx, type="f16")
    tok = AutoTokenizer.from_pretrained(tiny_base)
    s = {"tasks": ["prose_ppl", "echo"], "include_path": str(folder), "limit": None,
         "num_fewshot": None}
    hf = task_lm.run(open_runtime(tiny_base, 2, 64), tok, s, 64, None, "transformers")
    cpp = task_lm.run(open_runtime(tmp_path / "f16" / res["artifact"], 2, 64, runtime="llama.cpp"),
                      tok, s, 64, None, "llama.cpp")
    a, b = hf["metrics"]["task_prose_ppl_word_perplexity"], cpp["metrics"][
        "task_prose_ppl_word_perplexity"]
    assert np.isfinite(a) and a > 1 and a == pytest.approx(b, rel=0.01)
    assert hf["metrics"]["task_echo_exact_match"] == 0.0  # "x" is never the continuation
    # greedy generations are the same text on both runtimes
    gen = {n: [d["filtered_resps"] for d in r["samples"]["echo"]] for n, r in
           (("hf", hf), ("cpp", cpp))}
    assert gen["hf"] == gen["cpp"] and all(len(g) for g in gen["hf"])


def test_recorded_requests_replayed_give_the_runtime_s_own_scores(tiny_base, user_tasks):
    """The route of a runtime in another environment (vLLM): lm-eval runs once to record every
    request's token ids, the runtime answers them in one batch, and lm-eval runs again on the
    answers. Answered here by the transformers runtime itself, the replay must give exactly
    what scoring through it directly gives, document by document."""
    from transformers import AutoTokenizer

    from quantpipe.evaluate import task_lm
    from quantpipe.evaluate.runtimes import open_runtime
    tok = AutoTokenizer.from_pretrained(tiny_base)
    s = {"tasks": ["colours"], "include_path": str(user_tasks), "limit": None,
         "num_fewshot": None}
    rt = open_runtime(tiny_base, 2, 64)
    direct = task_lm.run(rt, tok, s, 64, None, "transformers")
    requests = task_lm.record(tok, s, 64, None)
    assert len(requests["score"]) == 30 * 4 and not requests["generate"]  # 4 choices a doc
    assert all(len(w) <= 65 and 0 < n < len(w) for w, n in requests["score"])
    lm = task_lm.RuntimeLM(rt, tok, 64, None)
    answers = {"score": [list(lm._score_ids(w, n)) for w, n in requests["score"]],
               "generate": []}
    replayed = task_lm.replay(tok, s, 64, None, requests, answers, "replay")
    assert replayed["metrics"] == direct["metrics"]
    assert replayed["per_doc"] == direct["per_doc"]
