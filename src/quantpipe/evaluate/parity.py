"""How far the FP16 reference on llama.cpp (the merged model's F16 GGUF, memory-mapped) is from
the former one (transformers computing the same FP16 weights in float32), on the same windows.

    python -m quantpipe.evaluate.parity [MERGED_FOLDER F16_GGUF]   # default: the newest of each

Both runtimes score the eval text's windows with the evaluation's protocol; over the full
vocabulary it reports the largest |difference| of the target tokens' log-probabilities, the mean
and largest KL(float32 || llama.cpp) and top-1 agreement, and logs them to MLflow as a run of
kind `reference_parity`. tests/test_eval_scale.py holds the tiny model to a stated tolerance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from quantpipe.evaluate import metrics as M
from quantpipe.evaluate.llama_cpp_runtime import LlamaCppRuntime
from quantpipe.evaluate.transformers_runtime import HFRuntime


def compare(merged: Path, f16_gguf: Path, wins: np.ndarray, threads: int | None) -> dict:
    """Scores every window with both runtimes; full-vocabulary comparison."""
    hf = HFRuntime(Path(merged), threads, reference=True)  # the former float32 reference
    cpp = LlamaCppRuntime(Path(f16_gguf), threads, wins.shape[1])
    dlogp, kld, agree = [], [], []
    for w in wins:
        first = M.first_scored(len(w))
        p, target = M.scored_logprobs(hf.window_logits(w, first), w)
        q, _ = M.scored_logprobs(cpp.window_logits(w, first), w)
        rows = np.arange(len(target))
        dlogp.append(np.abs(p[rows, target] - q[rows, target]))
        p64, q64 = p.astype(np.float64), q.astype(np.float64)
        kld.append((np.exp(p64) * (p64 - q64)).sum(-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
    dlogp_a, kld_a = np.concatenate(dlogp), np.concatenate(kld)
    return {"parity_max_abs_dlogp": float(dlogp_a.max()),
            "parity_mean_abs_dlogp": float(dlogp_a.mean()),
            "parity_kld_mean": float(kld_a.mean()), "parity_kld_max": float(kld_a.max()),
            "parity_top1_agree_pct": 100 * float(np.concatenate(agree).mean()),
            "parity_tokens": float(len(dlogp_a))}


def _newest(pattern: str) -> Path:
    from quantpipe import PROJECT_ROOT
    found = sorted(PROJECT_ROOT.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {pattern}: run `make pipeline +quant=gguf_q4_k_m` first")
    return found[-1]


def f16_of(merged: Path) -> Path:
    """The F16 GGUF converted from `merged` (its provenance key names the merged fingerprint):
    not simply the newest, which may be the base model's, converted for fine-tune retention."""
    import json

    import gguf

    from quantpipe import PROJECT_ROOT
    from quantpipe.quantize.gguf import PROVENANCE_KEY
    for f in sorted((PROJECT_ROOT / "artifacts" / "gguf-f16").glob("*/model-f16.gguf")):
        field = gguf.GGUFReader(str(f), "r").get_field(PROVENANCE_KEY)
        if field is not None and json.loads(field.contents()).get("merged") == merged.name:
            return f
    raise SystemExit(f"no F16 GGUF of {merged} under artifacts/gguf-f16: run a GGUF variant or "
                     "the evaluation first, or name both paths")


def main(argv: list[str]) -> None:
    import mlflow
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from quantpipe import PROJECT_ROOT, tracking
    from quantpipe.data import topics_text
    merged = Path(argv[0]) if argv else _newest("artifacts/merge/*/config.json").parent
    f16 = Path(argv[1]) if len(argv) > 1 else f16_of(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = np.array(tok(topics_text("eval"), add_special_tokens=False)["input_ids"], np.int32)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    # the default protocol (conf/eval/default.yaml)
    proto = OmegaConf.load(PROJECT_ROOT / "conf" / "eval" / "default.yaml")
    wins = M.windows(ids, proto.n_ctx, proto.n_windows, bos)
    result = compare(merged, f16, wins, threads=2)
    for k, v in result.items():
        print(f"{k:26s} {v:.6g}")
    tracking.setup(OmegaConf.create({"uri": f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db",
                                     "artifact_root": f"{PROJECT_ROOT}/mlruns/artifacts",
                                     "experiment": "day3-quantisation"}))
    with mlflow.start_run(run_name="reference parity",
                          tags={"quantpipe.kind": "reference_parity", **tracking.hardware()}):
        mlflow.log_params({"merged": merged.name, "f16_gguf": f16.parent.name,
                           "n_ctx": proto.n_ctx, "n_windows": len(wins)})
        mlflow.log_metrics(result)


if __name__ == "__main__":
    main(sys.argv[1:])
