"""Quality metrics over log-probabilities, following llama.cpp's perplexity tool.

Perplexity: the text is cut into non-overlapping windows of n_ctx tokens; in each window only
the second half is scored (every scored token sees at least n_ctx/2 tokens of context), and
PPL = exp(mean NLL) ± PPL * sqrt(var(NLL) / (N - 1)), as llama-perplexity prints it.

KL-divergence against FP16: the FP16 reference keeps, per scored position, its top-k
log-probabilities; the rest of the vocabulary is one "tail" bucket. KL over these k+1 buckets is
a lower bound of the full KL (merging outcomes never increases KL) and is exact when the tail
mass is 0; the reference's mean tail mass is logged beside it.

95 % intervals: a paired bootstrap over windows (see `quality_intervals`). Generation
agreement: greedy continuations of fixed prompts compared token by token with FP16's own.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 exp, float64 sum, as llama-perplexity does (expf, double sum_exp): ~20 ms
    instead of ~120 ms all-float64 on a [127, 49152] scored half-window (the GGUF decode of the
    window takes ~0.5 s), within 4e-6 of the all-float64 result."""
    x = np.asarray(logits, dtype=np.float32)
    z = x - x.max(-1, keepdims=True)
    z -= np.log(np.exp(z).sum(-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return z


def windows(ids: np.ndarray, n_ctx: int, n_windows: int | None, bos: int | None) -> np.ndarray:
    """[W, n_ctx] non-overlapping windows; the first token of each is BOS when the model adds
    one (llama.cpp does the same)."""
    n = len(ids) // n_ctx
    if n_windows:
        n = min(n, n_windows)
    w = ids[: n * n_ctx].reshape(n, n_ctx).copy()
    if bos is not None:
        w[:, 0] = bos
    return w


def first_scored(n_ctx: int) -> int:
    return n_ctx // 2


def scored_logprobs(logits: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs at the scored positions [S, V], the tokens they predict [S])."""
    first = first_scored(len(window))
    return log_softmax(logits[first:-1]), window[first + 1:]


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its ± error) from per-token negative log-likelihoods."""
    mean = float(nll.mean())
    ppl = float(np.exp(mean))
    err = float(np.sqrt(nll.var() / max(len(nll) - 1, 1))) * ppl
    return ppl, err


def topk(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (log-probs, ids) per row, sorted descending."""
    idx = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, idx, -1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1).astype(np.int32)


def _tail(logp_top: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.exp(logp_top.astype(np.float64)).sum(-1), 1e-12, 1.0)


def kld_topk(ref_logp: np.ndarray, ref_idx: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || Q) over the reference's top-k tokens plus one tail bucket."""
    p = ref_logp.astype(np.float64)
    q = np.take_along_axis(logq, ref_idx, -1).astype(np.float64)
    p_tail, q_tail = _tail(p), _tail(q)
    return (np.exp(p) * (p - q)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))


def tail_mass(ref_logp: np.ndarray) -> np.ndarray:
    return _tail(ref_logp)


# --- 95 % intervals: paired bootstrap over windows ------------------------------------------

def delta_ppl_pct(nll_var: np.ndarray, nll_ref: np.ndarray) -> np.ndarray:
    """100 * (PPL_var / PPL_ref - 1) from mean NLLs (last axis)."""
    return 100 * np.expm1(nll_var.mean(-1) - nll_ref.mean(-1))


def retention_pct(nll_base: np.ndarray, nll_var: np.ndarray, nll_ref: np.ndarray) -> np.ndarray:
    """Share of the fine-tune's perplexity change the variant keeps:
    100 * (PPL_base - PPL_var) / (PPL_base - PPL_merged); 100 = all of it, 0 = none (as bad as
    the base model before fine-tuning), < 0 = worse than the base. NaN where the denominator
    is 0."""
    base, var, ref = (np.exp(a.mean(-1)) for a in (nll_base, nll_var, nll_ref))
    gain = base - ref
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain != 0, 100 * (base - var) / np.where(gain != 0, gain, 1), np.nan)


def finetune_gain_is_measurable(nll_base: np.ndarray, nll_ref: np.ndarray) -> bool:
    """The base and the merged model score differently (beyond float rounding): without a
    gain there is nothing to retain, and the retention ratio would divide by ~0."""
    return abs(float(np.expm1(nll_base.mean() - nll_ref.mean()))) > 1e-6


def resample_windows(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] window indices drawn with replacement: the one bootstrap draw that every
    interval here uses, so the same seed resamples the same windows everywhere."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def quality_intervals(nll_var: np.ndarray, nll_ref: np.ndarray, kld: np.ndarray,
                      nll_base: np.ndarray | None = None, resamples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """95 % intervals of ΔPPL %, mean KLD and (with `nll_base`) fine-tune retention %, by a
    paired bootstrap over windows: inputs are [windows, scored positions] arrays over the same
    token ids; each resample draws windows with replacement, the same windows for every
    array (so the variant, FP16 and base stay paired), and recomputes
    ΔPPL % = 100 * (exp(mean nll_var) / exp(mean nll_ref) - 1), mean KLD and retention;
    the interval is the 2.5th-97.5th percentile of the resampled statistics. Windows, not
    tokens, are resampled because neighbouring tokens' losses are correlated (a token-level
    bootstrap would be too narrow). With few windows (< ~10) the interval is too narrow: the
    resamples cannot see variation the text sample lacks. 2000 resamples of 16 windows take
    a few ms."""
    n = nll_var.shape[0]
    idx = resample_windows(n, resamples, seed)

    def per_resample(a: np.ndarray) -> np.ndarray:
        # [resamples, windows] of window means; every window scores as many tokens, so the
        # mean of a resample's window means is its token mean
        return a.mean(-1)[idx]

    var, ref, kl = per_resample(nll_var), per_resample(nll_ref), per_resample(kld)
    out = {}
    out["delta_ppl_ci95_low"], out["delta_ppl_ci95_high"] = _percentiles(delta_ppl_pct(var, ref))
    out["kld_ci95_low"], out["kld_ci95_high"] = _percentiles(kl.mean(-1))
    if nll_base is not None:
        ret = retention_pct(per_resample(nll_base), var, ref)
        out["finetune_retention_ci95_low"], out["finetune_retention_ci95_high"] = \
            _percentiles(ret[np.isfinite(ret)])
    return out


def window_means(values: np.ndarray) -> list[float]:
    """[windows, scored positions] -> each window's mean, the per-window record a later paired
    comparison of two variants needs (every window scores as many positions, so the mean of
    window means is the token mean)."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).mean(-1)]


def windows_digest(wins: np.ndarray) -> str:
    """sha256 of the scored windows' token ids: two variants' per-window records pair only
    when they scored the very same tokens."""
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(wins, dtype=np.int64).tobytes()).hexdigest()


def paired_difference(a: list[float] | np.ndarray, b: list[float] | np.ndarray,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95 % interval, from two variants' per-window means over the
    same windows, by the bootstrap of `quality_intervals` (the same windows drawn for both
    sides, so the text-sample noise they share cancels). This interval lying wholly below 0
    says a's mean is lower, also where the two variants' own intervals overlap (overlap is a
    conservative reading: both intervals carry the noise this one cancels)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"per-window means of different windows: {a.shape} vs {b.shape}")
    d = a - b
    idx = resample_windows(d.size, resamples, seed)
    low, high = _percentiles(d[idx].mean(-1))
    return float(d.mean()), low, high


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


# --- generation agreement --------------------------------------------------------------------

def generation_prompts(ids: np.ndarray, n_prompts: int, prompt_tokens: int,
                       bos: int | None) -> np.ndarray:
    """[n_prompts, prompt_tokens (+1 with BOS)] prompts cut from the eval ids at evenly spaced
    offsets, so they come from all over the held-out text."""
    starts = np.linspace(0, len(ids) - prompt_tokens, n_prompts).astype(int)
    prompts = np.stack([ids[s:s + prompt_tokens] for s in starts]).astype(np.int32)
    if bos is not None:
        prompts = np.concatenate([np.full((n_prompts, 1), bos, np.int32), prompts], axis=1)
    return prompts


def matched_prefix(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """[prompts] how many leading tokens of each continuation equal the reference's."""
    same = np.asarray(ref) == np.asarray(out)
    return np.where(same.all(-1), same.shape[-1], np.argmin(same, axis=-1))


def generation_agreement(ref: np.ndarray, out: np.ndarray, k: int) -> dict[str, float]:
    """Share of prompts whose first k greedy tokens equal FP16's, and the mean matched prefix
    length (in tokens, of the continuations' length)."""
    n = matched_prefix(ref, out)
    return {"gen_prefix_match_pct": 100 * float((n >= k).mean()),
            "gen_mean_match_len": float(n.mean())}
