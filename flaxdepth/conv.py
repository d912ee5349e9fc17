"""The models' 3x3, pad-1 convolution (NHWC, HWIO), with a batching rule for replicated weights.

The engine trains R replicas, each with its own weights, under `jax.vmap`. Left to JAX, vmapping a
convolution over its kernel gives a grouped convolution with R groups of 4-16 channels, which
cuDNN runs far below the GPU's speed. Here the batching rule folds the replicas into the channel
axis and runs one dense convolution with a block-diagonal kernel instead: R times the arithmetic,
but 2.3-3.8x faster per layer (forward and backward) on an H200 at 32 replicas
(`experiments/conv_formulations.py`, `experiments/gpu/conv_formulations_h200.jsonl`). Past
`REPLICAS_PER_BLOCK` replicas the wasted arithmetic would dominate, so larger replica counts are
split into blocks that become the groups of a grouped convolution.

Unbatched calls (one model, or the CPU engine's replicas one after the other) are plain XLA
convolutions. Gradients come from a custom VJP (`jax.custom_batching.custom_vmap` functions are not
differentiable): the input gradient is the same convolution with the kernel flipped and its in/out
axes swapped, the kernel gradient XLA's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Replicas folded into one dense convolution; measured on an H200 at 32.
REPLICAS_PER_BLOCK = 32
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS,
                                    feature_group_count=groups)


def _xla_kernel_grad(x: jax.Array, grad_out: jax.Array, groups: int = 1) -> jax.Array:
    """d(sum(conv(x, k) * grad_out)) / dk, written as XLA's own autodiff writes it: a convolution
    of x with grad_out as the window, contracting over the batch (roles relabelled: the images'
    N is the feature axis, C_in the batch axis; groups become batch groups).

    Not `jax.vjp` with respect to a placeholder kernel: under `shard_map` that placeholder would be
    the same on every device, and its cotangent would be summed over the devices."""
    return lax.conv_general_dilated(x, grad_out, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("CHWN", "IHWO", "HWNC"), batch_group_count=groups)


def _block_size(replicas: int) -> int:
    """The largest divisor of `replicas` up to REPLICAS_PER_BLOCK."""
    return max(g for g in range(1, min(replicas, REPLICAS_PER_BLOCK) + 1) if replicas % g == 0)


def _to_channels(x: jax.Array) -> jax.Array:
    """(R, N, H, W, C) -> (N, H, W, R * C), replica-major channels."""
    r, n, h, w, c = x.shape
    return x.transpose(1, 2, 3, 0, 4).reshape(n, h, w, r * c)


def _from_channels(y: jax.Array, replicas: int) -> jax.Array:
    """(N, H, W, R * C) -> (R, N, H, W, C)."""
    n, h, w, rc = y.shape
    return y.reshape(n, h, w, replicas, rc // replicas).transpose(3, 0, 1, 2, 4)


def _batched(args, in_batched, axis_size):
    """The arguments with a leading replica axis each (unbatched ones broadcast)."""
    return [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]


@jax.custom_batching.custom_vmap
def _conv(x, kernel):
    return _xla_conv(x, kernel)


@_conv.def_vmap
def _conv_replicas(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not kernel_batched:  # shared weights: the replicas are just more images
        xs = x.reshape(-1, *x.shape[2:])
        return _xla_conv(xs, kernel).reshape(*x.shape[:-1], kernel.shape[-1]), True
    x, kernel = _batched((x, kernel), in_batched, axis_size)
    block = _block_size(axis_size)
    blocks = axis_size // block
    _, _, _, c_in, c_out = kernel.shape
    # kernel of group b (a block of replicas): block-diagonal, [j*C_in + i, j*C_out + o] = kernel[b*G + j, ..., i, o]
    grouped = jnp.einsum("pq,bqhwio->hwpibqo", jnp.eye(block, dtype=kernel.dtype),
                         kernel.reshape(blocks, block, 3, 3, c_in, c_out))
    y = _xla_conv(_to_channels(x), grouped.reshape(3, 3, block * c_in, blocks * block * c_out), blocks)
    return _from_channels(y, axis_size), True


@jax.custom_batching.custom_vmap
def _kernel_grad(x, grad_out):
    return _xla_kernel_grad(x, grad_out)


@_kernel_grad.def_vmap
def _kernel_grad_replicas(axis_size, in_batched, x, grad_out):
    x, grad_out = _batched((x, grad_out), in_batched, axis_size)
    block = _block_size(axis_size)
    blocks = axis_size // block
    c_in, c_out = x.shape[-1], grad_out.shape[-1]
    # the gradient of the whole block-diagonal kernel; its diagonal blocks are the replicas'
    full = _xla_kernel_grad(_to_channels(x), _to_channels(grad_out), blocks)
    full = full.reshape(3, 3, block, c_in, blocks, block, c_out)
    return jnp.einsum("hwpibpo->bphwio", full).reshape(axis_size, 3, 3, c_in, c_out), True


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, no bias: NHWC input, HWIO kernel."""
    return _conv(x, kernel)


def _conv3x3_fwd(x, kernel):
    return _conv(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad_out):
    x, kernel = residuals
    # a pad-1 3x3 conv's input gradient: the conv of grad_out with the kernel flipped and I/O swapped
    grad_x = _conv(grad_out, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
    return grad_x, _kernel_grad(x, grad_out)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
