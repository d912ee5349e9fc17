"""flaxdepth.conv: the 3x3 convolution and its replica batching rule against XLA's own convolution.

In float64 the rule's block-diagonal kernels only add exact zeros, so values and gradients must
match `lax.conv_general_dilated` (vmapped and differentiated by JAX) to rounding, 1e-12.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdepth import conv
from flaxdepth.options import EngineOptions


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def value_and_grads(conv_fn, x_axis, kernel_axis, weights_axis=0):
    def loss(x, kernel, weights):
        return jnp.sum(conv_fn(x, kernel) * weights)
    return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(x_axis, kernel_axis, weights_axis)))


def random_problem(replicas, channels_in=3, channels_out=4, size=6, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(replicas, batch, size, size, channels_in)),
            rng.normal(size=(replicas, 3, 3, channels_in, channels_out)),
            rng.normal(size=(replicas, batch, size, size, channels_out)))


def with_options(**options):
    """conv3x3 computed as these EngineOptions say."""
    return functools.partial(conv.conv3x3, options=EngineOptions(**options))


# (replicas, replicas_per_block, x batched, kernel batched, cotangent batched):
# one dense block; 2 blocks of 3 as the groups of a grouped conv; 5 replicas in 3 blocks of 2
# (one zero replica of padding); the real block size with 40 and 37 replicas (2 blocks, padding);
# shared input (first layer of a shared batch); shared kernel; shared cotangent.
CASES = [(3, 32, True, True, True), (6, 4, True, True, True), (5, 2, True, True, True),
         (40, 32, True, True, True), (37, 32, True, True, True), (4, 2, False, True, True),
         (4, 2, True, False, True), (4, 2, True, True, False)]


@pytest.mark.parametrize("replicas, per_block, x_batched, kernel_batched, weights_batched", CASES)
def test_replica_rule_matches_xla(replicas, per_block, x_batched, kernel_batched, weights_batched):
    small = replicas > 8  # keep the many-replica cases cheap
    x, kernel, weights = random_problem(replicas, 2 if small else 3, 2 if small else 4, 4 if small else 6,
                                        seed=replicas)
    x = x if x_batched else x[0]
    kernel = kernel if kernel_batched else kernel[0]
    weights = weights if weights_batched else weights[0]
    axes = tuple(0 if batched else None for batched in (x_batched, kernel_batched, weights_batched))
    with jax.enable_x64(True):
        got = value_and_grads(with_options(replicas_per_block=per_block), *axes)(x, kernel, weights)
        want = value_and_grads(xla_conv, *axes)(x, kernel, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_float32_rule_matches_xla():
    """float32, as the engine trains: the same sums in another order, 1e-5 of the largest value."""
    x, kernel, weights = (a.astype(np.float32) for a in random_problem(3))
    got = value_and_grads(conv.conv3x3, 0, 0)(x, kernel, weights)
    want = value_and_grads(xla_conv, 0, 0)(x, kernel, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


def test_a_diverged_replica_does_not_reach_its_block_mates():
    """In one block-diagonal conv, 0 * NaN = NaN would carry one replica's NaN into the others:
    replica 1 has a NaN input, replica 2 an infinite kernel; replicas 0 and 3 must be exact."""
    x, kernel, weights = random_problem(4)
    x[1, 0, 2, 2, 0] = np.nan
    kernel[2, 1, 1, 0, 0] = np.inf
    with jax.enable_x64(True):
        got = value_and_grads(conv.conv3x3, 0, 0)(x, kernel, weights)
        want = value_and_grads(xla_conv, 0, 0)(x, kernel, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        np.testing.assert_allclose(g[[0, 3]], w[[0, 3]], rtol=1e-12, atol=1e-12)
        for r in (1, 2):  # a diverged replica stays diverged (its outputs may all be NaN)
            assert np.isfinite(g[r]).all() == np.isfinite(w[r]).all()


def test_replicated_kernels_fold_into_channels():
    """The rule really replaces R grouped convolutions: 6 replicas in blocks of at most 4 give
    convs of 2 groups of 3 * C channels (forward, input gradient, kernel gradient), none of 6."""
    jaxpr = str(jax.make_jaxpr(value_and_grads(with_options(replicas_per_block=4), 0, 0))(
        jnp.ones((6, 2, 5, 5, 3)), jnp.ones((6, 3, 3, 3, 4)), jnp.ones((6, 2, 5, 5, 4))))
    assert jaxpr.count("feature_group_count=2") == 2  # forward, input gradient
    assert jaxpr.count("batch_group_count=2") == 1  # kernel gradient
    assert "group_count=6" not in jaxpr


# (batch, C_in, C_out): float64, so XLA's convolution on every platform
@pytest.mark.parametrize("batch, channels_in, channels_out", [(2, 4, 8), (8, 1, 4)])
def test_unbatched_is_xla_conv(batch, channels_in, channels_out):
    rng = np.random.default_rng(batch)
    x, kernel = rng.normal(size=(batch, 5, 5, channels_in)), rng.normal(size=(3, 3, channels_in, channels_out))
    weights = rng.normal(size=(batch, 5, 5, channels_out))
    with jax.enable_x64(True):
        loss = lambda f: jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * weights), argnums=(0, 1))
        for g, w in zip(jax.tree.leaves(loss(conv.conv3x3)(x, kernel)), jax.tree.leaves(loss(xla_conv)(x, kernel))):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "xla_fallback"])
def cpu_path(request):
    """conv3x3 on both CPU paths: flaxdepth's kernels, and XLA's plain convolution."""
    return with_options(cpu_kernels=request.param)


@pytest.mark.parametrize("channels_in, channels_out", [(1, 4), (4, 4), (4, 1), (4, 8)])
def test_float32_cpu_paths_match_float64(cpu_path, channels_in, channels_out):
    """conv3x3 as the CPU engine runs it (float32), against float64 XLA: the same sums in another
    order, 1e-5 of the largest value."""
    rng = np.random.default_rng(channels_in * 10 + channels_out)
    x = rng.normal(size=(32, 6, 6, channels_in))
    kernel, weights = rng.normal(size=(3, 3, channels_in, channels_out)), rng.normal(size=(x.shape[0], 6, 6, channels_out))
    loss = lambda f: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * weights), argnums=(0, 1)))
    got = loss(cpu_path)(x.astype(np.float32), kernel.astype(np.float32))
    with jax.enable_x64(True):
        want = loss(xla_conv)(x, kernel)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


def test_a_non_finite_image_stays_its_own(cpu_path):
    """A non-finite value in one image makes exactly the plain convolution's outputs NaN: no
    image's inf or NaN reaches another image."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 5, 5, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    x[0, 2, 2, 0], x[9, 0, 0, 1] = np.inf, np.nan
    got, want = np.asarray(jax.jit(cpu_path)(x, kernel)), np.asarray(xla_conv(x, kernel))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(got[1:9]).all() and np.isfinite(got[10:]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_every_benchmarked_formulation_is_the_same_convolution(load_experiment):
    """benchmarks/conv_formulations.py times other ways of writing the conv: each must compute
    it (float32 against a 'highest'-precision XLA conv; 1e-5 of the largest gradient). One small
    shape: the formulations are shape-generic, and each shape compiles every formulation anew."""
    bench = load_experiment("conv_formulations")
    rows = list(bench.measure(replicas=2, batch=2, rounds=1, steps=1, shapes=((5, 4),)))
    assert len(rows) == len(bench.PER_REPLICA) + 1
    for row in rows:
        assert row["max_rel_error_vs_lax_highest"] < 1e-5, row


SHARD_MAP_GRADIENTS = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flaxdepth import conv
from flaxdepth.options import EngineOptions
def xla_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
mesh = jax.make_mesh((2,), ("d",))
rng = np.random.default_rng(0)
errors = []
for x_spec, k_spec in ((P(), P("d")), (P("d"), P()), (P("d"), P("d"))):
    x = rng.normal(size=(4 if x_spec == P("d") else 2, 5, 5, 3)).astype(np.float32)
    k = rng.normal(size=(6 if k_spec == P("d") else 3, 3, 3, 4)).astype(np.float32)
    x, k = jax.device_put(x, NamedSharding(mesh, x_spec)), jax.device_put(k, NamedSharding(mesh, k_spec))
    def grads(f):
        per_device = lambda x, k: jax.lax.psum(jnp.sum(f(x, k.reshape(3, 3, 3, 4)) ** 2), "d")
        return jax.jit(jax.grad(jax.shard_map(per_device, mesh=mesh, in_specs=(x_spec, k_spec), out_specs=P()),
                                argnums=(0, 1)))(x, k)
    errors += [float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(grads(conv.conv3x3), grads(xla_conv))]
print(json.dumps(errors))
"""


def test_gradients_of_inputs_shared_by_shard_map_devices_are_summed():
    """Under shard_map on 2 (forced CPU) devices, an input or a kernel the devices share must get
    every device's gradient contribution, as JAX's autodiff of XLA's conv gives it; inputs and
    kernels split over the devices their own. Same sums, so 1e-6."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARD_MAP_GRADIENTS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 6 and max(errors) < 1e-6
