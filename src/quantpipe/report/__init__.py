"""QUANTISATION-REPORT.md from MLflow runs: a thin view, run by `make report` (pipelines/report.py).

query.py picks the runs (search_runs only), tables.py writes the markdown sections, plots.py the
PNGs (in report/ beside the markdown), recommend.py the per-scenario answer. `write_report`
puts them in order.
"""
from __future__ import annotations

from pathlib import Path

from quantpipe.report import plots, recommend, subjects, tables, tasks, vllm
from quantpipe.report.query import Selection


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
    for scenario, row, reason in (recommend.recommendations(cpu, gpu) + tasks.recommendation(cpu)
                                  + vllm.recommendation(cpu)):
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
              "FP16 resampled together). Variants whose intervals overlap cannot be told apart "
              "on this text (a conservative reading: a pair not named below differs):",
              *tables.indistinguishable(cpu),
              *tasks.section(cpu),
              "## Verdicts across subjects and texts",
              "Each calibrated variant against its round-to-nearest control and the best "
              "uncalibrated variant of its group, on every base model (subject) and evaluation "
              "text it was scored on (the newest finished run of each; `builtin:ood` is text "
              "from another domain than the calibration set). \"beats\" = the KLD 95 % "
              "intervals lie apart.",
              subjects.section(sel.everything),
              "## Fine-tune retention and generation agreement",
              tables.finetune_and_generation(cpu),
              "Fine-tune kept % = 100 · (PPL_base − PPL_variant) / (PPL_base − PPL_FP16 merged), "
              "with PPL_base the model before the adapter was merged, scored on the same token "
              "ids: 100 keeps the whole gain, 0 is back to the base model, below 0 is worse than "
              "before fine-tuning. Generation: greedy continuations of fixed prompts cut from "
              "the eval text against FP16's own (prefix match % = share of prompts whose first "
              "eval.generation.match_k tokens equal FP16's); task columns: exact match and "
              "ROUGE-L against the references of eval.tasks_file, when one was given."]
    if no_speed := [r["name"] for r in cpu if r["tags"].get("eval.speed")]:
        parts.append("**No CPU speed for** " + ", ".join(no_speed) + ": transformers "
                     "decompresses these compressed-tensors folders to fp16 on CPU, so their "
                     "tokens/s (logged as *_decompressed) are not the format's speed; vLLM's "
                     "kernels give it (section \"vLLM (CPU build)\", where it ran). Their "
                     "quality numbers are the format's.")
    overlap = tables.overlapping(cpu)
    if overlap:
        parts.append("**Speed caution**: these runs overlapped in time (a parallel launcher), so "
                     "their speed and memory figures were measured under contention: "
                     + ", ".join(f"{a}/{b}" for a, b in overlap) + ".")
    parts += vllm.section(cpu)
    if gpu:
        parts += ["## Comparison (GPU)", tables.gpu_comparison(gpu),
                  "GPU runs measure speed and memory on random weights of the named shape; "
                  "quality comes from the CPU runs. transformers rows: eager HF generate, batch 1 "
                  "(launch-bound); llama.cpp rows: llama-bench on llama.cpp's CUDA build, every "
                  "layer offloaded, flash attention, tg from an empty context. peak GPU MB: "
                  "torch's allocator (transformers) or the process (llama.cpp); GPU process MB: "
                  "the process's own memory from NVML, CUDA context included, for both. "
                  "GPTQ/AWQ/W8A8 have no GPU row: their int4/int8 kernels come with vLLM, "
                  "which the GPU machine's image does not have."]
    if sel.deploy:
        parts += ["## Deployment (OpenAI-compatible servers, `make smoke`)",
                  tables.deployment(sel.deploy),
                  "The newest smoke/load-test run of each served format, server and concurrency "
                  "(`make smoke QUANT=<variant> [SERVER=vllm] ARGS=\"--concurrency 1 4 8\"`). "
                  "Latency includes queueing: llama-cpp-python's server answers one request at "
                  "a time; vLLM batches the requests in flight. Both on this CPU."]
    if sel.bench:
        p = sel.bench["params"]
        parts += ["## GGUF stage vs llama.cpp's own tools (`make bench`)",
                  tables.gguf_stage(sel.bench),
                  f"Run {tables.short(sel.bench['run_id'])}: median of {p.get('repeats', '?')} "
                  f"alternating runs each, {p.get('threads', '?')} threads, load average "
                  f"{sel.bench['tags'].get('benchmark.load_before', '?')} before. Convert: "
                  "llama.cpp's converter as the pipeline runs it (writing the provenance key) "
                  "vs the converter alone; same bytes = the converter's file with that key "
                  "added by gguf's own copy routine. Quantise: llama_model_quantize through "
                  "llama-cpp-python vs `llama-quantize`, same threads."]
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
              "## Workflow: FP16 -> INT8 -> INT4 -> GGUF", tables.workflow(cpu),
              "## Static vs dynamic quantisation", tables.static_vs_dynamic(cpu),
              "## Tuned vs imatrix vs plain (GGUF at one size)", tables.tuned_vs_imatrix(cpu),
              "## Provenance", tables.provenance(sel)]
    return "\n\n".join(parts) + "\n"


def write_report(sel: Selection, out: Path, champion: str | None = None) -> Path:
    """Write the markdown to `out` and its plots to `out.parent/report/`."""
    out = Path(out)
    figs = out.parent / "report"
    front = recommend.pareto_front(sel.variants)
    size = plots.size_vs_delta_ppl(sel.variants, front, figs / "size_vs_delta_ppl.png")
    speed = plots.decode_speed(sel.variants, sel.gpu, figs / "decode_tok_s.png")
    text = markdown(sel, size.relative_to(out.parent).as_posix(),
                    speed.relative_to(out.parent).as_posix(), champion)
    out.write_text(text, encoding="utf-8")
    return out
