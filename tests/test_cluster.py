"""Sweeps on a real cluster, on this machine: scripts/cluster/up.sh starts SLURM (munged,
slurmdbd on MariaDB, slurmctld, slurmd) and an MLflow tracking server on PostgreSQL, all on
127.0.0.1; sweeps of the tiny model go through the submitit launcher as SLURM jobs into that
server; the runs, metrics and artefacts are read back through the MLflow client; the cluster is
stopped by scripts/cluster/down.sh.

    .venv/bin/python -m pytest -q -m slow tests/test_cluster.py   # root; apt-installs the packages
    .venv/bin/python -m pytest -q tests/test_cluster.py           # fast: SLURM states -> runs

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
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from quantpipe import PROJECT_ROOT
from tests.conftest import SHRINK

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
def cluster():  # slow: the first start installs packages and creates MLflow's tables
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


def wait_for_stage(experiment: str, stage: str, job: subprocess.Popen, timeout: float = 300):
    """Block until some run of `experiment` has logged stage `stage` (the jobs are mid-run)."""
    import mlflow
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.data.tags.get("quantpipe.stage") == stage for r in runs_of(experiment)[1]):
                return
        except (mlflow.exceptions.MlflowException, AttributeError):  # no experiment yet
            pass
        if job.poll() is not None:
            pytest.fail(f"the sweep ended before stage {stage}: {job.communicate()[0][-3000:]}")
        time.sleep(1)
    pytest.fail(f"no {stage} stage run in {timeout} s")


def restart_server(env: dict) -> None:
    """Stop the tracking server (its process group, from its PID file), keep it away 10 s, and
    start it again with up.sh, which finds every other daemon running and starts only it."""
    pid = int((CLUSTER_DIR / "mlflow" / "server.pid").read_text())
    os.killpg(pid, signal.SIGTERM)
    time.sleep(10)
    out = cluster_script("up", env)
    assert "mlflow server: started" in out and "slurmctld: running" in out, out


@pytest.mark.slow
def test_two_sweeps_at_once_through_slurm_with_a_server_restart(cluster, tmp_path, tiny_base,
                                                                tiny_adapter):
    """Two sweeps at once against one server, four SLURM jobs sharing one stage cache; the
    tracking server is restarted while the jobs log (MLflow's client retries: 7 times, with
    exponential backoff, by default); one job fails (a quant.type llama.cpp does not know) and
    the others go on. Nothing is lost, duplicated or left RUNNING."""
    exp = f"cluster-test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    a = sweep(cluster, tmp_path, exp, tiny_base, tiny_adapter, "+quant=int8,gguf_q4_0")
    b = sweep(cluster, tmp_path, exp, tiny_base, tiny_adapter, "+quant=gguf",
              "quant.type=q8_0,not_a_type")
    wait_for_stage(exp, "merge", a)
    restart_server(cluster)
    out_a, out_b = (p.communicate(timeout=900)[0] for p in (a, b))
    print(f"two sweeps, 4 SLURM jobs, a server restart: {time.monotonic() - t0:.0f} s")
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
    size = {name: r.data.metrics["size_mb"] for name, r in by_name.items()}
    assert size["gguf_q4_0"] < size["gguf_q8_0"]

    # the stage cache is shared across jobs: the merge was built by one job, reused by two
    merges = [r for r in runs if r.data.tags.get("quantpipe.stage") == "merge"]
    assert sorted(r.data.tags["quantpipe.reused"] for r in merges) == ["false", "true", "true"]
    # the driver returns once every job has written its result; SLURM completes the jobs a
    # moment later
    for _ in range(60):
        states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(jobs)],
                                env=cluster, capture_output=True, text=True,
                                check=True).stdout.split()
        if states == ["COMPLETED"] * 4:
            break
        time.sleep(1)
    assert states == ["COMPLETED"] * 4, states

    report = tmp_path / "report.md"
    res = subprocess.run([sys.executable, "-m", "pipelines.report", "--out", str(report),
                          "--sweep", parent["int8"], "tracking=remote",
                          f"tracking.experiment={exp}"], cwd=PROJECT_ROOT, env=cluster,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "int8" in report.read_text() and "gguf_q4_0" in report.read_text()


FAKE_SLURM = """#!/bin/sh
# stand-in for squeue/sacct: job 7_0 still runs, 7_1 hit its time limit, 8 is unknown
case "$*" in *7_0*) echo RUNNING ;; *7_1*) [ "$(basename $0)" = sacct ] && echo TIMEOUT ;; esac
exit 0
"""


def test_runs_of_ended_slurm_jobs_end_failed_with_the_reason(tmp_path, monkeypatch):
    """The part of recovery that SLURM feeds: a RUNNING run whose job ended (known to sacct
    only, as after squeue's MinJobAge) ends FAILED with the job's state; a run whose job still
    runs, or that SLURM cannot place, is left alone. Stand-in squeue/sacct on PATH."""
    import mlflow

    from quantpipe import recovery
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):
        (bin_dir / tool).write_text(FAKE_SLURM)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e")
    run = {job: client.create_run(exp, tags={recovery.SLURM_JOB: job}).info.run_id
           for job in ("7_0", "7_1", "8")}
    assert recovery.mark_dead_runs(exp, client) == [run["7_1"]]
    status = {job: client.get_run(r).info.status for job, r in run.items()}
    assert status == {"7_0": "RUNNING", "7_1": "FAILED", "8": "RUNNING"}
    error = client.get_run(run["7_1"]).data.tags["quantpipe.error"]
    assert "SLURM job 7_1 ended (TIMEOUT)" in error
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert recovery.process_tags()[recovery.SLURM_JOB] == "7_1"


@pytest.mark.slow
def test_sweep_on_a_local_ray_cluster(cluster, tmp_path, tiny_base, tiny_adapter):
    """hydra/launcher=ray_cluster against `ray start --head` on this machine (make ray-deps puts
    Ray and hydra-ray-launcher into .venv-ray): both variants as Ray tasks, logged to the same
    tracking server, the merge built once."""
    ray_libs = PROJECT_ROOT / ".venv-ray"
    if not (ray_libs / "ray").is_dir():
        pytest.skip("Ray is not installed: make ray-deps")
    env = {**cluster, "PYTHONPATH": os.pathsep.join(filter(None, [
        os.environ.get("PYTHONPATH"), str(ray_libs)])), "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path(tempfile.mkdtemp(prefix="qp-ray-", dir="/tmp"))  # short: Ray's socket paths
    # --block: this process owns the Ray daemons and stops them when it is terminated
    head = subprocess.Popen([sys.executable, str(ray_libs / "bin" / "ray"), "start", "--head",
                             "--block", "--port=6390", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        address_file = temp / "ray_current_cluster"
        for _ in range(240):
            if address_file.is_file() or head.poll() is not None:
                break
            time.sleep(0.5)
        assert address_file.is_file(), head.communicate(timeout=60)[0][-3000:]
        exp = f"ray-test-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "pipelines.run", "hydra.mode=MULTIRUN",
               "hydra/launcher=ray_cluster", "tracking=remote", f"tracking.experiment={exp}",
               f"paths.root={tmp_path}", f"model.path={tiny_base}",
               f"adapter.path={tiny_adapter}", *SHRINK, "threads=1", "+quant=int8,gguf_q4_0"]
        res = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                             env={**env, "RAY_ADDRESS": address_file.read_text().strip()})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "Ray Launcher is launching 2 jobs" in res.stdout + res.stderr
    finally:
        head.terminate()
        head.communicate(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    _, runs = runs_of(exp)
    variants = [r for r in runs if r.data.tags.get("quantpipe.kind") == "variant"]
    assert sorted(r.data.tags["quant.name"] for r in variants) == ["gguf_q4_0", "int8"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["ppl"] > 1 for r in variants)
    merges = [r for r in runs if r.data.tags.get("quantpipe.stage") == "merge"]
    assert sorted(r.data.tags["quantpipe.reused"] for r in merges) == ["false", "true"]
