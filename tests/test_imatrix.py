"""The calibrated GGUF variant (llama.cpp importance matrix) and the tool helpers.

Fast: missing tools and bad settings fail with the config key to fix; run_tool reports failures
and the child's own peak RSS. Slow (needs `make tools`): +quant=gguf_imatrix_q4_k_m end to end
on the tiny model, the calibration text in MLflow, the matrix reused for a second type.
"""
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT, tracking
from quantpipe.errors import ConfigError
from quantpipe.quantize import QuantContext
from quantpipe.quantize.imatrix import quantize_with_imatrix
from quantpipe.tools import run_tool, tool_path

TOOLS = PROJECT_ROOT / "build" / "llama.cpp" / "bin"
SMALL = ["quant.backend.imatrix.chunks=3", "quant.backend.imatrix.n_ctx=64"]


def ctx(tmp_path, tools):
    return QuantContext(artifacts=tmp_path / "artifacts", tools=tools, src_fingerprint="x",
                        threads=1)


def test_missing_tools_name_the_key_and_the_fix(tmp_path):
    f16 = tmp_path / "model-f16.gguf"
    f16.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"paths.tools.*not built.*make tools"):
        quantize_with_imatrix(f16, tmp_path / "out.gguf", "q4_k_m", {"chunks": 4},
                              ctx(tmp_path, tmp_path / "no-tools"))
    assert not (tmp_path / "artifacts").exists()  # failed before any work


def test_unknown_or_bad_imatrix_settings_are_rejected(tmp_path):
    f16 = tmp_path / "model-f16.gguf"
    with pytest.raises(ConfigError, match="quant.backend.imatrix.*unknown keys.*chunk"):
        quantize_with_imatrix(f16, tmp_path / "o.gguf", "q4_k_m", {"chunk": 4},
                              ctx(tmp_path, TOOLS))
    with pytest.raises(ConfigError, match="quant.backend.imatrix.n_ctx"):
        quantize_with_imatrix(f16, tmp_path / "o.gguf", "q4_k_m", {"n_ctx": 0},
                              ctx(tmp_path, TOOLS))


def test_run_tool_reports_failure_and_own_peak_rss(tmp_path):
    import sys
    with pytest.raises(RuntimeError, match="exited 3"):
        run_tool(Path(sys.executable), ["-c", "import sys; sys.exit(3)"])
    # a child that holds ~200 MiB: its own peak is reported, not the test process's
    r = run_tool(Path(sys.executable), ["-c", "b = bytearray(200 << 20); print(len(b))"])
    assert r.stdout.strip() == str(200 << 20)
    assert 200 <= r.peak_rss_mb < 400 and r.seconds > 0
    with pytest.raises(ConfigError, match="paths.tools"):
        tool_path(tmp_path, "llama-quantize")


@pytest.mark.slow
def test_imatrix_variant_end_to_end_and_matrix_reuse(cfg_factory):
    import gguf

    from quantpipe.pipeline import run
    tool_path(TOOLS, "llama-imatrix")  # a ConfigError here means: run `make tools`
    settings = [f"paths.tools={TOOLS}", *SMALL]
    cfg = cfg_factory("+quant=gguf_imatrix_q4_k_m", *settings)
    m = run(cfg)
    out = Path(cfg.paths.quantized) / "model-imatrix-q4_k_m.gguf"
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    # hidden 64 is not a multiple of 256, so llama.cpp's q4_k_m falls back to Q5_0/Q4_0 blocks
    # (as for SmolLM2's 576); what matters is that it is quantised, not F16 throughout
    assert types - {"F32", "F16"}, types
    assert m["ppl"] > 1 and m["kld_mean"] >= 0

    tracking.setup(cfg.tracking)
    quantise = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`quantpipe.stage` = 'quantise'")[0]
    assert quantise.data.metrics["calib_chunks"] == 3
    assert quantise.data.metrics["calib_tokens"] == 3 * 64
    assert quantise.data.metrics["imatrix_reused"] == 0
    inputs = quantise.inputs.dataset_inputs
    assert [i.tags[0].value for i in inputs] == ["calibration"]
    assert inputs[0].dataset.name.startswith("calibration-text")
    matrices = list(Path(cfg.paths.artifacts).glob("imatrix/*/imatrix.gguf"))
    assert len(matrices) == 1 and matrices[0].stat().st_size > 0

    # another type over the same F16 and calibration text reuses the matrix
    run(cfg_factory("+quant=gguf_imatrix_q4_k_m", "quant.type=q4_0", *settings))
    q = mlflow.search_runs(search_all_experiments=True, output_format="list",
                           filter_string="tags.`quantpipe.stage` = 'quantise'",
                           order_by=["attributes.start_time DESC"])[0]
    assert q.data.metrics["imatrix_reused"] == 1
    assert len(list(Path(cfg.paths.artifacts).glob("imatrix/*/imatrix.gguf"))) == 1


@pytest.mark.slow
def test_imatrix_changes_the_quantised_weights(cfg_factory, tmp_path):
    """The matrix is used: llama-quantize with it writes other blocks than without it."""
    import gguf

    from quantpipe.quantize.gguf import convert_f16, llama_quantize
    tool_path(TOOLS, "llama-imatrix")
    cfg = cfg_factory()
    f16 = tmp_path / "model-f16.gguf"
    convert_f16(Path(cfg.model.path), f16, {})
    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "calibrated.gguf"
    llama_quantize(f16, plain, "q4_0", 1)
    m = quantize_with_imatrix(f16, calibrated, "q4_0", {"chunks": 3, "n_ctx": 64},
                              ctx(tmp_path, TOOLS))
    assert m["calib_chunks"] == 3 and m["imatrix_s"] > 0
    a, b = (gguf.GGUFReader(str(f)) for f in (plain, calibrated))
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type)
                                                            for t in b.tensors]
    differ = [t.name for t, u in zip(a.tensors, b.tensors) if bytes(t.data) != bytes(u.data)]
    assert any(".ffn_" in n or ".attn_" in n for n in differ), differ  # the quantised matmuls
    assert b.get_field("quantize.imatrix.chunks_count").contents() == 3
    assert a.get_field("quantize.imatrix.chunks_count") is None
