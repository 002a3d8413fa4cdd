"""Config helpers: the valid choices of each config group, read from conf/."""
from __future__ import annotations

from quantpipe import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def quant_options() -> list[str]:
    return group_options("quant")
