"""Build the Day-2 stand-in: the demo LoRA adapter on the default base (a few CPU minutes).

    make adapter                          # = python -m pipelines.adapter
    make adapter adapter.train.steps=100  # any Hydra override

`make pipeline` runs this automatically when the default adapter is missing; with your own
adapter (adapter.path=...) it is never needed.
"""
import hydra
from omegaconf import DictConfig

import quantpipe  # noqa: F401  (registers the ${quantpipe.root:} resolver)
from quantpipe import schema
from quantpipe.cli import one_line_errors
from quantpipe.pipeline import run_adapter


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    schema.check(cfg, with_quant=False)
    run_adapter(cfg)


if __name__ == "__main__":
    one_line_errors(main)
