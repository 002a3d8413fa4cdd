"""vLLM on one variant folder, run by quantpipe.evaluate.vllm in the isolated .venv-vllm
(vLLM's CPU build pins transformers <5.20 and compressed-tensors 0.17; the pipeline runs 5.23 and
0.19). A script, not a module of the package: that venv has no quantpipe.

    .venv-vllm/bin/python src/quantpipe/evaluate/vllm_score.py SPEC.json

SPEC names the folder, the evaluation's windows of token ids (the very ids the project's own
runtimes score) and the speed settings. It writes SPEC["out"] (JSON):
- vllm_loads 1/0, and on 0 the error as the `vllm.error` tag;
- vllm_ppl over the scored half of each window, from vLLM's prompt log-probs (the log-prob of
  each actual token given the ones before it: the same positions as the project's PPL);
- vllm_ttft_ms (a 1-token generation of the speed prompt) and vllm_decode_tok_s (greedy, end of
  sequence ignored, the TTFT taken out), medians of the repeats, batch 1;
- vllm_load_s and vllm_peak_rss_mb (VmHWM of this process plus vLLM's engine process: its
  weights and KV cache live there);
- with SPEC["lm_eval"] (lm-eval's requests as token ids, quantpipe.evaluate.task_lm.record),
  the answers under "lm_eval": per scored request the continuation's summed log-prob and
  whether each of its tokens is vLLM's top-1 (prompt log-probs), per generation request the
  greedy text up to its `until` strings or the end-of-sequence token.
vLLM starts its engine in a spawned process, hence the `__main__` guard. Python puts this
script's folder first on sys.path: no module beside it may be named `vllm`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_peak_mb() -> float:
    import psutil
    me = psutil.Process()
    return vm_hwm_mb(me.pid) + sum(vm_hwm_mb(c.pid) for c in me.children(recursive=True))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"metrics": {}, "tags": {}}

    def write() -> None:
        Path(spec["out"]).write_text(json.dumps(out, indent=2))

    from vllm import LLM
    t0 = time.perf_counter()
    try:
        # a window plus the one token each request must generate; the speed prompt and its run
        # (a task request: n_ctx + 1 ids, then the one token generated)
        longest = max(spec["n_ctx"] + 2, len(spec["speed_prompt"]) + spec["speed"]["new_tokens"])
        llm = LLM(model=spec["artifact"], dtype=spec["dtype"], max_model_len=longest,
                  enforce_eager=True, seed=0, max_num_seqs=4)
    except Exception as e:  # noqa: BLE001 - any refusal is the measurement: log it, go on
        out["metrics"]["vllm_loads"] = 0.0
        out["tags"]["vllm.error"] = error_text(e)
        write()
        return
    load_s = time.perf_counter() - t0
    try:
        score(llm, spec, out, longest)
    except Exception as e:  # noqa: BLE001 - e.g. a kernel this CPU's build lacks, met at the
        # first forward: the folder cannot run here, which is the measurement
        out["metrics"] = {"vllm_loads": 0.0}
        out["tags"]["vllm.error"] = error_text(e)
        out.pop("lm_eval", None)
        write()
        return
    out["metrics"]["vllm_loads"] = 1.0
    out["metrics"]["vllm_load_s"] = load_s
    write()


def error_text(e: Exception, limit: int = 480) -> str:
    """The exception in one line; its head says why (e.g. "... not supported on cpu"), a list of
    what is supported may follow."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def score(llm, spec: dict, out: dict, longest: int) -> None:
    """PPL over the windows, the task requests' answers, TTFT and decode speed, into `out`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    windows, first = spec["windows"], spec["first"]
    greedy = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], greedy,
                           use_tqdm=True)
    nll = []
    for w, r in zip(windows, results):
        lps = r.prompt_logprobs
        for i in range(first + 1, len(w)):
            nll.append(-lps[i][w[i]].logprob)
    out["metrics"]["vllm_ppl"] = math.exp(sum(nll) / len(nll))
    out["metrics"]["vllm_tokens_scored"] = float(len(nll))
    if spec.get("lm_eval"):
        t0 = time.perf_counter()
        out["lm_eval"] = lm_eval_answers(llm, spec["lm_eval"], longest)
        out["metrics"]["vllm_tasks_s"] = time.perf_counter() - t0

    sp = spec["speed"]
    prompt = TokensPrompt(prompt_token_ids=spec["speed_prompt"])
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=sp["new_tokens"], temperature=0.0, ignore_eos=True)
    ttft, total = [], []
    for i in range(sp["warmup"] + sp["repeats"]):
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], full, use_tqdm=False)
        t2 = time.perf_counter()
        if i >= sp["warmup"]:
            ttft.append(t1 - t0)
            total.append(t2 - t1)
    t_first, t_all = statistics.median(ttft), statistics.median(total)
    out["metrics"]["vllm_ttft_ms"] = 1000 * t_first
    out["metrics"]["vllm_decode_tok_s"] = (sp["new_tokens"] - 1) / max(t_all - t_first, 1e-9)
    out["metrics"]["vllm_peak_rss_mb"] = tree_peak_mb()


def lm_eval_answers(llm, requests: dict, max_len: int) -> dict:
    """{"score": [[loglikelihood, greedy], ...], "generate": [text, ...]} for lm-eval's requests
    {"score": [[ids, n], ...], "generate": [[ids, until, max_new], ...]}: the last n ids of each
    scored request are the continuation; a generation stops at max_len ids in all, as the
    project's runtimes stop at their context."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    score, generate = [], []
    if requests["score"]:  # prompt log-probs with the top-1: the actual token's rank is 1 or not
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        results = llm.generate([TokensPrompt(prompt_token_ids=w) for w, _ in requests["score"]],
                               sp, use_tqdm=True)
        for (w, n), r in zip(requests["score"], results):
            lps = [r.prompt_logprobs[i][w[i]] for i in range(len(w) - n, len(w))]
            score.append([sum(lp.logprob for lp in lps), all(lp.rank == 1 for lp in lps)])
    if requests["generate"]:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _, _ in requests["generate"]]
        params = [SamplingParams(max_tokens=max(1, min(m, max_len - len(ids))), temperature=0.0,
                                 stop=list(u) or None) for ids, u, m in requests["generate"]]
        generate = [r.outputs[0].text for r in llm.generate(prompts, params, use_tqdm=True)]
    return {"score": score, "generate": generate}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the KV cache this needs is small
    main(sys.argv[1])
