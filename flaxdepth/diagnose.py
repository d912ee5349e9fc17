"""Why a depth fails: per-layer signal diagnostics of one training run.

`layer_diagnostics(variant, depth, variables, images, labels)` measures every conv layer of a
model on one batch, in network order (stage 0's first conv, its scanned layers, stage 1's ...), in
one jitted program per (variant, depth, BatchNorm mode, dtype): the layers sow their intermediates
inside the stage scans (flaxdepth.models.ConvLayer) and one `jax.grad` of the loss with respect to
the parameters and to zero perturbations added to the layers' outputs gives the backward signal.
`torch_ref.diagnose` measures the same from torch_ref's models through hooks.

`python -m flaxdepth.diagnose --variant NAME --depth K` trains one run with the sweep's protocol
(flaxdepth.train: initial weights, batch order, SGD momentum, BatchNorm modes) step by step, and
records the diagnostics at the requested steps on a fixed probe batch, the first `probe_size` test
images, with BatchNorm in the mode training uses from that step on: `diagnostics.json` and two PNGs
in `--out`.

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

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flaxdepth import registry
from flaxdepth.cli import quiet_on_closed_pipe
from flaxdepth.options import EngineOptions
from flaxdepth.search import DEFAULT_OUT, FRAMEWORKS, RESULTS_ENV, ConfigError, SweepConfig, portable_path

PROG = "python -m flaxdepth.diagnose"

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
#: slower (experiments/BENCHMARKS.md, "Test suite time"), which suits one run on a small batch.
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


# ------------------------------------------------------------------------------ one run, step by step


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """One diagnosed run: what the sweep would train for (variant, depth, seed, lr), the steps at
    which to measure, and the probe batch; stored in diagnostics.json."""

    variant: str
    depth: int
    steps: tuple[str, ...] = ("0", "10", "100", "epoch")  # step numbers, "epoch" (every end), "epochN"
    seed: int = 0
    lr: float | None = None  # None: the variant's
    epochs: int = 3
    batch_size: int = 256
    notebook_quirks: bool = False
    framework: str = "jax"
    dataset: str = "mnist"
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    probe_size: int = 256  # the first probe_size test images
    fan: str | None = None
    out: str | None = None  # None: default_out()
    engine: EngineOptions = EngineOptions()

    def as_sweep(self) -> SweepConfig:
        """The one-run sweep configuration whose protocol this run follows."""
        return SweepConfig(variant=self.variant, lrs=None if self.lr is None else (self.lr,), seeds=1,
                           first_seed=self.seed, depths=(self.depth,), epochs=self.epochs,
                           batch_size=self.batch_size, dataset=self.dataset, data_dir=self.data_dir,
                           limit_train=self.limit_train, limit_test=self.limit_test,
                           notebook_quirks=self.notebook_quirks, framework=self.framework, fan=self.fan,
                           skip_parity=True, engine=self.engine)

    def validate(self) -> "DiagnoseConfig":
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < registry.NUM_STAGES:
            raise ConfigError(f"--depth must be an integer of at least {registry.NUM_STAGES}, got {self.depth!r}")
        self.as_sweep().validate()
        if self.probe_size < 1:
            raise ConfigError(f"--probe-size must be at least 1, got {self.probe_size}")
        parse_steps(self.steps, self.epochs)
        return self

    @property
    def spec(self) -> registry.Variant:
        return registry.get_variant(self.variant)

    @property
    def learning_rate(self) -> float:
        return self.as_sweep().learning_rates[0]

    def default_out(self) -> Path:
        protocol = self.as_sweep().protocol
        return (Path(os.environ.get(RESULTS_ENV) or DEFAULT_OUT) / "diagnostics"
                / f"{self.variant}_k{self.depth}_{self.framework}_{protocol}_seed{self.seed}")

    def as_dict(self) -> dict:
        """As diagnostics.json stores it: paths as search.portable_path writes them (no private paths)."""
        data = dataclasses.asdict(self)
        for key in ("out", "data_dir"):
            data[key] = None if data[key] is None else portable_path(data[key])
        return data


_EPOCH_STEP = re.compile(r"epoch(\d*)")


def parse_steps(tokens, epochs: int) -> tuple[str, ...]:
    """The --steps tokens, checked: step numbers >= 0, "epoch", or "epochN" with 1 <= N <= epochs."""
    tokens = tuple(str(token).strip() for token in tokens)
    if not tokens or any(not token for token in tokens):
        raise ConfigError(f"--steps takes a comma-separated list of step numbers, 'epoch' or 'epochN', got "
                          f"{','.join(tokens)!r}")
    for token in tokens:
        match = _EPOCH_STEP.fullmatch(token)
        if token.isdigit() or (match and not match.group(1)):
            continue
        if match and 1 <= int(match.group(1)) <= epochs:
            continue
        what = f"epochs are 1 to {epochs}" if match else "use step numbers (0, 10, ...), 'epoch' or 'epochN'"
        raise ConfigError(f"--steps: {token!r} is not a step of this run; {what}")
    return tokens


def resolve_steps(tokens, epochs: int, steps_per_epoch: int) -> list[int]:
    """The step numbers (SGD steps taken) that `tokens` name, sorted, with 0 (initialization)
    always among them; "epoch" is the end of every epoch, "epochN" the end of epoch N."""
    last = epochs * steps_per_epoch
    steps = {0}
    for token in parse_steps(tokens, epochs):
        if token == "epoch":
            steps.update(steps_per_epoch * (epoch + 1) for epoch in range(epochs))
        elif token.startswith("epoch"):
            steps.add(steps_per_epoch * int(token.removeprefix("epoch")))
        elif int(token) > last:
            raise ConfigError(f"--steps: step {token} is past the run's end ({epochs} epochs of {steps_per_epoch} "
                              f"steps: step {last}); add --epochs")
        else:
            steps.add(int(token))
    return sorted(steps)


@dataclasses.dataclass(frozen=True)
class Probe:
    """The fixed batch every measurement uses."""

    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray

    def describe(self) -> str:
        return f"the first {len(self.labels)} test images"


#: record(step, bn_train, measured) stores one step's {"loss", "layers"}.
Recorder = Callable[[int, bool, dict], None]


def _bn_train_at(config: DiagnoseConfig, step: int, steps_per_epoch: int) -> bool:
    """The BatchNorm mode training uses from `step` on (the mode of the epoch its next step is in)."""
    from flaxdepth import train

    return train.bn_train_mode(step // steps_per_epoch, config.notebook_quirks, config.spec)


def train_jax(config: DiagnoseConfig, dataset, probe: Probe, steps: list[int], record: Recorder,
              on_step: Callable[[], None], log: Callable[[str], None]) -> list[dict]:
    """Train the run with flaxdepth's engine one jitted step at a time (its train_step, batch order,
    initial weights and BatchNorm modes), calling `record` at `steps`; returns the completed epochs'
    {"epoch", "train_error", "test_error"}."""
    import jax
    import jax.numpy as jnp

    from flaxdepth import train

    spec, n, b = config.spec, len(dataset.train_labels), config.batch_size
    steps_per_epoch = -(-n // b)
    model, init, _, _ = train.compiled_functions(spec, config.depth, b, config.fan, config.engine)
    replicas = init(np.asarray([config.seed], np.int32), np.asarray([config.learning_rate], jnp.result_type(float)))
    state = jax.tree.map(lambda a: a[0], replicas)
    data = train.DeviceData.put(dataset)

    @functools.partial(jax.jit, static_argnames=("size", "bn_train"))
    def step_fn(state, data, order, start, size, bn_train):
        # the batch's start traced, its size static: one program for every full batch
        indices = jax.lax.dynamic_slice_in_dim(order, start, size)
        return train.train_step(model, state, data.train_images[indices], data.train_labels[indices], bn_train)

    test_fn = jax.jit(lambda state, data: train.test_error(model, state, data, b))
    images, labels = train.normalize(probe.images), probe.labels.astype(np.int32)

    def measure(step):
        bn_train = _bn_train_at(config, step, steps_per_epoch)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        record(step, bn_train, layer_diagnostics(spec, config.depth, variables, images, labels, bn_train,
                                                 config.fan, config.engine))

    step, epochs = 0, []
    measure(0)
    for epoch in range(-(-steps[-1] // steps_per_epoch)):
        order = train.epoch_orders([config.seed], epoch, n)[0]
        bn_train = train.bn_train_mode(epoch, config.notebook_quirks, spec)
        correct = 0
        for start in range(0, n, b):
            if step == steps[-1]:
                break
            state, metrics = step_fn(state, data, order, start, min(b, n - start), bn_train)
            correct += metrics["correct"]
            step += 1
            on_step()
            if step in steps:
                measure(step)
        else:
            train_error, test_error = 1 - float(correct) / n, float(test_fn(state, data))
            epochs.append({"epoch": epoch + 1, "train_error": train_error, "test_error": test_error})
            log(train.notebook_log_line(epoch, config.epochs, train_error, test_error))
    return epochs


class _MeasuringLoader:
    """Batches of flaxdepth.torch_runner's epoch orders, none past step `last`; after each step
    (when the training loop asks for the next batch) `on_step()` and `measure(steps done)`:
    torch_ref's own training loop, observed between its steps."""

    def __init__(self, loader, last: int, measure: Callable[[int], None], on_step: Callable[[], None]):
        self.loader, self.last, self.measure, self.on_step = loader, last, measure, on_step
        self.step = 0

    def __iter__(self):  # a generator, as EpochOrderLoader's: the epoch starts when iteration does
        for batch in self.loader:
            if self.step == self.last:
                return
            yield batch
            self.step += 1
            self.on_step()
            self.measure(self.step)


def train_torch(config: DiagnoseConfig, dataset, probe: Probe, steps: list[int], record: Recorder,
                on_step: Callable[[], None], log: Callable[[str], None]) -> list[dict]:
    """train_jax's run with torch_ref's model and the notebook's training loop (torch_ref.training),
    as `--framework torch` sweeps train it (flaxdepth.torch_runner): flaxdepth's initial weights
    for the seed and its batch order."""
    import torch

    import torch_ref
    from flaxdepth import torch_runner, train
    from torch_ref import diagnose as torch_diagnose
    from torch_ref import training

    spec, n, b = config.spec, len(dataset.train_labels), config.batch_size
    steps_per_epoch = -(-n // b)
    epochs_run = -(-steps[-1] // steps_per_epoch)
    complete_epochs = steps[-1] // steps_per_epoch  # the last one run may stop early
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as torch_runner's
    model = torch_ref.build(spec, config.depth, fan=config.fan)
    torch_ref.load_weights(model, torch_runner.initial_state_dict(spec, config.depth, config.seed, config.fan, b))
    model.to(device)
    images = training.normalize(probe.images).to(device)
    labels = torch.from_numpy(probe.labels.astype(np.int64)).to(device)

    def measure(step):
        if step in steps:
            bn_train = _bn_train_at(config, step, steps_per_epoch)
            record(step, bn_train, torch_diagnose.layer_diagnostics(model, images, labels, bn_train))

    lines = []

    def epoch_log(line):
        lines.append(line)
        if len(lines) <= complete_epochs:  # a partial epoch's error is not the protocol's
            log(line)

    orders = [np.array(train.epoch_orders([config.seed], epoch, n)[0]) for epoch in range(epochs_run)]
    loader = _MeasuringLoader(torch_runner.EpochOrderLoader(training.normalize(dataset.train_images),
                                                            dataset.train_labels, orders, b),
                              steps[-1], measure, on_step)
    test_loader = list(training.batches(training.normalize(dataset.test_images), dataset.test_labels,
                                        np.arange(len(dataset.test_labels)), b))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=train.MOMENTUM)
    criterion = torch.nn.CrossEntropyLoss()
    with torch_runner.torch_precision(config.engine.precision):
        measure(0)
        if epochs_run == 0:
            return []
        if spec.multihead:  # the notebook's multihead loop always calls model.train()
            errors = training.train_multihead(epochs_run, model, criterion, optimizer, loader, test_loader,
                                              log=epoch_log)
        else:
            errors = training.train(epochs_run, model, criterion, optimizer, loader, test_loader,
                                    notebook_quirks=config.notebook_quirks, log=epoch_log)
    return [{"epoch": epoch + 1, "train_error": train_error, "test_error": test_error}
            for epoch, (train_error, test_error) in enumerate(zip(*errors)) if epoch < complete_epochs]


def run(config: DiagnoseConfig, dataset, log: Callable[[str], None] = print, progress=None) -> dict:
    """Train and measure one run; returns diagnostics.json's content. `dataset` is whole: the probe
    is its first test images, training and testing use `config.limit_train` / `limit_test` of it.
    `progress`: a tqdm-like factory for a bar of steps."""
    from flaxdepth import data, search

    config = config.validate()
    if config.probe_size > len(dataset.test_labels):
        raise ConfigError(f"--probe-size {config.probe_size} is more than the {len(dataset.test_labels)} test images")
    probe = Probe(dataset.test_images[:config.probe_size], dataset.test_labels[:config.probe_size])
    if config.framework == "jax":
        import jax

        from flaxdepth import train

        # record the rematerialization the run trains with, not "auto"
        config = dataclasses.replace(config, engine=train.step_options(config.engine, config.spec, config.depth,
                                                                       config.batch_size))
        check_probe_fits(config.spec, config.depth, train.normalize(probe.images), probe.labels.astype(np.int32),
                         train.available_memory(jax.devices()[0]), config.fan, config.engine)
    trained = data.subset(dataset, config.limit_train, config.limit_test)
    steps_per_epoch = -(-len(trained.train_labels) // config.batch_size)
    steps = resolve_steps(config.steps, config.epochs, steps_per_epoch)
    records = []
    bar = progress(total=steps[-1], desc=f"{config.variant} k={config.depth} ({config.framework})", unit="step",
                   leave=False) if progress and steps[-1] else None

    def record(step, bn_train, measured):
        records.append({"step": step, "epoch": step / steps_per_epoch, "bn_train": bn_train, **measured})

    trainer = train_jax if config.framework == "jax" else train_torch
    try:
        epochs = trainer(config, trained, probe, steps, record, bar.update if bar else (lambda: None), log)
    finally:
        if bar is not None:
            bar.close()
    return {"config": config.as_dict(), "spec": config.spec.fields(), "protocol": config.as_sweep().protocol,
            "learning_rate": config.learning_rate, "steps_per_epoch": steps_per_epoch,
            "probe": probe.describe(), "environment": search.environment(), "epochs": epochs, "steps": records}


# ------------------------------------------------------------------------------ figures


def _stage_starts(layers: list[dict]) -> list[int]:
    return [i for i, layer in enumerate(layers) if layer["layer"] == 0 and i > 0]


def _log10(values) -> np.ndarray:
    """log10 of positive finite values; NaN (drawn blank) elsewhere: zeros, nulls, a diverged run."""
    array = np.array([np.nan if v is None else v for v in values], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(array) & (array > 0), np.log10(np.where(array > 0, array, 1)), np.nan)


def plot_heatmaps(diagnostics: dict, path: Path) -> None:
    """Conv layer x recorded step: log10 activation variance and log10 output-gradient norm."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is
    from matplotlib.ticker import MaxNLocator

    records = diagnostics["steps"]
    layers = records[0]["layers"]
    height = min(12.0, 3.2 + 0.12 * len(layers))
    fig = Figure(figsize=(max(8.0, 4 + 0.6 * len(records)), height))
    axes = fig.subplots(1, 2, sharey=True)
    labels = [f"{r['step']}" + ("\nepoch %d" % round(r["epoch"]) if r["step"] and float(r["epoch"]).is_integer()
                                else "") for r in records]
    for ax, key, title in zip(axes, ("activation_variance", "output_grad_norm"),
                              ("log10 activation variance", "log10 |dloss / d layer output|")):
        # gray cells: zero or not finite (a dead or diverged layer)
        grid = np.stack([_log10([layer[key] for layer in r["layers"]]) for r in records], axis=1)
        # rows at 1..L, as the signal-propagation plot numbers the layers
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=colormaps["viridis"].with_extremes(
            bad="lightgray"), extent=(-0.5, len(records) - 0.5, len(layers) + 0.5, 0.5))
        fig.colorbar(image, ax=ax)
        for start in _stage_starts(layers):
            ax.axhline(start + 0.5, color="white", lw=1)
        ax.set_xticks(range(len(records)), labels, fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("conv layer (white lines: stage boundaries)")
    c = diagnostics["config"]
    fig.suptitle(f"{c['variant']} k={c['depth']}, {diagnostics['protocol']} protocol, {c['framework']}, seed {c['seed']}; "
                 f"{diagnostics['probe']}; gray: zero or not finite", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_signal_propagation(diagnostics: dict, path: Path) -> None:
    """Brock et al.'s signal-propagation plot at initialization: per layer, the average channel
    squared mean and variance of the output and the residual branch's variance, log scale."""
    from matplotlib.figure import Figure

    layers = diagnostics["steps"][0]["layers"]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    index = np.arange(1, len(layers) + 1)
    for key, label in (("avg_channel_squared_mean", "average channel squared mean"),
                       ("avg_channel_variance", "average channel variance"),
                       ("residual_variance", "residual branch variance")):
        if not any(key in layer for layer in layers):  # residual_variance: residual variants only
            continue
        values = _log10([layer.get(key) for layer in layers])
        shown = np.isfinite(values)
        if shown.any():
            ax.plot(index[shown], 10 ** values[shown], marker="o", ms=3, lw=1, label=label)
        else:
            ax.plot([], [], label=f"{label}: zero at every layer")
    for start in _stage_starts(layers):
        ax.axvline(start + 0.5, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("conv layer (network order; dotted: stage boundaries)")
    ax.set_ylabel("value on the probe batch")
    c = diagnostics["config"]
    ax.set_title(f"{c['variant']} k={c['depth']} at initialization ({c['framework']}, seed {c['seed']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(diagnostics: dict, out: Path) -> dict[str, Path]:
    """diagnostics.json and its figures in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "diagnostics.json", "heatmaps": out / "heatmaps.png",
             "signal_propagation": out / "signal_propagation.png"}
    paths["json"].write_text(json.dumps(diagnostics, indent=1, allow_nan=False) + "\n")
    plot_heatmaps(diagnostics, paths["heatmaps"])
    plot_signal_propagation(diagnostics, paths["signal_propagation"])
    return paths


# ------------------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a ConfigError: one line, exit status 2, like every other bad input."""

    def error(self, message):
        raise ConfigError(message)


def parse_args(argv=None) -> argparse.Namespace:
    from flaxdepth.sweep import add_engine_arguments
    from flaxdepth.variants import add_variants_file_argument

    p = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", required=True, help="a registered variant (python -m flaxdepth.variants lists them)")
    add_variants_file_argument(p)
    p.add_argument("--depth", type=int, required=True, help="depth k (k // 3 conv layers per stage)")
    p.add_argument("--steps", default=",".join(DiagnoseConfig.steps),
                   help="when to measure, in SGD steps taken: numbers, 'epoch' (every epoch's end), 'epochN' "
                        "(the end of epoch N); step 0 (initialization) always")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (initial weights and batch order, as the sweep's)")
    p.add_argument("--framework", default="jax", choices=FRAMEWORKS)
    p.add_argument("--lr", type=float, default=None, help="learning rate; default: the variant's")
    p.add_argument("--epochs", type=int, default=DiagnoseConfig.epochs)
    p.add_argument("--batch-size", type=int, default=DiagnoseConfig.batch_size)
    p.add_argument("--notebook-quirks", action="store_true",
                   help="the notebook's missing model.train(): BatchNorm in eval mode after epoch 1")
    p.add_argument("--dataset", default="mnist", help="mnist or fashion_mnist")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (else $FLAXDEPTH_DATA, the cache)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="test error on the first N test images")
    p.add_argument("--probe-size", type=int, default=DiagnoseConfig.probe_size,
                   help="measure on the first N test images")
    p.add_argument("--fan", default=None, choices=registry.FANS, help="fan of the glorot / he / lecun sigma")
    p.add_argument("--out", default=None,
                   help=f"folder of diagnostics.json and the figures (default: ${RESULTS_ENV}, else ./{DEFAULT_OUT}, "
                        f"/diagnostics/VARIANT_kK_FRAMEWORK_PROTOCOL_seedS)")
    add_engine_arguments(p)
    return p.parse_args(argv)


def config_from_args(args) -> DiagnoseConfig:
    from flaxdepth.sweep import engine_options
    from flaxdepth.variants import load_variants_files

    load_variants_files(args.variants_file)
    return DiagnoseConfig(
        variant=args.variant, depth=args.depth, steps=tuple(args.steps.split(",")), seed=args.seed, lr=args.lr,
        epochs=args.epochs, batch_size=args.batch_size, notebook_quirks=args.notebook_quirks,
        framework=args.framework, dataset=args.dataset, data_dir=args.data_dir, limit_train=args.limit_train,
        limit_test=args.limit_test, probe_size=args.probe_size, fan=args.fan, out=args.out,
        engine=engine_options(args)).validate()


@quiet_on_closed_pipe
def main(argv=None) -> int:
    from flaxdepth.data import DataError

    try:
        config = config_from_args(parse_args(argv))
        from flaxdepth import data

        dataset = data.load_dataset(config.dataset, config.data_dir)
        from tqdm import tqdm

        diagnostics = run(config, dataset, log=tqdm.write, progress=tqdm)
    except (ConfigError, registry.SpecError, DataError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    paths = write(diagnostics, Path(config.out) if config.out else config.default_out())
    print("\n".join(f"{name + ':':<19} {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
