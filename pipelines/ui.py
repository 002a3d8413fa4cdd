"""make ui: print the URL of the newest sweep's compare view, then serve the MLflow UI on
loopback over the project's store (mlruns/).

    make ui                                   # http://127.0.0.1:5000
    python -m pipelines.ui --port 5001        # another port
    python -m pipelines.ui --print-only       # only the URLs (also for tracking=remote)

The experiment is marked as a model-training experiment and every URL printed carries
workflowType=machine_learning, so MLflow 3's UI opens on the runs, not on the GenAI "Traces"
overview (quantpipe.ui says why both). The process execs `mlflow ui` (same PID): stop it by
that PID. Trailing words are Hydra overrides of conf/ (tracking.*, paths.root).
"""
import argparse
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from quantpipe import PROJECT_ROOT  # noqa: E402
from quantpipe.errors import ConfigError  # noqa: E402
from quantpipe.ui import compare_url, mark_model_training, newest_sweep, runs_url  # noqa: E402


def urls(client: MlflowClient, experiment: str, base: str) -> list[str]:
    """Lines telling where to look: the newest sweep's compare view, else the runs table."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"no MLflow experiment {experiment!r} yet: make pipeline +quant=int4 or make sweep"]
    mark_model_training(client, exp.experiment_id)
    lines = [f"runs:          {runs_url(base, exp.experiment_id)}"]
    if (found := newest_sweep(client, experiment)) is not None and found[2]:
        exp_id, sweep_id, variants = found
        lines.append(f"newest sweep:  {runs_url(base, exp_id, sweep_id)}")
        lines.append(f"compare view:  {compare_url(base, exp_id, variants)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--print-only", action="store_true", help="print the URLs, start nothing")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.root=/data/qp")
    args = ap.parse_args(argv)
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    uri = str(cfg.tracking.uri)
    local = uri.startswith("sqlite:///")
    base = f"http://{args.host}:{args.port}" if local else uri
    client = MlflowClient(uri)
    if local and not os.path.exists(uri.removeprefix("sqlite:///")):
        print(f"no MLflow store at {uri} yet: make pipeline +quant=int4 or make sweep")
    else:
        print("\n".join(urls(client, str(cfg.tracking.experiment), base)), flush=True)
    if args.print_only or not local:
        return
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port),
           "--backend-store-uri", uri, "--default-artifact-root", str(cfg.tracking.artifact_root),
           "--workers", "1"]   # its default starts several workers: ~15 processes on 2 cores
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
