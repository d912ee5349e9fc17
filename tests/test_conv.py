"""flaxdepth.conv: the 3x3 convolution and its replica batching rule against XLA's own convolution.

In float64 the rule's block-diagonal kernels only add exact zeros, so values and gradients must
match `lax.conv_general_dilated` (vmapped and differentiated by JAX) to rounding, 1e-12.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdepth import conv


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def value_and_grads(conv_fn, x_axis, kernel_axis):
    def loss(x, kernel, weights):
        return jnp.sum(conv_fn(x, kernel) * weights)
    return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(x_axis, kernel_axis, 0)))


# (replicas, REPLICAS_PER_BLOCK, x batched, kernel batched): one dense block; blocks of 3 as the
# groups of a grouped conv; a prime count (blocks of one replica); shared input; shared kernel.
CASES = [(3, 32, True, True), (6, 4, True, True), (5, 4, True, True), (4, 2, False, True), (4, 2, True, False)]


@pytest.mark.parametrize("replicas, per_block, x_batched, kernel_batched", CASES)
def test_replica_rule_matches_xla(monkeypatch, replicas, per_block, x_batched, kernel_batched):
    monkeypatch.setattr(conv, "REPLICAS_PER_BLOCK", per_block)
    rng = np.random.default_rng(replicas)
    with jax.enable_x64(True):
        x = rng.normal(size=(replicas, 2, 6, 6, 3))
        kernel = rng.normal(size=(replicas, 3, 3, 3, 4))
        weights = rng.normal(size=(replicas, 2, 6, 6, 4))
        x = x if x_batched else x[0]
        kernel = kernel if kernel_batched else kernel[0]
        axes = (0 if x_batched else None, 0 if kernel_batched else None)
        got = value_and_grads(conv.conv3x3, *axes)(x, kernel, weights)
        want = value_and_grads(xla_conv, *axes)(x, kernel, weights)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_replicated_kernels_fold_into_channels(monkeypatch):
    """The rule really replaces R grouped convolutions: 6 replicas in blocks of 3 give convs of
    2 groups of 3 * C channels (forward, input gradient, kernel gradient), none of 6 groups."""
    monkeypatch.setattr(conv, "REPLICAS_PER_BLOCK", 4)
    jaxpr = str(jax.make_jaxpr(value_and_grads(conv.conv3x3, 0, 0))(
        jnp.ones((6, 2, 5, 5, 3)), jnp.ones((6, 3, 3, 3, 4)), jnp.ones((6, 2, 5, 5, 4))))
    assert jaxpr.count("feature_group_count=2") == 2  # forward, input gradient
    assert jaxpr.count("batch_group_count=2") == 1  # kernel gradient
    assert "group_count=6" not in jaxpr


def test_unbatched_is_xla_conv():
    rng = np.random.default_rng(0)
    x, kernel, weights = rng.normal(size=(2, 5, 5, 4)), rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(2, 5, 5, 8))
    with jax.enable_x64(True):
        loss = lambda f: jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * weights), argnums=(0, 1))
        for g, w in zip(jax.tree.leaves(loss(conv.conv3x3)(x, kernel)), jax.tree.leaves(loss(xla_conv)(x, kernel))):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_every_benchmarked_formulation_is_the_same_convolution():
    """experiments/conv_formulations.py times other ways of writing the conv: each must compute
    it (float32 against a 'highest'-precision XLA conv; 1e-5 of the largest gradient)."""
    spec = importlib.util.spec_from_file_location(
        "conv_formulations", Path(__file__).resolve().parents[1] / "experiments" / "conv_formulations.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = list(bench.measure(replicas=2, batch=2, rounds=1, steps=1))
    assert len(rows) == 3 * (len(bench.PER_REPLICA) + 1)
    for row in rows:
        assert row["max_rel_error_vs_lax_highest"] < 1e-5, row
        assert row["ms_per_layer_fwd_bwd"] > 0
