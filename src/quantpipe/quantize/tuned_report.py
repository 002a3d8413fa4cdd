"""The tuned GGUF's report sections (quantpipe.report.sections): its search beside llama.cpp's
imatrix and plain files of the same type, and the "GGUF at one size" recommendation.

A variant is tuned when its quantise stage logged the search's time (`tune_s`, written by
quantpipe.quantize.tuned with the calibration-split KLD of each candidate and, where the
AutoRound candidate ran, its time and memory).
"""
from __future__ import annotations

from pathlib import Path

from quantpipe.names import Metric
from quantpipe.report.query import Selection
from quantpipe.report.recommend import pick
from quantpipe.report.sections import register
from quantpipe.report.tables import eval_digest, interval, metric, num, short, table

TUNE_S = "tune_s"  # the tuner's search time: only a tuned variant's quantise stage logs it
RECIPE_LOGGED = "tune_recipe"  # 1: recipe/ (re-creates the file) logged on the variant run
SAME_SIZE = 1.001  # sizes within 0.1 % compete as one size


def tune_stage(row: dict) -> dict | None:
    """The quantise stage's metrics if the variant was searched (quantpipe.quantize.tuned)."""
    return next((s["metrics"] for s in row["stages"] if TUNE_S in s["metrics"]), None)


@register("formats", order=20)
def section(sel: Selection) -> list[str]:
    return ["## Tuned vs imatrix vs plain (GGUF at one size)", tuned_vs_imatrix(sel.variants),
            *size_curve(sel.variants, sel.figures)]


def size_curve(rows: list[dict], figures: Path | None) -> list[str]:
    """Where tuned GGUFs ran at several budgets (quant.budgets=[q3_k_m,q4_k_m,q5_k_m]): held-out
    KLD against size for plain, imatrix and tuned at each budget, on one evaluation text, and
    the tuner's calibration-split KLD of every candidate it scored (AutoRound's among them:
    only the candidate that won is published and scored on held-out text)."""
    tuned = [r for r in rows if tune_stage(r) is not None]
    curves = {}
    for t in tuned:
        curves.setdefault((t["family"], eval_digest(t)), []).append(t)
    out = []
    for (family, digest), ts in curves.items():
        if len(ts) < 2:
            continue
        points: dict[str, list[tuple[float, float, str]]] = {}
        calib: dict[str, list[tuple[float, float, str]]] = {}
        body = []
        for t in sorted(ts, key=lambda r: r["metrics"].get(Metric.SIZE_MB, 0)):
            qtype = t["params"].get("quant.compare")
            same = [r for r in rows if r["family"] == family and tune_stage(r) is None
                    and r["params"].get("quant.compare") == qtype and eval_digest(r) == digest]
            for r, how in [*[(r, "plain" if r["method"] == "dynamic" else "imatrix")
                             for r in same], (t, "tuned")]:
                m = r["metrics"]
                if Metric.SIZE_MB in m and Metric.KLD_MEAN in m:
                    points.setdefault(how, []).append((m[Metric.SIZE_MB], m[Metric.KLD_MEAN],
                                                       r["name"]))
                body.append([r["name"], how, metric(r, Metric.SIZE_MB, 2),
                             metric(r, Metric.KLD_MEAN, 5), interval(r, "kld", 5),
                             metric(r, Metric.DELTA_PPL_PCT, 2), short(r["run_id"])])
            stage = tune_stage(t)
            for cand in ("plain", "imatrix", "sensitivity", "autoround"):
                if f"tune_kld_calib_{cand}" in stage and f"tune_mb_{cand}" in stage:
                    calib.setdefault(cand, []).append(
                        (stage[f"tune_mb_{cand}"], stage[f"tune_kld_calib_{cand}"],
                         qtype))
        out += [f"### Size curve: {family}, one evaluation text ({digest[:8]})",
                table(["variant", "method", "size MB", "KLD mean", "KLD 95 % CI", "ΔPPL %",
                       "run"], body)]
        if figures is not None:
            png = curve_plot(points, calib, figures / f"size_curve_{family}_{digest[:8]}.png")
            out.append(f"![KLD against size]({figures.name}/{png.name})")
    return out


COLOURS = {"plain": "tab:orange", "imatrix": "tab:blue", "tuned": "tab:green",
           "sensitivity": "tab:green", "autoround": "tab:red"}


def curve_plot(held_out: dict, calib: dict, path: Path) -> Path:
    """Two panels: held-out KLD of the published files, calibration-split KLD of the tuner's
    candidates (sensitivity mix, AutoRound, llama.cpp's imatrix and plain), against size."""
    from quantpipe.report.plots import plt, save
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, series, title in ((axes[0], held_out, "held-out text (published files)"),
                              (axes[1], calib, "calibration split (every candidate)")):
        for how, pts in sorted(series.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=how,
                    color=COLOURS.get(how))  # a method keeps its colour in both panels
        ax.set_yscale("log")
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("KLD vs FP16 (nats, log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save(fig, path)


def tuned_vs_imatrix(rows: list[dict]) -> str:
    """Each tuned GGUF beside llama.cpp's imatrix and plain files of its quant.type, on the same
    evaluation text: which one is closest to FP16 at (at most) the plain file's size."""
    tuned = [r for r in rows if tune_stage(r) is not None]
    if not tuned:
        return ("No tuned GGUF in this selection. Add one with `make sweep SWEEP=gguf_q4_k_m,"
                "gguf_imatrix_q4_k_m,gguf_tuned`.")
    out = []
    for t in tuned:
        qtype = t["params"].get("quant.compare")
        same = [r for r in rows if r["family"] == t["family"] and r is not t
                and r["params"].get("quant.compare") == qtype and tune_stage(r) is None
                and r["method"] in ("dynamic", "static") and eval_digest(r) == eval_digest(t)]
        trio = [(r, "plain" if r["method"] == "dynamic" else "calibrated") for r in same]
        trio.append((t, "tuned"))
        body = [[f"**{r['name']}**", how, metric(r, Metric.SIZE_MB, 2),
                 metric(r, Metric.BITS_PER_WEIGHT, 2), metric(r, Metric.DELTA_PPL_PCT, 2),
                 interval(r, "delta_ppl", 2), metric(r, Metric.KLD_MEAN, 5),
                 interval(r, "kld", 5), metric(r, Metric.TOP1_AGREE_PCT, 2),
                 short(r["run_id"])] for r, how in trio]
        out.append(table(["format", "method", "size MB", "bits/weight", "ΔPPL %", "ΔPPL 95 % CI",
                          "KLD mean", "KLD 95 % CI", "top-1 %", "run"], body))
        scored = [(r, how) for r, how in trio if Metric.KLD_MEAN in r["metrics"]]
        if scored:
            best, how = min(scored, key=lambda p: p[0]["metrics"][Metric.KLD_MEAN])
            out.append(f"- Lowest held-out KLD: **{best['name']}** ({how}), "
                       f"{metric(best, Metric.KLD_MEAN, 5)} nats, ΔPPL "
                       f"{metric(best, Metric.DELTA_PPL_PCT, 2)} %, "
                       f"{metric(best, Metric.SIZE_MB, 2)} MB.")
        out.append(_search(tune_stage(t)))
        if tune_stage(t).get(RECIPE_LOGGED):
            out.append(f"- Its recipe: the per-tensor types in the file's own metadata "
                       f"(`quantpipe.tensor_types.*`) and `recipe/` on run `{short(t['run_id'])}`"
                       " (tensor-types.txt, imatrix.gguf, recreate.sh: stock llama-quantize "
                       "writes the same bytes again).")
        missing = {"plain", "calibrated"} - {how for _, how in trio}
        if missing:
            out.append(f"- No {' or '.join(sorted(missing))} {qtype} run on the same evaluation "
                       "text in this selection to compare with.")
    return "\n\n".join(out)


def _search(m: dict) -> str:
    """What the tuner did, from its quantise stage's metrics: the candidate it published, each
    candidate's calibration-split KLD, its budget, time and memory (AutoRound's, where it ran)."""
    calib = {k.removeprefix("tune_kld_calib_"): v for k, v in m.items()
             if k.startswith("tune_kld_calib_")}
    won = next((k for k in calib if m.get(f"tune_won_{k}")), None)
    won = f"the {won} candidate" if won else "a candidate other than its searched mix"
    calib = ", ".join(f"{k} {num(v, 5)}" for k, v in calib.items())
    ar = (f"; AutoRound {num(m.get('autoround_s'), 0)} s"
          f"{' (cached)' if m.get('autoround_reused') else ''}, peak RSS "
          f"{num(m.get('autoround_peak_rss_mb'), 0)} MB") if "autoround_s" in m else ""
    return (f"- The tuner published {won}; calibration-split KLD: {calib}; budget "
            f"{num(m.get('budget_mb'), 2)} MB; tuning {num(m.get(TUNE_S), 0)} s, "
            f"{num(m.get('tune_candidates_scored'), 0)} candidates, peak RSS "
            f"{num(m.get('tune_peak_rss_mb'), 0)} MB (llama-quantize "
            f"{num(m.get('tune_quantize_peak_rss_mb'), 0)} MB){ar}.")


@register("recommend")
def recommendation(sel: Selection) -> list[tuple[str, dict | None, str]]:
    return same_size_gguf(sel.variants)


def same_size_gguf(cpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """Where a tuned GGUF ran: the lowest held-out KLD among the variants no larger than the plain
    one of its comparison group (quant.compare: plain, imatrix and tuned compete at one size)."""
    out = []
    for t in [r for r in cpu if tune_stage(r) is not None]:
        qtype = t["params"].get("quant.compare", "?")
        plain = [r for r in cpu if r["family"] == t["family"] and r["method"] == "dynamic"
                 and r["params"].get("quant.compare") == qtype and Metric.SIZE_MB in r["metrics"]]
        limit = min((r["metrics"][Metric.SIZE_MB] for r in plain),
                    default=t["metrics"].get(Metric.SIZE_MB))
        if limit is None:
            continue
        # within 0.1 %: llama.cpp's imatrix file carries a few hundred bytes more metadata than
        # plain's (the matrix's name and dataset), not a larger model
        fits = [r for r in cpu if r["family"] == t["family"]
                and r["metrics"].get(Metric.SIZE_MB, float("inf")) <= limit * SAME_SIZE]
        r = pick(fits, Metric.KLD_MEAN)
        out.append((f"GGUF at the {qtype} size", r, "no GGUF with a KLD" if r is None else
                    f"lowest held-out KLD of the GGUFs no larger than plain {qtype} "
                    f"({limit:.2f} MB): {metric(r, Metric.KLD_MEAN, 5)} nats, ΔPPL "
                    f"{metric(r, Metric.DELTA_PPL_PCT, 2)} %, {metric(r, Metric.SIZE_MB, 2)} MB; "
                    f"compared: " + ", ".join(f"{f['name']} {metric(f, Metric.KLD_MEAN, 5)}"
                                              for f in fits)))
    return out
