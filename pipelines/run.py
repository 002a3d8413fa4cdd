"""Entry point: compose conf/ with Hydra, check it, and run the pipeline (base -> merge ->
quantise -> evaluate -> publish), tracked in MLflow.

    make pipeline +quant=int4                      # or: python -m pipelines.run +quant=int4
    make pipeline +quant=gguf quant.type=q5_k_m model.path=/models/base adapter.path=/runs/lora
    make sweep                                     # hydra.mode=MULTIRUN over conf/quant
    make sweep SWEEP=gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned quant.budgets=[q3_k_m,q4_k_m,q5_k_m]

Bad input (a value out of range, two +quant=, an unknown backend option) is refused before any
stage or MLflow run with one line, `error: <key>: <problem> -> <fix>`, and exit code 2;
HYDRA_FULL_ERROR=1 shows the traceback.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import quantpipe  # noqa: F401  (registers the ${quantpipe.root:} resolver)
from quantpipe import schema
from quantpipe.cli import exit_on_user_error, log_job_error, one_line_errors
from quantpipe.console import quiet_known_noise

log = logging.getLogger("pipelines.run")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    quiet_known_noise()  # again: a launcher may run this job in another process
    try:
        try:
            schema.check(cfg)  # before the heavy imports below: a typo costs a second
        except Exception as e:
            if multirun:  # the sweep's comparison lists the refused variant, FAILED
                from quantpipe import tracking
                if (parent := tracking.sweep_parent_id(hc.sweep.dir)) is not None:
                    tracking.log_refused_job(cfg, parent, e)
            raise
        from quantpipe.pipeline import run
        from quantpipe.tracking import sweep_parent_id
        run(cfg, parent_run_id=sweep_parent_id(hc.sweep.dir) if multirun else None)
    except Exception as e:
        from quantpipe.artifacts import no_space
        from quantpipe.tracking import server_lost
        # a server that died mid-run, a disk that filled outside a cache stage: one line
        lost = server_lost(e, str(cfg.tracking.uri)) or no_space(e, cfg.paths.root)
        if multirun:  # the sweep goes on; Hydra raises the first failure after the last job
            log_job_error(log, lost or e)
        else:
            exit_on_user_error(lost or e)  # one line, before Hydra adds "Error executing job ..."
        if lost is not None:
            raise lost from e
        raise


def checked_main() -> None:
    quiet_known_noise()
    # before Hydra, whose own refusal of a second +quant= speaks of `override` syntax
    schema.check_overrides(sys.argv[1:])
    # quant.budgets=[...]: the multirun over quant.type it stands for
    from quantpipe.quantize.gguf import expand_budgets
    sys.argv[1:] = expand_budgets(sys.argv[1:])
    main()


if __name__ == "__main__":
    one_line_errors(checked_main)
