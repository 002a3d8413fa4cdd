"""Which variant to deploy, per scenario, computed from the runs' metrics (nothing is written in
advance): max fidelity (lowest mean KLD vs FP16 among quantised variants), smallest passing the
quality gate, fastest CPU decode passing the gate, and GPU serving (fastest GPU decode among
formats whose CPU run passed the gate). Each answer carries its reason with the numbers, the
95 % interval of ΔPPL and the share of the fine-tune's gain kept; `finetune_note` says which
variants ended worse than the model before fine-tuning.
"""
from __future__ import annotations

from quantpipe.names import Gate, Metric, Tag
from quantpipe.report.tables import interval, metric, no_finetune


def pareto_front(rows: list[dict], x: str = Metric.SIZE_MB, y: str = Metric.DELTA_PPL_PCT
                 ) -> list[dict]:
    """Variants no other variant beats on both axes (smaller and closer to FP16)."""
    pts = sorted((r for r in rows if x in r["metrics"] and y in r["metrics"]),
                 key=lambda r: (r["metrics"][x], r["metrics"][y]))
    front, best_y = [], float("inf")
    for r in pts:
        if r["metrics"][y] < best_y:
            front.append(r)
            best_y = r["metrics"][y]
    return front


def _gate(r: dict) -> str:
    """The run's gate bounds, from its params (a null bound is logged as "None")."""
    limits = []
    if (bound := r["params"].get("gate.max_delta_ppl_pct", "None")) != "None":
        limits.append(f"ΔPPL ≤ {bound} %")
    if (bound := r["params"].get("gate.max_kld", "None")) != "None":
        limits.append(f"KLD ≤ {bound}")
    if (bound := r["params"].get("gate.min_finetune_retention_pct", "None")) != "None":
        limits.append(f"fine-tune kept ≥ {bound} %")
    mode = r["params"].get("gate.use_interval")
    return (" and ".join(limits) or "no bound") + (f", judged {mode}" if mode else "")


def _kept(r: dict) -> str:
    """", keeps X % [CI] of the fine-tune's gain" (nothing without a retention figure)."""
    if "finetune_retention_pct" not in r["metrics"]:
        return ""
    return (f", keeps {metric(r, 'finetune_retention_pct', 1)} % "
            f"{interval(r, 'finetune_retention', 1)} of the fine-tune's gain")


def finetune_note(cpu: list[dict]) -> str:
    """What quantisation did to the fine-tune: the base and merged PPL, and the variants that
    ended worse than the model before fine-tuning (retention below 0)."""
    if cpu and all(no_finetune(r) for r in cpu):
        return "no fine-tune (adapter=none): the base model was quantised as it is"
    with_base = [r for r in cpu if "base_ppl" in r["metrics"]]
    if not with_base:
        return "no base-model score in these runs (no fine-tune retention measured)"
    r = with_base[0]
    text = (f"the base model before fine-tuning scores PPL {metric(r, 'base_ppl', 3)}, the merged "
            f"FP16 {metric(r, 'ppl_fp16', 3)} (run {r['run_id'][:8]})")
    lost = [f"{v['name']} ({metric(v, 'finetune_retention_pct', 1)} % "
            f"{interval(v, 'finetune_retention', 1)})" for v in with_base
            if v["metrics"].get("finetune_retention_pct", 100.0) < 0]
    return text + ("; worse than the base model, the whole fine-tune lost: " + ", ".join(lost)
                   if lost else "; every variant keeps part of the fine-tune's gain or more")


def pick(rows: list[dict], key: str, largest: bool = False) -> dict | None:
    ok = [r for r in rows if key in r["metrics"]]
    return (max if largest else min)(ok, key=lambda r: r["metrics"][key], default=None)


def recommendations(cpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """[(scenario, chosen row or None, reason)] of the CPU scenarios (the formats' and runtimes'
    own follow, quantpipe.report.sections, then `gpu_serving`)."""
    passed = [r for r in cpu if r["gate"] == Gate.PASSED]
    fp16 = next((r for r in cpu if r["method"] == "none"), None)
    out = []

    r = pick([r for r in cpu if r["method"] != "none"], Metric.KLD_MEAN)
    out.append(("Max fidelity", r, "no quantised variant has a KLD" if r is None else
                f"lowest mean KLD vs FP16 of the quantised variants: {metric(r, 'kld_mean', 5)} "
                f"nats (p99 {metric(r, 'kld_p99', 4)}), top-1 agreement "
                f"{metric(r, 'top1_agree_pct', 2)} %, ΔPPL {metric(r, 'delta_ppl_pct', 2)} % "
                f"{interval(r, 'delta_ppl', 2)}, {metric(r, 'size_mb', 2)} MB{_kept(r)}"))

    r = pick(passed, Metric.SIZE_MB)
    smaller_failed = "".join(
        f"; smaller but failed the gate: {f['name']} {metric(f, Metric.SIZE_MB, 2)} MB "
        f"({f['tags'].get(Tag.GATE_REASON, 'over the bound')})" for f in cpu
        if r is not None and f["gate"] == Gate.FAILED
        and f["metrics"].get(Metric.SIZE_MB, float("inf")) < r["metrics"][Metric.SIZE_MB])
    out.append(("Smallest (passes the gate)", r, "no variant passes the gate" if r is None else
                f"{metric(r, 'size_mb', 2)} MB ({metric(r, 'compression', 2)}× smaller than "
                f"FP16, {metric(r, 'bits_per_weight', 2)} bits/weight) with ΔPPL "
                f"{metric(r, 'delta_ppl_pct', 2)} % {interval(r, 'delta_ppl', 2)} and KLD "
                f"{metric(r, 'kld_mean', 5)} inside the gate ({_gate(r)}){_kept(r)}"
                f"{smaller_failed}"))

    r = pick(passed, Metric.DECODE_TOK_S, largest=True)
    vs = (f", FP16 decodes {metric(fp16, Metric.DECODE_TOK_S, 1)} tok/s"
          if fp16 is not None and r is not fp16 else "")
    out.append(("Fastest on CPU (passes the gate)", r, "no variant passes the gate" if r is None
                else f"{metric(r, 'decode_tok_s', 1)} tok/s decode, TTFT {metric(r, 'ttft_ms', 1)} "
                f"ms at {r['params'].get('threads', '?')} threads{vs}; ΔPPL "
                f"{metric(r, 'delta_ppl_pct', 2)} % {interval(r, 'delta_ppl', 2)}{_kept(r)}"))
    return out


def gpu_serving(cpu: list[dict], gpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """Per model shape: the fastest GPU decode of a format whose CPU run passed the gate (or has
    no CPU run: its quality is then unmeasured, and the reason says so)."""
    if not gpu:
        return [("GPU serving", None, "no gpu_bench runs in this experiment")]
    gate_of = {c["name"]: c["gate"] for c in cpu}
    out = []
    for shape in sorted({g["tags"].get(Tag.SHAPE, "?") for g in gpu}):
        ok = [g for g in gpu if g["tags"].get(Tag.SHAPE, "?") == shape
              and gate_of.get(g["name"], Gate.PASSED) == Gate.PASSED]
        r = pick(ok, Metric.DECODE_TOK_S, largest=True)
        quality = ("its CPU run passed the gate" if r is not None and r["name"] in gate_of
                   else "the FP16 reference itself" if r is not None and r["method"] == "none"
                   else "its quality was not measured on CPU")
        # the process's own GPU memory (NVML) where every row has it: torch's allocator counter
        # leaves out the CUDA context that llama.cpp's figure includes
        mem = (Metric.GPU_PROCESS_PEAK_MB if ok and all(Metric.GPU_PROCESS_PEAK_MB in g["metrics"]
                                                        for g in ok) else Metric.PEAK_GPU_MB)
        small = pick(ok, mem)
        if small is not None and small is not r:
            quality += (f"; least memory: {small['name']}, {metric(small, mem, 0)} MB "
                        f"at {metric(small, 'decode_tok_s', 1)} tok/s")
        out.append((f"GPU serving ({shape})", r, "no GPU run of a gate-passing format"
                    if r is None else f"{metric(r, 'decode_tok_s', 1)} tok/s decode "
                    f"({r['tags'].get('eval.runtime', 'transformers')}), GPU memory "
                    f"{metric(r, mem, 0)} MB on "
                    f"{r['tags'].get('hardware.gpu', '?')}; {quality}"))
    return out
