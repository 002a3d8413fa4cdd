"""Smoke and load test of a served variant, on loopback, bounded in requests and time.

    make smoke                                   # = python -m pipelines.deploy smoke
    make smoke ARGS="--requests 16 --concurrency 1 4 8 --max-tokens 64"
    make smoke QUANT=w8a8_int8_dynamic SERVER=vllm   # the folder, served by vLLM's CPU build

Starts the server (llama-cpp-python's for a GGUF, vLLM's for a folder) on a free 127.0.0.1 port,
waits for /v1/models, sends one chat completion that must end at the model's end-of-turn token
(finish_reason "stop") with non-empty text, then, for each concurrency level, `requests` chat
completions that many at a time (each with a timeout, all within a deadline), and stops the
server. Per level, latency percentiles, tokens/s and errors go to an MLflow run (tag
quantpipe.kind=deploy, deploy.server, deploy.concurrency) nested under the variant run that
published it, with the server log (and, for a GGUF, the Modelfile).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantpipe.deploy import serve
from quantpipe.deploy.modelfile import write_modelfile
from quantpipe.names import Kind, Metric, Stage, Tag

log = logging.getLogger(__name__)
import mlflow  # noqa: E402  (serve sets MLFLOW_DISABLE_TELEMETRY first)

SMOKE_PROMPT = "Say hello in one short sentence."
PROMPTS = ("What is the capital of France?", "Name three primary colours.",
           "Explain what a compiler does in two sentences.", "Give one tip for writing tests.")


@dataclass
class LoadSettings:
    requests: int = 8           # load requests in total (besides the smoke request)
    concurrency: int | tuple[int, ...] = 4  # in flight at once (one level, or several: each
                                # its own batch and deploy run); llama-cpp-python's server
                                # answers one at a time, so latency under load includes the queue
    max_tokens: int = 64        # per load request
    smoke_max_tokens: int = 128  # room for a short answer to end at EOS by itself
    request_timeout_s: float = 120
    deadline_s: float = 600     # the whole test, server start included
    ready_timeout_s: float = 120  # vLLM: at least 600 (it loads and profiles for minutes on CPU)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(self.concurrency) if isinstance(self.concurrency, (tuple, list)) \
            else (self.concurrency,)


@dataclass
class Result:
    ok: bool
    latency_s: float
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None


class SmokeFailed(RuntimeError):
    """The served model answered wrongly (no EOS, empty text) or requests failed."""


def chat(base_url: str, prompt: str, max_tokens: int, timeout_s: float) -> Result:
    """One non-streaming chat completion, greedy (temperature 0: the same answer each time)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            reply = json.loads(r.read())
        choice = reply["choices"][0]
        return Result(True, time.perf_counter() - t0,
                      int(reply.get("usage", {}).get("completion_tokens", 0)),
                      choice.get("finish_reason"), choice["message"].get("content") or "")
    except (OSError, urllib.error.HTTPError, ValueError, KeyError) as e:
        return Result(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


def load(base_url: str, s: LoadSettings, deadline: float, concurrency: int
         ) -> tuple[list[Result], float]:
    """`s.requests` chat completions, `concurrency` at a time; requests not answered by the
    deadline count as errors. Returns the results and the wall time of the whole batch."""
    results: list[Result] = []
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency)
    futures = [pool.submit(chat, base_url, PROMPTS[i % len(PROMPTS)], s.max_tokens,
                           s.request_timeout_s) for i in range(s.requests)]
    try:
        for f in as_completed(futures, timeout=max(deadline - time.perf_counter(), 0)):
            results.append(f.result())
    except TimeoutError:
        pass
    missing = s.requests - len(results)
    results += [Result(False, time.perf_counter() - t0, error="deadline passed")] * missing
    # queued requests are dropped; one already sent ends within its own request timeout
    pool.shutdown(wait=False, cancel_futures=True)
    return results, time.perf_counter() - t0


def summarise(smoke: Result, results: list[Result], wall_s: float, ready_s: float
              ) -> dict[str, float]:
    """MLflow metrics of the deploy run (milliseconds for latencies, like ttft_ms)."""
    ok = [r for r in results if r.ok]
    m = {Metric.DEPLOY_READY_S: ready_s, Metric.DEPLOY_REQUESTS: len(results),
         Metric.DEPLOY_ERRORS: len(results) - len(ok), Metric.DEPLOY_WALL_S: wall_s,
         Metric.DEPLOY_SMOKE_OK: float(smoke.ok and smoke.finish_reason == "stop"
                                       and bool(smoke.text.strip())),
         Metric.DEPLOY_SMOKE_LATENCY_MS: smoke.latency_s * 1e3,
         Metric.DEPLOY_SMOKE_COMPLETION_TOKENS: smoke.completion_tokens}
    if ok:
        lat = np.array([r.latency_s for r in ok]) * 1e3
        for q, name in ((50, Metric.DEPLOY_LATENCY_P50_MS), (90, Metric.DEPLOY_LATENCY_P90_MS),
                        (99, Metric.DEPLOY_LATENCY_P99_MS)):
            m[name] = float(np.percentile(lat, q))
        m[Metric.DEPLOY_LATENCY_MAX_MS] = float(lat.max())
        tokens = sum(r.completion_tokens for r in ok)
        m[Metric.DEPLOY_COMPLETION_TOKENS] = tokens
        m[Metric.DEPLOY_TOK_S] = tokens / wall_s           # throughput of the server under load
        # what one client sees, queue included
        m[Metric.DEPLOY_REQUEST_TOK_S_MEAN] = float(np.mean(
            [r.completion_tokens / r.latency_s for r in ok]))
    return m


def smoke_problems(smoke: Result) -> list[str]:
    if not smoke.ok:
        return [f"the smoke request failed: {smoke.error}"]
    problems = []
    if smoke.finish_reason != "stop":
        problems.append(f"the answer did not end at EOS (finish_reason={smoke.finish_reason!r} "
                        f"after {smoke.completion_tokens} tokens): check the chat template and "
                        "the EOS token of the GGUF")
    if not smoke.text.strip():
        problems.append("the answer is empty")
    return problems


def smoke_test(variant: serve.Variant, threads: int | None, s: LoadSettings,
               n_ctx: int | None = None, server: str = serve.LLAMA_CPP
               ) -> tuple[str, dict[str, float]]:
    """Serve `variant` on loopback with `server`, smoke- and load-test it at each concurrency
    level, log one deploy run per level; return (run id, metrics) of the last level. Raise
    SmokeFailed (after logging, runs FAILED) if a check fails."""
    t_start = time.perf_counter()
    deadline = t_start + s.deadline_s
    port = serve.free_port()
    cmd, env = serve.command_for(server, variant, "127.0.0.1", port, threads, n_ctx)
    measured: list[tuple[int, list[Result], float]] = []
    with tempfile.TemporaryDirectory(prefix="quantpipe-serve-") as tmp:
        server_log = Path(tmp) / "server.log"
        base_url = f"http://127.0.0.1:{port}"
        proc = serve.start_server(cmd, server_log, env)
        try:
            ready_s = serve.wait_ready(proc, base_url, s.ready_timeout_s, server_log)
            log.info("%s ready after %.1f s", server, ready_s)
            smoke = chat(base_url, SMOKE_PROMPT, s.smoke_max_tokens, s.request_timeout_s)
            log.info("smoke: %r (finish_reason=%s, %d tokens)", smoke.text[:200],
                     smoke.finish_reason, smoke.completion_tokens)
            for level in s.levels:
                results, wall_s = load(base_url, s, deadline, level)
                measured.append((level, results, wall_s))
                log.info("concurrency %d: %d requests in %.1f s, %d errors", level,
                         len(results), wall_s, sum(not r.ok for r in results))
        finally:
            serve.stop_server(proc)
        problems = smoke_problems(smoke)
        # the Ollama export of what was served (a GGUF), written once, logged with each level
        modelfile = write_modelfile(variant.path) if variant.path.suffix == ".gguf" else None
        for level, results, wall_s in measured:
            run_id, metrics = _log_level(variant, server, cmd, threads, s, level, smoke, results,
                                         wall_s, ready_s, [server_log, modelfile], problems)
    if problems:
        raise SmokeFailed(f"{variant.path}: " + "; ".join(problems))
    return run_id, metrics


def _log_level(variant: serve.Variant, server: str, cmd: list[str], threads: int | None,
               s: LoadSettings, level: int, smoke: Result, results: list[Result], wall_s: float,
               ready_s: float, files: list[Path | None], problems: list[str]
               ) -> tuple[str, dict[str, float]]:
    """One concurrency level's deploy run (FAILED when a check failed: `problems` gains this
    level's failed requests)."""
    tags = {Tag.KIND: Kind.DEPLOY, Tag.STAGE: Stage.DEPLOY,
            "deploy.model": str(variant.path), "deploy.source": variant.source,
            Tag.DEPLOY_SERVER: server, Tag.DEPLOY_CONCURRENCY: str(level),
            **{k: variant.tags[k] for k in (Tag.QUANT_NAME, Tag.QUANT_FAMILY, Tag.GATE)
               if k in variant.tags}}
    if variant.run_id:
        tags[Tag.VARIANT_RUN] = variant.run_id
    name = f"deploy {variant.quant_name or variant.path.stem} {server} x{level}"
    with mlflow.start_run(run_name=name, parent_run_id=variant.run_id, tags=tags) as run:
        mlflow.log_params({"deploy.requests": s.requests, "deploy.concurrency": level,
                           "deploy.max_tokens": s.max_tokens,
                           "deploy.smoke_max_tokens": s.smoke_max_tokens,
                           "deploy.request_timeout_s": s.request_timeout_s,
                           "deploy.threads": threads, "deploy.command": " ".join(cmd)})
        for f in files:
            if f is not None:
                mlflow.log_artifact(str(f))
        metrics = summarise(smoke, results, wall_s, ready_s)
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"smoke": asdict(smoke), "load": [asdict(r) for r in results]},
                        "loadtest.json")
        if metrics[Metric.DEPLOY_ERRORS]:
            first = next(r.error for r in results if not r.ok)
            problems.append(f"{metrics[Metric.DEPLOY_ERRORS]:.0f} of {s.requests} requests failed "
                            f"at concurrency {level} (first: {first})")
        if problems:
            mlflow.end_run("FAILED")
        return run.info.run_id, metrics
