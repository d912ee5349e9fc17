"""Train torch_ref models under flaxdepth's protocol, for `--framework torch` and for comparing
frameworks: the same initial weights (flaxdepth's init for the seed, through the interop API),
the same batch order per epoch, the notebook's own training loop, the same result format."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import numpy as np
import torch

import torch_ref
from torch_ref import training
from torch_ref.tf32 import tf32_convolutions
from flaxdepth import interop, registry, train
from flaxdepth.config import RunConfig
from flaxdepth.data import Dataset


class EpochOrderLoader:
    """Re-iterable loader: its i-th iteration yields the batches of the i-th epoch's order."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, orders: Sequence[np.ndarray], batch_size: int):
        self.images, self.labels, self.orders, self.batch_size = images, labels, orders, batch_size
        self.epoch = 0

    def __iter__(self):
        # A generator: the epoch advances when iteration starts, not when iter() is called, since
        # torch_ref.training calls iter() once up front to reject one-shot loaders.
        order = self.orders[self.epoch]
        self.epoch += 1
        yield from training.batches(self.images, self.labels, order, self.batch_size)


def initial_state_dict(variant: str | registry.Variant, depth: int, seed: int, fan: str | None = None,
                       batch_size: int = 256) -> dict[str, np.ndarray]:
    """flaxdepth's initial weights of a seed, as a torch state_dict. (`batch_size` only picks
    the cached compiled_functions entry a sweep of that batch size already compiled.)"""
    spec = registry.resolve(variant)
    _, init, _, _ = train.compiled_functions(spec, depth, batch_size, fan)
    state = init(np.asarray([seed], np.int32), np.zeros(1, np.float32))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if not spec.batchnorm:
        variables.pop("batch_stats")
    return interop.to_torch(spec, depth, jax.tree.map(lambda a: a[0], variables))


def train_torch_runs(run: RunConfig, depth: int, dataset: Dataset, runs: Sequence[tuple[int, float]], *,
                     log: Callable[[str], None] | None = None, device: str | None = None,
                     dtype: torch.dtype = torch.float32, precision: str = "default",
                     on_model: Callable[[int, float, int, torch.nn.Module], None] | None = None
                     ) -> list[train.RunResult]:
    """Train each (seed, lr) with torch_ref's notebook loop as `run` says (spec, epochs, batch size,
    BatchNorm protocol, fan), one after the other; `log` gets the notebook's per-epoch lines,
    prefixed with the seed and lr. `dtype=torch.float64` runs model and inputs in double precision
    (for parity checks; pair it with JAX's x64 mode); `precision` is `EngineOptions.precision` (see
    `torch_precision`). `on_model(seed, lr, epochs trained, model)` sees each model with its
    initial weights (0) and at the end (`epochs`)."""
    with torch_precision(precision):
        return _train_torch_runs(run, depth, dataset, runs, log, device, dtype, on_model)


@contextlib.contextmanager
def torch_precision(precision: str):
    """torch computing as `EngineOptions.precision` says: "default" with torch's own TF32 switches,
    "highest" with TF32 off, "tf32" with every float32 convolution's operands rounded to TF32 on any
    device (torch_ref.tf32) and the switches off, so that the rounded values are convolved, and
    Linear layers multiplied, in float32."""
    convolutions = tf32_convolutions() if precision == "tf32" else contextlib.nullcontext()
    with tf32_allowed(precision == "default"), convolutions:
        yield


@contextlib.contextmanager
def tf32_allowed(allowed: bool):
    """torch's TF32 switches for cuDNN convolutions and CUDA matmuls, restored afterwards (CPUs
    compute in float32 either way)."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = flag.allow_tf32 and allowed
    try:
        yield
    finally:
        for flag, value in zip(flags, saved):
            flag.allow_tf32 = value


def _train_torch_runs(run: RunConfig, depth, dataset, runs, log, device, dtype, on_model):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec, epochs, batch_size, fan = run.spec, run.epochs, run.batch_size, run.fan
    train_images = training.normalize(dataset.train_images, dtype)
    test_images = training.normalize(dataset.test_images, dtype)
    n = len(dataset.train_labels)
    test_loader = list(training.batches(test_images, dataset.test_labels, np.arange(len(dataset.test_labels)),
                                        batch_size))
    results = []
    for seed, lr in runs:
        # Cast before loading, so that float64 initial weights are not rounded through float32.
        model = torch_ref.build(spec, depth, fan=fan).to(device=device, dtype=dtype)
        torch_ref.load_weights(model, initial_state_dict(spec, depth, seed, fan, batch_size))
        orders = [np.array(train.epoch_orders([seed], epoch, n)[0]) for epoch in range(epochs)]  # writable, for torch
        loader = EpochOrderLoader(train_images, dataset.train_labels, orders, batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=train.MOMENTUM)
        criterion = torch.nn.CrossEntropyLoss()
        run_log = None if log is None else (lambda line, seed=seed, lr=lr: log(f"seed={seed} lr={lr:g}  {line}"))
        if on_model is not None:
            on_model(seed, lr, 0, model)
        if spec.multihead:  # the notebook's multihead loop always calls model.train()
            train_errors, test_errors = training.train_multihead(
                epochs, model, criterion, optimizer, loader, test_loader, log=run_log)
        else:
            train_errors, test_errors = training.train(
                epochs, model, criterion, optimizer, loader, test_loader,
                notebook_quirks=run.notebook_quirks, log=run_log)
        finite = all(torch.isfinite(p).all().item() for p in model.parameters())
        if on_model is not None:
            on_model(seed, lr, epochs, model)
        results.append(train.RunResult(seed, lr, list(train_errors), list(test_errors), finite))
    return results
