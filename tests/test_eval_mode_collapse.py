"""experiments/eval_mode_collapse.py: at the notebook's knobs a run is the sweep's --framework torch
run with --notebook-quirks; the population statistics are the batches' averaged; bad knobs are errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flaxdepth.data import Dataset


@pytest.fixture(scope="module")
def collapse(load_experiment):
    return load_experiment("eval_mode_collapse")


@pytest.fixture(scope="module")
def small_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=300).astype(np.uint8)
    return Dataset("random", images[:200], labels[:200], images[200:], labels[200:])


def test_default_knobs_are_the_sweeps_torch_run(collapse, small_dataset, tmp_path):
    """Same initial weights, batch order, BatchNorm modes and SGD: the same errors, bit for bit;
    --plot draws such rows."""
    from flaxdepth import torch_runner
    from flaxdepth.config import RunConfig

    knobs = collapse.Knobs(depth=3, seed=1, epochs=2, batch_size=64)  # 3 full batches and a partial one
    row = collapse.train_run(knobs, small_dataset)
    [expected] = torch_runner.train_torch_runs(RunConfig("elu_bn", epochs=2, batch_size=64, notebook_quirks=True), 3,
                                               small_dataset, [(1, 0.05)])
    assert row["train_errors"] == expected.train_errors and row["test_errors"] == expected.test_errors
    assert len(row["first_eval_epoch_losses"]) == 4
    collapse.plot([row, {**row, "knobs": {**row["knobs"], "lr": 0.01}}], tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
    notebook = dataclasses.asdict(collapse.Knobs(seed=2, depth=63))
    assert collapse.setting(notebook) == "notebook" and collapse.setting({**notebook, "lr": 0.01}) == "lr=0.01"


def test_population_statistics_average_the_batches(collapse, small_dataset):
    from torch_ref import build, training

    model = build("elu_bn", 3)
    images = training.normalize(small_dataset.train_images)
    collapse.population_statistics(model, images, 64)
    first_conv, first_norm = model.conv_stages[0][0], model.conv_stages[0][1]
    with torch.no_grad():
        outputs = [first_conv(images[start:start + 64]) for start in range(0, len(images), 64)]
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(first_norm.running_mean, expected_mean)
    torch.testing.assert_close(first_norm.running_var, expected_var)
    assert first_norm.momentum == 0.1  # restored for training


@pytest.mark.parametrize("change, message", [
    ({"variant": "elu"}, "no BatchNorm"), ({"epochs": 1}, "at least 2"), ({"last_batch": "half"}, "--last-batch"),
    ({"precision": "tf16"}, "--precision"), ({"momentum": 1.0}, "momentum"), ({"eval_lr": 0.0}, "eval lr")])
def test_bad_knobs_are_one_line_errors(collapse, change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(collapse.Knobs(), **change).validate()


def test_sharpness_is_the_hessians_largest_eigenvalue(collapse):
    """Power iteration on Hessian-vector products against the explicit Hessian of a small model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    images, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(flat):
        views = [chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes)]
        hidden = torch.tanh(images @ views[0].T + views[1])
        return torch.nn.functional.cross_entropy(hidden @ views[2].T + views[3], labels)

    hessian = torch.autograd.functional.hessian(loss, torch.cat([p.detach().flatten() for p in params]))
    largest = torch.linalg.eigvalsh(hessian).abs().max().item()
    value, shares = collapse.sharpest_direction(model, images, labels, train_mode=True, iterations=300)
    assert value == pytest.approx(largest, rel=1e-6)
    eigenvector = torch.linalg.eigh(hessian).eigenvectors[:, torch.linalg.eigvalsh(hessian).abs().argmax()]
    expected = [chunk.square().sum().item() for chunk in eigenvector.split(sizes)]
    assert list(shares) == [name for name, _ in model.named_parameters()]
    assert list(shares.values()) == pytest.approx(expected, abs=1e-6)
