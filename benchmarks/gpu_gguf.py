"""GGUF on CUDA for the GPU bench: llama.cpp built there, every layer offloaded, llama-bench.

    (called by benchmarks/gpu_bench.py --llama-src .devcarry/llama.cpp.tar.gz --variants gguf_q4_0,...)

The lent GPU machine has nvcc, cmake and ninja but no package registry, so the llama.cpp source
travels as the trimmed tarball benchmarks/gpu_carry.sh packs (the llama-cpp-python 0.3.36 sdist's
vendor/llama.cpp: the same llama.cpp the CPU pipeline runs). It is built once per machine with
-DGGML_CUDA=ON for sm_90 only (H100/H200) into a work folder that survives between calls on a
warm machine. Per shape, the random-weight HF checkpoint gpu_bench.py built is converted by that
source's own convert_hf_to_gguf.py (SmolLM2's tokenizer, carried; the converter pads the vocabulary
with [PAD] tokens up to a Llama-3 shape's 128256, so embedding and output matrices have the real
shape) to F16, quantised by llama-quantize, and measured by llama-bench: -ngl 99 (all layers on
the GPU), flash attention on, pp<prompt> and tg<new> tokens/s, median-free mean of -r repeats
as llama-bench reports it (samples kept for min/max). GPU memory: the peak that NVML reports
for the llama-bench process, sampled every 20 ms (CUDA context included, unlike torch's
allocator counter in the HF rows; both are recorded for the HF rows too).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

GGUF_TYPES = {"gguf_f16": "F16", "gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0", "gguf_q4_k_m": "Q4_K_M"}
TOOLS = ("llama-bench", "llama-quantize")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def build_llama(src_tar: Path, work: Path, jobs: int) -> tuple[Path, Path, float]:
    """(bin dir, source dir, build seconds) of a CUDA llama.cpp built from `src_tar` (kept)."""
    src, build = work / "llama.cpp", work / "llama-build"
    bindir = build / "bin"
    if all((bindir / t).is_file() for t in TOOLS):
        return bindir, src, 0.0
    t0 = time.perf_counter()
    if not src.is_dir():
        with tarfile.open(src_tar) as tf:
            tf.extractall(work, filter="data")
    subprocess.run(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DBUILD_SHARED_LIBS=OFF",
                    "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "--target", *TOOLS, "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL)
    return bindir, src, time.perf_counter() - t0


class GpuMemSampler:
    """Peak GPU memory of one process (NVML, every 20 ms); None where NVML cannot tell."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, None, threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.dev = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: leave the peak unknown rather than guess
            self.nvml = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.dev):
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.peak = max(self.peak or 0, p.usedGpuMemory)
            except Exception:
                pass
            time.sleep(0.02)

    def __enter__(self):
        if self.nvml:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.nvml:
            self.thread.join()

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20


def convert(src_dir: Path, folder: Path, tokenizer: Path, out: Path) -> float:
    """HF folder -> F16 GGUF with the carried llama.cpp's converter; returns seconds."""
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, folder / name)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, src_dir / "convert_hf_to_gguf.py", "--outtype", "f16",
                        "--outfile", out, folder], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def quantize(bindir: Path, f16: Path, out: Path, type_: str, threads: int) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([bindir / "llama-quantize", f16, out, type_, str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {type_} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def bench(bindir: Path, gguf: Path, prompt: int, new: int, repeats: int) -> dict:
    """llama-bench, every layer on the GPU: pp and tg tokens/s plus the process's GPU peak."""
    cmd = [bindir / "llama-bench", "-m", gguf, "-ngl", "99", "-fa", "1", "-p", str(prompt),
           "-n", str(new), "-r", str(repeats), "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with GpuMemSampler(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}):\n{err[-3000:]}")
    tests = json.loads(out)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    m = {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"],
         "decode_tok_s_min": min(tg["samples_ts"]), "decode_tok_s_max": max(tg["samples_ts"]),
         "decode_tok_s_stddev": tg["stddev_ts"], "prefill_tok_s_stddev": pp["stddev_ts"],
         # llama-bench times pp as a whole prompt: the time to the first token of a prompt of
         # that length, as the HF rows measure TTFT
         "ttft_ms": 1000 * prompt / pp["avg_ts"],
         "size_mb": pp["model_size"] / 2**20}
    if mem.peak_mb is not None:
        m["peak_gpu_mb"] = m["gpu_process_peak_mb"] = mem.peak_mb
    build = {k: pp.get(k) for k in ("build_commit", "build_number", "backends", "gpu_info",
                                    "n_gpu_layers", "flash_attn", "n_batch", "n_ubatch", "type_k")}
    return {"metrics": m, "llama_bench": build}


def gguf_variants(folder: Path, shape: str, variants: list[str], args, work: Path,
                  bindir: Path, src_dir: Path) -> dict[str, dict]:
    """{variant: {"metrics", "llama_bench", "quant"}} for the GGUF variants of one shape."""
    gdir = work / f"gguf-{shape}"
    gdir.mkdir(parents=True, exist_ok=True)
    f16 = gdir / "model-f16.gguf"
    convert_s = None
    if not f16.is_file():
        tmp = gdir / "model-f16.gguf.tmp"
        convert_s = convert(src_dir, folder, args.tokenizer, tmp)
        tmp.replace(f16)
    threads = os.cpu_count() or 1
    out = {}
    for v in variants:
        type_ = GGUF_TYPES[v]
        path = f16 if type_ == "F16" else gdir / f"model-{type_.lower()}.gguf"
        quantize_s = None
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            quantize_s = quantize(bindir, f16, tmp, type_, threads)
            tmp.replace(path)
        r = bench(bindir, path, args.prompt_tokens, args.new_tokens, max(args.repeats, 5))
        r["metrics"]["file_size_mb"] = path.stat().st_size / 2**20
        if quantize_s is not None:
            r["metrics"]["quantize_s"] = quantize_s
        if convert_s is not None:
            r["metrics"]["convert_s"] = convert_s
        r["quant"] = {"name": v, "family": "gguf", "method": "dynamic", "type": type_.lower(),
                      "runtime": "llama.cpp", "scheme": f"llama.cpp {type_} (CUDA, all layers)"}
        out[v] = r
    return out
