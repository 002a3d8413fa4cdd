"""Cross-check our evaluator against llama.cpp's own tools on the same GGUF file.

    make crosscheck                                   # quantized/model.gguf
    make crosscheck FILE=quantized/model-q8_0.gguf eval.n_ctx=512 eval.n_windows=16
    make crosscheck ARGS=--latest                     # the latest finished GGUF variant runs
    python -m pipelines.crosscheck [--gguf F ...] [--latest] [hydra overrides ...]

For each file: perplexity with our protocol (quantpipe.evaluate: LlamaCppRuntime windows, the
second half of each scored) next to `llama-perplexity -f text -c n_ctx --chunks n_windows`, and
our greedy decode tokens/s (quantpipe.evaluate.worker.measure_speed after a 1-token prompt) next
to `llama-bench -p 0 -n 64` tg. Each side runs --rounds times (3), alternating who goes first;
times are medians. Targets: PPL within 0.5 %, our eval time within 1.2x, decode within 10 %
(printed and logged, not enforced: run it on an idle machine). Both sides see the same tokens:
the eval text (conf eval.*) is tokenised by the GGUF's own vocabulary exactly as
llama-perplexity does (BOS first if the vocabulary adds one, one trailing newline dropped as its
-f reader does), and the chunk count and every per-chunk running PPL it prints are compared.
One MLflow run per file, tag quantpipe.kind=crosscheck.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from quantpipe import PROJECT_ROOT, tracking
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.evaluate import metrics as M
from quantpipe.evaluate.llama_cpp_runtime import LlamaCppRuntime
from quantpipe.evaluate.worker import measure_speed, score
from quantpipe.names import Kind, Metric, Tag
from quantpipe.tools import run_tool, tool_path

log = logging.getLogger("crosscheck")
TARGETS = {"ppl_ratio": 0.005, "eval_time_ratio": 1.2, "decode_ratio": 0.10}
TG_TOKENS = 64        # llama-bench -n: tokens generated per repetition
TG_REPEATS = 5        # llama-bench's default -r
ROUNDS = 3            # each side runs this often, alternating; timings are medians (a 2-core
                      # host shared with others swings ±10 % between back-to-back runs)


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def llama_tokens(rt: LlamaCppRuntime, text: str) -> tuple[np.ndarray, int | None]:
    """Token ids as llama-perplexity makes them: common_tokenize(text, add_special=true)."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(rt.llm.model)
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    ids = rt.tokenize(text)
    return np.array(([bos] if bos is not None else []) + ids, dtype=np.int32), bos


def our_perplexity(gguf: Path, text: str, n_ctx: int, n_windows: int | None, threads: int
                   ) -> dict:
    """Our evaluator's protocol on `gguf`, timed from model load to the final PPL."""
    t0 = time.perf_counter()
    rt = LlamaCppRuntime(gguf, threads, n_ctx)
    ids, bos = llama_tokens(rt, text)
    wins = M.windows(ids, n_ctx, n_windows, bos)
    t1 = time.perf_counter()
    nll, running = [], []
    for logp, target in score(rt, wins, f"ours {gguf.name}"):
        nll.append(-np.take_along_axis(logp, target[:, None], -1)[:, 0])
        running.append(float(np.exp(np.concatenate(nll).mean())))
    t2 = time.perf_counter()
    ppl, err = M.perplexity(np.concatenate(nll))
    return {"ppl": ppl, "ppl_err": err, "wall_s": t2 - t0, "score_s": t2 - t1,
            "n_tokens": len(ids), "n_chunks": len(wins), "running": running, "rt": rt,
            "first_token": int(wins[0, 0])}


def their_perplexity(tools: Path, gguf: Path, text_file: Path, n_ctx: int,
                     n_windows: int | None, threads: int) -> dict:
    args = ["-m", gguf, "-f", text_file, "-c", n_ctx, "-t", threads, "-ngl", 0]
    if n_windows:
        args += ["--chunks", n_windows]
    r = run_tool(tool_path(tools, "llama-perplexity"), args)
    log_ = r.stdout + r.stderr
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log_)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log_)
    if not (final and chunks):
        raise RuntimeError(f"cannot read llama-perplexity's result:\n{log_[-2000:]}")
    # the scoring loop alone: from "calculating perplexity" to "Final estimate", read from the
    # log's timestamps (m.ss.mmm.uuu)
    stamp = r"(\d+)\.(\d\d)\.(\d{3})\.(\d{3}) I "
    t = [re.search(stamp + what, log_) for what in ("perplexity: calculating", "Final estimate")]
    score_s = float("nan")
    if all(t):
        secs = [60 * int(m[1]) + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6 for m in t]
        score_s = secs[1] - secs[0]
    return {"ppl": float(final.group(1)), "ppl_err": float(final.group(2)), "wall_s": r.seconds,
            "score_s": score_s,
            "n_chunks": int(chunks.group(1)),
            "running": [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", log_)]}


def their_decode(tools: Path, gguf: Path, threads: int) -> float:
    r = run_tool(tool_path(tools, "llama-bench"),
                 ["-m", gguf, "-p", 0, "-n", TG_TOKENS, "-t", threads, "-r", TG_REPEATS,
                  "-ngl", 0, "-o", "json"])
    rows = json.loads(r.stdout)
    return float(next(row["avg_ts"] for row in rows if row["n_gen"] > 0))


def our_decode(rt: LlamaCppRuntime, first_token: int) -> dict:
    """tg-style: a 1-token prompt (llama-bench -p 0 decodes from an empty context), then
    TG_TOKENS single-token steps; warm-up 1, median of TG_REPEATS as llama-bench averages 5."""
    return measure_speed(rt, [first_token], TG_TOKENS + 1, warmup=1, repeats=TG_REPEATS)


def crosscheck(cfg: DictConfig, gguf: Path, rounds: int = ROUNDS) -> dict[str, float]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())  # timings mean little on a busy host
    threads = int(cfg.threads or os.cpu_count())
    n_ctx, n_windows = int(cfg.eval.n_ctx), cfg.eval.n_windows
    text, source = load_text(cfg.eval.text_file, "eval", "eval.text_file")
    tools = Path(cfg.paths.tools)
    tool_path(tools, "llama-perplexity"), tool_path(tools, "llama-bench")
    theirs, ours, tg, speed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "eval.txt"
        text_file.write_text(text, encoding="utf-8")
        for r in range(rounds):  # alternate who goes first; medians over the rounds
            first_theirs = r % 2 == 0
            for side in (True, False) if first_theirs else (False, True):
                if side:
                    theirs.append(their_perplexity(tools, gguf, text_file, n_ctx, n_windows,
                                                   threads))
                else:  # llama.cpp's -f reader drops one trailing newline before tokenising
                    ours.append(our_perplexity(gguf, text.removesuffix("\n"), n_ctx,
                                               n_windows, threads))
            rt = ours[-1].pop("rt")
            for side in (True, False) if first_theirs else (False, True):
                if side:
                    tg.append(their_decode(tools, gguf, threads))
                else:
                    speed.append(our_decode(rt, ours[-1]["first_token"])[Metric.DECODE_TOK_S])
            del rt
    o, t = ours[0], theirs[0]  # perplexities are deterministic: any round
    if o["n_chunks"] != t["n_chunks"]:
        raise RuntimeError(f"{gguf}: llama-perplexity scored {t['n_chunks']} chunks, we "
                           f"scored {o['n_chunks']} of {o['n_tokens']} tokens: the two "
                           "do not see the same tokens")
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    m = {"ppl_ours": o["ppl"], "ppl_llamacpp": t["ppl"],
         "ppl_err_ours": o["ppl_err"], "ppl_err_llamacpp": t["ppl_err"],
         "ppl_ratio": o["ppl"] / t["ppl"],
         "ppl_chunk_max_dev": max(abs(a / b - 1) for a, b in zip(o["running"], t["running"])),
         "eval_s_ours": med(ours, "wall_s"), "eval_s_llamacpp": med(theirs, "wall_s"),
         "score_s_ours": med(ours, "score_s"), "score_s_llamacpp": med(theirs, "score_s"),
         "decode_tok_s_ours": statistics.median(speed),
         "decode_tok_s_llamacpp": statistics.median(tg),
         "decode_tok_s_ours_min": min(speed), "decode_tok_s_ours_max": max(speed),
         "decode_tok_s_llamacpp_min": min(tg), "decode_tok_s_llamacpp_max": max(tg),
         "eval_tokens": float(o["n_tokens"]), "eval_chunks": float(o["n_chunks"]),
         "threads": float(threads), "rounds": float(rounds)}
    m["eval_time_ratio"] = m["eval_s_ours"] / m["eval_s_llamacpp"]
    m["decode_ratio"] = m["decode_tok_s_ours"] / m["decode_tok_s_llamacpp"]
    _log_run(cfg, gguf, m, text, source, load)
    return m


def verdicts(m: dict[str, float]) -> dict[str, bool]:
    return {"ppl": abs(m["ppl_ratio"] - 1) <= TARGETS["ppl_ratio"],
            "eval_time": m["eval_time_ratio"] <= TARGETS["eval_time_ratio"],
            "decode": abs(m["decode_ratio"] - 1) <= TARGETS["decode_ratio"]}


def table(name: str, m: dict[str, float]) -> str:
    ok = {k: "ok" if v else "MISSED" for k, v in verdicts(m).items()}
    rows = [("perplexity", f"{m['ppl_ours']:.4f} ± {m['ppl_err_ours']:.4f}",
             f"{m['ppl_llamacpp']:.4f} ± {m['ppl_err_llamacpp']:.4f}",
             f"{m['ppl_ratio']:.5f}", f"within 0.5 %: {ok['ppl']}"),
            ("eval wall s", f"{m['eval_s_ours']:.2f}", f"{m['eval_s_llamacpp']:.2f}",
             f"{m['eval_time_ratio']:.3f}", f"<= 1.2x: {ok['eval_time']}"),
            ("  of which scoring s", f"{m['score_s_ours']:.2f}", f"{m['score_s_llamacpp']:.2f}",
             f"{m['score_s_ours'] / m['score_s_llamacpp']:.3f}", "(no load, no tokenising)"),
            (f"decode tok/s (tg{TG_TOKENS})",
             f"{m['decode_tok_s_ours']:.1f} ({m['decode_tok_s_ours_min']:.0f}-"
             f"{m['decode_tok_s_ours_max']:.0f})",
             f"{m['decode_tok_s_llamacpp']:.1f} ({m['decode_tok_s_llamacpp_min']:.0f}-"
             f"{m['decode_tok_s_llamacpp_max']:.0f})",
             f"{m['decode_ratio']:.3f}", f"within 10 %: {ok['decode']}")]
    head = (f"{name}: {int(m['eval_chunks'])} chunks of the same {int(m['eval_tokens'])} tokens,"
            f" {int(m['threads'])} threads, median of {int(m['rounds'])} alternating rounds; "
            f"max per-chunk running-PPL deviation {100 * m['ppl_chunk_max_dev']:.3f} %\n")
    lines = ["| measure | ours | llama.cpp | ours/theirs | target |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return head + "\n".join(lines)


def _log_run(cfg: DictConfig, gguf: Path, m: dict, text: str, source: str, load: str) -> None:
    import mlflow
    tracking.setup(cfg.tracking)
    tags = {Tag.KIND: Kind.CROSSCHECK, "crosscheck.file": str(gguf),
            "crosscheck.load_before": load,
            **{f"crosscheck.{k}": "ok" if v else "missed" for k, v in verdicts(m).items()},
            **tracking.provenance_tags()}
    with mlflow.start_run(run_name=f"crosscheck {gguf.name}", tags=tags):
        mlflow.log_params({"file": str(gguf), "eval.n_ctx": cfg.eval.n_ctx,
                           "eval.n_windows": cfg.eval.n_windows, "threads": m["threads"],
                           "tg_tokens": TG_TOKENS, "tg_repeats": TG_REPEATS,
                           "rounds": m["rounds"]})
        mlflow.log_metrics(m)
        tracking.log_dataset("eval-text", text, source, context="evaluation")
        mlflow.log_text(table(gguf.name, m), "crosscheck.md")


def latest_gguf_files(cfg: DictConfig) -> list[Path]:
    """The published file of the newest finished GGUF variant run of each quant.name."""
    import mlflow
    tracking.setup(cfg.tracking)
    runs = mlflow.search_runs(
        filter_string=f"tags.`{Tag.KIND}` = '{Kind.VARIANT}' and "
                      f"tags.`{Tag.QUANT_FAMILY}` = 'gguf' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="list")
    seen, files = set(), []
    for r in runs:
        name, path = r.data.tags.get(Tag.QUANT_NAME), r.data.tags.get(Tag.PUBLISHED)
        path = Path(cfg.paths.root) / path if path else None  # tag relative to paths.root
        if name not in seen and path and path.is_file():
            seen.add(name)
            files.append(path)
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", action="append", type=Path, help="GGUF file (repeatable)")
    p.add_argument("--latest", action="store_true", help="the latest MLflow GGUF variant runs")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="alternating runs of each side")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (eval.n_ctx=512, threads=2)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = compose(a.overrides)
    files = list(a.gguf or [])
    if a.latest:
        files += latest_gguf_files(cfg)
    if not files:
        files = [Path(cfg.paths.quantized) / "model.gguf"]
    for f in files:
        if not f.is_file():
            raise ConfigError("--gguf", f"{f} does not exist",
                              "run `make pipeline +quant=gguf_q4_k_m` first, or name a file")
    for f in files:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(table(str(f), crosscheck(cfg, f.resolve(), a.rounds)), flush=True)


if __name__ == "__main__":
    main()
