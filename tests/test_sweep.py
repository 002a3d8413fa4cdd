"""Sweep configs: every launcher in conf/hydra/launcher composes (and builds, where its plugin is
installed), the remote tracking config reads its URI from the environment, and a real multirun
on the parallel (joblib) launcher hangs its jobs under one sweep run through the SweepCallback
that conf/config.yaml wires in. The pipeline itself runs in tests/test_report.py.

    .venv/bin/python -m pytest -q tests/test_sweep.py
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from quantpipe import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
LAUNCHERS = {"local": ("hydra", "BasicLauncher"),
             "parallel": ("hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
             "slurm": ("hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
             "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "RayLauncher")}


def compose_with(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_configs_compose(launcher, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    cfg = compose_with(f"hydra/launcher={launcher}", "hydra.mode=MULTIRUN", "+quant=int8")
    node = cfg.hydra.launcher
    module, cls = LAUNCHERS[launcher]
    assert node._target_.endswith(cls)
    assert cfg.hydra.callbacks.sweep_run._target_ == "quantpipe.sweep.SweepCallback"
    if importlib.util.find_spec(module) is None:  # the ray plugin is not installed by default
        assert OmegaConf.to_container(node, resolve=True)["ray"]["init"]["address"] == \
            "ray://head:10001"
        return
    # as Hydra builds a launcher: a known plugin class that accepts every field we set
    launcher_obj = Plugins.instance()._instantiate(node)
    assert type(launcher_obj).__name__ == cls
    if launcher == "parallel":
        assert node.n_jobs == 2
    if launcher == "slurm":  # submitit's sbatch options survive the merge with its schema
        assert node.timeout_min == 120 and node.mem_gb == 8 and node.partition == "cpu"


def test_remote_tracking_uri_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compose_with("tracking=remote").tracking.uri == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cfg = compose_with("tracking=remote", f"paths.root={tmp_path}")
    assert cfg.tracking.uri == "http://mlflow.internal:5000"
    assert cfg.tracking.experiment == "day3-quantisation"  # the rest from tracking/default
    assert cfg.tracking.artifact_root is None  # the server chooses where artefacts go
    monkeypatch.setenv("QUANTPIPE_ARTIFACT_ROOT", "/shared/mlruns")
    assert compose_with("tracking=remote").tracking.artifact_root == "/shared/mlruns"


APP = '''
import os, sys
import hydra, mlflow
from hydra.core.hydra_config import HydraConfig
from quantpipe import tracking

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
def main(cfg):
    # what pipelines/run.py does, without the pipeline: a variant run under the sweep run
    tracking.setup(cfg.tracking)
    parent = tracking.sweep_parent_id(HydraConfig.get().sweep.dir)
    with mlflow.start_run(run_name=cfg.quant.name, parent_run_id=parent, nested=True,
                          tags={{"quantpipe.kind": "variant", "quant.name": cfg.quant.name}}):
        mlflow.log_metric("pid", os.getpid())

main()
'''


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_parallel_multirun_hangs_jobs_under_one_sweep_run(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP.format(conf=str(CONF)))
    res = subprocess.run([sys.executable, str(app), "hydra.mode=MULTIRUN",
                          "hydra/launcher=parallel", "+quant=int8,gguf_q4_0",
                          f"paths.root={tmp_path}"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (sweep,) = [r for r in runs if r.data.tags["quantpipe.kind"] == "sweep"]
    jobs = [r for r in runs if r.data.tags["quantpipe.kind"] == "variant"]
    assert sweep.info.status == "FINISHED"
    assert sorted(r.data.tags["quant.name"] for r in jobs) == ["gguf_q4_0", "int8"]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {sweep.info.run_id}
    assert "Joblib.Parallel(n_jobs=2" in res.stdout  # the parallel launcher ran them


def test_a_sweep_job_refused_by_its_settings_is_a_failed_variant(tmp_path):
    """pipelines.run as a multirun in which one job's quant.type is unknown: that job builds
    nothing, yet the sweep lists it as a FAILED variant saying why, and the sweep ends FAILED.
    The other job is refused too, so no pipeline work runs here (tests/test_cluster.py has a
    refused job beside ones that run)."""
    res = subprocess.run([sys.executable, "-m", "pipelines.run", "hydra.mode=MULTIRUN",
                          "+quant=gguf", "quant.type=not_a_type,q9_z",
                          f"paths.root={tmp_path}"], capture_output=True, text=True,
                         cwd=PROJECT_ROOT, timeout=300)
    assert res.returncode != 0
    assert "error: quant.type:" in res.stderr + res.stdout, res.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (sweep,) = [r for r in runs if r.data.tags["quantpipe.kind"] == "sweep"]
    jobs = {r.data.tags["quant.name"]: r for r in runs
            if r.data.tags["quantpipe.kind"] == "variant"}
    assert sweep.info.status == "FAILED"
    assert sorted(jobs) == ["gguf_not_a_type", "gguf_q9_z"]
    assert all(r.info.status == "FAILED" and r.data.tags["mlflow.parentRunId"] ==
               sweep.info.run_id for r in jobs.values())
    assert all(r.data.tags["quantpipe.error"].startswith("ConfigError: quant.type: 'not_a_type'"
                                                         if n == "gguf_not_a_type" else
                                                         "ConfigError: quant.type: 'q9_z'")
               for n, r in jobs.items())
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_a_sweep_whose_run_cannot_be_started_launches_no_job(tmp_path):
    """Hydra turns a callback's exception into a warning: a sweep whose MLflow run could not be
    created (the tracking server is down) would run every job as a loose run outside any sweep.
    It stops instead, before any job, in one line naming the server, in seconds: the server is
    asked once (quantpipe.tracking.check_server) before MLflow's client retries for minutes."""
    from tests.test_ui import free_port
    port = free_port()  # nothing listens on it
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipelines.run", "hydra.mode=MULTIRUN",
                          "+quant=int8,gguf_q4_0", "tracking=remote",
                          f"tracking.uri=http://127.0.0.1:{port}", f"paths.root={tmp_path}"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert time.monotonic() - t0 < 60  # not MLflow's minutes of retries (README has the time)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith(f"error: tracking.uri: the tracking server http://127.0.0.1:"
                                 f"{port} does not answer") and res.stderr.count("\n") == 1, \
        res.stderr[-3000:]
    assert not list(tmp_path.glob("multirun/*/*/[01]_*"))  # no job folder
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow  # starts a real MLflow server (~10 s)
def test_processes_starting_together_on_a_server_share_one_experiment(tmp_path):
    """Four processes (two sweeps and their jobs, say) set up a new experiment on a tracking
    server at the same moment, 15 times. Nothing serialises them there, as the lock beside a
    SQLite store does: the ones that lose the creation race (RESOURCE_ALREADY_EXISTS) or the
    experiment-tag race (a unique key) take what the winner made. Without that, one of two
    sweeps started together lost its sweep run (tests/test_cluster.py, once in CI)."""
    from tests.test_ui import free_port, stop, wait_healthy
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
                               str(tmp_path / "art")], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    code = """
        import sys, time
        from tests.conftest import make_cfg
        from quantpipe import tracking
        for i in range(15):  # 15 new experiments, each set up by all four on a 0.2 s clock
            cfg = make_cfg(sys.argv[1], ["+quant=int8", "tracking=remote", f"tracking.uri="
                                         f"http://127.0.0.1:{sys.argv[2]}",
                                         f"tracking.experiment=race-{i}"])
            time.sleep(max(0.0, float(sys.argv[3]) + 0.2 * i - time.time()))
            print(tracking.setup(cfg.tracking))
    """
    try:
        wait_healthy(port, server)
        start = time.time() + 8  # after the imports
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path),
                                   str(port), str(start)], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
        ids = [o.strip().splitlines()[-15:] for o in outs]
        assert all(i == ids[0] for i in ids) and len(set(ids[0])) == 15  # one id per experiment
    finally:
        stop(server)
