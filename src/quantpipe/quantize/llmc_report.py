"""llm-compressor's report sections (quantpipe.report.sections): calibrated (static) variants
beside the uncalibrated (dynamic) ones of their precision, and what its compressed-tensors
folders' CPU speed and GPU rows mean.

The groups are the quant configs' `compare` key (int4 = NF4, GPTQ, AWQ; int8 = LLM.int8, W8A8
static and its dynamic twin; a GGUF type = plain and imatrix), each variant's `method` tag says
static or dynamic; a variant whose evaluation could not time the format's own kernels carries
the `eval.speed` tag (quantpipe.quantize.llmc's result, `speed`).
"""
from __future__ import annotations

from quantpipe.names import Metric
from quantpipe.quantize.llmc import AWQ_METRICS
from quantpipe.report.query import Selection, all_datasets
from quantpipe.report.sections import register
from quantpipe.report.tables import NA, eval_digest, interval, metric, short, table, told_apart

SPEED_TAG = "eval.speed"  # set on a variant whose tokens/s are not the format's own kernels'


@register("formats", order=10)
def section(sel: Selection) -> list[str]:
    return ["## Static vs dynamic quantisation", static_vs_dynamic(sel.variants)]


@register("speed")
def speed_note(sel: Selection) -> list[str]:
    no_speed = [r["name"] for r in sel.variants if r["tags"].get(SPEED_TAG)]
    if not no_speed:
        return []
    return ["**No CPU speed for** " + ", ".join(no_speed) + ": transformers "
            "decompresses these compressed-tensors folders to fp16 on CPU, so their "
            "tokens/s (logged as *_decompressed) are not the format's speed; vLLM's "
            "kernels give it (section \"vLLM (CPU build)\", where it ran). Their "
            "quality numbers are the format's."]


@register("gpu.note")
def gpu_note(sel: Selection) -> list[str]:
    return ["GPTQ/AWQ/W8A8 have no GPU row: their int4/int8 kernels come with vLLM, "
            "which the GPU machine's image does not have."]


@register("verdicts.hint")
def verdicts_hint(sel: Selection) -> list[str]:
    return ["e.g. `make sweep SWEEP=rtn_w4a16,gptq_w4a16,awq_w4a16`, with "
            "`eval.text_file=builtin:ood` for a second text"]


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
                         f"`{eval_digest(r)}`", metric(r, Metric.SIZE_MB, 2),
                         metric(r, Metric.DELTA_PPL_PCT, 2), interval(r, "delta_ppl", 2),
                         metric(r, Metric.KLD_MEAN, 5), interval(r, "kld", 5),
                         metric(r, Metric.TOP1_AGREE_PCT, 2), short(r["run_id"])])
        for s in (r for r in members if r["method"] == "static"):
            for d in (r for r in members if r["method"] == "dynamic"):
                notes.append(_versus(group, s, d))
    header = ["group", "format", "method", "calibration text", "eval text digest", "size MB",
              "ΔPPL %", "ΔPPL 95 % CI", "KLD mean", "KLD 95 % CI", "top-1 %", "run"]
    return table(header, body) + "\n\n" + "\n".join(f"- {n}" for n in notes if n)


def _versus(group: str, s: dict, d: dict) -> str:
    """A static variant against a dynamic one of its group: the KLD change on the same text."""
    if eval_digest(s) != eval_digest(d):
        return f"{s['name']} and {d['name']} were scored on different texts: not comparable"
    if Metric.KLD_MEAN not in s["metrics"] or not d["metrics"].get(Metric.KLD_MEAN):
        return ""
    change = 100 * (s["metrics"][Metric.KLD_MEAN] / d["metrics"][Metric.KLD_MEAN] - 1)
    return (f"{group}: {s['name']} (static) vs {d['name']} (dynamic) on the "
            f"same text: KLD {metric(d, Metric.KLD_MEAN, 5)} -> "
            f"{metric(s, Metric.KLD_MEAN, 5)} ({change:+.1f} %), ΔPPL "
            f"{metric(d, Metric.DELTA_PPL_PCT, 2)} % -> "
            f"{metric(s, Metric.DELTA_PPL_PCT, 2)} %{told_apart(d, s)}")


# llmc.awq_summary's metrics, shared with the variant run
AWQ_MAPPINGS, AWQ_LEFT, AWQ_LEFT_MIN, AWQ_PEAK = AWQ_METRICS


@register("formats", order=11)
def awq_section(sel: Selection) -> list[str]:
    """AWQ's own scale search per subject (the newest run of each AWQ variant per base model):
    why it gains over its round-to-nearest control on one subject and not on another."""
    from quantpipe.report import subjects
    newest: dict[tuple[str, str], dict] = {}
    for r in sel.everything:  # newest first
        if AWQ_MAPPINGS in r["metrics"]:
            newest.setdefault((subjects.subject(r), r["name"]), r)
    if not newest:
        return []
    gains = {}
    for v in subjects.judged(sel.everything):
        c = v["control"]["metrics"].get(Metric.KLD_MEAN)
        if c and v["row"]["metrics"].get(Metric.KLD_MEAN):
            gains.setdefault((v["subject"], v["row"]["name"]), []).append(
                f"{c / v['row']['metrics'][Metric.KLD_MEAN]:.2f}× on `{v['text']}`")
    body = [[subj, f"**{name}**", metric(r, AWQ_MAPPINGS, 0), metric(r, AWQ_PEAK, 1) + "×",
             _pct(r, AWQ_LEFT), _pct(r, AWQ_LEFT_MIN), "; ".join(gains.get((subj, name), [])) or NA]
            for (subj, name), r in sorted(newest.items())]
    header = ["subject", "variant", "mappings searched", "input-channel peak, median",
              "output error its scales left, median", "least left", "control KLD / KLD"]
    return ["## AWQ's scale search, per subject", table(header, body),
            "AWQ multiplies each input channel of a Linear by a power of that channel's mean "
            "|x| on the calibration text (the weights scaled up, the input down) before rounding, "
            "searched per mapping (a norm or projection and the Linears it feeds) with the "
            "identity among the candidates. *Input-channel peak*: the channels' mean |x|, max "
            "over median, AWQ's premise: it protects channels that stand out. *Output error its "
            "scales left*: the mapping's output error with the best scales over that of plain "
            "rounding (the identity; 100 % = the scales bought nothing), as llm-compressor's "
            "search measured it; per mapping in the quantise stage's "
            "`llmc/awq_scale_search.csv`. Where no channel stands out the scales stay near 1 "
            "and AWQ can only match its round-to-nearest control (*control KLD / KLD* near "
            "1×, as in 'Verdicts across subjects and texts'); GPTQ, which corrects the "
            "rounding error from the inputs' covariance, does not need outliers."]


def _pct(row: dict, key: str) -> str:
    v = row["metrics"].get(key)
    return NA if v is None else f"{100 * v:.1f} %"
