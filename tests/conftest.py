"""Shared fixture of the tests: the scripts of experiments/ (not a package) loaded as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="session")
def load_experiment():
    """load_experiment("report") -> experiments/report.py as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
