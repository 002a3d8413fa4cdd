"""Sweeps on a real cluster, on this machine: scripts/cluster/up.sh starts SLURM (munged,
slurmdbd on MariaDB, slurmctld, slurmd) and an MLflow tracking server on PostgreSQL, all on
127.0.0.1; sweeps of the tiny model go through the submitit launcher as SLURM jobs into that
server; the runs, metrics and artefacts are read back through the MLflow client; the cluster is
stopped by scripts/cluster/down.sh.

    .venv/bin/python -m pytest -q -m slow tests/test_cluster.py     # root; apt-installs what is missing

The test cluster has its own folder (.cluster-test/) and ports (+100), so a cluster started by
`make cluster-up` keeps running beside it. Without root the tests are skipped (up.sh would only
print the manual steps).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from quantpipe import PROJECT_ROOT
from tests.conftest import SHRINK

pytestmark = pytest.mark.slow
CLUSTER_DIR = PROJECT_ROOT / ".cluster-test"
PORTS = {"QP_SLURMCTLD_PORT": "6917", "QP_SLURMD_PORT": "6918", "QP_SLURMDBD_PORT": "6919",
         "QP_MARIADB_PORT": "3407", "QP_PG_PORT": "5533", "QP_MLFLOW_PORT": "5150"}
URI = f"http://127.0.0.1:{PORTS['QP_MLFLOW_PORT']}"


def cluster_script(name: str, env: dict) -> str:
    res = subprocess.run(["bash", f"scripts/cluster/{name}.sh"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("make cluster-up needs root (daemons, apt); it prints the manual steps")
    env = {**os.environ, **PORTS, "CLUSTER_DIR": str(CLUSTER_DIR), "PY": sys.executable}
    t0 = time.monotonic()
    out = cluster_script("up", env)
    print(f"cluster up in {time.monotonic() - t0:.0f} s\n{out}")
    assert f"MLflow      {URI}" in out
    env.update(SLURM_CONF=str(CLUSTER_DIR / "slurm" / "slurm.conf"), MLFLOW_TRACKING_URI=URI)
    yield env
    out = cluster_script("down", env)
    assert "stopped mlflow server" in out and "stopped slurmctld" in out, out
    for pid_file in CLUSTER_DIR.rglob("*.pid"):  # every daemon it started is gone
        pid = (pid_file.read_text().split() or [""])[0]
        assert not pid or not Path(f"/proc/{pid}").exists(), pid_file
    shutil.rmtree(CLUSTER_DIR, ignore_errors=True)


def sweep(env: dict, root: Path, experiment: str, tiny_base: Path, tiny_adapter: Path,
          *overrides: str) -> subprocess.Popen:
    """`make sweep hydra/launcher=slurm tracking=remote ...` without make (pipelines.run)."""
    cmd = [sys.executable, "-m", "pipelines.run", "hydra.mode=MULTIRUN", "hydra/launcher=slurm",
           "tracking=remote", f"tracking.experiment={experiment}", f"paths.root={root}",
           f"model.path={tiny_base}", f"adapter.path={tiny_adapter}", *SHRINK,
           # two jobs at once on a 2-core machine: one core each, small memory requests
           "threads=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20", *overrides]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def runs_of(experiment: str):
    import mlflow
    client = mlflow.MlflowClient(URI)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_two_sweeps_at_once_through_slurm_into_postgres(cluster, tmp_path, tiny_base,
                                                         tiny_adapter):
    """Two sweeps at once against one server, four SLURM jobs sharing one stage cache; one job
    fails (a quant.type llama.cpp does not know), the others go on."""
    exp = f"cluster-test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    a = sweep(cluster, tmp_path, exp, tiny_base, tiny_adapter, "+quant=int8,gguf_q4_0")
    b = sweep(cluster, tmp_path, exp, tiny_base, tiny_adapter, "+quant=gguf",
              "quant.type=q8_0,not_a_type")
    out_a, out_b = (p.communicate(timeout=900)[0] for p in (a, b))
    print(f"two sweeps, 4 SLURM jobs: {time.monotonic() - t0:.0f} s")
    assert a.returncode == 0, out_a[-5000:]
    assert b.returncode != 0, out_b[-5000:]  # Hydra reports the failed job after the others ran
    assert "Submitit 'slurm' sweep output dir" in out_a

    client, runs = runs_of(exp)
    kind = lambda r: r.data.tags.get("quantpipe.kind")  # noqa: E731
    sweeps = {r.info.run_id: r for r in runs if kind(r) == "sweep"}
    variants = [r for r in runs if kind(r) == "variant"]
    assert len(sweeps) == 2 and len(variants) == 4  # nothing lost, nothing duplicated
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_name = {r.data.tags["quant.name"]: r for r in variants}
    assert sorted(by_name) == ["gguf_not_a_type", "gguf_q4_0", "gguf_q8_0", "int8"]
    parent = {n: r.data.tags["mlflow.parentRunId"] for n, r in by_name.items()}
    assert parent["int8"] == parent["gguf_q4_0"] != parent["gguf_q8_0"] == parent["gguf_not_a_type"]
    assert sweeps[parent["int8"]].info.status == "FINISHED"
    assert sweeps[parent["gguf_q8_0"]].info.status == "FAILED"

    failed = by_name.pop("gguf_not_a_type")
    assert failed.info.status == "FAILED" and "quant.type" in failed.data.tags["quantpipe.error"]
    jobs = {r.data.tags["quantpipe.slurm_job"] for r in variants}
    assert len(jobs) == 4  # one SLURM job per variant
    for name, r in by_name.items():
        assert r.info.status == "FINISHED", name
        m = r.data.metrics
        assert m["size_mb"] > 0 and m["ppl"] > 1 and m["kld_mean"] >= 0, (name, m)
        # artefacts went through the server into its artifact store
        assert client.list_artifacts(r.info.run_id), name
    assert by_name["gguf_q4_0"].data.metrics["size_mb"] < by_name["gguf_q8_0"].data.metrics["size_mb"]

    # the stage cache is shared across jobs: the merge was built by one job, reused by two
    merges = [r for r in runs if r.data.tags.get("quantpipe.stage") == "merge"]
    assert sorted(r.data.tags["quantpipe.reused"] for r in merges) == ["false", "true", "true"]
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(jobs)],
                            env=cluster, capture_output=True, text=True, check=True).stdout.split()
    assert states == ["COMPLETED"] * 4, states

    report = tmp_path / "report.md"
    res = subprocess.run([sys.executable, "-m", "pipelines.report", "--out", str(report),
                          "--sweep", parent["int8"], "tracking=remote",
                          f"tracking.experiment={exp}"], cwd=PROJECT_ROOT, env=cluster,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "int8" in report.read_text() and "gguf_q4_0" in report.read_text()


def test_server_restarted_mid_sweep(cluster, tmp_path, tiny_base, tiny_adapter):
    """The tracking server goes away for ~10 s while a SLURM job logs to it: MLflow's client
    retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, exponential backoff) and the run still FINISHes."""
    exp = f"cluster-restart-{uuid.uuid4().hex[:8]}"
    job = sweep(cluster, tmp_path, exp, tiny_base, tiny_adapter, "+quant=int8")
    import mlflow
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the job's run is logging its stages
        try:
            _, runs = runs_of(exp)
        except (mlflow.exceptions.MlflowException, AttributeError):
            runs = []
        if any(r.data.tags.get("quantpipe.stage") == "merge" for r in runs):
            break
        time.sleep(1)
    else:
        pytest.fail(f"no merge stage run in 300 s: {job.communicate(timeout=60)[0][-3000:]}")
    pid = int((CLUSTER_DIR / "mlflow" / "server.pid").read_text())
    os.killpg(pid, signal.SIGTERM)
    time.sleep(10)
    assert "mlflow server: started" in cluster_script("up", cluster)  # only the server restarts
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-5000:]
    _, runs = runs_of(exp)
    (variant,) = [r for r in runs if r.data.tags.get("quantpipe.kind") == "variant"]
    assert variant.info.status == "FINISHED" and variant.data.metrics["ppl"] > 1
    assert not [r for r in runs if r.info.status == "RUNNING"]
