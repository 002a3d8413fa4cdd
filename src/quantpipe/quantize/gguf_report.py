"""The GGUF stage's report section (quantpipe.report.sections): `make bench`, each step of the
pipeline's GGUF stage against llama.cpp's own tool, from the newest finished benchmark run named
`gguf_stage` (benchmarks/gguf_stage.py).
"""
from __future__ import annotations

from quantpipe.report.query import Selection
from quantpipe.report.sections import register
from quantpipe.report.tables import num, short, table

BENCHMARK = "gguf_stage"  # the benchmark.name tag benchmarks/gguf_stage.py writes


@register("benchmarks")
def section(sel: Selection) -> list[str]:
    bench = sel.benchmarks.get(BENCHMARK)
    if bench is None:
        return []
    p = bench["params"]
    return ["## GGUF stage vs llama.cpp's own tools (`make bench`)",
            gguf_stage(bench),
            f"Run {short(bench['run_id'])}: median of {p.get('repeats', '?')} "
            f"alternating runs each, {p.get('threads', '?')} threads, load average "
            f"{bench['tags'].get('benchmark.load_before', '?')} before. Convert: "
            "llama.cpp's converter as the pipeline runs it (writing the provenance key) "
            "vs the converter alone; same bytes = the converter's file with that key "
            "added by gguf's own copy routine. Quantise: llama_model_quantize through "
            "llama-cpp-python vs `llama-quantize`, same threads."]


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
