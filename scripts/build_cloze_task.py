"""Build the shipped offline lm-eval task `pydoc_cloze` (multiple-choice cloze).

    .venv/bin/python scripts/build_cloze_task.py [--docs 300] [--out FOLDER]

Each document is one sentence of the *evaluation* split of CPython's pydoc topics (the split
nothing in the project trains or calibrates on; quantpipe.data), cut before one of its content
words (seeded, at least MIN_CONTEXT words in). The model chooses that word among four: the true
one and three other content words of the same sentence, so every choice is on topic and only
the context tells them apart. A sentence that also occurs in the training split or the
calibration mix is left out. Chance is 25 %. The output is deterministic: the same Python
version gives the same file.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from quantpipe.data import calibration_mix, topics_text

OUT = Path(__file__).resolve().parents[1] / "src/quantpipe/evaluate/lm_eval_tasks/pydoc_cloze"
WORD = re.compile(r"[A-Za-z][a-z]{3,}")  # a plain lower-case word of 4+ letters (or capitalised)
MIN_WORDS, MAX_WORDS = 8, 40
MIN_CONTEXT = 5  # words of the sentence shown before the gap, at least


def sentences(text: str) -> list[str]:
    """Prose sentences: code, tables and reST markup left out."""
    out = []
    for para in text.split("\n\n"):
        if ">>>" in para or "|" in para or para.rstrip().endswith("::"):
            continue
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and s.endswith(".") and "=" not in s:
                out.append(s)
    return out


def seen_text() -> str:
    """The training split and the calibration mix, whitespace-normalised: a sentence found in
    them is left out (the pydoc topics repeat some boilerplate across topics)."""
    return " ".join((topics_text("train") + "\n" + calibration_mix()).split())


def build(n_docs: int, seed: int = 0) -> list[dict]:
    """One document per sentence: cut before a content word at least MIN_CONTEXT words in;
    the distractors are three other content words of the same sentence (the same topic, so
    only reading the context tells them apart)."""
    rng = random.Random(seed)
    docs, seen = [], set()
    elsewhere = seen_text()
    for s in sentences(topics_text("eval")):
        if " ".join(s.split()) in elsewhere:  # boilerplate that the other splits repeat
            continue
        words = s[:-1].split()
        content = [i for i, w in enumerate(words) if WORD.fullmatch(w)]
        targets = [i for i in content if i >= MIN_CONTEXT]
        if not targets:
            continue
        i = rng.choice(targets)
        answer = words[i]
        others = sorted({words[j] for j in content if words[j].lower() != answer.lower()})
        context = " ".join(words[:i])
        if len(others) < 3 or context in seen or f"{context} {answer}" in elsewhere:
            continue
        seen.add(context)
        choices = rng.sample(others, 3) + [answer]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(answer)})
    rng.shuffle(docs)
    return [{"id": k, **d} for k, d in enumerate(docs[:n_docs])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    docs = build(a.docs)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "pydoc_cloze.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    print(f"{len(docs)} documents -> {a.out / 'pydoc_cloze.jsonl'}")


if __name__ == "__main__":
    main()
