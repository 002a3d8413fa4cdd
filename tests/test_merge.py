"""LoRA merge: parity with the unmerged model, and clear errors for adapters that do not fit."""
import json

import pytest

from quantpipe.adapter import validate_adapter_folder
from quantpipe.data import topics_text
from quantpipe.errors import ConfigError
from quantpipe.merge import merge_adapter


def test_merge_matches_unmerged_model(tmp_path, tiny_base, tiny_adapter):
    res = merge_adapter(tiny_base, tiny_adapter, tmp_path, topics_text("eval"), 48, 0.9)
    m = res["metrics"]
    assert m["adapter_effect_max_abs_logit_diff"] > 1e-2        # the adapter changes outputs
    assert m["merge_max_abs_logit_diff"] < 1e-3                 # float32 merge is exact
    assert m["merge_top1_agreement"] == 1.0
    assert m["merge_saved_top1_agreement"] >= 0.95              # after the FP16 rounding
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dtype"] == "float16" or saved.get("torch_dtype") == "float16"
    assert not any(tmp_path.glob("adapter_*"))                  # a plain model, not peft


def test_merge_without_adapter_is_a_copy(tmp_path, tiny_base):
    res = merge_adapter(tiny_base, None, tmp_path, topics_text("eval"), 16, 0.9)
    assert res["metrics"]["n_params"] > 0
    assert (tmp_path / "tokenizer.json").is_file()


def test_adapter_for_missing_modules_is_refused(tmp_path, tiny_base, adapter_missing_modules):
    with pytest.raises(ConfigError, match="adapter.path.*query_key_value"):
        merge_adapter(tiny_base, adapter_missing_modules, tmp_path / "out", topics_text("eval"),
                      16, 0.9)


def test_adapter_for_another_hidden_size_is_refused(tmp_path, tiny_base, tokenizer_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))
    adapter = tmp_path / "other"
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    with pytest.raises(ConfigError, match="does not fit"):
        merge_adapter(tiny_base, adapter, tmp_path / "out", topics_text("eval"), 16, 0.9)


def test_adapter_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        validate_adapter_folder(tmp_path)
