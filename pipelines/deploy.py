"""Entry point for deployment: serve the chosen GGUF, export it for Ollama, smoke-test it.

    python -m pipelines.deploy serve     [--model X.gguf | --quant NAME] [--server vllm]
                                         [--host 127.0.0.1] [--port 8000]
                                         [--allow-failed-gate] [hydra overrides ...]
    python -m pipelines.deploy modelfile [--model X.gguf]        # writes <gguf folder>/Modelfile
    python -m pipelines.deploy smoke     [--requests 8] [--concurrency 1 4 8] [--max-tokens 64]
                                         [--quant NAME] [--server vllm]

`make serve`, `make modelfile` and `make smoke` call these; flags go in ARGS="...", QUANT=<variant>
and SERVER=vllm as make variables, Hydra overrides (paths.root=..., tracking.uri=...) after the
target as for `make pipeline`. A GGUF is served by llama-cpp-python's server; SERVER=vllm serves a
published folder (compressed-tensors or fp16) with vLLM's CPU build (`make vllm`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from quantpipe import PROJECT_ROOT
from quantpipe.deploy import serve
from quantpipe.deploy.modelfile import write_modelfile
from quantpipe.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.root=/x")
    common.add_argument("--model", type=Path, help="a GGUF file (default: the registry's "
                        "champion, else quantized/model.gguf)")
    common.add_argument("--registered-model", help="registered model whose @champion is served")
    common.add_argument("--quant", help="serve what this variant published (conf/quant/<NAME>, "
                        "e.g. w8a8_int8_dynamic): quantized/<its publish name>")
    common.add_argument("--server", choices=serve.SERVERS, default=serve.LLAMA_CPP,
                        help="llama.cpp for a GGUF (default), vllm for a folder (make vllm)")
    gated = argparse.ArgumentParser(add_help=False)
    gated.add_argument("--allow-failed-gate", action="store_true",
                       help="serve a variant whose MLflow run has gate=failed")
    gated.add_argument("--n-ctx", type=int, help="context size (default: 2048 or the model's)")

    s = sub.add_parser("serve", parents=[common, gated], help="OpenAI-compatible server")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    m = sub.add_parser("modelfile", parents=[common], help="Ollama Modelfile beside the GGUF")
    m.add_argument("--temperature", type=float, default=0.2)
    k = sub.add_parser("smoke", parents=[common, gated], help="smoke + load test, logged to MLflow")
    k.add_argument("--requests", type=int, default=8)
    k.add_argument("--concurrency", type=int, nargs="+", default=[4],
                   help="requests in flight at once; several levels: one batch and run each")
    k.add_argument("--max-tokens", type=int, default=64)
    k.add_argument("--timeout", type=float, default=120, help="seconds per request")
    k.add_argument("--deadline", type=float, default=600, help="seconds for the whole test")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    quant = [f"+quant={args.quant}"] if args.quant else []
    try:
        with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=args.overrides + quant)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: an unknown variant
        print(f"error: QUANT={args.quant}: {str(e).splitlines()[0]} -> choose one of "
              f"conf/quant/*.yaml", file=sys.stderr)
        return 2
    try:
        model = args.model
        if args.quant:
            model = Path(cfg.paths.quantized) / str(cfg.quant.publish)
            if not model.exists():
                raise ConfigError(f"QUANT={args.quant}", f"{model} has not been published",
                                  f"run `make pipeline +quant={args.quant}` first")
        variant = serve.resolve_variant(cfg, model, args.registered_model)
        logging.info("model: %s (%s; quality gate %s)", variant.path, variant.source,
                     variant.gate or "unknown")
        if args.command == "modelfile":
            out = write_modelfile(variant.path, args.temperature)
            print(f"ollama create mymodel -f {out}")
            return 0
        serve.check_gate(variant, args.allow_failed_gate)
        if args.command == "serve":
            serve.warn_if_exposed(args.host)
            cmd, env = serve.command_for(args.server, variant, args.host, args.port, cfg.threads,
                                         args.n_ctx)
            if variant.path.suffix == ".gguf":
                write_modelfile(variant.path)  # the Ollama export of what is served, beside it
            print(f"serving on http://{args.host}:{args.port}/v1 (Ctrl-C stops it)\n  curl "
                  f"http://{args.host}:{args.port}/v1/chat/completions -H 'Content-Type: "
                  "application/json' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}'",
                  flush=True)
            # the server replaces this process: Ctrl-C reaches it directly
            os.execve(cmd[0], cmd, env if env is not None else os.environ)
        from quantpipe.deploy.loadtest import LoadSettings, SmokeFailed, smoke_test
        settings = LoadSettings(requests=args.requests, concurrency=tuple(args.concurrency),
                                max_tokens=args.max_tokens, request_timeout_s=args.timeout,
                                deadline_s=args.deadline)
        if args.server == serve.VLLM:  # vLLM loads and profiles the model for minutes on CPU
            settings.ready_timeout_s = max(settings.ready_timeout_s, 600)
            settings.deadline_s = max(settings.deadline_s, 600 + args.deadline)
        try:
            run_id, metrics = smoke_test(variant, cfg.threads, settings, args.n_ctx, args.server)
        except SmokeFailed as e:
            print(f"smoke test FAILED (the deploy run is in MLflow, status FAILED): {e}",
                  file=sys.stderr)
            return 1
        print(f"deploy run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
