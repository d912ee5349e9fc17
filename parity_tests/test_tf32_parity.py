"""Precision "tf32" in both frameworks: flaxdepth's (flaxdepth/conv.py) and torch_ref's
(torch_ref.tf32, through torch_runner.torch_precision) loss and gradients agree, in float32, on a
real batch, in both BatchNorm modes.

TF32 makes the frameworks' float32 rounding differences (other summation orders) larger: an operand
one float32 rounding unit away can round to the neighbouring TF32 value, a change of 2^-11 relative.
So the tolerance is not float32's: flaxdepth against torch_ref differs as much as torch_ref against
itself with its weights moved by one float32 rounding unit (TF32's amplified rounding alone), and
the TF32 rounding itself changes the gradients by several times TF32_RTOL, so a framework that did
not round, or rounded other operands, misses it (the measured figures: benchmarks/BENCHMARKS.md,
"Parity tolerances").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FLOAT32, state_dict_numpy, torch_model
from flaxdepth import interop, models, objective
from flaxdepth.options import EngineOptions
from flaxdepth.torch_runner import torch_precision
from torch_ref.training import normalize

VARIANT, DEPTH, BATCH = "elu_bn", 6, 256
#: Relative error of all gradients together (see the module docstring for the measured values).
TF32_RTOL = 1.5e-4
#: The loss (measured: 1.3e-6 in train mode, 0 in eval mode); float32's parity tolerance is 1e-4.
LOSS_RTOL = 1e-5


def global_error(actual: dict, expected: dict) -> float:
    """||actual - expected|| / ||expected|| over every tensor of the state dicts together."""
    keys = list(expected)
    diff = sum(np.sum(np.square(np.asarray(actual[k], np.float64) - expected[k])) for k in keys)
    return float(np.sqrt(diff / sum(np.sum(np.square(np.asarray(expected[k], np.float64))) for k in keys)))


def torch_loss_and_grads(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, train_mode: bool,
                         precision: str) -> tuple[float, dict]:
    model.train(train_mode)
    model.zero_grad()
    with torch_precision(precision):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
        loss.backward()
    return loss.item(), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


def jax_loss_and_grads(variables: dict, images: np.ndarray, labels: np.ndarray, train_mode: bool,
                       precision: str, parameter_keys: list[str]) -> tuple[float, dict]:
    model = models.build_model(VARIANT, DEPTH, options=EngineOptions(precision=precision))

    def loss_fn(params):
        outputs = model.apply({**variables, "params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                              train=train_mode, mutable=["batch_stats"])[0]
        return objective.cross_entropy(outputs, jnp.asarray(labels))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    # in torch's keys and layouts: the parameters' entries of a state dict (the buffers are BatchNorm's)
    state_dict = interop.to_torch(VARIANT, DEPTH, {**variables, "params": grads})
    return float(loss), {k: v for k, v in state_dict.items() if k in parameter_keys}


@pytest.mark.parametrize("train_mode", [True, False], ids=["train_mode", "eval_mode"])
def test_tf32_loss_and_gradients_match_torch(train_mode, mnist):
    with FLOAT32.active():
        model = torch_model(VARIANT, DEPTH, FLOAT32)  # BatchNorm state off its defaults, for eval mode
        variables = interop.from_torch(VARIANT, DEPTH, state_dict_numpy(model))
        images = normalize(mnist.train_images[:BATCH]).numpy()
        labels = mnist.train_labels[:BATCH].astype(np.int64)
        torch_loss, torch_grads = torch_loss_and_grads(model, images, labels, train_mode, "tf32")
        loss, grads = jax_loss_and_grads(variables, images, labels, train_mode, "tf32", list(torch_grads))
        float32_loss, float32_grads = torch_loss_and_grads(model, images, labels, train_mode, "highest")
    error, tf32_effect = global_error(grads, torch_grads), global_error(float32_grads, torch_grads)
    loss_error, loss_effect = (abs(x - torch_loss) / abs(torch_loss) for x in (loss, float32_loss))
    print(f"tf32 {'train' if train_mode else 'eval'} mode: gradients {error:.3g} (tf32 against float32: "
          f"{tf32_effect:.3g}), loss {loss_error:.3g} ({loss_effect:.3g})")
    assert tf32_effect > 3 * TF32_RTOL  # else this tolerance could not tell rounding from not rounding
    assert error <= TF32_RTOL
    assert loss_error <= LOSS_RTOL
