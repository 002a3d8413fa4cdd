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

A backend function may carry `.check(**arguments)`, called before any work (preflight) to refuse
bad arguments in a second. Adding a format means adding a YAML file in conf/quant/ and, at most,
one module here.
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


def check_backend(quant: DictConfig) -> None:
    """Run the backend's own argument check (`fn.check`), if it has one."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf
    args = OmegaConf.to_container(quant.backend, resolve=True)
    target = args.pop("_target_", None)
    args.pop("_partial_", None)
    try:
        fn = get_method(target)
    except Exception as e:  # noqa: BLE001  (hydra wraps import errors in several types)
        raise ConfigError("quant.backend._target_", f"cannot import {target}: {e}",
                          "name a function of quantpipe.quantize in conf/quant/") from e
    if check := getattr(fn, "check", None):
        check(**args)


def build_backend(quant: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        return instantiate(quant.backend)
    except InstantiationException as e:
        raise ConfigError("quant.backend", f"cannot build {quant.backend.get('_target_')}: {e}",
                          "check the backend's _target_ and arguments in conf/quant/") from e
