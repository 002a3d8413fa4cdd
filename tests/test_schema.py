"""Bad values are refused right after composition: in seconds, with one line naming the key and
the fix, exit code 2, before any stage or MLflow run, and with quantized/ untouched.

    .venv/bin/python -m pytest -q tests/test_schema.py

The probes run through the real entry point (`python -m pipelines.run ... paths.root=tmp`), one
through make; the rest call quantpipe.schema.check on the composed config.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from quantpipe import PROJECT_ROOT, schema
from quantpipe.config import quant_options
from quantpipe.errors import ConfigError
from quantpipe.quantize import Format, check_backend, register
from tests.conftest import make_cfg

LIMIT_S = 10  # the bound for a refused command line


def cli(root: Path, *words: str, env: dict | None = None
        ) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    # a fresh command line, as a user types it: not the verbosity an in-process entry point of an
    # earlier test recorded in this process's environment
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",
                                                             "QUANTPIPE_FULL_ERROR")}
    res = subprocess.run([sys.executable, "-m", "pipelines.run", f"paths.root={root}", *words],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                         env={**base, **(env or {})})
    return res, time.perf_counter() - t0


def published_root(tmp_path: Path) -> tuple[Path, dict]:
    """A root with a published model in quantized/, and its bytes, to check nothing changes."""
    model = tmp_path / "quantized" / "model-int4"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"published before")
    return tmp_path, {"model.safetensors": b"published before"}


PROBES = [  # (overrides, key the error names, words the line must hold)
    (["+quant=gguf_q8_0", "gate.max_delta_ppl_pct=abc"], "gate.max_delta_ppl_pct",
     ["'abc' is not a number >= 0 or null"]),
    (["+quant=int4", "eval.n_ctx=0"], "eval.n_ctx", ["0 is not a whole number >= 8"]),
    (["+quant=int4", "eval.n_ctx=-5"], "eval.n_ctx", ["-5 is not a whole number >= 8"]),
    (["+quant=int4", "eval.kld_top_k=0"], "eval.kld_top_k", ["0 is not a whole number >= 1"]),
    (["+quant=int4", "+quant=int8"], "+quant", ["use the sweep", "SWEEP=int4,int8"]),
    (["+quant=int4", "quant.backend.quant_type=nf5"], "quant.backend.quant_type",
     ["'nf5' is not a 4-bit type", "nf4, fp4"]),
]


@pytest.mark.parametrize("words, key, expect", PROBES, ids=[" ".join(p[0]) for p in PROBES])
def test_probe_fails_in_seconds_with_one_line(tmp_path, words, key, expect):
    root, before = published_root(tmp_path)
    res, seconds = cli(root, *words)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {key}: "), res.stderr
    assert " -> " in lines[-1] and all(e in lines[-1] for e in expect), lines[-1]
    assert "Traceback" not in res.stderr and "Error executing job" not in res.stderr
    assert seconds < LIMIT_S, f"refused after {seconds:.1f} s"
    # nothing ran: no MLflow store, no artefacts, the published model as it was (outputs/ is
    # Hydra's record of the command: the composed config and the log)
    assert sorted(p.name for p in root.iterdir()) in (["quantized"], ["outputs", "quantized"])
    assert {p.name: p.read_bytes() for p in (root / "quantized" / "model-int4").iterdir()} == before


def test_two_quants_through_make_are_refused(tmp_path):
    """make itself keeps only the last `+quant=`: the words typed still reach the check.
    (-o: never (re)build .venv from a test)"""
    res = subprocess.run(["make", "-s", "-o", ".venv/.installed", "pipeline", "+quant=int4",
                          "+quant=int8", f"paths.root={tmp_path}"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "error: +quant: given 2 times (+quant=int4 +quant=int8)" in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())


def test_full_traceback_on_request(tmp_path):
    res, _ = cli(tmp_path, "+quant=int4", "eval.n_ctx=0", env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "ConfigError: eval.n_ctx" in res.stderr


def test_hydra_refusals_are_one_line_too(tmp_path):
    res, _ = cli(tmp_path, "+quant=int5")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "quant/int5" in last and "gguf_q4_k_m" in last, last
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_sweep_checks_shared_values_once_before_it_starts(tmp_path):
    res, seconds = cli(tmp_path, "hydra.mode=MULTIRUN", "+quant=int4,int8", "eval.n_ctx=0")
    assert res.returncode == 2 and "error: eval.n_ctx: " in res.stderr.splitlines()[-1]
    assert res.stderr.count("error:") == 1 and seconds < LIMIT_S
    assert not (tmp_path / "mlruns").exists()  # no sweep run was created


def test_a_failed_sweep_job_does_not_stop_the_others(tmp_path):
    """Each variant refuses its own bad option in its job; both jobs run, each says why in one
    line, the sweep ends with one line and exit 2."""
    res, _ = cli(tmp_path, "hydra.mode=MULTIRUN", "+quant=int4,int8",
                 "+quant.backend.group_size=64")
    out = res.stdout + res.stderr  # Hydra's job log goes to stdout
    assert res.returncode == 2, out
    assert out.count("error: quant.backend.group_size: is not an option of") == 3, out
    assert "quantize_int4" in out and "quantize_int8" in out
    assert "Traceback" not in out


# --- the schema itself, in process ------------------------------------------------------------

@pytest.mark.parametrize("quant", quant_options())
def test_every_shipped_config_passes_and_every_key_has_a_rule(tmp_path, quant):
    cfg = make_cfg(tmp_path, [f"+quant={quant}"])
    schema.check(cfg)
    assert schema.unchecked_keys(cfg) == []


def test_every_rule_names_a_key_of_conf(tmp_path):
    keys = set()
    for quant in quant_options():
        cfg = make_cfg(tmp_path, [f"+quant={quant}"])
        keys |= set(schema._leaves(OmegaConf.to_container(cfg, resolve=False), ""))
    assert [k for k in schema.RULES if k not in keys] == []


@pytest.mark.parametrize("override, key", [
    ("threads=0", "threads"), ("threads=two", "threads"), ("eval.n_windows=0", "eval.n_windows"),
    ("eval.n_ctx=64.5", "eval.n_ctx"), ("eval.n_ctx=true", "eval.n_ctx"),
    ("eval.speed.new_tokens=1", "eval.speed.new_tokens"),
    ("eval.speed.repeats=0", "eval.speed.repeats"),
    ("gate.max_kld=-1", "gate.max_kld"), ("disk.margin_gb=-0.5", "disk.margin_gb"),
    ("merge.min_top1_agreement=1.5", "merge.min_top1_agreement"),
    ("registry.champion_mode=median", "registry.champion_mode"),
    ("model.allow_pickle=maybe", "model.allow_pickle"), ("paths.quantized=''", "paths.quantized"),
    ("adapter.train.target_modules=[]", "adapter.train.target_modules"),
    ("quant.backend.compute_dtype=float8", "quant.backend.compute_dtype"),
    ("quant.backend.double_quant=yes", "quant.backend.double_quant"),
])
def test_bad_values_name_key_value_and_range(tmp_path, override, key):
    cfg = make_cfg(tmp_path, ["+quant=int4", override])
    with pytest.raises(ConfigError) as e:
        schema.check(cfg)
    assert e.value.key == key and e.value.fix, str(e.value)
    assert "is not" in e.value.problem


@pytest.mark.parametrize("override", ["threads=null", "eval.n_windows=null", "gate.max_kld=0.05",
                                      "gate.max_delta_ppl_pct=5", "eval.n_ctx=8", "threads=4"])
def test_allowed_edge_values_pass(tmp_path, override):
    schema.check(make_cfg(tmp_path, ["+quant=int4", override]))


@pytest.mark.parametrize("quant, override, key", [
    ("int8", "quant.backend.threshold=-1", "quant.backend.threshold"),
    ("gguf", "quant.type=q9_z", "quant.type"),
    ("gguf_imatrix_q4_k_m", "quant.backend.imatrix.chunks=0", "quant.backend.imatrix.chunks"),
    ("int4", "quant.backend._target_=quantpipe.quantize.bnb.nope", "quant.backend._target_"),
])
def test_each_backend_checks_its_own_options(tmp_path, quant, override, key):
    with pytest.raises(ConfigError) as e:
        schema.check(make_cfg(tmp_path, [f"+quant={quant}", override]))
    assert e.value.key == key, str(e.value)


def test_missing_quant_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\+quant=<name>"):
        schema.check(make_cfg(tmp_path))
    schema.check(make_cfg(tmp_path), with_quant=False)


def test_a_new_backend_gets_the_hook(tmp_path):
    """The contract other backends adopt: unknown options refused from the signature, values by
    the format's registered check_options, both before any stage."""
    quant = OmegaConf.create({"backend": {"_target_": "tests.test_schema.fake_backend",
                                          "_partial_": True, "scheme": "W3A16"}})
    with pytest.raises(ConfigError, match="quant.backend.scheme: 'W3A16' is unknown"):
        check_backend(quant)
    quant.backend.scheme = "W4A16"
    check_backend(quant)
    quant.backend.group = 64
    with pytest.raises(ConfigError, match="quant.backend.group: is not an option .* scheme"):
        check_backend(quant)


def _check_fake(options: dict) -> None:
    if options["scheme"] not in ("W4A16", "W8A8"):
        raise ConfigError("quant.backend.scheme", f"{options['scheme']!r} is unknown", "W4A16")


def _no_needs(*_, **__) -> list:
    return []


@register(recipe=1, libraries=(), check_options=_check_fake, memory_need=_no_needs,
          eval_need=_no_needs)
def fake_backend(src, dst, ctx, scheme: str = "W4A16") -> dict:
    return {"artifact": ".", "metrics": {}}


def unregistered_backend(src, dst, ctx) -> dict:
    return {"artifact": ".", "metrics": {}}


def test_a_backend_must_be_registered(tmp_path):
    quant = OmegaConf.create({"backend": {"_target_": "tests.test_schema.unregistered_backend",
                                          "_partial_": True}})
    with pytest.raises(ConfigError, match="quant.backend._target_: .* is not a registered format"):
        check_backend(quant)


@pytest.mark.parametrize("parts, problem", [
    ({"recipe": 1, "libraries": (), "memory_need": _no_needs}, "eval_need"),
    ({"recipe": "1", "libraries": (), "memory_need": _no_needs, "eval_need": _no_needs}, "recipe"),
    ({"recipe": 1, "libraries": "torch", "memory_need": _no_needs, "eval_need": _no_needs},
     "libraries"),
    ({"recipe": 1, "libraries": (), "memory_need": None, "eval_need": _no_needs}, "memory_need"),
])
def test_a_format_missing_a_part_fails_when_it_is_defined(parts, problem):
    """As llama.cpp's converter refuses a model class without its architecture: the decorator
    raises at import, not when a run first asks the format for its memory need."""
    with pytest.raises(TypeError, match=problem):
        @register(**parts)
        def incomplete(src, dst, ctx) -> dict:
            return {}
    with pytest.raises(TypeError, match="src, dst, ctx"):
        Format(quantize=lambda src: {}, recipe=1, libraries=(), memory_need=_no_needs,
               eval_need=_no_needs)
