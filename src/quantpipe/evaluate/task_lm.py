"""lm-eval's model side: `RuntimeLM` implements lm-eval's `LM` interface (loglikelihood,
loglikelihood_rolling, generate_until) over a quantpipe runtime (quantpipe.evaluate.runtimes),
and `run` scores the configured tasks with it. Imported by the evaluation worker (lm-eval takes
about a second to import); quantpipe.evaluate.harness holds the settings and checks.

A runtime in another environment (vLLM, in .venv-vllm) scores in one batch: `record` runs
lm-eval once with `RecordedLM` to collect every request's token ids (the very ids RuntimeLM
would score), the other environment answers them all, and `replay` runs lm-eval again with the
answers, so lm-eval builds the prompts and computes the metrics exactly as for the others.
"""
from __future__ import annotations

import math
import re

import numpy as np
from lm_eval.api.model import LM

from quantpipe.evaluate import harness


class RuntimeLM(LM):
    """lm-eval's LM over a quantpipe runtime (transformers or llama.cpp) and one HF tokenizer.

    Requests are scored one sequence at a time, at most n_ctx tokens (older context is cut
    from the left, as lm-eval's HF model does at its max_length). Greedy generation uses the
    runtime's KV cache and stops at the first `until` string or the end-of-sequence token."""

    def __init__(self, rt, tokenizer, n_ctx: int, bos: int | None, desc: str = "tasks"):
        super().__init__()
        self.rt, self.tok, self.n_ctx, self.bos, self.desc = rt, tokenizer, n_ctx, bos, desc
        self.prefix = bos if bos is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation, the
        whole string is tokenised once and the continuation is what the context's tokens do
        not cover (so a word is never split differently than in running text)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding gives it). As lm-eval's
        HF model: the input is the last n_ctx tokens of context + continuation without its final
        token; the last len(cont) positions predict the continuation."""
        ctx = ([self.bos] if self.bos is not None else []) + ctx
        if not ctx:
            ctx = [self.prefix]
        return self._score_ids((ctx + cont)[-(self.n_ctx + 1):], len(cont))

    def _score_ids(self, whole: list[int], n: int) -> tuple[float, bool]:
        """_score of `whole` (context + continuation, cut to n_ctx + 1 ids), its last n ids the
        continuation."""
        inp = whole[:-1]
        first = len(inp) - n
        logits = self.rt.window_logits(np.asarray(inp, dtype=np.int32), first)
        rows = logits[first:].astype(np.float64)
        rows -= rows.max(-1, keepdims=True)
        logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
        target = np.asarray(whole[-n:])
        ll = float(logp[np.arange(n), target].sum())
        return ll, bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm
        out = []
        for r in tqdm(requests, desc=f"{self.desc}: loglikelihood", disable=disable_tqdm,
                      unit="req"):
            out.append(self._score(*self._pair(*r.args)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        from tqdm import tqdm
        out = []
        for r in tqdm(requests, desc=f"{self.desc}: rolling loglikelihood",
                      disable=disable_tqdm, unit="req"):
            total = 0.0
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.encode(r.args[0]), self.prefix, self.n_ctx, 1)):
                total += self._score(ctx if ctx != [self.prefix] else [], cont)[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm
        out = []
        for r in tqdm(requests, desc=f"{self.desc}: generate", disable=disable_tqdm,
                      unit="req"):
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            ids = (([self.bos] if self.bos is not None else []) + self.encode(context))
            ids = ids[-max(1, self.n_ctx - max_new):] or [self.prefix]  # room for the answer
            out.append(self._generate(ids, until, max_new))
        return out

    def _generate(self, ids: list[int], until: list[str], max_new: int) -> str:
        """Greedy from `ids`, at most max_new tokens, cut at the first `until` string or the
        end-of-sequence token."""
        new: list[int] = []
        tok = self.rt.prefill(ids)
        text = ""
        while len(new) < max_new and tok != self.tok.eos_token_id:
            new.append(tok)
            text = self.tok.decode(new, skip_special_tokens=True)
            if any(u in text for u in until):
                break
            tok = self.rt.step(tok)
        for u in until:
            text = text.split(u)[0]
        return text

    # lm-eval asks these of a model it logs
    @property
    def tokenizer_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(self.tok, "name_or_path", "tokenizer"))

    def chat_template(self, chat_template=False):
        return None


class RecordedLM(RuntimeLM):
    """RuntimeLM without a runtime: with `answers` None it records the token ids of every
    request (and answers 0 / "", a pass whose metrics are thrown away); given `answers` (what
    another environment computed for those ids) it replays them."""

    def __init__(self, tokenizer, n_ctx: int, bos: int | None, answers: dict | None = None,
                 desc: str = "tasks"):
        super().__init__(None, tokenizer, n_ctx, bos, desc)
        self.answers = answers
        self.scores: dict[tuple, None] = {}   # (ids, n): ordered, each once
        self.prompts: dict[tuple, None] = {}  # (ids, until, max_new)

    def _score_ids(self, whole: list[int], n: int) -> tuple[float, bool]:
        key = (tuple(whole), n)
        if self.answers is None:
            self.scores[key] = None
            return 0.0, False
        return self.answers["score"][key]

    def _generate(self, ids: list[int], until: list[str], max_new: int) -> str:
        key = (tuple(ids), tuple(until), max_new)
        if self.answers is None:
            self.prompts[key] = None
            return ""
        return self.answers["generate"][key]


def record(tokenizer, s: dict, n_ctx: int, bos: int | None) -> dict:
    """Every request the tasks make, as token ids: {"score": [[ids, n continuation ids], ...],
    "generate": [[ids, until, max_new_tokens], ...]} (JSON, for another environment)."""
    lm = RecordedLM(tokenizer, n_ctx, bos, desc="tasks: recording the requests")
    evaluate(lm, s)
    return {"score": [[list(w), n] for w, n in lm.scores],
            "generate": [[list(i), list(u), m] for i, u, m in lm.prompts]}


def replay(tokenizer, s: dict, n_ctx: int, bos: int | None, requests: dict, answers: dict,
           desc: str) -> dict:
    """`run`'s result from `answers` to `requests` (record's): {"score": [[loglikelihood,
    greedy], ...], "generate": [text, ...]}, in the requests' order."""
    got = {"score": {(tuple(w), n): (float(a[0]), bool(a[1]))
                     for (w, n), a in zip(requests["score"], answers["score"], strict=True)},
           "generate": {(tuple(i), tuple(u), m): str(a) for (i, u, m), a
                        in zip(requests["generate"], answers["generate"], strict=True)}}
    return evaluate(RecordedLM(tokenizer, n_ctx, bos, got, desc), s)


def run(rt, tokenizer, s: dict, n_ctx: int, bos: int | None, desc: str) -> dict:
    """Score the tasks on runtime `rt`: see `evaluate`."""
    return evaluate(RuntimeLM(rt, tokenizer, n_ctx, bos, desc), s)


def evaluate(lm: RuntimeLM, s: dict) -> dict:
    """Score the tasks; returns {"metrics": {task_<t>_<m>[_stderr]: value},
    "per_doc": {task: {metric: [value per doc, by doc id]}}, "samples": {task: [...]}}."""
    import lm_eval
    tasks, tm = harness.load_tasks(s)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=s["num_fewshot"],
                                  limit=s["limit"], bootstrap_iters=harness.BOOTSTRAP_ITERS,
                                  log_samples=True, task_manager=tm, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    metrics, per_doc = {}, {}
    for task, values in res["results"].items():
        for k, v in values.items():
            if "," not in k or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            metric, filt = k.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if isinstance(v, float) and not math.isfinite(v):
                continue
            metrics[f"task_{task}_{name}"] = float(v)
    for task, samples in res.get("samples", {}).items():
        docs = sorted(samples, key=lambda x: x["doc_id"])
        names = {k.split(",", 1)[0] for k in res["results"].get(task, {}) if "," in k}
        per_doc[task] = {k: [float(d[k]) for d in docs] for k in sorted(names)
                         if docs and isinstance(docs[0].get(k), (int, float))
                         and not isinstance(docs[0].get(k), bool)}
    samples = {t: [{k: v for k, v in d.items() if k in ("doc_id", "target", "filtered_resps",
                                                          "acc", "acc_norm", "exact_match")}
                   for d in ss] for t, ss in res.get("samples", {}).items()}
    return {"metrics": metrics, "per_doc": per_doc, "samples": samples}
