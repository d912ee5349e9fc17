"""The models' 3x3, pad-1 convolution (NHWC, HWIO), with a batching rule for replicated weights.

The engine trains R replicas, each with its own weights, under `jax.vmap`. Left to JAX, vmapping a
convolution over its kernel gives a grouped convolution with R groups of 4-16 channels, which
cuDNN runs far below the GPU's speed. Here the batching rule folds the replicas into the channel
axis and runs a dense convolution with a block-diagonal kernel instead: a block of B replicas
costs B times the arithmetic, but is a plain convolution of B * C channels. With one block of 32
replicas that was 2.3-3.8x faster per layer, forward and backward, than the grouped form on an
H200 (`experiments/conv_formulations.py`). The wasted arithmetic grows with B, so replicas are
folded in blocks of at most `REPLICAS_PER_BLOCK`, which become the groups of a grouped
convolution: blocks of 8 instead of 32 made the 32-replica elu_bn k=48 training step 1.14x faster
(`experiments/gpu_step_variants.sh`; BENCHMARKS.md, sixth session).

Replicas stay independent: the zero blocks are exact zeros, and a replica whose input is not
finite (a diverged run) is convolved as zeros and gets NaN outputs, because 0 * NaN = NaN would
otherwise carry its NaN into every replica of its block.

Unbatched calls (one model, or the CPU engine's replicas one after the other) are plain XLA
convolutions, except on CPUs. There, float32 convolutions and kernel gradients are flaxdepth's own
C++ kernels (`flaxdepth.cpu_kernels`: 1.1-5x faster than XLA's at the models' 4-16 channels,
experiments/cpu_conv_kernels.py); where those are off or cannot be built, XLA's, with those of at
most 4 channels folding 8 images into the channels (`_cpu_folded_conv`; batches of a multiple of
8) so that XLA hands them to YNNPACK. Gradients come from a custom VJP, because custom_vmap
functions have no reverse-mode autodiff: the input gradient is the same convolution with the
kernel flipped and its in/out axes swapped, the kernel gradient the convolution XLA's own
autodiff writes (on CPUs without the kernels with its operands transposed, which makes XLA run it
with YNNPACK: 4-12x faster inside loops). (So forward-mode autodiff, `jax.jvp`, of the models is
not available; nothing here uses it.) Under `shard_map`, a
gradient for an input or kernel shared by the devices is summed over them, as JAX's autodiff would.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from flaxdepth import cpu_kernels

# The most replicas folded into one block of the block-diagonal convolution. Read when a program
# is traced: changing it does not affect programs already compiled. On an H200, 32 replicas' step
# at elu_bn k=48: 62.6 ms with blocks of 32, 57.5 of 16, 55.1 of 8, 56.6 of 4.
REPLICAS_PER_BLOCK = 8
# On CPUs, convolutions of at most CPU_FOLD_MAX_CHANNELS channels fold CPU_FOLD_IMAGES images into
# their channels (see _cpu_folded_conv): 8 x 4 channels is over YNNPACK's 16. Read when traced.
CPU_FOLD_MAX_CHANNELS = 4
CPU_FOLD_IMAGES = 8
_YNN_MIN_CHANNELS = 16  # XLA hands YNNPACK only float32 convolutions over 16 channels wide
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    """The 3x3 pad-1 convolution, NHWC/HWIO: on CPUs flaxdepth's kernel (float32) or
    `_cpu_folded_conv` where it applies, else XLA's."""
    if groups == 1 and x.dtype == jnp.float32 and cpu_kernels.usable():
        return lax.platform_dependent(x, kernel, cpu=cpu_kernels.conv3x3, default=_plain_conv)
    channels = max(kernel.shape[2:])
    foldable = (groups == 1 and x.dtype == jnp.float32 and x.shape[0] % CPU_FOLD_IMAGES == 0
                and channels <= CPU_FOLD_MAX_CHANNELS and CPU_FOLD_IMAGES * channels > _YNN_MIN_CHANNELS)
    if not foldable:
        return _plain_conv(x, kernel, groups)
    return lax.platform_dependent(x, kernel, cpu=_cpu_folded_conv, default=_plain_conv)


def _plain_conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS,
                                    feature_group_count=groups)


def _cpu_folded_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The convolution of a few channels on CPUs: CPU_FOLD_IMAGES images at a time folded into the
    channel axis, with a block-diagonal kernel, so that XLA hands it to YNNPACK (which takes
    convolutions over 16 channels wide) instead of running its own (Eigen) convolution, slow at
    4 channels. 8x the arithmetic, yet at 28x28x4 (batch 256, this project's 2-core CPU) 16 -> 9 ms
    inside a loop, transposes included; at 14x14x8 the plain one is faster (2.7 vs 5.7 ms with 4
    images folded), hence CPU_FOLD_MAX_CHANNELS. The zero blocks add exact zeros. An input with a
    non-finite value takes the plain convolution instead: folded, 0 * inf = NaN would reach the
    other images of its fold (e.g. test images of a model that overflows on a few)."""
    return lax.cond(jnp.isfinite(x).all(), _folded_conv, _plain_conv, x, kernel)


def _folded_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    n, h, w, c_in = x.shape
    fold = CPU_FOLD_IMAGES
    folded = x.reshape(n // fold, fold, h, w, c_in).transpose(0, 2, 3, 1, 4).reshape(n // fold, h, w, fold * c_in)
    # [h, w, p * C_in + i, q * C_out + o] = kernel[h, w, i, o] where p == q, an exact zero elsewhere
    on_diagonal = jnp.eye(fold, dtype=bool)[None, None, :, None, :, None]
    block_diagonal = jnp.where(on_diagonal, kernel[:, :, None, :, None, :], 0)
    y = _plain_conv(folded, block_diagonal.reshape(3, 3, fold * c_in, -1))
    return y.reshape(n // fold, h, w, fold, -1).transpose(0, 3, 1, 2, 4).reshape(n, h, w, -1)


def _xla_kernel_grad(x: jax.Array, grad_out: jax.Array, groups: int = 1) -> jax.Array:
    """d(sum(conv(x, k) * grad_out)) / dk, written as XLA's own autodiff writes it: a convolution
    of x with grad_out as the window, contracting over the batch (roles relabelled: the images'
    N is the feature axis, C_in the batch axis; groups become batch groups). On CPUs, ungrouped,
    the same convolution in `_cpu_kernel_grad`'s layout.

    Not `jax.vjp` with respect to a placeholder kernel: under `shard_map` that placeholder would be
    the same on every device, and its cotangent would be summed over the devices."""
    if groups > 1:  # the replica rule's blocks
        return _autodiff_kernel_grad(x, grad_out, groups)
    if x.dtype == jnp.float32 and cpu_kernels.usable():
        return lax.platform_dependent(x, grad_out, cpu=cpu_kernels.conv3x3_kernel_grad,
                                      default=_autodiff_kernel_grad)
    return lax.platform_dependent(x, grad_out, cpu=_cpu_kernel_grad, default=_autodiff_kernel_grad)


def _autodiff_kernel_grad(x: jax.Array, grad_out: jax.Array, groups: int = 1) -> jax.Array:
    return lax.conv_general_dilated(x, grad_out, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("CHWN", "IHWO", "HWNC"), batch_group_count=groups)


def _cpu_kernel_grad(x: jax.Array, grad_out: jax.Array) -> jax.Array:
    """`_autodiff_kernel_grad` with its operands transposed to (C_in, H, W, N) and (H, W, N, C_out):
    the layout in which XLA's CPU backend hands the convolution to YNNPACK (it takes convolutions
    whose feature axis, here the batch, is over 16 wide). Left in autodiff's form, XLA runs it
    with its own (Eigen) convolution inside loops such as the scanned layers: 43 -> 11 ms at
    28x28x4, 29 -> 5 ms at 14x14x8, 33 -> 3 ms at 7x7x16 (batch 256, this project's 2-core CPU;
    BENCHMARKS.md, seventh session)."""
    return lax.conv_general_dilated(x.transpose(3, 1, 2, 0), grad_out.transpose(1, 2, 0, 3), (1, 1),
                                    ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS).transpose(1, 2, 0, 3)


def _blocks(replicas: int) -> tuple[int, int]:
    """(blocks, replicas per block) covering `replicas`, as even as possible; the last block may
    be padded with zero replicas."""
    blocks = math.ceil(replicas / REPLICAS_PER_BLOCK)
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


@jax.custom_batching.custom_vmap
def _conv(x, kernel):
    return _xla_conv(x, kernel)


@_conv.def_vmap
def _conv_replicas(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not kernel_batched:  # shared weights: the replicas are just more images
        return _xla_conv(x.reshape(-1, *x.shape[2:]), kernel).reshape(*x.shape[:-1], kernel.shape[-1]), True
    if not x_batched:  # shared input: the replicas' kernels side by side as output channels
        return _from_channels(_xla_conv(x, _kernels_to_channels(kernel)), axis_size), True
    blocks, block = _blocks(axis_size)
    replicas = blocks * block
    c_in, c_out = kernel.shape[-2:]
    finite = jnp.isfinite(x).all(axis=(1, 2, 3, 4))
    x = _padded(jnp.where(finite[:, None, None, None, None], x, 0), replicas)
    # group b's kernel is block-diagonal: [p * C_in + i, q * C_out + o] = kernel[b * block + q, ..., i, o]
    # where p == q, an exact zero elsewhere (jnp.where: exact copies, no product a GPU might round to TF32)
    on_diagonal = jnp.eye(block, dtype=bool)[None, None, :, None, None, :, None]
    kernel = _padded(kernel, replicas).reshape(blocks, block, 3, 3, c_in, c_out).transpose(2, 3, 4, 0, 1, 5)
    grouped = jnp.where(on_diagonal, kernel[:, :, None], 0).reshape(3, 3, block * c_in, replicas * c_out)
    y = _from_channels(_xla_conv(_to_channels(x), grouped, blocks), replicas)[:axis_size]
    return jnp.where(finite[:, None, None, None, None], y, jnp.nan), True


@jax.custom_batching.custom_vmap
def _kernel_grad(x, grad_out):
    return _xla_kernel_grad(x, grad_out)


@_kernel_grad.def_vmap
def _kernel_grad_replicas(axis_size, in_batched, x, grad_out):
    x_batched, grad_batched = in_batched
    if not (x_batched and grad_batched):  # one side shared: the replicas side by side as channels
        if x_batched:
            x, grad_out = grad_out, x  # d/dk of sum(conv(x_r, k) * g) is k's mirror of the other case
        full = _xla_kernel_grad(x, _to_channels(grad_out))  # (3, 3, C, R * C')
        full = full.reshape(3, 3, x.shape[-1], axis_size, -1).transpose(3, 0, 1, 2, 4)
        return (full if grad_batched else full[:, ::-1, ::-1].transpose(0, 1, 2, 4, 3)), True
    blocks, block = _blocks(axis_size)
    replicas = blocks * block
    c_in, c_out = x.shape[-1], grad_out.shape[-1]
    # the gradient of the whole block-diagonal kernel; its diagonal blocks are the replicas'
    # (the off-diagonal ones, mixing replicas, are dropped)
    full = _xla_kernel_grad(_to_channels(_padded(x, replicas)), _to_channels(_padded(grad_out, replicas)), blocks)
    full = full.reshape(3, 3, block, c_in, blocks, block, c_out)
    return jnp.einsum("hwpibpo->bphwio", full).reshape(replicas, 3, 3, c_in, c_out)[:axis_size], True


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
    return cpu_kernels.like_primal(grad_x, x), cpu_kernels.like_primal(_kernel_grad(x, grad_out), kernel)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
