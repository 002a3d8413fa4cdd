"""Task accuracy (lm-evaluation-harness, eval.lm_eval): the report section of quantpipe.evaluate's
harness (found by quantpipe.report.sections), a table per task and the verdict that uses it,
read from the runs' metrics only.

Each variant run logs, per task and metric, `task_<task>_<metric>` and its `_stderr`, the change
against FP16 in points with a paired 95 % interval (`_delta_pts`, `_delta_ci95_low/high`: a
bootstrap over documents, the variant and FP16 resampled together) and, with a fine-tune, the
share of its gain on the task kept (`_retention_pct`).
"""
from __future__ import annotations

import re

from quantpipe.report.query import Selection
from quantpipe.report.sections import register
from quantpipe.report.tables import NA, num, short, table

_VALUE = re.compile(r"^task_(.+)_(acc|acc_norm|exact_match|f1|mcc|bleu|rouge\w*)$")


def task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs logged with a paired delta by any run, in a stable order."""
    found = set()
    for r in rows:
        for k in r["metrics"]:
            m = _VALUE.match(k)
            if m and f"{k}_delta_pts" in r["metrics"]:
                found.add((m.group(1), m.group(2)))
    return sorted(found)


def _delta(r: dict, key: str) -> str:
    m = r["metrics"]
    if f"{key}_delta_pts" not in m:
        return NA
    return (f"{num(m[f'{key}_delta_pts'], 1, sign=True)} "
            f"[{num(m.get(f'{key}_delta_ci95_low'), 1, sign=True)}, "
            f"{num(m.get(f'{key}_delta_ci95_high'), 1, sign=True)}]")


@register("comparison")
def report_section(sel: Selection) -> list[str]:
    return section(sel.variants)


@register("serving", order=10)
def report_recommendation(sel: Selection) -> list[tuple[str, dict | None, str]]:
    return recommendation(sel.variants)


def section(rows: list[dict]) -> list[str]:
    """The report's task section: one table per task (empty when no run scored a task)."""
    pairs = task_metrics(rows)
    if not pairs:
        return []
    parts = ["## Task accuracy (lm-evaluation-harness)",
             "Each task scored by lm-eval through the project's own runtimes on the same token "
             "ids for every format (the FP16 side on eval.reference_runtime). Accuracy in %, "
             "± lm-eval's standard error; Δ = change against FP16 in points with a paired 95 % "
             "interval over documents; kept % = share of the fine-tune's gain on the task that "
             "the variant keeps (shown where base and FP16 differ)."]
    for task in sorted({t for t, _ in pairs}):
        metrics = [m for t, m in pairs if t == task]
        header = ["format"]
        for m in metrics:
            header += [f"{m} %", f"Δ {m} pts [95 % CI]", f"kept % ({m})"]
        body = []
        for r in rows:
            if not any(f"task_{task}_{m}" in r["metrics"] for m in metrics):
                continue
            cells = [f"**{r['name']}**"]
            for m in metrics:
                key = f"task_{task}_{m}"
                v, se = r["metrics"].get(key), r["metrics"].get(f"{key}_stderr")
                cells.append(NA if v is None else
                             f"{num(100 * v, 1)} ± {num(None if se is None else 100 * se, 1)}")
                cells.append(_delta(r, key))
                cells.append(num(r["metrics"].get(f"{key}_retention_pct"), 1))
            body.append(cells + [short(r["run_id"])])
        parts += [f"**{task}**", table(header + ["run"], body)]
    return parts


def primary(rows: list[dict]) -> list[tuple[str, str]]:
    """The metric each task is judged by: acc where logged, else its first metric."""
    pairs = task_metrics(rows)
    out = []
    for task in sorted({t for t, _ in pairs}):
        ms = [m for t, m in pairs if t == task]
        out.append((task, "acc" if "acc" in ms else ms[0]))
    return out


def recommendation(cpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """Where tasks were scored: the smallest quantised variant that loses no task accuracy
    measurably (every task's paired 95 % interval of the change reaches 0 or above)."""
    judged = primary(cpu)
    if not judged:
        return []
    keys = [f"task_{t}_{m}" for t, m in judged]
    ok = [r for r in cpu if r["method"] != "none" and "size_mb" in r["metrics"]
          and all(f"{k}_delta_ci95_high" in r["metrics"] for k in keys)
          and all(r["metrics"][f"{k}_delta_ci95_high"] >= 0 for k in keys)]
    lost = [r for r in cpu if r["method"] != "none"
            and any(r["metrics"].get(f"{k}_delta_ci95_high", 0) < 0 for k in keys)]
    r = min(ok, key=lambda x: x["metrics"]["size_mb"], default=None)
    tasks = ", ".join(f"{t} {m}" for t, m in judged)
    if r is None:
        return [("Smallest keeping task accuracy", None,
                 f"every quantised variant loses {tasks} measurably")]
    why = "; ".join(f"{t} {m} {num(100 * r['metrics'][f'task_{t}_{m}'], 1)} %, Δ "
                    f"{_delta(r, f'task_{t}_{m}')} pts" for t, m in judged)
    lose = ("; measurably worse than FP16: " + ", ".join(
        f"{x['name']} ({_delta(x, keys[0])})" for x in lost)) if lost else ""
    return [("Smallest keeping task accuracy", r,
             f"{num(r['metrics']['size_mb'], 2)} MB, its task change against FP16 cannot be "
             f"told from zero ({why}){lose}")]
