"""QUANTISATION-REPORT.md from MLflow runs: a thin view, run by `make report` (pipelines/report.py).

query.py picks the runs (search_runs only), tables.py writes the markdown sections, plots.py the
PNGs (in report/ beside the markdown), recommend.py the per-scenario answer. `write_report`
puts them in order, with the sections formats and runtimes add in the slots of sections.py
(their `*_report.py` modules, found by name). The core knows metrics and tags only.
"""
from __future__ import annotations

from pathlib import Path

from quantpipe.quantize import WORKFLOW
from quantpipe.report import plots, recommend, subjects, tables
from quantpipe.report.query import Selection
from quantpipe.report.sections import parts as plugged


def markdown(sel: Selection, size_plot: str, speed_plot: str, champion: str | None) -> str:
    cpu, gpu = sel.variants, sel.gpu
    scope = (f"sweep `{sel.sweep['run_id']}`" if sel.sweep
             else "the newest finished run of each variant (no sweep run found)")
    if sel.sweep and sel.sweep.get("also"):
        scope = (f"sweeps {', '.join(f'`{i}`' for i in [sel.sweep['run_id'], *sel.sweep['also']])}"
                 " (the newest run of each variant)")
    parts = ["# Quantisation report",
             f"Generated from MLflow by `make report`; runs: {scope}. Every number below is a "
             "metric, parameter, tag or start/end time of the run named beside it.",
             "## Recommendation"]
    for scenario, row, reason in (recommend.recommendations(cpu) + plugged("recommend", sel)
                                  + recommend.gpu_serving(cpu, gpu) + plugged("serving", sel)):
        name = f"**{row['name']}** (run {tables.short(row['run_id'])})" if row else "none"
        parts.append(f"- **{scenario}**: {name}: {reason}.")
    parts.append(f"- **Fine-tune**: {recommend.finetune_note(cpu)}.")
    for note in subjects.ranking_notes(sel.everything):
        parts.append(f"- **Subjects**: {note} (see \"Verdicts across subjects and texts\").")
    if champion:
        parts.append(f"- **Registry**: {champion}.")
    parts += ["## Comparison (CPU)", tables.comparison(cpu),
              "Quality is measured against the merged FP16 model on the same token ids "
              "(llama.cpp's perplexity protocol; KLD over the FP16 top-k tokens, in nats). "
              "95 % intervals: a paired bootstrap over the evaluation windows (the variant and "
              "FP16 resampled together). The pairs of variants that cannot be told apart on "
              "this text: the 95 % interval of their difference holds 0, bootstrapped over the "
              "windows both scored (each run's per-window means); for runs logged before that "
              "record, marked (overlap), their own intervals overlap, a conservative reading "
              "under which a listed pair may still differ:",
              *tables.indistinguishable(cpu),
              *plugged("comparison", sel),
              "## Verdicts across subjects and texts",
              "Each calibrated variant against its round-to-nearest control and the best "
              "uncalibrated variant of its group, on every base model (subject) and evaluation "
              "text it was scored on (the newest finished run of each; `builtin:ood` is text "
              "from another domain than the calibration set). \"beats\" = a paired test: "
              "the 95 % interval of the KLD difference (the two variants' per-window means on "
              "the same windows, resampled together) lies wholly below 0. Runs logged before "
              "the per-window record fall back to their own intervals lying apart (\"overlap "
              "test\"), which misses real but small differences.",
              subjects.section(sel.everything, "; ".join(plugged("verdicts.hint", sel))),
              "## Fine-tune retention and generation agreement",
              tables.finetune_and_generation(cpu),
              "Fine-tune kept % = 100 · (PPL_base − PPL_variant) / (PPL_base − PPL_FP16 merged), "
              "with PPL_base the model before the adapter was merged, scored on the same token "
              "ids: 100 keeps the whole gain, 0 is back to the base model, below 0 is worse than "
              "before fine-tuning. Generation: greedy continuations of fixed prompts cut from "
              "the eval text against FP16's own (prefix match % = share of prompts whose first "
              "eval.generation.match_k tokens equal FP16's); task columns: exact match and "
              "ROUGE-L against the references of eval.tasks_file, when one was given."]
    parts += plugged("speed", sel)
    overlap = tables.overlapping(cpu)
    if overlap:
        parts.append("**Speed caution**: these runs overlapped in time (a parallel launcher), so "
                     "their speed and memory figures were measured under contention: "
                     + ", ".join(f"{a}/{b}" for a, b in overlap) + ".")
    parts += plugged("cpu", sel)
    if gpu:
        parts += ["## Comparison (GPU)", tables.gpu_comparison(gpu), " ".join([
                  "GPU runs measure speed and memory on random weights of the named shape; "
                  "quality comes from the CPU runs. transformers rows: eager HF generate, batch 1 "
                  "(launch-bound); llama.cpp rows: llama-bench on llama.cpp's CUDA build, every "
                  "layer offloaded, flash attention, tg from an empty context. peak GPU MB: "
                  "torch's allocator (transformers) or the process (llama.cpp); GPU process MB: "
                  "the process's own memory from NVML, CUDA context included, for both.",
                  *plugged("gpu.note", sel)])]
    if sel.deploy:
        parts += ["## Deployment (OpenAI-compatible servers, `make smoke`)",
                  tables.deployment(sel.deploy),
                  "The newest smoke/load-test run of each served format, server and concurrency "
                  "(`make smoke QUANT=<variant> [SERVER=vllm] ARGS=\"--concurrency 1 4 8\"`). "
                  "Latency includes queueing: llama-cpp-python's server answers one request at "
                  "a time; vLLM batches the requests in flight. Both on this CPU."]
    parts += plugged("benchmarks", sel)
    if sel.scale:
        parts += ["## Real-size models (`benchmarks/scale.py --pipeline`)", tables.scale(sel.scale),
                  "Synthetic Llama shapes (random FP16 weights and a random rank-16 LoRA on "
                  "q/k/v/o) through the real pipeline on this machine: time and peak RSS of each "
                  "stage as its MLflow run logged them (the process's own high-water mark, or "
                  "its largest child's: converter, evaluation worker). Quality figures of random "
                  "weights say only that the evaluation ran; the real-weight figures are above."]
    front = ", ".join(r["name"] for r in recommend.pareto_front(cpu)) or "none"
    parts += ["## Plots", f"![size vs ΔPPL]({size_plot})",
              f"Pareto front (no other variant is both smaller and closer to FP16): {front}.",
              f"![decode tokens/s]({speed_plot})",
              f"## Workflow: {WORKFLOW}", tables.workflow(cpu), *plugged("formats", sel),
              "## Provenance", tables.provenance(sel)]
    return "\n\n".join(parts) + "\n"


def write_report(sel: Selection, out: Path, champion: str | None = None) -> Path:
    """Write the markdown to `out` and its plots to `out.parent/report/`."""
    out = Path(out)
    figs = out.parent / "report"
    sel.figures = figs
    front = recommend.pareto_front(sel.variants)
    size = plots.size_vs_delta_ppl(sel.variants, front, figs / "size_vs_delta_ppl.png")
    speed = plots.decode_speed(sel.variants, sel.gpu, figs / "decode_tok_s.png")
    text = markdown(sel, size.relative_to(out.parent).as_posix(),
                    speed.relative_to(out.parent).as_posix(), champion)
    out.write_text(text, encoding="utf-8")
    return out
