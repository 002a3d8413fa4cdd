"""MLflow tracking: the store, runs for the pipeline and its stages, params, tags, inputs.

Layout of runs: one run per pipeline invocation (tag quantpipe.kind=variant, named after the
quant variant) with a nested run per stage (tag quantpipe.stage). A Hydra multirun adds one
sweep run above them (quantpipe.sweep.SweepCallback), so the MLflow UI groups a sweep's
variants. A run whose code raises is ended FAILED by `mlflow.start_run`'s context manager.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from omegaconf import DictConfig, OmegaConf

from quantpipe import PROJECT_ROOT
from quantpipe.artifacts import check_writable, portable
from quantpipe.errors import ConfigError
from quantpipe.locks import file_lock
from quantpipe.names import Kind, Tag
from quantpipe.recovery import mark_dead_runs, process_tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow  # noqa: E402  (after the telemetry switch)

from quantpipe.ui import log_sweep_comparison, mark_model_training  # noqa: E402

log = logging.getLogger(__name__)

# the pipeline's own libraries; the evaluation runtimes add theirs (library_versions)
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "mlflow", "hydra-core", "evaluate")
PARENT_ID_FILE = "mlflow_sweep_run_id"
T = TypeVar("T")


def setup(tracking: DictConfig, wait_s: float = 0.0) -> str:
    """Point MLflow at the configured store and return the experiment id. `wait_s`: how long an
    http(s) server that does not answer is waited for (a sweep job, whose launcher already
    found it up: a restart is waited out, as mid-run); 0 refuses at once (a run's start).

    For a SQLite store, a write is tried first (os.access passes for root on a read-only mount),
    and two pipelines starting at once are serialised by a lock beside the database: MLflow
    creates the schema and the experiment on first use, and two processes doing that together
    race ("table already exists"). After that, SQLite's own locking (MLflow sets a 20 s busy
    timeout) serialises their writes."""
    uri = str(tracking.uri)
    check_server(uri, wait_s=wait_s)  # before MLflow's client, which retries for ~4 minutes
    bound_retries(uri)
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        check_writable(db.parent, "tracking.uri")
        if db.exists() and not os.access(db, os.W_OK):
            raise ConfigError("tracking.uri", f"{db} is not writable",
                              "fix its permissions or set tracking.uri to a writable store")
        lock = file_lock(db.with_name(f".{db.name}.setup.lock"), "MLflow store setup")
    with lock:
        mlflow.set_tracking_uri(uri)
        exp_id = _experiment_id(tracking)
        retry_lost_insert(mark_model_training, mlflow.MlflowClient(), exp_id)
        if uri.startswith("sqlite:///"):
            write_ahead_log(db)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


SERVER_TIMEOUT_S = 3.0  # per request; a tracking server on the same site answers in ms
SERVER_FIX = ("start it (`make cluster-up` starts one on this machine; `make ui` serves mlruns/ "
              "on http://127.0.0.1:5000), set MLFLOW_TRACKING_URI to one that runs, or log to "
              "the local store: tracking=default")
# what `mlflow server` answers without credentials: /health, then (a server under a path prefix
# may route only its API) one search of the REST API
PROBES = ("/health", "/api/2.0/mlflow/experiments/search?max_results=1")


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S, wait_s: float = 0.0) -> None:
    """An http(s) tracking URI answers like an MLflow server within seconds, or a ConfigError
    naming it. Without this, MLflow's client retries a refused connection for about 4 minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, backoff factor 2) and then fails with a traceback per
    retry layer. 401/403 count as an answer (a server behind a login: MLflow sends the
    credentials); a 404 or 5xx to both probes does not (a proxy or another service there).
    The requests run in a daemon thread, so a name lookup that hangs is bounded too. With
    `wait_s`, probes repeat every few seconds until the server answers or `wait_s` has passed."""
    if not uri.startswith(("http://", "https://")):
        return
    import threading
    deadline = time.monotonic() + wait_s
    while True:
        outcome: list[str | None] = []
        t = threading.Thread(target=lambda out=outcome: out.append(_probe(uri.rstrip("/"),
                                                                          timeout)),
                             daemon=True, name="tracking-probe")
        t.start()
        t.join(len(PROBES) * timeout + 1)
        why = outcome[0] if outcome else f"does not answer within {len(PROBES) * timeout:g} s"
        if why is None:
            return
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_s:g} s)" if wait_s else ""
            raise ConfigError("tracking.uri", f"the tracking server {uri} {why}{waited}",
                              SERVER_FIX)
        log.warning("tracking server %s %s: waiting up to %.0f s more", uri, why,
                    deadline - time.monotonic())
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


# A server lost mid-run: MLflow's client retries each request with exponential backoff. These
# bound that to about a minute (sleeps of 2, 4, 8, 16 and 32 s; 20 s per attempt for a server
# that accepts and never answers) instead of MLflow's ~4 minutes: a server back within it and
# the run goes on and logs everything; one that is not, and the run stops with one line
# (`server_lost`). A variable already set in the environment wins.
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
RETRY_WAIT_S = 2 + 4 + 8 + 16 + 32


def bound_retries(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        for key, value in RETRY_ENV.items():
            os.environ.setdefault(key, value)


def server_lost(error: BaseException, uri: str) -> ConfigError | None:
    """The one-line error for a run whose http(s) tracking server stopped answering after it
    started (MLflow's retries exhausted), or None when `error` is something else."""
    if not uri.startswith(("http://", "https://")) or isinstance(error, ConfigError):
        return None  # a ConfigError already says what is wrong (e.g. no server at the start)
    seen, e = [], error
    while e is not None and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__name__ for x in seen}
    text = " ".join(str(x) for x in seen)
    if not (names & {"ConnectionError", "MaxRetryError", "NewConnectionError"}
            or "Max retries exceeded" in text or "Connection refused" in text):
        return None
    return ConfigError("tracking.uri", f"the tracking server {uri} stopped answering during the "
                       f"run (MLflow gave up after about {RETRY_WAIT_S} s of retries)",
                       "start it again (`make cluster-up`, or `make ui`) and run the same "
                       "command: finished stages are reused, and that run marks this one KILLED")


def _probe(base: str, timeout: float) -> str | None:
    """None when `base` answers as an MLflow server, else why not (`does not answer (...)`)."""
    import urllib.error
    import urllib.request
    why = None
    for path in PROBES:
        try:
            urllib.request.urlopen(base + path, timeout=timeout).close()
            return None
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return None
            why = (f"answers HTTP {e.code} to GET {path}: not an MLflow tracking server, or "
                   "a failing one")
        except Exception as e:  # URLError (refused, unknown host), a timeout, a malformed URI
            return f"does not answer ({getattr(e, 'reason', None) or e})"
    return why


def _experiment_id(tracking: DictConfig) -> str:
    """The configured experiment's id, created if new. Processes that start together against
    a tracking server (two sweeps, SLURM jobs) are not serialised by a lock: the one that loses
    the creation race takes the experiment the other made."""
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None  # a tracking server that serves artefacts itself picks the location
    if tracking.get("artifact_root") is not None:
        root = Path(tracking.artifact_root)
        check_writable(root, "tracking.artifact_root")
        location = root.as_uri()
    try:
        return mlflow.create_experiment(tracking.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(tracking.experiment).experiment_id


def write_ahead_log(db: Path) -> None:
    """Put the SQLite store in write-ahead-log mode (kept in the file). A commit then syncs the
    log once, where the default rollback journal syncs the journal and the database: an
    unchanged sweep commits ~400 times, and took 27-32 s before, 21-26 s after (make sweep, 3
    runs each). WAL needs every process on one host (SQLite's shared memory), as this store
    does anyway; jobs on several hosts log to a server (tracking=remote). A store another
    process holds busy keeps its mode: this is a speed-up, not a requirement."""
    import sqlite3
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as e:
        log.debug("%s stays in its journal mode (%s)", db, e)


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "absent"."""
    return _installed_version(name)


@functools.lru_cache(maxsize=None)
def _installed_version(name: str) -> str:
    """Read once per process: reading a distribution's metadata takes ~10 ms, and every stage
    of every job of a sweep asks for the same ones (1.4 s of an unchanged sweep)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def versions_of(names: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of `names` (looked up through package_version, each call)."""
    return {name: package_version(name) for name in names}


def library_versions() -> dict[str, str]:
    """The pipeline's libraries and every registered evaluation runtime's (and what builds its
    reference artefact): a run's provenance."""
    from quantpipe.evaluate import runtimes
    names = dict.fromkeys([*LIBRARIES, *(lib for r in runtimes.runtimes()
                                         for lib in (*r.libraries, *r.provenance))])
    return versions_of(names)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict[str, str]:
    return {"hardware.cpu": platform.processor() or platform.machine(),
            "hardware.cores": str(os.cpu_count()),
            "hardware.platform": platform.platform(terse=True)}


def provenance_tags() -> dict[str, str]:
    tags = {f"{Tag.VERSION_PREFIX}{k}": v for k, v in library_versions().items()}
    tags.update(hardware())
    tags[Tag.GIT_SHA] = git_sha()
    return tags


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat `a.b.c` params (MLflow caps a value at 6000 characters),
    paths relative to paths.root (the report prints some: it must not print this host's folders;
    the run's config.json keeps them as resolved)."""
    def walk(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], str(node)[:6000]
    container = OmegaConf.to_container(cfg, resolve=True)
    root = OmegaConf.select(cfg, "paths.root")
    return dict(walk(portable(container, root) if root else container, ""))


def log_batch(params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
              tags: dict[str, str] | None = None) -> None:
    """Params, metrics and tags on the active run in one request to the store (each fluent
    log_* call is its own transaction: ~15 ms on SQLite, a round trip to a server)."""
    from mlflow.entities import Metric as MetricEntity
    from mlflow.entities import Param, RunTag
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        mlflow.active_run().info.run_id,
        metrics=[MetricEntity(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


@contextlib.contextmanager
def stage_run(name: str, **tags: str) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one stage; FAILED if the block raises. Logs the stage's wall time and
    peak RSS (`stage_seconds`, `stage_peak_rss_mb`: this process's own high-water mark since
    the stage began, or the largest child process it ran), failed or not."""
    from quantpipe import memory
    memory.reset_peak()
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=name, nested=True,
                          tags={Tag.KIND: Kind.STAGE, Tag.STAGE: name,
                                **process_tags(), **tags}) as r:
        try:
            yield r
        finally:
            mlflow.log_metrics({"stage_seconds": time.perf_counter() - t0,
                                "stage_peak_rss_mb": memory.stage_peak_mb()})


@contextlib.contextmanager
def error_tag() -> Iterator[None]:
    """Inside an active run: on an exception, tag the run with it (quantpipe.error), so the UI
    and the report say why a run FAILED; the exception propagates."""
    from quantpipe.recovery import Terminated
    try:
        yield
    except (Exception, Terminated) as e:
        if server_lost(e, mlflow.get_tracking_uri()) is not None:
            # the retries are spent: the runs still open fail at once, not a minute each
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            raise
        mlflow.set_tag(Tag.ERROR, f"{type(e).__name__}: {e}"[:5000])
        raise


def log_dataset(name: str, text: str, source: str, context: str) -> None:
    """Record an evaluation or calibration text as an MLflow dataset input (name, digest,
    source). `source` is a file path, optionally with a `#split` suffix naming the part used."""
    import pandas as pd
    path, _, split = source.partition("#")
    ds = mlflow.data.from_pandas(pd.DataFrame({"text": [text]}), source=path,
                                 name=f"{name}[{split}]" if split else name)
    retry_lost_insert(mlflow.log_input, ds, context=context)


INSERT_RETRIES = 3


def retry_lost_insert(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, tried again when it lost an insert race. MLflow's store looks a
    row up and inserts it when absent, in two statements (a dataset by experiment, name and
    digest; an experiment tag by key): two processes logging the same one at the same moment
    both miss it, and the second insert fails on the unique key (SQLite: "UNIQUE constraint
    failed", PostgreSQL: "duplicate key value violates unique constraint"). Nothing was written
    (the transaction rolled back) and the row now exists, so the next try uses it."""
    for _ in range(INSERT_RETRIES - 1):
        try:
            return call(*args, **kwargs)
        except mlflow.exceptions.MlflowException as e:
            if "unique constraint" not in str(e).lower():
                raise
            log.debug("%s lost an insert race; trying again", getattr(call, "__name__", call))
    return call(*args, **kwargs)


def log_model(path: Path, max_mb: float, artifact_path: str, fingerprint: str) -> str:
    """Log a published model to the active run and return its URI (`runs:/<run>/<path>`).
    Small models are copied in, once: a model whose fingerprint an earlier finished run already
    holds (an unchanged sweep publishes the same files again) is logged as a pointer to that
    copy, `<artifact_path>/same_as.json`, and its URI is returned (a sweep of the default
    formats would otherwise add 1.6 GB of identical copies to the store each time). Above
    `max_mb` the files' paths (relative to the folder the model was published in: no host
    path) and sha256 are logged instead (a 14 GB model would be stored twice)."""
    from quantpipe.artifacts import file_sha256, size_bytes
    path = Path(path)
    run_id = mlflow.active_run().info.run_id
    if size_bytes(path) > max_mb * 2**20:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        mlflow.log_dict({p.relative_to(path.parent).as_posix():
                         {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in files}, f"{artifact_path}/files.json")
        return f"runs:/{run_id}/{artifact_path}"
    if (holder := _run_holding(fingerprint, artifact_path)) is not None:
        mlflow.log_dict({"run_id": holder, "uri": f"runs:/{holder}/{artifact_path}",
                         Tag.MODEL_FINGERPRINT: fingerprint}, f"{artifact_path}/same_as.json")
        return f"runs:/{holder}/{artifact_path}"
    (mlflow.log_artifacts if path.is_dir() else mlflow.log_artifact)(str(path), artifact_path)
    mlflow.set_tag(Tag.MODEL_FINGERPRINT, fingerprint)  # this run now holds the copy
    return f"runs:/{run_id}/{artifact_path}"


def _run_holding(fingerprint: str, artifact_path: str) -> str | None:
    """The newest finished run of this experiment that holds a copy of the model with this
    fingerprint and still has its files, or None."""
    client = mlflow.MlflowClient()
    active = mlflow.active_run().info
    runs = client.search_runs([active.experiment_id], max_results=5,
                              filter_string=f"tags.`{Tag.MODEL_FINGERPRINT}` = '{fingerprint}' "
                                            "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        try:
            if client.list_artifacts(run.info.run_id, artifact_path):
                return run.info.run_id
        except (OSError, mlflow.exceptions.MlflowException):
            continue  # its files are gone (deleted by hand, or another store)
    return None


def start_sweep_run(config: DictConfig) -> str:
    """The MLflow run above all jobs of a multirun (quantpipe.sweep.SweepCallback). Its id is
    handed to the jobs through a file in the sweep folder, which works for the local launcher
    and for ones that run jobs elsewhere (joblib, submitit) as long as they share that folder."""
    setup(config.tracking)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(config.tracking.experiment)
    name = f"sweep {Path(config.hydra.sweep.dir).name}"
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={Tag.KIND: Kind.SWEEP, **provenance_tags(),
                                  **process_tags()})
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:  # "x": two sweeps sharing one folder would hang their jobs under one sweep run
        with open(sweep_dir / PARENT_ID_FILE, "x") as f:
            f.write(run.info.run_id)
    except FileExistsError:
        client.set_terminated(run.info.run_id, "FAILED")
        raise ConfigError("hydra.sweep.dir", f"{sweep_dir} already holds another sweep",
                          "give each sweep its own folder (the default name is unique)") from None
    log.info("sweep run %s", run.info.run_id)
    # Hydra raises after the last job when any job failed, and then never calls
    # on_multirun_end: close the sweep run at exit in that case too
    atexit.register(close_sweep_run, run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


def close_sweep_run(run_id: str, tracking_uri: str | None = None) -> None:
    """End a sweep run FINISHED if every variant under it finished, else FAILED (once)."""
    client = mlflow.MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:  # the store is gone (a test's temporary one)
        return
    if run.info.status != "RUNNING":
        return
    # a job killed by its scheduler (or cut off from the server) could not close its runs
    mark_dead_runs(run.info.experiment_id, client)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`{Tag.PARENT_RUN}` = '{run_id}'")
    failed = not children or any(c.info.status != "FINISHED" for c in children)
    try:  # the comparison is a view: a failure to draw it must not leave the sweep RUNNING
        log_sweep_comparison(client, run_id)
    except Exception:
        log.exception("could not log the comparison table on sweep run %s", run_id)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def log_refused_job(cfg: DictConfig, parent_run_id: str, error: BaseException) -> None:
    """A sweep job whose own settings were refused (a quant.type llama.cpp does not know): a
    FAILED variant run under the sweep run, tagged with why, so the comparison lists it and the
    sweep ends FAILED. Nothing was built; a single run refuses without any MLflow run."""
    setup(cfg.tracking, wait_s=RETRY_WAIT_S)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    try:
        name = str(OmegaConf.select(cfg, "quant.name", default="?"))
    except Exception:  # the bad value may be one its name interpolates
        name = "?"
    run = client.create_run(exp.experiment_id, run_name=name, tags={
        Tag.KIND: Kind.VARIANT, Tag.QUANT_NAME: name, Tag.PARENT_RUN: parent_run_id,
        Tag.ERROR: f"{type(error).__name__}: {error}"[:5000], **provenance_tags(),
        **process_tags()})
    client.set_terminated(run.info.run_id, "FAILED")


def sweep_parent_id(sweep_dir: str | Path) -> str | None:
    f = Path(sweep_dir) / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None
