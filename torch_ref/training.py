"""The notebook's training loop and its error figures, plus MNIST batching helpers.

One implementation serves single- and multi-head models: a model whose forward returns a
tuple of logits is scored as the notebook's multihead functions score it (loss = mean of the
heads' cross-entropies, correct count = mean of the heads' correct counts). The notebook's six
function names all exist and behave as the notebook's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional

import numpy as np
import torch
from torch import nn

#: torchvision.transforms.Normalize((0.1307,), (0.3081,)), as the notebook uses it.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

LOG_FORMAT = "Epoch {:03d}/{:03d}, Train Error {:.2f}% || Test Error {:.2f}%"

Batch = tuple[torch.Tensor, torch.Tensor]
Logger = Optional[Callable[[str], object]]


def _heads(output: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _loss(criterion: Callable, heads: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    if len(heads) == 1:
        return criterion(heads[0], target)
    # Summed left to right, then divided, as the notebook writes (loss1 + loss2 + loss3) / 3.
    total = criterion(heads[0], target)
    for head in heads[1:]:
        total = total + criterion(head, target)
    return total / len(heads)


def _correct(heads: tuple[torch.Tensor, ...], target: torch.Tensor) -> float:
    counts = [(head.argmax(dim=1) == target).sum().item() for head in heads]
    # The notebook's multihead score: each head's correct count, averaged over the heads.
    return counts[0] if len(counts) == 1 else sum(counts) / len(counts)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _error(total_correct: float, total_samples: float) -> float:
    if total_samples == 0:
        raise ValueError("the loader yielded no samples (an exhausted generator?)")
    return 1 - total_correct / total_samples


def train_epoch(
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    *,
    set_train_mode: bool = False,
) -> float:
    """One pass of SGD over `loader`; returns the error of the outputs seen along the way.

    The error is accumulated batch by batch from each batch's output *before* its update, as
    in the notebook. The notebook's train_epoch has `model.train()` commented out, hence the
    default set_train_mode=False: after test() has put the model in eval mode, BatchNorm
    trains on its running statistics and stops updating them.
    """
    if set_train_mode:
        model.train()
    device = _device(model)
    total_correct = 0.0
    total_samples = 0.0
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        heads = _heads(model(data))
        loss = _loss(criterion, heads, target)
        total_correct += _correct(heads, target)
        total_samples += target.size(0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _error(total_correct, total_samples)


def test(model: nn.Module, loader: Iterable[Batch]) -> float:
    """Error over `loader` in eval mode, without gradients (leaves the model in eval mode)."""
    model.eval()
    device = _device(model)
    total_correct = 0.0
    total_samples = 0.0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            total_correct += _correct(_heads(model(data)), target)
            total_samples += target.size(0)
    return _error(total_correct, total_samples)


def _check_reiterable(loader: Iterable[Batch], epochs: int, name: str) -> None:
    # A generator would be exhausted after one epoch; fail before training, not in epoch 2.
    if epochs > 1 and iter(loader) is loader:
        raise TypeError(
            f"{name} is a one-shot iterator; pass something iterable once per epoch "
            "(a list of batches, a DataLoader, or an object whose __iter__ calls batches())"
        )


def _train_loop(
    epochs: int,
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Batch],
    test_loader: Iterable[Batch],
    *,
    set_train_mode: bool,
    log: Logger,
) -> tuple[list[float], list[float]]:
    _check_reiterable(train_loader, epochs, "train_loader")
    _check_reiterable(test_loader, epochs, "test_loader")
    train_errs: list[float] = []
    test_errs: list[float] = []
    for epoch in range(epochs):
        train_errs.append(
            train_epoch(model, criterion, optimizer, train_loader, set_train_mode=set_train_mode)
        )
        test_errs.append(test(model, test_loader))
        if log is not None:
            log(LOG_FORMAT.format(epoch, epochs, train_errs[-1] * 100, test_errs[-1] * 100))
    return train_errs, test_errs


def train(
    epochs: int,
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Batch],
    test_loader: Iterable[Batch],
    *,
    notebook_quirks: bool = True,
    log: Logger = print,
) -> tuple[list[float], list[float]]:
    """The notebook's train(): per epoch, train_epoch then test, and one log line.

    Returns the per-epoch (train errors, test errors); the notebook returned the last of each.
    notebook_quirks=True keeps the notebook's missing model.train() (see train_epoch); False
    puts the model in train mode at the start of every epoch. log=None prints nothing.
    """
    return _train_loop(
        epochs, model, criterion, optimizer, train_loader, test_loader,
        set_train_mode=not notebook_quirks, log=log,
    )


def train_epoch_multihead(
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
) -> float:
    """The notebook's train_epoch_multihead, which (unlike train_epoch) calls model.train()."""
    return train_epoch(model, criterion, optimizer, loader, set_train_mode=True)


def test_multihead(model: nn.Module, loader: Iterable[Batch]) -> float:
    """The notebook's test_multihead: mean over the heads of each head's error."""
    return test(model, loader)


def train_multihead(
    epochs: int,
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Batch],
    test_loader: Iterable[Batch],
    *,
    log: Logger = print,
) -> tuple[list[float], list[float]]:
    """The notebook's train_multihead: train() with model.train() at every epoch's start."""
    return _train_loop(
        epochs, model, criterion, optimizer, train_loader, test_loader,
        set_train_mode=True, log=log,
    )


# Keep pytest from collecting the notebook's test() functions when a test module imports them.
test.__test__ = False  # type: ignore[attr-defined]
test_multihead.__test__ = False  # type: ignore[attr-defined]


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    order: Sequence[int] | np.ndarray | torch.Tensor,
    batch_size: int,
) -> Iterator[Batch]:
    """Yield (images[idx], labels[idx]) for consecutive `batch_size` slices of `order`.

    The last, partial batch is kept (as DataLoader's drop_last=False does). Labels come out as
    int64, the class-index dtype that cross-entropy needs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).long()
    order = torch.as_tensor(order, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


def normalize(images_uint8: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28), as ToTensor() + Normalize((0.1307,), (0.3081,)).

    Op for op what torchvision does: convert to `dtype`, divide by 255, subtract the mean and
    divide by the std, both held as `dtype` scalars; so float32 is bit-identical to the
    notebook's inputs, and float64 gives the same values at double precision.
    """
    array = np.asarray(images_uint8)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {array.dtype} {array.shape}")
    x = torch.from_numpy(array.copy()).unsqueeze(1).to(dtype).div(255)
    # Shaped (C, 1, 1) like torchvision's, so the broadcast is the same op.
    mean = torch.as_tensor((MNIST_MEAN,), dtype=dtype).view(-1, 1, 1)
    std = torch.as_tensor((MNIST_STD,), dtype=dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)
