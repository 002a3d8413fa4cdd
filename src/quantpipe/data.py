"""Offline texts: training, calibration and evaluation splits that never overlap.

The default text is CPython's `pydoc_data.topics` (the help() topics of the Python reference,
PSF licence, ~465k characters), which ships with Python itself, so nothing is downloaded. Its 79
topics are dealt into three disjoint splits by position in sorted order: every 5th topic
(offset 0) is evaluation text, every 10th (offset 1) calibration text, the rest train the demo
adapter.

Calibration (imatrix, llm-compressor, the tuned GGUF) defaults to a *mix* of three domains,
dealt round-robin in paragraphs of ~1.5 kB so that any prefix holds all three: the calibration
topics (the demo adapter's own domain), Python source (texts/calib-python-code.txt, from the
standard library) and English prose (texts/calib-prose.txt: the Jargon File and fortune
cookies). Calibrated on the topics alone (64 x 256 tokens), GPTQ fitted that one text: +10.6 %
PPL on the eval split, +89.8 % on English prose, where NF4 lost 25.6 %.

Texts shipped in the package are named `builtin:<name>` (BUILTIN): `builtin:ood` is the
out-of-domain evaluation text (The Devil's Dictionary, 1911), which nothing in the project
trains or calibrates on. A user's own text file replaces any of them by config.
"""
from __future__ import annotations

from pathlib import Path

from quantpipe.artifacts import portable_path
from quantpipe.errors import ConfigError

TEXTS = Path(__file__).with_name("texts")
BUILTIN = {"ood": "ood-devils-dictionary.txt", "calib-code": "calib-python-code.txt",
           "calib-prose": "calib-prose.txt"}
MIX_CHUNK = 1500  # characters per paragraph run when the calibration domains are dealt out


def topics_file() -> str:
    import pydoc_data.topics
    return pydoc_data.topics.__file__


def _split_of(index: int) -> str:
    if index % 5 == 0:
        return "eval"
    if index % 10 == 1:
        return "calib"
    return "train"


def topics_text(split: str) -> str:
    """The concatenated topics of one split ('train', 'calib' or 'eval')."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    return "\n\n".join(topics[n].strip() for i, n in enumerate(names) if _split_of(i) == split)


def _paragraph_runs(text: str, size: int) -> list[str]:
    """`text` cut at paragraph breaks into runs of about `size` characters."""
    runs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])


def calibration_mix() -> str:
    """The default calibration text: the calibration topics, Python source and English prose,
    dealt round-robin in paragraph runs (a prefix of any length is balanced)."""
    domains = [topics_text("calib")] + [(TEXTS / BUILTIN[n]).read_text(encoding="utf-8")
                                        for n in ("calib-code", "calib-prose")]
    runs = [_paragraph_runs(d, MIX_CHUNK) for d in domains]
    out = [r[i] for i in range(max(map(len, runs))) for r in runs if i < len(r)]
    return "\n\n".join(out)


def load_text(text_file: str | None, split: str, key: str) -> tuple[str, str]:
    """(text, source) from `text_file` if set, else the default for the split (the calibration
    mix for 'calib'). `key` names the config key for error messages. The source names no folder
    of this host: the default texts are `pydoc_data/topics.py#<split>` (a file of the standard
    library, named by its package) or `quantpipe/texts/...`; a user's file is named as the
    config names it."""
    if text_file is None and split == "calib":
        names = "+".join(BUILTIN[n] for n in ("calib-code", "calib-prose"))
        return calibration_mix(), f"{portable_path(topics_file())}#calib+quantpipe/texts/{{{names}}}"
    if text_file is None:
        return topics_text(split), f"{portable_path(topics_file())}#{split}"
    if str(text_file).startswith("builtin:"):
        name = str(text_file).removeprefix("builtin:")
        if name not in BUILTIN:
            raise ConfigError(key, f"{text_file} is not a built-in text", "choose one of "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN) + ", or a file path")
        return (TEXTS / BUILTIN[name]).read_text(encoding="utf-8"), f"quantpipe/texts/{BUILTIN[name]}"
    path = Path(text_file)
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist", "point it at a UTF-8 text file, or null "
                          "for the default text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not UTF-8 text ({e})", "convert it to UTF-8") from e
    return text, str(text_file)
