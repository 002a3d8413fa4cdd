"""GPU speed and memory of fp16 / bitsandbytes int8 (LLM.int8) / int4 (NF4) and GGUF on llama.cpp's
CUDA build (f16, q8_0, q4_0, q4_k_m; benchmarks/gpu_gguf.py) on real model shapes.

    make gpu-bench                      # with CUDA: runs; without: prints what to run on a GPU box
    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out gpu-bench.json [--shapes smollm2-135m]
        [--llama-src .devcarry/llama.cpp.tar.gz --tokenizer .devcarry/tokenizer]   # GGUF rows
    make gpu-import FILE=gpu-bench.json # the records become MLflow runs (pipelines/gpu_import.py)

Speed and memory depend on a model's shape, not on its trained values, so each shape is built
from a LlamaConfig with random weights directly on the GPU in fp16 (no download, nothing large
to carry), saved once as safetensors to local disk (RAM-backed /dev/shm when it has room), and
loaded back per variant with `from_pretrained`, as the pipeline loads its folders: plain fp16,
`BitsAndBytesConfig(load_in_8bit=True)` and NF4 with fp16 compute and double quantisation.
Quality stays a CPU measurement on the real weights (make pipeline).

Per variant (peak GPU memory reset before each): load_s (from_pretrained of the fp16 folder,
quantisation included; the folder is in the page cache, so this is conversion and host-to-GPU
time, not disk speed; the first bitsandbytes variant also pays the library's CUDA setup, the
likely reason smollm2-135m int8 loaded slower than llama-3.2-1b int8 on the H100), size_mb
(model.get_memory_footprint(): weights memory), peak_gpu_mb
(torch.cuda.max_memory_allocated over load + speed runs), and TTFT / prefill / decode tokens/s
from quantpipe.evaluate.worker.measure_speed, the CPU pipeline's own protocol: greedy, batch 1,
KV cache, warm-up then the median of repeats, on HFRuntime's prefill/step. The prompt is random
token ids (a random model has no text to prefer). Caveat: LLM.int8 decomposes outlier
activations (> 6.0) into an fp16 matmul; random weights make almost none, so int8 timings here
are its outlier-free best case.

Output: a JSON list of records {shape, variant, shape_config, quant, protocol, hardware, metrics,
...}, rewritten after every variant so a run cut short keeps what it measured. Without CUDA the
script prints instructions, unless --cpu (a smoke test: use --shapes tiny; int8/int4 run on
bitsandbytes' CPU kernels, fp32 compute as HFRuntime does on CPU).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

from quantpipe.names import Metric

# LlamaConfig fields of each shape (from the published config.json files; rope settings and
# context length do not change the cost of a 256-token run, so they are left at defaults)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False),
}
DEFAULT_SHAPES = "smollm2-135m,llama-3.2-1b,llama-3.1-8b"
HF_VARIANTS = ("fp16", "int8", "int4")
GGUF_VARIANTS = ("gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m")
# the compressed-tensors formats on gemlite's Triton kernels (benchmarks/gpu_gemlite.py)
GEMLITE_VARIANTS = ("w4a16_gemlite", "w8a8_dynamic_gemlite")
VARIANTS = HF_VARIANTS + GGUF_VARIANTS + GEMLITE_VARIANTS
QUANT = {  # what each variant is, as the importer tags it (same names as conf/quant/*.yaml)
    "fp16": {"name": "fp16", "family": "hf", "method": "none", "bits": 16,
             "runtime": "transformers"},
    "int8": {"name": "int8", "family": "hf", "method": "dynamic", "bits": 8,
             "scheme": "bitsandbytes LLM.int8", "threshold": 6.0, "runtime": "transformers"},
    "int4": {"name": "int4", "family": "hf", "method": "dynamic", "bits": 4,
             "scheme": "bitsandbytes nf4", "double_quant": True, "runtime": "transformers"},
}

INSTRUCTIONS = """\
No CUDA GPU for {python} (torch: {why}); nothing was measured.
On a machine with an NVIDIA GPU (24 GB or more for the 8B shape; otherwise add
--shapes smollm2-135m,llama-3.2-1b), with Python 3.11+, torch (CUDA) and transformers 5:
  1. copy this repository there (no weights needed: the models are random weights of real shapes)
  2. pip install bitsandbytes==0.50.2 omegaconf==2.3.1
  3. PYTHONPATH=src python3 benchmarks/gpu_bench.py --out gpu-bench.json --label <machine name>
     (about 5 minutes on an H100; GPU_PYTHON=python3 make gpu-bench there does the same)
Bring back the file gpu-bench.json, then here:
  cp gpu-bench.json benchmarks/results/gpu-<machine>-<yyyy-mm-dd>.json
  make gpu-import FILE=benchmarks/results/gpu-<machine>-<yyyy-mm-dd>.json
"""


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def gemlite_module():
    """benchmarks/gpu_gemlite.py, whether this file runs as a script or is imported."""
    try:
        from benchmarks import gpu_gemlite
    except ImportError:
        import gpu_gemlite
    return gpu_gemlite


def gguf_module():
    """benchmarks/gpu_gguf.py, whether this file runs as a script or is imported by the tests."""
    try:
        from benchmarks import gpu_gguf
    except ImportError:
        import gpu_gguf
    return gpu_gguf


def hardware(torch) -> dict:
    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "platform": platform.platform(terse=True), "python": platform.python_version(),
          **{lib: version(lib) for lib in ("torch", "transformers", "bitsandbytes", "accelerate")}}
    if not torch.cuda.is_available():
        return {"gpu": "none", **hw}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"gpu": props.name, "gpu_memory_mb": round(props.total_memory / 2**20),
            "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "driver": driver or "unknown", **hw}


def work_dir(need_bytes: int) -> Path:
    """RAM-backed /dev/shm when it holds the checkpoint twice over, else the temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * need_bytes:
        return Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu-bench-"))


def build_checkpoint(torch, shape: str, device: str, dtype) -> tuple[Path, dict]:
    """Random-weight model of `shape`, initialised on `device`, saved as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise on the GPU: an 8B fp16 model is 15 GiB of host RAM
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    fp16_bytes = n_params * 2
    out = work_dir(fp16_bytes)
    model.save_pretrained(out)
    info = {"n_params": n_params, "fp16_size_mb": fp16_bytes / 2**20,
            "build_s": time.perf_counter() - t0}
    del model
    free(torch)
    return out, info


def free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quant_config(torch, variant: str, compute_dtype):
    from transformers import BitsAndBytesConfig
    if variant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=QUANT["int8"]["threshold"])
    if variant == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return None


def make_runtime(model):
    """HFRuntime's prefill/step/sync (the pipeline's speed protocol) over a model in memory."""
    from quantpipe.evaluate.transformers_runtime import HFRuntime

    class ModelRuntime(HFRuntime):
        def __init__(self, model):  # noqa: D107  (HFRuntime's own __init__ loads from a folder)
            import torch
            self.torch, self.model, self.past = torch, model.eval(), None
            self.device = model.device.type

    return ModelRuntime(model)


def measure_variant(torch, folder: Path, variant: str, dtype, device: str, prompt: list[int],
                    args) -> dict:
    from transformers import AutoModelForCausalLM

    from quantpipe.evaluate.worker import measure_speed
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = gguf_module().GpuMemSampler(os.getpid()).__enter__() if cuda else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device,
            quantization_config=quant_config(torch, variant, dtype))
    if cuda:
        torch.cuda.synchronize()
    metrics = {Metric.LOAD_S: time.perf_counter() - t0,
               Metric.SIZE_MB: model.get_memory_footprint() / 2**20}
    if cuda:  # weights plus quantisation state (absmax blocks etc.) as actually allocated
        metrics["gpu_alloc_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
    metrics.update(measure_speed(make_runtime(model), prompt, args.new_tokens, args.warmup,
                                 args.repeats))
    if cuda:
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        sampler.__exit__()
        if sampler.peak_mb is not None:  # the whole process, CUDA context included (= GGUF rows)
            metrics["gpu_process_peak_mb"] = sampler.peak_mb
    del model
    free(torch)
    return metrics


def write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(VARIANTS)} (default: the HF ones, and the GGUF "
                   "ones when --llama-src is given)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="", help="name of the machine (kept in each record)")
    p.add_argument("--git-sha", default="", help="commit of this code (where .git is absent)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new variant after this long (a lease's time limit)")
    p.add_argument("--cpu", action="store_true", help="run without CUDA (smoke test, tiny shape)")
    p.add_argument("--llama-src", type=Path, default=None,
                   help="trimmed llama.cpp tarball (benchmarks/gpu_carry.sh) for the GGUF variants")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with SmolLM2's tokenizer files (the GGUF converter needs one)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantpipe-gpu",
                   help="llama.cpp build and GGUF files, kept between calls on one machine")
    p.add_argument("--resume", action="store_true",
                   help="keep the records already in --out and measure only the rest")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.llama_src else HF_VARIANTS)
    for name, allowed in (("shapes", SHAPES), ("variants", VARIANTS)):
        bad = [x for x in getattr(args, name).split(",") if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if any(v in GGUF_VARIANTS for v in args.variants.split(",")) and not (
            args.llama_src and args.tokenizer):
        p.error("GGUF variants need --llama-src and --tokenizer (bash benchmarks/gpu_carry.sh)")
    return args


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(shape: str, variant: str, info: dict, quant: dict, metrics: dict, common: dict,
           **extra) -> dict:
    metrics.update({"fp16_size_mb": info["fp16_size_mb"],
                    "compression": info["fp16_size_mb"] / metrics["size_mb"],
                    "bits_per_weight": 8 * metrics["size_mb"] * 2**20 / info["n_params"]})
    return {"shape": shape, "variant": variant,
            "shape_config": {**SHAPES[shape], "n_params": info["n_params"]}, "quant": quant,
            **common, "build_s": info["build_s"], **extra,
            "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "metrics": metrics}


def print_row(shape: str, variant: str, m: dict) -> None:
    load = f"load {m['load_s']:6.2f} s" if "load_s" in m else "load      — "
    print(f"{shape:>13} {variant:>11}: {load} | weights {m['size_mb']:8.1f} MiB | peak "
          f"{m.get('peak_gpu_mb', float('nan')):8.1f} MiB (process "
          f"{m.get('gpu_process_peak_mb', float('nan')):8.1f}) | prefill "
          f"{m['prefill_tok_s']:8.0f} tok/s | decode {m['decode_tok_s']:7.1f} tok/s "
          f"[{m['decode_tok_s_min']:.1f}-{m['decode_tok_s_max']:.1f}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        cuda, why = torch.cuda.is_available(), "torch.cuda.is_available() is False"
    except ImportError as e:
        cuda, why = False, f"not importable ({e})"
    if not cuda and not args.cpu:
        print(INSTRUCTIONS.format(python=sys.executable, why=why))
        return 0
    device = "cuda" if cuda else "cpu"
    import transformers
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes logs a cast warning on every int8 matmul with fp32 inputs (the CPU path)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # fp16 on the GPU; fp32 compute on CPU, as HFRuntime does (CPU half matmuls are slow)
    dtype = torch.float16 if cuda else torch.float32
    hw = hardware(torch)
    protocol = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "warmup": args.warmup, "repeats": args.repeats, "batch": 1, "greedy": True,
                "kv_cache": True, "dtype": str(dtype).removeprefix("torch."),
                "prompt": "random token ids, seed 0"}
    common = {"hardware": hw, "protocol": protocol, "label": args.label,
              "git_sha": args.git_sha or git_sha(), "script": "benchmarks/gpu_bench.py"}
    print(f"{hw['gpu']} | torch {hw['torch']} CUDA {hw.get('cuda')} | transformers "
          f"{hw['transformers']} | bitsandbytes {hw['bitsandbytes']}", flush=True)
    t_start, failed = time.perf_counter(), []

    def past_limit(shape: str, variant: str) -> bool:
        """Past --max-minutes: the variant is skipped and counted as not measured."""
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"{shape} {variant}: skipped, past --max-minutes", flush=True)
            failed.append(f"{shape}/{variant}")
            return True
        return False
    records = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else []
    done = {(r["shape"], r["variant"]) for r in records}
    variants = args.variants.split(",")
    llama = None
    if any(v in GGUF_VARIANTS for v in variants):
        args.work.mkdir(parents=True, exist_ok=True)
        bindir, src_dir, build_s = gguf_module().build_llama(args.llama_src, args.work, os.cpu_count() or 4)
        llama = (bindir, src_dir)
        print(f"llama.cpp (CUDA, sm_90) ready in {bindir}: built in {build_s:.0f} s", flush=True)
    for shape in args.shapes.split(","):
        todo = [v for v in variants if (shape, v) not in done]
        if not todo:
            continue
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"{shape}: skipped, past --max-minutes", flush=True)
            failed += [f"{shape}/{v}" for v in todo]
            continue
        folder, info = build_checkpoint(torch, shape, device, dtype)
        print(f"{shape}: {info['n_params'] / 1e6:.1f} M params, built and saved in "
              f"{info['build_s']:.1f} s", flush=True)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, SHAPES[shape]["vocab_size"], (args.prompt_tokens,),
                               generator=gen).tolist()
        try:
            for variant in [v for v in todo if v in HF_VARIANTS]:
                if past_limit(shape, variant):
                    continue
                try:
                    m = measure_variant(torch, folder, variant, dtype, device, prompt, args)
                except Exception as e:  # one OOM or kernel error must not lose the other records
                    print(f"{shape} {variant}: FAILED {type(e).__name__}: {e}", flush=True)
                    failed.append(f"{shape}/{variant}")
                    free(torch)
                    continue
                quant = dict(QUANT[variant])
                if variant == "int4":
                    quant["compute_dtype"] = protocol["dtype"]
                records.append(record(shape, variant, info, quant, m, common))
                write_json(args.out, records)
                print_row(shape, variant, m)
            for variant in [v for v in todo if v in GEMLITE_VARIANTS]:
                if past_limit(shape, variant):
                    continue
                from quantpipe.evaluate.worker import measure_speed
                g = gemlite_module()
                try:
                    r = g.measure(torch, folder, variant, dtype, device, prompt, args,
                                  SHAPES[shape], make_runtime, measure_speed)
                except Exception as e:  # e.g. a Triton that cannot build the kernel
                    print(f"{shape} {variant}: FAILED {type(e).__name__}: {e}", flush=True)
                    failed.append(f"{shape}/{variant}")
                    free(torch)
                    continue
                records.append(record(shape, variant, info, dict(g.QUANT[variant]), r["metrics"],
                                      common, gemlite=r["gemlite"]))
                write_json(args.out, records)
                print_row(shape, variant, r["metrics"])
                print(f"{shape} {variant}: kernel max rel err {r['metrics']['kernel_max_rel_err']:.2e}"
                      f"; one layer's batch-1 matmuls {r['metrics']['matmul_us_layer']:.1f} us vs "
                      f"fp16 {r['metrics']['matmul_us_layer_fp16']:.1f} us "
                      f"({r['metrics']['matmul_speedup_vs_fp16']:.2f}x)", flush=True)
            if gguf := [v for v in todo if v in GGUF_VARIANTS]:
                try:
                    res = gguf_module().gguf_variants(folder, shape, gguf, args, args.work, *llama)
                except Exception as e:
                    print(f"{shape} GGUF: FAILED {type(e).__name__}: {e}", flush=True)
                    failed += [f"{shape}/{v}" for v in gguf]
                    res = {}
                for variant, r in res.items():
                    gproto = {**protocol, "dtype": r["quant"]["type"], "warmup": 1,
                              "repeats": max(args.repeats, 5),
                              "prompt": "llama-bench pp/tg: random tokens, tg from an empty "
                                        "context, all layers on the GPU, flash attention"}
                    records.append(record(shape, variant, info, r["quant"], r["metrics"],
                                          {**common, "protocol": gproto},
                                          llama_bench=r["llama_bench"]))
                    write_json(args.out, records)
                    print_row(shape, variant, r["metrics"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(args.work / f"gguf-{shape}", ignore_errors=True)
    print(f"{len(records)} records -> {args.out} in {time.perf_counter() - t_start:.0f} s"
          + (f"; not measured: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
