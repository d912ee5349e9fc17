"""flaxdepth.models: what the backward pass saves of the scanned layers, and that recomputing the
rest (`models.REMATERIALIZE_LAYERS`) changes no number. Parity with torch_ref is parity_tests/."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from flaxdepth import models, objective, registry

DEPTH, BATCH = 12, 8  # 3 scanned layers a stage


def loss_fn(model):
    def loss(params, batch_stats, images, labels):
        outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                 mutable=["batch_stats"])
        return objective.cross_entropy(outputs, labels)
    return loss


def problem(variant: str, seed: int = 0):
    model = models.build_model(variant, DEPTH)
    variables = models.init_variables(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, registry.NUM_CLASSES, BATCH), jnp.int32)
    return model, variables["params"], variables.get("batch_stats", {}), images, labels


@pytest.mark.parametrize("variant", registry.VARIANT_NAMES)
@pytest.mark.parametrize("rematerialize, expected", [(True, 2), (False, None)])
def test_scanned_layers_save_their_input_and_conv_output(monkeypatch, variant, rematerialize, expected):
    """Per scanned layer of the first stage (arrays of shape (layers, N, 28, 28, 4)) the backward
    pass keeps the layer's input and its convolution's output, nothing else of that size; saving
    everything keeps more for every variant with an activation to differentiate."""
    monkeypatch.setattr(models, "REMATERIALIZE_LAYERS", rematerialize)
    model, params, batch_stats, images, labels = problem(variant)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss_fn(model), params, batch_stats, images, labels)
    stacked = f"[{registry.layers_per_stage(DEPTH) - 1},{BATCH},28,28,4]"
    saved = [line for line in printed.getvalue().splitlines() if stacked in line]
    if expected is None:
        assert len(saved) > 2
    else:
        assert len(saved) == expected, saved


@pytest.mark.parametrize("variant", registry.VARIANT_NAMES)
def test_rematerialization_changes_no_number(monkeypatch, variant):
    """The loss and every gradient are the same with and without recomputing the layers' cheap
    parts: the same operations on the same values, but XLA fuses the two programs differently, so
    equal to float32 rounding, not bit for bit. Tolerance as the parity suite's float32 one
    (rtol 1e-4), with an absolute floor at 1e-6 of the largest gradient: the gradients of biases
    followed by BatchNorm are zero in exact arithmetic and rounding noise here."""
    model, params, batch_stats, images, labels = problem(variant)
    results = {}
    for rematerialize in (False, True):
        monkeypatch.setattr(models, "REMATERIALIZE_LAYERS", rematerialize)
        # a fresh jit each time: the setting is read when the program is traced
        results[rematerialize] = jax.jit(jax.value_and_grad(loss_fn(model)))(params, batch_stats, images, labels)
    (loss_saved, grads_saved), (loss_remat, grads_remat) = results[False], results[True]
    assert float(loss_remat) == pytest.approx(float(loss_saved), rel=1e-6)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_saved))
    remat_leaves = dict(jax.tree_util.tree_leaves_with_path(grads_remat))
    for path, saved in jax.tree_util.tree_leaves_with_path(grads_saved):
        np.testing.assert_allclose(remat_leaves[path], saved, rtol=1e-4, atol=1e-6 * largest,
                                   err_msg=jax.tree_util.keystr(path))
