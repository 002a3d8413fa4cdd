"""bitsandbytes INT8 (LLM.int8) and INT4 (NF4 / FP4) as Hugging Face folders.

The folders reload with `AutoModelForCausalLM.from_pretrained(folder)`. On CPU, bitsandbytes
repacks 4-bit weights for the CPU kernels on the first forward pass, after which
`save_pretrained` writes corrupted weights; so we save before any forward, then verify that the
saved folder reproduces the in-memory model's logits.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from quantpipe.merge import TOKENIZER_FILES

log = logging.getLogger(__name__)
# bitsandbytes warns on every CPU load that it cannot fetch optimised kernels from the hub
# ("kernels-community"); we are offline on purpose, the built-in CPU kernels are used instead.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
VERIFY_TOKENS = 32
VERIFY_TOLERANCE = 1e-3  # max |logit diff| between the live model and its saved folder


def _dtype(name: str):
    import torch
    try:
        return getattr(torch, name)
    except AttributeError:
        from quantpipe.errors import ConfigError
        raise ConfigError("quant.backend.compute_dtype", f"{name} is not a torch dtype",
                          "use float32, float16 or bfloat16") from None


def load_quantised(src: Path, qconfig):
    import torch
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # non-quantised tensors (embeddings, norms) stay FP16, as in the FP16 baseline
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
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = model(input_ids=ids).logits.float()
        reloaded = AutoModelForCausalLM.from_pretrained(dst, device_map=_device())
        again = reloaded(input_ids=ids).logits.float()
    diff = (live - again).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise RuntimeError(f"saved folder does not reproduce the quantised model: max |logit "
                           f"diff| {diff:.3g} > {VERIFY_TOLERANCE}")
    return {"artifact": ".", "runtime": "transformers",
            "metrics": {"save_reload_max_abs_logit_diff": diff}}


def quantize_int8(src: Path, dst: Path, ctx, threshold: float = 6.0) -> dict:
    from transformers import BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return save_and_verify(load_quantised(Path(src), qc), Path(src), dst)


def quantize_int4(src: Path, dst: Path, ctx, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: str = "float32") -> dict:
    from transformers import BitsAndBytesConfig
    if quant_type not in ("nf4", "fp4"):
        from quantpipe.errors import ConfigError
        raise ConfigError("quant.backend.quant_type", f"{quant_type!r} is not a 4-bit type",
                          "use nf4 or fp4")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                            bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_compute_dtype=_dtype(compute_dtype))
    return save_and_verify(load_quantised(Path(src), qc), Path(src), dst)
