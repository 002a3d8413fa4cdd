"""Tune the calibrated INT4 recipes (GPTQ's dampening and activation order, AWQ's scale search,
the calibration size) on a held-out validation text, never on the test text.

    .venv-llmc/bin/python scripts/calib_tuning.py --model models/float-llama-19m \
        --calib calib.txt --score eval=eval.txt --score ood=ood.txt --select eval \
        --grid all --out tuning.json

Runs in the isolated llm-compressor environment (make llmc), or wherever llmcompressor 0.14 is
importable (a lent GPU: the oneshot then runs on it). It imports the project's oneshot helpers
(src/quantpipe/quantize/llmc_oneshot.py: the very scheme, groups and recipe the backend builds)
and, for every grid point, quantises a fresh copy of the model and scores it on every `--score`
text: mean KL(float || quantised) over the float model's top-64 tokens plus a tail bucket, per
position, on up to `--windows` windows of `--seq-len` tokens (the evaluation's measure), with a
95 % bootstrap interval over windows. The best setting per method is picked on `--select` only;
the other texts are reported, not used (the README's "Tuning the calibrated recipes").

Texts are files, written by the main environment (`python scripts/calib_tuning.py texts DIR`
there writes calib.txt, eval.txt and ood.txt: the default calibration mix, the eval split and
The Devil's Dictionary), so a machine with another Python's pydoc_data scores the same tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYM = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
ASYM = {**SYM, "symmetric": False}


def grid(which: str) -> list[dict]:
    """Grid points: name, scheme, modifiers, calibration size. RTN is each scheme's control."""
    out = []
    for samples, seq_len in ((96, 384), (96, 512)):  # the mix holds ~50k tokens
        calib = {"samples": samples, "seq_len": seq_len}
        for damp in (0.001, 0.01, 0.05, 0.1):
            for actorder in ("static", None):
                out.append({"method": "gptq", "weights": SYM, **calib,
                            "modifiers": [{"GPTQModifier": {"dampening_frac": damp,
                                                            "actorder": actorder}}]})
        for weights, method in ((SYM, "awq"), (ASYM, "awq_asym")):
            for duo in (True, False, "both"):
                out.append({"method": method, "weights": weights, **calib,
                            "modifiers": [{"AWQModifier": {"duo_scaling": duo}}]})
    for weights, method in ((SYM, "rtn"), (ASYM, "rtn_asym")):
        out.append({"method": method, "weights": weights, "samples": 16, "seq_len": 128,
                    "modifiers": [{"QuantizationModifier": {}}]})
    if which == "schemes":
        return scheme_grid()
    if which == "retune":
        return retune_grid()
    if which != "all":
        out = [g for g in out if g["method"] in which.split(",")]
    return out


def scheme_grid() -> list[dict]:
    """The scheme's own knobs, each method beside its RTN control: group size (128, or 64 at
    4.25 bits/weight against NF4's 4.13 with double quantisation) and the weight observer
    (`minmax`, or `mse`: the clipping ratio that minimises each group's error, the field's
    clip search). The shipped recipes' settings, calibration 96 x 384."""
    gptq = [{"GPTQModifier": {"dampening_frac": 0.01, "actorder": "static"}}]
    awq = [{"AWQModifier": {"duo_scaling": True}}]
    rtn = [{"QuantizationModifier": {}}]
    out = []
    for group, observer in ((128, "minmax"), (128, "mse"), (64, "minmax"), (64, "mse")):
        sym = {**SYM, "group_size": group, "observer": observer}
        asym = {**sym, "symmetric": False}
        rows = [("rtn", sym, rtn), ("rtn_asym", asym, rtn), ("gptq", sym, gptq),
                ("gptq_asym", asym, gptq), ("awq", sym, awq), ("awq_asym", asym, awq)]
        for method, weights, mods in rows:
            if (group, observer) == (128, "minmax") and method.startswith(("gptq", "awq")) \
                    and method != "gptq_asym":
                continue  # in the first grid (report/float/calib-tuning.json)
            out.append({"method": method, "weights": weights, "samples": 96, "seq_len": 384,
                        "modifiers": mods})
    # AWQ with the mse observer searches clipping inside every scale-grid point: slowest, last
    return sorted(out, key=lambda g: g["method"].startswith("awq") and
                  g["weights"]["observer"] == "mse")


def retune_grid() -> list[dict]:
    """The methods' own knobs again, under the shipped scheme (int4 symmetric, g128, `mse`
    observer): GPTQ's dampening (the first grid tuned it under `minmax`), AWQ's scale grid
    (`n_grid`, 20 points by default) and duo scaling; RTN, the control, beside them."""
    sym = {**SYM, "observer": "mse"}
    mods = [[{"QuantizationModifier": {}}]]
    mods += [[{"GPTQModifier": {"dampening_frac": d, "actorder": "static"}}]
             for d in (0.001, 0.01, 0.05, 0.1)]
    mods += [[{"AWQModifier": {"duo_scaling": duo, "n_grid": n}}]
             for duo, n in ((True, 20), (True, 40), ("both", 40))]
    method = {"QuantizationModifier": "rtn", "GPTQModifier": "gptq", "AWQModifier": "awq"}
    return [{"method": method[next(iter(m[0]))], "weights": sym, "samples": 96, "seq_len": 384,
             "modifiers": m} for m in mods]


def write_texts(folder: Path) -> None:
    """The main environment's texts, as files: the default calibration mix, the eval split and
    the held-out out-of-domain text."""
    sys.path.insert(0, str(ROOT / "src"))
    from quantpipe.data import calibration_mix, load_text
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calib.txt").write_text(calibration_mix(), encoding="utf-8")
    (folder / "eval.txt").write_text(load_text(None, "eval", "eval.text_file")[0], "utf-8")
    (folder / "ood.txt").write_text(load_text("builtin:ood", "eval", "eval.text_file")[0], "utf-8")
    print("wrote", *sorted(p.name for p in folder.iterdir()))


def windows(tok, text: str, n: int, seq_len: int) -> list:
    import torch
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [torch.tensor(ids[i:i + seq_len])
            for i in range(0, len(ids) - seq_len + 1, seq_len)][:n]


def per_window_kld(model, wins: list, refs: list, device) -> list[float]:
    """Mean KL per window (oneshot's measure: top-k of the float model plus a tail bucket)."""
    import torch
    sys.path.insert(0, str(ROOT / "src" / "quantpipe" / "quantize"))
    from llmc_oneshot import tail
    out = []
    with torch.no_grad():
        for w, (p, idx) in zip(wins, refs):
            logq = torch.log_softmax(model(w[None].to(device)).logits[0].float(), -1).cpu()
            q = logq.gather(-1, idx)
            kl = (p.exp() * (p - q)).sum(-1) + tail(p) * (tail(p).log() - tail(q).log())
            out.append(float(kl.mean()))
    return out


def interval(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    import numpy as np
    v = np.asarray(values)
    idx = np.random.default_rng(0).integers(0, len(v), size=(resamples, len(v)))
    return tuple(float(x) for x in np.percentile(v[idx].mean(-1), [2.5, 97.5]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True, help="calibration text file")
    ap.add_argument("--score", action="append", default=[], metavar="NAME=FILE",
                    help="a text to score every grid point on (repeatable)")
    ap.add_argument("--select", default="eval", help="the --score text that picks the best")
    ap.add_argument("--grid", default="all",
                    help="all, schemes (group size and observer), retune (the methods' knobs "
                         "under the shipped scheme), or methods: gptq,awq,rtn,...")
    ap.add_argument("--only-group-size", type=int, default=None,
                    help="keep only the grid points of this group size")
    ap.add_argument("--only-observer", default=None,
                    help="keep only the grid points of this weight observer (minmax or mse)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sys.path.insert(0, str(ROOT / "src" / "quantpipe" / "quantize"))
    import llmc_oneshot as O
    O.cpu_shims(torch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    calib_text = args.calib.read_text(encoding="utf-8")
    texts = dict(s.split("=", 1) for s in args.score)
    scored = {name: windows(tok, Path(f).read_text(encoding="utf-8"), args.windows, args.seq_len)
              for name, f in texts.items()}
    base.to(device)
    refs = {name: O.reference_topk(base, [w.to(device) for w in wins])
            for name, wins in scored.items()}
    refs = {name: [(p.cpu(), i.cpu()) for p, i in r] for name, r in refs.items()}
    base.to("cpu")
    results = []
    points = [g for g in grid(args.grid)
              if args.only_group_size in (None, g["weights"]["group_size"])
              and args.only_observer in (None, g["weights"].get("observer", "minmax"))]
    for point in points:
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        spec = {"weights": point["weights"], "input_activations": None, "ignore": ["lm_head"],
                "activation_overrides": [], "modifiers": point["modifiers"]}
        groups, _ = O.config_groups(model, spec)
        ds = O.calibration(tok, calib_text, point["samples"], point["seq_len"])
        calibrate = not point["method"].startswith("rtn")
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds if calibrate else None,
                recipe=O.build_modifiers(spec, groups), max_seq_length=point["seq_len"],
                num_calibration_samples=len(ds), output_dir=None)
        took = time.perf_counter() - t0
        try:  # the sequential pipeline may leave the model dispatched (onloaded per module)
            from compressed_tensors.offload import remove_dispatch
            remove_dispatch(model)
        except Exception:  # noqa: BLE001 - nothing dispatched
            pass
        model.to(device)
        row = {**{k: v for k, v in point.items() if k != "weights"},
               "symmetric": point["weights"]["symmetric"],
               "group_size": point["weights"]["group_size"],
               "observer": point["weights"].get("observer", "minmax"),
               "oneshot_s": round(took, 2)}
        for name, wins in scored.items():
            kl = per_window_kld(model, wins, refs[name], device)
            row[f"kld_{name}"] = sum(kl) / len(kl)
            row[f"kld_{name}_ci95"] = interval(kl)
        print(json.dumps(row), flush=True)
        results.append(row)
        args.out.write_text(json.dumps({"select": args.select, "results": results}, indent=1))
        del model
    best = {}
    for r in results:
        m = r["method"]
        if m not in best or r[f"kld_{args.select}"] < best[m][f"kld_{args.select}"]:
            best[m] = r
    args.out.write_text(json.dumps({"select": args.select, "windows": args.windows,
                                    "seq_len": args.seq_len, "device": device.type,
                                    "results": results, "best": best}, indent=1))
    for m, r in best.items():
        print(f"best {m}: " + ", ".join(f"{k}={r[k]:.4f}" for k in r if k.startswith("kld_")
                                          and not k.endswith("ci95")), r["modifiers"],
              r["samples"], r["seq_len"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "texts":
        write_texts(Path(sys.argv[2]))
    else:
        main()
