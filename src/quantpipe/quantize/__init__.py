"""Quantisation backends. A quant config names its backend function with Hydra's `_target_`;
every backend has the signature

    backend(src: Path, dst: Path, ctx: QuantContext) -> result

where `src` is the merged FP16 Hugging Face folder and `dst` an empty temporary folder that the
pipeline renames into the stage cache once the backend returns. The result says everything
format-specific the pipeline needs, so pipeline, evaluation and report name no format:

    artifact     path inside dst ("." = the folder itself)                          required
    runtime      "transformers" | "llama.cpp": what evaluates it                    required
    metrics      {name: number} logged on the quantise stage
    calibration  [{name, text_file, split, key}]: texts logged as MLflow datasets (calibrated)
    speed        {"native": False, "why": ..., "rename_suffix": ...} where no real kernel runs
                 the format in evaluation (its tokens/s are then logged under suffixed names)
    publish      {"aliases": [names also published], "hooks": {artifact path: "module.fn"}}

A backend (its function or module) may define
`check_machine(tools, **options)`: what this machine must have for it, looked for before the
first stage (quantpipe.pipeline.preflight): llama.cpp's tools in `tools` (paths.tools), an
isolated environment (`make llmc`). Adding a format means adding a YAML file in conf/quant/ and, at most,
one module here.

A backend checks its own options before any stage runs (`check_backend`, called by
quantpipe.schema.check right after composition): options its signature lacks are refused, then
the function given to `@options_checked_by` sees the options (a dict, `_target_` left out) and
raises ConfigError("quant.backend.<option>", problem, fix) for a bad one:

    def _check(options: dict) -> None:
        if options["scheme"] not in SCHEMES:
            raise ConfigError("quant.backend.scheme", f"{options['scheme']!r} is unknown", ...)

    @options_checked_by(_check)
    def quantize_gptq(src, dst, ctx, scheme="W4A16", group_size=64) -> dict: ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from quantpipe.errors import ConfigError


@dataclass(frozen=True)
class QuantContext:
    artifacts: Path          # the stage cache root (a backend may cache intermediate files)
    tools: Path              # llama.cpp command-line tools (make tools)
    src_fingerprint: str     # fingerprint of the merged FP16 model
    threads: int | None


Backend = Callable[[Path, Path, QuantContext], dict]
FIXED_ARGS = 3  # src, dst, ctx: given by the pipeline, not by the config


def options_checked_by(check: Callable[[dict], None]) -> Callable[[Backend], Backend]:
    """Attach `check(options)` to a backend: it runs right after composition, before any stage."""
    def attach(backend: Backend) -> Backend:
        backend.check_options = check
        return backend
    return attach


def check_backend(quant: DictConfig) -> None:
    """The backend named by quant.backend._target_ exists, takes every option the config gives
    it, and accepts their values (its `check_options`, if it has one)."""
    import inspect

    from hydra.utils import get_method
    from omegaconf import OmegaConf
    target = quant.backend.get("_target_")
    try:
        fn = get_method(str(target))
    except Exception as e:  # hydra wraps the ImportError / AttributeError
        raise ConfigError("quant.backend._target_", f"{target!r} cannot be imported "
                          f"({str(e).splitlines()[0]})", "name a function of "
                          "quantpipe.quantize.* in conf/quant/") from None
    options = {k: v for k, v in OmegaConf.to_container(quant.backend, resolve=True).items()
               if not k.startswith("_")}
    params = list(inspect.signature(fn).parameters.values())[FIXED_ARGS:]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        names = [p.name for p in params]
        for key in options:
            if key not in names:
                raise ConfigError(f"quant.backend.{key}", f"is not an option of {target}",
                                  f"use one of: {', '.join(names) or '(none)'}")
    if (check := getattr(fn, "check_options", None)) is not None:
        defaults = {p.name: p.default for p in params if p.default is not p.empty}
        check({**defaults, **options})


def build_backend(quant: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        return instantiate(quant.backend)
    except InstantiationException as e:
        raise ConfigError("quant.backend", f"cannot build {quant.backend.get('_target_')}: {e}",
                          "check the backend's _target_ and arguments in conf/quant/") from e
