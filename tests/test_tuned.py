"""The tuned GGUF variant (quantpipe.quantize.tuned): sensitivity search under a byte budget.

Fast: settings are checked with the key to fix; tensors group by kind and band of layers; byte
costs follow llama.cpp's block sizes; the knapsack keeps to the budget and buys KLD where it is
cheapest. Slow (needs `make tools`, ~2 min): +quant=gguf_tuned end to end on the tiny model --
the file fits the plain q4_k_m budget, loads in llama.cpp, is not worse than plain q4_k_m in
KLD on the calibration text, and the tuner never tokenises the evaluation text (a sentinel
eval.text_file).
"""
import json
from pathlib import Path

import pytest

from quantpipe.errors import ConfigError
from quantpipe.quantize.tuned import (
    LEVELS,
    Tensor,
    allocate,
    at_level,
    groups_of,
    tensor_bytes,
    tune_settings,
    type_for,
)

TOOLS = Path(__file__).resolve().parents[1] / "build" / "llama.cpp" / "bin"


def model_tensors(n_layers=4):
    """SmolLM2's shapes: 576 columns everywhere except ffn_down (1536)."""
    out = [Tensor("token_embd.weight", 576, 576 * 49152, 0)]
    for i in range(n_layers):
        for kind, cols, rows in (("attn_q", 576, 576), ("attn_k", 576, 192),
                                 ("ffn_up", 576, 1536), ("ffn_down", 1536, 576)):
            out.append(Tensor(f"blk.{i}.{kind}.weight", cols, cols * rows, 0))
    return out


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="quant.tune.*unknown keys.*max_minute"):
        tune_settings({"max_minute": 3})
    with pytest.raises(ConfigError, match="quant.tune.max_minutes.*max_groups"):
        tune_settings({"max_minutes": 15})  # the clock-bounded search is gone, with the fix
    with pytest.raises(ConfigError, match="quant.tune.max_groups"):
        tune_settings({"max_groups": -1})
    assert tune_settings({"max_groups": 0})["max_groups"] == 0
    with pytest.raises(ConfigError, match="quant.tune.levels"):
        tune_settings({"levels": [["q4_k", "q4_k"]]})
    with pytest.raises(ConfigError, match="quant.tune.levels.*q9_z"):
        tune_settings({"levels": [["iq4_nl", "q4_k"], ["q9_z", "q8_0"]]})
    assert tune_settings({"windows": 2})["windows"] == 2


def test_groups_are_kind_by_band_and_embeddings_alone():
    groups = groups_of(model_tensors(4), bands=2)
    assert sorted(groups) == sorted(["token_embd", "attn_q@0-1", "attn_q@2-3", "attn_k@0-1",
                                     "attn_k@2-3", "ffn_up@0-1", "ffn_up@2-3", "ffn_down@0-1",
                                     "ffn_down@2-3"])
    assert [t.name for t in groups["ffn_down@2-3"]] == ["blk.2.ffn_down.weight",
                                                        "blk.3.ffn_down.weight"]


def test_byte_costs_follow_block_sizes_and_576_columns_take_32_blocks():
    q, down = Tensor("q", 576, 576 * 576, 0), Tensor("d", 1536, 1536 * 576, 0)
    types = at_level({"g": [q, down]}, LEVELS, {"g": 1})
    assert types == {"q": "iq4_nl", "d": "q4_k"}  # 576 = 2.25 x 256: no K-quant
    # the lowest level reaches q3_k_m's budget through the K-quant rows only
    assert at_level({"g": [q, down]}, LEVELS, {"g": 0}) == {"q": "iq4_nl", "d": "q3_k"}
    assert tensor_bytes(q, "iq4_nl") == 576 * 576 // 32 * 18      # 4.5 bits/weight
    assert tensor_bytes(down, "q6_k") == 1536 * 576 // 256 * 210  # 6.5625 bits/weight
    with pytest.raises(ConfigError, match="multiple of 256"):
        tensor_bytes(q, "q4_k")


@pytest.mark.slow  # over 15 s (whole pipeline runs or a sweep): make test-slow
def test_byte_model_matches_llama_cpp_files(tmp_path, tiny_base):
    """The size the search predicts for a mix is the size llama.cpp writes: every tensor of a
    real q4_k_m file costs what tensor_bytes says for its type, and the rest is overhead."""
    import gguf

    from quantpipe.quantize import QuantContext
    from quantpipe.quantize.gguf import quantize_gguf
    from quantpipe.quantize.tuned import quantised_tensors
    ctx = QuantContext(artifacts=tmp_path / "a", tools=TOOLS, src_fingerprint="t", threads=2)
    res = quantize_gguf(tiny_base, tmp_path, ctx, type="q4_k_m")
    path = tmp_path / res["artifact"]
    tensors, overhead = quantised_tensors(path)
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}
    assert tensors and all(tensor_bytes(t, types[t.name]) == t.bytes for t in tensors)
    assert overhead + sum(t.bytes for t in tensors) == path.stat().st_size
    assert "token_embd.weight" in {t.name for t in tensors}


def quantise_metrics(variant_run_id: str) -> dict[str, float]:
    import mlflow
    [stage] = mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{variant_run_id}' "
                      "and tags.`quantpipe.stage` = 'quantise'")
    return stage.data.metrics


class Sizes:
    """The one thing allocate() asks of a search: the file size of a mix (no overhead)."""
    def __init__(self, tensors):
        self.tensors = tensors

    def size(self, types):
        return sum(tensor_bytes(t, types[t.name]) for t in self.tensors)


def test_the_recipe_in_the_metadata_reads_back_tensor_by_tensor():
    from quantpipe.quantize.tuned import META, META_VALUE_MAX, metadata_bytes, mix_of, recipe_kv
    mix = {f"blk.{i}.attn_q.weight": "q5_k" if i < 8 else "q4_k" for i in range(30)}
    mix |= {f"blk.{i}.ffn_down.weight": "q6_k" if i < 4 or i > 25 else "q5_k" for i in range(30)}
    mix |= {"token_embd.weight": "q8_0", "output.weight": "q6_k"}
    kv = recipe_kv(mix)
    assert kv[META + "attn_q"] == "q5_k*8,q4_k*22" and kv[META + "token_embd"] == "q8_0*1"
    assert len(kv) == 4 and all(len(v) <= META_VALUE_MAX for v in kv.values())
    assert mix_of(kv, list(mix)) == mix
    # every key's bytes fit the room the search keeps for them
    assert sum(8 + len(k) + 4 + 8 + len(v) for k, v in kv.items()) < metadata_bytes(len(kv))
    with pytest.raises(RuntimeError, match="does not fit llama.cpp's metadata string"):
        recipe_kv({f"blk.{i}.attn_q.weight": ["q5_k", "q4_k"][i % 2] for i in range(30)})


def test_knapsack_keeps_to_the_budget_and_buys_the_cheapest_kld_first():
    tensors = model_tensors(2)
    groups = groups_of(tensors, bands=1)
    top = len(LEVELS) - 1
    sens = dict.fromkeys(groups, 0.001)
    sens["attn_k@0-1"] = 0.05  # small tensors, large KLD: bought first
    cost_at = {g: [v * r for r in (1.2, 1.0, 0.4, 0.2, 0.0)] for g, v in sens.items()}
    search = Sizes(tensors)
    low = search.size(at_level(groups, LEVELS, dict.fromkeys(groups, 0)))
    k_extra = sum(tensor_bytes(t, "q8_0") - tensor_bytes(t, "iq4_nl") for t in groups["attn_k@0-1"])
    choice = allocate(groups, LEVELS, cost_at, search, low + k_extra)
    assert choice["attn_k@0-1"] == top and choice["token_embd"] == 0
    assert search.size(at_level(groups, LEVELS, choice)) <= low + k_extra
    # a larger budget goes to the others too, never past it
    big = low + 10 * k_extra
    choice = allocate(groups, LEVELS, cost_at, search, big)
    assert search.size(at_level(groups, LEVELS, choice)) <= big
    assert sum(choice.values()) > top
    with pytest.raises(ConfigError, match="quant.budget_mb"):
        allocate(groups, LEVELS, cost_at, search, low - 1)


# squared weight error per weight of each type (roughly 4x per bit): Scores' weighted errors
ERROR = {"q3_k": 16.0, "iq4_nl": 5.0, "q4_k": 4.0, "q5_0": 1.2, "q5_k": 1.0, "q5_1": 1.1,
         "q6_k": 0.25, "q8_0": 0.01}


class Scores:
    """A search whose KLD is a sum per raised tensor (the additive model)."""
    def __init__(self, groups):
        self.groups, self.n = groups, 0
        self.last_errors, self.work = {}, Path("unused")

    def score(self, types, groups=None, keep=None):
        self.n += 1
        if groups is not None:
            self.last_errors = {g: sum(t.n * ERROR[types[t.name]] for t in ts)
                                for g, ts in groups.items()}
        return 0.1 - sum(t.n * 1e-9 * (3 if "attn_k" in t.name else 1)
                         for ts in self.groups.values() for t in ts if types[t.name] == "q8_0")

    def seconds_per_candidate(self):
        return 1.0

    def drop_kept(self):
        pass


def test_max_groups_bounds_the_work_and_estimates_the_rest_from_their_kind():
    from quantpipe.quantize.tuned import sensitivities
    groups = groups_of(model_tensors(4), bands=2)
    search = Scores(groups)
    all_at, s, measured, errors = sensitivities(search, groups, LEVELS, max_groups=5)
    assert search.n == len(LEVELS) + 5  # the bound is work: candidates scored, not seconds
    assert measured == 5 and len(s) == len(groups) and all_at[0] > all_at[-1]
    # band 0 first: every kind measured once, then estimated per weight for band 2-3
    assert s["attn_k@2-3"] == pytest.approx(s["attn_k@0-1"], rel=1e-6)
    assert s["attn_k@2-3"] / s["attn_q@2-3"] == pytest.approx(3 * 192 / 576, rel=1e-6)
    search = Scores(groups)  # null: every group measured
    assert sensitivities(search, groups, LEVELS)[2] == len(groups) == search.n - len(LEVELS)
    # each group's weighted error at every level, read from the all-at-level files
    assert errors["ffn_down@0-1"][0] > errors["ffn_down@0-1"][1] > errors["ffn_down@0-1"][-1]


def test_a_level_that_leaves_a_group_unchanged_costs_it_nothing():
    """The regression of the q3_k level: iq4_nl/q3_k -> iq4_nl/q4_k changes only ffn_down (1536
    columns). A curve shared by the whole model put most of the KLD on that step, so attention
    and ffn_up looked nearly free to leave at iq4_nl and the budget all went to ffn_down. Each
    group's curve now follows its own weight errors."""
    from quantpipe.quantize.tuned import curves, probe_level
    groups = groups_of(model_tensors(2), bands=1)
    types = {g: [type_for(ts[0], lv) for lv in LEVELS] for g, ts in groups.items()}
    errors = {g: [ERROR[t] * 100 for t in ts] for g, ts in types.items()}
    s = dict.fromkeys(groups, 0.01)
    s["attn_q@0-1"] = 0.0  # below the noise: keeps its kind's... none: the smallest of all
    c = curves(s, errors, LEVELS)
    p = probe_level(LEVELS)
    assert p == 1
    up = c["ffn_up@0-1"]
    assert up[0] == up[1] == pytest.approx(0.01) and up[-1] == 0.0  # iq4_nl at both levels
    assert up[2] == pytest.approx(0.01 * (ERROR["q5_0"] - ERROR["q8_0"]) / (ERROR["iq4_nl"] - ERROR["q8_0"]))
    down = c["ffn_down@0-1"]  # q3_k below the probe level: more than its probe
    assert down[0] == pytest.approx(0.01 * (ERROR["q3_k"] - ERROR["q8_0"]) / (ERROR["q4_k"] - ERROR["q8_0"]))
    assert down[1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(down, down[1:]))
    # a probe lost in the noise is not free: the smallest KLD per unit error measured
    assert 0 < c["attn_q@0-1"][1] <= c["ffn_up@0-1"][1]
    # with 0.01 of KLD per group, the budget buys attention and ffn_up too, not only ffn_down
    tensors = model_tensors(2)
    search = Sizes(tensors)
    low = search.size(at_level(groups, LEVELS, dict.fromkeys(groups, 0)))
    choice = allocate(groups, LEVELS, c, search, low + (search.size(at_level(
        groups, LEVELS, dict.fromkeys(groups, 2))) - low) // 2)
    assert choice["ffn_up@0-1"] > 0 and choice["attn_k@0-1"] > 0


@pytest.mark.slow
def test_tuned_variant_fits_budget_loads_beats_plain_and_never_reads_eval_text(
        cfg_factory, tmp_path, monkeypatch):
    import gguf
    import llama_cpp
    import mlflow

    from quantpipe import pipeline, tools
    from quantpipe.tools import tool_path
    tool_path(TOOLS, "llama-quantize")  # a ConfigError here means: run `make tools`
    sentinel = "zebra quokka sentinel"
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(f"The {sentinel} is held-out evaluation text only. " * 120)
    seen: list[str] = []  # every text the quantise stage tokenised or handed to a tool
    real_tokenize, real_run_tool, real_stage = (llama_cpp.Llama.tokenize, tools.run_tool,
                                                pipeline.stage_quantise)
    in_quantise = []

    def tokenize(self, text, *a, **k):
        if in_quantise:
            seen.append(text.decode("utf-8", "replace"))
        return real_tokenize(self, text, *a, **k)

    def run_tool(exe, args, *a, **k):
        if in_quantise and "-f" in map(str, args):
            text = Path(str(args[list(map(str, args)).index("-f") + 1]))
            seen.append((Path(k.get("cwd") or ".") / text).read_text())  # named relative to cwd
        return real_run_tool(exe, args, *a, **k)

    def stage_quantise(cfg, merged):
        in_quantise.append(True)
        try:
            return real_stage(cfg, merged)
        finally:
            in_quantise.clear()

    monkeypatch.setattr(llama_cpp.Llama, "tokenize", tokenize)
    monkeypatch.setattr("quantpipe.quantize.imatrix.run_tool", run_tool)
    monkeypatch.setattr(pipeline, "stage_quantise", stage_quantise)
    common = [f"paths.tools={TOOLS}", f"eval.text_file={eval_text}", "adapter=none"]
    plain = pipeline.run(cfg_factory("+quant=gguf_q4_k_m", *common))
    tuned_cfg = cfg_factory("+quant=gguf_tuned", *common, "quant.backend.imatrix.chunks=4",
                            "quant.backend.imatrix.n_ctx=64", "quant.tune.n_ctx=64",
                            "quant.tune.windows=4", "quant.tune.bands=1")
    tuned = pipeline.run(tuned_cfg)

    assert seen and any("if" in s for s in seen)  # the calibration text was tokenised
    assert not any(sentinel in s for s in seen)   # the evaluation text never was
    out = Path(tuned_cfg.paths.quantized) / "model-tuned-q4_k_m.gguf"
    plain_file = Path(tuned_cfg.paths.quantized) / "model-q4_k_m.gguf"
    search = json.loads((Path(tuned_cfg.paths.artifacts) / "quantise").glob("*/search.json")
                        .__next__().read_text())
    # the budget: plain's bytes + the importance matrix's metadata, so llama.cpp's own imatrix
    # file (same tensors, a few hundred bytes more metadata) competes
    assert 0 < search["budget_bytes"] - plain_file.stat().st_size < 4096
    assert search["bytes"]["imatrix"] <= search["budget_bytes"]
    assert out.stat().st_size <= search["budget_bytes"]
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} - {"F32", "F16"}
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)  # stock llama.cpp loads it
    assert len(llm.tokenize(b"hello")) > 0
    variant_run = mlflow.last_active_run().info.run_id
    tune = quantise_metrics(variant_run)  # the stage run holds them
    # the recipe that re-creates the file, on the variant run (tested byte for byte below)
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(variant_run, "recipe")}
    assert "recipe/recreate.sh" in logged
    assert ("recipe/imatrix.gguf" in logged) == (tune["tune_won_plain"] == 0.0)
    assert tune["tune_kld_calib_sensitivity"] <= tune["tune_kld_calib_plain"]
    # on held-out text the tiny random-weight model makes no promise (a 64-wide mix tuned on
    # 256 calibration tokens can lose to plain there); the default model's figures are in the
    # report's tuned section
    assert tuned["kld_mean"] > 0 and plain["kld_mean"] > 0


def test_budgets_stand_for_a_multirun_over_the_type_of_variants_that_take_one():
    from quantpipe.quantize.gguf import expand_budgets
    out = expand_budgets(["+quant=gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned",
                          "quant.budgets=[q3_k_m,q4_k_m,q5_k_m]", "adapter=none"])
    assert out == ["+quant=gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned", "adapter=none",
                   "hydra.mode=MULTIRUN", "quant.type=q3_k_m,q4_k_m,q5_k_m"]
    assert expand_budgets(["+quant=int4"]) == ["+quant=int4"]  # nothing to expand
    with pytest.raises(ConfigError, match="quant.budgets: sizes variants .*int4 does not"):
        expand_budgets(["+quant=int4,gguf_tuned", "quant.budgets=[q3_k_m]"])
    with pytest.raises(ConfigError, match="quant.budgets: 'q3_k_m' is not a list"):
        expand_budgets(["+quant=gguf_tuned", "quant.budgets=q3_k_m"])
    with pytest.raises(ConfigError, match="quant.budgets: given with quant.type"):
        expand_budgets(["+quant=gguf_tuned", "quant.budgets=[q3_k_m]", "quant.type=q4_0"])


def test_budgets_on_the_command_line_run_one_variant_per_type_and_refuse_in_one_line(tmp_path):
    """The entry point: a bad quant.budgets is one line and exit code 2, before Hydra starts."""
    import subprocess
    import sys

    from quantpipe import PROJECT_ROOT
    r = subprocess.run([sys.executable, "-m", "pipelines.run", "+quant=int4",
                        "quant.budgets=[q3_k_m]", f"paths.root={tmp_path}"], cwd=PROJECT_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "quant.budgets: sizes variants" in r.stderr
    assert not (tmp_path / "artifacts").exists()


def test_methods_and_autoround_settings_are_checked_before_any_stage():
    from quantpipe.quantize.tuned import _check
    with pytest.raises(ConfigError, match="quant.tune.methods"):
        tune_settings({"methods": ["sensitivity", "gptq"]})
    with pytest.raises(ConfigError, match="quant.tune.autoround.*unknown keys.*iter"):
        tune_settings({"autoround": {"iter": 10}})
    with pytest.raises(ConfigError, match="quant.tune.autoround.samples"):
        tune_settings({"autoround": {"samples": 0}})
    assert tune_settings({"autoround": {"iters": 50}})["autoround"]["seq_len"] == 512
    with pytest.raises(ConfigError, match="quant.tune.methods"):  # the composed-config check
        _check({"type": "q4_k_m", "tune": {"methods": ["gptq"]}, "imatrix": {}})


def test_autoround_without_its_venv_names_make_llmc(monkeypatch, tmp_path):
    """AutoRound runs in .venv-llmc: without it the candidate stops with the make target."""
    from quantpipe.quantize import QuantContext
    from quantpipe.quantize.tuned import autoround_candidate
    monkeypatch.setenv("QUANTPIPE_LLMC_PYTHON", str(tmp_path / "missing" / "python"))
    ctx = QuantContext(artifacts=tmp_path, tools=tmp_path, src_fingerprint="x", threads=None)
    with pytest.raises(ConfigError, match="make llmc"):
        autoround_candidate(tmp_path, ctx, "q4_k_m", {"iters": 0, "samples": 1, "seq_len": 8},
                            "text", "calib")


@pytest.mark.slow
def test_same_inputs_give_the_same_bytes_on_an_idle_and_a_busy_machine(tmp_path, tiny_base,
                                                                        monkeypatch, caplog):
    """The search is bounded by work: the published file is byte-identical when the machine is
    idle and when every core is busy (two spinning processes beside it). Each run builds its own
    F16 GGUF and importance matrix (separate artefact folders). A candidate that cannot run
    (AutoRound, here with an interpreter that fails) is dropped with one line and the search
    goes on to the same file."""
    import hashlib
    import os
    import subprocess
    import sys

    import gguf

    from quantpipe.quantize import QuantContext
    from quantpipe.quantize import tuned as tuned_mod
    from quantpipe.quantize.tuned import mix_of, quantize_tuned
    from quantpipe.tools import tool_path
    tool_path(TOOLS, "llama-quantize")  # a ConfigError here means: run `make tools`
    settings = {"imatrix": {"chunks": 4, "n_ctx": 64},
                "tune": {"n_ctx": 64, "windows": 4, "bands": 1, "methods": ["sensitivity"]}}

    def tuned(name: str, methods=("sensitivity",)) -> tuple[str, dict]:
        ctx = QuantContext(artifacts=tmp_path / name / "artifacts", tools=TOOLS,
                           src_fingerprint="tiny", threads=2)
        dst = tmp_path / name / "out"
        dst.mkdir(parents=True)
        res = quantize_tuned(tiny_base, dst, ctx, "q4_k_m", imatrix=settings["imatrix"],
                             tune={**settings["tune"], "methods": list(methods)})
        digest = hashlib.sha256((dst / res["artifact"]).read_bytes()).hexdigest()
        won[name], f16_of[name] = res["won"], Path(res["f16"])
        return digest, res["metrics"]

    won, f16_of = {}, {}

    idle, m_idle = tuned("idle")
    spin = "import time\nt = time.time() + 600\nwhile time.time() < t: pass"
    burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        busy, m_busy = tuned("busy")
    finally:
        for p in burners:
            p.kill()
    assert m_idle["tune_groups_measured"] == m_idle["tune_groups"]  # null: every group
    keys = [k for k in m_idle if k.startswith("tune_kld_calib_")]
    assert {k: m_busy[k] for k in keys} == {k: m_idle[k] for k in keys}
    assert busy == idle
    monkeypatch.setenv("QUANTPIPE_LLMC_PYTHON", "/bin/false")  # AutoRound cannot run
    import logging
    with caplog.at_level(logging.WARNING, logger="quantpipe.quantize.tuned"):
        dropped, m_dropped = tuned("dropped", ("sensitivity", "autoround"))
    assert m_dropped["autoround_dropped"] == 1.0 and dropped == idle
    # another budget on the same F16 file, matrix and text: the sensitivities are reused, so
    # only its own candidates are scored (the curve costs about one search)
    ctx = QuantContext(artifacts=tmp_path / "idle" / "artifacts", tools=TOOLS,
                       src_fingerprint="tiny", threads=2)
    (tmp_path / "idle" / "q5").mkdir()
    q5 = quantize_tuned(tiny_base, tmp_path / "idle" / "q5", ctx, "q5_k_m",
                        imatrix=settings["imatrix"], tune=settings["tune"])
    assert m_idle["tune_sensitivity_reused"] == 0.0 and q5["metrics"]["tune_sensitivity_reused"] == 1.0
    assert q5["metrics"]["tune_candidates_scored"] <= 3 < m_idle["tune_candidates_scored"]
    assert q5["metrics"]["budget_mb"] > m_idle["budget_mb"]
    # the recipe ships with the file: its metadata names every quantised tensor's type, and
    # recipe/recreate.sh writes the same bytes again with stock llama-quantize
    out = tmp_path / "idle" / "out"
    reader = gguf.GGUFReader(str(out / "model-tuned-q4_k_m.gguf"))
    actual = {t.name: t.tensor_type.name.lower() for t in reader.tensors
              if t.tensor_type.name not in ("F32", "F16")}
    meta = {k: bytes(f.parts[f.data[0]]).decode() for k, f in reader.fields.items()
            if k.startswith(tuned_mod.META)}
    if won["idle"] == "sensitivity":
        assert mix_of(meta, list(actual)) == actual
    recipe = out / tuned_mod.RECIPE_DIR
    (recipe / f16_of["idle"].name).symlink_to(f16_of["idle"])
    subprocess.run(["bash", "recreate.sh"], cwd=recipe, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{TOOLS}:{os.environ['PATH']}"})
    assert hashlib.sha256((recipe / "model-tuned-q4_k_m.gguf").read_bytes()).hexdigest() == idle
    assert [r.getMessage() for r in caplog.records if "AutoRound dropped" in r.getMessage()]
    # nothing host-specific in what ships: the matrix and its text by name only
    fields = gguf.GGUFReader(str(tmp_path / "idle" / "out" / "model-tuned-q4_k_m.gguf")).fields
    named = {k: bytes(fields[k].parts[fields[k].data[0]]).decode() for k in
             ("quantize.imatrix.file", "quantize.imatrix.dataset")}
    assert named == {"quantize.imatrix.file": "imatrix.gguf",
                     "quantize.imatrix.dataset": "calibration.txt"}


@pytest.mark.slow
def test_a_spliced_probe_holds_the_bytes_llama_quantize_writes_for_that_mix(tiny_base, tmp_path):
    """The search scores its probes on files spliced from the all-at-level files instead of
    quantising each again: every tensor's bytes must be the ones llama-quantize writes for the
    same mix, or the probes would measure another model than the one published."""
    from types import SimpleNamespace

    import gguf

    from quantpipe.quantize.gguf import convert_f16
    from quantpipe.quantize.imatrix import compute_imatrix
    from quantpipe.quantize.tuned import Search, quantised_tensors, splice
    from quantpipe.tools import tool_path
    tool_path(TOOLS, "llama-quantize")  # a ConfigError here means: run `make tools`
    f16 = tmp_path / "f16.gguf"
    convert_f16(tiny_base, f16, {})
    (tmp_path / "im").mkdir()
    compute_imatrix(TOOLS, f16, "def f(x):\n    return x + 1\n" * 400, tmp_path / "im", 2, 64, 1)
    plain = tmp_path / "plain.gguf"
    from quantpipe.quantize.gguf import llama_quantize
    llama_quantize(f16, plain, "q4_k_m", 1)
    tensors, overhead = quantised_tensors(plain)
    groups = groups_of(tensors, bands=2)
    ctx = SimpleNamespace(tools=TOOLS, threads=1)
    search = Search(f16, tmp_path / "im" / "imatrix.gguf", tensors, overhead, None, tmp_path, ctx,
                    "q4_k_m")
    levels = [["iq4_nl", "q4_k"], ["q8_0", "q8_0"]]
    files = []
    for lv in range(2):
        files.append(tmp_path / f"level-{lv}.gguf")
        search.quantise(at_level(groups, levels, dict.fromkeys(groups, lv)), files[-1])
    choice = {g: i % 2 for i, g in enumerate(sorted(groups))}
    mix = at_level(groups, levels, choice)
    search.quantise(mix, tmp_path / "quantised.gguf")
    splice(files, {t.name: choice[g] for g, ts in groups.items() for t in ts},
           tmp_path / "spliced.gguf")
    a = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "quantised.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "spliced.gguf")).tensors}
    assert list(a) == list(b)
    assert {n: t.tensor_type.name.lower() for n, t in b.items() if n in mix} == mix
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type
        assert bytes(a[name].data.tobytes()) == bytes(b[name].data.tobytes()), name
