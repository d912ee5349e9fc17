"""flaxdepth == torch_ref: shapes, exact round trips, forward, BatchNorm updates, loss, gradients
and 20-step SGD trajectories, for every variant at every parity depth, in float64 and float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from flaxdepth import interop, models, registry, train
from flaxdepth.data import normalize
from conftest import (PARITY_DEPTHS, assert_close, assert_state_dicts_close, record, state_dict_numpy,
                      torch_model)

pytestmark = pytest.mark.parametrize("depth", PARITY_DEPTHS)
VARIANTS = pytest.mark.parametrize("variant", registry.VARIANT_NAMES)


def torch_outputs(output) -> list[np.ndarray]:
    heads = output if isinstance(output, tuple) else (output,)
    return [h.detach().cpu().numpy() for h in heads]


def flax_outputs(output) -> list[np.ndarray]:
    return list(output) if isinstance(output, tuple) else [output]


def notebook_loss(output, target: torch.Tensor) -> torch.Tensor:
    """CrossEntropyLoss; for three heads (loss1 + loss2 + loss3) / 3, as the notebook writes it."""
    heads = output if isinstance(output, tuple) else (output,)
    return sum(torch.nn.functional.cross_entropy(h, target) for h in heads) / len(heads)


@VARIANTS
def test_parameter_shapes_and_counts(variant, depth):
    # Shapes only: eval_shape skips compiling the random initializers.
    shapes = jax.eval_shape(functools.partial(models.init_variables, models.build_model(variant, depth)),
                            jax.random.key(0))
    flax_variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    exported = interop.to_torch(variant, depth, flax_variables)
    model = torch_ref.build(variant, depth)
    assert {k: v.shape for k, v in exported.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(exported) == list(model.state_dict())
    flax_count = sum(a.size for a in jax.tree.leaves(flax_variables["params"]))
    assert flax_count == sum(p.numel() for p in model.parameters())


@VARIANTS
def test_round_trip_is_exact(variant, depth, precision):
    state_dict = state_dict_numpy(torch_model(variant, depth, precision))
    back = interop.to_torch(variant, depth, interop.from_torch(variant, depth, state_dict))
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@VARIANTS
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_forward_and_batchnorm_statistics(variant, depth, precision, train_mode, mnist_batches):
    model = torch_model(variant, depth, precision)
    variables = interop.from_torch(variant, depth, state_dict_numpy(model))
    images = normalize(mnist_batches[0][0], precision.numpy_dtype)
    model.train(train_mode)
    with torch.no_grad():
        expected = torch_outputs(model(torch.from_numpy(images)))
    logits, new_variables = interop.apply(variant, depth, variables, images, train=train_mode)
    errors = [assert_close(a, e, precision.rtol, f"logits head {i}")
              for i, (a, e) in enumerate(zip(flax_outputs(logits), expected))]
    # After a train-mode forward torch has updated the running statistics: so must flaxdepth.
    errors.append(assert_state_dicts_close(
        interop.to_torch(variant, depth, new_variables), state_dict_numpy(model), precision.rtol, "state"))
    record(variant, precision, max(errors))


@VARIANTS
def test_loss_and_gradients(variant, depth, precision, mnist_batches):
    model = torch_model(variant, depth, precision).train()
    variables = interop.from_torch(variant, depth, state_dict_numpy(model))
    images = normalize(mnist_batches[0][0], precision.numpy_dtype)
    labels = mnist_batches[1][0]
    torch_loss = notebook_loss(model(torch.from_numpy(images)), torch.from_numpy(labels))
    torch_loss.backward()
    expected_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    loss, grads = interop.loss_and_grads(variant, depth, variables, images, labels)
    errors = [assert_close(loss, torch_loss.item(), precision.rtol, "loss")]
    assert list(grads) == list(expected_grads)
    errors.append(assert_state_dicts_close(grads, expected_grads, precision.rtol, "grad"))
    record(variant, precision, max(errors))


TRAJECTORY_STEPS = 20


@VARIANTS
def test_sgd_momentum_trajectory(variant, depth, precision, mnist_batches):
    """20 steps of torch.optim.SGD(momentum=0.9) against flaxdepth's jitted train_step on the same
    batches: losses and every parameter and statistic compared after every step."""
    spec = registry.get_variant(variant)
    model = torch_model(variant, depth, precision).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    variables = interop.from_torch(variant, depth, state_dict_numpy(model))
    flax_model = models.build_model(variant, depth)
    state = train.TrainState(variables["params"], variables.get("batch_stats", {}),
                             train.optimizer_init(variables["params"], spec.lr))
    step = jax.jit(lambda s, x, y: train.train_step(flax_model, s, x, y, bn_train=True))

    images, labels = mnist_batches
    errors = []
    with jax.default_matmul_precision("highest"):
        for i in range(TRAJECTORY_STEPS):
            x = torch.from_numpy(normalize(images[i], precision.numpy_dtype))
            loss = notebook_loss(model(x), torch.from_numpy(labels[i]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            state, metrics = step(state, jnp.asarray(images[i]), jnp.asarray(labels[i]))
            errors.append(assert_close(metrics["loss"], loss.item(), precision.rtol, f"loss at step {i}"))
            exported = interop.to_torch(variant, depth, {"params": state.params, "batch_stats": state.batch_stats}
                                        if spec.batchnorm else {"params": state.params})
            errors.append(assert_state_dicts_close(exported, state_dict_numpy(model), precision.rtol,
                                                   f"after step {i}:"))
    record(variant, precision, max(errors))
