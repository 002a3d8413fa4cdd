"""Start-up recovery after a crash or kill -9: close the dead process's MLflow runs and clean its
half-written temporaries. `quantpipe.pipeline.run` calls `recover(cfg)` before it starts work.

Every run the pipeline opens carries `process_tags()`: host, pid and the process start time
(pid + start time name a process uniquely; a pid alone is reused). A run still RUNNING whose
process on this host is gone was interrupted: it is ended KILLED, with a tag saying so. Runs
of other hosts are left alone (we cannot see their processes).

Temporaries are dot-prefixed siblings of their final names (quantpipe.artifacts.TEMP_RE):
`.X.tmp-<host>-<pid>-<ns>` is deleted when its process is dead; `.X.old-...` is the previous
published folder, moved aside during a swap: deleted if X exists, else renamed back to X (a kill
between the two renames of a folder swap would otherwise lose the published model).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

import psutil

from quantpipe import artifacts as art
from quantpipe.names import Tag

log = logging.getLogger(__name__)
PID, START, HOST = Tag.PID, Tag.PID_START, Tag.HOST


def _start_time(pid: int) -> str:
    return f"{psutil.Process(pid).create_time():.2f}"


def process_tags() -> dict[str, str]:
    """Tags that identify this process: set on every run at start."""
    return {PID: str(os.getpid()), START: _start_time(os.getpid()), HOST: socket.gethostname()}


def process_alive(pid: int, start: str | None = None) -> bool:
    """Is `pid` a live process (and, when `start` is given, the same one that was recorded)?"""
    try:
        started = _start_time(pid)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True
    return start is None or started == start


def mark_dead_runs(experiment_id: str) -> list[str]:
    """End KILLED every RUNNING run of `experiment_id` whose recording process on this host is
    gone; return their ids."""
    import mlflow
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=10000)
    dead = []
    for r in runs:
        tags = r.data.tags
        if tags.get(HOST) != host or not tags.get(PID, "").isdigit():
            continue
        if process_alive(int(tags[PID]), tags.get(START)):
            continue
        note = (f"process {tags[PID]} on {host} ended without closing this run (killed or "
                f"crashed); marked KILLED by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_tag(r.info.run_id, Tag.RECOVERED, note)
        client.set_terminated(r.info.run_id, "KILLED")
        dead.append(r.info.run_id)
    if dead:
        log.warning("marked %d interrupted run(s) KILLED: %s", len(dead), ", ".join(dead))
    return dead


def clean_stale_temps(*roots: Path) -> list[Path]:
    """Delete temporaries of dead processes of this host under `roots`; put a published folder
    moved aside by an interrupted swap back in place. Return the paths acted on."""
    acted = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for p in sorted(root.rglob(".*")):
            if not p.exists() and not p.is_symlink():  # was inside a temp deleted just now
                continue
            m = art.TEMP_RE.match(p.name)
            if not m or m["host"] != art.HOST or process_alive(int(m["pid"])):
                continue
            final = p.with_name(m["final"])
            if m["tag"] == "old" and not final.exists():
                os.replace(p, final)
                log.warning("restored %s from an interrupted swap", final)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            acted.append(p)
    if acted:
        log.warning("cleaned %d stale temporaries of interrupted runs", len(acted))
    return acted


def recover(cfg) -> None:
    """Both of the above for the configured artifacts/, quantized/ and MLflow experiment."""
    import mlflow
    clean_stale_temps(Path(cfg.paths.artifacts), Path(cfg.paths.quantized))
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        mark_dead_runs(exp.experiment_id)
