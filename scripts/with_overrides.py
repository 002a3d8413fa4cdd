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

MAKE_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*=")


def overrides(raw: str) -> list[str]:
    words = [w.replace("\\ ", " ").replace("$$", "$")
             for w in re.split(r"(?<!\\) ", raw.strip()) if w]
    return [w for w in reversed(words) if not MAKE_VARIABLE.match(w)]


if __name__ == "__main__":
    cmd = sys.argv[1:] + overrides(os.environ.get("QP_MAKEOVERRIDES", ""))
    print("+", " ".join(cmd), file=sys.stderr)
    os.execvp(cmd[0], cmd)
