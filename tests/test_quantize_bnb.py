"""bitsandbytes INT8 / INT4 folders: smaller than FP16, reload, and reproduce the live model."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantpipe.evaluate import weights_size
from quantpipe.quantize.bnb import quantize_int4, quantize_int8


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_base, tiny_adapter):
    from quantpipe.data import topics_text
    from quantpipe.merge import merge_adapter
    out = tmp_path_factory.mktemp("merged")
    merge_adapter(tiny_base, tiny_adapter, out, topics_text("eval"), 16, 0.9)
    return out


def _reload_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    with torch.no_grad():
        return model(input_ids=torch.arange(10, 42)[None]).logits


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_int4_saved_before_forward_reloads_identically(tmp_path, merged, quant_type):
    res = quantize_int4(merged, tmp_path, None, quant_type=quant_type)
    assert res["metrics"]["save_reload_max_abs_logit_diff"] <= 1e-3
    cfg = (tmp_path / "config.json").read_text()
    assert '"load_in_4bit": true' in cfg and quant_type in cfg
    # a second reload agrees with the first: the saved weights are stable
    assert torch.allclose(_reload_logits(tmp_path), _reload_logits(tmp_path))


def test_int8_reloads(tmp_path, merged):
    res = quantize_int8(merged, tmp_path, None, threshold=6.0)
    assert res["metrics"]["save_reload_max_abs_logit_diff"] <= 1e-3
    assert '"load_in_8bit": true' in (tmp_path / "config.json").read_text()


def test_sizes_int4_below_int8_below_fp16(tmp_path, merged):
    quantize_int8(merged, tmp_path / "i8", None)
    quantize_int4(merged, tmp_path / "i4", None)
    assert weights_size(tmp_path / "i4") < weights_size(tmp_path / "i8") < weights_size(merged)
