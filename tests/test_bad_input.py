"""Bad input: each case fails with a ConfigError that names the key or file and the fix, and
loses nothing: the model published before stays byte for byte, the MLflow run ends FAILED.

    .venv/bin/python -m pytest -q tests/test_bad_input.py

One real run of the tiny model (quant=fp16) publishes quantized/model-fp16 first; every case
then runs the real pipeline against the same root with one bad input.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from quantpipe import PROJECT_ROOT, tracking
from quantpipe.errors import ConfigError
from quantpipe.pipeline import run
from tests.conftest import SHRINK, make_cfg


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (lock files aside) with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base, tiny_adapter):
    """A root with a published model, and a `cfg(*overrides)` for the tiny model in it."""
    root = tmp_path_factory.mktemp("root")

    def cfg(*overrides, base=tiny_base, adapter=tiny_adapter, quant="fp16"):
        return make_cfg(root, [f"model.path={base}", f"adapter.path={adapter}", *SHRINK,
                               f"+quant={quant}", *overrides])
    run(cfg())
    published = root / "quantized"
    assert (published / "model-fp16" / "model.safetensors").is_file()
    return {"root": root, "cfg": cfg, "published": published, "before": snapshot(published)}


def variant_runs(cfg):
    tracking.setup(cfg.tracking)
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`quantpipe.kind` = 'variant'",
                              order_by=["attributes.start_time DESC"])


def refused(world, *overrides, key: str, match: str, **choices) -> ConfigError:
    """Run the pipeline with bad input: a ConfigError naming `key`, a fix, the run FAILED with
    the error tagged, and the published model unchanged with no temporaries beside it."""
    cfg = world["cfg"](*overrides, **choices)
    n_before = len(variant_runs(cfg))
    with pytest.raises(ConfigError) as e:
        run(cfg)
    err = e.value
    assert err.key == key and err.fix, str(err)
    assert match in str(err), str(err)
    assert snapshot(world["published"]) == world["before"]
    assert not [p for p in world["published"].iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    runs = variant_runs(cfg)
    assert len(runs) == n_before + 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["quantpipe.error"].startswith("ConfigError: " + key)
    return err


def no_stage_ran(world) -> bool:
    """The newest variant run has no stage run under it: refused by the preflight."""
    failed = variant_runs(world["cfg"]())[0].info.run_id
    return not mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{failed}'")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable: chmod for a normal user; root ignores modes, so for root the
    folder is made immutable (chattr +i), or the test is skipped where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: no way to make a folder read-only")
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    try:
        yield folder
    finally:
        undo()


# --- the base model ---------------------------------------------------------------------------

def test_missing_base_path(world):
    refused(world, key="model.path", match="is not a folder", base=world["root"] / "no-such-model")


def test_base_folder_without_weights(world, tiny_base, tmp_path):
    shutil.copy2(tiny_base / "config.json", tmp_path / "config.json")
    refused(world, key="model.path", match="has no weights", base=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_corrupt_safetensors(world, tiny_base, tmp_path, damage):
    shutil.copytree(tiny_base, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    refused(world, key="model.path", match="is corrupt or truncated", base=tmp_path / "m")


def test_pickle_only_checkpoint_is_refused_unless_allowed(world, tiny_base, tmp_path):
    from quantpipe.base import validate_hf_folder
    shutil.copy2(tiny_base / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    err = refused(world, key="model.path", match="pickle", base=tmp_path)
    assert "model.allow_pickle=true" in err.fix
    assert validate_hf_folder(tmp_path, "model.path", allow_pickle=True) == tmp_path.resolve()


def test_pickle_only_adapter_is_refused(world, tiny_adapter, tmp_path):
    from safetensors.torch import load_file
    shutil.copy2(tiny_adapter / "adapter_config.json", tmp_path / "adapter_config.json")
    torch.save(load_file(tiny_adapter / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    refused(world, key="adapter.path", match="pickle", adapter=tmp_path)


def test_trust_remote_code_stays_off(world, tiny_base, tmp_path):
    """A base folder whose config points at its own Python code: the code never runs, and the
    merged folder carries no code for a later step to run."""
    from quantpipe.data import topics_text
    from quantpipe.merge import merge_adapter
    assert world["cfg"]().model.trust_remote_code is False
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    marker = tmp_path / "code-ran"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                           "from transformers import LlamaForCausalLM as Evil\n")
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (base / "config.json").write_text(json.dumps(cfg))
    for stream in (None, 0.0):  # peft in RAM, and streamed
        out = tmp_path / f"out-{stream}"
        merge_adapter(base, None, out, topics_text("eval"), 16, 0.9, stream_above_gb=stream)
        assert not marker.exists()
        assert not list(out.glob("*.py"))


# --- the adapter ------------------------------------------------------------------------------

def test_adapter_folder_without_config(world, tiny_adapter, tmp_path):
    shutil.copy2(tiny_adapter / "adapter_model.safetensors", tmp_path)
    refused(world, key="adapter.path", match="no adapter_config.json", adapter=tmp_path)


def test_adapter_for_another_hidden_size(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    refused(world, "merge.parity_tokens=30", key="adapter.path", match="does not fit",
            adapter=tmp_path)


def test_adapter_for_another_architecture(world, tmp_path):
    """A GPT-2 LoRA (fused c_attn) handed to the Llama base."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
                   ).save_pretrained(tmp_path)
    refused(world, "merge.parity_tokens=30", key="adapter.path",
            match="targets modules the base model lacks: ['c_attn']", adapter=tmp_path)


def test_adapter_targeting_modules_the_base_lacks(world, tiny_adapter, tmp_path):
    shutil.copytree(tiny_adapter, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "W_pack"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    refused(world, "merge.parity_tokens=30", key="adapter.path", match="['W_pack']",
            adapter=tmp_path / "a")
    assert no_stage_ran(world)  # the preflight reads the module names from the headers


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("words, expect", [
    (["+quant=int5"], ["Could not find 'quant/int5'", "int4", "gguf_q4_k_m"]),
    (["+quant=int4", "eval.n_ctx"], ["Error parsing override 'eval.n_ctx'"]),
    (["+quant=int4", "quant.typo=1"], ["Could not override 'quant.typo'", "+quant.typo=1"]),
])
def test_command_line_errors_name_the_word(tmp_path, words, expect):
    """Unknown quant name, malformed override, misspelt key: Hydra refuses before any work, in
    one line (quantpipe.cli) and exit code 2."""
    res = subprocess.run([sys.executable, "-m", "pipelines.run", f"paths.root={tmp_path}", *words],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    for text in expect:
        assert text in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())  # no mlruns/, artifacts/ or outputs/ created


# --- quantisation and evaluation --------------------------------------------------------------

def test_unknown_gguf_type_is_refused_before_any_run(world):
    """The backend checks its options right after composition (quantpipe.schema): no MLflow
    run, no stage."""
    cfg = world["cfg"]("quant.type=q9_z", quant="gguf")
    n_before = len(variant_runs(cfg))
    f16 = world["root"] / "artifacts" / "gguf-f16"  # the FP16 reference of earlier runs has one
    f16_before = sorted(f16.iterdir()) if f16.exists() else []
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert e.value.key == "quant.type" and "'q9_z' is not a llama.cpp quantisation type" in str(e.value)
    assert "q4_k_m" in e.value.fix and "q8_0" in e.value.fix
    assert (sorted(f16.iterdir()) if f16.exists() else []) == f16_before  # nothing converted
    assert len(variant_runs(cfg)) == n_before
    assert snapshot(world["published"]) == world["before"]


def test_eval_text_missing(world):
    refused(world, f"eval.text_file={world['root']}/no-such.txt", key="eval.text_file",
            match="does not exist")


def test_tasks_file_missing_or_malformed_is_refused_before_the_stages(world, tmp_path):
    """Checked in the preflight, not when the evaluation first reads it: no stage run starts."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "2+2?"}\n')
    for name, match in (("no-such.jsonl", "does not exist"),
                        ("bad.jsonl", "line 1 lacks a string prompt or reference")):
        refused(world, f"eval.tasks_file={tmp_path}/{name}", key="eval.tasks_file", match=match)
        assert no_stage_ran(world)


def test_eval_text_shorter_than_one_window(world, tmp_path):
    (tmp_path / "short.txt").write_text("Too short to score.")
    refused(world, f"eval.text_file={tmp_path}/short.txt", key="eval.text_file",
            match="fewer than one window (eval.n_ctx=64)")
    assert no_stage_ran(world)  # counted before the merge, not by the evaluation


def write_gguf(path: Path) -> None:
    import gguf
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float16))
    w.add_tensor("output.weight", np.ones((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("damage", ["truncated tail", "truncated header", "not gguf"])
def test_broken_gguf_is_refused_before_llama_cpp_loads_it(tmp_path, damage):
    from quantpipe.evaluate.llama_cpp_runtime import check_gguf
    f = tmp_path / "model.gguf"
    write_gguf(f)
    check_gguf(f)  # the intact file passes
    data = f.read_bytes()
    f.write_bytes({"truncated tail": data[:-100], "truncated header": data[:40],
                   "not gguf": b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + data[10:]}[damage])
    with pytest.raises(ConfigError) as e:
        check_gguf(f)
    assert e.value.key == str(f) and "run the pipeline again" in e.value.fix
    assert ("not a GGUF" if damage == "not gguf" else "truncated") in e.value.problem


# --- where things are written ----------------------------------------------------------------

def test_read_only_output_folder_is_refused_before_the_stages(world):
    with read_only(world["published"]):
        refused(world, key="paths.quantized", match="is not writable")
    assert no_stage_ran(world)


def test_publish_path_cannot_escape_the_output_folder(world):
    for bad in ("../../escaped", "/tmp/escaped-model", "."):
        refused(world, f"quant.publish={bad}", key="quant.publish", match="is not a path inside")
    assert not (world["root"].parent.parent / "escaped").exists()


def test_not_enough_disk_for_the_next_artefact(world):
    """The margin is configurable; a huge one stands in for a full disk. A stage that must build
    (a new merge fingerprint) stops before writing a byte."""
    def merges():
        return {p for p in (world["root"] / "artifacts" / "merge").iterdir()
                if not p.name.endswith(".lock")}
    before = merges()
    refused(world, "merge.parity_tokens=29", "disk.margin_gb=1000000", key="disk.margin_gb",
            match="the merge stage needs about")
    assert merges() == before


def test_small_disk_really_full(world, tmp_path):
    """A real 2 MiB file system for artifacts/ (root only: mount tmpfs); the merge (7 MB) is
    refused by its estimate, not by ENOSPC halfway through a write."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        refused(world, f"paths.artifacts={small}", "disk.margin_gb=0", key="disk.margin_gb",
                match="the merge stage needs about")
        assert not [p for p in (small / "merge").iterdir() if not p.name.endswith(".lock")]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_mlflow_store_unwritable(world, tmp_path):
    with read_only(tmp_path / "ro"):
        with pytest.raises(ConfigError) as e:
            run(world["cfg"](f"tracking.uri=sqlite:///{tmp_path}/ro/mlflow.db"))
    assert e.value.key == "tracking.uri" and "is not writable" in e.value.problem
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="tracking.uri"):
        run(world["cfg"](f"tracking.uri=sqlite:///{tmp_path}/file/mlflow.db"))
    assert snapshot(world["published"]) == world["before"]


def test_servers_bind_to_loopback():
    """make ui (MLflow) listens on 127.0.0.1 only; nothing in the Makefile or configs binds
    every interface."""
    res = subprocess.run(["make", "-n", "ui"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert "--host 127.0.0.1" in res.stdout, res.stdout
    for f in [PROJECT_ROOT / "Makefile", *(PROJECT_ROOT / "conf").rglob("*.yaml")]:
        assert "0.0.0.0" not in f.read_text(), f
