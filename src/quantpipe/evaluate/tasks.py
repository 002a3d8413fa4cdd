"""The user's own Day-2 validation examples: `eval.tasks_file=examples.jsonl`, one
{"prompt": ..., "reference": ...} object a line. Each variant answers every prompt (its chat
template, greedy, at most eval.tasks_max_new_tokens tokens) and is scored with exact match and
ROUGE-L through the `evaluate` library's metric modules, loaded by path from metric_modules/
(offline: the hub's metrics would need the network, and the `evaluate` package ships none).
"""
from __future__ import annotations

import json
from pathlib import Path

from quantpipe.errors import ConfigError

MODULES = Path(__file__).parent / "metric_modules"
KEY = "eval.tasks_file"


def load_tasks(path: str | None) -> list[dict] | None:
    """The examples of a JSONL tasks file, or None without one; ConfigError on a bad file."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(KEY, f"{path} does not exist",
                          'point it at a JSONL file of {"prompt": ..., "reference": ...} lines')
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ConfigError(KEY, f"{path} line {n} is not JSON ({e})", "one object a line") from e
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str)
                and isinstance(item.get("reference"), str)):
            raise ConfigError(KEY, f"{path} line {n} lacks a string prompt or reference",
                              'write each line as {"prompt": "...", "reference": "..."}')
        tasks.append({"prompt": item["prompt"], "reference": item["reference"]})
    if not tasks:
        raise ConfigError(KEY, f"{path} holds no examples", "add at least one line")
    return tasks


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """task_exact_match_pct and task_rouge_l_pct (0-100) through the `evaluate` modules."""
    import evaluate
    em = evaluate.load(str(MODULES / "exact_match"))
    rouge = evaluate.load(str(MODULES / "rouge_l"))
    return {"task_exact_match_pct": 100 * em.compute(predictions=predictions,
                                                     references=references)["exact_match"],
            "task_rouge_l_pct": 100 * rouge.compute(predictions=predictions,
                                                    references=references)["rougeL"],
            "task_count": float(len(predictions))}


def answer_and_score(rt, tasks: list[dict], max_new_tokens: int) -> tuple[dict, list[dict]]:
    """(scores, [{prompt, reference, answer}]) for one runtime."""
    answers = [rt.chat(t["prompt"], max_new_tokens)[0] for t in tasks]
    scores = score(answers, [t["reference"] for t in tasks])
    return scores, [{**t, "answer": a} for t, a in zip(tasks, answers)]
