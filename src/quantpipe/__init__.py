"""quantpipe: merge a LoRA fine-tune, quantise it (bitsandbytes, GGUF), evaluate and track it.

The pipeline is driven by Hydra configs in conf/ and run with `make pipeline +quant=int4`
(see README.md). This package holds the logic as plain functions over plain data; the entry
points in pipelines/ only compose the config and call `quantpipe.pipeline.run(cfg)`.
"""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# `${quantpipe.root:}` in conf/paths: paths resolve from the project root, never from Hydra's
# run directory, so `make pipeline` and the tests write to the same places.
if not OmegaConf.has_resolver("quantpipe.root"):
    OmegaConf.register_new_resolver("quantpipe.root", lambda: str(PROJECT_ROOT))
