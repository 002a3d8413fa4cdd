"""benchmarks/gguf_stage.py (`make bench`): the pipeline's GGUF stage next to llama.cpp's tools.

Slow (needs `make tools`): on the tiny model, one repeat each. Ours must produce the tools'
bytes (quantise) and the converter's bytes plus the provenance key (convert); the MLflow run
holds every figure and the report renders it. Timings are logged, not asserted.
"""
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT

TOOLS = PROJECT_ROOT / "build" / "llama.cpp" / "bin"


@pytest.mark.slow
def test_bench_matches_the_tools_bytes_and_lands_in_the_report(cfg_factory, tmp_path):
    from benchmarks.gguf_stage import main
    from quantpipe import tracking
    from quantpipe.quantize.gguf import convert_f16
    from quantpipe.quantize.gguf_report import BENCHMARK, gguf_stage
    from quantpipe.report.query import select
    from quantpipe.tools import tool_path
    tool_path(TOOLS, "llama-quantize")  # a ConfigError here means: run `make tools`
    cfg = cfg_factory(f"paths.tools={TOOLS}", "threads=1")
    f16 = tmp_path / "model-f16.gguf"
    convert_f16(Path(cfg.model.path), f16, {"source": cfg.model.path})
    main(["--f16", str(f16), "--hf", cfg.model.path, "--types", "q8_0", "--repeats", "1",
          f"paths.root={cfg.paths.root}", f"paths.tools={TOOLS}", "threads=1"])

    tracking.setup(cfg.tracking)
    [r] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.`quantpipe.kind` = 'benchmark'")
    m = r.data.metrics
    assert m["convert_f16.identical"] == 1.0 and m["quantize_q8_0.identical"] == 1.0
    assert m["convert_f16.ratio"] > 0 and m["quantize_q8_0.tool_rss_mb"] > 0
    assert r.data.params["hf"] == cfg.model.path
    sel = select(mlflow.MlflowClient(), cfg.tracking.experiment)
    assert sel.benchmarks[BENCHMARK]["run_id"] == r.info.run_id
    assert "| convert f16 |" in gguf_stage(sel.benchmarks[BENCHMARK])
