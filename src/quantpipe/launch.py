"""What must hold before Hydra makes a folder or launches a job, checked by a Hydra callback
(conf/config.yaml: hydra.callbacks.launch_checks) that runs before either:

- `paths.root` can be created and written. Hydra creates the run folder under it before our
  code runs, so `paths.root=/proc/x` was a bare FileNotFoundError traceback.
- a sweep's launcher finds its engine: SLURM's `sbatch` and `srun` and a controller that
  answers `scontrol ping` for hydra/launcher=slurm (submitit otherwise fails once the sweep run
  is open: `Could not detect "srun"`, or sbatch's "Could not establish a configuration
  source" where SLURM is installed but no cluster runs), the Ray
  launcher importable and a Ray cluster that answers for hydra/launcher=ray_cluster.

Each refusal is one line naming the key and the fix, exit code 2 (quantpipe.cli), in about a
second: MLflow, torch and the launcher plugins are not imported for it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from quantpipe.artifacts import check_writable
from quantpipe.errors import ConfigError

ENGINE_TIMEOUT_S = 3.0  # a TCP connect to the Ray head; on one site it takes milliseconds
RAY_DEPS = "run `make ray-deps` and sweep with PYTHONPATH=.venv-ray"
RAY_START = ("start a head (`PYTHONPATH=.venv-ray .venv/bin/python .venv-ray/bin/ray start --head "
             "--port=6380`) and sweep with RAY_ADDRESS=127.0.0.1:6380 (README \"Sweeps on a "
             "cluster\")")
OR_SLURM = "; or sweep on SLURM: `make cluster-up`, then hydra/launcher=slurm tracking=remote"
OR_LOCAL = "; or run the sweep here: hydra/launcher=local"


class LaunchChecks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_or_go(check_root, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_or_go(check_root, config)
        _refuse_or_go(check_launcher, config)


def _refuse_or_go(check, config: DictConfig) -> None:
    """Hydra turns a callback's exception into a warning and goes on: stop with SystemExit."""
    from quantpipe.cli import stop
    try:
        check(config)
    except Exception as e:
        stop(e)


def check_root(config: DictConfig) -> None:
    check_writable(Path(str(config.paths.root)), "paths.root")


def launcher_choice(config: DictConfig) -> str:
    """The hydra/launcher option chosen (`slurm`, `ray_cluster`, ...), or its _target_."""
    choice = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher")
    return str(choice or OmegaConf.select(config, "hydra.launcher._target_", default="?"))


def check_launcher(config: DictConfig) -> None:
    """The engine the sweep's launcher hands its jobs to is on this machine."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    name = launcher_choice(config)
    if "submitit" in target and "Slurm" in target:
        check_slurm(name)
    elif "ray_launcher" in target:
        check_ray(name, OmegaConf.select(config, "hydra.launcher.ray.init.address", default=None))


SLURM_UP = ("run `make cluster-up` (a one-node SLURM cluster and MLflow server here; or log in "
            "to a SLURM site's submit node)" + OR_LOCAL)
SLURM_PING_S = 15.0  # `scontrol ping`: the controller answers in milliseconds when it runs


def check_slurm(name: str) -> None:
    """sbatch and srun are on the PATH, and SLURM's controller answers `scontrol ping` (SLURM
    installed with no cluster running, or no configuration, made sbatch fail with submitit's
    traceback once the sweep run was open)."""
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise ConfigError("hydra/launcher", f"{name} submits to SLURM, but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not on this machine's PATH",
                          SLURM_UP)
    scontrol = shutil.which("scontrol")
    if scontrol is None:  # a submit node without SLURM's admin tool: sbatch will tell
        return
    try:
        r = subprocess.run([scontrol, "ping"], capture_output=True, text=True,
                           timeout=SLURM_PING_S)
    except subprocess.TimeoutExpired:
        why = f"no answer in {SLURM_PING_S:.0f} s"
    else:
        if r.returncode == 0 and " is UP" in r.stdout:
            return
        lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit {r.returncode}"
    raise ConfigError("hydra/launcher", f"{name} submits to SLURM, but its controller does not "
                      f"answer (`scontrol ping`: {why})", SLURM_UP)


def check_ray(name: str, address: str | None) -> None:
    """The Ray launcher plugin imports (it lives in .venv-ray), and the cluster's head answers a
    TCP connect: `address` (ray.init's) is host:port or ray://host:port; `auto` means
    RAY_ADDRESS, else the head `ray start` recorded on this machine (a stale record names a dead
    head, on which ray.init would wait for minutes)."""
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None \
            or importlib.util.find_spec("ray") is None:
        raise ConfigError("hydra/launcher", f"{name} needs Ray and hydra-ray-launcher, which are "
                          "not importable", f"{RAY_DEPS}, then {RAY_START}{OR_SLURM}")
    address = str(address or "auto")
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or _recorded_ray_address() or "auto"
    if address == "local":
        return  # ray.init starts a Ray of its own for the sweep
    if address == "auto":
        raise ConfigError("hydra/launcher", f"{name} joins a running Ray cluster, but none was "
                          "started on this machine and RAY_ADDRESS is not set",
                          RAY_START + OR_SLURM)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=ENGINE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise ConfigError("hydra/launcher", f"{name}: the Ray cluster at {address} does not "
                          f"answer ({e})", f"set RAY_ADDRESS to a running head, or "
                          f"{RAY_START}{OR_SLURM}") from e


def _recorded_ray_address() -> str | None:
    """The head `ray start` on this machine recorded (Ray's own `auto` reads the same file)."""
    f = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return f.read_text().strip() or None
    except OSError:
        return None
