"""Deploy: the Ollama Modelfile from a real GGUF's chat template, the quality gate before serving,
and the real llama-cpp-python server smoke- and load-tested on loopback, logged to MLflow.

    .venv/bin/python -m pytest -q tests/test_deploy.py     (~2 min on 2 idle cores)
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import jinja2
import mlflow
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from pipelines.deploy import main as deploy_main
from pipelines.deploy import parse
from quantpipe import tracking
from quantpipe.base import embedded_gguf
from quantpipe.data import topics_text
from quantpipe.deploy import serve
from quantpipe.deploy.loadtest import LoadSettings, SmokeFailed, smoke_test
from quantpipe.deploy.modelfile import read_chat_spec, write_modelfile
from quantpipe.errors import ConfigError
from quantpipe.pipeline import run
from quantpipe.quantize.gguf import convert_f16
from tests.conftest import make_cfg

LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                   "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_base) -> Path:
    """The tiny Llama converted by llama.cpp's converter: SmolLM2's tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-gguf") / "model.gguf"
    convert_f16(tiny_base, out, {"test": "deploy"})
    return out


def chatml(system: str, user: str) -> str:
    """What Ollama renders from the Modelfile's TEMPLATE for one system and one user turn."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_modelfile_converts_the_chatml_template(tiny_gguf):
    text = write_modelfile(tiny_gguf).read_text()
    assert (tiny_gguf.parent / "Modelfile").is_file()
    assert re.search(r"^FROM \./model\.gguf$", text, re.M)
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n" in template
    assert "<|im_start|>system\n{{ .System }}<|im_end|>\n" in template
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops[0] == "<|im_end|>"  # the GGUF's EOS token comes first
    assert set(stops) == {"<|im_end|>", "<|im_start|>"}
    assert 0 < float(re.search(r"^PARAMETER temperature (\S+)$", text, re.M).group(1)) <= 1
    # the SYSTEM line is the default the Jinja template inserts: Ollama then renders what the
    # model was tuned on, with and without a system message of the user's own
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S).group(1)
    jinja = jinja2.Template(read_chat_spec(tiny_gguf).template)
    assert "SmolLM" in system
    assert jinja.render(messages=[{"role": "user", "content": "Hi"}],
                        add_generation_prompt=True) == chatml(system, "Hi")
    assert jinja.render(messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}],
                        add_generation_prompt=True) == chatml("Be brief.", "Hi")


def test_modelfile_without_chatml_keeps_stops_and_says_why(tiny_gguf, tmp_path, caplog):
    other = tmp_path / "llama3.gguf"
    template = {"tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING,
                                                           LLAMA3_TEMPLATE)}
    copy_with_new_metadata(gguf.GGUFReader(str(tiny_gguf)),
                           gguf.GGUFWriter(str(other), arch="llama"), template, [])
    assert read_chat_spec(other).family == "unknown"
    text = write_modelfile(other).read_text()
    assert "FROM ./llama3.gguf" in text and not re.search(r"^TEMPLATE ", text, re.M)
    assert 'PARAMETER stop "<|im_end|>"' in text  # the EOS token still stops generation
    assert "Ollama" in caplog.text and "ChatML" in caplog.text


def test_serve_binds_loopback_with_the_gguf_template(tiny_gguf):
    assert parse(["serve"]).host == "127.0.0.1"
    cmd = serve.server_command(serve.Variant(tiny_gguf, "test"), "127.0.0.1", 8000, 2)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--chat_format") + 1] == "chat_template.default"
    assert int(cmd[cmd.index("--n_ctx") + 1]) <= 512  # capped at the tiny model's context
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        serve.server_command(serve.Variant(Path(__file__), "test"), "127.0.0.1", 8000, 2)


def runs(filter_string: str):
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string,
                              output_format="list")


@pytest.mark.slow  # a whole pipeline run on the tiny model: make test-slow
def test_failed_gate_is_refused_then_smoke_logs_a_deploy_run(cfg_factory, tmp_path, capsys):
    # every quantised variant has a KLD above 0, so this one fails the gate. Eval text with single spaces:
    # on runs of spaces in the default text, the HF tokenizer read from SmolLM2's GGUF and
    # llama.cpp's split differently and the evaluator refuses the GGUF (not deploy's concern)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(topics_text("eval").split())[:6000])
    cfg = cfg_factory("+quant=gguf_q8_0", "gate.max_kld=0", f"eval.text_file={text}")
    run(cfg)
    variant = serve.resolve_variant(cfg)
    assert variant.path == Path(cfg.paths.quantized) / "model.gguf"
    assert variant.quant_name == "gguf_q8_0" and variant.gate == "failed"
    assert variant.run_id == runs("tags.`quantpipe.kind` = 'variant'")[0].info.run_id
    with pytest.raises(ConfigError, match="failed the quality gate"):
        serve.check_gate(variant, allow_failed=False)
    assert deploy_main(["serve", f"paths.root={tmp_path}"]) == 2  # refused before serving
    assert "--allow-failed-gate" in capsys.readouterr().err
    serve.check_gate(variant, allow_failed=True)

    # a random-weights model never ends at EOS: the smoke test must say so, and still log
    settings = LoadSettings(requests=3, concurrency=2, max_tokens=8, smoke_max_tokens=16,
                            request_timeout_s=60, deadline_s=180)
    with pytest.raises(SmokeFailed, match="did not end at EOS"):
        smoke_test(variant, cfg.threads, settings)
    (deploy,) = runs("tags.`quantpipe.kind` = 'deploy'")
    assert deploy.info.status == "FAILED"
    assert deploy.data.tags["quant.name"] == "gguf_q8_0"
    assert deploy.data.tags["mlflow.parentRunId"] == variant.run_id
    m = deploy.data.metrics
    assert m["deploy_requests"] == 3 and m["deploy_errors"] == 0 and m["deploy_smoke_ok"] == 0
    p50, p90, p99 = (m[f"deploy_latency_{q}_ms"] for q in ("p50", "p90", "p99"))
    assert 0 < p50 <= p90 <= p99
    assert m["deploy_completion_tokens"] == 3 * 8 and m["deploy_tok_s"] > 0
    assert (Path(cfg.paths.quantized) / "Modelfile").is_file()

    # the registry's champion is served when it exists (the pipeline gave it no alias)
    name = serve.registered_model_name(cfg)
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions(f"name = '{name}'")
    client.set_registered_model_alias(name, serve.CHAMPION, version.version)
    champion = serve.resolve_variant(cfg)
    assert champion.source.startswith(f"registry {name}@champion")
    assert champion.run_id == variant.run_id and champion.gate == "failed"


def test_smoke_on_the_real_model_stops_at_eos(tmp_path):
    """SmolLM2-135M-Instruct (the packaged Q4_1) answers in ChatML and ends at <|im_end|>."""
    cfg = make_cfg(tmp_path)
    gguf = Path(cfg.paths.quantized) / "model.gguf"
    gguf.parent.mkdir(parents=True)
    shutil.copy2(embedded_gguf(cfg.model.embedded), gguf)
    tracking.setup(cfg.tracking)
    variant = serve.resolve_variant(cfg)
    assert variant.run_id is None and variant.gate is None  # no pipeline run published it
    settings = LoadSettings(requests=4, concurrency=2, max_tokens=16, request_timeout_s=60,
                            deadline_s=300)
    run_id, m = smoke_test(variant, cfg.threads, settings)
    deploy = mlflow.get_run(run_id)
    assert deploy.info.status == "FINISHED" and deploy.data.tags["quantpipe.kind"] == "deploy"
    assert deploy.data.metrics == pytest.approx(m)
    assert m["deploy_smoke_ok"] == 1 and m["deploy_errors"] == 0 and m["deploy_requests"] == 4
    assert 0 < m["deploy_smoke_completion_tokens"] < settings.smoke_max_tokens
    for q in ("p50", "p90", "p99"):
        assert m[f"deploy_latency_{q}_ms"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"Modelfile", "server.log", "loadtest.json"} <= artifacts
