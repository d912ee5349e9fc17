"""The models' BatchNorm normalization (train mode) and activations, with gradients written out so
that the backward pass keeps one array of the activations' size for each.

Left to autodiff, a scanned elu_bn layer keeps five float32 and two bool arrays of its
activations' size for the backward pass (the centred input, the normalized one, exp(x), masks,
...), and writing, zero-filling and reading those stacked arrays is a large part of a CPU
training step (benchmarks/BENCHMARKS.md). With these, a layer keeps its input (for the
convolution's kernel gradient), the centred activations and the activation's slope. The
gradients are the same functions, so the parity suite holds them to the same tolerances
(float64: 1e-10 of torch).

On CPUs, BatchNorm followed by its activation in float32 can be one C++ kernel forward and one
backward (`batch_normalize_activation`; flaxdepth/csrc/batchnorm_activation_cpu.cc), which keeps
only its input for the backward pass: a scanned BatchNorm layer then keeps its convolution's
input and output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from flaxdepth import cpu_kernels


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
# exp(x), is taken as elu(x) + 1 (as torch's in-place ELU backward takes it; torch_ref's nn.ELU
# computes exp(x)): no second exponential, for an absolute error of at most one rounding of 1
# (float32: 6e-8; relative to exp(x), 1e-3 at x = -10), far inside the parity tolerances
elu = _activation(lambda x: nn.elu(x), lambda y: jnp.where(y > 0, 1, y + 1))
#: The activations that train-mode BatchNorm applies itself (one CPU kernel with it).
FUSED_WITH_BATCHNORM = ("tanh", "elu")


def _softplus(x):
    # torch's Softplus (beta 1, threshold 20): linear above the threshold
    return jnp.where(x > 20, x, jnp.logaddexp(x, 0))


#: Every activation of registry.ACTIVATIONS but leaky_relu (which takes a slope), as torch computes
#: it: relu's slope at 0 is 0, gelu is erf-based, gelu_tanh the tanh approximation.
ACTIVATIONS = {
    "tanh": tanh, "elu": elu, "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False), "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "selu": jax.nn.selu, "silu": jax.nn.silu, "softplus": _softplus, "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def activation(name: str, negative_slope: float = 0.01):
    """The activation function `name` (registry.ACTIVATIONS); leaky_relu with `negative_slope`."""
    if name == "leaky_relu":
        # slope at 0 is the negative side's, as torch's leaky_relu backward takes it
        return lambda x: jnp.where(x > 0, x, negative_slope * x)
    return ACTIVATIONS[name]


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
    return (centred * inv_std * scale + bias, mean, var), (centred, inv_std, scale)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    # torch's CPU BatchNorm backward, term for term (batch_norm_cpu_backward); the normalized form
    # (saving x_hat) gave the same parity errors, this one saves the centred input instead
    centred, inv_std, scale = residuals
    grad_out, grad_mean, grad_var = cotangents  # the statistics' cotangents: zero when only the running statistics use them
    axes = tuple(range(centred.ndim - 1))
    n = centred.size // centred.shape[-1]
    grad_bias = grad_out.sum(axes)
    dot = (grad_out * centred).sum(axes)
    grad_x = (grad_out - grad_bias / n - centred * (dot * inv_std * inv_std / n)) * inv_std * scale
    # d/dx through the returned statistics: mean, and var = mean(centred^2)
    grad_x = grad_x + grad_mean / n + centred * (grad_var * 2 / n)
    return grad_x, dot * inv_std, grad_bias


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)


def batch_normalize_activation(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, activation: str,
                               cpu_kernels_allowed: bool = True):
    """(ACTIVATIONS[activation](normalized * scale + bias), batch mean, biased batch variance):
    `batch_normalize` followed by the activation. On CPUs, in float32, with `cpu_kernels_allowed`
    (`EngineOptions.cpu_kernels`), one flaxdepth kernel forward and one backward
    (`cpu_kernels.batch_norm_activation`; XLA's CPU code for the pair is slow, BENCHMARKS.md)."""
    kernel_fits = (activation in cpu_kernels.ACTIVATIONS and x.ndim == 4
                   and x.dtype == scale.dtype == bias.dtype == jnp.float32)
    if cpu_kernels_allowed and kernel_fits and cpu_kernels.available():
        return _fused_batch_normalize_activation(x, scale, bias, epsilon, activation)
    return _xla_batch_normalize_activation(x, scale, bias, epsilon, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_batch_normalize_activation(x, scale, bias, epsilon, activation):
    return _fused_fwd(x, scale, bias, epsilon, activation)[0]


def _fused_fwd(x, scale, bias, epsilon, activation):
    # the kernel on CPUs; a program lowered for another platform (jax.export, a GPU device while
    # the default is the CPU) gets the same math from XLA
    y, mean, var = lax.platform_dependent(
        x, scale, bias, cpu=lambda *a: cpu_kernels.batch_norm_activation(*a, epsilon, activation),
        default=lambda *a: _xla_batch_normalize_activation(*a, epsilon, activation))
    # only x of the activations' size: the backward pass computes the activation's input again
    return (y, mean, var), (x, mean, var, scale, bias)


def _fused_bwd(epsilon, activation, residuals, cotangents):
    (grad_y, grad_mean, grad_var) = cotangents
    grads = lax.platform_dependent(
        *residuals, grad_y, grad_mean, grad_var,
        cpu=lambda x, mean, var, scale, bias, g_y, g_mean, g_var: cpu_kernels.batch_norm_activation_grad(
            g_y, x, mean, var, scale, bias, g_mean, g_var, epsilon, activation),
        default=lambda *a: _xla_batch_normalize_activation_grad(*a, epsilon, activation))
    x, _, _, scale, bias = residuals  # under shard_map, parameters shared by the devices sum their gradients
    return tuple(cpu_kernels.like_primal(g, primal) for g, primal in zip(grads, (x, scale, bias)))


def _xla_batch_normalize_activation(x, scale, bias, epsilon, activation):
    """XLA's operations: `batch_normalize`, then the activation (its own JVP)."""
    out, mean, var = batch_normalize(x, scale, bias, epsilon)
    return ACTIVATIONS[activation](out), mean, var


# the activations' slopes at their input u, as the kernels take them (ELU: exp(u) where u <= 0, as
# torch's ELU backward; tanh: 1 - tanh(u)^2)
_SLOPES_AT_INPUT = {"elu": lambda u: jnp.where(u > 0, 1, jnp.exp(jnp.minimum(u, 0))),
                    "tanh": lambda u: 1 - jnp.square(jnp.tanh(u))}


def _xla_batch_normalize_activation_grad(x, mean, var, scale, bias, grad_y, grad_mean, grad_var, epsilon, activation):
    """_batch_normalize_bwd after the activation's slope at its input, as the kernel."""
    centred, inv_std = x - mean, lax.rsqrt(var + epsilon)
    slope = _SLOPES_AT_INPUT[activation](centred * inv_std * scale + bias)
    return _batch_normalize_bwd(epsilon, (centred, inv_std, scale), (grad_y * slope, grad_mean, grad_var))


_fused_batch_normalize_activation.defvjp(_fused_fwd, _fused_bwd)
