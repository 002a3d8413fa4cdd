"""Effective CPU throughput of the evaluation's transformers runtime at a real model's width: the
figures of the runtimes' Throughput (quantpipe.evaluate.runtimes) that estimate an evaluation's
time (its ETA, and the refusal before any stage of a variant that cannot finish within
eval.max_minutes).

    .venv/bin/python benchmarks/cpu_throughput.py                      # 7B width, ~5 min
    .venv/bin/python benchmarks/cpu_throughput.py --size 1b --formats fp16,nf4

A Llama of the --size shape (benchmarks/scale.py's SHAPES: 7B = hidden 4096, FFN 11008, untied
output) but only --layers layers, random FP16 weights, saved once; int8 / nf4 folders are made
from it by the pipeline's own bitsandbytes backends. Each format is then opened in a fresh child
process by the evaluation's own runtime (quantpipe.evaluate.transformers_runtime.HFRuntime) and timed:

  prefill  one window of --tokens tokens (window_logits, as perplexity scoring does), best of
           --repeats: FLOP/s = 2 x matmul parameters x tokens / seconds
  decode   --decode single-token steps after an 8-token prompt: weight bytes read per second
           = bytes of the matmul weights as stored x tokens / seconds

Matmul parameters leave the input embedding out (a lookup, not a matmul): with a few layers
it would otherwise weigh as much as the layers. Prints one line per format and a JSON summary;
run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, "src")
from pathlib import Path
from quantpipe.evaluate.transformers_runtime import HFRuntime
folder, tokens, decode, repeats, threads, matmul_params, matmul_bytes = sys.argv[1:8]
tokens, decode, repeats, threads = int(tokens), int(decode), int(repeats), int(threads)
rt = HFRuntime(Path(folder), threads)
ids = np.random.default_rng(0).integers(100, 40000, size=tokens).astype(np.int64)
best = float("inf")
for _ in range(repeats):
    t = time.perf_counter(); rt.window_logits(ids); best = min(best, time.perf_counter() - t)
tok = rt.prefill(ids[:8].tolist())
t = time.perf_counter()
for _ in range(decode):
    tok = rt.step(tok)
step = (time.perf_counter() - t) / decode
print(json.dumps({"prefill_s": best, "step_s": step,
                  "flops": 2 * int(matmul_params) * tokens / best,
                  "bytes_per_s": int(matmul_bytes) / step}))
"""


def build(size: str, layers: int, out: Path) -> tuple[int, int]:
    """The FP16 folder; (matmul parameters, bytes per stored parameter 2)."""
    import torch
    from scale import SHAPES, VOCAB, tokenizer_dir
    from transformers import LlamaConfig, LlamaForCausalLM
    h, inter, _, heads, kv, tied = SHAPES[size]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=4096, torch_dtype="float16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out)
    tok = tokenizer_dir(out.parent)
    for f in tok.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    embed = VOCAB * h
    total = sum(p.numel() for p in model.parameters())
    return total - embed + (embed if tied else 0), 2


def make_format(fmt: str, fp16: Path, work: Path) -> Path:
    if fmt == "fp16":
        return fp16
    from quantpipe.quantize import QuantContext
    from quantpipe.quantize.bnb import quantize_int4, quantize_int8
    dst = work / fmt
    dst.mkdir()
    ctx = QuantContext(artifacts=work, tools=work, src_fingerprint="bench", threads=None)
    (quantize_int8 if fmt == "int8" else quantize_int4)(fp16, dst, ctx)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7b", help="a shape of benchmarks/scale.py (default 7b)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built (default 2)")
    ap.add_argument("--formats", default="fp16,int8,nf4")
    ap.add_argument("--tokens", type=int, default=256, help="prefill window (default 256)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps timed (default 8)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        fp16 = work / "fp16"
        params, per_param = build(args.size, args.layers, fp16)
        out = {}
        for fmt in args.formats.split(","):
            folder = make_format(fmt, fp16, work)
            r = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.tokens),
                                str(args.decode), str(args.repeats), str(args.threads),
                                str(params), str(params * per_param)],
                               cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{fmt}: the timing child failed:\n{r.stderr[-3000:]}")
            out[fmt] = json.loads(r.stdout.strip().splitlines()[-1])
            m = out[fmt]
            print(f"{fmt:5s} prefill {args.tokens} tokens {m['prefill_s']:.2f} s = "
                  f"{m['flops'] / 1e9:.1f} GFLOP/s; decode {m['step_s']:.2f} s/token = "
                  f"{m['bytes_per_s'] / 1e9:.2f} GB/s of FP16 weight bytes", flush=True)
    print(json.dumps({"size": args.size, "layers": args.layers, "matmul_params": params,
                      "threads": args.threads, "tokens": args.tokens, "formats": out}, indent=1))


if __name__ == "__main__":
    main()
