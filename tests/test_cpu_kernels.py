"""flaxdepth.cpu_kernels: the C++ CPU convolutions and BatchNorm + activation against XLA's, their use by
conv.py and ops.py, their build and their fallback.

The kernels compute in float32 and sum in their own order, so they are compared with float64
XLA: the convolutions at 1e-5 of the largest value (float32 rounding through at most 9 x 16
products per output and a few thousand per kernel-gradient entry: ~1e-6 measured), BatchNorm +
activation's outputs and input gradient at 2e-6 (a few float32 roundings per value: 3e-7
measured).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdepth import conv, cpu_kernels, ops
from flaxdepth.options import EngineOptions

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernels are the CPU's")


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_kernel_grad(x, grad_out):
    kernel = jnp.zeros((3, 3, x.shape[-1], grad_out.shape[-1]), x.dtype)
    return jax.vjp(lambda k: xla_conv(x, k), kernel)[1](grad_out)[0]


def test_the_kernels_build_on_this_machine():
    """This project's machines have a C++ compiler: a failure to build is a bug, not a fallback."""
    assert cpu_kernels._load() is None
    assert cpu_kernels.available()


# Every channel pair of the models (forward, and the input gradients' reverse), a pair no layout
# covers (plain loops), each at three of the sizes: the models' widths and widths with partial
# pixel blocks (5, 9, 17), with batches that are not a whole number of the kernels' chunks of 8
# images; every size meets five pairs.
PAIRS = [(1, 4), (4, 1), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8), (8, 16), (16, 16), (3, 5)]
SIZES = [(28, 3), (14, 2), (7, 4), (5, 13), (9, 2), (17, 1)]
CONV_CASES = [(*pair, *SIZES[(i + j) % len(SIZES)]) for i, pair in enumerate(PAIRS) for j in (0, 2, 4)]


@pytest.mark.parametrize("channels_in, channels_out, size, batch", CONV_CASES)
def test_kernels_are_the_convolution(channels_in, channels_out, size, batch):
    rng = np.random.default_rng([channels_in, channels_out, size, batch])
    x = rng.normal(size=(batch, size, size, channels_in))
    kernel = rng.normal(size=(3, 3, channels_in, channels_out))
    grad_out = rng.normal(size=(batch, size, size, channels_out))
    got = (cpu_kernels.conv3x3(x.astype(np.float32), kernel.astype(np.float32)),
           cpu_kernels.conv3x3_kernel_grad(x.astype(np.float32), grad_out.astype(np.float32)))
    with jax.enable_x64(True):
        want = (xla_conv(x, kernel), xla_kernel_grad(x, grad_out))
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("channels_in, channels_out", [(1, 4), (4, 4), (8, 8), (16, 16)])
@pytest.mark.parametrize("size", [5, 28])
def test_a_non_finite_pixel_reaches_only_the_taps_that_see_it(channels_in, channels_out, size):
    """An inf in an image's last column: the kernel gradient's entries that are not finite are
    exactly XLA's (the kernels' lanes past a row's end must not turn 0 * inf into NaN elsewhere)."""
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, channels_in)).astype(np.float32)
    grad_out = rng.normal(size=(2, size, size, channels_out)).astype(np.float32)
    x[0, size // 2, size - 1, 0] = np.inf
    got = np.asarray(cpu_kernels.conv3x3_kernel_grad(x, grad_out))
    want = np.asarray(xla_kernel_grad(x, grad_out))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert not np.isfinite(want).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5 * float(np.abs(want[finite]).max()))


def test_an_empty_batch():
    x, kernel = np.zeros((0, 5, 5, 4), np.float32), np.ones((3, 3, 4, 4), np.float32)
    assert cpu_kernels.conv3x3(x, kernel).shape == (0, 5, 5, 4)
    np.testing.assert_array_equal(cpu_kernels.conv3x3_kernel_grad(x, np.zeros((0, 5, 5, 4), np.float32)), 0)


def reference_batch_norm_activation(x, scale, bias, activation, epsilon=1e-5):
    """XLA's BatchNorm then the activation (ops.py's separate operations), float64 under enable_x64."""
    out, mean, var = ops.batch_normalize(x, scale, bias, epsilon)
    return ops.ACTIVATIONS[activation](out), mean, var


# Channel counts with vector loops (1-32) and without (3, 5), each at two image sizes, one of them
# with floats that are not a whole number of vectors (5 x 5 x 4 = 100: a tail), and batches that
# are not whole chunks of 8 images; every size meets four channel counts.
SHAPES = [(28, 3), (14, 9), (7, 2), (5, 17)]
BATCH_NORM_CASES = [(channels, *SHAPES[(i + j) % len(SHAPES)])
                    for i, channels in enumerate([1, 2, 3, 4, 5, 8, 16, 32]) for j in (0, 2)]


@functools.partial(jax.jit, static_argnames="activation")
def reference_with_grads(x, scale, bias, cotangents, activation):
    """reference_batch_norm_activation and its gradient for `cotangents`, one program per shape."""
    want, vjp = jax.vjp(lambda *a: reference_batch_norm_activation(*a, activation), x, scale, bias)
    return want, vjp(cotangents)


@pytest.mark.parametrize("activation", list(cpu_kernels.ACTIVATIONS))
@pytest.mark.parametrize("channels, size, batch", BATCH_NORM_CASES)
def test_batch_norm_activation_is_batchnorm_then_the_activation(activation, channels, size, batch):
    """Outputs, statistics and the gradient for cotangents on all three outputs (the statistics'
    too, as the custom VJP receives them) against float64 XLA."""
    rng = np.random.default_rng([channels, size, batch])
    shape = (batch, size, size, channels)
    x = rng.normal(1.0, 2.0, size=shape)
    scale, bias = rng.normal(1.0, 0.5, size=channels), rng.normal(size=channels)
    cotangents = (rng.normal(size=shape), rng.normal(size=channels), rng.normal(size=channels))
    f32 = lambda a: np.asarray(a, np.float32)
    y, mean, var = cpu_kernels.batch_norm_activation(f32(x), f32(scale), f32(bias), 1e-5, activation)
    grads = cpu_kernels.batch_norm_activation_grad(f32(cotangents[0]), f32(x), mean, var, f32(scale), f32(bias),
                                                   f32(cotangents[1]), f32(cotangents[2]), 1e-5, activation)
    with jax.enable_x64(True):
        want, want_grads = reference_with_grads(x, scale, bias, cotangents, activation)
        want, want_grads = [np.asarray(a) for a in want], [np.asarray(a) for a in want_grads]
    for got, w in zip((y, grads[0]), (want[0], want_grads[0])):
        assert got.dtype == np.float32 and got.shape == w.shape
        np.testing.assert_allclose(got, w, rtol=0, atol=2e-6 * float(np.abs(w).max()))
    # Per-channel sums (mean, variance, scale and bias gradients) can cancel to far below their
    # terms, so their rounding is measured against the sum of the terms' magnitudes: 1e-6 of it
    # (float32 terms summed per image in float32 vectors, then in float64: up to 1e-7 measured).
    y64, mean64, var64 = want
    normalized = (x - mean64) / np.sqrt(var64 + 1e-5)
    slope = np.where(y64 > 0, 1, y64 + 1) if activation == "elu" else 1 - y64**2
    slope_times_g = cotangents[0] * slope
    axes = (0, 1, 2)
    magnitudes = (np.abs(x).mean(axes), np.square(x - mean64).mean(axes), np.abs(slope_times_g * normalized).sum(axes),
                  np.abs(slope_times_g).sum(axes))
    for got, w, magnitude in zip((mean, var, *grads[1:]), (mean64, var64, *want_grads[1:]), magnitudes):
        assert got.dtype == np.float32 and got.shape == w.shape
        np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - w), 1e-6 * magnitude + 1e-30)


@pytest.mark.parametrize("activation, exact", [("elu", lambda u: np.where(u > 0, u, np.expm1(u))), ("tanh", np.tanh)])
def test_batch_norm_activation_is_accurate_everywhere(activation, exact):
    """The activation of 2^20 inputs from -100 to 100, in the vector loops (one image of 2^20
    floats): the scale undoes the normalization, so the activation's input u spans that range
    (the C++ exp(x) - 1: a polynomial near 0, range reduction elsewhere, -1 below -88; tanh from
    it). Within 3e-7 of the exact activation of the float32 u the kernel computes, relatively.
    (The bias is 0, so that u = (x - mean) * a is one rounding of float32 operands, whether or not
    the compiler fuses the multiply and add.)"""
    x = np.linspace(-100, 100, 2**20).astype(np.float32).reshape(1, 1, -1, 4)
    std = np.full(4, x.std(), np.float32)
    y, mean, var = map(np.asarray, cpu_kernels.batch_norm_activation(x, std, np.zeros(4, np.float32), 0.0,
                                                                     activation))
    u = (x - mean) * (np.float32(1) / np.sqrt(var) * std)  # as the kernel computes it, in float32
    assert u.min() < -99 and u.max() > 99
    want = exact(u.astype(np.float64))
    relative = np.abs(y.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-30)
    assert relative.max() < 3e-7


@pytest.mark.parametrize("activation", list(cpu_kernels.ACTIVATIONS))
def test_batch_norm_activation_keeps_a_nan_in_its_channel(activation):
    """A NaN makes its channel's statistics and outputs NaN (a diverged run), not another's; an
    infinite input's channel likewise; and the activation saturates where exp underflows."""
    x = np.random.default_rng(0).normal(size=(9, 4, 4, 8)).astype(np.float32)
    x[3, 1, 2, 0], x[8, 3, 3, 5] = np.nan, -np.inf
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    y, mean, var = map(np.asarray, cpu_kernels.batch_norm_activation(x, ones, zeros, 1e-5, activation))
    assert np.isnan(y[..., 0]).all() and np.isnan(mean[0]) and np.isnan(y[..., 5]).all()
    assert np.isfinite(y[..., [1, 2, 3, 4, 6, 7]]).all() and np.isfinite(mean[[1, 2, 3, 4, 6, 7]]).all()
    grads = cpu_kernels.batch_norm_activation_grad(np.ones_like(x), x, mean, var, ones, zeros, zeros, zeros, 1e-5,
                                                   activation)
    assert np.isnan(np.asarray(grads[0])[..., 0]).all() and np.isfinite(np.asarray(grads[0])[..., 1]).all()
    # values that normalize to -1 and 1, 64 of them (whole vectors); scaled by 1000, the activation's
    # input is below -88 (exp underflows) and 1000: the activation saturates, its slope is 0 or 1
    pairs = np.tile(np.array([-1.0, 1.0], np.float32), 32).reshape(1, 1, 64, 1)
    scale, bias = np.full(1, 1e3, np.float32), np.zeros(1, np.float32)
    y, mean, var = cpu_kernels.batch_norm_activation(pairs, scale, bias, 0.0, activation)
    np.testing.assert_allclose(np.asarray(y).ravel(), np.tile([-1.0, 1e3 if activation == "elu" else 1.0], 32),
                               rtol=1e-6)
    grad_x, _, _ = cpu_kernels.batch_norm_activation_grad(np.ones_like(pairs), pairs, mean, var, scale, bias,
                                                          bias, bias, 0.0, activation)
    assert np.isfinite(np.asarray(grad_x)).all()


def test_batch_norm_activation_of_an_empty_batch_has_nan_statistics():
    """As XLA's mean over no values: 0 / 0."""
    y, mean, var = cpu_kernels.batch_norm_activation(np.zeros((0, 3, 3, 4), np.float32), np.ones(4, np.float32),
                                                     np.zeros(4, np.float32), 1e-5, "elu")
    assert y.shape == (0, 3, 3, 4) and np.isnan(mean).all() and np.isnan(var).all()


@pytest.mark.parametrize("activation", list(cpu_kernels.ACTIVATIONS))
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_normalize_activation_compiles_to_the_kernels_when_enabled(kernels, dtype, activation):
    """A float32 training step's BatchNorm + activation is one FFI call forward and one backward;
    with the kernels not allowed, or in float64, XLA's operations. Either way the values and
    gradients are ops.batch_normalize then the activation's (float32: to 2e-6 of the largest)."""
    rng = np.random.default_rng(1)
    x, scale, bias = rng.normal(size=(10, 6, 6, 4)), rng.normal(size=4), rng.normal(size=4)

    def loss(x, scale, bias, batch_norm_activation):
        y, mean, var = batch_norm_activation(x, scale, bias, activation)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean * var)  # cotangents on every output

    fused = lambda x, s, b, activation: ops.batch_normalize_activation(x, s, b, 1e-5, activation, kernels)
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(a, dtype) for a in (x, scale, bias)]
        step = jax.jit(jax.value_and_grad(lambda *a: loss(*a, fused), argnums=(0, 1, 2)))
        program = step.lower(*args).compile().as_text()
        got = step(*args)
    with jax.enable_x64(True):
        want = jax.value_and_grad(lambda *a: loss(*a, reference_batch_norm_activation), argnums=(0, 1, 2))(x, scale,
                                                                                                          bias)
    uses_kernels = kernels and dtype == "float32"
    assert program.count('custom_call_target="flaxdepth_batch_norm_activation"') == uses_kernels
    assert program.count('custom_call_target="flaxdepth_batch_norm_activation_grad"') == uses_kernels
    tolerance = 2e-6 if dtype == "float32" else 1e-12
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=tolerance * float(np.abs(w).max()))


@pytest.mark.parametrize("activation", list(cpu_kernels.ACTIVATIONS))
def test_the_fused_op_of_other_platforms_is_the_same_math(activation):
    """The XLA branch that `lax.platform_dependent` lowers for other platforms (a GPU) than the
    CPU: the same values and gradients, in float64 to rounding."""
    rng = np.random.default_rng(2)
    x, scale, bias = rng.normal(size=(4, 5, 5, 8)), rng.normal(size=8), rng.normal(size=8)
    cotangents = (rng.normal(size=x.shape), rng.normal(size=8), rng.normal(size=8))
    with jax.enable_x64(True):
        want, vjp = jax.vjp(lambda *a: reference_batch_norm_activation(*a, activation), x, scale, bias)
        y, mean, var = ops._xla_batch_normalize_activation(x, scale, bias, 1e-5, activation)
        grads = ops._xla_batch_normalize_activation_grad(x, mean, var, scale, bias, *cotangents, 1e-5, activation)
        for g, w in zip((y, mean, var, *grads), (*want, *vjp(cotangents))):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_the_fused_op_under_shard_map_sums_shared_parameters_gradients():
    """Inside shard_map, with the batch split over the mesh and BatchNorm's scale and bias shared,
    their gradients are the sum of every device's (as JAX's autodiff gives for shared inputs; the
    FFI's per-device outputs would otherwise be rejected by the custom VJP). One device here, so
    the sum is the one device's gradient, exactly."""
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    scale, bias = jnp.asarray(rng.normal(size=8), jnp.float32), jnp.asarray(rng.normal(size=8), jnp.float32)

    def loss(x, scale, bias):
        return jnp.sum(ops.batch_normalize_activation(x, scale, bias, 1e-5, "elu")[0] ** 2)

    sharded = jax.shard_map(lambda *a: jax.grad(loss, argnums=(0, 1, 2))(*a), mesh=mesh,
                            in_specs=(P("d"), P(), P()), out_specs=(P("d"), P(), P()))
    for got, want in zip(jax.jit(sharded)(x, scale, bias), jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)):
        np.testing.assert_array_equal(got, want)  # one device: the same kernels on the same values


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "xla"])
def test_conv3x3_compiles_to_the_kernels_when_enabled(kernels):
    """With the kernels, the forward, input-gradient and kernel-gradient convolutions of a float32
    training step are the FFI calls; with EngineOptions.cpu_kernels off, XLA's convolutions."""
    x, kernel = jnp.ones((16, 6, 6, 4), jnp.float32), jnp.ones((3, 3, 4, 8), jnp.float32)
    options = EngineOptions(cpu_kernels=kernels)
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k, options) ** 2), argnums=(0, 1)))
    program = step.lower(x, kernel).compile().as_text()
    if kernels:
        assert program.count('custom_call_target="flaxdepth_conv3x3"') == 2
        assert program.count('custom_call_target="flaxdepth_conv3x3_kernel_grad"') == 1
        assert "convolution(" not in program
    else:
        assert "flaxdepth_conv3x3" not in program


def test_float64_keeps_xla():
    with jax.enable_x64(True):
        x, kernel = jnp.ones((2, 5, 5, 4)), jnp.ones((3, 3, 4, 4))
        assert "flaxdepth_conv3x3" not in jax.jit(conv.conv3x3).lower(x, kernel).as_text()


def test_gpu_programs_have_no_cpu_kernel():
    """Lowered for CUDA (no GPU needed to lower), conv3x3 and its gradients are XLA's convolutions
    and BatchNorm + ELU XLA's operations: `lax.platform_dependent` keeps the FFI calls in the
    CPU's branch only."""
    x, kernel = jnp.ones((16, 6, 6, 4), jnp.float32), jnp.ones((3, 3, 4, 4), jnp.float32)
    scale, bias = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)

    def loss(x, k):
        y, _, _ = ops.batch_normalize_activation(conv.conv3x3(x, k), scale, bias, 1e-5, "elu")
        return jnp.sum(y ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    allow = [jax.export.DisabledSafetyCheck.custom_call(target) for target in cpu_kernels.TARGETS]
    cuda, cpu = (jax.export.export(step, platforms=[p], disabled_checks=allow)(x, kernel).mlir_module()
                 for p in ("cuda", "cpu"))
    assert "custom_call @flaxdepth_" not in cuda and "convolution" in cuda
    assert all(f"custom_call @{target}(" in cpu for target in cpu_kernels.TARGETS)


SAME_BITS = """
import hashlib, json, numpy as np
from flaxdepth import cpu_kernels
rng = np.random.default_rng(0)
x, g = (rng.normal(size=(40, 14, 14, c)).astype(np.float32) for c in (8, 16))
k = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
digest = lambda a: hashlib.sha256(np.asarray(a).tobytes()).hexdigest()
s, b = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
bn = cpu_kernels.batch_norm_activation(x, s, b, 1e-5, "elu")
bn_grad = cpu_kernels.batch_norm_activation_grad(x[..., ::-1].copy(), x, bn[1], bn[2], s, b, s, b, 1e-5, "tanh")
print(json.dumps({"conv": digest(cpu_kernels.conv3x3(x, k)), "kernel_grad": digest(cpu_kernels.conv3x3_kernel_grad(x, g)),
                  "batch_norm": [digest(a) for a in (*bn, *bn_grad)]}))
"""


def run_python(code: str, env: dict, cores=None) -> str:
    command = [sys.executable, "-c", code]
    if cores is not None:  # XLA sizes its intra-op thread pool by the cores it may use
        command = ["taskset", "-c", cores, *command]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(os.cpu_count() < 2 or not Path("/usr/bin/taskset").exists(), reason="needs 2 cores and taskset")
def test_same_bits_on_any_number_of_threads(env_without_device_count):
    """The kernel gradient and BatchNorm's statistics sum per image, per chunk of 8 images and over
    chunks in order, so one thread and two give the same bits (the engine's determinism across CPU
    devices needs it)."""
    env = {**env_without_device_count, "JAX_PLATFORMS": "cpu"}
    one, two = (json.loads(run_python(SAME_BITS, env, cores)) for cores in ("0", "0,1"))
    assert one == two


FALLBACK = """
import warnings, numpy as np, jax, jax.numpy as jnp
from flaxdepth import conv, cpu_kernels, ops
from flaxdepth.options import EngineOptions
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    usable = cpu_kernels.available()
x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype(np.float32)
k = np.random.default_rng(1).normal(size=(3, 3, 4, 4)).astype(np.float32)
program = jax.jit(conv.conv3x3).lower(x, k).as_text() + jax.jit(
    lambda x: ops.batch_normalize_activation(x, jnp.ones(4), jnp.zeros(4), 1e-5, "tanh")).lower(x).as_text()
error = float(np.abs(conv.conv3x3(x, k) - jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))).max())
print(usable, "flaxdepth_" in program, error < 1e-4, "|".join(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_compiler_xla_convolves_and_a_warning_says_why(tmp_path, env_without_device_count, compiler):
    """No compiler on the PATH, or one that fails to compile (it answers --version, then exits 1):
    one warning with the reason, XLA's convolution and BatchNorm, nothing half-built left in the
    cache."""
    fake = tmp_path / "fake-c++"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n'
                    'echo "fake-c++: cannot compile" >&2\nexit 1\n')
    fake.chmod(0o755)
    cxx = str(tmp_path / "no-such-compiler") if compiler == "missing" else str(fake)
    env = {**env_without_device_count, "JAX_PLATFORMS": "cpu", "CXX": cxx, "XDG_CACHE_HOME": str(tmp_path)}
    usable, uses_kernel, correct, message = run_python(FALLBACK, env).split(" ", 3)
    assert (usable, uses_kernel, correct) == ("False", "False", "True")
    assert "CPU kernels are unavailable" in message and "slower" in message
    if compiler == "failing":
        assert "cannot compile" in message
        assert (tmp_path / "flaxdepth" / "kernels").is_dir()
    assert not list(tmp_path.rglob("*.so"))


WITHOUT_AVX512 = """
import json, numpy as np, jax, jax.numpy as jnp
from flaxdepth import cpu_kernels, ops
# 8-lane vectors, as on AVX2 machines; -O1 instead of -O3: the same explicit vector code, a much shorter build
cpu_kernels.COMPILE_FLAGS = (*(f for f in cpu_kernels.COMPILE_FLAGS if f != "-O3"), "-O1", "-mno-avx512f")
jax.config.update("jax_enable_x64", True)
def xla(x, k, g):
    conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(conv, k)
    return y, vjp(g)[0]
errors = []
for ci, co in [(1, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8), (8, 16), (16, 16)]:
    for size in (28, 14, 7, 17):
        rng = np.random.default_rng(size + ci + co)
        x, k, g = rng.normal(size=(3, size, size, ci)), rng.normal(size=(3, 3, ci, co)), rng.normal(size=(3, size, size, co))
        got = (cpu_kernels.conv3x3(x.astype(np.float32), k.astype(np.float32)),
               cpu_kernels.conv3x3_kernel_grad(x.astype(np.float32), g.astype(np.float32)))
        errors += [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, xla(x, k, g))]
for c in (1, 4, 8, 16, 32):  # 8-lane periods: 8 floats, and two vectors for 16 and 32 channels
    for activation in ("elu", "tanh"):
        rng = np.random.default_rng(c)
        x, s, b, g = rng.normal(size=(3, 5, 5, c)), rng.normal(size=c), rng.normal(size=c), rng.normal(size=(3, 5, 5, c))
        def bn_act(x, s, b):
            out, mean, var = ops.batch_normalize(x, s, b, 1e-5)
            return ops.ACTIVATIONS[activation](out), mean, var
        want, vjp = jax.vjp(bn_act, x, s, b)
        f32 = lambda a: np.asarray(a, np.float32)
        y, mean, var = cpu_kernels.batch_norm_activation(f32(x), f32(s), f32(b), 1e-5, activation)
        grads = cpu_kernels.batch_norm_activation_grad(f32(g), f32(x), mean, var, f32(s), f32(b), f32(s), f32(b), 1e-5,
                                                       activation)
        errors += [float(np.abs(a - w).max() / np.abs(w).max()) for a, w in zip((y, mean, var, *grads), (*want, *vjp((g, s, b))))]
print(json.dumps({"avx512_in_flags": any("avx512" in f for f in cpu_kernels.COMPILE_FLAGS), "max_error": max(errors),
                  "library": str(cpu_kernels.library_path())}))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
def test_the_8_lane_kernels_where_avx512_is_missing(tmp_path, env_without_device_count, monkeypatch):
    """Machines without AVX-512 compile other instantiations (8-lane vectors: two per 16 channels,
    8-pixel planar blocks, smaller register blocks): built here with -mno-avx512f, in a fresh
    cache, they must compute the same convolutions and BatchNorm + ELU. The fresh cache gets one
    library, whose name (the cache key) differs from the default flags' build."""
    env = {**env_without_device_count, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path)}
    result = json.loads(run_python(WITHOUT_AVX512, env))
    assert result["avx512_in_flags"] and result["max_error"] < 1e-5
    built = list((tmp_path / "flaxdepth" / "kernels").glob("*.so"))  # beside it: its build lock
    assert [p.name for p in built] == [Path(result["library"]).name]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_kernels.library_path().parent == built[0].parent and cpu_kernels.library_path() != built[0]
