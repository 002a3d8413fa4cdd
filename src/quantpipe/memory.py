"""Memory: what a stage will need, what the machine has, and what a process really used.

Before a stage starts, its peak resident memory is estimated from the model's size and format
(`estimate_*`) and checked against what the machine has (`check`): without swap, the kernel's
out-of-memory killer otherwise ends the process after minutes of work with nothing printed (a
7B-shaped model's FP16 reference loaded in float32 needed 27.5 GB on a 24 GB machine).
The estimates are upper bounds built from figures measured by benchmarks/scale.py on this
project (README, "Reliability and scale"); each constant says where its number comes from.

What a process really used is its own high-water mark, VmHWM in /proc/<pid>/status. Never
getrusage's ru_maxrss: a child started by fork + exec inherits its parent's mark there (a child
of an 800 MB Python reads 813 MB while its own VmHWM is 13 MB). A stage resets this process's
mark when it starts (`reset_peak`, Linux's clear_refs) and takes the larger of it and the peaks
of the child processes it ran (`note_child_peak`), so every stage run logs its own peak.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from quantpipe.errors import ConfigError

GiB = 2**30
# python + torch + transformers (+ peft) imported: 0.55-0.7 GB measured ("imports only" row of
# benchmarks/scale.py); python + numpy + llama_cpp alone: ~0.1 GB
PYTHON_TORCH = int(0.75 * GiB)
PYTHON_LLAMA = int(0.25 * GiB)
_child_peak_mb = 0.0


# --- what a process used ---------------------------------------------------------------------

def status_kb(field: str, pid: int | str = "self") -> int:
    """One `Vm*`/`Rss*` field of /proc/<pid>/status in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def own_peak_mb(pid: int | str = "self") -> float:
    """The process's own peak RSS since exec (or since the last `reset_peak`), in MiB."""
    return status_kb("VmHWM", pid) / 1024


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS ("5" > clear_refs, Linux >= 4.0), and
    forget the child peaks noted so far, so a stage measures its own peak."""
    global _child_peak_mb
    _child_peak_mb = 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or a kernel without it: the peak then covers earlier stages
        pass


def note_child_peak(mb: float) -> None:
    """Record the peak RSS of a child process the current stage ran (a tool, a worker)."""
    global _child_peak_mb
    _child_peak_mb = max(_child_peak_mb, float(mb))


def stage_peak_mb() -> float:
    """Peak RSS of the current stage: this process's mark or its largest child's."""
    return max(own_peak_mb(), _child_peak_mb)


# --- what the machine has ----------------------------------------------------------------------

def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 memory limit (page cache counted as free), if any."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        return int(limit) - current + int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        return None


def available_bytes(limit_gb: float | None = None) -> tuple[int, str]:
    """(bytes a new allocation can get, where that figure comes from). `memory.limit_gb` wins;
    else MemAvailable (free + reclaimable page cache), capped by a cgroup limit if one is set."""
    if limit_gb is not None:
        return int(limit_gb * GiB), f"memory.limit_gb={limit_gb}"
    avail, source = _meminfo_kb("MemAvailable") * 1024, "MemAvailable"
    cg = _cgroup_free()
    if cg is not None and cg < avail:
        avail, source = cg, "the cgroup memory limit"
    return avail, source


def check(what: str, need: int, limit_gb: float | None, fix: str) -> None:
    """Refuse `what` before it starts when its estimated peak `need` exceeds what is available."""
    avail, source = available_bytes(limit_gb)
    if need > avail:
        raise ConfigError("memory", f"{what} needs about {need / GiB:.1f} GiB of RAM (estimate), "
                          f"but only {avail / GiB:.1f} GiB are available ({source})", fix)


# --- what a model is ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What the estimates need to know of a Hugging Face model folder, read from its config and
    safetensors headers (no weights loaded)."""
    n_params: int
    stored_bytes: int      # weights as stored (FP16: 2 bytes a parameter)
    largest: int           # elements of the largest tensor (the embedding, usually)
    vocab: int
    layers: int
    kv_dim: int            # key/value width per layer (kv heads x head dim)

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.n_params


def shape_of(folder: Path) -> Shape:
    from quantpipe.streaming import read_header, shard_files
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n = stored = largest = 0
    for shard in shard_files(folder):
        for name, info in read_header(shard).items():
            if name == "__metadata__":
                continue
            elems = math.prod(info["shape"])
            n += elems
            stored += info["data_offsets"][1] - info["data_offsets"][0]
            largest = max(largest, elems)
    hidden = int(cfg.get("hidden_size", 0))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return Shape(n_params=n, stored_bytes=stored, largest=largest,
                 vocab=int(cfg.get("vocab_size", 0)), layers=int(cfg.get("num_hidden_layers", 0)),
                 kv_dim=kv_heads * head_dim)


# --- estimates (bytes of peak RSS) -------------------------------------------------------------

def estimate_merge(s: Shape, streaming: bool) -> int:
    """Streaming (quantpipe.streaming): one tensor at a time, read, merged in float32 and
    written: 0.93 GB measured at 7B (largest tensor 0.4 GB FP16). In RAM (peft, float32 model
    plus the unmerged copy for parity): 9.26 GB for a 2.15 GB FP16 1B, 4.3x."""
    if streaming:
        return PYTHON_TORCH + 3 * 2 * s.largest
    return PYTHON_TORCH + int(4.4 * s.fp16_bytes)


def fmt_gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"


def available_note(limit_gb: float | None) -> str:
    avail, source = available_bytes(limit_gb)
    return f"{fmt_gib(avail)} available ({source})"
