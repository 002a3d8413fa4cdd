"""How the command-line entry points end: bad input is one line and exit code 2, a bug keeps
its traceback.

    if __name__ == "__main__":
        one_line_errors(main)          # main: a @hydra.main function, or any callable

    $ make pipeline +quant=int4 eval.n_ctx=0
    error: eval.n_ctx: 0 is not a whole number >= 8 -> set eval.n_ctx=<a whole number >= 8>

`HYDRA_FULL_ERROR=1` prints the full traceback of bad input too. Hydra normally catches every
exception itself, prints a shortened traceback and exits 1; with HYDRA_FULL_ERROR set it
re-raises instead, so it is set here (for this process) and the exception is judged below.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, NoReturn

from quantpipe.errors import ConfigError

EXIT_USER_ERROR = 2  # as argparse and most Unix tools: the command line was wrong
VERBOSE_ENV = "HYDRA_FULL_ERROR"
USER_VERBOSE_ENV = "QUANTPIPE_FULL_ERROR"  # what the user set, for jobs in other processes


def verbose() -> bool:
    return os.environ.get(USER_VERBOSE_ENV, os.environ.get(VERBOSE_ENV, "")) == "1"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Bad input: our ConfigError, and Hydra's refusals of a command line (unknown group option,
    malformed override, a key that does not exist)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    return ConfigError, ConfigCompositionException, MissingConfigException, OverrideParseException


def one_line(e: BaseException) -> str:
    """`key: problem -> fix` for a ConfigError; Hydra's multi-line messages on one line."""
    if isinstance(e, ConfigError):
        return str(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    if "Available options" in str(e):   # unknown option of a group: the options follow
        options = lines[2:lines.index("Config search path:")] if "Config search path:" in lines \
            else lines[2:]
        return f"{head} -> choose one of: {', '.join(options)}"
    rest = " ".join(lines[1:])
    return f"{head}" + (f" -> {rest}" if rest else "")


def one_line_errors(main: Callable[[], Any]) -> Any:
    """Run `main`; bad input prints `error: <key or file>: <problem> -> <fix>` and exits 2.
    SIGTERM unwinds the stack (temporaries deleted, runs ended FAILED), then one line, exit
    143."""
    from quantpipe.recovery import Terminated, raise_on_sigterm
    os.environ.setdefault(USER_VERBOSE_ENV, os.environ.get(VERBOSE_ENV, ""))
    os.environ[VERBOSE_ENV] = "1"  # Hydra re-raises; we decide what the user sees
    raise_on_sigterm()
    try:
        return main()
    except user_error_types() as e:
        exit_on_user_error(e)
        raise
    except Terminated:
        for h in logging.getLogger().handlers:
            h.flush()
        print("error: stopped by SIGTERM: its temporaries are deleted and its runs ended FAILED; "
              "run the same command again to resume (finished stages are reused)",
              file=sys.stderr, flush=True)
        raise


def exit_on_user_error(e: BaseException) -> None:
    """Bad input (unless HYDRA_FULL_ERROR=1): print it in one line and exit 2. SystemExit
    passes through Hydra's job runner, which catches only Exception."""
    if verbose() or not isinstance(e, user_error_types()):
        return
    for h in logging.getLogger().handlers:  # log lines first, so the error is the last line
        h.flush()
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def stop(e: BaseException) -> NoReturn:
    """End the command from inside a Hydra callback, which would turn an exception into a
    warning and go on: bad input in one line (exit 2); with HYDRA_FULL_ERROR=1, or for a bug,
    the traceback (exit 2 for bad input, 1 for a bug)."""
    exit_on_user_error(e)
    import traceback
    traceback.print_exception(e)
    raise SystemExit(EXIT_USER_ERROR if isinstance(e, user_error_types()) else 1) from e


def log_job_error(log: logging.Logger, e: BaseException) -> None:
    """A failed job of a multirun: one line for bad input, a traceback for a bug. The sweep
    goes on with the next variant (Hydra records the exception and raises it at the end)."""
    if isinstance(e, user_error_types()) and not verbose():
        log.error("error: %s", one_line(e))
    else:
        log.exception("variant failed")
