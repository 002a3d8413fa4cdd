"""Which variant to deploy, per scenario, computed from the runs' metrics (nothing is written in
advance): max fidelity (lowest mean KLD vs FP16 among quantised variants), smallest passing the
quality gate, fastest CPU decode passing the gate, and GPU serving (fastest GPU decode among
formats whose CPU run passed the gate). Each answer carries its reason with the numbers.
"""
from __future__ import annotations

from quantpipe.report.tables import metric


def pareto_front(rows: list[dict], x: str = "size_mb", y: str = "delta_ppl_pct") -> list[dict]:
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
    return " and ".join(limits) or "no bound"


def _pick(rows: list[dict], key: str, largest: bool = False) -> dict | None:
    ok = [r for r in rows if key in r["metrics"]]
    return (max if largest else min)(ok, key=lambda r: r["metrics"][key], default=None)


def recommendations(cpu: list[dict], gpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """[(scenario, chosen row or None, reason)]"""
    passed = [r for r in cpu if r["gate"] == "passed"]
    fp16 = next((r for r in cpu if r["method"] == "none"), None)
    out = []

    r = _pick([r for r in cpu if r["method"] != "none"], "kld_mean")
    out.append(("Max fidelity", r, "no quantised variant has a KLD" if r is None else
                f"lowest mean KLD vs FP16 of the quantised variants: {metric(r, 'kld_mean', 5)} "
                f"nats (p99 {metric(r, 'kld_p99', 4)}), top-1 agreement "
                f"{metric(r, 'top1_agree_pct', 2)} %, ΔPPL {metric(r, 'delta_ppl_pct', 2)} %, "
                f"{metric(r, 'size_mb', 2)} MB"))

    r = _pick(passed, "size_mb")
    smaller_failed = "".join(
        f"; smaller but failed the gate: {f['name']} {metric(f, 'size_mb', 2)} MB "
        f"({f['tags'].get('gate.reason', 'over the bound')})" for f in cpu
        if r is not None and f["gate"] == "failed"
        and f["metrics"].get("size_mb", float("inf")) < r["metrics"]["size_mb"])
    out.append(("Smallest (passes the gate)", r, "no variant passes the gate" if r is None else
                f"{metric(r, 'size_mb', 2)} MB ({metric(r, 'compression', 2)}× smaller than "
                f"FP16, {metric(r, 'bits_per_weight', 2)} bits/weight) with ΔPPL "
                f"{metric(r, 'delta_ppl_pct', 2)} % and KLD {metric(r, 'kld_mean', 5)} inside "
                f"the gate ({_gate(r)}){smaller_failed}"))

    r = _pick(passed, "decode_tok_s", largest=True)
    vs = (f", FP16 decodes {metric(fp16, 'decode_tok_s', 1)} tok/s"
          if fp16 is not None and r is not fp16 else "")
    out.append(("Fastest on CPU (passes the gate)", r, "no variant passes the gate" if r is None
                else f"{metric(r, 'decode_tok_s', 1)} tok/s decode, TTFT {metric(r, 'ttft_ms', 1)} "
                f"ms at {r['params'].get('threads', '?')} threads{vs}; ΔPPL "
                f"{metric(r, 'delta_ppl_pct', 2)} %"))
    return out + gpu_serving(cpu, gpu)


def gpu_serving(cpu: list[dict], gpu: list[dict]) -> list[tuple[str, dict | None, str]]:
    """Per model shape: the fastest GPU decode of a format whose CPU run passed the gate (or has
    no CPU run: its quality is then unmeasured, and the reason says so)."""
    if not gpu:
        return [("GPU serving", None, "no gpu_bench runs in this experiment")]
    gate_of = {c["name"]: c["gate"] for c in cpu}
    out = []
    for shape in sorted({g["tags"].get("shape", "?") for g in gpu}):
        ok = [g for g in gpu if g["tags"].get("shape", "?") == shape
              and gate_of.get(g["name"], "passed") == "passed"]
        r = _pick(ok, "decode_tok_s", largest=True)
        quality = ("its CPU run passed the gate" if r is not None and r["name"] in gate_of
                   else "the FP16 reference itself" if r is not None and r["method"] == "none"
                   else "its quality was not measured on CPU")
        # the process's own GPU memory (NVML) where every row has it: torch's allocator counter
        # leaves out the CUDA context that llama.cpp's figure includes
        mem = ("gpu_process_peak_mb" if ok and all("gpu_process_peak_mb" in g["metrics"]
                                                   for g in ok) else "peak_gpu_mb")
        small = _pick(ok, mem)
        if small is not None and small is not r:
            quality += (f"; least memory: {small['name']}, {metric(small, mem, 0)} MB "
                        f"at {metric(small, 'decode_tok_s', 1)} tok/s")
        out.append((f"GPU serving ({shape})", r, "no GPU run of a gate-passing format"
                    if r is None else f"{metric(r, 'decode_tok_s', 1)} tok/s decode "
                    f"({r['tags'].get('eval.runtime', 'transformers')}), GPU memory "
                    f"{metric(r, mem, 0)} MB on "
                    f"{r['tags'].get('hardware.gpu', '?')}; {quality}"))
    return out
