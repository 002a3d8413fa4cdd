"""llm-compressor's oneshot on a merged FP16 folder, run in the isolated .venv-llmc (make llmc).

    .venv-llmc/bin/python src/quantpipe/quantize/llmc_oneshot.py SPEC.json

Run as a file by quantpipe.quantize.llmc (never imported by the main environment): llmcompressor
0.14.0.1 pins transformers <=5.17.0 and compressed-tensors ==0.19.0, the pipeline pins
transformers 5.23.0. So this file imports nothing from quantpipe. SPEC.json holds src, dst, the
calibration text file, samples, seq_len, threads, compute_dtype, targets, ignore, the weight
and activation quantisation arguments (compressed-tensors QuantizationArgs) and the modifiers
in order, e.g.
[{"SmoothQuantModifier": {"smoothing_strength": 0.8}}, {"GPTQModifier": {}}]. The modifiers
that quantise (GPTQ, plain round-to-nearest) get the scheme as config_groups; a recipe of
transforms only (AWQ) is followed by round-to-nearest.

Group size: the configured one (128) where a layer's input dimension allows it, else the largest
power of two below it that divides the dimension (SmolLM2's 576-wide projections get 64,
its 1536-wide down_proj keeps 128): compressed-tensors refuses a group that does not divide.
`activation_overrides` ([{targets, input_activations}]) gives the layers it names another
activation scheme (dynamic per token, or null: 16-bit) in a config group of their own;
`save_format` (null: llm-compressor's choice) the compressed-tensors format of the folder.

Two checks run on the first calibration windows (SCORED_WINDOWS): the output error of the
quantised model against the float model before oneshot (KL over the float model's top-k tokens
plus a tail bucket, as the evaluation measures it: `calib_kld`), and, where activations are
quantised, each Linear input's range and its int8 error per tensor vs per token
(`activations` in the result; see InputStats). Where AWQ runs, its own scale search is recorded
per mapping (`awq` in the result; see AwqProbe): what the searched scales left of the error of
plain rounding, and how far the input channels' mean |x| stands out, AWQ's premise.
Writes dst (compressed-tensors folder + tokenizer + recipe.yaml) and dst/llmc_result.json.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

MODIFIERS = {  # class name -> module, as llm-compressor 0.14 lays them out
    "GPTQModifier": "llmcompressor.modifiers.quantization",
    "QuantizationModifier": "llmcompressor.modifiers.quantization",
    # transforms: they rescale weights and quantise nothing (0.14 moved them here; the old
    # llmcompressor.modifiers.awq.AWQModifier is a shim returning [AWQ, QuantizationModifier])
    "AWQModifier": "llmcompressor.modifiers.transform",
    "SmoothQuantModifier": "llmcompressor.modifiers.transform",
}
QUANTISING = ("GPTQModifier", "QuantizationModifier")
# calibration windows the quantised model is scored on against the float model (its top-k log-probs
# kept: 16 x 256 positions x 64 floats, not 16 x 256 x 49152)
SCORED_WINDOWS = 16
TOP_K = 64


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> a compressed-tensors regex target for every layer's."""
    generic = re.sub(r"\.\d+\.", ".N.", name)
    return "re:" + re.escape(generic).replace(r"\.N\.", r"\.\d+\.") + "$"


def group_for(in_features: int, group_size: int) -> int:
    g = group_size
    while g > 1 and in_features % g:
        g //= 2
    return g


def matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' target rule for a module name: `re:<regex>` or the name's suffix."""
    return any(re.match(t[3:], name) if t.startswith("re:") else name.endswith(t)
               for t in targets)


def config_groups(model, spec: dict) -> tuple[dict, dict]:
    """config_groups for the scheme: one group per (group size, activation scheme) the layers
    need (the default activations, or those of the first `activation_overrides` entry naming
    the layer); and a summary {group size: layer patterns}."""
    import torch
    weights, acts = dict(spec["weights"]), spec.get("input_activations")
    overrides = spec.get("activation_overrides") or []
    by_key: dict[tuple[int, int], set[str]] = {}  # (group size, override index or -1) -> targets
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name.endswith(i) for i in spec["ignore"]):
            continue
        g = group_for(mod.in_features, weights["group_size"]) \
            if weights.get("strategy") == "group" else 0
        which = next((i for i, o in enumerate(overrides) if matches(name, o["targets"])), -1)
        # an override may name single layers (model.layers.3.mlp.down_proj): keep the name
        by_key.setdefault((g, which), set()).add(layer_pattern(name) if which < 0 else
                                                 "re:" + re.escape(name) + "$")
    groups = {}
    # the scheme's own groups first (larger groups first), then the overrides in their order
    for i, ((g, which), targets) in enumerate(sorted(by_key.items(),
                                                     key=lambda kv: (kv[0][1], -kv[0][0]))):
        w = {**weights, "group_size": g} if g else weights
        groups[f"group_{i}"] = {"targets": sorted(targets), "weights": w,
                                "input_activations": overrides[which]["input_activations"]
                                if which >= 0 else acts}
    by_size: dict[str, list[str]] = {}
    for (g, _), targets in by_key.items():
        by_size.setdefault(str(g), []).extend(sorted(targets))
    return groups, by_size


def calibration(tok, text: str, samples: int, seq_len: int):
    """The calibration text cut into `samples` windows of `seq_len` tokens (fewer if short)."""
    from datasets import Dataset
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len] * len(rows)})


def build_modifiers(spec: dict, groups: dict) -> list:
    """The recipe's modifiers in order; the quantising ones get the scheme. A recipe of
    transforms only (AWQ) ends with round-to-nearest of the transformed weights
    (QuantizationModifier), as llm-compressor's AWQ recipes do."""
    import importlib
    entries = [next(iter(e.items())) for e in spec["modifiers"]]
    if not any(name in QUANTISING for name, _ in entries):
        entries.append(("QuantizationModifier", {}))
    out = []
    for name, kwargs in entries:
        if name not in MODIFIERS:
            raise SystemExit(f"unknown modifier {name}; one of {sorted(MODIFIERS)}")
        cls = getattr(importlib.import_module(MODIFIERS[name]), name)
        kwargs = dict(kwargs or {})
        if name in QUANTISING:
            kwargs.update(config_groups=groups, ignore=list(spec["ignore"]))
        out.append(cls(**kwargs))
    return out


def reference_topk(model, windows: list) -> list:
    """The float model's top-k log-probs on each window, before oneshot changes the model."""
    import torch
    refs = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            refs.append(logp.topk(TOP_K, -1))
    return refs


def tail(logp_top):
    """Probability outside the top-k (one bucket), kept above 0 for the log."""
    return (1 - logp_top.exp().sum(-1)).clamp_min(1e-10)


def output_error(model, windows: list, refs: list) -> dict:
    """KL(float || quantised) per position over the float model's top-k + tail (a lower bound
    of the full KL, as quantpipe.evaluate.metrics.kld_topk), and top-1 agreement."""
    import torch
    kld, agree, n = 0.0, 0.0, 0
    with torch.no_grad():
        for w, (p, idx) in zip(windows, refs):
            logq = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            q = logq.gather(-1, idx)
            kl = (p.exp() * (p - q)).sum(-1) + tail(p) * (tail(p).log() - tail(q).log())
            kld += float(kl.sum())
            agree += float((logq.argmax(-1) == idx[:, 0]).sum())
            n += len(w)
    return {"calib_kld": kld / n, "calib_top1_agree_pct": 100 * agree / n,
            "calib_tokens_scored": float(n)}


def fake_int8(x, scale):
    """Symmetric int8 quantise-dequantise as compressed-tensors does (scale = absmax / 127.5)."""
    return (x / scale).round().clamp(-128, 127) * scale


class InputStats:
    """Every quantised Linear's input over the scored windows: absmax, the 99.9th percentile of
    |x|, the largest channel's absmax over the median channel's (the outliers SmoothQuant
    moves), and the relative MSE ||x - q(x)||^2 / ||x||^2 of int8 fake quantisation with one
    scale per tensor (the absmax of all windows), one per token, and the calibrated static
    `input_scale` the folder stores. Forward pre-hooks see the input before the module's own
    fake quantisation (compressed-tensors quantises inside forward)."""

    def __init__(self, model):
        import torch
        self.modules = {n: m for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)
                        and getattr(getattr(m, "quantization_scheme", None), "input_activations",
                                    None) is not None}
        self.s = {n: {"absmax": 0.0, "numel": 0, "top": [], "channel": None, "sq": 0.0,
                      "err_tensor": 0.0, "err_token": 0.0, "err_static": 0.0}
                  for n in self.modules}

    def run(self, model, windows: list) -> None:
        """Two passes: ranges first (the per-tensor scale needs the absmax of every window)."""
        import torch
        for hook in (self.ranges, self.errors):
            handles = [m.register_forward_pre_hook(lambda mod, args, n=n, h=hook: h(n, args[0]),
                                                   prepend=True)
                       for n, m in self.modules.items()]
            try:
                with torch.no_grad():
                    for w in windows:
                        model(w[None])
            finally:
                for h in handles:
                    h.remove()

    def ranges(self, name: str, x) -> None:
        s, a = self.s[name], x.detach().float().abs().flatten(0, -2)
        s["absmax"] = max(s["absmax"], float(a.max()))
        s["numel"] += a.numel()
        s["top"].append(a.flatten().topk(max(1, a.numel() // 1000 + 1)).values)
        ch = a.amax(0)
        s["channel"] = ch if s["channel"] is None else s["channel"].maximum(ch)

    def errors(self, name: str, x) -> None:
        s, x = self.s[name], x.detach().float().flatten(0, -2)
        s["sq"] += float((x * x).sum())
        per_tensor = max(s["absmax"], 1e-12) / 127.5
        s["err_tensor"] += float(((x - fake_int8(x, per_tensor)) ** 2).sum())
        per_token = (x.abs().amax(-1, keepdim=True) / 127.5).clamp_min(1e-12)
        s["err_token"] += float(((x - fake_int8(x, per_token)) ** 2).sum())
        static = getattr(self.modules[name], "input_scale", None)
        if static is not None:
            s["err_static"] += float(((x - fake_int8(x, static.float())) ** 2).sum())

    def table(self) -> list[dict]:
        import torch
        rows = []
        for name, s in self.s.items():
            if not s["numel"]:
                continue
            top = torch.cat(s["top"]).sort(descending=True).values
            p999 = float(top[min(len(top) - 1, s["numel"] // 1000)])
            sq = max(s["sq"], 1e-30)
            static = getattr(self.modules[name], "input_scale", None)
            acts = self.modules[name].quantization_scheme.input_activations
            served = ("relmse_static" if not acts.dynamic else
                      "relmse_token" if acts.strategy == "token" else "relmse_tensor")
            rows.append({
                "layer": name, "absmax": s["absmax"], "p999": p999,
                "absmax_over_p999": s["absmax"] / max(p999, 1e-12),
                "channel_max_over_median": float(s["channel"].max()
                                                 / s["channel"].median().clamp_min(1e-12)),
                "relmse_tensor": s["err_tensor"] / sq, "relmse_token": s["err_token"] / sq,
                "static_scale_absmax": float(static.float().max()) * 127.5
                if static is not None else None,
                "relmse_static": s["err_static"] / sq if static is not None else None})
            rows[-1]["relmse_served"] = rows[-1][served]
        return rows


class AwqProbe:
    """AWQ's scale search, per mapping (a norm or projection and the Linears it feeds), read
    from llm-compressor's AWQModifier as it runs: the grid's first point is the identity scale
    (plain rounding; llm-compressor puts it first whatever `duo_scaling` says), so its
    `initial_error` / `best_error` (the parent module's output MSE) say what the searched scales
    bought per module. `channel_max_over_median` is the input channels' mean |x| (the statistic
    AWQ scales by) max over median: AWQ protects channels that stand out, and where none does
    its scales stay near 1 and it can only match round-to-nearest.

    Reads the modifier's private per-mapping state (`_smooth_activation_stats`,
    `_error_metrics`) around `_compute_best_scale`, which 0.14 deletes after each mapping; with
    another layout the probe records nothing and says so, and the oneshot is unchanged."""

    def __init__(self):
        self.rows: list[dict] = []
        self.missing: str | None = None

    def install(self) -> None:
        from llmcompressor.modifiers.transform import AWQModifier
        search = getattr(AWQModifier, "_compute_best_scale", None)
        if search is None:
            self.missing = "AWQModifier._compute_best_scale not found"
            return
        probe = self

        def probed(mod, mapping, *args, **kwargs):
            stats = getattr(mod, "_smooth_activation_stats", {}).get(mapping.smooth_name)
            scales = search(mod, mapping, *args, **kwargs)
            errors = getattr(mod, "_error_metrics", None) or [{}]
            probe.record(mapping, stats, scales, errors[-1])
            return scales

        AWQModifier._compute_best_scale = probed

    def record(self, mapping, stats, scales, err: dict) -> None:
        row = {"smooth": mapping.smooth_name,
               "balance": "+".join(n.rsplit(".", 1)[-1] for n in mapping.balance_names or []),
               "error_identity": err.get("initial_error"), "error_best": err.get("best_error"),
               "error_left": err.get("reduction"),
               "scale_max_over_min": float(scales.max() / scales.min().clamp(min=1e-12))}
        if stats is not None:
            x = (stats[0].double() / stats[1].double()).flatten()
            row["channel_max_over_median"] = float(x.max() / x.median().clamp(min=1e-12))
        self.rows.append(row)


def cpu_shims(torch) -> None:
    """AWQModifier pins its cached activations before each smoothing grid search, only to speed
    up host-to-GPU copies; pin_memory() raises on a machine with no accelerator ("Cannot access
    accelerator device"), so without one the pinning is skipped (same values, no transfer)."""
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main(spec_path: str) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = json.loads(Path(spec_path).read_text())
    cpu_shims(torch)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    src, dst = Path(spec["src"]), Path(spec["dst"])
    tok = AutoTokenizer.from_pretrained(src)
    # computed in spec's compute_dtype (float32 on CPU: float16 matmuls there are ~4x slower,
    # and AWQ's scale search overflowed to inf in float16 on SmolLM2's layer 11), saved in
    # float16 as stored (the kept tensors, e.g. the embedding, would double in float32)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, spec["compute_dtype"]))
    groups, summary = config_groups(model, spec)
    ds = calibration(tok, Path(spec["text_file"]).read_text(encoding="utf-8"), spec["samples"],
                     spec["seq_len"])
    scored = [torch.tensor(r) for r in ds["input_ids"][:SCORED_WINDOWS]]
    refs = reference_topk(model, scored)
    awq = AwqProbe()
    if any("AWQModifier" in m for m in spec["modifiers"]):
        awq.install()
    t0 = time.perf_counter()
    # data-free where nothing is calibrated (round-to-nearest weights): no pass over the windows
    oneshot(model=model, dataset=ds if spec["calibrate"] else None,
            recipe=build_modifiers(spec, groups), max_seq_length=spec["seq_len"],
            num_calibration_samples=len(ds), output_dir=None)
    oneshot_s = time.perf_counter() - t0
    # the model now computes as the folder will (fake-quantised weights, and activations where
    # the scheme quantises them): its error on calibration text, and its Linear inputs
    metrics = output_error(model, scored, refs)
    stats = InputStats(model)
    stats.run(model, scored)
    model.to(torch.float16)
    model.save_pretrained(dst, save_compressed=True, quantization_format=spec["save_format"])
    tok.save_pretrained(dst)
    (dst / "llmc_result.json").write_text(json.dumps({
        "metrics": {"oneshot_s": oneshot_s, "calib_samples": len(ds),
                    "calib_tokens": len(ds) * spec["seq_len"], **metrics},
        "group_sizes": summary, "activations": stats.table(),
        **({"awq": awq.rows} if awq.rows else {}),
        **({"awq_missing": awq.missing} if awq.missing else {})}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
