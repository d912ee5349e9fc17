"""flaxdepth: how deep can a network go and still train, in JAX/Flax, proven equal to a PyTorch
reference.

The Python API, for scripts and notebooks:

    import flaxdepth
    report = flaxdepth.run_sweep(flaxdepth.SweepConfig(variant="tanh", depths=(3, 6), limit_train=1024))
    report.to_dataframe()          # one row per run (pandas)
    report.figure()                # final error against depth (matplotlib)
    flaxdepth.load_results("experiments/results")   # every results file under a folder

The names below are imported on first use (module `__getattr__`), so `import flaxdepth.registry`
or `flaxdepth.theory` imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("flaxdepth")
except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

#: The public API: name -> the module that defines it.
_EXPORTS = {
    "run_sweep": "flaxdepth.search",
    "SweepReport": "flaxdepth.search",
    "SweepConfig": "flaxdepth.config",
    "RunConfig": "flaxdepth.config",
    "ConfigError": "flaxdepth.config",
    "EngineOptions": "flaxdepth.options",
    "Variant": "flaxdepth.registry",
    "load_variants": "flaxdepth.registry",
    "load_results": "flaxdepth.results",
    "load_dataset": "flaxdepth.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup finds it without coming here
        return value
    raise AttributeError(f"module 'flaxdepth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
