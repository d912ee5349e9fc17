"""flaxdepth's own CPU kernels (csrc/*.cc), called through XLA's FFI.

XLA's CPU convolutions run the models' 1-16-channel 3x3 convolutions far below the machine's
speed, and XLA's train-mode BatchNorm followed by its activation is the next largest part of a
CPU training step (benchmarks/BENCHMARKS.md). The C++ kernels compute, for float32 NHWC/HWIO
arrays on XLA's own intra-op threads: the 3x3 convolution (forward, which with the kernel flipped
is also the input gradient), its kernel gradient, and train-mode BatchNorm + ELU or tanh with its
gradient (`flaxdepth.ops.batch_normalize_activation`).

The sources are compiled on first use, once per source, jaxlib, compiler and processor, with the
C++ compiler `$CXX` (else `c++`) and `-O3 -march=native`, into one library in the user cache
(`$XDG_CACHE_HOME/flaxdepth/kernels`, else `~/.cache/...`), and registered as XLA FFI targets of
the CPU platform. Where that cannot be done (no compiler, say), one warning says why and
`flaxdepth.conv` and `flaxdepth.ops` use XLA's operations: the same results up to float32
rounding (other summation orders), slower. Whether to use the kernels at all is an engine option
(`EngineOptions.cpu_kernels`).
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

import filelock
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.cc")))  # compiled together into one library
HEADERS = tuple(sorted(SOURCE_DIR.glob("*.h")))
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> the handler symbol the library exports
TARGETS = {"flaxdepth_conv3x3": "FlaxdepthConv3x3",
           "flaxdepth_conv3x3_kernel_grad": "FlaxdepthConv3x3KernelGrad",
           "flaxdepth_batch_norm_activation": "FlaxdepthBatchNormActivation",
           "flaxdepth_batch_norm_activation_grad": "FlaxdepthBatchNormActivationGrad"}
# the activations after BatchNorm that the kernels compute -> their code in the C++ source
ACTIVATIONS = {"elu": 0, "tanh": 1}


def available() -> bool:
    """Whether conv.py and ops.py can call the kernels: JAX computes on the CPU by default, and
    they are built and registered (built here on the first call; never on an accelerator host)."""
    return jax.default_backend() == "cpu" and _load() is None


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv.conv3x3's forward convolution: NHWC float32 x, HWIO float32 kernel."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], kernel.shape[-1]), jnp.float32)
    return _call("flaxdepth_conv3x3", out, x, kernel)


def conv3x3_kernel_grad(x: jax.Array, grad_out: jax.Array) -> jax.Array:
    """d(sum(conv3x3(x, k) * grad_out)) / dk, HWIO."""
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], grad_out.shape[-1]), jnp.float32)
    return _call("flaxdepth_conv3x3_kernel_grad", out, x, grad_out)


def batch_norm_activation(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, activation: str):
    """(activation(train-mode BatchNorm(x)), batch mean, biased batch variance) over every axis but
    the last: ops.batch_normalize then ops.elu / ops.tanh, for float32 NHWC x."""
    channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    outputs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), channels, channels)
    return _call("flaxdepth_batch_norm_activation", outputs, x, scale, bias, epsilon=np.float32(epsilon),
                 activation=np.int32(ACTIVATIONS[activation]))


def batch_norm_activation_grad(grad_y, x, mean, var, scale, bias, grad_mean, grad_var, epsilon: float,
                               activation: str):
    """batch_norm_activation's gradient: (grad_x, grad_scale, grad_bias) from the output's
    cotangent, the input, the statistics and parameters, and the statistics' cotangents. The
    activation's slope is taken at its input, computed again from x: the backward pass needs no
    activation-sized array but x."""
    channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    outputs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), channels, channels)
    return _call("flaxdepth_batch_norm_activation_grad", outputs, grad_y, x, mean, var, scale, bias, grad_mean,
                 grad_var, epsilon=np.float32(epsilon), activation=np.int32(ACTIVATIONS[activation]))


def _call(target: str, outputs, *args, **attributes):
    """The FFI call, its outputs varying over the shard_map axes its inputs vary over, as XLA's
    own operations' outputs do (an FFI call's outputs are taken as varying over none)."""
    _require()
    result = jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(*args, **attributes)
    axes = tuple(sorted(frozenset().union(*map(varying_axes, args))))
    return jax.tree.map(lambda out: jax.lax.pcast(out, axes, to="varying"), result) if axes else result


def like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent summed over the shard_map axes it varies over and its primal does not: an
    input shared by the devices of a shard_map collects every device's contribution (what JAX's
    own autodiff does for the implicit broadcast of such an input). For custom VJPs (conv.py,
    ops.py), whose cotangents JAX requires to vary as their primals do."""
    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def varying_axes(x: jax.Array) -> frozenset:
    """The shard_map mesh axes x varies over (none outside shard_map). JAX 0.10 spells it
    `manual_axis_type.varying`, other versions `vma`."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


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
    """Where the compiled kernels for these sources, jaxlib, compiler and processor are cached."""
    compiler = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    sources = [f"{path.name}\0{path.read_text()}" for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*sources, jaxlib.__version__, shlex.join(_compiler()), compiler,
                                    " ".join(COMPILE_FLAGS), _processor()]).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flaxdepth" / "kernels" / f"flaxdepth_cpu-{key}.so"


def build(target: Path) -> None:
    """Compiles SOURCES into `target`, atomically: a process loading a half-written library sees
    none (callers that may race, e.g. test workers, hold `build_lock(target)` around the build)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [*_compiler(), *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_lock(target: Path) -> filelock.FileLock:
    """The lock under which `target` is built: processes that start at once (xdist workers, the
    subprocesses of a test run, the processes of a job array) build the library once, the others
    wait for it instead of compiling it again each (a build takes about half a minute of a core)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(target.with_suffix(".lock"))


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
            with build_lock(path):
                if not path.exists():  # another process built it while this one waited
                    build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, ValueError) as error:
        reason = f"{type(error).__name__}: {error}"
        warnings.warn(f"flaxdepth: its CPU kernels are unavailable ({reason}); using XLA's "
                      "convolutions and BatchNorm, which are slower on CPUs", RuntimeWarning, stacklevel=2)
        return reason
    return None
