"""The plug-in shape (README "Architecture"): formats and evaluation runtimes are registered
classes, and no shared module names a format.

A shared module (pipeline, schema, memory, tracking, evaluate/ but its `*_runtime.py` and
`*_report.py` plug-ins, report/) may speak of a format in its docstrings only: no name,
attribute, argument or string constant in its code spells a format, a format's module or a
library only a format uses.

    .venv/bin/python -m pytest -q tests/test_plugins.py
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from quantpipe import PROJECT_ROOT
from quantpipe.config import quant_options
from quantpipe.evaluate import runtimes

SRC = PROJECT_ROOT / "src" / "quantpipe"
REPORT = sorted((SRC / "report").glob("*.py"))
# parity.py is the llama.cpp runtime's own check (`python -m quantpipe.evaluate.parity`: its F16
# reference against transformers in float32 on the same windows), a command, not shared code
RUNTIME_TOOLS = {"parity.py"}
SHARED = [SRC / "pipeline.py", SRC / "schema.py", SRC / "memory.py", SRC / "tracking.py",
          *(p for p in sorted((SRC / "evaluate").glob("*.py"))
            if not p.stem.endswith(("_runtime", "_report")) and p.name not in RUNTIME_TOOLS)]
# the baseline (fp16: the merged model itself, "the FP16 reference") and the Hugging Face folder
# (the input every format starts from) are not formats a shared module could branch on
NOT_FORMATS = {"fp16", "hf"}


def format_words() -> set[str]:
    """Every quant config's name, every format module's name, and the words of the field for
    the formats the project writes."""
    import importlib
    import pkgutil

    import quantpipe.quantize as q
    modules = {m.name for m in pkgutil.iter_modules(q.__path__)}
    for name in modules:
        importlib.import_module(f"quantpipe.quantize.{name}")
    registered = {f.quantize.__module__.rsplit(".", 1)[1] for f in q.FORMATS.values()}
    field = {"gguf", "bitsandbytes", "imatrix", "compressed-tensors", "compressed_tensors",
             "llm-compressor", "llmcompressor", "nf4", "fp4", "autoround", "awq", "gptq",
             "w8a8", "w4a16", "quant.type", "budget_mb", "tune_s"}
    return (set(quant_options()) | registered | field) - NOT_FORMATS


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.add(id(body[0].value))
    return found


def _spelled(node: ast.AST) -> list[str]:
    """The words a node spells in code: identifiers and string constants."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword) and node.arg:
        return [node.arg]
    if isinstance(node, ast.alias):
        return [node.name, node.asname or ""]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return []


def names_a_format(path: Path, words: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, sorted(words, key=len,
                                                                           reverse=True)))
                         + r")(?![a-z0-9])")
    found = []
    for node in ast.walk(tree):
        if id(node) in docs:
            continue
        for text in _spelled(node):
            if m := pattern.search(text.lower()):
                found.append(f"{path.name}:{getattr(node, 'lineno', '?')} "
                             f"{m.group(1)!r} in {text[:60]!r}")
    return found


def test_no_shared_module_names_a_format_in_code():
    words = format_words()
    found = [f for p in SHARED for f in names_a_format(p, words)]
    assert found == []


def test_no_report_module_names_a_format_in_code():
    words = format_words()
    assert [f for p in REPORT for f in names_a_format(p, words)] == []


def test_report_sections_are_found_beside_their_formats_in_report_order():
    from quantpipe.report import sections
    found = {slot: [s.render.__module__.rsplit(".", 1)[1] for s in sections.sections(slot)]
             for slot in sections.SLOTS}
    # static vs dynamic, AWQ's scale search, then tuned
    assert found["formats"] == ["llmc_report", "llmc_report", "tuned_report"]
    assert found["serving"] == ["harness_report", "vllm_report"]
    assert found["benchmarks"] == ["gguf_report"] and found["recommend"] == ["tuned_report"]
    with pytest.raises(TypeError, match="report slot 'appendix' is not one of"):
        sections.register("appendix")


def test_the_check_finds_a_format_named_in_code_but_not_in_a_docstring(tmp_path):
    bad = tmp_path / "shared.py"
    bad.write_text('"""Speaks of GGUF and bitsandbytes: allowed."""\n'
                   "from quantpipe.quantize.gguf import f16_gguf\n\n\n"
                   "def f(cfg, runtime):\n"
                   '    """imatrix in a docstring is fine."""\n'
                   '    if cfg.quant.name == "int4":\n'
                   "        return estimate_bnb_quantize(cfg)\n"
                   '    return {"transformers-bitsandbytes": 1}[runtime]\n')
    words = format_words()
    hits = names_a_format(bad, words)
    assert len(hits) == 5, hits  # import module, imported name, "int4", bnb, bitsandbytes
    assert not any("docstring" in h or "allowed" in h for h in hits)


# --- the registries --------------------------------------------------------------------------

def test_every_runtime_a_backend_names_is_registered_and_complete():
    names = runtimes.runtime_names()
    assert {"transformers", "llama.cpp"} <= set(names)
    for r in runtimes.runtimes():
        assert r.throughput.flops > 0 and r.throughput.bytes_per_s > 0
        assert r.memory_for(10**9, _shape(), 512) > 10**9
    # every eval.reference_runtime value the schema allows is served by one runtime
    from quantpipe.schema import RULES
    assert set(RULES["eval.reference_runtime"].options) == set(runtimes.reference_settings())


def test_a_runtime_missing_a_part_fails_when_it_is_defined():
    with pytest.raises(TypeError, match="lacks throughput, memory_for, open"):
        @runtimes.register
        class Half(runtimes.Runtime):
            name = "half"
            libraries = ()
    assert "half" not in runtimes.RUNTIMES


def test_a_result_naming_an_unknown_runtime_is_refused():
    from quantpipe.quantize.hf import save_fp16
    with pytest.raises(RuntimeError, match="names runtime 'onnx', not one of the registered"):
        save_fp16.format.check_result({"artifact": ".", "runtime": "onnx"})


def test_the_reference_memory_follows_its_runtime():
    """transformers-float32 holds twice the FP16 bytes; llama.cpp maps the F16 file."""
    shape, n = _shape(), 10**9
    hf, f32 = runtimes.reference_runtime("transformers-float32")
    assert f32 and hf.memory_for(n, shape, 512, f32) - hf.memory_for(n, shape, 512) == n
    cpp, f32 = runtimes.reference_runtime("llama.cpp")
    assert not f32 and cpp.name == "llama.cpp"


def _shape():
    from quantpipe.memory import Shape
    return Shape(n_params=10**9 // 2, stored_bytes=10**9, largest=32000 * 2048, vocab=32000,
                 layers=16, kv_dim=512)


def test_a_recipe_that_depends_on_the_options_moves_only_their_cache_key():
    """llm-compressor's AWQ results gained a record of its scale search: the quantise stage's
    key (Format.made_by with the backend's options) moves for AWQ, and for no other modifier,
    so the other calibrated variants stay cached."""
    from quantpipe.quantize import llmc
    fmt = llmc.quantize_llmc.format
    plain = fmt.made_by()
    assert fmt.made_by({"modifiers": [{"GPTQModifier": {}}]}) == plain
    assert fmt.made_by({"modifiers": [{"QuantizationModifier": {}}]}) == plain
    awq = fmt.made_by({"modifiers": [{"AWQModifier": {}}]})
    assert awq != plain and awq["options_recipe"] == {"AWQModifier": llmc.MODIFIER_RECIPE[
        "AWQModifier"]}


def test_awq_summary_reads_the_scale_search_rows():
    from quantpipe.quantize.llmc import awq_summary, csv_table
    rows = [{"smooth": "l0.norm", "error_left": 0.9, "channel_max_over_median": 2.0},
            {"smooth": "l0.up", "error_left": 0.5, "channel_max_over_median": 8.0},
            {"smooth": "l1.norm", "error_left": 0.7, "channel_max_over_median": 4.0}]
    assert awq_summary(rows) == {"awq_mappings": 3.0, "awq_error_left_median": 0.7,
                                 "awq_error_left_min": 0.5, "awq_channel_peak_median": 4.0}
    assert awq_summary([]) == {}
    assert csv_table(rows[:1], ("smooth", "error_left", "scale_max_over_min")) == \
        "smooth,error_left,scale_max_over_min\nl0.norm,0.9,\n"
