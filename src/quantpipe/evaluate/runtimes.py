"""Evaluation runtimes: a registry of the classes that run a variant's artefact, so every format
is evaluated the same way and the evaluator names none. Each runtime is one module
`quantpipe/evaluate/<name>_runtime.py` whose class is registered with `@register`; the modules
are found by that name pattern the first time a runtime is asked for.

A registered class holds (a missing required part raises TypeError when its module is imported):

    name              what a backend's result names as its `runtime`                  required
    libraries         distributions whose versions enter the evaluation's cache key     required
    throughput        Throughput: its speed on the reference machine (time estimates)  required
    memory_for(weight_bytes, shape, n_ctx, float32) -> peak RSS bytes of a worker      required
    open(path, threads, n_ctx, float32) -> the loaded model, which has
        window_logits(window, first) -> [n, vocab] logits; prefill(ids) / step(token) -> next
        token (greedy, KV cache kept); sync(); chat(prompt, max_new_tokens) -> (text, eos)  required
    artifact_kind     "file" or "folder": what it opens when no runtime is named
    weight_suffixes   the files that hold the weights in a folder artefact (size on disk)
    check_artifact(path)              refuse a broken artefact before a worker opens it
    reference_settings {eval.reference_runtime value: float32}: the settings it serves
    reference_artifact(cfg, model)    what the FP16 reference of `model` runs on
    provenance        further libraries a run's provenance records (a reference converter)
    checks_tokenizer  the worker checks the runtime tokenises the eval text as the HF tokenizer

    rt = open_runtime(path, threads, n_ctx, runtime="llama.cpp")
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, NamedTuple


class Throughput(NamedTuple):
    """Effective speed on this project's reference machine (2 cores, AVX2): prompt processing in
    FLOP/s (2 x parameters per token) and decoding in weight bytes read per second
    (`decode_bytes`: "file", the variant's own bytes; "fp16", the model's FP16 bytes, for
    runtimes that dequantise to compute). A format may give its own profile (eval_need)."""
    name: str
    flops: float
    bytes_per_s: float
    decode_bytes: str


REQUIRED = ("name", "libraries", "throughput", "memory_for", "open")
RUNTIMES: dict[str, type] = {}


class Runtime:
    """Defaults of the optional parts; a runtime class derives from it and is @register-ed."""
    artifact_kind = "folder"
    weight_suffixes: tuple[str, ...] = ()
    reference_settings: dict[str, bool] = {}
    provenance: tuple[str, ...] = ()
    checks_tokenizer = False

    @classmethod
    def check_artifact(cls, path: Path) -> None:
        """Nothing to check beyond what loading it checks."""

    @classmethod
    def reference_artifact(cls, cfg: Any, model: dict) -> Path:
        """The model's Hugging Face folder itself."""
        return Path(model["path"])


def register(cls: type) -> type:
    missing = [p for p in REQUIRED if getattr(cls, p, None) is None]
    if missing:
        raise TypeError(f"runtime {cls.__name__} lacks {', '.join(missing)} "
                        "(quantpipe/evaluate/runtimes.py lists what a runtime holds)")
    if not isinstance(cls.throughput, Throughput):
        raise TypeError(f"runtime {cls.__name__}: throughput must be a Throughput")
    if not isinstance(cls.libraries, tuple) or cls.artifact_kind not in ("file", "folder"):
        raise TypeError(f"runtime {cls.__name__}: libraries must be a tuple and artifact_kind "
                        "'file' or 'folder'")
    RUNTIMES[cls.name] = cls
    return cls


def _discover() -> dict[str, type]:
    package = importlib.import_module("quantpipe.evaluate")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_runtime"):
            importlib.import_module(f"quantpipe.evaluate.{module.name}")
    return RUNTIMES


def runtimes() -> list[type]:
    """Every registered runtime class, in module-name order."""
    return list(_discover().values())


def runtime_names() -> list[str]:
    return [r.name for r in runtimes()]


def get(name: str) -> type:
    if name not in _discover():
        raise ValueError(f"runtime {name!r} is not registered: one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def throughput_of(profile: str | Throughput) -> Throughput:
    """A format's own speed profile, or its runtime's (by name)."""
    return profile if isinstance(profile, Throughput) else get(profile).throughput


def reference_settings() -> list[str]:
    """The values eval.reference_runtime may take, each served by one runtime."""
    return [s for r in runtimes() for s in r.reference_settings]


def reference_runtime(setting: str) -> tuple[type, bool]:
    """(runtime class, float32) of an eval.reference_runtime value."""
    for r in runtimes():
        if setting in r.reference_settings:
            return r, r.reference_settings[setting]
    raise ValueError(f"{setting!r} is not a reference runtime: one of "
                     f"{', '.join(reference_settings())}")


def weight_suffixes() -> tuple[str, ...]:
    return tuple(s for r in runtimes() for s in r.weight_suffixes)


def libraries() -> tuple[str, ...]:
    """Every runtime's libraries (the evaluation's cache key)."""
    return tuple(lib for r in runtimes() for lib in r.libraries)


def open_runtime(path: Path, threads: int | None, n_ctx: int, reference: bool = False,
                 runtime: str | None = None):
    """`runtime` as the backend's result names it (None: the runtime that opens this kind of
    artefact, a file or a folder). `reference`: compute in float32
    (eval.reference_runtime=transformers-float32: 4 bytes a weight, small models only);
    otherwise in the dtype the model is stored in, as it would be deployed."""
    path = Path(path)
    if runtime is None:
        kind = "file" if path.is_file() else "folder"
        runtime = next(r.name for r in runtimes() if r.artifact_kind == kind)
    return get(runtime).open(path, threads, n_ctx, reference)
