"""One evaluation in a fresh process, so load time and peak memory belong to this model alone.

    python -m quantpipe.evaluate.worker spec.json

The spec (written by quantpipe.evaluate.evaluate_variant) names the artefact, the token ids,
the protocol settings and an output path. Mode "reference" scores the FP16 model and saves its
per-token NLL, top-k log-probs and greedy continuations of the generation prompts
(reference.npz; with "nll_only", the NLL alone: the base model before fine-tuning). Mode
"variant" measures load time, a chat sample, speed, its own peak RSS (after load + generation,
before scoring buffers), perplexity, KLD and top-token agreement against the reference with
95 % intervals, fine-tune retention (given the base model's NLL), generation agreement and,
given tasks, exact match and ROUGE-L; it writes metrics JSON.
With `max_seconds` (eval.max_minutes) scoring stops after the window that reaches it: the
reference keeps the windows it scored, a variant scores at most those. Mode "speed" measures
load time, the chat sample, speed and peak RSS only (eval.speed.remeasure). Given
spec["lm_eval"], a variant also scores lm-evaluation-harness tasks (quantpipe.evaluate.task_lm)
and compares them, document by document, with the FP16 and base models' task scores, which
mode "tasks" computes.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantpipe.evaluate import metrics as M
from quantpipe.evaluate.runtimes import open_runtime
from quantpipe.names import Metric
from quantpipe.tools import vm_hwm_mb


def score(rt, wins: np.ndarray, desc: str, max_seconds: float | None = None):
    """Yield (log-probs at scored positions, target tokens) per window, in order; with a budget,
    stop once `max_seconds` have passed (after at least one window). The bar shows the ETA."""
    t0 = time.perf_counter()
    bar = tqdm(wins, desc=desc, unit="window")
    for w in bar:
        # rows before the scored half are not needed (llama.cpp leaves them uncomputed)
        yield M.scored_logprobs(rt.window_logits(w, M.first_scored(len(w))), w)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            bar.write(f"{desc}: eval.max_minutes={max_seconds / 60:g} reached after "
                      f"{bar.n} of {len(wins)} windows; scoring those")
            break
    bar.close()


def check_tokenizer(rt, text_ids: np.ndarray, text: str) -> None:
    """GGUF runtime: its vocabulary must tokenise the eval text exactly as transformers did."""
    if not hasattr(rt, "tokenize"):
        return
    theirs = np.array(rt.tokenize(text))
    if len(theirs) != len(text_ids) or not np.array_equal(theirs, text_ids):
        n = min(len(theirs), len(text_ids))
        pos = int(np.argmax(theirs[:n] != text_ids[:n])) if (theirs[:n] != text_ids[:n]).any() else n
        raise RuntimeError(f"{rt.path}: llama.cpp tokenises the eval text differently from the "
                           f"HF tokenizer ({len(theirs)} vs {len(text_ids)} tokens, first "
                           f"difference at token {pos}); the numbers would not be comparable")


def measure_speed(rt, prompt: list[int], new_tokens: int, warmup: int, repeats: int) -> dict:
    """TTFT and prefill/decode tokens/s: greedy, batch 1, KV cache on; median of `repeats`."""
    runs = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        tok = rt.prefill(prompt)
        rt.sync()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = rt.step(tok)
        rt.sync()
        t2 = time.perf_counter()
        if i >= warmup:
            runs.append((t1 - t0, (new_tokens - 1) / (t2 - t1)))
    ttft = [r[0] for r in runs]
    decode = [r[1] for r in runs]
    return {Metric.TTFT_MS: 1000 * statistics.median(ttft),
            Metric.PREFILL_TOK_S: len(prompt) / statistics.median(ttft),
            Metric.DECODE_TOK_S: statistics.median(decode),
            Metric.DECODE_TOK_S_MIN: min(decode), Metric.DECODE_TOK_S_MAX: max(decode)}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, not ru_maxrss, which after fork + exec still holds
    the parent's high-water mark (every variant of a sweep read the sweep process's 1384 MB)."""
    return vm_hwm_mb("self")


def peak_gpu_mb() -> float | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return None


def greedy_continuations(rt, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """[prompts, new_tokens] greedy tokens after each prompt (KV cache, no stop at EOS)."""
    out = np.empty((len(prompts), new_tokens), dtype=np.int32)
    for i, prompt in enumerate(prompts):
        tok = rt.prefill(prompt.tolist())
        out[i, 0] = tok
        for j in range(1, new_tokens):
            out[i, j] = tok = rt.step(tok)
    return out


def run_reference(spec: dict, rt, wins: np.ndarray, ids: np.ndarray) -> None:
    nll, top_lp, top_id = [], [], []
    for logp, target in score(rt, wins, spec.get("desc", "FP16 reference"),
                              spec.get("max_seconds")):
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        if not spec.get("nll_only"):
            lp, idx = M.topk(logp, spec["kld_top_k"])
            top_lp.append(lp)
            top_id.append(idx)
    if spec.get("nll_only"):
        np.savez(spec["out"], nll=np.concatenate(nll))
        return
    g = spec["generation"]
    prompts = M.generation_prompts(ids, g["prompts"], g["prompt_tokens"], spec["bos"])
    np.savez(spec["out"], nll=np.concatenate(nll), topk_logp=np.concatenate(top_lp),
             topk_idx=np.concatenate(top_id), gen_prompts=prompts,
             gen_tokens=greedy_continuations(rt, prompts, g["new_tokens"]))


def per_window(values: np.ndarray, n_windows: int) -> np.ndarray:
    """Flat per-token values -> [windows, scored positions] (every window scores as many)."""
    if values.size % n_windows:
        raise ValueError(f"{values.size} scored values do not split into {n_windows} windows")
    return values.reshape(n_windows, -1)


def quality(spec: dict, nll: np.ndarray, kld: np.ndarray, ref) -> dict[str, float]:
    """ΔPPL and KLD with 95 % intervals; base PPL and fine-tune retention given the base
    model's NLL (spec["base_nll"]); generation agreement with FP16's continuations. Everything
    is computed in float64: the point estimates and the bootstrap's resamples then agree to
    rounding (in float32 a 2-window point estimate fell 1e-4 outside its own interval)."""
    w = len(nll)
    nll, kld = nll.astype(np.float64), kld.astype(np.float64)
    # a budget may have cut the variant short
    ref_nll = per_window(np.asarray(ref["nll"][: nll.size], dtype=np.float64), w)
    base = np.load(spec["base_nll"])["nll"].astype(np.float64) if spec.get("base_nll") else None
    # the base pass has its own budget: retention only over windows both passes scored
    base = per_window(base[: nll.size], w) if base is not None and base.size >= nll.size else None
    out = {"delta_ppl_pct": float(M.delta_ppl_pct(nll.ravel(), ref_nll.ravel()))}
    if base is not None:
        out["base_ppl"] = M.perplexity(base.ravel())[0]
        if not M.finetune_gain_is_measurable(base, ref_nll):
            base = None  # the adapter changed nothing measurable: no ratio to take
        else:
            out["finetune_retention_pct"] = float(M.retention_pct(base.ravel(), nll.ravel(),
                                                                  ref_nll.ravel()))
    ci = spec.get("ci", {})
    out.update(M.quality_intervals(nll, ref_nll, kld, base, ci.get("resamples", 2000),
                                   ci.get("seed", 0)))
    return {k: v for k, v in out.items() if np.isfinite(v)}


def run_speed(spec: dict, rt, load_s: float) -> dict:
    """Load time, a chat sample, speed and this process's peak memory so far."""
    out: dict = {"metrics": {Metric.LOAD_S: load_s}, "runtime": rt.name}
    text, eos = rt.chat(spec["sample"]["prompt"], spec["sample"]["max_new_tokens"])
    out["sample"] = {"prompt": spec["sample"]["prompt"], "output": text, "stopped_at_eos": eos}
    sp = spec["speed"]
    prompt = np.load(spec["ids"])[: sp["prompt_tokens"]].tolist()
    out["metrics"].update(measure_speed(rt, prompt, sp["new_tokens"], sp["warmup"], sp["repeats"]))
    out["metrics"][Metric.PEAK_RSS_MB] = peak_rss_mb()
    if (gpu := peak_gpu_mb()) is not None:
        out["metrics"][Metric.PEAK_GPU_MB] = gpu
    return out


def run_variant(spec: dict, rt, wins: np.ndarray, load_s: float) -> None:
    out = run_speed(spec, rt, load_s)
    ref = np.load(spec["reference"])
    planned = len(wins)
    scored_per_window = len(wins[0]) - M.first_scored(len(wins[0])) - 1
    wins = wins[: len(ref["nll"]) // scored_per_window]  # the windows the reference scored
    nll, kld, agree, offset = [], [], [], 0
    for logp, target in score(rt, wins, spec.get("desc") or f"score {Path(spec['artifact']).name}",
                              spec.get("max_seconds")):
        n = len(target)
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        kld.append(M.kld_topk(ref["topk_logp"][offset:offset + n],
                              ref["topk_idx"][offset:offset + n], logp))
        agree.append(logp.argmax(-1) == ref["topk_idx"][offset:offset + n, 0])
        offset += n
    nll_w, kld_w = np.stack(nll), np.stack(kld)  # [windows, scored positions]
    nll_a, kld_a = nll_w.ravel(), kld_w.ravel()
    ppl, err = M.perplexity(nll_a)
    ppl_ref, _ = M.perplexity(ref["nll"][: len(nll_a)])  # the same positions
    out["metrics"].update({
        "ppl": ppl, "ppl_err": err, "ppl_fp16": ppl_ref, "ppl_ratio": ppl / ppl_ref,
        "kld_mean": float(kld_a.mean()), "kld_p99": float(np.percentile(kld_a, 99)),
        "kld_max": float(kld_a.max()),
        "top1_agree_pct": 100 * float(np.concatenate(agree).mean()),
        "kld_ref_tail_mass": float(M.tail_mass(ref["topk_logp"]).mean()),
        "eval_tokens_scored": float(len(nll_a)), "eval_windows_scored": float(len(nll)),
        "eval_windows_planned": float(planned)})
    out["metrics"].update(quality(spec, nll_w, kld_w, ref))
    # each scored window's means: what a paired comparison with another variant resamples
    out["per_window"] = {
        "windows_sha256": M.windows_digest(wins[: len(nll)]),
        "kld": M.window_means(kld_w), "nll": M.window_means(nll_w),
        "nll_fp16": M.window_means(per_window(np.asarray(ref["nll"][: nll_a.size]), len(nll)))}
    g = spec["generation"]
    gen = greedy_continuations(rt, ref["gen_prompts"], ref["gen_tokens"].shape[1])
    out["metrics"].update(M.generation_agreement(ref["gen_tokens"], gen, g["match_k"]))
    if spec.get("tasks"):
        from quantpipe.evaluate.tasks import answer_and_score
        scores, answers = answer_and_score(rt, spec["tasks"], spec["tasks_max_new_tokens"])
        out["metrics"].update(scores)
        out["task_answers"] = answers
    if spec.get("lm_eval"):
        from quantpipe.evaluate import harness
        res = run_lm_eval(spec, rt)
        le = spec["lm_eval"]
        ref_docs = json.loads(Path(le["reference"]).read_text())["per_doc"]
        base_docs = (json.loads(Path(le["base"]).read_text())["per_doc"]
                     if le.get("base") else None)
        ci = spec.get("ci", {})
        out["metrics"].update(res["metrics"])
        out["metrics"].update(harness.paired(res["per_doc"], ref_docs, base_docs,
                                             ci.get("resamples", 2000), ci.get("seed", 0)))
        out["lm_eval_samples"] = res["samples"]
    Path(spec["out"]).write_text(json.dumps(out, indent=2))


def run_lm_eval(spec: dict, rt) -> dict:
    """spec["lm_eval"]'s tasks through lm-evaluation-harness on this runtime, fed the token ids
    of the merged model's HF tokenizer (spec["tokenizer"]) whatever the runtime."""
    from quantpipe.evaluate import task_lm
    tok = getattr(rt, "tok", None)
    if tok is None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    return task_lm.run(rt, tok, spec["lm_eval"], spec["n_ctx"], spec["bos"],
                       spec.get("desc") or "tasks")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("parent_pid"):
        from quantpipe.recovery import die_with_parent
        die_with_parent(spec["parent_pid"])  # a killed pipeline takes its worker with it
    ids = np.load(spec["ids"])
    wins = M.windows(ids, spec["n_ctx"], spec["n_windows"], spec["bos"])
    t0 = time.perf_counter()
    rt = open_runtime(Path(spec["artifact"]), spec["threads"], spec["n_ctx"],
                      reference=bool(spec.get("float32")), runtime=spec.get("runtime"))
    load_s = time.perf_counter() - t0
    check_tokenizer(rt, ids, spec["text"]) if spec.get("text") is not None else None
    if spec["mode"] == "tasks":  # task scores alone (the FP16 and base models' references)
        Path(spec["out"]).write_text(json.dumps(run_lm_eval(spec, rt)))
    elif spec["mode"] == "reference":
        run_reference(spec, rt, wins, ids)
    elif spec["mode"] == "speed":
        Path(spec["out"]).write_text(json.dumps(run_speed(spec, rt, load_s), indent=2))
    else:
        run_variant(spec, rt, wins, load_s)


if __name__ == "__main__":
    main(sys.argv[1])
