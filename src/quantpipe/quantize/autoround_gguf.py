"""intel AutoRound's GGUF export of a merged FP16 folder, run in the isolated .venv-llmc.

    .venv-llmc/bin/python src/quantpipe/quantize/autoround_gguf.py SPEC.json

One candidate of the tuned GGUF search (quantpipe.quantize.tuned). auto-round is installed beside
llm-compressor (which pins it) in .venv-llmc, so this file imports nothing from quantpipe.
SPEC.json holds src, dst, the calibration text file, type (a llama.cpp file type such as
q4_k_m), iters (0: AutoRound's optimised round-to-nearest, its recommended mode for GGUF k-quants;
> 0: sign-gradient rounding, far slower on CPU), samples, seq_len and threads. AutoRound lays the
tensors out as llama.cpp's own `type` mix does (the same types per tensor, so the same size) and
chooses scales and minimums from the calibration activations.

Writes dst/model.gguf and dst/autoround_result.json (time, own peak RSS, samples, version).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

# run as a script, this file's folder leads sys.path, and its sibling gguf.py would shadow the
# gguf package auto-round imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def own_peak_mb() -> float:  # quantpipe.memory.own_peak_mb, which this venv cannot import
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(spec_path: str) -> None:
    # its INFO lines name every tensor it writes (hundreds); warnings and progress bars remain
    os.environ.setdefault("AR_LOG_LEVEL", "WARNING")
    import auto_round
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    src, dst = Path(spec["src"]), Path(spec["dst"])
    tok = AutoTokenizer.from_pretrained(src)
    text = Path(spec["text_file"]).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = spec["seq_len"]
    data = [ids[i:i + n].unsqueeze(0) for i in range(0, len(ids) - n + 1, n)][:spec["samples"]]
    if not data:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, fewer than one window of "
                         f"{n}: lower quant.tune.autoround.seq_len")
    # float32 on CPU: float16 matmuls there are ~4x slower (the same choice as llmc_oneshot.py)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config._name_or_path = "model"  # general.name of the GGUF: not the cache folder's name
    fmt = f"gguf:{spec['type']}"
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme=fmt, dataset=data, iters=spec["iters"],
                   nsamples=len(data), seqlen=n, device_map="cpu", batch_size=4)
    work = dst / "export"
    try:
        ar.quantize_and_save(str(work), format=fmt)
    except NotImplementedError as e:  # e.g. an architecture its bundled converter lacks
        # one line (the tuner drops this candidate with it), not a chained traceback
        raise SystemExit(f"AutoRound cannot export this model: {str(e).splitlines()[0]}") from None
    made = sorted(work.rglob("*.gguf"))
    if len(made) != 1:
        raise SystemExit(f"expected one GGUF from AutoRound's export, found {made}")
    made[0].rename(dst / "model.gguf")
    shutil.rmtree(work)
    (dst / "autoround_result.json").write_text(json.dumps({
        "metrics": {"autoround_s": time.perf_counter() - t0, "autoround_peak_rss_mb": own_peak_mb(),
                    "autoround_calib_samples": len(data),
                    "autoround_calib_tokens": len(data) * n},
        "version": auto_round.__version__}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
