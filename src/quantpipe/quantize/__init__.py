"""Quantisation backends. A quant config names its backend function with Hydra's `_target_`;
every backend has the signature

    backend(src: Path, dst: Path, ctx: QuantContext) -> {"artifact": <path in dst>, "metrics": {...}}

where `src` is the merged FP16 Hugging Face folder and `dst` an empty temporary folder that the
pipeline renames into the stage cache once the backend returns. Adding a format means adding a
YAML file in conf/quant/ and, at most, one module here.
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


def build_backend(quant: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        return instantiate(quant.backend)
    except InstantiationException as e:
        raise ConfigError("quant.backend", f"cannot build {quant.backend.get('_target_')}: {e}",
                          "check the backend's _target_ and arguments in conf/quant/") from e
