"""bitsandbytes INT8 (LLM.int8) and INT4 (NF4 / FP4) as Hugging Face folders.

The folders reload with `AutoModelForCausalLM.from_pretrained(folder)`. On CPU, bitsandbytes
repacks 4-bit weights for the CPU kernels on the first forward pass, after which
`save_pretrained` writes corrupted weights; so we save before any forward, then verify that the
saved folder reproduces the in-memory model's logits.
"""
from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

from quantpipe.errors import ConfigError
from quantpipe.merge import TOKENIZER_FILES
from quantpipe.quantize import register

log = logging.getLogger(__name__)
# bitsandbytes warns on every CPU load that it cannot fetch optimised kernels from the hub
# ("kernels-community"); we are offline on purpose, the built-in CPU kernels are used instead.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
RECIPE = 1  # bump when the saved folder changes for the same merged model and settings
LIBRARIES = ("transformers", "bitsandbytes", "torch")  # their versions are in the cache key
VERIFY_TOKENS = 32
VERIFY_TOLERANCE = 1e-3  # max |logit diff| between the live model and its saved folder
INT4_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _dtype(name: str):
    import torch
    return getattr(torch, name)


def load_quantised(src: Path, qconfig):
    import torch
    from transformers import AutoModelForCausalLM
    # non-quantised tensors (embeddings, norms) stay FP16, as in the FP16 baseline; the
    # warnings bitsandbytes logs on CPU are silenced above, nothing else is
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=qconfig,
                                                dtype=torch.float16, device_map=_device())


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_and_verify(model, src: Path, dst: Path) -> dict:
    """Save (before any forward!), copy the tokenizer, reload the folder and compare logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model.save_pretrained(dst, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
                        [:VERIFY_TOKENS]], device=model.device)
    with torch.no_grad():
        live = model(input_ids=ids).logits.float()
        reloaded = AutoModelForCausalLM.from_pretrained(dst, device_map=_device())
        again = reloaded(input_ids=ids).logits.float()
    diff = (live - again).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise RuntimeError(f"saved folder does not reproduce the quantised model: max |logit "
                           f"diff| {diff:.3g} > {VERIFY_TOLERANCE}")
    return {"artifact": ".", "runtime": "transformers",
            "metrics": {"save_reload_max_abs_logit_diff": diff}}


def _packed(shape, bits: int) -> int:
    return shape.fp16_bytes * bits // 16 + 2 * 2 * shape.largest  # embeddings stay FP16


def estimate_quantize(shape, bits: int) -> int:
    """Peak RSS of quantising through transformers: the FP16 weights are read and quantised as
    they load, the model is saved, then reloaded beside the live one to prove the saved folder
    matches. The FP16 shards are read memory-mapped and their pages stay in the process's RSS
    (page cache, reclaimable): benchmarks/scale.py measured 4.31 GB at 1B (2.15 GB FP16), which
    the packed copies alone (2.9 GiB) did not bound."""
    from quantpipe.memory import PYTHON_TORCH
    return PYTHON_TORCH + shape.stored_bytes + 2 * _packed(shape, bits) + 2 * 2 * shape.largest


def eval_need(shape, bits: int, **_):
    """(speed profile, weight bytes) of the evaluation, for the time estimate before any stage.
    bitsandbytes int8 / nf4 on transformers (float32 compute), benchmarks/cpu_throughput.py at
    7B width: 52 GFLOP/s, and 1.5-1.7 GB/s of FP16 bytes decoding, 1.0 GB/s once the
    benchmark's unquantised lm_head is taken out (its share of a 7B is 3 %, of the benchmark's
    2 layers a third)."""
    from quantpipe.evaluate.runtimes import Throughput
    return Throughput("transformers-bitsandbytes", 52e9, 1.0e9, "fp16"), _packed(shape, bits)


def memory_need(shape, n_ctx: int, bits: int, **_) -> list[tuple[str, int, str]]:
    """Peak RAM of this variant's stages (quantpipe.memory): quantising with bitsandbytes, then
    evaluating the packed folder on transformers."""
    from quantpipe.evaluate.transformers_runtime import HFRuntime
    packed = _packed(shape, bits)
    fix = ("run this variant on a machine with more memory (or a GPU), or drop it from the "
           "sweep; GGUF variants quantise and evaluate in far less")
    return [(f"bitsandbytes {bits}-bit quantisation", estimate_quantize(shape, bits), fix),
            (f"the evaluation of the {bits}-bit variant (transformers)",
             HFRuntime.memory_for(packed, shape, n_ctx), fix)]


def _check_int8(options: dict) -> None:
    t = options["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
        raise ConfigError("quant.backend.threshold", f"{t!r} is not a number >= 0",
                          "set the LLM.int8 outlier threshold, e.g. 6.0 (bitsandbytes' default)")


def _check_int4(options: dict) -> None:
    if options["quant_type"] not in INT4_TYPES:
        raise ConfigError("quant.backend.quant_type", f"{options['quant_type']!r} is not a "
                          "4-bit type", f"use one of: {', '.join(INT4_TYPES)}")
    if options["compute_dtype"] not in COMPUTE_DTYPES:
        raise ConfigError("quant.backend.compute_dtype", f"{options['compute_dtype']!r} is not "
                          "a compute dtype", f"use one of: {', '.join(COMPUTE_DTYPES)}")
    if not isinstance(options["double_quant"], bool):
        raise ConfigError("quant.backend.double_quant", f"{options['double_quant']!r} is not "
                          "true or false", "set quant.backend.double_quant=true or false")


@register(recipe=RECIPE, libraries=LIBRARIES, check_options=_check_int8,
          memory_need=functools.partial(memory_need, bits=8),
          eval_need=functools.partial(eval_need, bits=8))
def quantize_int8(src: Path, dst: Path, ctx, threshold: float = 6.0) -> dict:
    from transformers import BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return save_and_verify(load_quantised(Path(src), qc), Path(src), dst)


@register(recipe=RECIPE, libraries=LIBRARIES, check_options=_check_int4,
          memory_need=functools.partial(memory_need, bits=4),
          eval_need=functools.partial(eval_need, bits=4))
def quantize_int4(src: Path, dst: Path, ctx, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: str = "float32") -> dict:
    from transformers import BitsAndBytesConfig
    _check_int4({"quant_type": quant_type, "double_quant": double_quant,
                 "compute_dtype": compute_dtype})
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                            bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_compute_dtype=_dtype(compute_dtype))
    return save_and_verify(load_quantised(Path(src), qc), Path(src), dst)
