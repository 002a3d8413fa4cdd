"""Settings a run depends on are refused before any stage, through the real command line, in one
line (`error: <key>: <problem> -> <fix>`), exit code 2 and seconds: an unreachable tracking
server, a sweep launcher whose engine is missing, a paths.root that cannot be created, an eval
text shorter than one window, llama.cpp's tools missing for a variant that runs them.

    .venv/bin/python -m pytest -q tests/test_fail_fast.py

Every command here would otherwise run for minutes (MLflow's retries: ~4 min; the merge and
quantisation before the evaluation sees the text: ~10 min at 7B) or end in a traceback.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from quantpipe import PROJECT_ROOT, tracking
from quantpipe.errors import ConfigError
from tests.conftest import make_cfg
from tests.test_ui import free_port


def refuse(*words: str, env: dict | None = None) -> tuple[str, float]:
    """Run `python -m pipelines.run <words>`: exit 2 with one `error:` line; (line, seconds).
    The seconds are for a reader, not asserted: a timed assertion fails on a loaded machine
    (README "Reliability and scale" gives the measured times)."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipelines.run", *words], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr[-3000:]
    return res.stderr.strip(), took


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A root whose MLflow store exists (creating one is 5-10 s of MLflow's schema migrations,
    paid once per store, not per refusal)."""
    root = tmp_path_factory.mktemp("root")
    tracking.setup(make_cfg(root).tracking)
    return root


def stage_runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`quantpipe.kind` = 'stage'")


# --- services --------------------------------------------------------------------------------

def test_a_tracking_server_that_is_not_running_is_refused_in_seconds(tmp_path):
    port = free_port()  # nothing listens on it
    line, _ = refuse("+quant=gguf_q8_0", "tracking=remote", f"tracking.uri=http://127.0.0.1:{port}",
                     f"paths.root={tmp_path}")
    assert line.startswith(f"error: tracking.uri: the tracking server http://127.0.0.1:{port} "
                           "does not answer"), line
    assert "make cluster-up" in line and "make ui" in line and "tracking=default" in line
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlruns").exists()


@pytest.fixture
def http_server():
    """A local HTTP server answering GET with `status["code"]` (200 until a test sets it)."""
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", status
    server.shutdown()
    server.server_close()


def test_a_server_must_answer_like_mlflow(http_server):
    """200 at /health, or 401/403 (a login in front), is a server; a 404 or 5xx to both probes
    is something else at that address (a proxy, another service)."""
    uri, status = http_server
    for code in (200, 401, 403):
        status["code"] = code
        tracking.check_server(uri)
    for code in (404, 502):
        status["code"] = code
        with pytest.raises(ConfigError, match=f"answers HTTP {code} to GET /api/2.0/mlflow"):
            tracking.check_server(uri)
    tracking.check_server("sqlite:////nowhere/mlflow.db")  # a local store is not asked


def test_a_server_that_accepts_but_never_answers_is_refused_after_the_timeout():
    with socket.socket() as s:  # the kernel completes the connect; nobody reads the request
        s.bind(("127.0.0.1", 0))
        s.listen()
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as e:
            tracking.check_server(uri, timeout=1)
    assert time.monotonic() - t0 < 30  # not MLflow's minutes of retries
    assert e.value.key == "tracking.uri" and uri in e.value.problem
    assert "does not answer" in e.value.problem


def test_a_slurm_sweep_without_slurm_is_refused_before_the_sweep_run(tmp_path):
    bare = tmp_path / "bin"  # a PATH with no sbatch or srun, whatever this machine has
    bare.mkdir()
    line, _ = refuse("hydra.mode=MULTIRUN", "hydra/launcher=slurm", "+quant=int8,gguf_q8_0",
                     f"paths.root={tmp_path}", env={"PATH": str(bare)})
    assert line.startswith("error: hydra/launcher: slurm submits to SLURM, but sbatch and srun "
                           "are not on this machine's PATH"), line
    assert "make cluster-up" in line and "hydra/launcher=local" in line
    assert not (tmp_path / "mlruns").exists()  # no sweep run was opened
    assert not list(tmp_path.glob("multirun/*/*/*"))  # no job folder


def test_a_slurm_sweep_whose_controller_does_not_answer_is_refused_in_one_line(tmp_path):
    """SLURM installed, no cluster running (or no configuration): sbatch failed with submitit's
    traceback once the sweep run was open. The controller is asked first (`scontrol ping`):
    SLURM's own scontrol where this machine has one, with a configuration file that is not
    there, else a stand-in that answers as it does."""
    import shutil
    bare = tmp_path / "bin"
    bare.mkdir()
    for cmd in ("sbatch", "srun"):
        (bare / cmd).write_text("#!/bin/sh\nexit 0\n")
        (bare / cmd).chmod(0o755)
    scontrol = shutil.which("scontrol")
    if scontrol:
        (bare / "scontrol").symlink_to(scontrol)
    else:
        (bare / "scontrol").write_text("#!/bin/sh\necho 'scontrol: fatal: Could not establish a "
                                       "configuration source' >&2\nexit 1\n")
        (bare / "scontrol").chmod(0o755)
    line, _ = refuse("hydra.mode=MULTIRUN", "hydra/launcher=slurm", "+quant=int8,gguf_q8_0",
                     f"paths.root={tmp_path}", env={"PATH": f"{bare}:/usr/bin:/bin",
                                                    "SLURM_CONF": str(tmp_path / "none.conf")})
    assert line.startswith("error: hydra/launcher: slurm submits to SLURM, but its controller "
                           "does not answer (`scontrol ping`: "), line
    assert "make cluster-up" in line and "hydra/launcher=local" in line
    assert not (tmp_path / "mlruns").exists()  # no sweep run was opened


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is importable here")
def test_a_ray_sweep_without_ray_is_refused_before_the_sweep_run(tmp_path):
    line, _ = refuse("hydra.mode=MULTIRUN", "hydra/launcher=ray_cluster", "+quant=int8,gguf_q8_0",
                     f"paths.root={tmp_path}")
    assert line.startswith("error: hydra/launcher: ray_cluster needs Ray"), line
    assert "make ray-deps" in line and "make cluster-up" in line
    assert not (tmp_path / "mlruns").exists()


# --- paths -----------------------------------------------------------------------------------

def test_a_paths_root_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")  # ENOTDIR, for root too
    bad = tmp_path / "file" / "root"
    line, _ = refuse("+quant=gguf_q8_0", f"paths.root={bad}")
    assert line.startswith(f"error: paths.root: {bad} is not writable"), line
    assert "point paths.root at a writable folder" in line
    sweep, _ = refuse("hydra.mode=MULTIRUN", "+quant=int8,gguf_q8_0", f"paths.root={bad}")
    assert sweep == line
    res = subprocess.run([sys.executable, "-m", "pipelines.run", "+quant=gguf_q8_0",
                          f"paths.root={bad}"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 2 and "Traceback" in res.stderr  # the full story on request


def test_llama_cpp_tools_are_found_in_the_checkout_whatever_paths_root(tmp_path):
    from quantpipe.artifacts import portable_path
    cfg = make_cfg(tmp_path)
    assert Path(cfg.paths.tools) == PROJECT_ROOT / "build" / "llama.cpp" / "bin"
    assert Path(cfg.paths.artifacts) == tmp_path / "artifacts"
    # what the run's params and provenance say of it: no folder of this host
    assert portable_path(cfg.paths.tools, cfg.paths.root) == "build/llama.cpp/bin"


# --- before any stage ------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "one two three four"], ids=["empty", "4 tokens"])
def test_an_eval_text_shorter_than_one_window_is_refused_before_any_stage(store, tmp_path, text):
    """The default model (the embedded GGUF, whose base stage has not run here): counted with
    its tokenizer before the base stage, cached by the text's digest."""
    short = tmp_path / "short.txt"
    short.write_text(text)
    n = len(text.split())  # one token a word in SmolLM2's vocabulary
    line, _ = refuse("+quant=gguf_q8_0", f"paths.root={store}", f"eval.text_file={short}")
    assert line == (f"error: eval.text_file: {short} has {n} tokens, fewer than one window "
                    "(eval.n_ctx=512) -> use a longer text or a smaller eval.n_ctx"), line
    assert stage_runs(store) == []
    assert not (store / "artifacts" / "base").exists()
    counts = [json.loads(p.read_text())["result"] for p in
              (store / "artifacts" / "token-count").glob("*/provenance.json")]
    assert {"tokens": n} in counts


def test_the_token_count_of_a_model_folder_comes_from_its_tokenizer(tiny_base, tmp_path):
    """tokenizer.json read without transformers gives the count AutoTokenizer gives."""
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    from quantpipe.token_count import count_tokens
    cfg = make_cfg(tmp_path, [f"model.path={tiny_base}"])
    text = topics_text("eval")[:20000]
    assert count_tokens(cfg, text) == len(AutoTokenizer.from_pretrained(tiny_base)(
        text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("quant", ["gguf_imatrix_q4_k_m", "gguf_tuned"])
def test_a_variant_that_needs_llama_cpp_tools_is_refused_before_any_stage(store, tmp_path, quant):
    line, _ = refuse(f"+quant={quant}", f"paths.root={store}", f"paths.tools={tmp_path}")
    assert line.startswith(f"error: paths.tools: {tmp_path}/llama-"), line
    assert "run `make tools`" in line
    assert stage_runs(store) == []


def test_make_builds_the_tools_first_for_the_variants_that_run_them():
    """As .venv-llmc: `make pipeline`/`make sweep` build llama.cpp's tools on first use when a
    variant needs them (-B: as on a fresh clone, whatever is built here)."""
    def recipe(*words):
        return subprocess.run(["make", "-n", "-B", *words], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout
    for words in (["pipeline", "+quant=gguf_tuned"], ["pipeline", "+quant=gguf_imatrix_q4_k_m"],
                  ["sweep"], ["curve"]):
        assert "scripts/build_llama_tools.sh" in recipe(*words), words
    # `make curve`: the size-curve sweep, BUDGETS handed to quant.budgets
    assert ("+quant=gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned 'quant.budgets=[q3_k_m,q5_k_m]'"
            in recipe("curve", "BUDGETS=q3_k_m,q5_k_m"))
    for words in (["pipeline", "+quant=gguf_q4_k_m"], ["sweep", "SWEEP=int8,gguf_q4_0"]):
        assert "scripts/build_llama_tools.sh" not in recipe(*words), words


def test_a_config_error_survives_the_trip_back_from_a_cluster_job():
    """submitit and Ray pickle a job's exception back to the launcher: it must load there whole
    (it once failed to, and the launcher printed a TypeError instead of the job's one line)."""
    import pickle

    from quantpipe.errors import ConfigError
    e = pickle.loads(pickle.dumps(ConfigError("tracking.uri", "no answer", "make cluster-up")))
    assert (e.key, e.problem, e.fix) == ("tracking.uri", "no answer", "make cluster-up")
    assert str(e) == "tracking.uri: no answer -> make cluster-up"
