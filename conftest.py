"""Settings of a test run, for tests/ and parity_tests/ alike.

Most of the suite's time is XLA compiling. Many tests start command-line processes (sweeps, the
bench, several processes of one distributed sweep, a job array's workers) that compile programs
another process of the same run has compiled already. So a run shares one JAX persistent
compilation cache: a fresh folder, made here before JAX starts, inherited through the environment
by pytest-xdist's workers and by every subprocess, and removed at the end. Every run still
compiles each program once; nothing is kept from one run to the next. A user's own
JAX_COMPILATION_CACHE_DIR is left as it is.

The run's XLA also optimizes machine code at LLVM's level 1 instead of its default (XLA_FLAGS,
inherited the same way): the same programs (HLO), compiled in less time, with bit-identical losses
and equal run times (benchmarks/BENCHMARKS.md, "Test suite time"; LLVM does not reorder
floating-point arithmetic without fast math, which XLA's CPU backend leaves off).
"""

from __future__ import annotations

import os
import shutil
import tempfile

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
LLVM_LEVEL_FLAG = "--xla_backend_optimization_level"
_made_here = None
if CACHE_VARIABLE not in os.environ:  # the controller (or a run without xdist); workers inherit it
    _made_here = os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="flaxdepth-test-jax-cache-")
if LLVM_LEVEL_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LLVM_LEVEL_FLAG}=1".strip()


def pytest_unconfigure(config):
    if _made_here is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_made_here, ignore_errors=True)
