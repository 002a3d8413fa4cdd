"""Streaming (shard-by-shard) LoRA merge: the same weights as peft's merge_and_unload, on a
sharded base, and the same refusals for adapters that do not fit.

    .venv/bin/python -m pytest -q tests/test_streaming.py
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantpipe.data import topics_text
from quantpipe.errors import ConfigError
from quantpipe.merge import merge_adapter
from quantpipe.streaming import INDEX, merge_lora_streaming, read_header, shard_files


def tensors(folder):
    out = {}
    for f in shard_files(folder):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, tiny_base):
    """The tiny base re-saved in 4 shards with an index, as large models are."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float16)
    out = tmp_path_factory.mktemp("sharded-base")
    model.save_pretrained(out, max_shard_size="2MB")
    for f in tiny_base.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy2(f, out / f.name)
    assert len(shard_files(out)) > 1 and (out / INDEX).is_file()
    return out


@pytest.fixture(scope="module")
def peft_merged(tmp_path_factory, sharded_base, tiny_adapter):
    out = tmp_path_factory.mktemp("peft-merged")
    merge_adapter(sharded_base, tiny_adapter, out, topics_text("eval"), 32, 0.9)
    return out


def test_streaming_merge_gives_the_same_bits_as_peft(tmp_path, sharded_base, tiny_adapter,
                                                     peft_merged):
    res = merge_adapter(sharded_base, tiny_adapter, tmp_path, topics_text("eval"), 32, 0.9,
                        stream_above_gb=0.0)  # forces the streaming path on the tiny model
    assert res["metrics"]["merge_streamed"] == 1.0
    assert res["metrics"]["merge_tensors_changed"] == 4  # q_proj and v_proj of 2 layers
    streamed, peft = tensors(tmp_path), tensors(peft_merged)
    assert streamed.keys() == peft.keys()
    base = tensors(sharded_base)
    changed = [k for k in streamed if not torch.equal(streamed[k], base[k])]
    assert sorted(changed) == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight"
                                     for i in (0, 1) for m in "qv")
    for k in streamed:
        assert streamed[k].dtype == torch.float16
        assert torch.equal(streamed[k], peft[k]), k  # float32 math, one rounding: bit-identical
    # a loadable HF folder, same shards and index as the base, no code files
    assert [f.name for f in shard_files(tmp_path)] == [f.name for f in shard_files(sharded_base)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 2 for t in streamed.values())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = AutoModelForCausalLM.from_pretrained(peft_merged, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_streaming_without_adapter_casts_to_fp16(tmp_path, tiny_base):
    merge_lora_streaming(tiny_base, None, tmp_path)
    h = read_header(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"F16"}
    assert all(torch.equal(a, b) for a, b in zip(tensors(tmp_path).values(),
                                                 tensors(tiny_base).values()))
    assert (tmp_path / "tokenizer.json").is_file()


def test_streaming_scale_follows_rslora_and_alpha_pattern(tmp_path, tiny_base, tiny_adapter):
    """scale = alpha / sqrt(r) with use_rslora; alpha_pattern overrides per module."""
    adapter = tmp_path / "rs"
    shutil.copytree(tiny_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(use_rslora=True, alpha_pattern={"v_proj": 2})
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merge_lora_streaming(tiny_base, adapter, tmp_path / "out")
    out, base = tensors(tmp_path / "out"), tensors(tiny_base)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as st:
        a = st.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")
        b = st.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    k = "model.layers.0.self_attn.v_proj.weight"
    expect = (base[k].float() + (b.float() @ a.float()) * (2 / a.shape[0] ** 0.5)).half()
    assert torch.equal(out[k], expect)


def test_streaming_refuses_adapter_for_missing_modules(tmp_path, tiny_base,
                                                      adapter_missing_modules):
    with pytest.raises(ConfigError, match="adapter.path.*query_key_value"):
        merge_lora_streaming(tiny_base, adapter_missing_modules, tmp_path / "out")


def test_streaming_refuses_adapter_for_another_hidden_size(tmp_path, tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))
    adapter = tmp_path / "other"
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    with pytest.raises(ConfigError, match="does not fit.*hidden size"):
        merge_lora_streaming(tiny_base, adapter, tmp_path / "out")

