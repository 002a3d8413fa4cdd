"""The Day-2 LoRA adapter: check a user's peft folder, or train the demo stand-in.

    make adapter          # trains the demo adapter on the default base (a few CPU minutes)

The demo adapter is an ordinary peft LoRA trained on the 'train' split of pydoc_data.topics
(see quantpipe.data); the evaluation and calibration splits are never trained on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)
RECIPE = 1  # bump when the demo adapter trains differently from the same inputs
LIBRARIES = ("peft", "transformers", "torch")  # their versions are in the cache key


def validate_adapter_folder(path: Path, allow_pickle: bool = False) -> Path:
    """A peft folder: adapter_config.json and safetensors weights (a pickle adapter_model.bin
    only with model.allow_pickle=true: loading a pickle can run code)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError("adapter.path", f"{path} is not a folder",
                          "point it at a peft adapter folder, or use adapter=none")
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        raise ConfigError("adapter.path", f"{path} has no adapter_config.json",
                          "point it at the folder written by PeftModel.save_pretrained()")
    try:
        json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("adapter.path", f"{cfg} is not valid JSON ({e})",
                          "save the adapter again") from e
    if not (path / "adapter_model.safetensors").is_file():
        if not any(path.glob("adapter_model.*")):
            raise ConfigError("adapter.path", f"{path} has no adapter_model.safetensors",
                              "save the adapter again with PeftModel.save_pretrained()")
        if not allow_pickle:
            raise ConfigError("adapter.path", f"{path} has only pickle weights "
                              "(adapter_model.bin); pickles can run code when loaded",
                              "save it with safe_serialization=True, or set "
                              "model.allow_pickle=true if you trust the file")
    return path


def train_demo_adapter(base: Path, out: Path, train: dict, seed: int, threads: int | None) -> dict:
    """Train a small LoRA with peft on the training split and save it as a peft folder."""
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantpipe.data import topics_file, topics_text

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=train["r"], lora_alpha=train["alpha"], lora_dropout=train["dropout"],
                      target_modules=list(train["target_modules"]), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    ids = torch.tensor(tok(topics_text("train"))["input_ids"])
    n = train["seq_len"]
    windows = ids[: len(ids) // n * n].view(-1, n)
    opt = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=train["lr"])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in (bar := tqdm(range(train["steps"]), desc="train demo LoRA", unit="step")):
        batch = windows[torch.randint(len(windows), (train["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        mlflow.log_metric("train_loss", losses[-1], step=step)
    model.save_pretrained(out)
    tail = losses[-10:]
    return {"metrics": {"train_loss_first": losses[0], "train_loss_last10": sum(tail) / len(tail)},
            "train_text": f"{topics_file()}#train", "train_tokens": int(len(ids))}
