"""Time of the base stage's grid check (quantpipe.gridcheck) on a real base or at a real shape.

    .venv/bin/python benchmarks/gridcheck.py --folder artifacts/base/<fp>   # e.g. the default
    .venv/bin/python benchmarks/gridcheck.py --size 7b --layers 2           # 7B estimate
    .venv/bin/python benchmarks/gridcheck.py --size 7b --layers 2 paths.root=/tmp/r

--folder times the check of that folder as the base stage runs it. --size writes random FP16
weights of benchmarks/scale.py's shape (7B = Llama-2-7B: hidden 4096, FFN 11008, 32 layers,
untied output) for the embeddings, the output and only --layers layers, times the check on them
and scales the time to the whole shape by weight count: each block is read and sorted once, so
the time is linear in weights. Prints seconds, weights per second and the estimate, and logs
them as one MLflow run (tag quantpipe.kind=benchmark, benchmark.name=gridcheck) in the store
the trailing Hydra overrides choose. Run it on an otherwise idle machine (see `uptime`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def write_partial(size: str, layers: int, out: Path) -> tuple[int, int]:
    """The shape's tensors of its first `layers` layers (plus embeddings, norm, output) as
    random FP16, one file per tensor group, one tensor in RAM at a time; returns (weights
    written, weights of the whole shape)."""
    import torch
    from scale import tensor_specs

    from quantpipe.streaming import write_safetensors
    specs = tensor_specs(size)
    keep = [(n, s) for n, s in specs
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers]
    gen = torch.Generator().manual_seed(0)
    for name, shape in keep:
        write_safetensors(out / f"{name}.safetensors", [(name, "F16", list(shape))],
                          iter([torch.empty(shape, dtype=torch.float16).normal_(0, 0.02,
                                                                                generator=gen)]))
    return (sum(math.prod(s) for _, s in keep), sum(math.prod(s) for _, s in specs))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="a base folder (safetensors) to check")
    ap.add_argument("--size", default="7b", help="a shape of benchmarks/scale.py's SHAPES")
    ap.add_argument("--layers", type=int, default=2, help="layers of --size actually written")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (tracking, paths.root)")
    a = ap.parse_args(argv)
    import torch

    from quantpipe import gridcheck
    torch.set_num_threads(a.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        folder, full = a.folder, None
        if folder is None:
            folder = Path(tmp)
            written, full = write_partial(a.size, a.layers, folder)
        table = gridcheck.check_folder(folder)
    weights = table["blocks"] * gridcheck.BLOCK
    result = {"seconds": table["seconds"], "weights": weights,
              "weights_per_s": weights / table["seconds"],
              "grid_aligned_pct": table["grid_aligned_pct"]}
    if full is not None:
        result["estimate_s"] = table["seconds"] * full / written
        result["full_weights"] = full
    what = str(a.folder) if a.folder else f"{a.size} ({a.layers} layers written)"
    print(f"{what}: {result['seconds']:.1f} s for {weights / 1e6:.0f}M weights "
          f"({result['weights_per_s'] / 1e6:.0f}M/s, {a.threads} threads, load {load})"
          + (f"; whole {a.size}: about {result['estimate_s']:.0f} s" if full else ""))
    print(json.dumps(result))
    log_run(a, what, result, load)
    return result


def log_run(a, what: str, result: dict, load: str) -> None:
    import mlflow
    from hydra import compose, initialize_config_dir

    from quantpipe import PROJECT_ROOT, tracking
    from quantpipe.names import Kind, Tag
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=a.overrides)
    tracking.setup(cfg.tracking)
    tags = {Tag.KIND: Kind.BENCHMARK, "benchmark.name": "gridcheck",
            "benchmark.load_before": load, **tracking.provenance_tags()}
    with mlflow.start_run(run_name="bench gridcheck", tags=tags):
        mlflow.log_params({"subject": what, "threads": a.threads})
        mlflow.log_metrics({k: v for k, v in result.items() if v is not None})


if __name__ == "__main__":
    main()
