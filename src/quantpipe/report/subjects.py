"""Verdicts across subjects and texts: the same variants ranked on each base model (subject) and
each evaluation text, read from every finished variant run of the experiment.

A calibrated method earns its place only if it beats both its round-to-nearest control (the
config's `control` key, e.g. the same int4 scheme without calibration) and the best dynamic
(uncalibrated) variant of its `compare` group, on text unlike its calibration set too. "Beats"
is a paired test where both runs logged their per-window means over the same windows
(`row["per_window"]`, query.attach_per_window): the 95 % bootstrap interval of the KLD
difference lies wholly below 0. Runs without that record fall back to the conservative reading,
their own 95 % intervals lying apart. A ranking measured on a base whose weights sit on a 4-bit
block grid (metric grid_aligned_pct) can favour formats that re-express that grid, so where the
subjects disagree the verdict trusts the least grid-aligned one. Runs are told apart by parameters
(model.name, eval.text_file, quant.compare, quant.control) and metrics only: no format is named
here.
"""
from __future__ import annotations

from quantpipe.names import Metric
from quantpipe.report.tables import NA, ci95, interval, metric, paired, table

DEFAULT_TEXT = "the eval split"


def _p(row: dict, key: str) -> str | None:
    v = row["params"].get(key)
    return None if v in (None, "None", "null", "") else v


def subject(row: dict) -> str:
    return _p(row, "model.name") or "?"


def text(row: dict) -> str:
    return _p(row, "eval.text_file") or DEFAULT_TEXT


def cells(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """{(subject, text): {variant name: newest finished run}} (rows come newest first)."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        out.setdefault((subject(r), text(r)), {}).setdefault(r["name"], r)
    return out


def _beats(a: dict, b: dict) -> bool | None:
    """True: a's KLD is lower than b's for sure (the paired difference's interval lies below 0;
    without per-window records, a's own interval wholly below b's); False: not; None: neither
    test possible."""
    if (d := paired(a, b)) is not None:
        return d[2] < 0
    ia, ib = ci95(a, "kld"), ci95(b, "kld")
    if ia is None or ib is None:
        return None
    return ia[1] < ib[0]


def _difference(a: dict, b: dict) -> str:
    """"−0.0123 [−0.0150, −0.0101]": a's KLD minus b's, paired; "overlap test" without it."""
    if (d := paired(a, b)) is None:
        return "— (overlap test)"
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def _best_dynamic(runs: dict[str, dict], group: str | None) -> dict | None:
    peers = [r for r in runs.values() if group and _p(r, "quant.compare") == group
             and r["method"] == "dynamic" and Metric.KLD_MEAN in r["metrics"]]
    return min(peers, key=lambda r: r["metrics"][Metric.KLD_MEAN], default=None)


SCHEME = "quant.backend.weights."  # the weight scheme a control must share with its method


def scheme_differs(a: dict, b: dict) -> list[str]:
    """The weight-scheme parameters in which two runs differ (a control measured before its
    method's scheme changed, or after: not a control of that run)."""
    keys = {k for r in (a, b) for k in r["params"] if k.startswith(SCHEME)}
    return sorted(k for k in keys if _p(a, k) != _p(b, k))


def unmatched(rows: list[dict]) -> list[str]:
    """Notes for each calibrated run whose newest control ran another weight scheme."""
    out = []
    for (subj, txt), runs in sorted(cells(rows).items()):
        for r in sorted(runs.values(), key=lambda r: r["name"]):
            control = runs.get(_p(r, "quant.control") or "")
            if control is not None and (keys := scheme_differs(r, control)):
                out.append(f"{subj}, `{txt}`: {r['name']} is not judged: its newest run and its "
                           f"control's differ in {', '.join(f'`{k}`' for k in keys)} (re-run "
                           "both with the current configs)")
    return out


def judged(rows: list[dict]) -> list[dict]:
    """One verdict per calibrated variant with a control of its very weight scheme, per subject
    and text."""
    out = []
    for (subj, txt), runs in sorted(cells(rows).items()):
        for r in sorted(runs.values(), key=lambda r: r["name"]):
            control = runs.get(_p(r, "quant.control") or "")
            if control is None or Metric.KLD_MEAN not in r["metrics"] \
                    or scheme_differs(r, control):
                continue
            dyn = _best_dynamic(runs, _p(r, "quant.compare"))
            out.append({"subject": subj, "text": txt, "row": r, "control": control,
                        "dynamic": dyn, "beats_control": _beats(r, control),
                        "beats_dynamic": _beats(r, dyn) if dyn else None})
    return out


def _yes(v: bool | None) -> str:
    return NA if v is None else ("yes" if v else "**no**")


def section(rows: list[dict], hint: str = "") -> str:
    """The verdicts table; with none, says so and how to get one (`hint`: the formats' own,
    the report's "verdicts.hint" slot)."""
    verdicts = judged(rows)
    if not verdicts:
        return ("No calibrated variant with a `control` was scored"
                + (f" ({hint})" if hint else "") + ".")
    body = []
    for v in verdicts:
        r, c, d = v["row"], v["control"], v["dynamic"]
        gain = (c["metrics"].get(Metric.KLD_MEAN, 0) / r["metrics"][Metric.KLD_MEAN]
                if r["metrics"][Metric.KLD_MEAN] else None)
        body.append([v["subject"], f"`{v['text']}`", f"**{r['name']}**",
                     metric(r, Metric.KLD_MEAN, 4), interval(r, "kld", 4),
                     f"{c['name']} {metric(c, Metric.KLD_MEAN, 4)} {interval(c, 'kld', 4)}",
                     NA if gain is None else f"{gain:.2f}×", _difference(r, c),
                     _yes(v["beats_control"]),
                     f"{d['name']} {metric(d, Metric.KLD_MEAN, 4)}" if d else NA,
                     _difference(r, d) if d else NA,
                     _yes(v["beats_dynamic"]), metric(r, Metric.DELTA_PPL_PCT, 2)])
    header = ["subject", "eval text", "calibrated", "KLD", "KLD 95 % CI", "control (RTN)",
              "control KLD / KLD", "KLD − control, paired 95 % CI", "beats control",
              "best dynamic peer", "KLD − peer, paired 95 % CI", "beats it", "ΔPPL %"]
    return table(header, body) + "\n\n" + "\n".join(f"- {n}" for n in notes(verdicts, rows))


def notes(verdicts: list[dict], rows: list[dict]) -> list[str]:
    out = []
    by_method: dict[tuple[str, str], list[dict]] = {}
    for v in verdicts:
        by_method.setdefault((v["subject"], v["row"]["name"]), []).append(v)
    for (subj, name), vs in sorted(by_method.items()):
        won = [v["text"] for v in vs if v["beats_control"] and v["beats_dynamic"] is not False]
        if len(vs) > 1 and 0 < len(won) < len(vs):
            out.append(f"{subj}: {name} wins on {', '.join(f'`{t}`' for t in won)} only: do not "
                       "pick it for text unlike that")
        elif vs and not won:
            which = ("its control" if not any(v["beats_control"] for v in vs) else
                     "both its control and the best dynamic variant of its group")
            out.append(f"{subj}: {name} does not beat {which} on any text scored")
    out += unmatched(rows) + ranking_notes(rows)
    return out or ["every calibrated variant beat its control on every text scored"]


def ranking_notes(rows: list[dict]) -> list[str]:
    """For each text and each pair of subjects: say where the KLD ranking of the variants both
    ran differs, and which subject the verdict trusts (the one least on a 4-bit grid)."""
    grid = {}
    for r in rows:
        if Metric.GRID_ALIGNED_PCT in r["metrics"]:
            grid.setdefault(subject(r), r["metrics"][Metric.GRID_ALIGNED_PCT])
    by_text: dict[str, dict[str, dict[str, dict]]] = {}
    for (subj, txt), runs in cells(rows).items():
        by_text.setdefault(txt, {})[subj] = runs
    out = []
    for txt, by_subject in sorted(by_text.items()):
        names = sorted(by_subject)
        # each pair of subjects on the variants both ran (three subjects share fewer)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                out += _ranking(txt, {s: by_subject[s] for s in (first, second)}, grid)
    return out


def _ranking(txt: str, pair: dict[str, dict[str, dict]], grid: dict[str, float]) -> list[str]:
    """One note on how two subjects rank the variants both ran on `txt`, or none (< 2 shared)."""
    common = set.intersection(*({k for k, r in runs.items() if Metric.KLD_MEAN in r["metrics"]}
                                for runs in pair.values()))
    common.discard("fp16")
    if len(common) < 2:
        return []
    ranks = {s: sorted(common, key=lambda n: runs[n]["metrics"][Metric.KLD_MEAN])
             for s, runs in pair.items()}
    shown = "; ".join(f"{s}: {' < '.join(r)}" for s, r in sorted(ranks.items()))
    if len({tuple(r) for r in ranks.values()}) == 1:
        return [f"`{txt}`: both subjects rank the {len(common)} shared variants alike by KLD "
                f"({shown})"]
    trusted = min(ranks, key=lambda s: grid.get(s, 100.0))
    return [f"`{txt}`: the subjects rank the shared variants differently by KLD ({shown}). "
            f"Trusted: **{trusted}** (grid-aligned {grid.get(trusted, float('nan')):.1f} % of "
            "blocks, the other "
            + ", ".join(f"{s} {grid[s]:.1f} %" for s in ranks if s != trusted and s in grid)
            + "): a base on a 4-bit grid favours the formats that re-express it"]
