"""Crash safety: `kill -9` in the middle of a stage loses nothing, and the next start cleans up.

    .venv/bin/python -m pytest -q tests/test_crash_safety.py

The real entry point (python -m pipelines.run) runs in a subprocess on the tiny model; the test
watches for the stage's temporary folder (the stage is mid-write) and kills the process with
SIGKILL: no handler, no finally block runs. Afterwards every finished cache folder has its
provenance.json, nothing sits half-written under a final name, and the next run marks the
killed run KILLED, deletes its temporaries and resumes from the last finished stage.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT, tracking
from quantpipe import artifacts as art
from quantpipe.recovery import clean_stale_temps, mark_dead_runs, process_tags
from tests.conftest import SHRINK, make_cfg


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (lock files aside) with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def pipeline(root: Path, base: Path, adapter: Path, *extra: str) -> subprocess.Popen:
    """`python -m pipelines.run` on the tiny model, in its own process group (so the test can
    reap what a killed pipeline leaves running), output in root/log-<n>.txt."""
    n = len(list(root.glob("log-*.txt")))
    log = open(root / f"log-{n}.txt", "w")
    cmd = [sys.executable, "-m", "pipelines.run", f"paths.root={root}", f"model.path={base}",
           f"adapter.path={adapter}", *SHRINK, *extra]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, pattern: str, root: Path, timeout: float = 300) -> Path:
    """SIGKILL `proc` as soon as a path matching `pattern` (under root) exists; return it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        hits = list(root.glob(pattern))
        if hits:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return hits[0]
        assert proc.poll() is None, f"pipeline ended before {pattern} appeared: {log_of(root)}"
        time.sleep(0.01)
    raise AssertionError(f"{pattern} did not appear in {timeout} s")


def reap(proc: subprocess.Popen) -> None:
    """Kill whatever the killed pipeline left running (an evaluation worker)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log_of(root: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(root.glob("log-*.txt")))


def runs(root: Path, filter_string: str = "") -> list:
    tracking.setup(make_cfg(root, ["+quant=int8"]).tracking)
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=filter_string, order_by=["attributes.start_time ASC"])


def no_half_written_finals(root: Path) -> None:
    """Every cache entry under its final name is finished; quantized/ holds only whole models."""
    for entry in (root / "artifacts").glob("*/*"):
        if not entry.name.startswith("."):
            assert art.is_finished(entry), f"{entry} has no provenance.json"
    for entry in (root / "quantized").glob("*"):
        if not entry.name.startswith("."):
            # a file (GGUF, Modelfile) is replaced in one rename; a folder has its provenance
            assert entry.is_file() or (entry / "provenance.json").is_file(), entry


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_kill_9_mid_stage_then_the_next_run_recovers_and_resumes(tmp_path, tiny_base, tiny_adapter):
    root = tmp_path
    # 1. killed while the quantise stage writes (its merge has finished)
    p = pipeline(root, tiny_base, tiny_adapter, "+quant=int8")
    try:
        temp = kill_when(p, "artifacts/quantise/.*.tmp-*", root)
    finally:
        reap(p)
    assert temp.exists()  # left behind, under a dot-name nobody reads
    no_half_written_finals(root)
    assert not (root / "quantized" / "model-int8").exists()
    killed = runs(root)
    assert {r.info.run_name: r.info.status for r in killed}["quantise"] == "RUNNING"
    assert {r.info.status for r in killed if r.info.run_name == "merge"} == {"FINISHED"}

    # 2. the same command again: marks the killed runs, cleans the temp, reuses the merge
    p = pipeline(root, tiny_base, tiny_adapter, "+quant=int8")
    assert p.wait(timeout=600) == 0, log_of(root)
    assert not temp.exists()
    after = {r.info.run_id: r for r in runs(root)}
    for r in killed:
        if r.info.status == "RUNNING":  # the variant run and its quantise stage
            assert after[r.info.run_id].info.status == "KILLED"
            assert "ended without closing this run" in after[r.info.run_id].data.tags[
                "quantpipe.recovered"]
    second = [r for r in after.values() if r.info.run_id not in {k.info.run_id for k in killed}]
    reused = {r.info.run_name: r.data.tags.get("quantpipe.reused") for r in second}
    assert reused["merge"] == "true" and reused["quantise"] == "false"
    assert {r.info.status for r in second} == {"FINISHED"}
    published = root / "quantized" / "model-int8"
    assert (published / "model.safetensors").is_file()
    before = snapshot(root / "quantized")

    # 3. killed during evaluation of a new setting: the published model is untouched
    p = pipeline(root, tiny_base, tiny_adapter, "+quant=int8", "eval.n_windows=3")
    try:
        kill_when(p, "artifacts/reference/.*.tmp-*", root)
    finally:
        reap(p)
    assert snapshot(root / "quantized") == before
    no_half_written_finals(root)


def test_interrupted_folder_swap_is_put_back(tmp_path):
    """kill -9 between the two renames of a folder swap (publish replacing model-int8) leaves
    the old model at `.model-int8.old-...`; the next start renames it back. A live process's
    temporaries are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    quantized = tmp_path / "quantized"
    old = quantized / f".model-int8.old-{art.HOST}-{dead.pid}-1"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"the published weights")
    half = quantized / f".model-int8.tmp-{art.HOST}-{dead.pid}-2"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    mine = quantized / f".model-fp16.tmp-{art.HOST}-{os.getpid()}-3"
    mine.mkdir()
    other_host = quantized / f".model-q4.tmp-otherhost-{dead.pid}-4"
    other_host.mkdir()

    acted = clean_stale_temps(tmp_path / "artifacts", quantized)
    assert sorted(acted) == sorted([old, half])
    assert (quantized / "model-int8" / "model.safetensors").read_bytes() == b"the published weights"
    assert not half.exists() and mine.exists() and other_host.exists()


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    """A RUNNING run whose recorded process is gone is ended KILLED; one whose process lives
    (this one) is left running."""
    cfg = make_cfg(tmp_path, ["+quant=int8"])
    exp = tracking.setup(cfg.tracking)
    client = mlflow.MlflowClient()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = client.create_run(exp, tags={**process_tags(), "quantpipe.pid": str(dead.pid)})
    alive = client.create_run(exp, tags=process_tags())
    untagged = client.create_run(exp)  # not ours to judge
    assert mark_dead_runs(exp) == [ghost.info.run_id]
    assert client.get_run(ghost.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(untagged.info.run_id).info.status == "RUNNING"
    for r in (alive, untagged):
        client.set_terminated(r.info.run_id)


def test_kill_during_merge_leaves_no_merge(tmp_path, tiny_base, tiny_adapter):
    """Killed while the merge writes: no merge folder under its final name, so the next run
    cannot mistake half a model for a finished one."""
    p = pipeline(tmp_path, tiny_base, tiny_adapter, "+quant=fp16")
    try:
        kill_when(p, "artifacts/merge/.*.tmp-*", tmp_path)
    finally:
        reap(p)
    assert not [e for e in (tmp_path / "artifacts" / "merge").iterdir()
                if not e.name.startswith(".")]
    no_half_written_finals(tmp_path)


def test_a_killed_pipeline_takes_its_evaluation_worker_with_it(tmp_path):
    """The worker calls recovery.die_with_parent first thing: when the process that started it
    is killed (kill -9 too), the kernel ends the worker, instead of leaving it scoring at full
    CPU with nobody to read its result."""
    pid_file = tmp_path / "child.pid"
    child = ("import os, sys, time; from quantpipe.recovery import die_with_parent; "
             f"die_with_parent({{ppid}}); open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(120)")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys, time; "
         f"subprocess.Popen([sys.executable, '-c', {child!r}.format(ppid=os.getpid())]); "
         "time.sleep(120)"], cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and \
            Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the worker outlived its killed parent"
        time.sleep(0.1)
