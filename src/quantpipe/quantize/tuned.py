"""Tuned GGUF: a sensitivity-searched mix of llama.cpp types under a byte budget.

    make tools && make pipeline +quant=gguf_tuned [quant.type=q4_k_m] [quant.budget_mb=95]

llama.cpp's q4_k_m is one fixed recipe of tensor types. This backend searches its own recipe on
the calibration split (never the evaluation text) and writes it with stock llama-quantize
(`--tensor-type-file` overrides + the importance matrix), so the file loads in any llama.cpp:

1. budget: the size of the plain `quant.type` file (or `quant.budget_mb`);
2. the importance matrix of quantpipe.quantize.imatrix (calibration topics);
3. the FP16 reference: top-k log-probs of the F16 GGUF on windows of calibration text;
4. sensitivity: KLD vs that reference with every tensor at level l of `tune.levels` (one model
   per level), then with one group (a tensor kind in a band of layers, or token_embd/output)
   raised from the second-lowest level to the highest: the KLD that group removes, s_g. Each
   probe is spliced from the all-at-level files (splice(): the bytes llama-quantize writes
   for that mix), so it costs a scoring, not a quantisation;
5. allocation: KLD(mix) ~ KLD(top) + sum_g c_g(l_g), where c_g(l) is s_g spread over the
   levels by group g's own quantisation error at each level (its weights' squared error
   against F16, weighted per input column by the importance matrix, read from the all-at-level
   files); a greedy knapsack buys the upgrade with the most predicted KLD per byte until the
   budget is spent;
6. AutoRound (`tune.methods` names "autoround"; needs `make llmc`): intel's auto-round exports
   the `quant.type` file itself, scales and minimums chosen from calibration activations
   (optimised round-to-nearest with `tune.autoround.iters: 0`, sign-gradient rounding above);
   run in .venv-llmc (quantpipe/quantize/autoround_gguf.py), cached in artifacts/autoround/;
7. verification: the mix, AutoRound's file, llama.cpp's imatrix `quant.type` and plain
   `quant.type` are scored on the same calibration windows; the lowest KLD within the budget is
   published, and every candidate's KLD is logged (what lost, and by how much).

Every KLD here is on calibration text; the held-out numbers come from the evaluation stage.

The recipe ships with the file. A searched mix writes its per-tensor types into the GGUF's own
metadata (`quantpipe.tensor_types.<kind>`: each tensor kind's types layer by layer, run-length
coded, e.g. `q5_k*8,q4_k*22`; `mix_of` reads them back), and the published folder's `recipe/`
holds what stock llama-quantize needs to write the same bytes again: `tensor-types.txt` (its
`--tensor-type-file`), `imatrix.gguf` and `recreate.sh`, logged on the variant run as `recipe/`.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantpipe import artifacts as art
from quantpipe.data import load_text
from quantpipe.errors import ConfigError
from quantpipe.evaluate import metrics as M
from quantpipe.memory import own_peak_mb
from quantpipe.quantize import register
from quantpipe.quantize.gguf import LIBRARIES as GGUF_LIBRARIES
from quantpipe.quantize.gguf import eval_need as gguf_eval_need
from quantpipe.quantize.gguf import f16_gguf, ftype_of, gguf_publish, llama_quantize, smoke
from quantpipe.quantize.gguf import memory_need as gguf_memory_need
from quantpipe.quantize.imatrix import cached_imatrix, imatrix_settings
from quantpipe.quantize.llmc import llmc_python, run_isolated
from quantpipe.schema import Num, Str
from quantpipe.tools import run_tool, tool_path

log = logging.getLogger(__name__)
# each level: (type for tensors whose rows are not a multiple of 256, type for those that are).
# SmolLM2's 576 columns take the 32-block types, its 1536-column ffn_down the K-quants. From
# q3_k to q8_0, so one sensitivity measurement serves every budget from q3_k_m's to q5_k_m's.
LEVELS = [["iq4_nl", "q3_k"], ["iq4_nl", "q4_k"], ["q5_0", "q5_k"], ["q5_1", "q6_k"],
          ["q8_0", "q8_0"]]
METHODS = ("sensitivity", "autoround")  # searched candidates; imatrix and plain always compete
AUTOROUND = {"iters": 0, "samples": 32, "seq_len": 512}
TUNE = {"max_groups": None, "windows": 8, "n_ctx": 256, "kld_top_k": 64, "bands": 6,
        "levels": LEVELS, "methods": list(METHODS), "autoround": AUTOROUND}
LAYER = re.compile(r"blk\.(\d+)\.(.+)\.weight$")
# bump when the file written changes: 2, bounded by work (max_groups), no host paths; 3, the
# searched mix's per-tensor types in the file's metadata (and llama.cpp's versions in the key);
# 4, sensitivities measured once and cached for every budget (levels from q3_k); 5, probes from
# the second level, each group's cost per level from its own weighted weight error (probes
# spliced from the level files: the same bytes, so the same file as 5 would write)
RECIPE = 5
META = "quantpipe.tensor_types."  # + tensor kind: that kind's types, layer by layer (recipe_kv)
META_VALUE_MAX = 127              # llama.cpp's --override-kv keeps 127 bytes of a string
RECIPE_DIR = "recipe"


def tune_settings(tune: dict) -> dict:
    if "max_minutes" in tune:
        raise ConfigError("quant.tune.max_minutes", "is gone: a search cut by the wall clock "
                          "wrote a different file on a busy machine than on an idle one",
                          "drop it; quant.tune.max_groups=N bounds the search by work (groups "
                          "measured), and the log and the progress bar give the time estimate")
    unknown = set(tune) - set(TUNE)
    if unknown:
        raise ConfigError("quant.tune", f"unknown keys {sorted(unknown)}", f"use only {sorted(TUNE)}")
    s = {**TUNE, **tune}
    for key in ("windows", "n_ctx", "kld_top_k", "bands"):
        if not isinstance(s[key], int) or s[key] <= 0:
            raise ConfigError(f"quant.tune.{key}", f"{s[key]!r} is not a positive integer",
                              "set a whole number above 0")
    if s["max_groups"] is not None and (isinstance(s["max_groups"], bool) or not isinstance(
            s["max_groups"], int) or s["max_groups"] < 0):
        raise ConfigError("quant.tune.max_groups", f"{s['max_groups']!r} is not a whole number "
                          ">= 0 or null", "null measures every group; N measures the first N "
                          "(band by band) and estimates the rest")
    if len(s["levels"]) < 2 or any(len(lv) != 2 for lv in s["levels"]):
        raise ConfigError("quant.tune.levels", "needs at least two levels, each a pair [type for "
                          "rows not a multiple of 256, type for rows that are]",
                          "e.g. [[iq4_nl, q4_k], [q8_0, q8_0]]")
    for lv in s["levels"]:
        for t in lv:
            _ggml_type(t)
    methods = s["methods"]
    if not isinstance(methods, list) or not set(methods) <= set(METHODS):
        raise ConfigError("quant.tune.methods", f"{methods!r} is not a list of {list(METHODS)}",
                          "e.g. quant.tune.methods=[sensitivity] (imatrix and plain always compete)")
    s["autoround"] = ar = {**AUTOROUND, **(s["autoround"] or {})}
    if unknown := set(ar) - set(AUTOROUND):
        raise ConfigError("quant.tune.autoround", f"unknown keys {sorted(unknown)}",
                          f"use only {sorted(AUTOROUND)}")
    for key in AUTOROUND:
        if not isinstance(ar[key], int) or ar[key] < (0 if key == "iters" else 1):
            raise ConfigError(f"quant.tune.autoround.{key}", f"{ar[key]!r} is not a whole number "
                              f">= {0 if key == 'iters' else 1}", "set a whole number")
    return s


def _check(options: dict) -> None:
    """Before any stage: the type, the search settings, the importance matrix's settings."""
    ftype_of(options["type"])
    tune_settings(_plain(options.get("tune") or {}))
    imatrix_settings(_plain(options.get("imatrix") or {}))
    # the tools and .venv-llmc are this machine's, not the config's: check_machine looks for
    # them before the first stage (`make pipeline`/`make sweep` build both first)


def _ggml_type(name: str):
    import gguf
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ConfigError("quant.tune.levels", f"{name!r} is not a llama.cpp tensor type",
                          "use names such as iq4_nl, q4_k, q5_0, q5_k, q6_k, q8_0") from None


# --- the tensors and their byte costs ----------------------------------------------------------

@dataclass
class Tensor:
    name: str
    ncols: int      # ne[0]: the length of the rows blocks are cut from
    n: int          # elements
    bytes: int      # in the plain target-type file


def quantised_tensors(plain: Path) -> tuple[list[Tensor], int]:
    """The tensors the plain target-type file quantises, and its bytes that are not those
    tensors (metadata, vocabulary, norms: the same in every mix)."""
    import gguf
    reader = gguf.GGUFReader(str(plain))
    keep = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.BF16}
    out = [Tensor(t.name, int(t.shape[0]), int(t.n_elements), int(t.n_bytes))
           for t in reader.tensors if t.tensor_type not in keep]
    return out, plain.stat().st_size - sum(t.bytes for t in out)


def type_for(t: Tensor, level: list[str]) -> str:
    return level[1] if t.ncols % 256 == 0 else level[0]


def tensor_bytes(t: Tensor, type_name: str) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(type_name)]
    if t.ncols % block:
        raise ConfigError("quant.tune.levels", f"{type_name} needs rows of a multiple of {block}; "
                          f"{t.name} has {t.ncols}", "use a 32-block type in the first column")
    return t.n // block * size


def groups_of(tensors: list[Tensor], bands: int) -> dict[str, list[Tensor]]:
    """Tensor kind x band of consecutive layers ("attn_q@0-4"); token_embd / output alone."""
    layers = [int(m.group(1)) for t in tensors if (m := LAYER.match(t.name))]
    width = math.ceil((max(layers) + 1) / bands) if layers else 1
    out: dict[str, list[Tensor]] = {}
    for t in tensors:
        m = LAYER.match(t.name)
        if m is None:
            key = t.name.removesuffix(".weight")
        else:
            lo = int(m.group(1)) // width * width
            key = f"{m.group(2)}@{lo}-{lo + width - 1}"
        out.setdefault(key, []).append(t)
    return out


def kind_and_layer(name: str) -> tuple[str, int]:
    """`blk.3.attn_q.weight` -> ("attn_q", 3); `token_embd.weight` -> ("token_embd", 0)."""
    m = LAYER.match(name)
    return (m.group(2), int(m.group(1))) if m else (name.removesuffix(".weight"), 0)


def recipe_kv(types: dict[str, str]) -> dict[str, str]:
    """A mix {tensor name: type} as GGUF metadata: one key per tensor kind (`attn_q`, or the
    whole name for token_embd / output), its types over the layers in order, run-length coded
    (`q5_k*8,q4_k*22`)."""
    kinds: dict[str, list[tuple[int, str]]] = {}
    for name, t in types.items():
        kind, layer = kind_and_layer(name)
        kinds.setdefault(kind, []).append((layer, t))
    out = {}
    for kind, layered in sorted(kinds.items()):
        runs: list[list] = []
        for _, t in sorted(layered):
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        value = ",".join(f"{t}*{n}" for t, n in runs)
        if len(value) > META_VALUE_MAX:  # more type changes than levels x bands can make
            raise RuntimeError(f"the recipe of {kind} does not fit llama.cpp's metadata string "
                               f"({len(value)} > {META_VALUE_MAX} bytes): {value}")
        out[META + kind] = value
    return out


def mix_of(metadata: dict[str, str], names: list[str]) -> dict[str, str]:
    """recipe_kv read back: {tensor name: type} for `names` (a file's quantised tensors)."""
    kinds = {k.removeprefix(META): [t for run in v.split(",") for t in
                                    [run.rsplit("*", 1)[0]] * int(run.rsplit("*", 1)[1])]
             for k, v in metadata.items() if k.startswith(META)}
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        kind, layer = kind_and_layer(name)
        by_kind.setdefault(kind, []).append((layer, name))
    return {name: kinds[kind][i] for kind, layered in by_kind.items()
            for i, (_, name) in enumerate(sorted(layered))}


def metadata_bytes(kinds: int) -> int:
    """The most bytes recipe_kv's keys can add to a file: per key its name (<= 64), type, two
    lengths and a value of at most META_VALUE_MAX, plus the tensor data's alignment (32)."""
    return kinds * (8 + 64 + 4 + 8 + META_VALUE_MAX) + 32


# --- scoring on calibration text ----------------------------------------------------------------

class CalibScorer:
    """Mean KLD of a GGUF against the F16 GGUF's top-k log-probs, on windows of calibration
    text (llama.cpp's protocol: the second half of each window scored)."""

    def __init__(self, f16: Path, text: str, s: dict, threads: int | None):
        from quantpipe.evaluate.llama_cpp_runtime import LlamaCppRuntime
        self.runtime, self.n_ctx, self.threads = LlamaCppRuntime, s["n_ctx"], threads
        rt = LlamaCppRuntime(f16, threads, s["n_ctx"])
        ids = np.array(rt.tokenize(text), dtype=np.int32)
        with_bos = rt.llm.tokenize(b"a", add_bos=True)
        bos = with_bos[0] if len(with_bos) > len(rt.llm.tokenize(b"a", add_bos=False)) else None
        self.wins = M.windows(ids, s["n_ctx"], s["windows"], bos)
        if len(self.wins) == 0:
            raise ConfigError("quant.backend.imatrix.text_file", f"the calibration text has "
                              f"{len(ids)} tokens, fewer than one window (quant.tune.n_ctx="
                              f"{s['n_ctx']})", "use a longer text or a smaller quant.tune.n_ctx")
        self.ref = [M.topk(lp, s["kld_top_k"]) for lp in self._logprobs(rt)]
        self.tokens = int(sum(len(r[0]) for r in self.ref))
        del rt

    def _logprobs(self, rt):
        for w in self.wins:
            yield M.scored_logprobs(rt.window_logits(w, M.first_scored(len(w))), w)[0]

    def kld(self, path: Path) -> float:
        rt = self.runtime(path, self.threads, self.n_ctx)
        per = [M.kld_topk(lp_ref, idx, logq) for (lp_ref, idx), logq
               in zip(self.ref, self._logprobs(rt))]
        del rt
        return float(np.concatenate(per).mean())


# --- the search ---------------------------------------------------------------------------------

class Search:
    """Quantises candidate mixes with llama-quantize (+ imatrix) and scores them."""

    def __init__(self, f16, matrix, tensors, overhead, scorer, work, ctx, target):
        self.f16, self.matrix, self.tensors, self.overhead = f16, matrix, tensors, overhead
        self.scorer, self.work, self.ctx, self.target = scorer, work, ctx, target
        self.n_scored, self.peak_mb, self.scoring_s = 0, 0.0, 0.0
        self.last_bytes = 0  # the file size of the last candidate scored
        self.last_errors: dict[str, float] = {}
        self.kept: list[Path] = []             # candidates kept to splice probes from
        self.kept_types: list[dict[str, str]] = []
        self.kept_readers: list = []            # their gguf.GGUFReader, parsed once
        self.f16_reader = None
        self.n_spliced = 0

    def size(self, types: dict[str, str]) -> int:
        return self.overhead + sum(tensor_bytes(t, types[t.name]) for t in self.tensors)

    def quantise(self, types: dict[str, str] | None, out: Path) -> None:
        """llama-quantize with the importance matrix; `types` overrides every quantised tensor
        (anchored names: `blk.1.` must not match `blk.11.`), None = llama.cpp's own mix."""
        args = ["--imatrix", Path(self.matrix).name]  # recorded as given: no host path
        if types is not None:
            args += mix_args(types, self.work / "tensor-types.txt")
        args += [Path(self.f16).resolve(), Path(out).resolve(), self.target.upper()]
        if self.ctx.threads:
            args.append(self.ctx.threads)
        r = run_tool(tool_path(self.ctx.tools, "llama-quantize"), args,
                     cwd=Path(self.matrix).parent)
        self.peak_mb = max(self.peak_mb, r.peak_rss_mb)

    def score(self, types: dict[str, str] | None, groups: dict | None = None,
              keep: Path | None = None) -> float:
        """The candidate's calibration KLD; with `groups`, also each group's weighted weight
        error in it (self.last_errors, weighted_errors). A mix whose every tensor has its type
        in one of the kept files (self.kept) is spliced from them (splice()) instead of
        quantised again; `keep`: keep this candidate there, for that."""
        t0 = time.monotonic()
        out = keep or self.work / "candidate.gguf"
        source = self._spliceable(types)
        if source is not None:
            splice(self.kept_readers, source, out)
            self.n_spliced += 1
        else:
            self.quantise(types, out)
        kld = self.scorer.kld(out)
        self.last_bytes = out.stat().st_size
        import gguf
        if keep is not None:  # parsed once: GGUFReader reads the vocabulary (seconds)
            self.kept.append(keep)
            self.kept_types.append(dict(types))
            self.kept_readers.append(gguf.GGUFReader(str(keep)))
        if groups is not None:
            if self.f16_reader is None:
                self.f16_reader = gguf.GGUFReader(str(self.f16))
            self.last_errors = weighted_errors(
                self.f16_reader, self.kept_readers[-1] if keep is not None else out,
                self.matrix, groups)
        if keep is None:
            out.unlink()
        self.n_scored += 1
        self.scoring_s += time.monotonic() - t0
        return kld

    def seconds_per_candidate(self) -> float:
        return self.scoring_s / max(self.n_scored, 1)

    def _spliceable(self, types: dict[str, str] | None) -> dict[str, int] | None:
        """{tensor: index of a kept file holding it at its type in `types`}, or None."""
        if types is None or not self.kept:
            return None
        source = {}
        for name, t in types.items():
            i = next((i for i, k in enumerate(self.kept_types) if k.get(name) == t), None)
            if i is None:
                return None
            source[name] = i
        return source

    def drop_kept(self) -> None:
        self.kept_readers, self.f16_reader = [], None
        for f in self.kept:
            f.unlink(missing_ok=True)
        self.kept, self.kept_types = [], []


def splice(files: list, source: dict[str, int], out: Path) -> None:
    """A GGUF whose every tensor is copied, bytes as they are, from files[source[name]]
    (tensors not in `source`, the F32 norms, from files[0]), metadata from files[0], written by
    gguf-py's GGUFWriter (as its gguf_new_metadata script copies a file; `files`: paths or
    parsed GGUFReaders). llama-quantize quantises each tensor on its own (its type, its
    importance-matrix columns), so a tensor's bytes do not depend on the other tensors' types,
    and a mix of tensors from files llama-quantize wrote is the file it would write for that
    mix, but for the recipe metadata; a probe costs its scoring, not a quantisation (the slow
    test checks the bytes against llama-quantize's)."""
    import gguf
    readers = [f if isinstance(f, gguf.GGUFReader) else gguf.GGUFReader(str(f)) for f in files]
    by_name = [{t.name: t for t in r.tensors} for r in readers]
    base = readers[0]
    tensors = [by_name[source.get(t.name, 0)][t.name] for t in base.tensors]
    arch = base.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=base.endianess)
    logging.getLogger(gguf.gguf_writer.__name__).setLevel(logging.WARNING)  # a line per probe
    for field in base.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = field.contents()
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=base.endianess)
    writer.close()


def mix_args(types: dict[str, str], spec: Path, relative: bool = False) -> list[str]:
    """llama-quantize's arguments for a mix: its --tensor-type-file, written to `spec` (anchored
    names: `blk.1.` must not match `blk.11.`), and the recipe in the file's own metadata
    (--override-kv, recipe_kv). `relative`: the file named as in its folder."""
    spec.write_text("".join(f"^{re.escape(n)}$={t}\n" for n, t in types.items()))
    args = ["--tensor-type-file", spec.name if relative else str(spec.resolve())]
    for key, value in recipe_kv(types).items():
        args += ["--override-kv", f"{key}=str:{value}"]
    return args


def at_level(groups: dict[str, list[Tensor]], levels: list, choice: dict[str, int]) -> dict:
    return {t.name: type_for(t, levels[choice[g]]) for g, ts in groups.items() for t in ts}


def _kind(group: str) -> str:
    return group.split("@")[0]


def _band(group: str) -> int:
    return int(group.split("@")[1].split("-")[0]) if "@" in group else -1


def weighted_errors(f16, quantised, matrix: Path, groups: dict,
                    rows: int = 4096) -> dict[str, float]:
    """Per group: the squared error of its quantised weights against the F16 file's, each input
    column weighted by its mean squared activation from the importance matrix (the output error
    a column's error causes; unweighted for tensors the matrix has no entry for, e.g.
    token_embd). gguf-py dequantises both files (paths or parsed GGUFReaders), `rows` rows at
    a time."""
    import gguf
    from gguf.quants import dequantize

    def tensors(f) -> dict:
        return {t.name: t for t in (f if isinstance(f, gguf.GGUFReader)
                                    else gguf.GGUFReader(str(f))).tensors}
    ref, got = tensors(f16), tensors(quantised)
    im = {t.name: np.asarray(t.data, dtype=np.float64) for t in gguf.GGUFReader(str(matrix)).tensors}
    out = {}
    for g, ts in groups.items():
        total = 0.0
        for t in ts:
            q, f = got[t.name], ref[t.name]
            w = im.get(t.name + ".in_sum2")
            w = w / max(float(im[t.name + ".counts"].ravel()[0]), 1.0) if w is not None else 1.0
            qd, fd = q.data.reshape(-1, q.data.shape[-1]), f.data.reshape(-1, f.data.shape[-1])
            for lo in range(0, qd.shape[0], rows):
                d = (dequantize(qd[lo:lo + rows], q.tensor_type).astype(np.float64)
                     - dequantize(fd[lo:lo + rows], f.tensor_type))
                total += float(((d * d).sum(axis=0) * w).sum())
        out[g] = total
    return out


def sensitivities(search: Search, groups: dict, levels: list, max_groups: int | None = None
                  ) -> tuple[list[float], dict, int, dict]:
    """(KLD with everything at each level, s_g per group, groups measured, each group's
    weighted weight error at each level). The KLD probes start from the probe level
    (probe_level: the second lowest): s_g is the KLD group g removes when raised from there to
    the highest level. How that cost spreads over the other levels comes from the group's own
    weight errors (curves()), not from the whole model's: a level that changes only ffn_down's
    type (iq4_nl/q3_k -> iq4_nl/q4_k on SmolLM2) must not look like a step for attention.

    The search is bounded by work, never by the clock, so the same inputs give the same file on
    a busy machine and an idle one: every group is measured, or the first `max_groups` in a
    fixed order, band by band (every kind of the first band, then the next), so each kind keeps
    some measurements. A group left unmeasured gets the median KLD per weight of the measured
    groups of its kind (of all groups, if its kind has none; with none measured, the KLD all
    groups remove together, per weight)."""
    from tqdm import tqdm
    top, p = len(levels) - 1, probe_level(levels)
    order = sorted(groups, key=lambda g: (_band(g), -sum(t.n for t in groups[g])))
    todo = order if max_groups is None else order[:max_groups]
    bar = tqdm(total=len(levels) + len(todo), desc="tune: sensitivity search", unit="candidate",
               leave=True)  # its ETA is the time estimate
    all_at, errors = [], {g: [] for g in groups}
    for lv in range(len(levels)):  # kept: every probe is spliced from these files
        all_at.append(search.score(at_level(groups, levels, dict.fromkeys(groups, lv)), groups,
                                   keep=search.work / f"level-{lv}.gguf"))
        for g in groups:
            errors[g].append(search.last_errors[g])
        bar.update()
    log.info("tune: %d levels quantised and scored at %.0f s each; %d probes, spliced from "
             "their files (scoring only)", len(levels), search.seconds_per_candidate(), len(todo))
    s: dict[str, float] = {}
    for g in todo:
        choice = {**dict.fromkeys(groups, p), g: top}
        s[g] = max(all_at[p] - search.score(at_level(groups, levels, choice)), 0.0)
        bar.update()
    bar.close()
    search.drop_kept()
    measured = len(s)
    if measured < len(groups):
        log.info("tune: quant.tune.max_groups=%d of %d groups measured; the rest are estimated",
                 measured, len(groups))
        per = {g: s[g] / sum(t.n for t in groups[g]) for g in s}
        # none measured: the KLD every group removes together, spread per weight
        flat = (all_at[p] - all_at[-1]) / sum(t.n for ts in groups.values() for t in ts)
        for g in order[measured:]:
            same = [v for k, v in per.items() if _kind(k) == _kind(g)] or list(per.values())
            s[g] = (float(np.median(same)) if same else flat) * sum(t.n for t in groups[g])
    return all_at, s, measured, errors


def probe_level(levels: list) -> int:
    """The level the KLD probes start from: the second lowest (with two levels, the lowest).
    Probes from the lowest drown the small groups in the noise of a model that is broken
    everywhere at once (SmolLM2 at q3_k: KLD 0.26)."""
    return 1 if len(levels) > 2 else 0


def curves(s: dict, errors: dict, levels: list) -> dict[str, list[float]]:
    """Each group's predicted KLD cost at each level, 0 at the top: its probe s_g, spread over
    the levels in proportion to its own weighted weight error above the top level's, and never
    rising with more bits. A group whose probe measured nothing (at or below the noise) gets
    the smallest KLD per unit of weighted error that its kind measured (of all kinds, if its
    kind has none), so it is not free at the lowest level."""
    top, p = len(levels) - 1, probe_level(levels)
    per_kind: dict[str, list[float]] = {}
    for g, v in s.items():
        if v > 0 and (span := errors[g][p] - errors[g][top]) > 0:
            per_kind.setdefault(_kind(g), []).append(v / span)
    floor_all = min((x for xs in per_kind.values() for x in xs), default=0.0)
    out = {}
    for g, errs in errors.items():
        span = errs[p] - errs[top]
        k = s[g] / span if s[g] > 0 and span > 0 else min(per_kind.get(_kind(g), [floor_all]))
        c = [max(k * (e - errs[top]), 0.0) for e in errs]
        for lv in range(top - 1, -1, -1):  # more bits never predicted to hurt
            c[lv] = max(c[lv], c[lv + 1])
        out[g] = c
    return out


SENSITIVITY_KEYS = ("windows", "n_ctx", "kld_top_k", "bands", "levels", "max_groups")


def cached_sensitivities(search: Search, groups: dict, s: dict, f16: Path, matrix: Path,
                         text: str, ctx) -> tuple[list[float], dict, int, dict, bool]:
    """sensitivities(), measured once per F16 file, importance matrix, calibration text, tensor
    set and search settings, and reused by every budget (quant.type, quant.budget_mb): the curve
    q3_k_m..q5_k_m costs one search, then one allocation (milliseconds) and one candidate each.
    The candidates it scores override every quantised tensor, so the budget's own type does not
    enter them. (KLD all at each level, s_g per group, groups measured, weighted errors,
    reused?)"""
    from quantpipe.quantize.imatrix import _tools_version
    fp = art.fingerprint("tune-sensitivity", RECIPE, f16.parent.name,
                         art.quick_file_fingerprint(f16), Path(matrix).parent.name,
                         art.fingerprint(text), {k: s[k] for k in SENSITIVITY_KEYS},
                         [(t.name, t.ncols, t.n) for t in search.tensors],
                         _tools_version(ctx.tools))

    def build(tmp: Path) -> dict:
        all_at, sens, measured, errors = sensitivities(search, groups, s["levels"],
                                                       s["max_groups"])
        return {"kld_all_at_level": all_at, "group_kld_removed": sens,
                "groups_measured": measured, "group_error_at_level": errors,
                "probe_level": probe_level(s["levels"]), "candidates_scored": search.n_scored,
                "seconds": search.scoring_s}

    folder, prov, reused = art.ensure_cached(
        ctx.artifacts, "tune-sensitivity", fp, build,
        {"f16": art.portable_path(f16, ctx.artifacts), "settings":
         {k: s[k] for k in SENSITIVITY_KEYS}})
    r = prov["result"]
    if reused:
        log.info("tune: reusing the sensitivities of %s (%d candidates, %.0f s when measured)",
                 art.portable_path(folder), r["candidates_scored"], r["seconds"])
    return (r["kld_all_at_level"], r["group_kld_removed"], r["groups_measured"],
            r["group_error_at_level"], reused)


def allocate(groups: dict, levels: list, cost_at: dict[str, list[float]], search: Search,
             budget: int) -> dict[str, int]:
    """Greedy knapsack: from the lowest level everywhere, buy the upgrade (any higher level of
    one group) with the most predicted KLD removed per byte, while the file fits the budget.
    `cost_at`: each group's predicted KLD at each level (curves())."""
    choice = dict.fromkeys(groups, 0)
    cost = {g: [sum(tensor_bytes(t, type_for(t, lv)) for t in ts) for lv in levels]
            for g, ts in groups.items()}
    same = {g: [tuple(type_for(t, lv) for t in ts) for lv in levels] for g, ts in groups.items()}
    used = search.size(at_level(groups, levels, choice))
    if used > budget:
        raise ConfigError("quant.budget_mb", f"{budget / 2**20:.2f} MiB is below the smallest mix "
                          f"({used / 2**20:.2f} MiB, every tensor at {levels[0]})",
                          "raise quant.budget_mb or put smaller types in quant.tune.levels[0]")
    while True:
        best = None
        for g, lv in choice.items():
            for up in range(lv + 1, len(levels)):
                if same[g][up] == same[g][lv]:  # e.g. iq4_nl at both levels: nothing changes
                    continue
                extra = cost[g][up] - cost[g][lv]
                gain = cost_at[g][lv] - cost_at[g][up]
                if used + extra <= budget and gain > 0:
                    ratio = gain / max(extra, 1)
                    if best is None or ratio > best[0]:
                        best = (ratio, g, up, extra)
        if best is None:
            return choice
        _, g, up, extra = best
        choice[g], used = up, used + extra


# --- AutoRound's GGUF export, a candidate ------------------------------------------------------

AUTOROUND_RUNNER = Path(__file__).with_name("autoround_gguf.py")
AUTOROUND_RECIPE = 1  # bump when autoround_gguf.py's output changes


def autoround_version(py: Path) -> str:
    import subprocess
    r = subprocess.run([py, "-c", "from importlib.metadata import version as v; "
                        "print(v('auto-round'), v('transformers'), v('gguf'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def autoround_candidate(src: Path, ctx, type: str, settings: dict, text: str,
                        source: str) -> tuple[Path, dict, bool]:
    """(AutoRound's `type` GGUF, its metrics, reused): cached per merged model, type, settings,
    calibration text and auto-round version in artifacts/autoround/<fp>/."""
    py = llmc_python()
    spec = {"type": type.lower(), **settings, "threads": ctx.threads}
    fp = art.fingerprint("autoround", AUTOROUND_RECIPE, ctx.src_fingerprint, spec,
                         art.fingerprint(text), autoround_version(py))
    folder, prov, reused = art.ensure_cached(
        ctx.artifacts, "autoround", fp,
        lambda tmp: run_isolated(py, AUTOROUND_RUNNER, src, tmp, text, spec, "autoround",
                                 "AutoRound's GGUF export"),
        {"merged": ctx.src_fingerprint, "calibration_source": source, "spec": spec})
    log.info("tune: AutoRound %s %s", "reusing" if reused else "exported", folder)
    return folder / "model.gguf", prov["result"]["metrics"], reused


def eval_need(shape, type: str = "q4_k_m", **_) -> tuple[str, int]:
    """(runtime, weight bytes) of the evaluation: a GGUF of about `type`'s size."""
    return gguf_eval_need(shape, type)


def check_machine(tools: Path, tune: dict | None = None, **_) -> None:
    """Before any stage: llama.cpp's llama-quantize and llama-imatrix (make tools), and, when
    AutoRound competes, llm-compressor's environment (make llmc)."""
    for name in ("llama-quantize", "llama-imatrix"):
        tool_path(tools, name)
    if "autoround" in tune_settings(_plain(tune or {}))["methods"]:
        llmc_python()


def memory_need(shape, n_ctx: int, type: str = "q4_k_m", imatrix: dict | None = None,
                tune: dict | None = None, **_) -> list[tuple[str, int, str]]:
    """Peak RAM of the stages (quantpipe.memory): the GGUF route's (convert, imatrix, quantise,
    evaluate), the search's scoring runtimes (llama.cpp, memory-mapped: as imatrix), and
    AutoRound's float32 copy of the model when it competes."""
    from quantpipe.evaluate.transformers_runtime import HFRuntime
    needs = gguf_memory_need(shape, n_ctx, type, imatrix or {"n_ctx": 256})
    if "autoround" in tune_settings(_plain(tune or {}))["methods"]:
        needs.append(("AutoRound's GGUF export (the model in float32)",
                      HFRuntime.memory_for(2 * shape.fp16_bytes, shape, n_ctx),
                      "quant.tune.methods=[sensitivity] leaves AutoRound out (the search runs "
                      "memory-mapped), or tune on a machine with more memory"))
    return needs


# libraries=(): its cache key has held no library versions since RECIPE 1 (the F16 GGUF, the
# importance matrix and AutoRound's export it starts from are cached with their own)
# llama.cpp's (gguf's LIBRARIES) in the quantise stage's key; AutoRound's candidate file is
# cached under its own key, which holds auto-round's version (autoround_version)
@register(recipe=RECIPE, libraries=GGUF_LIBRARIES, check_options=_check, check_machine=check_machine,
          memory_need=memory_need, eval_need=eval_need,
          rules={"quant.type": Str(), "quant.budget_mb": Num(lo=0, null=True)},
          open_sections=("quant.tune",))
def quantize_tuned(src: Path, dst: Path, ctx, type: str = "q4_k_m", budget_mb: float | None = None,
                   imatrix: dict | None = None, tune: dict | None = None) -> dict:
    """The quant backend (conf/quant/gguf_tuned.yaml): see the module docstring."""
    ftype_of(type)
    s = tune_settings(_plain(tune or {}))
    imatrix = _plain(imatrix or {})
    imatrix_settings(imatrix)
    tool_path(ctx.tools, "llama-quantize")
    tool_path(ctx.tools, "llama-imatrix")
    t0 = time.monotonic()
    f16 = f16_gguf(Path(src), ctx)
    work = dst / "work"
    work.mkdir()
    plain = work / f"plain-{type}.gguf"
    llama_quantize(f16, plain, type, ctx.threads)
    tensors, overhead = quantised_tensors(plain)
    budget = int(budget_mb * 2**20) if budget_mb is not None else None
    matrix, imatrix_metrics, _ = cached_imatrix(f16, imatrix, ctx)
    text, source = load_text(imatrix.get("text_file"), "calib", "quant.backend.imatrix.text_file")
    scorer = CalibScorer(f16, text, s, ctx.threads)
    search = Search(f16, matrix, tensors, overhead, scorer, work, ctx, type)
    levels, groups = s["levels"], groups_of(tensors, s["bands"])

    # candidate -> (how to make it: a tensor-type mix, None = llama.cpp's imatrix mix, or a
    # finished file; its calibration KLD); sizes in bytes, as written
    candidates: dict[str, tuple] = {"plain": (plain, scorer.kld(plain))}
    sizes = {"plain": plain.stat().st_size}
    candidates["imatrix"] = (None, search.score(None))
    sizes["imatrix"] = search.last_bytes
    # every mix is written with --imatrix too: it carries the imatrix file's extra metadata
    imatrix_meta = max(sizes["imatrix"] - sizes["plain"], 0)
    search.overhead += imatrix_meta
    # a searched mix also carries its recipe in the metadata (recipe_kv): room for it
    search.overhead += metadata_bytes(len(recipe_kv({t.name: "x" for t in tensors})))
    if budget is None:  # the plain file's bytes, plus the few hundred bytes of metadata any
        # file written with the importance matrix carries: else llama.cpp's own imatrix file
        # (the same tensors) could never fit, and plain won over a lower-KLD imatrix file
        budget = sizes["plain"] + imatrix_meta
    method_metrics: dict[str, float] = {}
    if "autoround" in s["methods"]:  # before the search: its (cached) time counts against it
        try:
            ar_file, ar_metrics, ar_reused = autoround_candidate(Path(src), ctx, type,
                                                                 s["autoround"], text, source)
        except RuntimeError as e:  # e.g. an architecture its bundled converter lacks
            why = next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), str(e))
            log.warning("tune: AutoRound dropped, the search goes on without it: %s",
                        why.strip()[:300])
            method_metrics["autoround_dropped"] = 1.0
        else:
            method_metrics.update({**ar_metrics, "autoround_reused": float(ar_reused)})
            candidates["autoround"] = (ar_file, scorer.kld(ar_file))
            sizes["autoround"] = ar_file.stat().st_size
    all_at, sens, measured, choice, mix, cost_at = [], {}, 0, {}, None, {}
    if "sensitivity" in s["methods"]:
        all_at, sens, measured, errors, reused = cached_sensitivities(search, groups, s, f16,
                                                                      matrix, text, ctx)
        method_metrics["tune_sensitivity_reused"] = float(reused)
        try:
            cost_at = curves(sens, errors, levels)
            choice = allocate(groups, levels, cost_at, search, budget)
        except ConfigError as e:  # the budget is below every mix of these levels
            log.warning("tune: no searched mix fits (%s); the other candidates compete",
                        e.problem)
        else:
            mix = at_level(groups, levels, choice)
            candidates["sensitivity"] = (mix, search.score(mix))
            sizes["sensitivity"] = search.last_bytes
    fits = {k: v for k, v in candidates.items() if sizes[k] <= budget}
    if not fits:
        raise ConfigError("quant.budget_mb", f"no candidate fits {budget / 2**20:.2f} MiB "
                          f"(bytes: {sizes})", "raise quant.budget_mb, or null for the plain "
                          "file's size")
    won = min(fits, key=lambda k: fits[k][1])
    out = dst / f"model-tuned-{type.lower()}.gguf"
    how = candidates[won][0]
    if won == "plain":
        plain.rename(out)
    elif isinstance(how, Path):  # AutoRound's cached file
        shutil.copyfile(how, out)
    else:
        search.quantise(how, out)
    if out.stat().st_size > budget:
        raise RuntimeError(f"{out.name} is {out.stat().st_size} bytes, over the budget {budget}")
    write_recipe(dst / RECIPE_DIR, won, how, matrix, f16.name, out.name, type, ctx.threads)
    tune_s = time.monotonic() - t0
    art.write_json(dst / "search.json", {
        "budget_bytes": budget, "calibration_source": source, "calib_tokens_scored": scorer.tokens,
        "methods": s["methods"], "autoround": s["autoround"] if "autoround" in s["methods"] else None,
        "levels": levels, "kld_all_at_level": all_at, "group_kld_removed": sens,
        "groups_measured": measured, "group_kld_at_level_predicted": cost_at,
        "choice": {g: levels[lv] for g, lv in choice.items()},
        "kld_calib": {k: v[1] for k, v in candidates.items()}, "bytes": sizes, "won": won,
        "tensor_types": mix})
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    metrics = {**imatrix_metrics, **method_metrics, "budget_mb": budget / 2**20,
               "tune_s": tune_s, "tune_candidates_scored":
                   float(search.n_scored + 1 + ("autoround" in candidates)),
               "tune_groups": float(len(groups)), "tune_groups_measured": float(measured),
               "tune_probes_spliced": float(search.n_spliced),
               "tune_quantize_peak_rss_mb": search.peak_mb, "tune_peak_rss_mb": own_peak_mb(),
               "tune_calib_tokens": float(scorer.tokens), "tune_recipe": 1.0,
               **{f"tune_kld_calib_{k}": v[1] for k, v in candidates.items()},
               **{f"tune_mb_{k}": v / 2**20 for k, v in sizes.items()},
               **{f"tune_won_{k}": float(won == k) for k in candidates}}
    log.info("tune: %s won on calibration KLD (%s) in %.0f s, %d candidates", won,
             ", ".join(f"{k} {v[1]:.5f}" for k, v in candidates.items()), tune_s, search.n_scored)
    metrics.update(smoke(out, Path(src)))
    return {"artifact": out.name, "metrics": metrics, "f16": str(f16), "won": won,
            "runtime": "llama.cpp", "publish": gguf_publish(), "log_files": [RECIPE_DIR],
            "calibration": [{"name": "calibration-text", "text_file": imatrix.get("text_file"),
                             "split": "calib", "key": "quant.backend.imatrix.text_file"}]}


def write_recipe(folder: Path, won: str, how, matrix: Path, f16_name: str, out_name: str,
                 type: str, threads: int | None) -> None:
    """What stock llama-quantize needs to write the published file again, byte for byte, from
    the F16 GGUF: the mix's --tensor-type-file, the importance matrix, and the command
    (recreate.sh, run in this folder beside the F16 GGUF). AutoRound's file is its own
    exporter's, not llama-quantize's: recreate.sh says so."""
    folder.mkdir()
    cmd = ["llama-quantize"]
    if won == "autoround":
        lines = ["# AutoRound wrote this file with its own GGUF exporter (auto-round, in",
                 "# .venv-llmc); stock llama-quantize cannot write it again."]
    else:
        if won != "plain":
            shutil.copyfile(matrix, folder / "imatrix.gguf")
            cmd += ["--imatrix", "imatrix.gguf"]
        if isinstance(how, dict):  # quoted for the shell: the values hold `*`
            cmd += [f"'{a}'" for a in mix_args(how, folder / "tensor-types.txt", relative=True)]
        cmd += [f16_name, out_name, type.upper()] + ([str(threads)] if threads else [])
        lines = [f"# re-creates {out_name} ({won} won the search) with stock llama-quantize",
                 f"# from {f16_name}, the F16 GGUF of the merged model (convert_hf_to_gguf.py,",
                 "# or the pipeline's cached one), in this folder; compare with sha256sum.",
                 " \\\n    ".join(cmd)]
    (folder / "recreate.sh").write_text("\n".join(lines) + "\n")


def _plain(value):
    """Hydra hands the backend DictConfig / ListConfig: plain dicts and lists for JSON."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)
