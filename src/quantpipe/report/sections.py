"""Report sections that belong to a format or a runtime, found where they live: the core's slots.

The core (report/__init__.py, tables.py, recommend.py, query.py) knows metrics and tags only.
What only one format or runtime has (the tuned GGUF's search, `make bench`'s GGUF stage, the
calibrated groups, vLLM's pass, lm-eval's tasks) is a function in a module named
`quantpipe/quantize/<name>_report.py` or `quantpipe/evaluate/<name>_report.py`, beside its
format or runtime, registered for a slot of the report:

    @register("formats", order=20)
    def section(sel: Selection) -> list[str]: ...     # markdown parts, [] when it has nothing

The modules are found by that name (as runtimes are), so the core imports none of them. Within
a slot the sections come by `order`, then by module. A slot the core does not have raises when
the module is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

# slot -> where the core puts what its sections return
SLOTS = {
    "recommend": "scenarios after the CPU ones, before GPU serving: [(scenario, row, reason)]",
    "serving": "scenarios after GPU serving: [(scenario, row, reason)]",
    "comparison": "markdown parts after the CPU comparison's interval notes",
    "verdicts.hint": "how to get the verdicts across subjects when none was scored (one phrase)",
    "speed": "notes on CPU speed after the fine-tune table, before the speed caution",
    "cpu": "markdown parts after the speed caution, before the GPU comparison",
    "gpu.note": "sentences ending the GPU comparison's note",
    "benchmarks": "markdown parts after the deployment table, before the real-size models",
    "formats": "markdown parts after the workflow, before the provenance",
}
PACKAGES = ("quantpipe.quantize", "quantpipe.evaluate")  # where plug-in modules live


@dataclass(frozen=True)
class Section:
    slot: str
    render: Callable  # (Selection) -> list: markdown parts, sentences or scenarios
    order: int = 0

    @property
    def key(self) -> tuple:
        return self.order, self.render.__module__, self.render.__qualname__


SECTIONS: dict[tuple, Section] = {}


def register(slot: str, order: int = 0) -> Callable[[Callable], Callable]:
    """Register the decorated `(sel) -> list` for `slot` (an unknown slot raises at import)."""
    if slot not in SLOTS:
        raise TypeError(f"report slot {slot!r} is not one of {', '.join(SLOTS)}")

    def attach(render: Callable) -> Callable:
        section = Section(slot, render, order)
        SECTIONS[section.key] = section
        return render
    return attach


def _discover() -> None:
    for name in PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_report"):
                importlib.import_module(f"{name}.{module.name}")


def sections(slot: str) -> list[Section]:
    """The registered sections of `slot`, in report order."""
    _discover()
    return sorted((s for s in SECTIONS.values() if s.slot == slot), key=lambda s: s.key)


def parts(slot: str, sel) -> list:
    """What every section of `slot` returns for the selection, concatenated."""
    return [p for s in sections(slot) for p in s.render(sel)]
