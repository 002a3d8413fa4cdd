"""The MLflow UI opens where a user wants to be: the experiment is a model-training one, the sweep
run carries the comparison table and plots, `make ui` prints the compare view's URL; and (slow)
that page, served by `make ui`'s own command and loaded in headless Chromium, shows every
variant and its key metrics.

    .venv/bin/python -m pytest -q tests/test_ui.py              # fast part (seconds)
    .venv/bin/python -m pytest -q -m slow tests/test_ui.py      # the browser (~1-3 minutes)

The runs are real MLflow runs with the pipeline's tags and metric names, made directly (a real
sweep of the tiny model takes minutes and is covered by tests/test_sweep.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT, tracking
from tests.conftest import make_cfg

# a sweep of three variants (values away from rounding ties: the page rounds them, ui_number)
VARIANTS = {
    "fp16": {"size_mb": 257.3, "delta_ppl_pct": 0.0, "kld_mean": 0.0, "decode_tok_s": 26.4},
    "gguf_q8_0": {"size_mb": 136.5, "delta_ppl_pct": 0.25, "kld_mean": 0.0012,
                  "decode_tok_s": 90.5},
    "gguf_q4_0": {"size_mb": 86.12, "delta_ppl_pct": 19.35, "kld_mean": 0.0843,
                  "decode_tok_s": 136.8},
}
KEY_METRICS = ("size_mb", "delta_ppl_pct", "kld_mean", "decode_tok_s")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A project root holding one finished sweep of VARIANTS in its store; returns the ids."""
    tmp_path = tmp_path_factory.mktemp("root")
    cfg = make_cfg(tmp_path, ["+quant=fp16"])
    exp_id = tracking.setup(cfg.tracking)
    client = mlflow.MlflowClient()
    sweep_run = client.create_run(exp_id, run_name="sweep test", tags={"quantpipe.kind": "sweep"})
    ids = []
    for name, metrics in VARIANTS.items():
        r = client.create_run(exp_id, run_name=name, tags={
            "quantpipe.kind": "variant", "quant.name": name, "mlflow.parentRunId":
            sweep_run.info.run_id, "quant.family": "gguf" if "gguf" in name else "hf",
            "gate": "failed" if metrics["delta_ppl_pct"] > 10 else "passed"})
        for k, v in {**metrics, "compression": 257.3 / metrics["size_mb"]}.items():
            client.log_metric(r.info.run_id, k, v)
        client.set_terminated(r.info.run_id, "FINISHED")
        ids.append(r.info.run_id)
    tracking.close_sweep_run(sweep_run.info.run_id)
    return {"root": tmp_path, "cfg": cfg, "experiment_id": exp_id,
            "sweep_id": sweep_run.info.run_id, "variant_ids": ids, "client": client}


def test_experiment_opens_on_runs(sweep):
    exp = sweep["client"].get_experiment(sweep["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.quantpipe"])  # runs table: metric columns
    assert {f"metrics.`{k}`" for k in KEY_METRICS} <= set(view["selectedColumns"])


def test_sweep_run_carries_table_and_plots(sweep, tmp_path):
    client, sweep_id = sweep["client"], sweep["sweep_id"]
    assert client.get_run(sweep_id).info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(sweep_id)} | {
        a.path for a in client.list_artifacts(sweep_id, "report")}
    assert {"comparison.json", "report/size_vs_delta_ppl.png", "report/decode_tok_s.png"} <= names
    table = json.loads(Path(client.download_artifacts(sweep_id, "comparison.json",
                                                      str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {r["variant"] for r in rows} == set(VARIANTS)
    for r in rows:
        for k in KEY_METRICS:
            assert r[k] == pytest.approx(VARIANTS[r["variant"]][k])
    assert {r["variant"]: r["gate"] for r in rows}["gguf_q4_0"] == "failed"


def test_make_ui_prints_the_compare_url(sweep):
    res = subprocess.run([sys.executable, "-m", "pipelines.ui", "--print-only", "--port", "5077",
                          f"paths.root={sweep['root']}"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    url = compare_line(res.stdout)
    assert url.startswith("http://127.0.0.1:5077/#/compare-runs?")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == sweep["variant_ids"]
    assert json.loads(query["experiments"][0]) == [sweep["experiment_id"]]
    assert query["workflowType"] == ["machine_learning"]
    assert (f"#/experiments/{sweep['experiment_id']}/runs?viewStateShareKey=quantpipe&"
            "workflowType=machine_learning") in res.stdout


def compare_line(stdout: str) -> str:
    return next(ln.split()[-1] for ln in stdout.splitlines() if ln.startswith("compare view:"))


# --- the real browser ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the UI server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"MLflow UI not up on port {port} after {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server by its own PID (it takes its uvicorn worker down with it); its
    process group (its own session, started by this test) is killed if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ui_number(v: float) -> str:
    """A metric as MLflow's compare page prints it (Utils.formatMetric in its JS bundle): 3
    decimals below 10, 2 below 100, else 1; exponent below 0.001."""
    if v == 0:
        return "0"
    if abs(v) < 0.001:
        raise ValueError("pick test values >= 0.001")
    x = round(v, 3 if abs(v) < 10 else 2 if abs(v) < 100 else 1)
    return str(int(x)) if x == int(x) else str(x)


def dump_dom(chromium: str, url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The page's DOM after 30 s of virtual time (the UI is a React app: its requests and
    rendering finish within it); chromium runs in its own session, and whatever it leaves
    behind (helpers that outlive it) is killed by that session's group id."""
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--disable-breakpad",
                             "--disable-crash-reporter", f"--user-data-dir={tmp_path / 'chromium'}",
                             "--window-size=1400,1000", "--virtual-time-budget=30000",
                             "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def page_text(dom: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


@pytest.mark.slow
def test_compare_page_in_headless_chromium(sweep, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make test-slow installs it when run as root)")
    port = free_port()
    log = open(tmp_path / "ui.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.ui", "--port", str(port),
                             f"paths.root={sweep['root']}"], cwd=PROJECT_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(port, proc)
        url = compare_line((tmp_path / "ui.log").read_text())
        res = dump_dom(chromium, url, tmp_path)
    finally:
        stop(proc)
    assert proc.returncode is not None
    text = page_text(res.stdout)
    assert f"Comparing {len(VARIANTS)} Runs" in text, text[:2000]
    for name, metrics in VARIANTS.items():
        assert name in text
        for key, value in metrics.items():
            assert key in text
            shown = ui_number(value)
            assert re.search(rf"(?<![\d.]){re.escape(shown)}(?![\d])", text), (key, shown)
