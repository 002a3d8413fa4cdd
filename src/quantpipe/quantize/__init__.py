"""Quantisation formats: a registry of typed backends. A quant config names its backend function
with Hydra's `_target_`; each backend function is registered as a `Format` by the decorator
`register`, which holds everything the shared code asks of a format:

    @register(recipe=RECIPE, libraries=LIBRARIES, memory_need=memory_need,
              eval_need=eval_need, check_options=_check, check_machine=check_machine,
              rules={"quant.type": Str()})
    def quantize_gguf(src: Path, dst: Path, ctx: QuantContext, type="q4_k_m") -> dict: ...

A format missing a required part fails when its module is imported, not when a run reaches it
(as llama.cpp's converter refuses a model class without its architecture). The parts:

    quantize       the backend itself: backend(src, dst, ctx, **options) -> result       required
    recipe         bumped when the artefact written changes (the quantise stage's cache key) required
    libraries      distributions whose versions enter that cache key                     required
    memory_need    (shape, n_ctx, **options) -> [(what, peak bytes, fix)]: its stages     required
    eval_need      (shape, **options) -> (runtime name or Throughput, weight bytes): the
                   evaluation's speed profile, for the time estimate before any stage    required
    check_options  (options dict) -> None, raising ConfigError("quant.backend.<option>", ...)
    check_machine  (tools, **options) -> None: what this machine must have (llama.cpp's tools,
                   an isolated environment), looked for before the first stage
    other_versions () -> {name: version}: libraries outside this venv, in the cache key too
    recipe_of      (options dict) -> versions, falsy for none: recipe versions that depend on
                   the options, where one option's artefact changed and the others' did not
    variant_metrics names of its result's metrics logged on the variant run too (the report
                   reads them there, across subjects and sweeps, without opening stage runs)
    rules          {config key: quantpipe.schema rule}: the quant.* keys this format adds
    open_sections  config sections the format checks itself (quant.tune)

`src` is the merged FP16 Hugging Face folder and `dst` an empty temporary folder that the
pipeline renames into the stage cache once the backend returns. The result says everything
format-specific the pipeline needs, so pipeline, evaluation and report name no format:

    artifact     path inside dst ("." = the folder itself)                          required
    runtime      a registered evaluation runtime (quantpipe.evaluate.runtimes)      required
    metrics      {name: number} logged on the quantise stage
    log_files    [paths inside dst] logged on the variant run (e.g. a recipe that re-creates it)
    calibration  [{name, text_file, split, key}]: texts logged as MLflow datasets (calibrated)
    speed        {"native": False, "why": ..., "rename_suffix": ...} where no real kernel runs
                 the format in evaluation (its tokens/s are then logged under suffixed names)
    publish      {"aliases": [names also published], "hooks": {artifact path: "module.fn"}}

Adding a format means adding a YAML file in conf/quant/ and, at most, one module here.
Options the backend's signature lacks are refused right after composition (`check_backend`,
called by quantpipe.schema.check), then `check_options` sees the options (a dict, `_target_`
left out, defaults filled in).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

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
RESULT_KEYS = ("artifact", "runtime")  # what every backend's result must name
# the seeds' formats in the order the report's workflow lists the variants (report/query.py
# `order`: the transformers formats from FP16 down, then the llama.cpp files)
WORKFLOW = "FP16 -> INT8 -> INT4 -> GGUF"


@dataclass(frozen=True)
class Format:
    """One registered format (see the module docstring for each part)."""
    quantize: Backend
    recipe: int
    libraries: tuple[str, ...]
    memory_need: Callable[..., list]
    eval_need: Callable[..., tuple]
    check_options: Callable[[dict], None] | None = None
    check_machine: Callable[..., None] | None = None
    other_versions: Callable[[], dict] | None = None
    recipe_of: Callable[[dict], Any] | None = None
    variant_metrics: tuple[str, ...] = ()
    rules: Mapping[str, Any] = field(default_factory=dict)
    open_sections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = getattr(self.quantize, "__qualname__", repr(self.quantize))
        if not callable(self.quantize):
            raise TypeError(f"format {name}: quantize is not callable")
        fixed = list(inspect.signature(self.quantize).parameters)[:FIXED_ARGS]
        if len(fixed) < FIXED_ARGS:
            raise TypeError(f"format {name}: the backend takes (src, dst, ctx, **options), "
                            f"not ({', '.join(fixed)})")
        if isinstance(self.recipe, bool) or not isinstance(self.recipe, int):
            raise TypeError(f"format {name}: recipe must be an int (bumped when the artefact "
                            f"changes), not {self.recipe!r}")
        if not isinstance(self.libraries, tuple) or not all(
                isinstance(x, str) for x in self.libraries):
            raise TypeError(f"format {name}: libraries must be a tuple of distribution names")
        if not isinstance(self.variant_metrics, tuple) or not all(
                isinstance(x, str) for x in self.variant_metrics):
            raise TypeError(f"format {name}: variant_metrics must be a tuple of metric names")
        for part in ("memory_need", "eval_need"):
            if not callable(getattr(self, part)):
                raise TypeError(f"format {name}: {part} is required and must be callable")
        for part in ("check_options", "check_machine", "other_versions", "recipe_of"):
            if getattr(self, part) is not None and not callable(getattr(self, part)):
                raise TypeError(f"format {name}: {part} must be callable or None")

    @property
    def target(self) -> str:
        """The `_target_` a quant config names it by."""
        return f"{self.quantize.__module__}.{self.quantize.__qualname__}"

    def made_by(self, options: dict | None = None) -> dict[str, Any]:
        """What makes the artefact besides its inputs (part of the quantise stage's cache key):
        the recipe (with `options`, the backend's, and a `recipe_of`: its version for them
        too) and the versions of the libraries, those outside this venv included."""
        from quantpipe import tracking
        versions = tracking.versions_of(self.libraries)
        if self.other_versions is not None:
            versions.update(self.other_versions())
        made = {"recipe": self.recipe, "versions": versions}
        if self.recipe_of is not None and options is not None \
                and (of_options := self.recipe_of(options)):
            made["options_recipe"] = of_options
        return made

    def check_result(self, result: dict) -> dict:
        """The backend's result names what the pipeline needs, and a runtime that exists."""
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise RuntimeError(f"backend {self.target} returned no {missing}: every backend "
                               "names its artifact and the runtime that evaluates it")
        from quantpipe.evaluate.runtimes import runtime_names
        if result["runtime"] not in runtime_names():
            raise RuntimeError(f"backend {self.target} names runtime {result['runtime']!r}, not "
                               f"one of the registered {', '.join(runtime_names())}")
        return result


FORMATS: dict[str, Format] = {}  # by target ("module.function")


def register(**parts: Any) -> Callable[[Backend], Backend]:
    """Register the decorated backend function as a Format with `parts` (a missing or badly
    typed required part raises TypeError here, when the module is imported)."""
    def attach(backend: Backend) -> Backend:
        fmt = Format(quantize=backend, **parts)
        FORMATS[fmt.target] = fmt
        backend.format = fmt
        return backend
    return attach


def format_of(target: str) -> Format:
    """The Format registered for a config's `_target_`; ConfigError if it cannot be imported or
    is not a registered backend."""
    from hydra.utils import get_method
    try:
        fn = get_method(str(target))
    except Exception as e:  # hydra wraps the ImportError / AttributeError
        raise ConfigError("quant.backend._target_", f"{target!r} cannot be imported "
                          f"({str(e).splitlines()[0]})", "name a function of "
                          "quantpipe.quantize.* in conf/quant/") from None
    fmt = getattr(fn, "format", None)
    if not isinstance(fmt, Format):
        raise ConfigError("quant.backend._target_", f"{target!r} is not a registered format",
                          "decorate the backend function with @quantpipe.quantize.register(...)")
    return fmt


def backend_options(quant: DictConfig) -> dict:
    """The backend's options as plain data, `_target_` and friends left out."""
    from omegaconf import OmegaConf
    return {k: v for k, v in OmegaConf.to_container(quant.backend, resolve=True).items()
            if not k.startswith("_")}


def check_backend(quant: DictConfig) -> Format:
    """The backend named by quant.backend._target_ is a registered format, takes every option
    the config gives it, and accepts their values (its `check_options`, if it has one)."""
    target = quant.backend.get("_target_")
    fmt = format_of(str(target))
    options = backend_options(quant)
    params = list(inspect.signature(fmt.quantize).parameters.values())[FIXED_ARGS:]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        names = [p.name for p in params]
        for key in options:
            if key not in names:
                raise ConfigError(f"quant.backend.{key}", f"is not an option of {target}",
                                  f"use one of: {', '.join(names) or '(none)'}")
    if fmt.check_options is not None:
        defaults = {p.name: p.default for p in params if p.default is not p.empty}
        fmt.check_options({**defaults, **options})
    return fmt


def build_backend(quant: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        return instantiate(quant.backend)
    except InstantiationException as e:
        raise ConfigError("quant.backend", f"cannot build {quant.backend.get('_target_')}: {e}",
                          "check the backend's _target_ and arguments in conf/quant/") from e
