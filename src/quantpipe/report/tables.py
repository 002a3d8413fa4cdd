"""Markdown sections of QUANTISATION-REPORT.md, made from the rows of quantpipe.report.query.

Every number printed is an MLflow metric, parameter, tag or start/end time of the run named
beside it, rounded to the decimals its column shows (tests/test_report.py parses the table
back and checks that).
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict

from quantpipe.report.query import Selection, all_datasets

NA = "—"
# (header, metric, decimals): the comparison table, one row per variant run
COLUMNS = [("bits/weight", "bits_per_weight", 2), ("size MB", "size_mb", 2),
           ("compression ×", "compression", 2), ("load s", "load_s", 2),
           ("peak RSS MB", "peak_rss_mb", 0), ("TTFT ms", "ttft_ms", 1),
           ("decode tok/s", "decode_tok_s", 1), ("PPL", "ppl", 3), ("± err", "ppl_err", 3),
           ("ΔPPL %", "delta_ppl_pct", 2), ("KLD mean", "kld_mean", 5),
           ("KLD p99", "kld_p99", 4), ("top-1 %", "top1_agree_pct", 2)]
GPU_COLUMNS = [("bits/weight", "bits_per_weight", 2), ("size MB", "size_mb", 2),
               ("load s", "load_s", 2), ("peak GPU MB", "peak_gpu_mb", 0),
               ("GPU process MB", "gpu_process_peak_mb", 0), ("TTFT ms", "ttft_ms", 1),
               ("prefill tok/s", "prefill_tok_s", 0), ("decode tok/s", "decode_tok_s", 1)]


def num(value: float | None, decimals: int, sign: bool = False) -> str:
    if value is None:
        return NA
    return f"{value:{'+' if sign else ''}.{decimals}f}"


def metric(row: dict, key: str, decimals: int) -> str:
    return num(row["metrics"].get(key), decimals, sign=key == "delta_ppl_pct")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def short(run_id: str) -> str:
    return f"`{run_id[:8]}`"


def comparison(rows: list[dict]) -> str:
    header = ["format", "method"] + [h for h, _, _ in COLUMNS] + ["gate", "run"]
    body = [[f"**{r['name']}**", r["method"]] + [metric(r, k, d) for _, k, d in COLUMNS]
            + [r["gate"] or NA, short(r["run_id"])] for r in rows]
    return table(header, body)


def gpu_comparison(rows: list[dict]) -> str:
    header = ["shape", "GPU", "format", "runtime"] + [h for h, _, _ in GPU_COLUMNS] + ["run"]
    body = [[r["tags"].get("shape", NA), r["tags"].get("hardware.gpu", NA), f"**{r['name']}**",
             r["tags"].get("eval.runtime", "transformers")]
            + [metric(r, k, d) for _, k, d in GPU_COLUMNS] + [short(r["run_id"])] for r in rows]
    return table(header, body)


DEPLOY_COLUMNS = [("requests", "deploy_requests", 0), ("errors", "deploy_errors", 0),
                  ("p50 ms", "deploy_latency_p50_ms", 0), ("p90 ms", "deploy_latency_p90_ms", 0),
                  ("p99 ms", "deploy_latency_p99_ms", 0), ("tok/s", "deploy_tok_s", 1),
                  ("server ready s", "deploy_ready_s", 1)]


def deployment(rows: list[dict]) -> str:
    header = ["format", "smoke (stops at EOS)"] + [h for h, _, _ in DEPLOY_COLUMNS] + ["run"]
    body = [[f"**{r['name']}**", "ok" if r["metrics"].get("deploy_smoke_ok") else "FAILED"]
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
    base = _values(cpu, lambda r: r["tags"].get("base.source", "unknown"))
    out.append(_line("Base model", base))
    if any("Q4_1" in b for b in base):
        out.append("  The default base is SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF "
                   "packaged on PyPI: \"FP16\" here is an FP16 copy of a 4-bit model, and every "
                   "quality delta below is measured against that copy.")
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
            f"{k.removeprefix('hardware.')} {v}" for k, v in sorted(r["tags"].items())
            if k.startswith("hardware.")))))
        out.append(_line(f"Library versions ({kind})", _values(group, lambda r: ", ".join(
            f"{k.removeprefix('version.')} {v}" for k, v in sorted(r["tags"].items())
            if k.startswith("version.")))))
        out.append(_line(f"git SHA ({kind})", _values(group, lambda r: r["tags"].get(
            "git.sha", "unknown"))))
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
    tokens = m.get("eval_tokens_scored")
    return (f"n_ctx {p.get('eval.n_ctx', '?')}, windows {p.get('eval.n_windows', '?')}, "
            f"KLD over the FP16 top-{p.get('eval.kld_top_k', '?')} tokens, "
            f"{num(tokens, 0)} tokens scored")


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
            s["tags"].get("quantpipe.reused", ""), "ran")
        out.append(f"{s['tags'].get('quantpipe.stage', s['name'])} {how} {secs:.1f} s")
    return "; ".join(out) or NA


def workflow(rows: list[dict]) -> str:
    """FP16 -> INT8 -> INT4 -> GGUF: what each run did, stage by stage, from its stage runs."""
    out = []
    for r in rows:
        registry = (f", registry {r['tags']['registry.version']}"
                    if "registry.version" in r["tags"] else "")
        out.append(f"1. **{r['name']}** (run {short(r['run_id'])}, {r['family']}, {r['method']}):"
                   f" {_backend(r['params'])} -> {metric(r, 'size_mb', 2)} MB, "
                   f"{metric(r, 'bits_per_weight', 2)} bits/weight, ΔPPL "
                   f"{metric(r, 'delta_ppl_pct', 2)} %, KLD {metric(r, 'kld_mean', 5)}; published "
                   f"`{r['tags'].get('quantpipe.published', NA)}`{registry}.  \n"
                   f"   Stages: {_stages(r)}.")
    return "\n".join(out)


def static_vs_dynamic(rows: list[dict]) -> str:
    """Per comparison group (`quant.compare` in conf/quant: one precision, e.g. int4 = NF4, GPTQ,
    AWQ), the calibrated (static) variants next to the uncalibrated (dynamic) ones, scored on
    the same evaluation text (same dataset digest)."""
    def eval_digest(r: dict) -> str:
        return next((d["digest"] for d in all_datasets(r) if d["context"] == "evaluation"), "?")

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
                         metric(r, "delta_ppl_pct", 2), metric(r, "kld_mean", 5),
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
                                 f"{metric(s, 'delta_ppl_pct', 2)} %")
    header = ["group", "format", "method", "calibration text", "eval text digest", "size MB",
              "ΔPPL %", "KLD mean", "top-1 %", "run"]
    return table(header, body) + "\n\n" + "\n".join(f"- {n}" for n in notes)