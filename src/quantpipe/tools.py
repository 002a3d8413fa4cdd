"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench),
built from the llama-cpp-python sdist by `make tools` into paths.tools (build/llama.cpp/bin).

    from quantpipe.tools import tool_path, run_tool
    out = run_tool(tool_path(tools_dir, "llama-bench"), ["-m", "model.gguf", "-o", "json"])

The pipeline's default GGUF path needs none of them (it goes through llama-cpp-python); the
calibrated variant (imatrix), the cross-check and the benchmark do.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quantpipe.errors import ConfigError

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


def tool_path(tools_dir: Path | str, name: str) -> Path:
    """The tool's executable, or a ConfigError that says how to build it."""
    path = Path(tools_dir) / name
    if not (path.is_file() and path.stat().st_mode & 0o111):
        raise ConfigError("paths.tools", f"{path} not found: llama.cpp's tools are not built",
                          "run `make tools` (about 5 minutes), or point paths.tools at a "
                          "folder holding " + ", ".join(TOOLS))
    return path


@dataclass
class ToolRun:
    stdout: str
    stderr: str
    seconds: float         # wall time of the process
    peak_rss_mb: float     # the process's own peak resident set size


def run_tool(exe: Path, args: list[str], timeout: float | None = None,
             cwd: Path | None = None) -> ToolRun:
    """Run a tool to completion (in `cwd`: llama.cpp's tools write the paths they are given
    into GGUF metadata, so files they should name portably are passed relative to it); raise
    with the tail of its log if it fails. Its peak RSS is
    the child's own high-water mark (VmHWM) after exec, sampled while it runs: wait4's
    ru_maxrss also counts the pages the child shared with this process before exec (1 GB when
    the pipeline holds torch), so it cannot be used here."""
    cmd = [str(exe), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd)
        try:
            status, peak_mb = _wait(proc.pid, Path(exe), timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    from quantpipe.memory import note_child_peak
    note_child_peak(peak_mb)  # the running stage's peak is the larger of its own and this
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                           f"{(stderr or stdout)[-3000:]}")
    return ToolRun(stdout, stderr, seconds, peak_mb)


def vm_hwm_mb(pid: int | str = "self") -> float:
    """A process's own peak resident set size (VmHWM in /proc/<pid>/status), in MiB; 0 if it
    is gone. Unlike getrusage's ru_maxrss it starts afresh at exec: a child started from a
    parent holding 800 MB reads 13 MB here and 813 MB in ru_maxrss (Linux keeps the larger
    of the old and the new high-water mark across exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def _hwm_mb(pid: int, exe: Path) -> float:
    """VmHWM of `pid` once it runs `exe` (0 before its exec, or once it is gone)."""
    try:
        if os.path.realpath(f"/proc/{pid}/exe") != os.path.realpath(exe):
            return 0.0
    except OSError:
        return 0.0
    return vm_hwm_mb(pid)


def _wait(pid: int, exe: Path, timeout: float | None) -> tuple[int, float]:
    """Wait for `pid` (with an optional timeout), sampling its memory high-water mark every
    20 ms; a peak reached in the last 20 ms of its life can be missed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    peak = 0.0
    while True:
        peak = max(peak, _hwm_mb(pid, exe))
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status, peak
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.02)
