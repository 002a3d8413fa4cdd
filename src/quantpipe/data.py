"""Offline texts: training, calibration and evaluation splits that never overlap.

The default text is CPython's `pydoc_data.topics` (the help() topics of the Python reference,
PSF licence, ~465k characters), which ships with Python itself, so nothing is downloaded. Its 79
topics are dealt into three disjoint splits by position in sorted order: every 5th topic
(offset 0) is evaluation text, every 10th (offset 1) calibration text, the rest train the demo
adapter. A user's own text file replaces the evaluation or calibration split by config.
"""
from __future__ import annotations

from pathlib import Path

from quantpipe.artifacts import portable_path
from quantpipe.errors import ConfigError



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


def load_text(text_file: str | None, split: str, key: str) -> tuple[str, str]:
    """(text, source) from `text_file` if set, else the default split. `key` names the config
    key for error messages. The source names no folder of this host: the default text is
    `pydoc_data/topics.py#<split>` (a file of the standard library, named by its package), a
    user's file is named as the config names it."""
    if text_file is None:
        return topics_text(split), f"{portable_path(topics_file())}#{split}"
    path = Path(text_file)
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist", "point it at a UTF-8 text file, or null "
                          "for the default text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not UTF-8 text ({e})", "convert it to UTF-8") from e
    return text, str(text_file)
