"""Quality gate: does a variant stay close enough to FP16 to be promoted?

Configured in conf/gate/default.yaml: gate.max_delta_ppl_pct, gate.max_kld and
gate.min_finetune_retention_pct bound the variant's metrics; gate.use_interval says which
figure each bound judges:

    pessimistic (default)  the end of the 95 % interval that is worse for the variant: the ΔPPL
                           and KLD upper bounds, the retention lower bound. A variant passes
                           only if it is within every bound with 95 % confidence, so a variant
                           whose point estimate is inside by noise alone fails.
    point                  the point estimates (ΔPPL, mean KLD, retention) as measured.
    optimistic             the end that is better for the variant: fails only variants that are
                           over a bound with 95 % confidence.

gate.max_task_drop_pts bounds the accuracy lost against FP16 on every lm-eval task metric
(eval.lm_eval: task_<task>_<metric>_delta_pts and its paired interval), in points.

A metric logged without its interval (a run from before intervals existed) is judged by its point
estimate and the reason says so. The retention bound does not apply without a fine-tune
(adapter=none: no retention is measured). A variant over a bound is tagged gate=failed in MLflow
and is never given the registry's `champion` alias.
"""
from __future__ import annotations

from typing import Mapping

from quantpipe.errors import ConfigError

MODES = ("pessimistic", "point", "optimistic")
# bound key -> (metric, its 95 % interval's metric prefix, label, unit, larger is worse)
BOUNDS = {"max_delta_ppl_pct": ("delta_ppl_pct", "delta_ppl", "ΔPPL", "%", True),
          "max_kld": ("kld_mean", "kld", "KLD", "", True),
          "min_finetune_retention_pct": ("finetune_retention_pct", "finetune_retention",
                                         "fine-tune retention", "%", False)}


def judged_value(metrics: Mapping[str, float], metric: str, ci: str, worse_high: bool,
                 mode: str) -> tuple[float | None, str]:
    """(the figure the gate compares, how to name it) for one metric under `mode`."""
    if metric not in metrics:
        return None, ""
    if mode == "point":
        return metrics[metric], ""
    high = (mode == "pessimistic") == worse_high
    key = f"{ci}_ci95_{'high' if high else 'low'}"
    if key not in metrics:
        return metrics[metric], " (no interval logged: point estimate)"
    return metrics[key], f" 95 % {'upper' if high else 'lower'} bound"


def check_gate(gate: Mapping, metrics: Mapping[str, float]) -> tuple[bool, str]:
    """(passed, reason) for a variant's metrics against the configured bounds."""
    mode = gate.get("use_interval", "pessimistic")
    if mode not in MODES:
        raise ConfigError("gate.use_interval", f"{mode!r} is not a known mode",
                          f"choose one of {', '.join(MODES)} (conf/gate/default.yaml explains them)")
    problems, notes = [], []
    for key, (metric, ci, label, unit, worse_high) in BOUNDS.items():
        bound = gate.get(key)
        if bound is None:
            continue
        value, how = judged_value(metrics, metric, ci, worse_high, mode)
        if value is None:  # retention: no adapter, no fine-tune to retain
            why = "no fine-tune" if metric == "finetune_retention_pct" else "not measured"
            notes.append(f"{label}: {why}, bound not applied")
        elif (value > bound) if worse_high else (value < bound):
            problems.append(f"{label}{how} {value:.4g}{unit} {'>' if worse_high else '<'} "
                            f"{bound}{unit}")
    problems += _task_drops(gate.get("max_task_drop_pts"), metrics, mode, notes)
    reason = "; ".join(problems) or f"within bounds ({mode})"
    return not problems, "; ".join([reason, *notes])


def _task_drops(bound: float | None, metrics: Mapping[str, float], mode: str,
                notes: list[str]) -> list[str]:
    """Problems for each lm-eval task metric that lost more than `bound` points vs FP16."""
    if bound is None:
        return []
    deltas = sorted(k.removesuffix("_delta_pts") for k in metrics
                    if k.startswith("task_") and k.endswith("_delta_pts"))
    if not deltas:
        notes.append("task accuracy: no eval.lm_eval task scored, bound not applied")
        return []
    problems = []
    for name in deltas:
        # a drop is a negative change: the end worse for the variant is the interval's low end
        value, how = judged_value(metrics, f"{name}_delta_pts", f"{name}_delta", False, mode)
        if -value > bound:
            problems.append(f"{name.removeprefix('task_')} drop{how} {-value:.3g} pts > "
                            f"{bound} pts")
    return problems
