"""Markdown sections of QUANTISATION-REPORT.md, made from the rows of quantpipe.report.query.

Every number printed is an MLflow metric, parameter, tag or start/end time of the run named
beside it, rounded to the decimals its column shows (tests/test_report.py parses the table
back and checks that).
"""
from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict

from quantpipe import gridcheck
from quantpipe.base import base_source_note
from quantpipe.evaluate import metrics as M
from quantpipe.names import Metric, Tag
from quantpipe.report.query import Selection, all_datasets

NA = "—"
# (header, metric, decimals): the comparison table, one row per variant run
COLUMNS = [("bits/weight", Metric.BITS_PER_WEIGHT, 2), ("size MB", Metric.SIZE_MB, 2),
           ("compression ×", Metric.COMPRESSION, 2), ("load s", Metric.LOAD_S, 2),
           ("peak RSS MB", Metric.PEAK_RSS_MB, 0), ("TTFT ms", Metric.TTFT_MS, 1),
           ("decode tok/s", Metric.DECODE_TOK_S, 1), ("PPL", Metric.PPL, 3),
           ("± err", Metric.PPL_ERR, 3), ("ΔPPL %", Metric.DELTA_PPL_PCT, 2),
           ("KLD mean", Metric.KLD_MEAN, 5), ("KLD p99", Metric.KLD_P99, 4),
           ("top-1 %", Metric.TOP1_AGREE_PCT, 2)]
# (header after which it goes, header, interval metric prefix, decimals): 95 % intervals
INTERVALS = [("ΔPPL %", "ΔPPL 95 % CI", "delta_ppl", 2), ("KLD mean", "KLD 95 % CI", "kld", 5)]
# the fine-tune and generation table: (header, metric, decimals)
FINETUNE_COLUMNS = [("base PPL (no adapter)", Metric.BASE_PPL, 3), ("PPL", Metric.PPL, 3),
                    ("fine-tune kept %", Metric.FINETUNE_RETENTION_PCT, 1)]
GENERATION_COLUMNS = [("gen prefix match %", Metric.GEN_PREFIX_MATCH_PCT, 1),
                      ("gen mean match tokens", Metric.GEN_MEAN_MATCH_LEN, 2),
                      ("task exact match %", Metric.TASK_EXACT_MATCH_PCT, 1),
                      ("task ROUGE-L %", Metric.TASK_ROUGE_L_PCT, 1)]
GPU_COLUMNS = [("bits/weight", Metric.BITS_PER_WEIGHT, 2), ("size MB", Metric.SIZE_MB, 2),
               ("load s", Metric.LOAD_S, 2), ("peak GPU MB", Metric.PEAK_GPU_MB, 0),
               ("GPU process MB", Metric.GPU_PROCESS_PEAK_MB, 0), ("TTFT ms", Metric.TTFT_MS, 1),
               ("prefill tok/s", Metric.PREFILL_TOK_S, 0), ("decode tok/s", Metric.DECODE_TOK_S, 1)]


def num(value: float | None, decimals: int, sign: bool = False) -> str:
    if value is None:
        return NA
    return f"{value:{'+' if sign else ''}.{decimals}f}"


def metric(row: dict, key: str, decimals: int) -> str:
    return num(row["metrics"].get(key), decimals, sign=key == Metric.DELTA_PPL_PCT)


def ci95(row: dict, prefix: str) -> tuple[float, float] | None:
    """The run's 95 % interval of metric `prefix` (metrics <prefix>_ci95_low/high), or None."""
    m = row["metrics"]
    low, high = m.get(f"{prefix}_ci95_low"), m.get(f"{prefix}_ci95_high")
    return None if low is None or high is None else (low, high)


def interval(row: dict, prefix: str, decimals: int) -> str:
    """"[low, high]" of the run's 95 % interval, or — when it logged none."""
    ci = ci95(row, prefix)
    if ci is None:
        return NA
    sign = prefix == "delta_ppl"
    return f"[{num(ci[0], decimals, sign)}, {num(ci[1], decimals, sign)}]"


def eval_digest(row: dict) -> str:
    """The digest of the text the run was scored on ("?" when it logged none)."""
    return next((d["digest"] for d in all_datasets(row) if d["context"] == "evaluation"), "?")


def no_finetune(row: dict) -> bool:
    return row["params"].get("adapter.name") == "none"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def short(run_id: str) -> str:
    return f"`{run_id[:8]}`"


def comparison(rows: list[dict]) -> str:
    after = {h: (ci_h, prefix, d) for h, ci_h, prefix, d in INTERVALS}
    header, cells = ["format", "method"], []
    for h, k, d in COLUMNS:
        header.append(h)
        cells.append(lambda r, k=k, d=d: metric(r, k, d))
        if h in after:
            ci_h, prefix, ci_d = after[h]
            header.append(ci_h)
            cells.append(lambda r, p=prefix, d=ci_d: interval(r, p, d))
    body = [[f"**{r['name']}**", r["method"]] + [c(r) for c in cells]
            + [r["gate"] or NA, short(r["run_id"])] for r in rows]
    return table(header + ["gate", "run"], body)


def finetune_and_generation(rows: list[dict]) -> str:
    """Per variant: the base model's PPL (before fine-tuning), the variant's, the share of the
    fine-tune's gain it keeps with its 95 % interval (or "no fine-tune"), and how its greedy
    continuations and task answers agree with FP16's / the references."""
    header = (["format"] + [h for h, _, _ in FINETUNE_COLUMNS] + ["kept 95 % CI"]
              + [h for h, _, _ in GENERATION_COLUMNS] + ["run"])
    body = []
    for r in rows:
        if no_finetune(r):
            ft = [NA, metric(r, Metric.PPL, 3), "no fine-tune", NA]
        else:
            ft = [metric(r, k, d) for _, k, d in FINETUNE_COLUMNS] + [
                interval(r, "finetune_retention", 1)]
        body.append([f"**{r['name']}**"] + ft + [metric(r, k, d) for _, k, d in
                                                  GENERATION_COLUMNS] + [short(r["run_id"])])
    return table(header, body)


def overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


# the per-window means (the evaluate stage's per_window.json) that order two variants on each
# metric: KLD on KLD; ΔPPL on NLL (both against the same FP16 windows, so ΔPPL_a < ΔPPL_b
# exactly when a's mean NLL is lower)
PER_WINDOW_OF = {"kld": "kld", "delta_ppl": "nll"}


def paired(a: dict, b: dict, prefix: str = "kld") -> tuple[float, float, float] | None:
    """a's mean minus b's (KLD, or NLL for ΔPPL) with its paired 95 % interval, where both runs
    logged per-window means over the very same windows (`row["per_window"]`,
    query.attach_per_window); else None."""
    key = PER_WINDOW_OF[prefix]
    pa, pb = a.get("per_window") or {}, b.get("per_window") or {}
    if key not in pa or key not in pb or pa.get("windows_sha256") != pb.get("windows_sha256"):
        return None
    return M.paired_difference(pa[key], pb[key])


def alike(a: dict, b: dict, prefix: str) -> bool | None:
    """Whether two variants cannot be told apart on metric `prefix`: the paired interval of
    their difference holds 0, or, without per-window records, their own 95 % intervals overlap
    (a conservative reading: both intervals carry the same text-sample noise). None: neither
    test possible."""
    if (d := paired(a, b, prefix)) is not None:
        return d[1] <= 0 <= d[2]
    ca, cb = ci95(a, prefix), ci95(b, prefix)
    return None if ca is None or cb is None else overlaps(ca, cb)


def indistinguishable(rows: list[dict]) -> list[str]:
    """One line per metric naming the pairs of variants that cannot be told apart on this eval
    text (`alike`: a paired test where both runs logged per-window means, else overlapping
    intervals, after which a listed pair may still differ)."""
    out = []
    for label, prefix, decimals in (("ΔPPL", "delta_ppl", 2), ("KLD", "kld", 5)):
        pairs = [f"{a['name']} {interval(a, prefix, decimals)} ~ "
                 f"{b['name']} {interval(b, prefix, decimals)}"
                 + ("" if paired(a, b, prefix) else " (overlap)")
                 for i, a in enumerate(rows) for b in rows[i + 1:]
                 if alike(a, b, prefix)]
        if any(ci95(r, prefix) for r in rows):
            out.append(f"- **{label}**: " + ("; ".join(pairs) if pairs else
                                             "every pair of variants differs"))
    return out or ["- no 95 % intervals in these runs (logged since the bootstrap was added)"]


def gpu_comparison(rows: list[dict]) -> str:
    header = ["shape", "GPU", "format", "runtime"] + [h for h, _, _ in GPU_COLUMNS] + ["run"]
    body = [[r["tags"].get(Tag.SHAPE, NA), r["tags"].get(Tag.HARDWARE_GPU, NA), f"**{r['name']}**",
             r["tags"].get(Tag.EVAL_RUNTIME, "transformers")]
            + [metric(r, k, d) for _, k, d in GPU_COLUMNS] + [short(r["run_id"])] for r in rows]
    return table(header, body)


DEPLOY_COLUMNS = [("requests", Metric.DEPLOY_REQUESTS, 0), ("errors", Metric.DEPLOY_ERRORS, 0),
                  ("p50 ms", Metric.DEPLOY_LATENCY_P50_MS, 0),
                  ("p90 ms", Metric.DEPLOY_LATENCY_P90_MS, 0),
                  ("p99 ms", Metric.DEPLOY_LATENCY_P99_MS, 0), ("tok/s", Metric.DEPLOY_TOK_S, 1),
                  ("server ready s", Metric.DEPLOY_READY_S, 1)]


def deployment(rows: list[dict]) -> str:
    """One row per variant, server and concurrency level (runs before the server and level
    tags: llama.cpp, the level in their params)."""
    header = ["format", "server", "concurrency", "smoke (stops at EOS)"] \
        + [h for h, _, _ in DEPLOY_COLUMNS] + ["run"]
    body = [[f"**{r['name']}**", r["tags"].get(Tag.DEPLOY_SERVER, "llama.cpp"),
             r["tags"].get(Tag.DEPLOY_CONCURRENCY) or r["params"].get("deploy.concurrency", NA),
             "ok" if r["metrics"].get(Metric.DEPLOY_SMOKE_OK) else "FAILED"]
            + [metric(r, k, d) for _, k, d in DEPLOY_COLUMNS] + [short(r["run_id"])]
            for r in rows]
    return table(header, body)


SCALE_STAGES = ("merge", "quantise", "evaluate", "publish")


def scale(rows: list[dict]) -> str:
    """benchmarks/scale.py --pipeline: time and peak RSS of each stage on real model shapes."""
    body = []
    for r in rows:
        m = r["metrics"]
        cells = []
        for st in SCALE_STAGES:
            sec, gb = m.get(f"{st}_seconds"), m.get(f"{st}_peak_rss_gb")
            cells.append("–" if sec is None else f"{sec:.0f} s, {gb:.2f} GB"
                         + (" (reused)" if m.get(f"{st}_reused") else ""))
        quality = (f"{num(m.get('delta_ppl_pct'), 2, sign=True)} % / {num(m.get('kld_mean'), 4)} / "
                   f"{num(m.get('decode_tok_s'), 2)} ({num(m.get('eval_windows_scored'), 0)} of "
                   f"{num(m.get('eval_windows_planned'), 0)} windows)" if "ppl" in m
                   else short_error(r["tags"].get(Tag.ERROR, r["tags"].get("scale.status", "?"))))
        body.append([r["tags"].get("scale.size", "?"), num(m.get("fp16_gb"), 2), r["name"],
                     *cells, quality])
    return table(["size", "FP16 GB", "variant", *SCALE_STAGES,
                  "ΔPPL % / KLD / decode tok/s (scored)"], body)


def short_error(text: str, limit: int = 300) -> str:
    """A refusal as a table cell: what is wrong, without the fix (`key: what -> fix`: the fix is
    the run's own advice), without host paths, cut at a word boundary past `limit` characters."""
    text = without_host_paths(text.split(" -> ", 1)[0].strip())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def without_host_paths(text: str) -> str:
    """An error text as the report prints it: each absolute path cut to `…/<its last part>`
    (a benchmark's refusal names its work folder, which is this host's, not the reader's)."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:'\",;()]+/)*([^\s/:'\",;()]+)", r"…/\1", text)


def _values(rows: list[dict], get) -> dict[str, list[str]]:
    """Distinct values of `get(row)` -> the variants that have each (one line if all agree)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["label"] not in seen[str(get(r))]:
            seen[str(get(r))].append(r["label"])
    return seen


def _line(label: str, seen: dict[str, list[str]]) -> str:
    if len(seen) == 1:
        return f"- **{label}**: {next(iter(seen))}"
    return f"- **{label}** (differs between runs): " + "; ".join(
        f"{v} ({', '.join(names)})" for v, names in seen.items())


def provenance(sel: Selection) -> str:
    cpu = sel.variants
    out = []
    base = _values(cpu, lambda r: r["tags"].get(Tag.BASE_SOURCE, "unknown"))
    out.append(_line("Base model", base))
    out += base_source_note(base)
    out += base_grid(cpu)
    out.append(_line("Adapter", _values(cpu, lambda r: _adapter(r["params"]))))
    texts: dict[tuple, set[str]] = defaultdict(set)
    for r in cpu:
        for d in all_datasets(r):
            texts[(d["context"], d["name"], d["digest"], d["source"])].add(r["name"])
    for (context, name, digest, source), names in sorted(texts.items()):
        used = "all variants" if len(names) == len(cpu) else ", ".join(sorted(names))
        out.append(f"- **{context or 'dataset'} text**: {name}, digest `{digest}`, "
                   f"source `{source}` ({used})")
    if not any(c.startswith("calib") for c, *_ in texts):  # a reused quantise stage logs none
        out.append(_calibration_configured([r for r in cpu if r["method"] == "static"]))
    out.append(_line("Evaluation protocol", _values(cpu, _protocol)))
    out.append(_line("Threads (CPU runs)", _values(cpu, lambda r: r["params"].get("threads", "?"))))
    for kind, group in (("CPU runs", cpu), ("GPU runs", sel.gpu)):
        if not group:
            continue
        out.append(_line(f"Hardware ({kind})", _values(group, lambda r: ", ".join(
            f"{k.removeprefix(Tag.HARDWARE_PREFIX)} {v}" for k, v in sorted(r["tags"].items())
            if k.startswith(Tag.HARDWARE_PREFIX)))))
        out.append(_line(f"Library versions ({kind})", _values(group, lambda r: ", ".join(
            f"{k.removeprefix(Tag.VERSION_PREFIX)} {v}" for k, v in sorted(r["tags"].items())
            if k.startswith(Tag.VERSION_PREFIX)))))
        out.append(_line(f"git SHA ({kind})", _values(group, _git)))
    out.append(f"- **MLflow**: experiment `{sel.experiment}` at `{sel.tracking_uri}`")
    if sel.sweep:
        out.append(f"- **Sweep run**: `{sel.sweep['run_id']}` ({sel.sweep['status']}, started "
                   f"{_when(sel.sweep['start_ms'])})")
    out.append("- **Variant runs (CPU)**: " + ", ".join(f"{r['label']} `{r['run_id']}`"
                                                       for r in cpu))
    if sel.gpu:
        out.append("- **GPU bench runs**: " + ", ".join(f"{r['label']} `{r['run_id']}`"
                                                       for r in sel.gpu))
    if sel.failed:
        out.append("- **Not finished (left out)**: " + ", ".join(
            f"{r['name']} `{r['run_id']}` ({r['status']})" for r in sel.failed))
    return "\n".join(out)


def _calibration_configured(static: list[dict]) -> str:
    """The calibration line when no stage logged the text (a reused quantise stage logs none):
    the `quant.backend.*.text_file` option each static variant was configured with."""
    if not static:
        return "- **calibration text**: none (no variant in this selection is calibrated)"
    keys = [k for r in static for k in sorted(r["params"])
            if k.startswith("quant.backend.") and k.endswith(".text_file")]
    key = keys[0] if keys else "quant.backend.*.text_file"
    configured = ", ".join(f"{r['name']}: {r['params'].get(key)}" for r in static)
    return (f"- **calibration text**: not logged; {key} = {configured} (None = the calib "
            "split of pydoc_data.topics)")


def base_grid(rows: list[dict]) -> list[str]:
    """How much of each base's weights sits on a 4-bit block grid (the base stage's grid
    check), with a warning for a base that mostly does: a ranking measured on it favours the
    formats that share its blocks."""
    def share(r: dict) -> str:
        pct = r["metrics"].get(Metric.GRID_ALIGNED_PCT)
        return "not measured" if pct is None else (
            f"{pct:.1f} % of blocks of {gridcheck.BLOCK} weights hold <= {gridcheck.LEVELS} "
            "distinct values")
    out = [_line("Base weights on a 4-bit block grid", _values(rows, share))]
    warned: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if text := gridcheck.warning(r["metrics"].get(Metric.GRID_ALIGNED_PCT)):
            warned[text].append(r["label"])
    for text, labels in warned.items():
        which = "" if len(labels) == len(rows) else f" ({', '.join(labels)})"
        out.append(f"  **Warning**{which}: {text}.")
    return out


def _git(r: dict) -> str:
    """The commit the run's code came from; `-dirty` (uncommitted changes) said in words, since
    no clone of the repository reproduces such a run."""
    sha = r["tags"].get(Tag.GIT_SHA, "unknown")
    if sha.endswith("-dirty"):
        return f"{sha.removesuffix('-dirty')} plus uncommitted changes (not reproducible from git)"
    return sha


def _adapter(params: dict) -> str:
    name, path = params.get("adapter.name", "?"), params.get("adapter.path", "None")
    if name == "none":
        return "none (the base model is quantised as it is)"
    if path not in ("None", ""):
        return f"{path} (LoRA, merged with peft)"
    return (f"{name}: demo LoRA trained by the pipeline (rank {params.get('adapter.train.r')}, "
            f"{params.get('adapter.train.steps')} steps)")


def _protocol(r: dict) -> str:
    p, m = r["params"], r["metrics"]
    tokens = m.get(Metric.EVAL_TOKENS_SCORED)
    scored = (f"{num(m.get(Metric.EVAL_WINDOWS_SCORED), 0)} of "
              f"{num(m.get(Metric.EVAL_WINDOWS_PLANNED), 0)} windows"
              if Metric.EVAL_WINDOWS_PLANNED in m else f"windows {p.get('eval.n_windows', '?')}")
    budget = p.get("eval.max_minutes", "None")
    return (f"n_ctx {p.get('eval.n_ctx', '?')}, {scored}"
            + ("" if budget == "None" else f" (budget {budget} min per pass)")
            + f", KLD over the FP16 top-{p.get('eval.kld_top_k', '?')} tokens, "
            f"{num(tokens, 0)} tokens scored, FP16 reference on "
            f"{p.get('eval.reference_runtime', 'transformers-float32')}")


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") \
        if ms else "?"


def overlapping(rows: list[dict]) -> list[tuple[str, str]]:
    """Pairs of variant runs that ran at the same time (a parallel launcher): their speed and
    memory figures were measured under contention."""
    spans = sorted((r["start_ms"], r["end_ms"] or r["start_ms"], r["name"]) for r in rows)
    return [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]


def _backend(params: dict) -> str:
    """The quantiser a run called and its options, as its params record them."""
    target = params.get("quant.backend._target_", "?").rsplit(".", 2)
    options = ", ".join(f"{k.removeprefix('quant.backend.')}={v}" for k, v in sorted(params.items())
                        if k.startswith("quant.backend.")
                        and not k.endswith(("._target_", "._partial_")))
    return f"`{'.'.join(target[-2:])}`" + (f" ({options})" if options else "")


def _stages(row: dict) -> str:
    """Each stage run: built, reused from the cache, or given (a user's folder), and its time."""
    out = []
    for s in sorted(row["stages"], key=lambda s: s["start_ms"]):
        secs = ((s["end_ms"] or s["start_ms"]) - s["start_ms"]) / 1000
        how = {"true": "reused", "false": "built", "external": "given"}.get(
            s["tags"].get(Tag.REUSED, ""), "ran")
        out.append(f"{s['tags'].get(Tag.STAGE, s['name'])} {how} {secs:.1f} s")
    return "; ".join(out) or NA


def workflow(rows: list[dict]) -> str:
    """FP16 -> INT8 -> INT4 -> GGUF: what each run did, stage by stage, from its stage runs."""
    out = []
    for r in rows:
        registry = (f", registry {r['tags'][Tag.REGISTRY_VERSION]}"
                    if Tag.REGISTRY_VERSION in r["tags"] else "")
        out.append(f"1. **{r['name']}** (run {short(r['run_id'])}, {r['family']}, {r['method']}):"
                   f" {_backend(r['params'])} -> {metric(r, Metric.SIZE_MB, 2)} MB, "
                   f"{metric(r, Metric.BITS_PER_WEIGHT, 2)} bits/weight, ΔPPL "
                   f"{metric(r, Metric.DELTA_PPL_PCT, 2)} %, KLD {metric(r, Metric.KLD_MEAN, 5)}; "
                   f"published "
                   f"`{r['tags'].get(Tag.PUBLISHED, NA)}`{registry}.  \n"
                   f"   Stages: {_stages(r)}.")
    return "\n".join(out)


def told_apart(a: dict, b: dict) -> str:
    """Whether two variants' 95 % intervals separate them (see `indistinguishable`)."""
    said = []
    for label, prefix in (("ΔPPL", "delta_ppl"), ("KLD", "kld")):
        same = alike(a, b, prefix)
        if same is None:
            continue
        if paired(a, b, prefix):
            why = "the paired 95 % interval of the difference " + ("holds" if same else
                                                                    "excludes") + " 0"
        else:
            why = "95 % intervals " + ("overlap" if same else "do not overlap")
        said.append(f"{label} {'cannot be told apart' if same else 'differs'} ({why})")
    return f"; {', '.join(said)}" if said else ""
