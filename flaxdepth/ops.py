"""The models' BatchNorm normalization (train mode) and activations, with gradients written out so
that the backward pass keeps one array of the activations' size for each.

Left to autodiff, a scanned elu_bn layer keeps five float32 and two bool arrays of its
activations' size for the backward pass (the centred input, the normalized one, exp(x), masks,
...), and on a CPU writing, zero-filling and reading those stacked arrays was a quarter of a
training step (experiments/BENCHMARKS.md, eighth session). With these, a layer keeps its input
(for the convolution's kernel gradient), the normalized activations and the activation's slope: on
this project's 2-core CPU the elu_bn k=48 step ran 1.45x faster, resnet k=102 1.60x (one process,
experiments/cpu/ops_ab_elu_bn_resnet.txt). The gradients are the same functions, so the parity
suite holds them to the same tolerances (float64: 1e-10 of torch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


def _activation(function, slope_from_output):
    """`function` whose derivative autodiff takes from its output: the slope is the one array the
    backward pass keeps (autodiff of jnp.tanh kept two more, of nn.elu three and two masks)."""
    activation = jax.custom_jvp(function)

    @activation.defjvp
    def jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        y = activation(x)
        return y, t * slope_from_output(y)
    return activation


tanh = _activation(lambda x: jnp.tanh(x), lambda y: 1 - y * y)
# ELU (alpha 1, expm1 on the negative side, as flax.linen.elu and torch's nn.ELU); its slope there,
# exp(x), is elu(x) + 1 (as torch's in-place ELU backward takes it): no second exponential
elu = _activation(lambda x: nn.elu(x), lambda y: jnp.where(y > 0, 1, y + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Train-mode BatchNorm over every axis but the last: (normalized * scale + bias, batch mean,
    biased batch variance), the variance in two passes (E[(x - mean)^2]) for precision."""
    return _batch_normalize_fwd(x, scale, bias, epsilon)[0]


def _batch_normalize_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    centred = x - mean
    var = jnp.square(centred).mean(axes)
    inv_std = jax.lax.rsqrt(var + epsilon)
    normalized = centred * inv_std
    return (normalized * scale + bias, mean, var), (normalized, inv_std, scale)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    normalized, inv_std, scale = residuals
    grad_out, grad_mean, grad_var = cotangents  # the statistics' cotangents: zero when only the running statistics use them
    axes = tuple(range(normalized.ndim - 1))
    n = normalized.size // normalized.shape[-1]
    grad_bias = grad_out.sum(axes)
    grad_scale = (grad_out * normalized).sum(axes)
    # d/dx through the batch's mean and variance, then those of the returned statistics
    grad_x = inv_std * scale * (grad_out - grad_bias / n - normalized * (grad_scale / n))
    grad_x = grad_x + grad_mean / n + normalized * (grad_var * 2 / (n * inv_std))
    return grad_x, grad_scale, grad_bias


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)
