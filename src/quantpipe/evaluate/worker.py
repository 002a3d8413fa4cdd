"""One evaluation in a fresh process, so load time and peak memory belong to this model alone.

    python -m quantpipe.evaluate.worker spec.json

The spec (written by quantpipe.evaluate.evaluate_variant) names the artefact, the token ids,
the protocol settings and an output path. Mode "reference" scores the FP16 model and saves its
top-k log-probs (reference.npz); mode "variant" measures load time, a chat sample, speed,
peak RSS (after load + generation, before scoring buffers), perplexity, KLD and top-token
agreement against the reference, and writes metrics JSON.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantpipe.evaluate import metrics as M
from quantpipe.evaluate.runtimes import open_runtime


def score(rt, wins: np.ndarray, desc: str):
    """Yield (log-probs at scored positions, target tokens) per window."""
    for w in tqdm(wins, desc=desc, unit="window"):
        # rows before the scored half are not needed (llama.cpp leaves them uncomputed)
        yield M.scored_logprobs(rt.window_logits(w, M.first_scored(len(w))), w)


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
    return {"ttft_ms": 1000 * statistics.median(ttft),
            "prefill_tok_s": len(prompt) / statistics.median(ttft),
            "decode_tok_s": statistics.median(decode),
            "decode_tok_s_min": min(decode), "decode_tok_s_max": max(decode)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_gpu_mb() -> float | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return None


def run_reference(spec: dict, rt, wins: np.ndarray) -> None:
    nll, top_lp, top_id = [], [], []
    for logp, target in score(rt, wins, "FP16 reference"):
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        lp, idx = M.topk(logp, spec["kld_top_k"])
        top_lp.append(lp)
        top_id.append(idx)
    np.savez(spec["out"], nll=np.concatenate(nll), topk_logp=np.concatenate(top_lp),
             topk_idx=np.concatenate(top_id))


def run_variant(spec: dict, rt, wins: np.ndarray, load_s: float) -> None:
    out: dict = {"metrics": {"load_s": load_s}, "runtime": rt.name}
    text, eos = rt.chat(spec["sample"]["prompt"], spec["sample"]["max_new_tokens"])
    out["sample"] = {"prompt": spec["sample"]["prompt"], "output": text, "stopped_at_eos": eos}
    sp = spec["speed"]
    prompt = np.load(spec["ids"])[: sp["prompt_tokens"]].tolist()
    out["metrics"].update(measure_speed(rt, prompt, sp["new_tokens"], sp["warmup"], sp["repeats"]))
    out["metrics"]["peak_rss_mb"] = peak_rss_mb()
    if (gpu := peak_gpu_mb()) is not None:
        out["metrics"]["peak_gpu_mb"] = gpu
    ref = np.load(spec["reference"])
    nll, kld, agree, offset = [], [], [], 0
    for logp, target in score(rt, wins, f"score {Path(spec['artifact']).name}"):
        n = len(target)
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        kld.append(M.kld_topk(ref["topk_logp"][offset:offset + n],
                              ref["topk_idx"][offset:offset + n], logp))
        agree.append(logp.argmax(-1) == ref["topk_idx"][offset:offset + n, 0])
        offset += n
    nll_a, kld_a = np.concatenate(nll), np.concatenate(kld)
    ppl, err = M.perplexity(nll_a)
    ppl_ref, _ = M.perplexity(ref["nll"])
    out["metrics"].update({
        "ppl": ppl, "ppl_err": err, "ppl_fp16": ppl_ref, "ppl_ratio": ppl / ppl_ref,
        "delta_ppl_pct": 100 * (ppl / ppl_ref - 1),
        "kld_mean": float(kld_a.mean()), "kld_p99": float(np.percentile(kld_a, 99)),
        "kld_max": float(kld_a.max()),
        "top1_agree_pct": 100 * float(np.concatenate(agree).mean()),
        "kld_ref_tail_mass": float(M.tail_mass(ref["topk_logp"]).mean()),
        "eval_tokens_scored": float(len(nll_a))})
    Path(spec["out"]).write_text(json.dumps(out, indent=2))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ids = np.load(spec["ids"])
    wins = M.windows(ids, spec["n_ctx"], spec["n_windows"], spec["bos"])
    t0 = time.perf_counter()
    rt = open_runtime(Path(spec["artifact"]), spec["threads"], spec["n_ctx"],
                      reference=spec["mode"] == "reference", runtime=spec.get("runtime"))
    load_s = time.perf_counter() - t0
    check_tokenizer(rt, ids, spec["text"]) if spec.get("text") is not None else None
    if spec["mode"] == "reference":
        run_reference(spec, rt, wins)
    else:
        run_variant(spec, rt, wins, load_s)


if __name__ == "__main__":
    main(sys.argv[1])
