"""Every config option composes; unknown options fail with the list; paths resolve from root."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from quantpipe.config import group_options, quant_options
from quantpipe.errors import ConfigError
from quantpipe.pipeline import require_quant
from tests.conftest import make_cfg


@pytest.mark.parametrize("quant", quant_options())
def test_every_quant_option_composes_and_resolves(tmp_path, quant):
    cfg = make_cfg(tmp_path, [f"+quant={quant}"])
    assert cfg.quant.name and cfg.quant.family in ("hf", "gguf")
    assert cfg.quant.method in ("none", "dynamic", "static")
    assert cfg.quant.backend._target_.startswith("quantpipe.quantize.")
    assert str(cfg.quant.publish)


@pytest.mark.parametrize("group", ["model", "adapter", "eval", "tracking", "paths", "gate"])
def test_every_group_option_composes(tmp_path, group):
    for option in group_options(group):
        make_cfg(tmp_path, [f"{group}={option}", "+quant=int4"])


def test_gguf_type_override_flows_into_name_and_backend(tmp_path):
    cfg = make_cfg(tmp_path, ["+quant=gguf", "quant.type=q5_k_m"])
    assert cfg.quant.name == "gguf_q5_k_m"
    assert cfg.quant.backend.type == "q5_k_m"
    assert cfg.quant.publish == "model-q5_k_m.gguf"


def test_unknown_quant_lists_valid_options(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as e:
        make_cfg(tmp_path, ["+quant=int5"])
    assert "int4" in str(e.value) and "gguf_q4_k_m" in str(e.value)


def test_missing_quant_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"\+quant=<name>.*int4"):
        require_quant(make_cfg(tmp_path))


def test_paths_resolve_from_the_given_root(tmp_path):
    cfg = make_cfg(tmp_path, ["+quant=int8"])
    assert Path(cfg.paths.quantized) == tmp_path / "quantized"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_default_root_is_the_project(tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+quant=int4"])
    assert Path(cfg.paths.root) == CONF.parent
