"""flaxdepth.ops: the hand-written gradients are autodiff's, to float64 rounding (1e-12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxdepth import ops

# both sides of 0, 0 itself, tiny and very negative inputs (where elu(x) + 1 stands for exp(x))
POINTS = np.array([-40.0, -5.0, -0.7, -0.5, -1e-3, -1e-12, 0.0, 1e-12, 0.3, 2.0, 30.0])


@pytest.mark.parametrize("ours, reference", [(ops.elu, nn.elu), (ops.tanh, jnp.tanh)], ids=["elu", "tanh"])
def test_activations_values_and_slopes(ours, reference):
    with jax.enable_x64(True):
        np.testing.assert_array_equal(ours(POINTS), reference(POINTS))
        slope, want = jax.vmap(jax.grad(ours))(POINTS), jax.vmap(jax.grad(reference))(POINTS)
        np.testing.assert_allclose(slope, want, rtol=1e-12, atol=1e-15)
        # forward mode too (custom_jvp), e.g. for jax.jvp of a model
        np.testing.assert_allclose(jax.jvp(ours, (POINTS,), (np.ones_like(POINTS),))[1], want, rtol=1e-12, atol=1e-15)


def plain_batch_normalize(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean, var


@pytest.mark.parametrize("shape", [(6, 5, 5, 4), (3, 7), (2, 3, 3, 16)])
def test_batch_normalize_is_the_formula_and_its_gradient(shape):
    """Values and the VJP for cotangents on all three outputs (the statistics' too, as a loss
    reaching the running statistics would give them)."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(2.0, 3.0, size=shape)
    scale, bias = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    cotangents = (rng.normal(size=shape), rng.normal(size=shape[-1]), rng.normal(size=shape[-1]))
    with jax.enable_x64(True):
        got, got_vjp = jax.vjp(lambda *a: ops.batch_normalize(*a, 1e-5), x, scale, bias)
        want, want_vjp = jax.vjp(lambda *a: plain_batch_normalize(*a, 1e-5), x, scale, bias)
        for g, w in zip(got + got_vjp(cotangents), want + want_vjp(cotangents)):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
