"""Evaluation at scale on the tiny model: the reference bounded by the model's own storage
(llama.cpp on the F16 GGUF) against the former float32 one, memory refused up front, a killed
worker explained, the evaluation cache, the time budget."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from quantpipe import memory
from quantpipe.errors import ConfigError
from quantpipe.pipeline import run
from tests.test_pipeline import runs

# llama.cpp's F16 matmuls round activations to FP16 where transformers-float32 keeps float32: on
# the tiny model (weights x4, so logits are large) the two references stay within these
# (`python -m quantpipe.evaluate.parity` measures the same on a real merged model)
PARITY_MAX_ABS_LOGP = 0.15
PARITY_MEAN_KLD = 2e-3


@pytest.mark.slow  # ~30 s: two references on the tiny model (make test stays inside 10 min)
def test_llama_cpp_reference_matches_the_float32_one(cfg_factory):
    """The new reference (llama.cpp, F16 GGUF) against the former (transformers, float32), over
    the full vocabulary on the evaluation's own windows."""
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    from quantpipe.evaluate.metrics import windows
    from quantpipe.evaluate.parity import compare
    cfg = cfg_factory("+quant=fp16")
    run(cfg)
    from quantpipe.evaluate import reference_artifact
    [merged] = Path(cfg.paths.artifacts, "merge").glob("*/config.json")
    # the merged model's F16 GGUF (the base model before the adapter has its own): reused
    f16 = reference_artifact(cfg, {"path": merged.parent, "fingerprint": merged.parent.name})
    tok = AutoTokenizer.from_pretrained(merged.parent)
    ids = np.array(tok(topics_text("eval"), add_special_tokens=False)["input_ids"], np.int32)
    p = compare(merged.parent, f16, windows(ids, cfg.eval.n_ctx, cfg.eval.n_windows, None), 2)
    assert p["parity_max_abs_dlogp"] < PARITY_MAX_ABS_LOGP, p
    assert p["parity_kld_mean"] < PARITY_MEAN_KLD, p


def test_memory_estimate_refuses_before_any_stage(cfg_factory):
    cfg = cfg_factory("+quant=int8", "memory.limit_gb=0.05")
    with pytest.raises(ConfigError, match=r"memory: .* needs about .* GiB .*memory.limit_gb=0.05"):
        run(cfg)
    stages = [r.data.tags.get("quantpipe.stage") for r in runs(cfg)]
    assert not [s for s in stages if s], stages  # refused before the base stage started
    assert not Path(cfg.paths.artifacts, "merge").exists()


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_estimates_are_upper_bounds_of_the_measured_peaks(cfg_factory):
    """Every stage logs its own peak; the preflight's estimate for it is not below it."""
    cfg = cfg_factory("+quant=gguf_q4_0")
    # in-process stages start from this process's size (pytest's, after earlier tests), which
    # the estimate of a pipeline process does not include
    before = psutil.Process().memory_info().rss / 2**20
    run(cfg)
    peaks = {r.data.tags["quantpipe.stage"]: r.data.metrics["stage_peak_rss_mb"]
             for r in runs(cfg) if "quantpipe.stage" in r.data.tags}
    assert set(peaks) >= {"merge", "quantise", "evaluate", "publish"}
    shape = memory.shape_of(Path(cfg.model.path))
    grew = peaks["merge"] - before
    assert memory.estimate_merge(shape, streaming=False) / 2**20 > grew
    # the evaluation's peak is its worker's own, far below this test process's
    assert 0 < peaks["evaluate"] < psutil.Process().memory_info().rss / 2**20 * 2


def test_killed_worker_names_the_signal_and_the_estimate(cfg_factory):
    cfg = cfg_factory("+quant=fp16")
    me = psutil.Process()
    stop = threading.Event()

    def kill_worker():
        while not stop.is_set():
            for child in me.children(recursive=True):
                try:
                    if "quantpipe.evaluate.worker" in " ".join(child.cmdline()):
                        # at once: the tiny model's llama.cpp reference worker can finish
                        # within half a second, and a finished worker cannot be killed
                        os.kill(child.pid, signal.SIGKILL)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker, daemon=True)
    killer.start()
    try:
        with pytest.raises(ConfigError) as e:
            run(cfg)
    finally:
        stop.set()
    msg = str(e.value)
    assert "killed by SIGKILL" in msg and "out-of-memory killer" in msg
    assert "estimated at" in msg and "GiB" in msg and "eval.n_ctx" in msg


@pytest.mark.slow  # ~45 s: two whole pipeline runs on the tiny model
def test_unchanged_evaluation_is_reused_without_a_worker(cfg_factory, monkeypatch):
    from quantpipe import evaluate
    first = run(cfg_factory("+quant=gguf_q4_0"))

    def no_worker(*a, **k):
        raise AssertionError("a worker was started for a cached evaluation")

    monkeypatch.setattr(evaluate, "run_worker", no_worker)
    cfg = cfg_factory("+quant=gguf_q4_0")
    again = run(cfg)
    assert again["kld_mean"] == first["kld_mean"] and again["decode_tok_s"] == first["decode_tok_s"]
    assert {r.data.tags["eval.reused"] for r in runs(cfg)
            if r.data.tags.get("quantpipe.stage") == "evaluate"} == {"true", "false"}
    monkeypatch.undo()
    # speed again on request; quality stays the cached one
    remeasured = run(cfg_factory("+quant=gguf_q4_0", "eval.speed.remeasure=true"))
    assert remeasured["kld_mean"] == first["kld_mean"]
    assert remeasured["decode_tok_s"] != first["decode_tok_s"]


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_time_budget_scores_fewer_windows_and_says_so(cfg_factory):
    from quantpipe.evaluate import estimate_seconds
    run(cfg_factory("+quant=gguf_q4_0"))  # builds the variant, so its estimate can be read
    [gguf] = Path(cfg_factory().paths.artifacts, "quantise").glob("*/model-q4_0.gguf")
    [merged] = Path(cfg_factory().paths.artifacts, "merge").glob("*/config.json")
    # generation shrunk like the speed runs (SHRINK): the estimate counts its decoded tokens,
    # and at the default 8 x 16 they would lift the budget past a real window
    small = ("eval.n_windows=3", "eval.generation.prompts=1", "eval.generation.new_tokens=4",
             "eval.generation.match_k=4")
    probe = cfg_factory("+quant=gguf_q4_0", *small)
    least = estimate_seconds(gguf, "llama.cpp", memory.shape_of(merged.parent), probe, 1)
    # a budget the up-front estimate accepts (least <= 2 x budget) but that one real window
    # (tens of ms: 32 rows of 49k-token log-softmax) already uses up
    cfg = cfg_factory("+quant=gguf_q4_0", *small, f"eval.max_minutes={least / 60:.3g}")
    m = run(cfg)
    assert m["eval_windows_scored"] == 1 and m["eval_windows_planned"] == 3
    [ev] = [r for r in runs(cfg) if r.data.tags.get("quantpipe.stage") == "evaluate"
            and r.data.tags.get("eval.reused") == "false" and "3 windows" in r.data.tags["eval.scored"]]
    assert ev.data.tags["eval.scored"].startswith("1 of 3 windows")


@pytest.mark.parametrize("quant", ["gguf_q4_0", "int4"])
def test_budget_too_small_for_one_window_is_refused_before_any_stage(cfg_factory, quant):
    """The variant's evaluation time is estimated from the model's shape and the backend's
    runtime and weight bytes (`eval_need`) before the merge: a 7B int4 on this CPU is refused in
    a second, not after the merge and quantisation."""
    cfg = cfg_factory(f"+quant={quant}", "eval.max_minutes=0.000001")
    with pytest.raises(ConfigError, match=r"eval.max_minutes: the evaluation of .* needs about "
                                          r".* one window"):
        run(cfg)
    assert not Path(cfg.paths.artifacts, "merge").exists()  # refused before any stage


def test_at_7b_int4_is_refused_up_front_and_q4_k_m_admitted(tmp_path):
    """The measured throughputs (benchmarks/cpu_throughput.py) at a 7B shape and the default
    protocol: bitsandbytes NF4 decodes at ~10 s a token on 2 cores, so its speed runs and chat
    sample alone overrun twice eval.max_minutes; q4_k_m on llama.cpp fits."""
    from quantpipe import pipeline
    from quantpipe.quantize import bnb, gguf
    from tests.conftest import make_cfg
    shape = memory.Shape(n_params=6_880_000_000, stored_bytes=13_760_000_000,
                         largest=32000 * 4096, vocab=32000, layers=32, kv_dim=4096)
    cfg = make_cfg(tmp_path, ["+quant=int4"])
    with pytest.raises(ConfigError, match=r"eval.max_minutes: the evaluation of int4 "
                                          r"\(transformers-bitsandbytes"):
        pipeline.preflight_time(cfg, shape, *bnb.quantize_int4.format.eval_need(shape, quant_type="nf4"))
    cfg = make_cfg(tmp_path, ["+quant=gguf_q4_k_m"])
    pipeline.preflight_time(cfg, shape, *gguf.eval_need(shape, type="q4_k_m"))


def test_the_time_estimate_counts_generation_prompts_and_tasks(tmp_path):
    """Greedy continuations and task answers are decoded token by token, each token reading
    the weights once: at a 3B shape with bitsandbytes NF4 (FP16 bytes at ~1 GB/s) the default
    8 x 16 generation tokens add about 13 minutes, and a tasks file its prompts x
    eval.tasks_max_new_tokens more."""
    from quantpipe.evaluate import estimate_seconds_for
    from quantpipe.quantize import bnb
    from tests.conftest import make_cfg
    shape = memory.Shape(n_params=3_210_000_000, stored_bytes=6_420_000_000,
                         largest=128256 * 3072, vocab=128256, layers=28, kv_dim=1024)
    runtime, weights = bnb.quantize_int4.format.eval_need(shape, quant_type="nf4")
    decode_token = shape.fp16_bytes / runtime.bytes_per_s  # the format's own speed profile
    quiet = make_cfg(tmp_path, ["+quant=int4", "eval.generation.prompts=0"])
    default = make_cfg(tmp_path, ["+quant=int4"])
    added = (estimate_seconds_for(weights, runtime, shape, default, 1)
             - estimate_seconds_for(weights, runtime, shape, quiet, 1))
    assert added > 8 * 16 * decode_token and added / 60 > 10
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "2+2?", "reference": "4"}\n\n' * 5)
    with_tasks = make_cfg(tmp_path, ["+quant=int4", f"eval.tasks_file={tasks}"])
    assert (estimate_seconds_for(weights, runtime, shape, with_tasks, 1)
            - estimate_seconds_for(weights, runtime, shape, default, 1)
            == pytest.approx(5 * 64 * decode_token))


def test_bitsandbytes_needs_follow_the_backend_not_its_options(tmp_path):
    """An int8 config that leaves `threshold` to bitsandbytes' default is still estimated as
    8-bit (the needs hang on the backend function, not on which options a config spells out)."""
    from quantpipe import pipeline
    from tests.conftest import make_cfg
    shape = memory.Shape(n_params=1_000_000_000, stored_bytes=2_000_000_000,
                         largest=32000 * 2048, vocab=32000, layers=16, kv_dim=512)
    for overrides, bits in ((["+quant=int8"], 8), (["+quant=int8", "~quant.backend.threshold"], 8),
                            (["+quant=int4"], 4)):
        cfg = make_cfg(tmp_path, overrides)
        need, options = pipeline.backend_need(cfg, "memory_need")
        assert [what for what, _, _ in need(shape, 512, **options)][0] == \
            f"bitsandbytes {bits}-bit quantisation"
        need, options = pipeline.backend_need(cfg, "eval_need")
        assert need(shape, **options)[1] == shape.fp16_bytes * bits // 16 + 4 * shape.largest
