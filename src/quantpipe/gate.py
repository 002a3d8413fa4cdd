"""Quality gate: does a variant stay close enough to FP16 to be promoted?

Configured in conf/gate/default.yaml (gate.max_delta_ppl_pct, gate.max_kld). A variant over a
bound is tagged gate=failed in MLflow and is never given the registry's `champion` alias.
"""
from __future__ import annotations

from typing import Mapping

from quantpipe.names import Metric


def check_gate(gate: Mapping, metrics: Mapping[str, float]) -> tuple[bool, str]:
    """(passed, reason) for a variant's metrics against the configured bounds."""
    problems = []
    bound = gate.get("max_delta_ppl_pct")
    if bound is not None and metrics.get(Metric.DELTA_PPL_PCT, 0.0) > bound:
        problems.append(f"ΔPPL {metrics[Metric.DELTA_PPL_PCT]:.2f}% > {bound}%")
    bound = gate.get("max_kld")
    if bound is not None and metrics.get(Metric.KLD_MEAN, 0.0) > bound:
        problems.append(f"KLD {metrics[Metric.KLD_MEAN]:.4f} > {bound}")
    return (not problems, "; ".join(problems) or "within bounds")
