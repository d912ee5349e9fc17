"""Flax modules for every registered variant (flaxdepth.registry). Architecture only: no training,
data or I/O.

Layout: activations are NHWC (Flax's convention). Parameters are named after the notebook's
modules (`stage{s}` for `conv_stages.{s}`, `fc` / `fc1..fc3`); `flaxdepth.interop` maps them to
and from the torch state_dict.

A stage is its first conv (C_in -> C_out, never residual) plus k // 3 - 1 same-shape layers.
Those are one `nn.scan`, so the traced program does not grow with depth: k = 300 compiles
about as fast as k = 30. Their parameters carry a leading layer axis. BatchNorm's train-mode
normalization and the activations are `flaxdepth.ops`'s, whose hand-written gradients keep less for
the backward pass than autodiff. How the layers compute (CPU kernels, rematerialization, replica
blocks) is the model's `EngineOptions`, which changes no parameter and no number beyond rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

from flaxdepth import conv, ops, registry
from flaxdepth.options import AUTO, EngineOptions

# With EngineOptions.rematerialize "layers", the backward pass keeps of each scanned layer only its
# input and its convolution's output (named "conv_output" below), and recomputes BatchNorm and the
# activation from them (jax.checkpoint); with "none", the layer keeps its input, the activation's
# slope and, with BatchNorm, the centred activations (flaxdepth/ops.py), or on CPUs with BatchNorm
# (one C++ kernel with the activation) its input and its convolution's output, as "layers" would.
# With "nested" (NestedLayers) only every block's input is kept, and each block's layers keep what
# "none" keeps while the backward pass recomputes that block.
SAVED_BY_LAYERS = jax.checkpoint_policies.save_only_these_names("conv_output")
#: The scanned layers' variables (and diagnose's collections) carry a leading layer axis.
LAYER_AXES = {"params": 0, "batch_stats": 0, "intermediates": 0, "perturbations": 0}


def nested_blocks(layers: int) -> tuple[int, int]:
    """(block size, number of blocks) of `layers` scanned layers under EngineOptions.rematerialize
    "nested": about sqrt(layers) blocks of about sqrt(layers) layers, so that the saved block
    inputs and one recomputed block each hold about sqrt(layers) activations. The blocks may hold
    up to blocks - 1 layers more than there are: padding layers that pass their input through."""
    if layers < 1:
        return 1, 0
    blocks = -(-layers // (math.isqrt(layers - 1) + 1))
    return -(-layers // blocks), blocks


#: Activation-sized arrays alive in each stage besides the saved ones (the layer in flight's
#: input, output, gradients and BatchNorm's working values), counted generously.
WORKING_ARRAYS = 8
#: Copies of the parameters in a training step: the parameters, their gradients, the momentum
#: and the updated parameters.
PARAMETER_COPIES = 4
#: The share of the available memory a step's estimate may take: the estimate leaves out XLA's
#: temporary buffers, the dataset and the allocator's slack.
MEMORY_FRACTION = 0.5


def step_memory_bytes(spec: registry.Variant, depth: int, batch_size: int, dtype_bytes: int,
                      rematerialize: str) -> int:
    """An estimate of the memory one model's training step needs beyond its data: per stage, the
    activation-sized arrays the backward pass keeps of the scanned layers under `rematerialize`
    (the comment above SAVED_BY_LAYERS; "none" counted as it is without the CPU kernels, one array
    more with BatchNorm) and WORKING_ARRAYS, plus PARAMETER_COPIES of the parameters."""
    scanned = registry.layers_per_stage(depth) - 1
    saved = 2 + spec.batchnorm
    if rematerialize == "nested":
        size, blocks = nested_blocks(scanned)
        arrays = blocks + saved * size  # the block inputs, and one block's layers while it is recomputed
    else:
        arrays = scanned * (2 if rematerialize == "layers" else saved)
    total = 0
    for stage in range(registry.NUM_STAGES):
        _, channels = registry.stage_channels(stage, spec.channels)
        side = 28 // 2**stage
        total += (arrays + WORKING_ARRAYS) * batch_size * side * side * channels * dtype_bytes
        total += PARAMETER_COPIES * (scanned + 1) * (9 * channels * channels + 6 * channels) * dtype_bytes
    return total


def choose_rematerialization(spec: registry.Variant, depth: int, batch_size: int, dtype_bytes: int,
                             available_bytes: int | None, concurrent: int = 1) -> str:
    """The first of "none", "layers", "nested" (fastest first) whose `step_memory_bytes`, times the
    `concurrent` steps that share the memory, fits in MEMORY_FRACTION of `available_bytes`; when
    none fits, the one that needs the least; "none" when the available memory is unknown."""
    if available_bytes is None:
        return "none"
    modes = ("none", "layers", "nested")
    need = {mode: concurrent * step_memory_bytes(spec, depth, batch_size, dtype_bytes, mode) for mode in modes}
    return next((mode for mode in modes if need[mode] <= MEMORY_FRACTION * available_bytes),
                min(modes, key=need.get))


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default for weight and bias.

    Flax's Dense default (lecun_normal weight, zero bias) has about three times the variance,
    which moves the trainability boundary.
    """
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchBatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics, which flax.linen.BatchNorm does not have, followed by
    `activation` (BatchNorm2d then nn.ELU / nn.Tanh: one fused operation on CPUs, ops.py).

    Train mode normalizes with the batch's biased variance but stores the *unbiased* one
    (n / (n - 1), n = N * H * W) in the running variance, with torch's momentum convention
    (new = (1 - momentum) * old + momentum * batch). Eval mode uses the running statistics.
    The variance is computed in two passes (E[(x - mean)^2]) for precision.
    `num_batches_tracked` is kept so that a torch state_dict round-trips exactly.
    """

    activation: str
    cpu_kernels: bool = True  # EngineOptions.cpu_kernels: BatchNorm + activation as one CPU kernel
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        batches_tracked = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        if not train:
            normalized = (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias
            return ops.ACTIVATIONS[self.activation](normalized)
        out, mean, var = ops.batch_normalize_activation(x, scale, bias, self.epsilon, self.activation,
                                                        self.cpu_kernels)
        if not self.is_initializing():
            n = x.size // features
            m = self.momentum
            running_mean.value = (1 - m) * running_mean.value + m * mean
            running_var.value = (1 - m) * running_var.value + m * var * (n / (n - 1))
            batches_tracked.value = batches_tracked.value + 1
        return out


def conv_kernel_init(spec: registry.Variant, channels_in: int, channels_out: int, fan: str | None = None):
    """The initializer of a conv kernel (HWIO) of `spec`: N(0, std) for the Gaussian inits, or an
    orthogonal matrix (of the flattened 9 * C_in x C_out kernel, or at the centre tap for
    delta_orthogonal, zeros at the other taps) times `init_gain`."""
    if spec.init == "orthogonal":
        return nn.initializers.orthogonal(scale=spec.init_gain, column_axis=-1)
    if spec.init == "delta_orthogonal":
        if channels_in > channels_out:  # registry.validate rules this out for the built networks
            raise ValueError(f"delta_orthogonal needs C_in <= C_out, got {channels_in} -> {channels_out}")
        return nn.initializers.delta_orthogonal(scale=spec.init_gain, column_axis=-1)
    return nn.initializers.normal(stddev=registry.conv_init_std(spec, channels_in, channels_out, fan))


class Conv3x3(nn.Module):
    """The notebook's Conv2d(C_in, C_out, 3, 1, 1): kernel (HWIO) from `kernel_init`, bias zero or
    N(0, bias_std).

    nn.Conv's parameters (`kernel`, `bias`), computed by `conv.conv3x3`, whose batching rule makes
    vmapped replicas fast on GPUs (see flaxdepth/conv.py)."""

    features: int
    kernel_init: Callable
    bias_std: float = 0.0
    options: EngineOptions = EngineOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 parameters, as nn.Conv's param_dtype, also under jax_enable_x64 (init_variables casts)
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias_init = nn.initializers.normal(stddev=self.bias_std) if self.bias_std > 0 else nn.initializers.zeros
        bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias)
        return conv.conv3x3(x, kernel, self.options) + bias


class TorchGroupNorm(nn.Module):
    """GroupNorm(groups, C) with torch's semantics: per sample and group of C / groups channels,
    normalized with the biased variance (two passes), eps 1e-5, then a per-channel affine."""

    groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        grouped = x.reshape(*x.shape[:-1], self.groups, features // self.groups)
        axes = (1, 2, 4)  # H, W and the channels of a group
        centred = grouped - grouped.mean(axes, keepdims=True)
        normalized = centred * jax.lax.rsqrt(jnp.square(centred).mean(axes, keepdims=True) + self.epsilon)
        return normalized.reshape(x.shape) * scale + bias


class ConvLayer(nn.Module):
    """conv 3x3 (pad 1) -> [norm] -> activation [-> skip]; (carry, active) form for nn.scan,
    where `active` False (a padding layer of NestedLayers) returns the input unchanged.

    `skip` is the spec's residual form where the layer keeps its shape ("none" for a stage's first).

    For flaxdepth.measure, applied with `mutable=["intermediates"]` the layer sows its
    `pre_activation` (the conv output after the norm), `activation`, `output`, and where they
    exist `batchnorm_input` (the conv output) and `residual_branch` (what the skip adds to x); a
    `perturbations` collection holding an `output` array is added to the output, so that its
    gradient is the output's. Without those collections the layer computes as it always does.
    """

    spec: registry.Variant
    features: int
    kernel_init: Callable
    skip: str
    train: bool
    options: EngineOptions = EngineOptions()

    @nn.compact
    def __call__(self, x: jax.Array, active: jax.Array | None = None):
        s = self.spec
        # The fused BatchNorm + activation never forms the activation's input; to record it, the
        # two run as separate operations (the same values up to float32 rounding).
        recording = self.is_mutable_collection("intermediates")
        y = checkpoint_name(Conv3x3(self.features, self.kernel_init, s.bias_std, self.options, name="conv")(x),
                            "conv_output")
        activation = ops.activation(s.activation, s.negative_slope)
        if s.norm == "batch":
            self.sow("intermediates", "batchnorm_input", y)
            # tanh and ELU run with BatchNorm as one operation (a CPU kernel); the others after it
            fused = s.activation in ops.FUSED_WITH_BATCHNORM and not recording
            y = TorchBatchNorm(s.activation if fused else "identity", self.options.cpu_kernels, name="bn")(
                y, self.train)
            if not fused:
                self.sow("intermediates", "pre_activation", y)
                y = activation(y)
        else:
            if s.norm == "group":
                y = TorchGroupNorm(s.norm_groups, name="gn")(y)
            self.sow("intermediates", "pre_activation", y)
            y = activation(y)
        self.sow("intermediates", "activation", y)
        if self.skip == "gated":
            gate = self.param("gate", nn.initializers.constant(s.residual_gate_init), (), jnp.float32)
            branch = promote_dtype(gate, y)[0] * y
            self.sow("intermediates", "residual_branch", branch)
            y = x + branch
        elif self.skip == "identity":
            self.sow("intermediates", "residual_branch", y)
            y = y + x
        self.sow("intermediates", "output", y)
        if self.has_variable("perturbations", "output"):
            y = y + self.get_variable("perturbations", "output")
        if active is not None:
            y = jnp.where(active, y, x)
        return y, None


def _scan(target, length: int):
    """`target` (a ConvLayer form) scanned `length` times, each layer its own variables;
    intermediates and perturbations (flaxdepth.measure) stacked per layer like the weights."""
    return nn.scan(target, variable_axes=LAYER_AXES, split_rngs={"params": True}, length=length)


class NestedLayers(nn.Module):
    """`length` same-shape ConvLayers as EngineOptions.rematerialize "nested" computes them: a scan
    over blocks (`nested_blocks`) whose backward pass keeps only each block's input and recomputes
    the block's layers (jax.checkpoint of the inner scan). Variables (blocks, block size, ...); the
    last block's layers past `length` are inactive padding. One program at every depth: a scan of
    the remaining layers beside the blocks would add a layer's compile time to some depths only."""

    length: int
    spec: registry.Variant
    features: int
    kernel_init: Callable
    skip: str
    train: bool
    options: EngineOptions = EngineOptions()

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        size, blocks = nested_blocks(self.length)
        fields = dict(spec=self.spec, features=self.features, kernel_init=self.kernel_init, skip=self.skip,
                      train=self.train, options=self.options)
        active = jnp.asarray(np.arange(blocks * size).reshape(blocks, size) < self.length)
        # prevent_cse=False: the outer scan already keeps XLA from merging the recomputation with the
        # forward pass (jax.checkpoint's documentation), and the guards would cost time
        block = nn.remat(_scan(ConvLayer, size), prevent_cse=False)
        x, _ = _scan(block, blocks)(**fields, name="blocks")(x, active)
        return x, None


def _block_views(layers: int):
    """(view, unview) between a flat scan's variables, a leading axis of `layers`, and
    NestedLayers': every collection padded with zeros to blocks x size layers (a zero kernel, bias,
    norm and gate: finite values whose gradient is exactly zero) and reshaped to (blocks, size,
    ...) under `blocks`; unview is the inverse, dropping the padding (for updated BatchNorm
    statistics and sown intermediates)."""
    size, blocks = nested_blocks(layers)

    def view_one(tree):
        if not tree:  # a collection this call neither reads nor has written yet
            return tree
        def blocked(a):
            padded = jnp.concatenate([a, jnp.zeros((blocks * size - layers, *a.shape[1:]), a.dtype)])
            return padded.reshape(blocks, size, *a.shape[1:])
        return {"blocks": jax.tree.map(blocked, tree)}

    def unview_one(tree):
        if not tree:
            return tree
        return jax.tree.map(lambda a: a.reshape(blocks * size, *a.shape[2:])[:layers], tree["blocks"])

    return (lambda collections: {name: view_one(tree) for name, tree in collections.items()},
            lambda collections: {name: unview_one(tree) for name, tree in collections.items()})


class Stage(nn.Module):
    """One stage: the channel-changing first layer, the scanned same-shape layers, 2x2 avg pool."""

    variant: registry.Variant
    stage: int
    num_layers: int
    fan: str | None
    train: bool
    options: EngineOptions = EngineOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.variant
        channels_in, channels_out = registry.stage_channels(self.stage, v.channels)

        def layer(c_in, skip, **kwargs):
            return dict(spec=v, features=channels_out, kernel_init=conv_kernel_init(v, c_in, channels_out, self.fan),
                        skip=skip, train=self.train, options=self.options, **kwargs)

        x, _ = ConvLayer(**layer(channels_in, skip="none", name="first"))(x)
        scanned_layers = self.num_layers - 1
        if scanned_layers and self.options.rematerialize == "nested" and not self.is_initializing():
            # Initialized by the flat scan below, so that the parameters are the same with or without
            # nesting; applied as blocks of that scan's variables (`_block_views`).
            nested = nn.map_variables(NestedLayers, True, *_block_views(scanned_layers), mutable=True)
            x, _ = nested(scanned_layers, **layer(channels_out, skip=v.residual, name="layers"))(x, None)
        elif scanned_layers:
            target = ConvLayer
            if self.options.rematerialize == "layers":
                target = nn.remat(ConvLayer, policy=SAVED_BY_LAYERS, prevent_cse=False)
            x, _ = _scan(target, scanned_layers)(**layer(channels_out, skip=v.residual, name="layers"))(x, None)
        # torch's AvgPool2d(2, 2) floors 7x7 to 3x3; Flax needs the stride and VALID spelled out.
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def flatten_like_torch(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in torch's NCHW order, so `fc` weights are torch's, transposed."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


class DepthCNN(nn.Module):
    """Every variant: 3 stages of k // 3 conv layers (the notebook's 4, 8, 16 channels) and a Linear
    head; with heads="every_stage" (elu_multihead) a head after every stage, three logit arrays.

    `fan` (None: the spec's `init_fan`) overrides the fan of Gaussian inits: "out" (the notebook's
    choice) or "in"; `options` say how the engine computes (flaxdepth.options).
    """

    variant: registry.Variant
    depth: int
    fan: str | None = None
    options: EngineOptions = EngineOptions()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        layers = registry.layers_per_stage(self.depth)
        x = images
        logits = []
        for stage in range(registry.NUM_STAGES):
            x = Stage(self.variant, stage, layers, self.fan, train, self.options, name=f"stage{stage}")(x)
            last = stage == registry.NUM_STAGES - 1
            if self.variant.multihead or last:
                features = flatten_like_torch(x)
                init = torch_linear_init(features.shape[-1])
                name = f"fc{stage + 1}" if self.variant.multihead else "fc"
                logits.append(
                    nn.Dense(registry.NUM_CLASSES, kernel_init=init, bias_init=init,
                             precision=conv.precision(self.options), name=name)(features)
                )
        return tuple(logits) if self.variant.multihead else logits[0]


def build_model(variant: str | registry.Variant, depth: int, fan: str | None = None,
                options: EngineOptions = EngineOptions()) -> DepthCNN:
    """The Flax model of a registered variant (name or spec) at depth k (validated), computed as
    `options` say."""
    spec = registry.resolve(variant)
    registry.check_depth(depth)
    if options.rematerialize == AUTO:  # a per-step choice, which the model cannot make
        raise ValueError("rematerialize 'auto' is chosen per depth and batch: resolve it with "
                         "flaxdepth.train.step_options first")
    if fan is not None and fan not in registry.FANS:
        raise ValueError(f"fan must be one of {registry.FANS}, got {fan!r}")
    return DepthCNN(spec, depth, fan, options)


def init_variables(model: DepthCNN, key: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh variables ({'params'[, 'batch_stats']}) drawn from the notebook's distributions,
    every floating array in `dtype` (Flax creates Conv and Dense parameters in float32 even
    under jax_enable_x64)."""
    variables = model.init(key, jnp.zeros((1, 28, 28, 1), dtype), train=False)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        dict(variables))
