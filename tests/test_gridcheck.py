"""The grid check (quantpipe.gridcheck): weights snapped to a 4-bit grid in blocks of 32 read
100 %, float weights ~0 %; the base stage logs the share once per base, cached, on its run and
the variant's.

    .venv/bin/python -m pytest -q tests/test_gridcheck.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantpipe import gridcheck, tracking
from quantpipe.names import Metric, Stage, Tag
from quantpipe.pipeline import stage_base


def snap_4bit_block32(w: torch.Tensor) -> torch.Tensor:
    """Quantise then dequantise as an asymmetric 4-bit format with blocks of 32 does (Q4_1's
    min + scale x 0..15): each block of 32 along a row keeps at most 16 values."""
    b = w.float().reshape(-1, 32)
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    d = (hi - lo).clamp_min(1e-8) / 15
    return (lo + d * torch.round((b - lo) / d)).reshape(w.shape).to(w.dtype)


def test_a_4bit_block32_grid_reads_100_pct_and_float_weights_0(tmp_path, monkeypatch):
    torch.manual_seed(0)
    odd = torch.randn(64, 40, dtype=torch.float16)  # one block per row and a tail of 8
    odd[:, :32] = snap_4bit_block32(odd[:, :32].contiguous())
    save_file({"grid.weight": snap_4bit_block32(torch.randn(256, 128, dtype=torch.float16)),
               "grid_bf16.weight": snap_4bit_block32(torch.randn(96, 64, dtype=torch.bfloat16)),
               "float.weight": torch.randn(256, 128, dtype=torch.float16),
               "float32.weight": torch.randn(32, 64),
               "odd.weight": odd, "norm.weight": torch.ones(128, dtype=torch.float16),
               "narrow.weight": torch.ones(8, 16, dtype=torch.float16)},
              tmp_path / "model.safetensors")
    monkeypatch.setattr(gridcheck, "CHUNK", 1000)  # several slices per tensor, none on a row
    table = gridcheck.check_folder(tmp_path)
    pct = {name: t["aligned_pct"] for name, t in table["tensors"].items()}
    assert pct["grid.weight"] == pct["grid_bf16.weight"] == pct["odd.weight"] == 100.0
    assert pct["float.weight"] < 1 and pct["float32.weight"] < 1
    assert "norm.weight" not in pct and "narrow.weight" not in pct  # no full block in a row
    blocks = {name: t["blocks"] for name, t in table["tensors"].items()}
    assert blocks["grid.weight"] == 256 * 4 and blocks["odd.weight"] == 64
    aligned = 1024 + 96 * 2 + 64  # weighted by weight count: every block holds 32 weights
    assert table["grid_aligned_pct"] == pytest.approx(100 * aligned / (aligned + 1024 + 64),
                                                      abs=0.5)
    monkeypatch.setattr(gridcheck, "CHUNK", 1 << 22)
    assert gridcheck.check_folder(tmp_path)["tensors"] == table["tensors"]  # slicing: same


def test_the_warning_starts_at_half_the_blocks():
    assert gridcheck.warning(None) is None and gridcheck.warning(49.9) is None
    text = gridcheck.warning(97.31)
    assert "97.3 % of blocks of 32 hold <= 16 values" in text and "(GPTQ, AWQ, NF4)" in text


@pytest.fixture
def aligned_base(tmp_path, tiny_base) -> Path:
    """The tiny base with every 2-D weight snapped to the 4-bit block-32 grid."""
    out = tmp_path / "aligned-base"
    shutil.copytree(tiny_base, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: snap_4bit_block32(v) if v.ndim == 2 else v for k, v in tensors.items()},
              weights, metadata={"format": "pt"})
    return out


def test_base_stage_logs_the_grid_share_once_per_base(cfg_factory, aligned_base, tiny_base):
    cfg = cfg_factory(f"model.path={aligned_base}")
    tracking.setup(cfg.tracking)
    client = mlflow.MlflowClient()
    variants = []
    for path in (aligned_base, aligned_base, tiny_base):  # the second reads the cached table
        with mlflow.start_run() as variant:
            stage_base(cfg_factory(f"model.path={path}"))
        variants.append(client.get_run(variant.info.run_id))
    pcts = [v.data.metrics[Metric.GRID_ALIGNED_PCT] for v in variants]
    assert pcts[0] == pcts[1] == 100.0 and pcts[2] < 1
    for v in variants:
        (base,) = client.search_runs(
            [v.info.experiment_id],
            f"tags.`{Tag.PARENT_RUN}` = '{v.info.run_id}' and tags.`{Tag.STAGE}` = '{Stage.BASE}'")
        assert base.data.metrics[Metric.GRID_ALIGNED_PCT] == v.data.metrics[
            Metric.GRID_ALIGNED_PCT]
        assert gridcheck.TABLE in [a.path for a in client.list_artifacts(base.info.run_id)]
    assert len(list((Path(cfg.paths.artifacts) / "base-grid").glob("[!.]*"))) == 2  # 2 bases
