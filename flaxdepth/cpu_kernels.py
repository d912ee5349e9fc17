"""flaxdepth's own CPU convolution kernels (csrc/conv3x3_cpu.cc), called through XLA's FFI.

XLA's CPU convolutions run the models' 1-16-channel 3x3 convolutions far below the machine's
speed; they were most of a CPU training step (experiments/BENCHMARKS.md). The C++ kernels
compute the same convolution (forward, which with the kernel flipped is also the input gradient,
and the kernel gradient) for float32 NHWC/HWIO arrays, on XLA's own intra-op threads.

The source is compiled on first use, once per source, jaxlib, compiler and processor, with the
C++ compiler `$CXX` (else `c++`) and `-O3 -march=native`, into the user cache
(`$XDG_CACHE_HOME/flaxdepth/kernels`, else `~/.cache/...`), and registered as XLA FFI targets of
the CPU platform. Where that cannot be done (no compiler, say), one warning says why and
`flaxdepth.conv` keeps XLA's convolutions: the same results up to float32 rounding (other
summation orders), slower. `FLAXDEPTH_CPU_KERNELS=0` turns the kernels off (read when a program is
traced, like `conv.REPLICAS_PER_BLOCK`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("csrc") / "conv3x3_cpu.cc"
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> the handler symbol csrc/conv3x3_cpu.cc exports
TARGETS = {"flaxdepth_conv3x3": "FlaxdepthConv3x3",
            "flaxdepth_conv3x3_kernel_grad": "FlaxdepthConv3x3KernelGrad"}


def enabled() -> bool:
    """Whether the kernels are wanted: not turned off by FLAXDEPTH_CPU_KERNELS=0."""
    return os.environ.get("FLAXDEPTH_CPU_KERNELS", "1").strip() != "0"


def usable() -> bool:
    """Whether conv.py should call the kernels: wanted, JAX computes on the CPU by default, and
    they are built and registered (built here on the first call)."""
    return enabled() and jax.default_backend() == "cpu" and _load() is None


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv.conv3x3's forward convolution: NHWC float32 x, HWIO float32 kernel."""
    _require()
    out = jax.ShapeDtypeStruct((*x.shape[:-1], kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("flaxdepth_conv3x3", out, vmap_method="sequential")(x, kernel)


def conv3x3_kernel_grad(x: jax.Array, grad_out: jax.Array) -> jax.Array:
    """d(sum(conv3x3(x, k) * grad_out)) / dk, HWIO."""
    _require()
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], grad_out.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("flaxdepth_conv3x3_kernel_grad", out, vmap_method="sequential")(x, grad_out)


def _require() -> None:
    if reason := _load():
        raise RuntimeError(f"flaxdepth's CPU kernels are unavailable: {reason}")


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def _processor() -> str:
    """What -march=native compiles for: the processor's model and feature flags (a cache in a
    home folder shared by several machines must not hand one machine's build to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def library_path() -> Path:
    """Where the compiled kernels for this source, jaxlib, compiler and processor are cached."""
    compiler = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, shlex.join(_compiler()), compiler,
                                    " ".join(COMPILE_FLAGS), _processor()]).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flaxdepth" / "kernels" / f"conv3x3_cpu-{key}.so"


def build(target: Path) -> None:
    """Compiles SOURCE into `target`, atomically (concurrent builds, e.g. test workers, are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [*_compiler(), *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_LOADING = threading.Lock()  # two threads tracing at once build and register once
_LOADED: list[str | None] = []  # the one outcome of _build_and_register in this process


def _load() -> str | None:
    """Builds (if not cached), loads and registers the kernels once per process; None when done,
    else why not (and a warning saying so)."""
    with _LOADING:
        if not _LOADED:
            _LOADED.append(_build_and_register())
        return _LOADED[0]


def _build_and_register() -> str | None:
    try:
        path = library_path()
        if not path.exists():
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, ValueError) as error:
        reason = f"{type(error).__name__}: {error}"
        warnings.warn(f"flaxdepth: its CPU convolution kernels are unavailable ({reason}); using XLA's "
                      "convolutions, which are slower on CPUs", RuntimeWarning, stacklevel=2)
        return reason
    return None
