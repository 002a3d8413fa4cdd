"""QUANTISATION-REPORT.md (+ PNG plots in report/ beside it) from the MLflow runs, and nothing else.

    make report                                   # the newest sweep in mlruns/
    python -m pipelines.report --sweep RUN_ID --out /tmp/r.md
    python -m pipelines.report tracking=remote    # Hydra overrides choose the store

First the committed GPU result files (benchmarks/results/gpu-*.json) are imported into the store
(idempotent; pipelines/gpu_import.py). Runs: the newest sweep run's variants by default, else
the newest finished run per quant.name.
The trailing words are Hydra overrides of conf/ (only tracking.*, paths.root and registry.*
matter here).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from quantpipe import PROJECT_ROOT  # noqa: E402
from quantpipe.artifacts import portable_uri  # noqa: E402
from quantpipe.errors import ConfigError  # noqa: E402
from quantpipe.names import Tag  # noqa: E402
from quantpipe.registry import CHAMPION  # noqa: E402
from quantpipe.report import write_report  # noqa: E402
from quantpipe.report.query import select  # noqa: E402


def champion_note(client: mlflow.MlflowClient, name: str) -> str | None:
    try:
        v = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return (f"alias `{CHAMPION}` of registered model `{name}` is version {v.version} "
            f"({v.tags.get(Tag.QUANT_NAME, '?')}, gate {v.tags.get(Tag.GATE, '?')}, source "
            f"`{v.source}`): `models:/{name}@{CHAMPION}`")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sweep", metavar="RUN_ID", help="the sweep run to report (default: "
                    "newest); several, comma-separated: their variants, the newest run of each")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "QUANTISATION-REPORT.md",
                    help="markdown file to write; plots go to report/ beside it")
    ap.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    ap.add_argument("--no-gpu-import", action="store_true",
                    help="do not import benchmarks/results/gpu-*.json into the store first")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. tracking=remote")
    args = ap.parse_args(argv)
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    if not args.no_gpu_import:  # the committed GPU result files, imported once (idempotent)
        from pipelines.gpu_import import import_results
        import_results(cfg.tracking)
    mlflow.set_tracking_uri(str(cfg.tracking.uri))
    client = mlflow.MlflowClient()
    sel = select(client, args.experiment or str(cfg.tracking.experiment), args.sweep)
    sel.tracking_uri = portable_uri(sel.tracking_uri, cfg.paths.root)  # no folder of this host
    if not sel.variants:
        raise ConfigError("--sweep", f"no finished variant run in {sel.experiment!r}"
                          + (f" under sweep {sel.sweep['run_id']}" if sel.sweep else ""),
                          "run `make sweep` (or name another sweep with --sweep RUN_ID)")
    out = write_report(sel, args.out, champion_note(client, str(cfg.registry.name)))
    logging.getLogger(__name__).info("wrote %s", out)
    print(f"wrote {out} ({len(sel.variants)} variants, {len(sel.gpu)} GPU runs)")
    return out


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
