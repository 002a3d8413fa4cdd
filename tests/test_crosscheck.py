"""pipelines/crosscheck.py: our perplexity and decode speed next to llama.cpp's tools.

Fast: a missing file fails with what to do. Slow (needs `make tools`): on a tiny q8_0 GGUF our
perplexity equals llama-perplexity's within 0.5 % over the same chunks, and the MLflow run
holds both sides. Speed ratios are printed and logged, not asserted (a loaded machine).
"""
from pathlib import Path

import mlflow
import pytest

from pipelines.crosscheck import crosscheck, main, table
from quantpipe import PROJECT_ROOT, tracking
from quantpipe.errors import ConfigError

TOOLS = PROJECT_ROOT / "build" / "llama.cpp" / "bin"


def test_missing_gguf_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*make pipeline"):
        main(["--gguf", str(tmp_path / "absent.gguf"), f"paths.root={tmp_path}"])


@pytest.mark.slow
def test_our_perplexity_matches_llama_perplexity(cfg_factory, tmp_path):
    from quantpipe.quantize.gguf import convert_f16, llama_quantize
    from quantpipe.tools import tool_path
    tool_path(TOOLS, "llama-perplexity")  # a ConfigError here means: run `make tools`
    cfg = cfg_factory(f"paths.tools={TOOLS}", "eval.n_ctx=128", "eval.n_windows=4", "threads=1")
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "model-q8_0.gguf"
    convert_f16(Path(cfg.model.path), f16, {})
    llama_quantize(f16, q8, "q8_0", 1)

    m = crosscheck(cfg, q8, rounds=2)
    assert m["eval_chunks"] == 4 and m["rounds"] == 2
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=0.005)
    assert m["ppl_chunk_max_dev"] < 0.005  # every running PPL it printed, not just the last
    assert m["decode_tok_s_ours"] > 0 and m["decode_tok_s_llamacpp"] > 0
    assert "| perplexity |" in table(q8.name, m)

    tracking.setup(cfg.tracking)
    [r] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.`quantpipe.kind` = 'crosscheck'")
    assert r.data.metrics["ppl_llamacpp"] == pytest.approx(m["ppl_llamacpp"])
    assert r.data.tags["crosscheck.ppl"] == "ok"
