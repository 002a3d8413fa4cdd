"""The default model (SmolLM2-135M-Instruct, embedded) through the calibrated INT4 route: the
claim the llm-compressor variants exist for, checked on real weights rather than the tiny
random model.

    .venv/bin/python -m pytest -q -m slow tests/test_default_model.py   # needs make llmc, ~6 min

No adapter (the claim is about quantisation, and the demo adapter's training would double the
time); 4 windows of 512 tokens; speed runs shrunk (speed is not what is checked).
"""
from __future__ import annotations

import pytest

from tests.conftest import make_cfg
from tests.test_llmc import check_variant, needs_llmc

# disk.margin_gb: CI's scratch disk is small, and this test is about quality, not the disk guard
QUICK = ["adapter=none", "eval.n_windows=4", "eval.speed.warmup=0", "eval.speed.repeats=1",
         "eval.sample.max_new_tokens=8", "eval.generation.prompts=2", "disk.margin_gb=0.25",
         "eval.lm_eval.tasks=[]", "eval.vllm.enabled=false"]


@needs_llmc
@pytest.mark.slow
def test_default_model_gptq_int4_loses_less_than_nf4(tmp_path):
    """gptq_w4a16 (llm-compressor, calibrated on the calib split) against bitsandbytes NF4
    (dynamic, uncalibrated) at the same 4 bits: lower KLD against FP16 on the same token ids,
    and a published compressed-tensors folder with its calibration dataset logged."""
    from quantpipe.pipeline import run
    cfg = {"int4": make_cfg(tmp_path, ["+quant=int4", *QUICK]),
           # 16 calibration windows of 256 tokens instead of 64: a quarter of GPTQ's CPU time
           "gptq_w4a16": make_cfg(tmp_path, ["+quant=gptq_w4a16", *QUICK,
                                             "quant.backend.calibration.samples=16"])}
    nf4 = run(cfg["int4"])
    gptq = run(cfg["gptq_w4a16"])
    check_variant(cfg["gptq_w4a16"], gptq, "gptq_w4a16")
    assert gptq["eval_tokens_scored"] == nf4["eval_tokens_scored"]
    assert gptq["kld_mean"] < nf4["kld_mean"], (gptq["kld_mean"], nf4["kld_mean"])
    assert gptq["delta_ppl_pct"] < nf4["delta_ppl_pct"]
