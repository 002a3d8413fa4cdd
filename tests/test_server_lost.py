"""A tracking server lost mid-run: back within the bounded wait, the run completes and logs
everything; gone for good, the run stops with one line, and the next run (once the server is
back) marks it KILLED and completes. No run is left RUNNING.

A real MLflow server (`mlflow server`, SQLite behind it) started by the test and killed with
SIGKILL while the pipeline (`python -m pipelines.run`, the tiny model) quantises.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from quantpipe import PROJECT_ROOT
from tests.conftest import SHRINK

pytestmark = pytest.mark.slow  # MLflow servers and pipelines in subprocesses: make test-slow


class Server:
    """`mlflow server` on a free loopback port over one SQLite file, restartable."""

    def __init__(self, folder: Path):
        self.folder, self.proc = folder, None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        raise AssertionError("mlflow server did not answer in 90 s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server")
    s.folder.mkdir()
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


def pipeline(root: Path, server: Server, tiny_base: Path,
             retries: str | None = None) -> tuple[subprocess.Popen, Path]:
    """The run, with the project's retry bound (tracking.RETRY_ENV), or `retries` set by the
    caller (a variable already in the environment wins)."""
    log = root / f"log-{len(list(root.glob('log-*.txt')))}.txt"
    cmd = [sys.executable, "-m", "pipelines.run", "+quant=gguf_q8_0", "tracking=remote",
           f"paths.root={root}", f"model.path={tiny_base}", "adapter=none", *SHRINK]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(key, None)  # the project's bound, not the caller's
    if retries is not None:
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"ended before {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout} s")


def runs(server: Server) -> list:
    import mlflow
    client = mlflow.MlflowClient(server.uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_server_back_within_the_wait_and_the_run_completes(tmp_path, server, tiny_base):
    proc, log = pipeline(tmp_path, server, tiny_base)
    wait_for(log, "quantise:", proc)
    server.kill()
    time.sleep(5)
    server.start()
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    statuses = {r.info.status for r in runs(server)}
    assert statuses == {"FINISHED"}, statuses


def test_a_server_gone_stops_the_run_in_one_line_and_the_next_run_closes_it(
        tmp_path, server, tiny_base):
    # two retries (2 + 4 s of backoff per request) instead of the project's five (~62 s, which
    # the test above relies on): the same one line, three minutes sooner
    proc, log = pipeline(tmp_path, server, tiny_base, retries="2")
    wait_for(log, "quantise:", proc)
    server.kill()
    assert proc.wait(timeout=600) == 2
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: tracking.uri: the tracking server {server.uri} stopped "
                           "answering during the run"), log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    server.start()
    proc, log = pipeline(tmp_path, server, tiny_base)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    statuses = sorted(r.info.status for r in runs(server))
    assert "RUNNING" not in statuses and "KILLED" in statuses and "FINISHED" in statuses
