"""A stage that hits a full disk stops with one line (the folder, the free space, the need), its
partial output is deleted, and a run after space is freed completes.

The disk is a real one: a small tmpfs mounted for the test (root only; skipped elsewhere).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from quantpipe import artifacts as art
from quantpipe.errors import ConfigError


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of `size` bytes at tmp_path/disk; remounting resizes it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"{'remount,' if mounted else ''}size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(True)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def everything_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.name.endswith(".lock"))


def test_a_full_disk_stops_the_stage_in_one_line_and_leaves_nothing(small_disk):
    disk = small_disk(1 << 20)

    def build(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(b"\0" * (3 << 20))
        return {}

    with pytest.raises(ConfigError) as e:  # an estimate below the truth passes the check
        art.ensure_cached(disk, "merge", "fp", build, need_bytes=512 << 10)
    line = str(e.value)
    assert "\n" not in line and line.startswith("paths.artifacts: the merge stage ran out of "
                                                f"disk space in {disk / 'merge'}")
    assert "GiB free" in line and "needs about 0.00 GiB" in line and "run again" in line
    assert everything_under(disk) == ["merge"]  # the partial folder is gone
    small_disk(8 << 20)  # space freed: the same call completes
    folder, _, reused = art.ensure_cached(disk, "merge", "fp", build, need_bytes=3 << 20)
    assert not reused and (folder / "weights.bin").stat().st_size == 3 << 20


@pytest.mark.slow  # a pipeline on the tiny model, twice: make test-slow
def test_the_merge_on_a_full_disk_fails_its_runs_and_reruns_after_space_is_freed(
        cfg_factory, small_disk):
    import mlflow

    from quantpipe.pipeline import run
    # room for the estimate (the base's weights) but not for the tokenizer files beside them
    weights = sum(p.stat().st_size for p in Path(cfg_factory().model.path).glob("*.safetensors"))
    disk = small_disk(weights + (512 << 10))
    cfg = cfg_factory("+quant=int8", f"paths.artifacts={disk}", "disk.margin_gb=0")
    with pytest.raises(ConfigError, match="the merge stage ran out of disk space"):
        run(cfg)
    left = everything_under(disk)
    assert not [p for p in left if p.startswith("merge/")]  # no partial merge
    assert not [p for p in left if "/." in p or p.startswith(".")]  # no temporaries
    for entry in {p.split("/")[0] + "/" + p.split("/")[1] for p in left if p.count("/") >= 1}:
        assert art.is_finished(disk / entry), entry  # what an earlier stage built is whole
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    status = {r.data.tags.get("quantpipe.stage", r.data.tags.get("quantpipe.kind")):
              r.info.status for r in runs}
    assert status["variant"] == status["merge"] == "FAILED" and "RUNNING" not in status.values()
    small_disk(64 << 20)
    assert run(cfg)["size_mb"] > 0
