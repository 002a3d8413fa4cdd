"""How large should the default evaluation be? Time and 95 % interval width of ΔPPL and KLD
against the number of windows, for window sizes n_ctx, on a real FP16 model and one variant.

    .venv/bin/python benchmarks/eval_size.py --fp16 artifacts/merge/<fp> --variant quantized/model-q4_0.gguf
    .venv/bin/python benchmarks/eval_size.py --fp16 artifacts/gguf-f16/<fp>/model-f16.gguf \
        --tokenizer artifacts/merge/<fp> --variant FILE --ctx 256 512 --windows 8 16 32

Scores the eval text once per n_ctx with the FP16 reference runtime (float32) and the variant's
runtime, as the evaluation worker does (quantpipe.evaluate.worker.score), up to the largest
window count; then, for each count, the first W windows give ΔPPL %, mean KLD and their
intervals (quantpipe.evaluate.metrics.quality_intervals, the pipeline's bootstrap). Seconds are
the scoring time of both models for W windows (per-window time x W), which depends on machine
load: the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def score_all(rt, wins: np.ndarray, desc: str, ref=None) -> tuple[list, list, list, float]:
    """Per-window NLL (and, against `ref`'s top-k, KLD) and the mean seconds per window."""
    from quantpipe.evaluate import metrics as M
    from quantpipe.evaluate.worker import score
    nll, kld, top = [], [], []
    t0 = time.perf_counter()
    for i, (logp, target) in enumerate(score(rt, wins, desc)):
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        if ref is None:
            top.append(M.topk(logp, 64))
        else:
            kld.append(M.kld_topk(*ref[i], logp))
    return nll, kld, top, (time.perf_counter() - t0) / len(wins)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp16", type=Path, required=True,
                    help="merged FP16: HF folder (scored in float32, as the pipeline's reference) "
                    "or its F16 GGUF (llama.cpp: several times faster on CPU)")
    ap.add_argument("--tokenizer", type=Path, help="HF folder of the tokenizer (default: --fp16)")
    ap.add_argument("--variant", type=Path, required=True, help="a GGUF file or HF folder")
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from quantpipe.data import topics_text
    from quantpipe.evaluate import metrics as M
    from quantpipe.evaluate.runtimes import open_runtime
    ids = np.array(AutoTokenizer.from_pretrained(args.tokenizer or args.fp16)(topics_text("eval"),
                   add_special_tokens=False)["input_ids"], dtype=np.int32)
    print(f"eval text: {len(ids)} tokens; load average {os.getloadavg()[0]:.1f}")
    print("| n_ctx | windows | scored tokens | s (FP16 + variant) | ΔPPL % [95 % CI] | CI width "
          "| KLD [95 % CI] |\n|---|---|---|---|---|---|---|")
    for n_ctx in args.ctx:
        wins = M.windows(ids, n_ctx, max(args.windows), None)
        rt = open_runtime(args.fp16, args.threads, n_ctx, reference=True)
        ref_nll, _, top, ref_s = score_all(rt, wins, f"FP16 n_ctx {n_ctx}")
        rt = open_runtime(args.variant, args.threads, n_ctx)
        nll, kld, _, var_s = score_all(rt, wins, f"{args.variant.name} n_ctx {n_ctx}", top)
        del rt
        for w in sorted(args.windows):
            w = min(w, len(wins))
            v, r, k = (np.stack(a[:w]) for a in (nll, ref_nll, kld))
            ci = M.quality_intervals(v, r, k)
            d = float(M.delta_ppl_pct(v.ravel(), r.ravel()))
            print(f"| {n_ctx} | {w} | {v.size} | {w * (ref_s + var_s):.0f} | {d:+.2f} "
                  f"[{ci['delta_ppl_ci95_low']:+.2f}, {ci['delta_ppl_ci95_high']:+.2f}] | "
                  f"{ci['delta_ppl_ci95_high'] - ci['delta_ppl_ci95_low']:.2f} | "
                  f"{k.mean():.4f} [{ci['kld_ci95_low']:.4f}, {ci['kld_ci95_high']:.4f}] |",
                  flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
