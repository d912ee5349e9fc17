"""The models' 3x3, pad-1 convolution (NHWC, HWIO), with a batching rule for replicated weights.

One fast path and one plain fallback per platform:
- CPUs: float32 convolutions and kernel gradients are flaxdepth's own C++ kernels
  (`flaxdepth.cpu_kernels`), since XLA's CPU convolution is slow at the models' 4-16 channels
  (BENCHMARKS.md). With `EngineOptions.cpu_kernels` off, in float64, or where the kernels cannot
  be built: XLA's plain convolution.
- Accelerators: XLA's convolution; vmapped replicas, each with its own weights, go through the
  batching rule below.

The batching rule: left to JAX, vmapping a convolution over its kernel gives a grouped convolution
with R groups of 4-16 channels, which cuDNN runs far below the GPU's speed. Here the replicas are
folded into the channel axis and run as a dense convolution with a block-diagonal kernel instead:
a block of B replicas costs B times the arithmetic but is a plain convolution of B * C channels.
The wasted arithmetic grows with B, so replicas are folded in blocks of at most
`EngineOptions.replicas_per_block`, which become the groups of a grouped convolution (the block
size measured fastest on an H200: BENCHMARKS.md). Replicas stay independent: the zero blocks are
exact zeros, and a replica whose input is not finite (a diverged run) is convolved as zeros and
gets NaN outputs, because 0 * NaN = NaN would otherwise carry its NaN into every replica of its
block.

Gradients come from a custom VJP, because custom_vmap functions have no reverse-mode autodiff:
the input gradient is the same convolution with the kernel flipped and its in/out axes swapped,
the kernel gradient the convolution XLA's own autodiff writes. (So forward-mode autodiff,
`jax.jvp`, of the models is not available; nothing here uses it.) Under `shard_map`, a gradient
for an input or kernel shared by the devices is summed over them, as JAX's autodiff would.

Precision "tf32" (`EngineOptions.precision`) rounds both float32 operands of each of the three
convolutions (forward; input gradient: output gradient and kernel; kernel gradient: input and
output gradient) to TF32 (`round_to_tf32`) and convolves the rounded values in float32, as cuDNN
does with torch's default `torch.backends.cudnn.allow_tf32`: TF32 tensor cores take 10-bit
mantissas and accumulate in float32. (How a GPU kernel cuts a float32 mantissa to 10 bits, to
nearest or by truncation, is the kernel's choice; here: to nearest, ties to even.) The rounding is applied to the operands of whichever
convolution runs, flaxdepth's CPU kernels included: they are float32 convolutions like XLA's, so
the kernels keep their speed and compute the same function of the rounded operands (up to float32
summation order, which a GPU's TF32 kernels have their own of).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flaxdepth import cpu_kernels
from flaxdepth.options import EngineOptions

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
#: float32 keeps 23 mantissa bits, TF32 10: the low 13 are rounded off.
_TF32_DROPPED_BITS = 13


def conv3x3(x: jax.Array, kernel: jax.Array, options: EngineOptions = EngineOptions()) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, no bias: NHWC input, HWIO kernel; computed as
    `options` say (CPU kernels, replica blocks, precision of XLA's convolutions, TF32 operands)."""
    use_kernels = options.cpu_kernels and x.dtype == kernel.dtype == jnp.float32 and cpu_kernels.available()
    plan = _Plan(use_kernels, options.replicas_per_block, precision(options), options.precision == "tf32")
    return _conv3x3_function(plan)(x, kernel)


def precision(options: EngineOptions) -> lax.Precision | None:
    """The lax precision of `options.precision`: None (JAX's default, TF32 on recent GPUs), else
    HIGHEST (with "tf32" the convolutions' operands are rounded before, and the Dense head stays
    float32, as torch's CUDA matmuls by default)."""
    return None if options.precision == "default" else lax.Precision.HIGHEST


def round_to_tf32(x: jax.Array) -> jax.Array:
    """float32 `x` rounded to TF32 (float32's sign and 8-bit exponent, a 10-bit mantissa): to the
    nearest, ties to even, on the float32 bit pattern. Infinities and NaNs stay as they are; a value
    past TF32's largest rounds to infinity. Arrays of other dtypes are returned unchanged, since
    TF32 replaces float32 arithmetic only (GPUs compute float64 without it)."""
    if x.dtype != jnp.float32:
        return x
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    # adding just under half a TF32 ulp, plus one where the kept last bit is odd, carries exactly
    # the values past the halfway point and the odd ties into the kept bits
    half = jnp.uint32((1 << (_TF32_DROPPED_BITS - 1)) - 1) + ((bits >> _TF32_DROPPED_BITS) & 1)
    kept = jnp.uint32((0xFFFFFFFF >> _TF32_DROPPED_BITS) << _TF32_DROPPED_BITS)
    rounded = lax.bitcast_convert_type((bits + half) & kept, jnp.float32)
    return jnp.where(jnp.isnan(x), x, rounded)  # a NaN's payload could round to infinity


class _Plan(NamedTuple):
    """How conv3x3 computes, from the engine options."""

    use_kernels: bool  # flaxdepth's CPU kernels for ungrouped convolutions (on CPUs)
    replicas_per_block: int
    precision: lax.Precision | None  # of XLA's convolutions
    tf32: bool = False  # every convolution's operands rounded to TF32 first


@functools.cache
def _conv3x3_function(plan: _Plan):
    """conv3x3 for this plan: a custom VJP over two custom_vmap operations (the convolution and
    its kernel gradient), each with the replica batching rule."""
    conv = jax.custom_batching.custom_vmap(lambda x, kernel: _conv(x, kernel, plan))
    conv.def_vmap(functools.partial(_conv_replicas, plan))
    kernel_grad = jax.custom_batching.custom_vmap(lambda x, grad_out: _kernel_grad(x, grad_out, plan))
    kernel_grad.def_vmap(functools.partial(_kernel_grad_replicas, plan))

    @jax.custom_vjp
    def conv3x3_(x, kernel):
        return conv(x, kernel)

    def forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    def backward(residuals, grad_out):
        x, kernel = residuals
        # a pad-1 3x3 conv's input gradient: the conv of grad_out with the kernel flipped and I/O swapped
        grad_x = conv(grad_out, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
        return cpu_kernels.like_primal(grad_x, x), cpu_kernels.like_primal(kernel_grad(x, grad_out), kernel)

    conv3x3_.defvjp(forward, backward)
    return conv3x3_


def _conv(x: jax.Array, kernel: jax.Array, plan: _Plan, groups: int = 1) -> jax.Array:
    """One convolution: flaxdepth's CPU kernel where the plan says (a program lowered for another
    platform gets XLA's), else XLA's; with TF32 operands where the plan says."""
    if plan.tf32:
        x, kernel = round_to_tf32(x), round_to_tf32(kernel)
    xla = functools.partial(_xla_conv, groups=groups, precision=plan.precision)
    if plan.use_kernels and groups == 1:
        return lax.platform_dependent(x, kernel, cpu=cpu_kernels.conv3x3, default=xla)
    return xla(x, kernel)


def _xla_conv(x: jax.Array, kernel: jax.Array, groups: int = 1, precision: lax.Precision | None = None):
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS,
                                    feature_group_count=groups, precision=precision)


def _kernel_grad(x: jax.Array, grad_out: jax.Array, plan: _Plan, groups: int = 1) -> jax.Array:
    """d(sum(conv(x, k) * grad_out)) / dk, HWIO: flaxdepth's CPU kernel where the plan says, else XLA's.

    Not `jax.vjp` with respect to a placeholder kernel: under `shard_map` that placeholder would be
    the same on every device, and its cotangent would be summed over the devices."""
    if plan.tf32:
        x, grad_out = round_to_tf32(x), round_to_tf32(grad_out)
    xla = functools.partial(_xla_kernel_grad, groups=groups, precision=plan.precision)
    if plan.use_kernels and groups == 1:
        return lax.platform_dependent(x, grad_out, cpu=cpu_kernels.conv3x3_kernel_grad, default=xla)
    return xla(x, grad_out)


def _xla_kernel_grad(x: jax.Array, grad_out: jax.Array, groups: int = 1, precision: lax.Precision | None = None):
    """The kernel gradient as XLA's own autodiff writes it: a convolution of x with grad_out as the
    window, contracting over the batch (roles relabelled: the images' N is the feature axis, C_in
    the batch axis; groups become batch groups)."""
    return lax.conv_general_dilated(x, grad_out, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                    batch_group_count=groups, precision=precision)


def _blocks(replicas: int, replicas_per_block: int) -> tuple[int, int]:
    """(blocks, replicas per block) covering `replicas`, as even as possible; the last block may
    be padded with zero replicas."""
    blocks = math.ceil(replicas / replicas_per_block)
    return blocks, math.ceil(replicas / blocks)


def _padded(x: jax.Array, replicas: int) -> jax.Array:
    """x with its leading replica axis padded with zeros to `replicas`."""
    return jnp.pad(x, [(0, replicas - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _to_channels(x: jax.Array) -> jax.Array:
    """(R, N, H, W, C) -> (N, H, W, R * C), replica-major channels."""
    r, n, h, w, c = x.shape
    return x.transpose(1, 2, 3, 0, 4).reshape(n, h, w, r * c)


def _from_channels(y: jax.Array, replicas: int) -> jax.Array:
    """(N, H, W, R * C) -> (R, N, H, W, C)."""
    n, h, w, rc = y.shape
    return y.reshape(n, h, w, replicas, rc // replicas).transpose(3, 0, 1, 2, 4)


def _kernels_to_channels(kernel: jax.Array) -> jax.Array:
    """(R, 3, 3, C_in, C_out) -> (3, 3, C_in, R * C_out): one conv for a shared input."""
    r, _, _, c_in, c_out = kernel.shape
    return kernel.transpose(1, 2, 3, 0, 4).reshape(3, 3, c_in, r * c_out)


def _conv_replicas(plan, axis_size, in_batched, x, kernel):
    """The convolution's batching rule (see the module docstring)."""
    x_batched, kernel_batched = in_batched
    if not kernel_batched:  # shared weights: the replicas are just more images
        y = _conv(x.reshape(-1, *x.shape[2:]), kernel, plan)
        return y.reshape(*x.shape[:-1], kernel.shape[-1]), True
    if not x_batched:  # shared input: the replicas' kernels side by side as output channels
        return _from_channels(_conv(x, _kernels_to_channels(kernel), plan), axis_size), True
    blocks, block = _blocks(axis_size, plan.replicas_per_block)
    replicas = blocks * block
    c_in, c_out = kernel.shape[-2:]
    finite = jnp.isfinite(x).all(axis=(1, 2, 3, 4))
    x = _padded(jnp.where(finite[:, None, None, None, None], x, 0), replicas)
    # group b's kernel is block-diagonal: [p * C_in + i, q * C_out + o] = kernel[b * block + q, ..., i, o]
    # where p == q, an exact zero elsewhere (jnp.where: exact copies, no product a GPU might round to TF32)
    on_diagonal = jnp.eye(block, dtype=bool)[None, None, :, None, None, :, None]
    kernel = _padded(kernel, replicas).reshape(blocks, block, 3, 3, c_in, c_out).transpose(2, 3, 4, 0, 1, 5)
    grouped = jnp.where(on_diagonal, kernel[:, :, None], 0).reshape(3, 3, block * c_in, replicas * c_out)
    y = _from_channels(_conv(_to_channels(x), grouped, plan, blocks), replicas)[:axis_size]
    return jnp.where(finite[:, None, None, None, None], y, jnp.nan), True


def _kernel_grad_replicas(plan, axis_size, in_batched, x, grad_out):
    """The kernel gradient's batching rule: the gradient of the block-diagonal kernel, whose
    diagonal blocks are the replicas' (the off-diagonal ones, mixing replicas, are dropped)."""
    x_batched, grad_batched = in_batched
    if not (x_batched and grad_batched):  # one side shared: the replicas side by side as channels
        if x_batched:
            x, grad_out = grad_out, x  # d/dk of sum(conv(x_r, k) * g) is k's mirror of the other case
        full = _kernel_grad(x, _to_channels(grad_out), plan)  # (3, 3, C, R * C')
        full = full.reshape(3, 3, x.shape[-1], axis_size, -1).transpose(3, 0, 1, 2, 4)
        return (full if grad_batched else full[:, ::-1, ::-1].transpose(0, 1, 2, 4, 3)), True
    blocks, block = _blocks(axis_size, plan.replicas_per_block)
    replicas = blocks * block
    c_in, c_out = x.shape[-1], grad_out.shape[-1]
    full = _kernel_grad(_to_channels(_padded(x, replicas)), _to_channels(_padded(grad_out, replicas)), plan, blocks)
    full = full.reshape(3, 3, block, c_in, blocks, block, c_out)
    return jnp.einsum("hwpibpo->bphwio", full).reshape(replicas, 3, 3, c_in, c_out)[:axis_size], True
