"""Concurrency: pipelines running at once on one root do not corrupt artifacts/, quantized/ or
mlruns/. Real processes throughout (threads would share the locks' file descriptors).

    .venv/bin/python -m pytest -q tests/test_concurrency.py            # + -m slow: two whole pipelines

Cache entries are built once (a file lock per entry: the second process waits, then reuses);
a published name is swapped by one process at a time; MLflow's SQLite store takes concurrent
writers (its 20 s busy timeout) once its creation is serialised (tracking.setup); a dataset two
runs log at the same moment is inserted once and linked to both (tracking.log_dataset).
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT, tracking
from quantpipe import artifacts as art
from tests.conftest import SHRINK, make_cfg


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def no_temps(*roots: Path) -> None:
    for root in roots:
        assert not [p for p in root.rglob(".*") if art.TEMP_RE.match(p.name)], root


def test_a_cache_entry_is_built_once(tmp_path):
    """Four processes want the same entry; one builds it (slowly), three wait and reuse it."""
    code = """
        import sys, time
        from pathlib import Path
        from quantpipe.artifacts import ensure_cached
        root = Path(sys.argv[1])
        def build(tmp):
            with open(root / "builds.txt", "a") as f:
                f.write("built\\n")
            time.sleep(1.0)                       # long enough for the others to arrive
            (tmp / "weights.bin").write_bytes(b"x" * 1000)
            return {"n": 1}
        folder, prov, reused = ensure_cached(root / "artifacts", "merge", "fp", build)
        assert (folder / "weights.bin").stat().st_size == 1000 and prov["result"] == {"n": 1}
        print("reused" if reused else "built")
    """
    outs = finish([spawn(code, tmp_path) for _ in range(4)])
    assert (tmp_path / "builds.txt").read_text() == "built\n"
    assert sorted(o.strip().splitlines()[-1] for o in outs) == ["built"] + ["reused"] * 3
    no_temps(tmp_path)


def test_publishers_of_one_name_take_turns(tmp_path):
    """Four processes publish different folders under one name, 400 times each. Unlocked, the
    two-rename folder swaps interleave and fail (ENOTEMPTY, ENOENT); locked, each swap is whole
    and the survivor is one complete folder."""
    for i in range(4):
        src = tmp_path / f"src{i}"
        src.mkdir()
        for j in range(5):
            (src / f"part{j}.bin").write_bytes(bytes([i]) * 100_000)
    code = """
        import sys
        from pathlib import Path
        from quantpipe.artifacts import publish
        root, i = Path(sys.argv[1]), sys.argv[2]
        for _ in range(400):
            publish(root / f"src{i}", root / "quantized" / "model-int8")
    """
    finish([spawn(code, tmp_path, i) for i in range(4)])
    final = tmp_path / "quantized" / "model-int8"
    contents = {f.read_bytes() for f in final.iterdir()}
    assert len(list(final.iterdir())) == 5 and len(contents) == 1  # one publisher's whole set
    no_temps(tmp_path)


def test_publishing_the_same_cached_file_again_leaves_no_temporary(tmp_path):
    """A re-run publishes the file it published before: the temporary hard link and the
    published name are then links to one inode, which rename(2) leaves both in place."""
    cached = tmp_path / "cache" / "model.gguf"
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF" + bytes(64))
    out = tmp_path / "quantized" / "model-q4_k_m.gguf"
    art.publish(cached, out)
    art.publish(cached, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [".model-q4_k_m.gguf.lock",
                                                             "model-q4_k_m.gguf"]
    assert out.read_bytes() == cached.read_bytes()


def test_sqlite_store_takes_concurrent_writers(tmp_path):
    """Four processes create the store together, then each logs a run with 40 metric steps and
    20 params at the same time: no 'database is locked', nothing lost."""
    code = """
        import sys
        import mlflow
        from tests.conftest import make_cfg
        from quantpipe import tracking
        tracking.setup(make_cfg(sys.argv[1], ["+quant=int8"]).tracking)
        with mlflow.start_run(run_name=f"writer{sys.argv[2]}"):
            mlflow.log_params({f"p{k}": k for k in range(20)})
            for step in range(40):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    """
    finish([spawn(code, tmp_path, i) for i in range(4)])
    tracking.setup(make_cfg(tmp_path, ["+quant=int8"]).tracking)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_name for r in runs) == [f"writer{i}" for i in range(4)]
    client = mlflow.MlflowClient()
    for r in runs:
        assert r.info.status == "FINISHED" and len(r.data.params) == 20
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 40
    db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_runs_logging_one_dataset_at_once_all_get_it(tmp_path):
    """Four runs log the same 25 evaluation texts on a shared 0.1 s clock, as two identical
    pipelines started together do. MLflow's store looks a dataset up, then inserts it: without
    tracking.log_dataset's retry most processes here died on the unique key (5 of 6 in one
    try); with it each run holds all 25 inputs and the experiment one row per text."""
    code = """
        import sys, time
        import mlflow
        from tests.conftest import make_cfg
        from quantpipe import tracking
        tracking.setup(make_cfg(sys.argv[1], ["+quant=int8"]).tracking)
        start = float(sys.argv[3])
        with mlflow.start_run(run_name=f"writer{sys.argv[2]}"):
            for i in range(25):
                time.sleep(max(0.0, start + 0.1 * i - time.time()))
                tracking.log_dataset("eval-text", f"text {i}", "/data/eval.txt#eval", "evaluation")
    """
    import time
    start = time.time() + 10  # after every process has imported MLflow and opened the store
    finish([spawn(code, tmp_path, i, start) for i in range(4)])
    tracking.setup(make_cfg(tmp_path, ["+quant=int8"]).tracking)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 4
    for r in runs:
        assert len(mlflow.get_run(r.info.run_id).inputs.dataset_inputs) == 25
    db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    assert db.execute("SELECT COUNT(*) FROM datasets").fetchone() == (25,)


@pytest.mark.slow  # ~40 s: two whole runs; the mechanisms are each tested above in ~1 s
def test_two_pipelines_at_once(tmp_path, tiny_base, tiny_adapter):
    """Two real pipelines, same variant, same fresh root, started together: both finish; the
    merge and the quantisation are built once and reused by the other; MLflow holds two whole
    variant runs; quantized/ holds one whole model; no temporaries remain."""
    cmd = [sys.executable, "-m", "pipelines.run", f"paths.root={tmp_path}",
           f"model.path={tiny_base}", f"adapter.path={tiny_adapter}", *SHRINK, "+quant=int8"]
    procs = [subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    finish(procs)
    tracking.setup(make_cfg(tmp_path, ["+quant=int8"]).tracking)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    variants = [r for r in runs if r.data.tags.get("quantpipe.kind") == "variant"]
    assert len(variants) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for stage in ("merge", "quantise"):
        reused = sorted(r.data.tags["quantpipe.reused"] for r in runs if r.info.run_name == stage)
        assert reused == ["false", "true"], stage
    assert len([p for p in (tmp_path / "artifacts" / "merge").iterdir()
                if not p.name.startswith(".")]) == 1
    published = tmp_path / "quantized" / "model-int8"
    cached = tmp_path / variants[0].data.tags["quantpipe.published"]  # relative to paths.root
    assert cached == published and (published / "provenance.json").is_file()
    for f in published.iterdir():  # hard links to the one cached quantisation
        assert f.stat().st_nlink >= 2, f
    db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    no_temps(tmp_path / "artifacts", tmp_path / "quantized")


def test_the_sqlite_store_keeps_a_write_ahead_log(tmp_path):
    """tracking.setup puts a new SQLite store in WAL mode (one sync per commit instead of two;
    readers do not block the writer); the mode is kept in the file."""
    from omegaconf import OmegaConf
    db = tmp_path / "mlruns" / "mlflow.db"
    tracking.setup(OmegaConf.create({"uri": f"sqlite:///{db}", "experiment": "wal",
                                     "artifact_root": str(tmp_path / "mlruns" / "artifacts")}))
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
