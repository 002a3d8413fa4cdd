"""Run a command with the Hydra overrides given on make's command line appended.

    make pipeline +quant=int4 eval.n_windows=4   ->   python -m pipelines.run +quant=int4 eval.n_windows=4

GNU make files every `key=value` word of its command line as a variable in MAKEOVERRIDES, in
reverse order, with `$` doubled and spaces inside a word escaped by a backslash. The Makefile
passes that text in the environment (QP_MAKEOVERRIDES); this script restores the words, in the
order typed, drops make's own UPPER_CASE variables (VENV=, ARGS=, FILE=), and execs the command.
"""
import os
import re
import sys
from pathlib import Path

MAKE_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*=")


def overrides(raw: str) -> list[str]:
    words = [w.replace("\\ ", " ").replace("$$", "$")
             for w in re.split(r"(?<!\\) ", raw.strip()) if w]
    return [w for w in reversed(words) if not MAKE_VARIABLE.match(w)]


def make_argv(levels: int = 4) -> list[str]:
    """The command line of the make process above this one (Linux /proc), or []."""
    pid = os.getppid()
    for _ in range(levels):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, UnicodeDecodeError):
            return []
        if argv and Path(argv[0]).name in ("make", "gmake"):
            return argv
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the (comm)
    return []


def typed_overrides(raw: str) -> list[str]:
    """make keeps one value per variable: `make pipeline +quant=int4 +quant=int8` hands over
    only +quant=int8. Take the words from make's own command line then, so that the pipeline
    sees both and refuses the pair (one variant per run; the sweep runs several)."""
    given = overrides(raw)
    typed = [w for w in make_argv()[1:]
             if "=" in w and not w.startswith("-") and not MAKE_VARIABLE.match(w)]
    return typed if len(typed) > len(given) else given


if __name__ == "__main__":
    cmd = sys.argv[1:] + typed_overrides(os.environ.get("QP_MAKEOVERRIDES", ""))
    print("+", " ".join(cmd), file=sys.stderr)
    os.execvp(cmd[0], cmd)
