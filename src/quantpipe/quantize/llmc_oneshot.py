"""llm-compressor's oneshot on a merged FP16 folder, run in the isolated .venv-llmc (make llmc).

    .venv-llmc/bin/python src/quantpipe/quantize/llmc_oneshot.py SPEC.json

Run as a file by quantpipe.quantize.llmc (never imported by the main environment): llmcompressor
0.14.0.1 pins transformers <=5.17.0 and compressed-tensors ==0.19.0, the pipeline pins
transformers 5.23.0. So this file imports nothing from quantpipe. SPEC.json holds src, dst, the
calibration text file, samples, seq_len, threads, compute_dtype, targets, ignore, the weight
and activation quantisation arguments (compressed-tensors QuantizationArgs) and the modifiers
in order, e.g.
[{"SmoothQuantModifier": {"smoothing_strength": 0.8}}, {"GPTQModifier": {}}]. The modifiers
that quantise (GPTQ, AWQ, plain round-to-nearest) get the scheme as config_groups.

Group size: the configured one (128) where a layer's input dimension allows it, else the largest
power of two below it that divides the dimension (SmolLM2's 576-wide projections get 64,
its 1536-wide down_proj keeps 128): compressed-tensors refuses a group that does not divide.
Writes dst (compressed-tensors folder + tokenizer + recipe.yaml) and dst/llmc_result.json.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

MODIFIERS = {  # class name -> module, as llm-compressor 0.14 lays them out
    "GPTQModifier": "llmcompressor.modifiers.quantization",
    "QuantizationModifier": "llmcompressor.modifiers.quantization",
    "AWQModifier": "llmcompressor.modifiers.awq",
    "SmoothQuantModifier": "llmcompressor.modifiers.smoothquant",
}
QUANTISING = ("GPTQModifier", "QuantizationModifier", "AWQModifier")


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> a compressed-tensors regex target for every layer's."""
    generic = re.sub(r"\.\d+\.", ".N.", name)
    return "re:" + re.escape(generic).replace(r"\.N\.", r"\.\d+\.") + "$"


def group_for(in_features: int, group_size: int) -> int:
    g = group_size
    while g > 1 and in_features % g:
        g //= 2
    return g


def config_groups(model, spec: dict) -> tuple[dict, dict]:
    """config_groups for the scheme, one group per group size the layers need; and a summary."""
    import torch
    weights, acts = dict(spec["weights"]), spec.get("input_activations")
    by_size: dict[int, set[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name.endswith(i) for i in spec["ignore"]):
            continue
        g = group_for(mod.in_features, weights["group_size"]) \
            if weights.get("strategy") == "group" else 0
        by_size.setdefault(g, set()).add(layer_pattern(name))
    groups = {}
    for i, (g, targets) in enumerate(sorted(by_size.items(), reverse=True)):
        w = {**weights, "group_size": g} if g else weights
        groups[f"group_{i}"] = {"targets": sorted(targets), "weights": w,
                                "input_activations": acts}
    return groups, {str(g): sorted(t) for g, t in by_size.items()}


def calibration(tok, text: str, samples: int, seq_len: int):
    """The calibration text cut into `samples` windows of `seq_len` tokens (fewer if short)."""
    from datasets import Dataset
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len] * len(rows)})


def build_modifiers(spec: dict, groups: dict) -> list:
    import importlib
    out = []
    for entry in spec["modifiers"]:
        (name, kwargs), = entry.items()
        if name not in MODIFIERS:
            raise SystemExit(f"unknown modifier {name}; one of {sorted(MODIFIERS)}")
        cls = getattr(importlib.import_module(MODIFIERS[name]), name)
        kwargs = dict(kwargs or {})
        if name in QUANTISING:
            kwargs.update(config_groups=groups, ignore=list(spec["ignore"]))
        out.append(cls(**kwargs))
    return out


def cpu_shims(torch) -> None:
    """AWQModifier pins its cached activations before each smoothing grid search, only to speed
    up host-to-GPU copies; pin_memory() raises on a machine with no accelerator ("Cannot access
    accelerator device"), so without one the pinning is skipped (same values, no transfer)."""
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main(spec_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    spec = json.loads(Path(spec_path).read_text())
    cpu_shims(torch)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    src, dst = Path(spec["src"]), Path(spec["dst"])
    tok = AutoTokenizer.from_pretrained(src)
    # computed in spec's compute_dtype (float32 on CPU: float16 matmuls there are ~4x slower,
    # and AWQ's scale search overflowed to inf in float16 on SmolLM2's layer 11), saved in
    # float16 as stored (the kept tensors, e.g. the embedding, would double in float32)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, spec["compute_dtype"]))
    groups, summary = config_groups(model, spec)
    ds = calibration(tok, Path(spec["text_file"]).read_text(encoding="utf-8"), spec["samples"],
                     spec["seq_len"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=build_modifiers(spec, groups),
            max_seq_length=spec["seq_len"], num_calibration_samples=len(ds),
            output_dir=None)
    oneshot_s = time.perf_counter() - t0
    model.to(torch.float16)
    model.save_pretrained(dst, save_compressed=True)
    tok.save_pretrained(dst)
    (dst / "llmc_result.json").write_text(json.dumps({
        "metrics": {"oneshot_s": oneshot_s, "calib_samples": len(ds),
                    "calib_tokens": len(ds) * spec["seq_len"]},
        "group_sizes": summary}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
