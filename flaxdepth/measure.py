"""Per-layer signal diagnostics of a model on one batch: `layer_diagnostics(variant, depth,
variables, images, labels)` measures every conv layer, in network order (stage 0's first conv,
its scanned layers, stage 1's ...), in one jitted program per (variant, depth, BatchNorm mode,
dtype): the layers sow their intermediates inside the stage scans (flaxdepth.models.ConvLayer)
and one `jax.grad` of the loss with respect to the parameters and to zero perturbations added to
the layers' outputs gives the backward signal. `torch_ref.diagnose` measures the same from
torch_ref's models through hooks; `flaxdepth.diagnose` trains a run and measures it at chosen
steps, and `flaxdepth.run_outputs` keeps a summary in a sweep's rows.

Keys of a layer's dict (statistics over the probe batch, N, H, W and channels, unless said):
- stage, layer: the stage and the layer's index in it (0: the stage's first conv);
- pre_activation_mean, pre_activation_variance: of the conv output after the norm, if any;
- activation_mean, activation_variance: of the activation's output;
- avg_channel_squared_mean, avg_channel_variance: Brock et al. 2021's signal-propagation
  quantities of the layer's output (after the skip, if any): the mean over channels of the squared
  per-channel mean, and of the per-channel variance (per channel: over N, H, W);
- residual_variance (layers with a skip connection): the average channel variance of the residual
  branch, the term the skip adds to its input;
- saturated_fraction (tanh and sigmoid): the fraction of units with |tanh| > 0.99, or
  |2 sigmoid - 1| > 0.99 (the same point: sigmoid(x) = (1 + tanh(x / 2)) / 2), where the
  activation's slope is under 2% of its largest;
- output_grad_norm: the L2 norm of the loss's gradient with respect to the layer's output;
- param_grad_norms: the L2 norm of the loss's gradient with respect to each parameter of the layer
  (conv_weight, conv_bias, norm_weight, norm_bias, gate);
- BatchNorm layers, the running statistics against the probe batch's (of the conv output, the
  variance unbiased as torch stores the running one): running_mean_distance and
  running_var_distance, ||running - batch|| / ||batch|| over channels, and running_mean_shift, the
  root mean square over channels of (running mean - batch mean) / sqrt(batch variance + eps): how
  far off eval mode centres the batch, in the batch's standard deviations.
Variances are variances of the whole population (divided by the count), computed in two passes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from flaxdepth import registry
from flaxdepth.config import ConfigError
from flaxdepth.options import EngineOptions

#: A unit saturates where its bounded activation is within this of the range's end (tanh: |y| > 0.99).
SATURATION = 0.99
#: BatchNorm's eps, in running_mean_shift's denominator as in its normalization.
BATCHNORM_EPS = 1e-5
#: flaxdepth's parameter paths in a layer -> the names a layer's param_grad_norms use.
PARAMETER_NAMES = {("conv", "kernel"): "conv_weight", ("conv", "bias"): "conv_bias",
                   ("bn", "scale"): "norm_weight", ("bn", "bias"): "norm_bias",
                   ("gn", "scale"): "norm_weight", ("gn", "bias"): "norm_bias", ("gate",): "gate"}
#: The layer statistics computed per layer by the program (the per-parameter norms beside them).
STATISTICS = ("pre_activation_mean", "pre_activation_variance", "activation_mean", "activation_variance",
              "avg_channel_squared_mean", "avg_channel_variance", "residual_variance", "saturated_fraction",
              "output_grad_norm", "running_mean_distance", "running_var_distance", "running_mean_shift")


def saturation_measure(activation: str):
    """y -> a value in [0, 1] that exceeds SATURATION where a bounded activation saturates, for
    tanh and sigmoid; None for the other activations."""
    return {"tanh": abs, "sigmoid": lambda y: abs(2 * y - 1)}.get(activation)


# ------------------------------------------------------------------------------ the measurement


def _layer_parts(depth: int):
    """(stage, part) of the model's layer groups in network order: a stage's first conv, then
    its scanned layers (none at k < 6)."""
    parts = ("first", "layers") if registry.layers_per_stage(depth) > 1 else ("first",)
    return [(f"stage{stage}", part) for stage in range(registry.NUM_STAGES) for part in parts]


def _lookup(tree: dict, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..., None where a key is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


#: XLA's CPU backend without its LLVM optimizations: a program compiles in far less time and runs
#: slower (benchmarks/BENCHMARKS.md, "Test suite time"), which suits one run on a small batch.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=16)
def _program(spec: registry.Variant, depth: int, bn_train: bool, fan: str | None, options: EngineOptions,
             fast_compile: bool):
    """The jitted (variables, images, labels) -> (loss, per-layer statistics) of one model."""
    import jax
    import jax.numpy as jnp

    from flaxdepth import models, objective

    model = models.build_model(spec, depth, fan, options)
    saturation = saturation_measure(spec.activation)
    groups = _layer_parts(depth)

    def loss(params, perturbations, variables, images, labels):
        variables = {**variables, "params": params}
        if perturbations is not None:
            variables["perturbations"] = perturbations
        # batch_stats mutable: train-mode BatchNorm updates them (discarded here)
        outputs, state = model.apply(variables, images, train=bn_train, mutable=["intermediates", "batch_stats"])
        return objective.cross_entropy(outputs, labels), state["intermediates"]

    def stacked(group, value):
        """A group's per-layer value with a leading layer axis (a stage's first conv has none)."""
        return value[None] if group[1] == "first" else value

    def moments(x, axes):
        mean = x.mean(axes, keepdims=True)
        return mean, jnp.square(x - mean).mean(axes)

    def relative_distance(a, b):
        """Per layer ||a - b|| / ||b|| over the channels."""
        return jnp.linalg.norm(a - b, axis=1) / jnp.linalg.norm(b, axis=1)

    def norms(tree):
        """Per-layer L2 norm of every array of a (layers, ...) tree."""
        return jnp.sqrt(sum(jnp.square(a).sum(tuple(range(1, a.ndim))) for a in jax.tree.leaves(tree)))

    def group_statistics(sown, output_grad, param_grads, batch_stats):
        x = {name: values[0] for name, values in sown.items()}  # sow keeps a tuple per name
        everything, pixels = (1, 2, 3, 4), (1, 2, 3)
        stats = {}
        for name in ("pre_activation", "activation"):
            mean, var = moments(x[name], everything)
            stats[f"{name}_mean"], stats[f"{name}_variance"] = mean.reshape(-1), var
        channel_mean, channel_var = moments(x["output"], pixels)
        stats["avg_channel_squared_mean"] = jnp.square(channel_mean).mean(everything)
        stats["avg_channel_variance"] = channel_var.mean(1)
        if "residual_branch" in x:
            stats["residual_variance"] = moments(x["residual_branch"], pixels)[1].mean(1)
        if saturation is not None:
            saturated = saturation(x["activation"]) > SATURATION
            stats["saturated_fraction"] = saturated.astype(x["activation"].dtype).mean(everything)
        stats["output_grad_norm"] = norms(output_grad)
        if "batchnorm_input" in x:
            batch_mean, batch_var = moments(x["batchnorm_input"], pixels)
            batch_mean = batch_mean.reshape(batch_var.shape)
            count = math.prod(x["batchnorm_input"].shape[1:4])
            batch_var = batch_var * (count / (count - 1))  # unbiased, as torch's running_var
            running_mean, running_var = batch_stats["bn"]["mean"], batch_stats["bn"]["var"]
            stats["running_mean_distance"] = relative_distance(running_mean, batch_mean)
            stats["running_var_distance"] = relative_distance(running_var, batch_var)
            stats["running_mean_shift"] = jnp.sqrt(
                (jnp.square(running_mean - batch_mean) / (batch_var + BATCHNORM_EPS)).mean(1))
        grads = {name: norms(leaf) for path, name in PARAMETER_NAMES.items()
                 if (leaf := _lookup(param_grads, path)) is not None}
        return stats, grads

    def run(variables, images, labels):
        params = variables["params"]
        shapes = jax.eval_shape(lambda: loss(params, None, variables, images, labels)[1])
        perturbations = {stage: {part: {"output": jnp.zeros(shapes[stage][part]["output"][0].shape, images.dtype)}
                                 for part in shapes[stage]} for stage in shapes}
        (value, sown), (param_grads, output_grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, perturbations, variables, images, labels)
        running = variables.get("batch_stats", {})
        per_group = []
        for group in groups:
            stage, part = group
            layered = functools.partial(jax.tree.map, functools.partial(stacked, group))
            per_group.append(group_statistics(
                layered(sown[stage][part]), layered(output_grads[stage][part]["output"]),
                layered(param_grads[stage][part]), layered(running.get(stage, {}).get(part, {}))))
        return value, per_group

    return jax.jit(run, compiler_options=FAST_COMPILE_OPTIONS if fast_compile else None)


def _program_variables(variables: dict) -> dict:
    """What the program takes: params and batch_stats (empty without BatchNorm) on the host. One
    tree structure and placement whatever the caller holds (a training state's sharded arrays,
    host replicas, shapes), so that the program compiled for one of them serves the others."""
    import jax

    return jax.device_get({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})


#: The share of the available memory the diagnostics program may take (XLA's own accounting of its
#: buffers); the rest is for the training step, the dataset and the allocator.
PROBE_MEMORY_FRACTION = 0.7


def diagnostics_memory_bytes(spec: registry.Variant, depth: int, images, labels, bn_train: bool = True,
                             fan: str | None = None, options: EngineOptions = EngineOptions(),
                             fast_compile: bool = False) -> int | None:
    """Bytes that `layer_diagnostics` needs for this probe batch: the compiled program's arguments,
    outputs and temporary buffers as XLA counts them (most of it every layer's sown intermediates);
    None where the backend does not say. Compiling here costs nothing extra: a later call on arrays
    of the same shapes reuses the program."""
    import jax

    from flaxdepth import models

    model = models.build_model(spec, depth, fan, options)
    variables = _program_variables(jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False)))
    compiled = _program(spec, depth, bn_train, fan, options, fast_compile).lower(variables, images, labels).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def check_probe_fits(spec: registry.Variant, depth: int, images, labels, available_bytes: int | None,
                     fan: str | None = None, options: EngineOptions = EngineOptions(),
                     fast_compile: bool = False) -> None:
    """A ConfigError suggesting a --probe-size that fits where the diagnostics of this depth on this
    probe batch would need more than PROBE_MEMORY_FRACTION of `available_bytes` (None: unknown, no
    check). BatchNorm in train mode, the mode measured at initialization."""
    if available_bytes is None:
        return
    need = diagnostics_memory_bytes(spec, depth, images, labels, True, fan, options, fast_compile)
    budget = PROBE_MEMORY_FRACTION * available_bytes
    if need is None or need <= budget:
        return
    size = len(labels)
    fits = int(size * budget / need)  # the sown intermediates grow in proportion to the batch
    advice = f"use --probe-size {fits} or fewer" if fits >= 1 else "not even one image fits; measure a smaller depth"
    raise ConfigError(f"--probe-size {size}: the per-layer diagnostics of {spec.name} k={depth} on {size} images "
                      f"need {_size(need)}, {_size(available_bytes)} of memory is available; {advice}")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged run's values are stored as null."""
    return value if math.isfinite(value) else None


def layer_diagnostics(variant: str | registry.Variant, depth: int, variables: dict, images, labels,
                      bn_train: bool = True, fan: str | None = None, options: EngineOptions = EngineOptions(),
                      fast_compile: bool = False) -> dict[str, Any]:
    """{"loss": the probe batch's loss, "layers": one dict per conv layer in network order} of a
    model (variables {'params'[, 'batch_stats']}) on `images` (normalized NHWC, as the model takes
    them; their dtype is the computation's) and integer `labels`, BatchNorm in train mode or, with
    `bn_train=False`, on its running statistics. The module docstring defines the keys.
    `fast_compile` (FAST_COMPILE_OPTIONS) suits a program run once or twice on a small batch.

    The program holds every layer's sown intermediates for the whole batch (at most five arrays of
    a layer's activations' size) and returns only numbers per layer."""
    from flaxdepth import train

    spec = registry.resolve(variant)
    registry.check_depth(depth)
    options = train.step_options(options, spec, depth, len(labels))
    program = _program(spec, depth, bn_train, fan, options, fast_compile)
    loss, per_group = program(_program_variables(variables), images, labels)
    loss, per_group = float(loss), [tuple(
        {name: np.asarray(values, np.float64) for name, values in part.items()} for part in group)
        for group in per_group]
    layers = []
    for (stage, part), (stats, grads) in zip(_layer_parts(depth), per_group):
        for index in range(len(stats["output_grad_norm"])):
            layer = {"stage": int(stage.removeprefix("stage")), "layer": index + (part == "layers")}
            layer.update({name: _finite_or_none(float(stats[name][index])) for name in STATISTICS if name in stats})
            layer["param_grad_norms"] = {name: _finite_or_none(float(grads[name][index]))
                                         for name in dict.fromkeys(PARAMETER_NAMES.values()) if name in grads}
            layers.append(layer)
    return {"loss": _finite_or_none(loss), "layers": layers}
