"""The training engine: the notebook's protocol as pure, jitted JAX functions.

- `train_step(model, state, images, labels, bn_train)` is one SGD-momentum step.
- An epoch is a `lax.scan` over the full batches of a device-side permutation, plus one step
  for the partial last batch (60000 = 234 x 256 + 96, kept as the notebook's DataLoader keeps it).
- The dataset lives on the device as uint8 and is normalized there.
- Independent runs (seeds x learning rates) form a leading replica axis, so one compiled program
  trains them all (vmapped on GPUs; one after the other on CPUs, see `per_replica`); depth changes
  the program, so each depth compiles once.
- The replica axis is sharded over a 1-D device mesh (`jax.shard_map`): each device trains its
  block of replicas, the dataset is replicated on every device, and only the per-replica metrics
  are gathered. With `jax.distributed` the mesh spans every process's devices.
- On CPUs, JAX can present the cores as several devices (`request_cpu_devices`), whose programs
  run concurrently: more of the cores' time goes to training (`cpu_device_count`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxdepth import models, objective, registry
from flaxdepth.config import RunConfig
from flaxdepth.data import MNIST_MEAN, MNIST_STD, Dataset
from flaxdepth.options import AUTO, REMATERIALIZATIONS, EngineOptions

MOMENTUM = 0.9
REPLICA_AXIS = "replicas"


def replica_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh whose axis carries the replicas; default: every device of every process."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (REPLICA_AXIS,))


def cpu_device_count(replicas: int, cores: int | None = None) -> int:
    """How many CPU devices to split `replicas` over. One program does not keep every core busy, so
    programs running side by side train more models per second, but three programs a core were
    slower than one and a half (benchmarks/BENCHMARKS.md). So: one device per
    replica up to the core count; beyond, the fewest devices (at most 2 per core) that divide the
    replicas evenly, so that no padding replica is trained; else one per core."""
    cores = cores or usable_cores()
    if replicas <= cores:
        return max(replicas, 1)
    return next((count for count in range(cores, 2 * cores + 1) if replicas % count == 0), cores)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as SLURM, cpuset cgroups or taskset set
    it), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def request_cpu_devices(count: int) -> None:
    """Ask JAX to present the CPU as `count` devices. Only before JAX starts its backends (after,
    the count is fixed and this does nothing), and not when the user chose a count
    ($JAX_NUM_CPU_DEVICES, or XLA_FLAGS=--xla_force_host_platform_device_count=N). No effect on
    accelerators: the engine's mesh is then made of GPUs."""
    if jax.config.jax_num_cpu_devices >= 0 or "xla_force_host_platform_device_count" in os.environ.get(
            "XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started: its device count stays what it is
        pass


def local_mesh() -> Mesh:
    """The mesh of this process's first device: the default for single-model work."""
    return replica_mesh(jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_over_replicas(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(REPLICA_AXIS))


def global_array(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A device array of `values` laid out by `sharding`. Every process passes the same full
    values and places only the blocks its own devices hold (this works across processes, where
    `jax.device_put` to other hosts' devices would not)."""
    values = np.asarray(values)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


@flax.struct.dataclass
class TrainState:
    """One model's training state (or R models', with a leading replica axis)."""

    params: dict
    batch_stats: dict
    opt_state: optax.OptState


@flax.struct.dataclass
class DeviceData:
    """The dataset as uint8 device arrays (normalized only inside the jitted step)."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array

    @classmethod
    def put(cls, dataset: Dataset, mesh: Mesh | None = None) -> "DeviceData":
        """One copy of the dataset on every device of `mesh` (default: `local_mesh()`), once."""
        sharding = replicated(mesh or local_mesh())
        return cls(*(global_array(a, sharding) for a in (
            dataset.train_images, dataset.train_labels.astype(np.int32),
            dataset.test_images, dataset.test_labels.astype(np.int32))))


def normalize(images_u8: jax.Array, dtype=None) -> jax.Array:
    """uint8 (N, 28, 28) -> NHWC floats, as torchvision's ToTensor + Normalize compute them."""
    dtype = dtype or jnp.result_type(float)  # float64 under jax_enable_x64, else float32
    x = images_u8.astype(dtype) / 255
    return ((x - MNIST_MEAN) / MNIST_STD)[..., None]


def optimizer() -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum=0.9): trace then scale; lr lives in the state, per replica."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=MOMENTUM)


def optimizer_init(params: dict, learning_rate) -> optax.OptState:
    """The optimizer state of `optimizer()` with this model's learning rate in it."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=MOMENTUM).init(params)


def init_state(model: models.DepthCNN, seed: jax.Array, learning_rate: jax.Array) -> TrainState:
    """Fresh weights of a seed from the notebook's distributions and a zero momentum buffer."""
    variables = models.init_variables(model, seed_keys(seed)[0], jnp.result_type(float))
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}), optimizer_init(params, learning_rate))


def train_step(model: models.DepthCNN, state: TrainState, images_u8: jax.Array, labels: jax.Array,
               bn_train: bool) -> tuple[TrainState, dict]:
    """One SGD step; metrics are the loss and the correct count of the outputs before the update.

    `bn_train=False` reproduces the notebook's missing `model.train()`: BatchNorm normalizes
    with its running statistics and leaves them unchanged.
    """
    x = normalize(images_u8)
    update_stats = bn_train and model.variant.batchnorm

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if update_stats:
            outputs, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            outputs, batch_stats = model.apply(variables, x, train=bn_train), state.batch_stats
        return objective.cross_entropy(outputs, labels), (outputs, batch_stats)

    (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "correct": objective.correct_count(outputs, labels)}
    return TrainState(params, batch_stats, opt_state), metrics


def train_epoch(model: models.DepthCNN, state: TrainState, order: jax.Array, data: DeviceData,
                batch_size: int, bn_train: bool) -> tuple[TrainState, dict]:
    """One pass over the training set in the given (shuffled) order; train error accumulated
    batch by batch, as the notebook's train_epoch does."""
    n = data.train_images.shape[0]
    full_batches = n // batch_size

    def step(state, batch_indices):
        return train_step(model, state, data.train_images[batch_indices],
                          data.train_labels[batch_indices], bn_train)

    correct, finite = 0, True
    if full_batches:  # none when the training set is smaller than a batch
        state, metrics = jax.lax.scan(step, state, order[: full_batches * batch_size].reshape(full_batches, -1))
        correct, finite = metrics["correct"].sum(), jnp.isfinite(metrics["loss"]).all()
    if n % batch_size:  # the partial last batch is a step of its own shape
        state, last = step(state, order[full_batches * batch_size:])
        correct, finite = correct + last["correct"], finite & jnp.isfinite(last["loss"])
    return state, {"train_error": 1 - correct / n, "finite": finite}


def test_error(model: models.DepthCNN, state: TrainState, data: DeviceData, batch_size: int) -> jax.Array:
    """Error on the test set in eval mode (running BatchNorm statistics), as the notebook's test()."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def correct(images_u8, labels):
        return objective.correct_count(model.apply(variables, normalize(images_u8), train=False), labels)

    n = data.test_images.shape[0]
    full = n // batch_size * batch_size
    total = 0
    if full:  # none when the test set is smaller than a batch
        images = data.test_images[:full].reshape(-1, batch_size, *data.test_images.shape[1:])
        labels = data.test_labels[:full].reshape(-1, batch_size)
        total = jax.lax.map(lambda batch: correct(*batch), (images, labels)).sum()
    if n > full:
        total = total + correct(data.test_images[full:], data.test_labels[full:])
    return 1 - total / n


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one replica (one seed, one learning rate) reached."""

    seed: int
    lr: float
    train_errors: list[float]
    test_errors: list[float]
    finite: bool  # False once the loss became NaN or infinite: recorded as untrainable

    def trainable(self, threshold: float) -> bool:
        """The notebook's criterion: train or test error under the threshold after the last epoch."""
        return self.finite and min(self.train_errors[-1], self.test_errors[-1]) < threshold


def bn_train_mode(epoch: int, notebook_quirks: bool, variant: registry.Variant) -> bool:
    """Whether BatchNorm runs in train mode in this epoch.

    The notebook's train_epoch has `model.train()` commented out and test() calls `model.eval()`,
    so from the second epoch on the single-head models train in eval mode; its multihead loop does
    call `model.train()`.
    """
    return not (notebook_quirks and epoch > 0 and not variant.multihead)


#: Initialization runs once per depth: compile it without optimization. XLA's optimizing CPU
#: compile of the threefry random-bit generator alone takes seconds per parameter.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def per_replica(fn: Callable, in_axes: tuple, platform: str, vmap: bool | None = None) -> Callable:
    """fn over a leading replica axis (in_axes 0, or None for shared arguments), as a device of
    `platform` runs it best (`vmap` None; True forces vmap, `EngineOptions.vmap_replicas`):
    vmapped on accelerators; on CPUs one replica after the other (lax.map), because vmapping
    per-replica weights turns each convolution into a grouped one, which XLA's CPU backend runs
    slower per model than the plain one (benchmarks/BENCHMARKS.md)."""
    if vmap or (vmap is None and platform != "cpu"):
        return jax.vmap(fn, in_axes=in_axes)

    def looped(*args):
        def one(replica_args):
            it = iter(replica_args)
            return fn(*(next(it) if axis == 0 else arg for arg, axis in zip(args, in_axes)))
        return jax.lax.map(one, tuple(arg for arg, axis in zip(args, in_axes) if axis == 0))
    return looped


def over_replicas(fn: Callable, mesh: Mesh, in_axes: tuple, gather: tuple[bool, ...] | bool,
                  options: EngineOptions = EngineOptions(), **jit_options) -> Callable:
    """jit(shard_map(per_replica(fn))): every device of `mesh` runs `fn` over its block of the
    replica axis. Arguments with in_axes None (the dataset, the epoch) are whole on every device.
    Outputs flagged in `gather` (per-replica metrics, small) come back replicated, so that every
    process can read them; the others (the training state) stay split over the devices. On each
    device the replicas are mapped as `options.vmap_replicas` says."""
    specs = tuple(PartitionSpec() if axis is None else PartitionSpec(REPLICA_AXIS) for axis in in_axes)
    per_device = jax.shard_map(per_replica(fn, in_axes, mesh.devices.flat[0].platform, options.vmap_replicas),
                               mesh=mesh, in_specs=specs, out_specs=PartitionSpec(REPLICA_AXIS))
    shardings = tuple(replicated(mesh) if g else split_over_replicas(mesh)
                      for g in (gather if isinstance(gather, tuple) else (gather,)))
    return jax.jit(per_device, out_shardings=shardings if isinstance(gather, tuple) else shardings[0],
                   **jit_options)


def available_memory(device: jax.Device) -> int | None:
    """Bytes free for a step on `device`: an accelerator's unused memory, or the host's available
    memory for CPU devices (psutil where installed, else /proc/meminfo); None where unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/meminfo") as meminfo:
                fields = dict(line.split(":", 1) for line in meminfo)
            return int(fields["MemAvailable"].split()[0]) * 1024  # the file counts kB
        except (OSError, KeyError, ValueError):
            return None
    return psutil.virtual_memory().available


def step_options(options: EngineOptions, variant: str | registry.Variant, depth: int, batch_size: int,
                 replicas: int = 1, mesh: Mesh | None = None) -> EngineOptions:
    """`options` with rematerialize "auto" resolved (`models.choose_rematerialization`) for training
    `replicas` models of this depth and batch size on `mesh` (default `local_mesh()`); other
    options are returned as they are. The steps that share one memory: a device's vmapped replicas,
    and on CPUs every CPU device of this process (they share the host's memory)."""
    if options.rematerialize != AUTO:
        return options
    mesh = mesh or local_mesh()
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()] or list(mesh.devices.flat)
    platform = devices[0].platform
    vmapped = options.vmap_replicas or (options.vmap_replicas is None and platform != "cpu")
    concurrent = -(-replicas // mesh.size) if vmapped else 1
    if platform == "cpu":
        concurrent *= len(devices)
    choice = models.choose_rematerialization(registry.resolve(variant), depth, batch_size,
                                             jnp.dtype(jnp.result_type(float)).itemsize,
                                             available_memory(devices[0]), concurrent)
    if jax.process_count() > 1:  # every process must compile the same program: process 0's choice
        from jax.experimental import multihost_utils
        index = multihost_utils.broadcast_one_to_all(np.int32(REMATERIALIZATIONS.index(choice)))
        choice = REMATERIALIZATIONS[int(index)]
    return dataclasses.replace(options, rematerialize=choice)


def compiled_functions(variant: str | registry.Variant, depth: int, batch_size: int, fan: str | None = None,
                       options: EngineOptions = EngineOptions(), mesh: Mesh | None = None, replicas: int = 1):
    """Jitted, replica-sharded (model, init, {bn_train: epoch}, test) for one variant (name or spec)
    and depth, computed as `options` say (the spec and the options, rematerialize "auto" resolved by
    `step_options` for `replicas` models, are part of the cache key; `model.options` are those).

    init(seeds, lrs) -> state; epoch(state, orders, data) -> (state, metrics); test(state, data)
    -> errors. Replica counts must be multiples of the mesh size (train_replicas pads); default mesh:
    `local_mesh()`."""
    mesh = mesh or local_mesh()
    options = step_options(options, variant, depth, batch_size, replicas, mesh)
    return _compiled_functions(registry.resolve(variant), depth, batch_size, fan, options, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_functions(spec: registry.Variant, depth: int, batch_size: int, fan: str | None,
                        options: EngineOptions, mesh: Mesh):
    model = models.build_model(spec, depth, fan, options)
    init = over_replicas(functools.partial(init_state, model), mesh, (0, 0), False, options,
                         compiler_options=INIT_COMPILER_OPTIONS)
    epochs = {
        mode: over_replicas(
            lambda state, order, data, mode=mode: train_epoch(model, state, order, data, batch_size, mode),
            mesh, (0, 0, None), (False, True), options)
        for mode in (True, False)
    }
    test = over_replicas(lambda state, data: test_error(model, state, data, batch_size), mesh, (0, None), True,
                         options)
    return model, init, epochs, test


@functools.lru_cache(maxsize=4)
def _orders_program(mesh: Mesh, n: int) -> Callable:
    """seeds, epoch -> one permutation of range(n) per seed. Depth-independent, so compiled once."""
    def order(seed, epoch):
        return jax.random.permutation(jax.random.fold_in(seed_keys(seed)[1], epoch), n)
    return over_replicas(order, mesh, (0, None), False)


def seed_keys(seed: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """(init key, shuffle key) of a seed: the same seed gives the same weights and batch order."""
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    return init_key, shuffle_key


def epoch_orders(seeds: Sequence[int] | jax.Array, epoch: int, n: int, mesh: Mesh | None = None) -> jax.Array:
    """The batch order of each seed's run in this epoch, (len(seeds), n) on the mesh's devices."""
    mesh = mesh or local_mesh()
    if not isinstance(seeds, jax.Array):
        seeds = global_array(np.asarray(seeds, np.int32), split_over_replicas(mesh))
    return _orders_program(mesh, n)(seeds, epoch)


def padded_runs(runs: Sequence[tuple[int, float]], devices: int) -> list[tuple[int, float]]:
    """`runs` padded to a multiple of the device count with copies of the last run, whose
    results are discarded: every device trains the same number of replicas, none is dropped."""
    return list(runs) + [runs[-1]] * (-len(runs) % devices)


def train_replicas(run: RunConfig, depth: int, data: DeviceData, runs: Sequence[tuple[int, float]], *,
                   on_epoch: Callable[[int, list[RunResult]], None] | None = None,
                   mesh: Mesh | None = None, options: EngineOptions = EngineOptions(),
                   on_state: Callable[[int, TrainState], None] | None = None,
                   return_state: bool = False) -> list[RunResult] | tuple[list[RunResult], TrainState]:
    """Train one model per (seed, lr) in `runs`, side by side, as `run` says (its spec, epochs,
    batch size, BatchNorm protocol and fan; its learning rates are the caller's to pair with seeds
    in `runs`), computed as `options` say.

    The replicas are split over `mesh` (default `local_mesh()`; `data` must live on the same mesh,
    see `DeviceData.put`). `on_state(epochs trained, state)` sees the replica-stacked state at
    initialization (0) and after every epoch; its first len(runs) replicas are `runs`' (the rest
    pad the mesh), and it is split over the mesh's devices. With `return_state` the result is
    (results, the final replica-stacked state), as flax's examples' train_and_evaluate returns its
    state."""
    spec = run.spec
    mesh = mesh or local_mesh()
    padded = padded_runs(runs, mesh.size)
    model, init, epoch_fns, test = compiled_functions(spec, depth, run.batch_size, run.fan, options, mesh, len(padded))
    split = split_over_replicas(mesh)
    seeds = global_array(np.asarray([seed for seed, _ in padded], np.int32), split)
    state = init(seeds, global_array(np.asarray([lr for _, lr in padded], jnp.result_type(float)), split))
    train_errors, test_errors = [], []
    finite = np.ones(len(runs), bool)
    if on_state is not None:
        on_state(0, state)
    for epoch in range(run.epochs):
        orders = epoch_orders(seeds, epoch, data.train_images.shape[0], mesh)
        state, metrics = epoch_fns[bn_train_mode(epoch, run.notebook_quirks, spec)](state, orders, data)
        train_errors.append(np.asarray(metrics["train_error"], np.float64)[: len(runs)])
        test_errors.append(np.asarray(test(state, data), np.float64)[: len(runs)])
        finite &= np.asarray(metrics["finite"])[: len(runs)]
        results = [
            RunResult(seed, lr, [float(e[r]) for e in train_errors], [float(e[r]) for e in test_errors],
                      bool(finite[r]))
            for r, (seed, lr) in enumerate(runs)
        ]
        if on_epoch is not None:
            on_epoch(epoch, results)
        if on_state is not None:
            on_state(epoch + 1, state)
    return (results, state) if return_state else results


def notebook_log_line(epoch: int, epochs: int, train_error: float, test_error: float) -> str:
    """The notebook's own per-epoch log line."""
    return "Epoch {:03d}/{:03d}, Train Error {:.2f}% || Test Error {:.2f}%".format(
        epoch, epochs, train_error * 100, test_error * 100)
