"""The one exception type the pipeline raises for bad input: it names what to fix.

`ConfigError("adapter.path", "/x has no adapter_config.json", "point adapter.path at a peft
folder")` prints as `adapter.path: /x has no adapter_config.json -> point adapter.path at ...`.
"""


class ConfigError(ValueError):
    """Bad input: names the config key or file at fault and what to do about it."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}" + (f" -> {fix}" if fix else ""))

    def __reduce__(self):
        """Pickle by its three parts: a SLURM or Ray job's error reaches the launcher whole
        (the default would call ConfigError(message) and fail to load there)."""
        return type(self), (self.key, self.problem, self.fix)
