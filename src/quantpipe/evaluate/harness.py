"""Task accuracy through lm-evaluation-harness, on the project's own runtimes.

    eval.lm_eval.tasks=[pydoc_cloze]                     # the shipped offline task
    eval.lm_eval.include_path=my_tasks/ eval.lm_eval.tasks=[my_task]
    eval.lm_eval.limit=100 eval.lm_eval.num_fewshot=0

lm-eval (pinned in requirements/base.txt) owns the tasks: their YAML, prompts, few-shot
sampling, metrics and standard errors. `RuntimeLM` is the model side: lm-eval's `LM` interface
(loglikelihood, loglikelihood_rolling, generate_until) over the evaluation runtimes of
quantpipe.evaluate.runtimes. Every runtime is fed the same token ids, from the merged model's
Hugging Face tokenizer, so a task scored through transformers on the FP16 folder and through
llama.cpp on its F16 GGUF differs only by the runtimes' arithmetic (make test checks they
agree). lm-eval's own GGUF route tokenises on the server and returns top-k log-probs only,
which is why its numbers for GGUF are not comparable with its HF numbers.

Task data: tasks in eval.lm_eval.include_path (and the shipped lm_eval_tasks/) are built with
that task YAML's folder as the working folder, so `dataset_path: json` with
`data_files: <file next to the YAML>` works offline from anywhere. Standard lm-eval tasks read
the Hugging Face Hub or its local datasets cache (HF_DATASETS_OFFLINE=1 on a machine with none).
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quantpipe import artifacts as art
from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).with_name("lm_eval_tasks")
KEY = "eval.lm_eval"
# lm-eval's analytic standard error of a mean metric needs no bootstrap; other aggregations
# (e.g. a corpus F1) use this many resamples (lm-eval's default, 100000, takes minutes)
BOOTSTRAP_ITERS = 1000
# a request's tokens, for the time estimate (the shipped cloze task: 25 on average)
REQUEST_TOKENS = 32
# lm-eval's version decides the prompts and metrics: a new one scores the tasks again; bump
# RECIPE when RuntimeLM or what is kept of lm-eval's results changes
LIBRARIES = ("lm_eval",)
RECIPE = 2


def settings(cfg: DictConfig) -> dict | None:
    """The eval.lm_eval settings as plain data, or None when no task is asked for. Raises
    ConfigError on a malformed setting (names are checked by `check`)."""
    le = cfg.eval.get("lm_eval")
    if le is None or not le.get("tasks"):
        return None
    tasks = OmegaConf.to_container(le.tasks) if OmegaConf.is_config(le.tasks) else le.tasks
    if isinstance(tasks, str):
        tasks = [tasks]
    if not (isinstance(tasks, list) and all(isinstance(t, str) and t for t in tasks)):
        raise ConfigError(f"{KEY}.tasks", f"{tasks!r} is not a list of task names",
                          f"write {KEY}.tasks=[pydoc_cloze] (names as `lm-eval ls tasks` "
                          "or your YAML's `task:` give them)")
    limit = le.get("limit")
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                                  and (limit >= 1 if isinstance(limit, int) else 0 < limit <= 1)):
        raise ConfigError(f"{KEY}.limit", f"{limit!r} is not a document count or a fraction",
                          "use a whole number of documents (e.g. 100), a fraction in (0, 1], "
                          "or null for every document")
    shots = le.get("num_fewshot")
    if shots is not None and not (isinstance(shots, int) and not isinstance(shots, bool)
                                  and shots >= 0):
        raise ConfigError(f"{KEY}.num_fewshot", f"{shots!r} is not a number of examples",
                          "use 0 or more, or null for each task's own setting")
    include = le.get("include_path")
    if include is not None:
        p = Path(str(include)).expanduser()
        if not p.is_dir():
            raise ConfigError(f"{KEY}.include_path", f"{include} is not a folder",
                              "point it at the folder that holds your task YAML files")
        include = str(p.resolve())
    return {"tasks": list(dict.fromkeys(tasks)), "include_path": include, "limit": limit,
            "num_fewshot": shots}


def include_paths(s: dict) -> list[str]:
    """The folders searched for task YAML: the shipped tasks, then the user's (which win)."""
    return [str(SHIPPED)] + ([s["include_path"]] if s["include_path"] else [])


def task_manager(s: dict):
    """lm-eval's TaskManager over the include paths alone when they hold every asked-for task
    (a fraction of a second), over lm-eval's ~15k standard tasks too otherwise (~9 s)."""
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=include_paths(s), include_defaults=False)
    if all(t in tm.all_tasks for t in s["tasks"]):
        return tm
    return TaskManager(include_path=include_paths(s), include_defaults=True)


def check(cfg: DictConfig) -> dict | None:
    """Before any stage: the settings, every task name, and the local data files of the
    tasks in the include paths. Returns the settings with `digest` (the task YAMLs' and data
    files' bytes, for the evaluation cache key), or None when no task is asked for."""
    s = settings(cfg)
    if s is None:
        return None
    tm = task_manager(s)
    for name in s["tasks"]:
        if name not in tm.all_tasks:
            near = [t for t in tm.all_tasks if name.lower() in t.lower()][:5]
            raise ConfigError(f"{KEY}.tasks", f"{name!r} is not a task lm-eval knows"
                              + (f" (close: {', '.join(near)})" if near else ""),
                              f"check the spelling, or set {KEY}.include_path to the folder "
                              "of its YAML file")
    files = []
    for name in s["tasks"]:
        for entry_name, yaml_path in _yaml_files(tm, name):
            files.append(yaml_path)
            files += _local_data_files(entry_name, yaml_path, tm)
    digest = art.fingerprint(*[(p.name, p.read_bytes()) for p in sorted(set(files))])
    return {**s, "digest": digest, "recipe": RECIPE}


def _yaml_files(tm, name: str) -> list[tuple[str, Path]]:
    """(task name, YAML path) of `name` and, for a group or tag, of its member tasks that have
    a YAML file in the index."""
    entry = tm.task_index[name]
    out = [(name, Path(entry.yaml_path))] if entry.yaml_path else []
    cfg = entry.cfg or {}
    members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    for m in members:
        if isinstance(m, str) and m in tm.task_index and m != name:
            out += _yaml_files(tm, m)
    for other, e in tm.task_index.items():  # a tag's members name it in their `tag:`
        if name in getattr(e, "tags", ()) and e.yaml_path:
            out.append((other, Path(e.yaml_path)))
    return out


def _local_data_files(name: str, yaml_path: Path, tm) -> list[Path]:
    """The local files a `dataset_path: json|csv|text|parquet` task reads, resolved from its
    YAML's folder; ConfigError naming the task and the file when one is missing."""
    cfg = tm.task_index[name].cfg or {}
    if cfg.get("dataset_path") not in ("json", "csv", "text", "parquet", "arrow"):
        return []
    data = (cfg.get("dataset_kwargs") or {}).get("data_files")
    names = (list(data.values()) if isinstance(data, dict) else
             data if isinstance(data, list) else [data] if data else [])
    out = []
    for f in names:
        for one in (f if isinstance(f, list) else [f]):
            p = (yaml_path.parent / str(one)).expanduser()
            if not p.is_file():
                raise ConfigError(f"{KEY}.tasks", f"task {name!r} reads {one}, which is not a "
                                  f"file next to {yaml_path.name} ({p})",
                                  "put the data file beside the task YAML, or give an "
                                  "absolute path in data_files")
            out.append(p)
    return out


def load_tasks(s: dict) -> tuple[list, object]:
    """(the lm-eval Task objects, the TaskManager), each task built (and its data loaded) with
    its YAML's folder as the working folder, so relative data_files resolve next to the YAML."""
    from lm_eval.api.task import Task
    tm = task_manager(s)
    out = []
    for name in s["tasks"]:
        entry = tm.task_index[name]
        folder = Path(entry.yaml_path).parent if entry.yaml_path else Path.cwd()
        with contextlib.chdir(folder):
            loaded = tm.load([name])
        out += [t for t in loaded["tasks"].values() if isinstance(t, Task)]
    return out, tm


def paired(var: dict, ref: dict, base: dict | None, resamples: int, seed: int) -> dict:
    """Per task and metric: the change against FP16 in points with a 95 % paired bootstrap
    interval over documents (`task_<t>_<m>_delta_pts`, `_delta_ci95_low/high`), and, given
    the base model's per-document scores, the share of the fine-tune's gain kept
    (`task_<t>_<m>_retention_pct`), only where that gain is measurable: its own paired 95 %
    interval excludes zero (a gain of one document in 168 would give ratios like 200 %)."""
    rng = np.random.default_rng(seed)
    out = {}
    for task, metrics in var.items():
        for m, v in metrics.items():
            r = (ref.get(task) or {}).get(m)
            if r is None or len(r) != len(v):
                continue
            v, r = np.asarray(v, dtype=np.float64), np.asarray(r, dtype=np.float64)
            d = 100 * (v - r)
            idx = rng.integers(0, len(d), size=(resamples, len(d)))
            boots = d[idx].mean(1)
            out[f"task_{task}_{m}_delta_pts"] = float(d.mean())
            out[f"task_{task}_{m}_delta_ci95_low"] = float(np.percentile(boots, 2.5))
            out[f"task_{task}_{m}_delta_ci95_high"] = float(np.percentile(boots, 97.5))
            b = ((base or {}).get(task) or {}).get(m)
            if b is None or len(b) != len(v):
                continue
            b = np.asarray(b, dtype=np.float64)
            gain = (r - b)[idx].mean(1)  # the fine-tune's gain on the task, same resamples
            if np.percentile(gain, 2.5) > 0 or np.percentile(gain, 97.5) < 0:
                out[f"task_{task}_{m}_retention_pct"] = float(
                    100 * (v.mean() - b.mean()) / (r.mean() - b.mean()))
    return out


def task_scores(cfg: DictConfig, model: dict, merged: dict, s: dict, ref: Path,
                bos: int | None, shape, desc: str) -> Path:
    """Path of `model`'s task scores (tasks.json: metrics and per-document values), scored
    once on the FP16 reference's runtime (eval.reference_runtime: llama.cpp over the model's
    F16 GGUF) with the merged model's tokenizer, and cached under artifacts/task-scores/.
    `model` is the merged model (the FP16 side of every paired delta) or the base model (the
    fine-tune's start, for task retention)."""
    from quantpipe import tracking
    from quantpipe.evaluate import run_job, runtimes, task_seconds, weights_size
    runtime = str(cfg.eval.reference_runtime)
    fp = art.fingerprint("task-scores", model["fingerprint"], merged["fingerprint"], s, runtime,
                         cfg.eval.n_ctx, bos, tracking.versions_of(LIBRARIES))

    def build(tmp: Path) -> dict:
        rt, float32 = runtimes.reference_runtime(runtime)
        artifact = rt.reference_artifact(cfg, model)
        log.info("%s: about %.0f min estimated for %d lm-eval requests", desc,
                 task_seconds(weights_size(artifact), rt.name, shape, cfg) / 60,
                 estimate_requests(s))
        run_job(cfg, "tasks", artifact, rt.name, tmp / "tasks.json", shape, desc, float32,
                ids=str(ref / "ids.npy"), n_windows=1, bos=bos, desc=desc,
                tokenizer=str(merged["path"]), lm_eval=s)
        return {"runtime": runtime}

    folder, _, reused = art.ensure_cached(Path(cfg.paths.artifacts), "task-scores", fp, build,
                                          {"model": model["fingerprint"]})
    log.info("%s: %s %s", desc, "reusing" if reused else "built", folder)
    return folder / "tasks.json"


def estimate_requests(s: dict | None) -> int:
    """Documents x choices a run of the tasks scores, for the preflight's time estimate: each
    local task's documents (its data files' lines, capped by the limit) times 4 choices; a
    task whose data is not local counts as 1000 requests."""
    if not s:
        return 0
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=include_paths(s), include_defaults=False)  # the local ones
    total = 0
    for name in s["tasks"]:
        entry = tm.task_index.get(name)
        files = (_local_data_files(name, Path(entry.yaml_path), tm)
                 if entry is not None and entry.yaml_path else [])
        n = sum(sum(1 for line in f.open(encoding="utf-8") if line.strip())
                for f in files) if files else 1000
        lim = s["limit"]
        if lim is not None:
            n = min(n, int(lim)) if lim >= 1 else math.ceil(n * lim)
        total += 4 * n
    return total
