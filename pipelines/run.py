"""Entry point: compose conf/ with Hydra and run the pipeline (base -> merge -> quantise ->
evaluate -> publish), tracked in MLflow.

    make pipeline +quant=int4                      # or: python -m pipelines.run +quant=int4
    make pipeline +quant=gguf quant.type=q5_k_m model.path=/models/base adapter.path=/runs/lora
    make sweep                                     # hydra.mode=MULTIRUN over conf/quant
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import quantpipe  # noqa: F401  (registers the ${quantpipe.root:} resolver)
from quantpipe.pipeline import run
from quantpipe.tracking import sweep_parent_id


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    parent = sweep_parent_id(hc.sweep.dir) if str(hc.mode) == "RunMode.MULTIRUN" else None
    run(cfg, parent_run_id=parent)


if __name__ == "__main__":
    main()
