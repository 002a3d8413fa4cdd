"""Activation outlier channels (AWQ's premise) of a causal LM: for the input of every linear layer
(q_proj = k/v's input, o_proj, gate_proj = up's input, down_proj), the per-input-channel mean |x|
and max |x| over 16 windows of 512 tokens of TEXT; reports max/median and p99/median across
channels per layer and, per projection kind, the median over layers and the worst layer.

    python scripts/float_model/outliers.py MODEL_DIR TEXT OUT.json

Used on the float subjects (report/float-wide/): AWQ gains where a few channels stand out 10-100x
the median; the pipeline's own AWQ runs log the same premise as `awq_channel_peak_median`.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file, out = sys.argv[1:4]
n_win, seq = 16, 512
dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
ids = tok(open(text_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
wins = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)][:n_win]
stats = {}


def hook(name):
    def f(mod, inp):
        x = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs()
        s = stats.setdefault(name, {"sum": 0, "max": 0, "n": 0})
        s["sum"] = s["sum"] + x.sum(0)
        s["max"] = torch.maximum(torch.as_tensor(s["max"], device=x.device), x.max(0).values)
        s["n"] += x.shape[0]
    return f


for name, mod in model.named_modules():
    if name.split(".")[-1] in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        mod.register_forward_pre_hook(hook(name))
with torch.no_grad():
    for w in wins:
        model(torch.tensor([w], device=dev))
rows = {}
for name, s in stats.items():
    mean = (s["sum"] / s["n"]).cpu().numpy()
    mx = s["max"].cpu().numpy()
    med, medx = np.median(mean), np.median(mx)
    rows[name] = {"mean_max/med": float(mean.max() / med), "mean_p99/med": float(
        np.percentile(mean, 99) / med), "absmax_max/med": float(mx.max() / medx),
        "absmax_p99/med": float(np.percentile(mx, 99) / medx),
        "n_mean_gt_5x_med": int((mean > 5 * med).sum()), "channels": int(mean.size)}
summary = {}
for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
    r = [v for k, v in rows.items() if k.endswith(kind)]
    summary[kind] = {m: round(float(np.median([x[m] for x in r])), 2) for m in r[0]}
    summary[kind]["mean_max/med_worst"] = round(max(x["mean_max/med"] for x in r), 2)
    summary[kind]["absmax_max/med_worst"] = round(max(x["absmax_max/med"] for x in r), 2)
json.dump({"model": Path(model_dir).name, "windows": len(wins), "seq": seq, "summary_median_over_layers":
           summary, "layers": rows}, open(out, "w"), indent=1)
print(json.dumps(summary, indent=1))
