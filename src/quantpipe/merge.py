"""Merge a LoRA adapter into the base with peft and prove the merge is faithful.

Merging happens in float32 (W + B·A·scale, one rounding at the end), then the model is saved as
FP16 safetensors. Parity is measured on a fixed batch of held-out text: the unmerged
base+adapter against (a) the merged float32 model and (b) the FP16 folder as saved. Both are
logged; (b) is the one that matters downstream and is held to `merge.min_top1_agreement`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)
RECIPE = 1  # bump when the merged weights change for the same base and adapter
LIBRARIES = ("peft", "transformers", "torch")  # their versions are in the cache key
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def _logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def parity(reference, candidate) -> dict[str, float]:
    """Max |logit difference| and top-1 agreement between two [B, T, V] logit tensors."""
    diff = (reference - candidate).abs().max().item()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return {"max_abs_logit_diff": diff, "top1_agreement": agree}


def check_adapter_fits(base_model, adapter: Path) -> None:
    """Fail early, naming adapter.path, when the adapter targets modules the base lacks."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regex: leave the check to peft
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in base_model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError("adapter.path", f"{adapter} targets modules the base model lacks: "
                          f"{missing} (base is {base_model.config.model_type})",
                          "use an adapter trained on this base model (model.path)")


def merge_adapter(base: Path, adapter: Path | None, out: Path, text: str,
                  parity_tokens: int, min_top1_agreement: float,
                  stream_above_gb: float | None = None) -> dict:
    """Merge in RAM with peft (and check logit parity), or, for a base whose FP16 weights
    exceed `stream_above_gb`, shard by shard (quantpipe.streaming: peak RAM near one shard)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantpipe import streaming
    safetensors = any(Path(base).glob("*.safetensors"))
    if safetensors and stream_above_gb is not None:
        fp16_gb = 2 * streaming.n_params(base) / 2**30
        if fp16_gb > stream_above_gb:
            log.info("merge: %.1f GiB FP16 > merge.stream_above_gb=%s: streaming shard by shard",
                     fp16_gb, stream_above_gb)
            return streaming.merge_lora_streaming(Path(base), adapter and Path(adapter), Path(out))
    tok = AutoTokenizer.from_pretrained(base)
    # safetensors whenever the folder has them: a pickle (.bin) is never loaded by default
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 use_safetensors=safetensors or None)
    ids = torch.tensor([tok(text)["input_ids"][:parity_tokens]])
    metrics: dict[str, float] = {}
    if adapter is None:
        merged = model
    else:
        check_adapter_fits(model, adapter)
        base_logits = _logits(model, ids)
        try:
            peft_model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError("adapter.path", f"{adapter} does not fit the base model {base}: "
                              f"{str(e).splitlines()[0][:300]}",
                              "use an adapter trained on this base model") from e
        unmerged = _logits(peft_model, ids)
        merged = peft_model.merge_and_unload()
        metrics.update({f"merge_{k}": v for k, v in parity(unmerged, _logits(merged, ids)).items()})
        metrics["adapter_effect_max_abs_logit_diff"] = (unmerged - base_logits).abs().max().item()
    merged.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for name in TOKENIZER_FILES:  # keep the chat template and generation defaults as they were
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)
    if adapter is not None:
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
        p = parity(unmerged, _logits(saved, ids))
        metrics.update({f"merge_saved_{k}": v for k, v in p.items()})
        log.info("merge parity: float32 %s, saved fp16 %s",
                 {k: round(v, 5) for k, v in metrics.items() if k.startswith("merge_m")}, p)
        if p["top1_agreement"] < min_top1_agreement:
            raise RuntimeError(f"merge parity failed: top-1 agreement {p['top1_agreement']:.3f} "
                               f"< merge.min_top1_agreement={min_top1_agreement}")
    metrics["n_params"] = float(sum(p.numel() for p in merged.parameters()))
    return {"metrics": metrics}
