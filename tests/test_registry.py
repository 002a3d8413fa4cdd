"""The model registry's champion rule, on a real MLflow store (SQLite in tmp): versions of
publish runs that really logged a `model` artefact, numbers chosen to make each rule decide.

    .venv/bin/python -m pytest -q tests/test_registry.py
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from quantpipe.errors import ConfigError
from quantpipe.registry import CHAMPION, drop_half_registered, publish_to_registry
from quantpipe.tracking import log_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds); each test has its
    own registered model."""
    root = tmp_path_factory.mktemp("registry")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.create_experiment("t", artifact_location=(root / "art").as_uri())
    (root / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    return root, exp


@pytest.fixture
def reg(store, request):
    """publish(quant, passed, ...) and champion() against this test's registered model."""
    root, exp = store
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment(experiment_id=exp)
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)
    smallest = {"name": name, "champion_by": "size_mb", "champion_mode": "min"}

    def publish(quant: str, passed: bool, merged: str = "m1", rule: dict | None = None,
                fingerprint: str | None = None, **metrics: float):
        """A variant run whose publish run logs the model, registered as the pipeline does."""
        with mlflow.start_run(run_name=quant) as variant:
            with mlflow.start_run(run_name="publish", nested=True) as pub:
                uri = log_model(root / "model.gguf", 300, "model",
                                fingerprint or f"{name}-{quant}-{merged}-{len(metrics)}-{passed}")
                return publish_to_registry({**smallest, **(rule or {})}, pub.info.run_id, uri,
                                           variant.info.run_id, quant, merged, passed, metrics)

    def champion() -> str | None:
        try:
            return client.get_model_version_by_alias(name, CHAMPION).tags["quant.name"]
        except mlflow.exceptions.MlflowException:
            return None

    client = mlflow.MlflowClient()
    return SimpleNamespace(publish=publish, champion=champion, name=name, client=client,
                           model=root / "model.gguf")


def test_smallest_passing_is_champion_and_a_failed_gate_never_is(reg):
    reg.publish("fp16", True, size_mb=257.0)
    reg.publish("q8_0", True, size_mb=136.0)
    _, champ = reg.publish("q2_k", False, size_mb=60.0)  # smallest, over the gate
    assert champ.tags["quant.name"] == "q8_0" == reg.champion()
    version, _ = reg.publish("q4_0", True, size_mb=86.0)
    assert reg.champion() == "q4_0"
    assert version.source == f"runs:/{version.run_id}/model"
    parent = reg.client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    assert reg.client.get_run(parent).data.tags["registry.version"] == \
        f"{reg.name}/{version.version}"
    (copy,) = Path(mlflow.artifacts.download_artifacts(f"models:/{reg.name}@{CHAMPION}")
                   ).rglob("*.gguf")
    assert copy.read_bytes() == reg.model.read_bytes()


def test_a_rerun_replaces_its_variant_and_no_passing_variant_means_no_champion(reg):
    reg.publish("q4_0", True, size_mb=86.0)
    reg.publish("q8_0", True, size_mb=136.0)
    assert reg.champion() == "q4_0"
    reg.publish("q4_0", False, size_mb=86.0)  # re-run with a stricter gate: now fails
    assert reg.champion() == "q8_0"
    reg.publish("q8_0", False, size_mb=136.0)
    assert reg.champion() is None


def test_only_versions_of_the_same_merged_model_compete(reg):
    reg.publish("q4_0", True, merged="old-adapter", size_mb=86.0)
    reg.publish("q8_0", True, merged="new-adapter", size_mb=136.0)
    assert reg.champion() == "q8_0"


def test_criterion_is_configurable(reg):
    fastest = {"champion_by": "decode_tok_s", "champion_mode": "max"}
    reg.publish("q4_0", True, rule=fastest, size_mb=86.0, decode_tok_s=130.0)
    reg.publish("q8_0", True, rule=fastest, size_mb=136.0, decode_tok_s=90.0)
    assert reg.champion() == "q4_0"


@pytest.mark.parametrize("bad, key", [({"champion_by": "size"}, "champion_by"),
                                      ({"champion_mode": "low"}, "champion_mode")])
def test_bad_criterion_is_refused_before_registering(reg, bad, key):
    with pytest.raises(ConfigError, match=f"registry.{key}"):
        reg.publish("q4_0", True, rule=bad, size_mb=86.0)
    assert reg.client.search_model_versions(f"name = '{reg.name}'") == []


def test_the_same_model_published_again_is_stored_once_and_registered_once(reg, store):
    """An unchanged re-run publishes the same files: its publish run points at the first copy
    (model/same_as.json) instead of adding another to the store, and the registry keeps the
    version it has (it grows with changes, not runs), which still downloads. Once the first
    run's files are gone, the next run copies them again and registers a new version."""
    root, exp = store
    first, _ = reg.publish("q4_0", True, fingerprint="fp-a", size_mb=86.0)
    again, champ = reg.publish("q4_0", True, fingerprint="fp-a", size_mb=86.0)
    assert again.version == first.version == champ.version
    (second_publish,) = reg.client.search_runs(
        [exp], "attributes.run_name = 'publish'", order_by=["attributes.start_time DESC"],
        max_results=1)
    assert second_publish.info.run_id != first.run_id
    assert [a.path for a in reg.client.list_artifacts(second_publish.info.run_id, "model")] == \
        ["model/same_as.json"]
    (copy,) = Path(mlflow.artifacts.download_artifacts(f"models:/{reg.name}@{CHAMPION}")
                   ).rglob("*.gguf")
    assert copy.read_bytes() == reg.model.read_bytes()
    changed, _ = reg.publish("q4_0", True, fingerprint="fp-a", size_mb=85.0)  # new figures
    assert int(changed.version) > int(first.version) and changed.source == first.source
    # its run is the one holding the bytes (an MLflow server refuses any other), and the run
    # that registered it is in a tag, for recovery to judge a half registration by
    (third_publish,) = reg.client.search_runs(
        [exp], "attributes.run_name = 'publish'", order_by=["attributes.start_time DESC"],
        max_results=1)
    assert changed.run_id == first.run_id
    assert changed.tags["publish_run_id"] == third_publish.info.run_id != first.run_id
    import shutil
    shutil.rmtree(Path(reg.client.get_run(first.run_id).info.artifact_uri.removeprefix("file://"))
                  / "model")
    third, _ = reg.publish("q4_0", True, fingerprint="fp-a", size_mb=85.0)
    assert third.source == f"runs:/{third.run_id}/model" != first.source


# a pipeline's publish stage up to its first registry request: the version is created, then the
# process dies (SIGKILL, no handler runs) before the champion is re-elected
HALF_REGISTER = """
import os, signal, sys
import mlflow
from quantpipe.recovery import process_tags
from quantpipe.registry import register_variant
from quantpipe.tracking import log_model
db, exp, name, model = sys.argv[1:]
mlflow.set_tracking_uri(f"sqlite:///{db}")
mlflow.set_experiment(experiment_id=exp)
with mlflow.start_run(run_name="q2_k", tags=process_tags()) as variant:
    with mlflow.start_run(run_name="publish", nested=True, tags=process_tags()) as pub:
        uri = log_model(model, 300, "model", name + "-q2_k")
        register_variant(name, pub.info.run_id, uri, variant.info.run_id, "q2_k", "m1", True,
                         {"size_mb": 50.0})
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_version_half_registered_by_a_killed_process_is_deleted_by_the_next_run(reg, store):
    """Killed between creating its version and electing the champion: the smallest passing
    version would be champion, but the alias still points at the old one. The next run's
    recovery closes the dead runs, deletes that version and re-elects without it."""
    from quantpipe.recovery import mark_dead_runs
    root, exp = store
    reg.publish("q8_0", True, size_mb=136.0)
    child = subprocess.run([sys.executable, "-c", HALF_REGISTER, str(root / "mlflow.db"), exp,
                            reg.name, str(reg.model)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (half,) = reg.client.search_model_versions(f"name = '{reg.name}' and "
                                               "tags.`quant.name` = 'q2_k'")
    assert half.tags["registering"] == "true" and reg.champion() == "q8_0"
    assert drop_half_registered({"name": reg.name, "champion_by": "size_mb",
                                 "champion_mode": "min"}) == []  # its run is still RUNNING
    mark_dead_runs(exp)  # what recovery.recover does first
    assert drop_half_registered({"name": reg.name, "champion_by": "size_mb",
                                 "champion_mode": "min"}) == [str(half.version)]
    versions = reg.client.search_model_versions(f"name = '{reg.name}'")
    assert [v.tags["quant.name"] for v in versions] == ["q8_0"] and reg.champion() == "q8_0"
    assert "registering" not in versions[0].tags  # a finished registration keeps its version
    version, _ = reg.publish("q2_k", True, size_mb=50.0)  # the re-run registers it whole
    assert reg.champion() == "q2_k"
    assert "registering" not in reg.client.get_model_version(reg.name, version.version).tags


def test_a_model_above_the_copy_limit_is_logged_as_relative_paths_and_hashes(store, tmp_path):
    """Above tracking.log_model_max_mb the model is not copied: files.json names each file
    relative to the folder it was published in (no host path in the store) with its size and
    sha256."""
    import hashlib
    root, exp = store
    folder = tmp_path / "quantized" / "model-int4"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(2048))
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    with mlflow.start_run(experiment_id=exp, run_name="big") as run:
        uri = log_model(folder, 0.001, "model", "fp-big")
    assert uri == f"runs:/{run.info.run_id}/model"
    files = mlflow.artifacts.load_dict(f"{uri}/files.json")
    assert files == {f"model-int4/{f.name}": {"bytes": f.stat().st_size, "sha256":
                     hashlib.sha256(f.read_bytes()).hexdigest()} for f in folder.iterdir()}
    assert str(tmp_path) not in json.dumps(files)
