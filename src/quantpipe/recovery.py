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

SIGTERM (a `kill`, a scheduler's cancel) is better than kill -9: `raise_on_sigterm` turns it into
an exception, so the stack unwinds as for an error: temporaries are deleted where they were made
and the open runs end FAILED at once, not when the next run finds them.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

from quantpipe import artifacts as art
from quantpipe.names import Tag

log = logging.getLogger(__name__)
PID, START, HOST = Tag.PID, Tag.PID_START, Tag.HOST
SLURM_JOB = "quantpipe.slurm_job"
# squeue/sacct states of a job that may still close its run itself
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                "RESIZING", "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED"}


def _start_time(pid: int) -> str:
    return f"{psutil.Process(pid).create_time():.2f}"


def process_tags() -> dict[str, str]:
    """Tags that identify this process (and its SLURM job, if any): set on every run at start."""
    tags = {PID: str(os.getpid()), START: _start_time(os.getpid()), HOST: socket.gethostname()}
    if job := slurm_job_id():
        tags[SLURM_JOB] = job
    return tags


def slurm_job_id() -> str | None:
    """This process's SLURM job, as squeue, sacct and submitit's folders name it: `123_4` for
    task 4 of array job 123 (a sweep is one array), else `123`; None outside SLURM."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of a job (RUNNING, COMPLETED, TIMEOUT, ...), or None when SLURM cannot say.
    squeue knows a job until MinJobAge (300 s by default) after its end, sacct (accounting)
    after that."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Is `pid` a live process (and, when `start` is given, the same one that was recorded)?"""
    try:
        started = _start_time(pid)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True
    return start is None or started == start


def _end_slurm_run(client, run, job_id: str) -> bool:
    """End FAILED a RUNNING run whose SLURM job has ended; True if it did."""
    state = slurm_job_state(job_id)
    if state is None or state in SLURM_ACTIVE:
        return False
    # the job ended, so its process can no longer close the run: what is RUNNING now stays so
    if client.get_run(run.info.run_id).info.status != "RUNNING":
        return False
    note = (f"SLURM job {job_id} ended ({state}) without closing this run; its output: "
            f"<sweep folder>/.submitit/{job_id}/")
    client.set_tag(run.info.run_id, "quantpipe.recovered", note)
    client.set_tag(run.info.run_id, "quantpipe.error", note)
    client.set_terminated(run.info.run_id, "FAILED")
    return True


def mark_dead_runs(experiment_id: str, client=None) -> list[str]:
    """End every RUNNING run of `experiment_id` whose process is known to be gone: KILLED when
    its process on this host has died, FAILED when its SLURM job has ended. Return their ids."""
    import mlflow
    client = client or mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=10000)
    dead = []
    for r in runs:
        tags = r.data.tags
        if job := tags.get(SLURM_JOB):
            if _end_slurm_run(client, r, job):
                dead.append(r.info.run_id)
            continue
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
        log.warning("closed %d run(s) of dead processes or ended SLURM jobs: %s", len(dead),
                    ", ".join(dead))
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
    """Both of the above for the configured artifacts/, quantized/ and MLflow experiment, then
    the registry's versions whose registration those runs left unfinished."""
    import mlflow

    from quantpipe.registry import drop_half_registered
    clean_stale_temps(Path(cfg.paths.artifacts), Path(cfg.paths.quantized))
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        mark_dead_runs(exp.experiment_id)
    drop_half_registered(cfg.registry)


class Terminated(SystemExit):
    """SIGTERM as an exception. A SystemExit, so Hydra's job runner and `except Exception`
    blocks let it through; the exit status is 143 (128 + 15), as a shell reports a process
    that SIGTERM ended."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "stopped by SIGTERM"


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread. Only where SIGTERM still has
    its default action: a launcher's own handler (submitit requeues on it) is kept. A second
    SIGTERM while the first unwinds ends the process at once, as kill -9 would; the next run
    cleans up after it."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid`, the process that started it, dies: Linux's
    prctl(PR_SET_PDEATHSIG, SIGKILL). An evaluation worker outlives a killed pipeline otherwise
    and scores on at full CPU for as long as its budget lasts, with nobody to read the result
    (seen: a 3B int4 worker ran 20 minutes after its pipeline was killed). Elsewhere it does
    nothing; a parent already gone before the call ends this process at once."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a killed pipeline may leave its worker running
    if os.getppid() != parent_pid:  # it died before the call: no signal will come
        os._exit(1)
