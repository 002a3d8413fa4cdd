"""Hydra callback of a multirun (conf/config.yaml: hydra.callbacks.sweep_run): one MLflow run
above all variant runs of the sweep, so the UI and the report group them; at the end it carries
the comparison table and plots (quantpipe.ui).

Hydra builds its callbacks for every single run too, so this module imports MLflow only when a
sweep starts: that import alone is 2-4 s of a command line refused for a typo.
"""
from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from quantpipe import schema
        from quantpipe.cli import exit_on_user_error, stop
        try:  # a bad value shared by every variant fails once, before the sweep run exists
            schema.check(config, with_quant=False)
        except Exception as e:
            stop(e)  # SystemExit: Hydra turns a callback's exceptions into warnings
        from quantpipe import tracking  # MLflow: 2-4 s to import
        try:
            tracking.start_sweep_run(config)
        except Exception as e:  # the jobs would log as loose runs, outside any sweep: stop here
            exit_on_user_error(e)
            log.exception("the sweep run could not be started on %s; no job was launched",
                          config.tracking.uri)
            raise SystemExit(1) from e

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from quantpipe import tracking
        if (run_id := tracking.sweep_parent_id(config.hydra.sweep.dir)) is not None:
            tracking.close_sweep_run(run_id)
