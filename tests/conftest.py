"""Shared fixtures of the tests: the scripts of experiments/ and benchmarks/ (not packages) loaded
as modules."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = (REPO / "experiments", REPO / "benchmarks")


@pytest.fixture(scope="session")
def load_experiment():
    """load_experiment("report") -> experiments/report.py as a module (or benchmarks/NAME.py)."""
    def load(name: str):
        path = next(folder / f"{name}.py" for folder in SCRIPT_FOLDERS if (folder / f"{name}.py").is_file())
        spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def env_without_device_count() -> dict[str, str]:
    """This process's environment less a CPU device count the user may have set (XLA_FLAGS,
    $JAX_NUM_CPU_DEVICES), for a subprocess whose CPU devices flaxdepth must choose itself."""
    environment = {key: value for key, value in os.environ.items() if key != "JAX_NUM_CPU_DEVICES"}
    flags = [flag for flag in environment.pop("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    return {**environment, "XLA_FLAGS": " ".join(flags)} if flags else environment


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread while a module's tiny runs train: two torch threads beside XLA's own
    pool on a 2-core machine made them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
