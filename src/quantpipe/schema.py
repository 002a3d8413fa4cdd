"""The types and ranges of every key a user sets, checked right after Hydra composes conf/.

    from quantpipe.schema import check
    check(cfg)            # ConfigError naming key, value and allowed range; quiet when all is well

Called by the entry point (pipelines/run.py) before anything else and again at the top of
`quantpipe.pipeline.run`, so a typo (`gate.max_delta_ppl_pct=abc`, `eval.n_ctx=0`) fails in a
second instead of after an hour of merging and converting. Each quant backend then checks its
own options (`quantpipe.quantize.check_backend`): `quant.backend.quant_type=nf5` fails here too.

A rule per key, not Hydra structured configs: a dataclass schema types the values but says
nothing of ranges ("n_ctx must be >= 8"), and its errors are Hydra's, not `key: problem -> fix`.
A new config key gets a line in RULES (tests/test_schema.py fails for a key without one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from quantpipe.errors import ConfigError


@dataclass(frozen=True)
class Num:
    """A number in [lo, hi]; `integer` for counts; `null` when None is allowed."""
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    null: bool = False

    def allowed(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            kind += f" in [{_fmt(self.lo)}, {_fmt(self.hi)}]"
        elif self.lo is not None:
            kind += f" >= {_fmt(self.lo)}"
        elif self.hi is not None:
            kind += f" <= {_fmt(self.hi)}"
        return kind + (" or null" if self.null else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        if self.integer and not isinstance(v, int):
            return False
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)


@dataclass(frozen=True)
class Str:
    """A non-empty string (a path, a name); `null` when None is allowed."""
    null: bool = False

    def allowed(self) -> str:
        return "a non-empty string" + (" or null" if self.null else "")

    def ok(self, v: Any) -> bool:
        return (v is None and self.null) or (isinstance(v, str) and v.strip() != "")


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def allowed(self) -> str:
        return "one of " + ", ".join(_fmt(o) for o in self.options)

    def ok(self, v: Any) -> bool:
        return not isinstance(v, (dict, list)) and v in self.options


@dataclass(frozen=True)
class StrList:
    empty: bool = False  # an empty list allowed
    example: str = "[q_proj,v_proj]"

    def allowed(self) -> str:
        return f"a {'' if self.empty else 'non-empty '}list of names, e.g. {self.example}"

    def ok(self, v: Any) -> bool:
        return (isinstance(v, list) and (bool(v) or self.empty)
                and all(isinstance(x, str) and x for x in v))


BOOL = Choice((True, False))
COUNT = Num(lo=1, integer=True)

RULES: dict[str, Any] = {
    "seed": Num(lo=0, integer=True),
    "threads": Num(lo=1, integer=True, null=True),
    "paths.root": Str(), "paths.artifacts": Str(), "paths.quantized": Str(), "paths.tools": Str(),
    "model.name": Str(), "model.path": Str(null=True), "model.allow_pickle": BOOL,
    "model.trust_remote_code": BOOL,
    "model.embedded.package": Str(), "model.embedded.file": Str(),
    "adapter.name": Str(), "adapter.path": Str(null=True),
    "adapter.train.r": COUNT, "adapter.train.alpha": Num(lo=0),
    "adapter.train.dropout": Num(lo=0, hi=0.99), "adapter.train.target_modules": StrList(),
    "adapter.train.seq_len": Num(lo=8, integer=True), "adapter.train.batch_size": COUNT,
    "adapter.train.steps": COUNT, "adapter.train.lr": Num(lo=1e-12, hi=1.0),
    "merge.parity_tokens": Num(lo=2, integer=True),   # parity compares next-token predictions
    "merge.min_top1_agreement": Num(lo=0, hi=1),
    "merge.stream_above_gb": Num(lo=0, null=True),
    "disk.margin_gb": Num(lo=0),
    "eval.text_file": Str(null=True),
    # the second half of each window is scored: 8 tokens score 4 per window
    "eval.n_ctx": Num(lo=8, integer=True),
    "eval.n_windows": Num(lo=1, integer=True, null=True),
    "eval.kld_top_k": COUNT,
    "eval.speed.prompt_tokens": COUNT,
    "eval.speed.new_tokens": Num(lo=2, integer=True),  # decode tok/s times new_tokens - 1 steps
    "eval.speed.warmup": Num(lo=0, integer=True),
    "eval.speed.repeats": COUNT,
    "eval.sample.prompt": Str(), "eval.sample.max_new_tokens": COUNT,
    "eval.speed.remeasure": BOOL,
    "eval.ci.resamples": Num(lo=100, integer=True), "eval.ci.seed": Num(lo=0, integer=True),
    "eval.generation.prompts": COUNT, "eval.generation.prompt_tokens": COUNT,
    "eval.generation.new_tokens": COUNT, "eval.generation.match_k": COUNT,
    "eval.tasks_file": Str(null=True), "eval.tasks_max_new_tokens": COUNT,
    "eval.vllm.enabled": Choice(("auto", True, False)),
    "eval.vllm.dtype": Choice(("bfloat16", "float16", "float32")),
    "eval.lm_eval.tasks": StrList(empty=True, example="[pydoc_cloze]"),
    "eval.lm_eval.include_path": Str(null=True),
    "eval.lm_eval.limit": Num(lo=0, null=True),  # a count >= 1 or a fraction (harness.settings)
    "eval.lm_eval.num_fewshot": Num(lo=0, integer=True, null=True),
    "eval.reference_runtime": Choice(("llama.cpp", "transformers", "transformers-float32")),
    "eval.max_minutes": Num(lo=0, null=True),
    "memory.limit_gb": Num(lo=0, null=True),
    "gate.max_delta_ppl_pct": Num(lo=0, null=True),
    "gate.max_kld": Num(lo=0, null=True),
    "gate.min_finetune_retention_pct": Num(null=True),
    "gate.max_task_drop_pts": Num(lo=0, null=True),
    "gate.use_interval": Choice(("pessimistic", "point", "optimistic")),
    "registry.name": Str(), "registry.champion_by": Str(),
    "registry.champion_mode": Choice(("min", "max")),
    "tracking.uri": Str(), "tracking.experiment": Str(), "tracking.artifact_root": Str(null=True),
    "tracking.log_model_max_mb": Num(lo=0),
    "quant.name": Str(), "quant.family": Str(),
    "quant.method": Choice(("none", "dynamic", "static")),
    "quant.bits": Num(lo=1, hi=32, null=True), "quant.publish": Str(),
    "quant.backend._target_": Str(),
    "quant.compare": Str(null=True),   # the report's static-vs-dynamic group
    "quant.control": Str(null=True),   # its uncalibrated twin: what calibration bought (report)
}
# sections whose keys are the backend's own (checked by the backend) or Hydra's; a format adds
# its own quant.* keys and sections (its registration's `rules` and `open_sections`)
OPEN_SECTIONS = ("quant.backend", "hydra")


def check(cfg: DictConfig, with_quant: bool = True) -> None:
    """Every key of `cfg` with a rule holds an allowed value; raise ConfigError on the first
    that does not. Then the quant backend checks its own options. `with_quant=False` leaves
    quant out: a sweep's start (each job checks its own variant), `make adapter`."""
    _check_rules(cfg, {k: r for k, r in RULES.items() if with_quant or not k.startswith("quant.")})
    if not with_quant:
        return
    if "quant" not in cfg or cfg.quant is None:
        from quantpipe.config import quant_options
        raise ConfigError("quant", "no quantisation variant chosen",
                          f"add +quant=<name>, one of: {', '.join(quant_options())}")
    from quantpipe.quantize import check_backend
    _check_rules(cfg, check_backend(cfg.quant).rules)  # the format's own quant.* keys


def _check_rules(cfg: DictConfig, rules: dict[str, Any]) -> None:
    for key, rule in rules.items():
        present, value = _value(cfg, key)
        if present and not rule.ok(value):
            raise ConfigError(key, f"{_fmt(value)} is not {rule.allowed()}",
                              f"set {key}=<{rule.allowed()}>")


def unchecked_keys(cfg: DictConfig) -> list[str]:
    """Leaf keys of `cfg` no rule covers, the quant format's own included (a test keeps this
    empty for conf/)."""
    rules, sections = dict(RULES), OPEN_SECTIONS
    if cfg.get("quant") is not None:
        from quantpipe.quantize import format_of
        fmt = format_of(str(cfg.quant.backend.get("_target_")))
        rules, sections = {**rules, **fmt.rules}, sections + fmt.open_sections
    return [k for k in _leaves(OmegaConf.to_container(cfg, resolve=False), "")
            if k not in rules and not k.startswith(sections)
            and not any(k.startswith(r + ".") for r in rules)]


def check_overrides(overrides: Iterable[str]) -> None:
    """The command line names one variant: `+quant=int4 +quant=int8` would silently run int8."""
    quants = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == "quant"]
    if len(quants) > 1:
        names = [q.split("=", 1)[1] for q in quants]
        several = ",".join(names)
        raise ConfigError("+quant", f"given {len(quants)} times ({' '.join(quants)}); one run "
                          "makes one variant", f"use the sweep for several: make sweep "
                          f"SWEEP={several}  (or hydra.mode=MULTIRUN +quant={several})")


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, resolved plain value) of a dotted key; an interpolation that does not resolve
    is a ConfigError naming the key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False, None
    try:
        v = parent[leaf]
    except Exception as e:  # omegaconf's InterpolationResolutionError and friends
        raise ConfigError(key, f"does not resolve: {e}".splitlines()[0],
                          f"fix the value of {key} (an ${{...}} reference or environment variable)"
                          ) from e
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v, resolve=True)
    return True, v


def _leaves(node: Any, prefix: str) -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else repr(v)
    return repr(v) if isinstance(v, str) else str(v)
