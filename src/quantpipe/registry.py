"""MLflow model registry: each published variant becomes a version of one registered model, and
the alias `champion` points at the best version that passed the quality gate.

Called by the publish stage (quantpipe.pipeline.stage_publish); configured under `registry:` in
conf/config.yaml (name, champion_by, champion_mode). A version's source is the `model` artefact
of the publish run that first logged those files, `runs:/<run>/model` (an unchanged re-run
points at the earlier copy, quantpipe.tracking.log_model): the HF folder or GGUF file, or, above
tracking.log_model_max_mb, files.json with their paths (relative to quantized/) and sha256. An
unchanged re-run (same source, gate result and metrics as the variant's newest version)
registers nothing new: the registry grows with changes, not with runs. The version carries the
variant's metrics and gate result as tags, so the champion can be chosen before the variant run
has finished. Versions compete only with versions of the same merged model (tag
merged.fingerprint), and only the newest version of each quant.name counts, so re-running a
variant replaces its entry and a new adapter starts a new contest.

Registering is two requests (create the version, then move the alias), and a process can die or
lose its server between them. A version is created tagged `registering` and the tag is removed
once the champion has been re-elected; the next run's recovery (quantpipe.recovery.recover)
deletes a version still so tagged whose publish run is no longer RUNNING and re-elects the
champion without it (`drop_half_registered`), so the registry never keeps half a registration.

    mlflow.artifacts.download_artifacts("models:/SmolLM2-135M-Instruct-quantised@champion")
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from quantpipe.errors import ConfigError
from quantpipe.names import Gate, Tag

log = logging.getLogger(__name__)
CHAMPION = "champion"
MODES = ("min", "max")


def register_variant(name: str, publish_run_id: str, model_uri: str, variant_run_id: str,
                     quant_name: str, merged_fingerprint: str, passed: bool,
                     metrics: Mapping[str, float]) -> tuple[ModelVersion, bool]:
    """A new version of `name` made by the publish run, whose source is `model_uri` (that run's
    `model` artefact, or the earlier run's copy of the same files); or, when the newest version
    of this variant already has that source, gate result and metrics (an unchanged re-run), that
    version. Returns (version, whether it is new)."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, description="Quantised variants of one merged "
                                       "model; alias champion = best variant passing the gate")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {Tag.QUANT_NAME: quant_name, Tag.GATE: Gate.PASSED if passed else Gate.FAILED,
            Tag.MERGED_FINGERPRINT: merged_fingerprint,
            **{f"{Tag.METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}}
    newest = max(_versions(client, name, merged_fingerprint, quant_name),
                 key=lambda v: int(v.version), default=None)
    new = not (newest is not None and newest.source == model_uri
               and {k: newest.tags.get(k) for k in tags} == tags)
    # the version's run is the one holding its bytes: an MLflow server refuses a source under
    # another run's artefacts ("The run_id request parameter must identify the resource that
    # contains the source"), which a re-run with new figures has (model/same_as.json)
    holder = model_uri.split("/")[1] if model_uri.startswith("runs:/") else publish_run_id
    version = newest if not new else client.create_model_version(
        name, model_uri, run_id=holder,
        tags={**tags, Tag.VARIANT_RUN_ID: variant_run_id, Tag.PUBLISH_RUN_ID: publish_run_id,
              Tag.REGISTERING: "true"})
    client.set_tag(variant_run_id, Tag.REGISTRY_VERSION, f"{name}/{version.version}")
    return version, new


def _versions(client: MlflowClient, name: str, merged_fingerprint: str,
              quant_name: str | None = None) -> list[ModelVersion]:
    """The versions of `name` built from one merged model (of one variant, if named)."""
    query = f"name = '{name}' and tags.`{Tag.MERGED_FINGERPRINT}` = '{merged_fingerprint}'"
    if quant_name is not None:
        query += f" and tags.`{Tag.QUANT_NAME}` = '{quant_name}'"
    return list(client.search_model_versions(query))


def contenders(versions: Iterable[ModelVersion], merged_fingerprint: str) -> list[ModelVersion]:
    """The newest version of each quant.name built from the given merged model."""
    newest: dict[str, ModelVersion] = {}
    for v in versions:
        if v.tags.get(Tag.MERGED_FINGERPRINT) != merged_fingerprint:
            continue
        name = v.tags.get(Tag.QUANT_NAME, "")
        if name not in newest or int(v.version) > int(newest[name].version):
            newest[name] = v
    return list(newest.values())


def best_passing(versions: Iterable[ModelVersion], by: str, mode: str) -> ModelVersion | None:
    """The gate-passing version with the lowest (mode=min) or highest (max) metric `by`;
    ties go to the newer version. Failed-gate versions are never chosen."""
    sign = _sign(mode)
    ok = [v for v in versions
          if v.tags.get(Tag.GATE) == Gate.PASSED and f"{Tag.METRIC_PREFIX}{by}" in v.tags]
    return min(ok, key=lambda v: (sign * float(v.tags[f"{Tag.METRIC_PREFIX}{by}"]),
                                  -int(v.version)),
               default=None)


def _sign(mode: str) -> int:
    if mode not in MODES:
        raise ConfigError("registry.champion_mode", f"{mode!r} is not min or max",
                          "min for size_mb / kld_mean, max for decode_tok_s / top1_agree_pct")
    return 1 if mode == "min" else -1


def update_champion(name: str, merged_fingerprint: str, by: str, mode: str
                    ) -> ModelVersion | None:
    """Point `champion` at the best passing contender; remove it when none passes."""
    client = MlflowClient()
    best = best_passing(contenders(_versions(client, name, merged_fingerprint),
                                   merged_fingerprint), by, mode)
    if best is None:
        try:
            client.delete_registered_model_alias(name, CHAMPION)
        except MlflowException:
            pass  # there was no champion to remove
        log.info("registry %s: no variant passes the gate, no champion", name)
        return None
    client.set_registered_model_alias(name, CHAMPION, best.version)
    log.info("registry %s: champion = version %s (%s, %s=%s)", name, best.version,
             best.tags.get(Tag.QUANT_NAME), by, best.tags[f"{Tag.METRIC_PREFIX}{by}"])
    return best


def publish_to_registry(registry_cfg: Mapping, publish_run_id: str, model_uri: str,
                        variant_run_id: str, quant_name: str, merged_fingerprint: str, passed: bool,
                        metrics: Mapping[str, float]) -> tuple[ModelVersion, ModelVersion | None]:
    """Register the variant, then re-elect the champion. Returns (version, champion)."""
    name, by = str(registry_cfg["name"]), str(registry_cfg["champion_by"])
    _sign(str(registry_cfg["champion_mode"]))  # check the config before registering anything
    if by not in metrics:
        raise ConfigError("registry.champion_by", f"{by!r} is not a variant metric",
                          f"choose one of: {', '.join(sorted(metrics))}")
    version, new = register_variant(name, publish_run_id, model_uri, variant_run_id, quant_name,
                                    merged_fingerprint, passed, metrics)
    if not new:  # an unchanged re-run: the contest is as it was
        log.info("registry %s: %s unchanged, version %s", name, quant_name, version.version)
        try:
            return version, MlflowClient().get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return version, None  # no variant of this merged model passes the gate
    champion = update_champion(name, merged_fingerprint, by, str(registry_cfg["champion_mode"]))
    MlflowClient().delete_model_version_tag(name, version.version, Tag.REGISTERING)
    return version, champion


def drop_half_registered(registry_cfg: Mapping) -> list[str]:
    """Delete the versions of the registered model whose registration never finished (still
    tagged `registering`, their publish run no longer RUNNING: killed, failed, or cut off from
    the server), then re-elect the champion of each merged model they belonged to. Returns the
    deleted version numbers."""
    client = MlflowClient()
    name = str(registry_cfg["name"])
    dropped, merged = [], set()
    for v in client.search_model_versions(f"name = '{name}' and tags.`{Tag.REGISTERING}` = 'true'"):
        try:  # the publish run (a version's own run may be an earlier one holding the bytes)
            publisher = v.tags.get(Tag.PUBLISH_RUN_ID) or v.run_id
            running = client.get_run(publisher).info.status == "RUNNING"
        except MlflowException:  # its run was deleted
            running = False
        if running:  # another pipeline is registering it now
            continue
        client.delete_model_version(name, v.version)
        dropped.append(str(v.version))
        merged.add(v.tags.get(Tag.MERGED_FINGERPRINT, ""))
    for fp in merged:
        update_champion(name, fp, str(registry_cfg["champion_by"]),
                        str(registry_cfg["champion_mode"]))
    if dropped:
        log.warning("registry %s: deleted version(s) %s, registered by runs that ended before "
                    "electing the champion", name, ", ".join(dropped))
    return dropped
