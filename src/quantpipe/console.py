"""What a person sees in the terminal: known third-party noise filtered by its message, C
libraries' chatter sent to a log file, and a closing summary of the variant.

    quiet_known_noise()                     # once, first thing in an entry point
    with output_to(path / "quantize.log"):  # llama.cpp prints a line per tensor (272 on SmolLM2)
        llama_model_quantize(...)
    print_summary("int4", metrics, published, run_id)

Each filter names the message it silences and why it is noise here; anything else still shows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, Mapping

# (message regex, category, why it is noise here): each seen on a `make pipeline` run
KNOWN_WARNINGS = [
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "transformers 5.23 on peft 0.21's merge: a rename inside the libraries"),
    (r"The specified dataset source can be interpreted in multiple ways", UserWarning,
     "MLflow, logging the eval text's local path as a dataset source: both readings agree"),
]
# third-party loggers that log known noise at INFO / WARNING
QUIET_LOGGERS = {
    "bitsandbytes": logging.ERROR,   # "MatMul8bitLt: inputs will be cast", "cannot fetch
                                     # kernels from the hub" (offline on purpose): every load
    # "Creating initial MLflow database tables..."; and on a full disk, a traceback per failed
    # write before MLflow raises the same error, which the pipeline reports in one line
    "mlflow.store.db.utils": logging.CRITICAL,
    "alembic": logging.WARNING,      # MLflow's schema migrations on first use of a store
    "httpx": logging.WARNING,        # a line per request when the smoke test talks to the server
}


def quiet_known_noise() -> None:
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers 5 draws a bar per load and save ("Loading weights", "Writing model shards"),
    # three per stage; the stages log what they built and the long steps (training, scoring)
    # draw their own bar. Read when huggingface_hub is imported; the evaluation worker inherits it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def output_to(log_file: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr, at the file-descriptor level (where C libraries
    write), to `log_file` for the duration of the block."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "ab") as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield log_file
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def summary_lines(name: str, m: Mapping[str, float], published: Mapping[str, str],
                  run_id: str) -> list[str]:
    """The variant in six lines: size, quality vs FP16, speed, gate, where it went."""
    def num(key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "?"
    gate = published.get("gate", "?")
    gate_line = gate if gate == "passed" else f"{gate.upper()} ({published.get('gate.reason', '')})"
    return [
        f"== {name} " + "=" * max(0, 60 - len(name)),
        f"  size       {num('size_mb', '.1f')} MiB ({num('compression', '.2f')}x smaller than "
        f"FP16, {num('bits_per_weight', '.2f')} bits/weight)",
        f"  quality    PPL {num('ppl', '.3f')} vs FP16 {num('ppl_fp16', '.3f')}: "
        f"ΔPPL {num('delta_ppl_pct', '+.2f')} %, KLD {num('kld_mean', '.4f')}, "
        f"top-1 agreement {num('top1_agree_pct', '.1f')} %",
        f"  speed      {num('decode_tok_s', '.1f')} tokens/s decode, "
        f"TTFT {num('ttft_ms', '.0f')} ms, peak RSS {num('peak_rss_mb', '.0f')} MiB",
        *_task_lines(m),
        f"  gate       {gate_line}",
        f"  published  {published.get('published', '?')}",
        f"  MLflow     run {run_id} (make ui)",
    ]


def _task_lines(m: Mapping[str, float]) -> list[str]:
    """One line per lm-eval task and metric: accuracy ± stderr, change vs FP16 [95 % CI]."""
    out = []
    for key in sorted(k for k in m if k.startswith("task_") and f"{k}_delta_pts" in m):
        out.append(f"  {'task' if not out else '':<10} {key.removeprefix('task_')} "
                   f"{100 * m[key]:.1f} ± {100 * m.get(key + '_stderr', float('nan')):.1f} %, "
                   f"Δ {m[key + '_delta_pts']:+.1f} pts vs FP16 "
                   f"[{m.get(key + '_delta_ci95_low', float('nan')):+.1f}, "
                   f"{m.get(key + '_delta_ci95_high', float('nan')):+.1f}]")
    return out


def print_summary(name: str, m: Mapping[str, float], published: Mapping[str, str],
                  run_id: str) -> None:
    print("\n".join(summary_lines(name, m, published, run_id)), flush=True)
