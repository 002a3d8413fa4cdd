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
from quantpipe.names import Metric, Tag
from quantpipe.report.query import Selection, all_datasets

NA = "—"
# (header, metric, decimals): the comparison table, one row per variant run
COLUMNS = [("bits/weight", "bits_per_weight", 2), ("size MB", "size_mb", 2),
           ("compression ×", "compression", 2), ("load s", "load_s", 2),
           ("peak RSS MB", "peak_rss_mb", 0), ("TTFT ms", "ttft_ms", 1),
           ("decode tok/s", "decode_tok_s", 1), ("PPL", "ppl", 3), ("± err", "ppl_err", 3),
           ("ΔPPL %", "delta_ppl_pct", 2), ("KLD mean", "kld_mean", 5),
           ("KLD p99", "kld_p99", 4), ("top-1 %", "top1_agree_pct", 2)]
# (header after which it goes, header, interval metric prefix, decimals): 95 % intervals
INTERVALS = [("ΔPPL %", "ΔPPL 95 % CI", "delta_ppl", 2), ("KLD mean", "KLD 95 % CI", "kld", 5)]
# the fine-tune and generation table: (header, metric, decimals)
FINETUNE_COLUMNS = [("base PPL (no adapter)", "base_ppl", 3), ("PPL", "ppl", 3),
                    ("fine-tune kept %", "finetune_retention_pct", 1)]
GENERATION_COLUMNS = [("gen prefix match %", "gen_prefix_match_pct", 1),
                      ("gen mean match tokens", "gen_mean_match_len", 2),
                      ("task exact match %", "task_exact_match_pct", 1),
                      ("task ROUGE-L %", "task_rouge_l_pct", 1)]
GPU_COLUMNS = [("bits/weight", "bits_per_weight", 2), ("size MB", "size_mb", 2),
               ("load s", "load_s", 2), ("peak GPU MB", "peak_gpu_mb", 0),
               ("GPU process MB", "gpu_process_peak_mb", 0), ("TTFT ms", "ttft_ms", 1),
               ("prefill tok/s", "prefill_tok_s", 0), ("decode tok/s", "decode_tok_s", 1)]


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
            ft = [NA, metric(r, "ppl", 3), "no fine-tune", NA]
        else:
            ft = [metric(r, k, d) for _, k, d in FINETUNE_COLUMNS] + [
                interval(r, "finetune_retention", 1)]
        body.append([f"**{r['name']}**"] + ft + [metric(r, k, d) for _, k, d in
                                                  GENERATION_COLUMNS] + [short(r["run_id"])])
    return table(header, body)


def overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def indistinguishable(rows: list[dict]) -> list[str]:
    """One line per metric naming the pairs of variants whose 95 % intervals overlap: on this
    eval text they cannot be told apart. Overlap is a conservative test (both intervals carry
    the same text-sample noise, so a paired comparison of the two could still separate
    some), so a pair not listed differs for sure and a listed one may or may not."""
    out = []
    for label, prefix, decimals in (("ΔPPL", "delta_ppl", 2), ("KLD", "kld", 5)):
        pairs = [f"{a['name']} {interval(a, prefix, decimals)} ~ "
                 f"{b['name']} {interval(b, prefix, decimals)}"
                 for i, a in enumerate(rows) for b in rows[i + 1:]
                 if overlaps(ci95(a, prefix), ci95(b, prefix))]
        if any(ci95(r, prefix) for r in rows):
            out.append(f"- **{label}**: " + ("; ".join(pairs) if pairs else
                                             "every pair of variants differs (no two 95 % "
                                             "intervals overlap)"))
    return out or ["- no 95 % intervals in these runs (logged since the bootstrap was added)"]


def gpu_comparison(rows: list[dict]) -> str:
    header = ["shape", "GPU", "format", "runtime"] + [h for h, _, _ in GPU_COLUMNS] + ["run"]
    body = [[r["tags"].get("shape", NA), r["tags"].get("hardware.gpu", NA), f"**{r['name']}**",
             r["tags"].get("eval.runtime", "transformers")]
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


def gguf_stage(row: dict) -> str:
    """The `make bench` run: each step of the pipeline's GGUF stage against llama.cpp's own tool
    (metrics `<step>.<field>`, as benchmarks/gguf_stage.py logs them)."""
    m = row["metrics"]
    steps = sorted({k.split(".", 1)[0] for k in m if k.endswith(".ratio")},
                   key=lambda s: (not s.startswith("convert"), s))
    body = []
    for s in steps:
        same = m.get(f"{s}.identical")
        body.append([s.replace("_", " ", 1), num(m.get(f"{s}.ours_s"), 2),
                     num(m.get(f"{s}.tool_s"), 2), f"**{num(m.get(f'{s}.ratio'), 3)}×**",
                     num(m.get(f"{s}.ours_rss_mb"), 0), num(m.get(f"{s}.tool_rss_mb"), 0),
                     "–" if same is None else ("yes" if same else "no")])
    return table(["step", "pipeline s", "llama.cpp tool s", "pipeline / tool",
                  "pipeline peak RSS MiB", "tool peak RSS MiB", "same bytes"], body)


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
    if any("Q4_1" in b for b in base):
        out.append("  The default base is SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF "
                   "packaged on PyPI: \"FP16\" here is an FP16 copy of a 4-bit model, and every "
                   "quality delta below is measured against that copy.")
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
    static = [r for r in cpu if r["method"] == "static"]
    if not any(c.startswith("calib") for c, *_ in texts):  # a reused quantise stage logs none
        configured = ", ".join(f"{r['name']}: {r['params'].get('quant.backend.imatrix.text_file')}"
                               for r in static)
        out.append("- **calibration text**: " + (
            f"not logged; quant.backend.imatrix.text_file = {configured} (None = the calib "
            "split of pydoc_data.topics)" if static
            else "none (no variant in this selection is calibrated)"))
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


def static_vs_dynamic(rows: list[dict]) -> str:
    """Per comparison group (`quant.compare` in conf/quant: one precision, e.g. int4 = NF4, GPTQ,
    AWQ), the calibrated (static) variants next to the uncalibrated (dynamic) ones, scored on
    the same evaluation text (same dataset digest)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in ("static", "dynamic") and r["params"].get("quant.compare",
                                                                    "None") != "None":
            groups.setdefault(r["params"]["quant.compare"], []).append(r)
    groups = {g: m for g, m in groups.items() if any(r["method"] == "static" for r in m)}
    if not groups:
        return ("No static (calibrated) variant in this selection: every quantised variant is "
                "dynamic (no calibration data). Add one with `make sweep SWEEP=int4,gptq_w4a16,"
                "awq_w4a16,int8,w8a8_int8,w8a8_int8_dynamic,gguf_q4_k_m,gguf_imatrix_q4_k_m` "
                "to compare them on the same text.")
    body, notes = [], []
    for group, members in sorted(groups.items()):
        members.sort(key=lambda r: (r["method"] != "dynamic", r["name"]))
        for r in members:
            calib = next((d for d in all_datasets(r) if d["context"].startswith("calib")), None)
            body.append([group, f"**{r['name']}**", r["method"], calib["name"] if calib else NA,
                         f"`{eval_digest(r)}`", metric(r, "size_mb", 2),
                         metric(r, "delta_ppl_pct", 2), interval(r, "delta_ppl", 2),
                         metric(r, "kld_mean", 5), interval(r, "kld", 5),
                         metric(r, "top1_agree_pct", 2), short(r["run_id"])])
        for s in (r for r in members if r["method"] == "static"):
            for d in (r for r in members if r["method"] == "dynamic"):
                if eval_digest(s) != eval_digest(d):
                    notes.append(f"{s['name']} and {d['name']} were scored on different texts: "
                                 "not comparable")
                elif "kld_mean" in s["metrics"] and d["metrics"].get("kld_mean"):
                    change = 100 * (s["metrics"]["kld_mean"] / d["metrics"]["kld_mean"] - 1)
                    notes.append(f"{group}: {s['name']} (static) vs {d['name']} (dynamic) on the "
                                 f"same text: KLD {metric(d, 'kld_mean', 5)} -> "
                                 f"{metric(s, 'kld_mean', 5)} ({change:+.1f} %), ΔPPL "
                                 f"{metric(d, 'delta_ppl_pct', 2)} % -> "
                                 f"{metric(s, 'delta_ppl_pct', 2)} %{_told_apart(d, s)}")
    header = ["group", "format", "method", "calibration text", "eval text digest", "size MB",
              "ΔPPL %", "ΔPPL 95 % CI", "KLD mean", "KLD 95 % CI", "top-1 %", "run"]
    return table(header, body) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _told_apart(a: dict, b: dict) -> str:
    """Whether two variants' 95 % intervals separate them (see `indistinguishable`)."""
    said = []
    for label, prefix in (("ΔPPL", "delta_ppl"), ("KLD", "kld")):
        ca, cb = ci95(a, prefix), ci95(b, prefix)
        if ca and cb:
            said.append(f"{label} cannot be told apart (95 % intervals overlap)"
                        if overlaps(ca, cb) else f"{label} differs (95 % intervals do not overlap)")
    return f"; {', '.join(said)}" if said else ""


def _tune_stage(row: dict) -> dict | None:
    """The quantise stage's metrics if the variant was searched (quantpipe.quantize.tuned)."""
    return next((s["metrics"] for s in row["stages"] if "tune_s" in s["metrics"]), None)


def tuned_vs_imatrix(rows: list[dict]) -> str:
    """Each tuned GGUF beside llama.cpp's imatrix and plain files of its quant.type, on the same
    evaluation text: which one is closest to FP16 at (at most) the plain file's size."""
    tuned = [r for r in rows if _tune_stage(r) is not None]
    if not tuned:
        return ("No tuned GGUF in this selection. Add one with `make sweep SWEEP=gguf_q4_k_m,"
                "gguf_imatrix_q4_k_m,gguf_tuned`.")
    out = []
    for t in tuned:
        qtype = t["params"].get("quant.compare")
        same = [r for r in rows if r["family"] == t["family"] and r is not t
                and r["params"].get("quant.compare") == qtype and _tune_stage(r) is None
                and r["method"] in ("dynamic", "static") and eval_digest(r) == eval_digest(t)]
        trio = [(r, "plain" if r["method"] == "dynamic" else "calibrated") for r in same]
        trio.append((t, "tuned"))
        body = [[f"**{r['name']}**", how, metric(r, "size_mb", 2), metric(r, "bits_per_weight", 2),
                 metric(r, "delta_ppl_pct", 2), interval(r, "delta_ppl", 2),
                 metric(r, "kld_mean", 5), interval(r, "kld", 5), metric(r, "top1_agree_pct", 2),
                 short(r["run_id"])] for r, how in trio]
        out.append(table(["format", "method", "size MB", "bits/weight", "ΔPPL %", "ΔPPL 95 % CI",
                          "KLD mean", "KLD 95 % CI", "top-1 %", "run"], body))
        scored = [(r, how) for r, how in trio if "kld_mean" in r["metrics"]]
        if scored:
            best, how = min(scored, key=lambda p: p[0]["metrics"]["kld_mean"])
            out.append(f"- Lowest held-out KLD: **{best['name']}** ({how}), "
                       f"{metric(best, 'kld_mean', 5)} nats, ΔPPL {metric(best, 'delta_ppl_pct', 2)} "
                       f"%, {metric(best, 'size_mb', 2)} MB.")
        m = _tune_stage(t)
        calib = {k.removeprefix("tune_kld_calib_"): v for k, v in m.items()
                 if k.startswith("tune_kld_calib_")}
        won = next((k for k in calib if m.get(f"tune_won_{k}")), None)
        won = f"the {won} candidate" if won else "a candidate other than its searched mix"
        calib = ", ".join(f"{k} {num(v, 5)}" for k, v in calib.items())
        ar = (f"; AutoRound {num(m.get('autoround_s'), 0)} s"
              f"{' (cached)' if m.get('autoround_reused') else ''}, peak RSS "
              f"{num(m.get('autoround_peak_rss_mb'), 0)} MB") if "autoround_s" in m else ""
        out.append(f"- The tuner published {won}; calibration-split KLD: {calib}; budget "
                   f"{num(m.get('budget_mb'), 2)} MB; tuning {num(m.get('tune_s'), 0)} s, "
                   f"{num(m.get('tune_candidates_scored'), 0)} candidates, peak RSS "
                   f"{num(m.get('tune_peak_rss_mb'), 0)} MB (llama-quantize "
                   f"{num(m.get('tune_quantize_peak_rss_mb'), 0)} MB){ar}.")
        missing = {"plain", "calibrated"} - {how for _, how in trio}
        if missing:
            out.append(f"- No {' or '.join(sorted(missing))} {qtype} run on the same evaluation "
                       "text in this selection to compare with.")
    return "\n\n".join(out)

