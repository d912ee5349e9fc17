"""flaxdepth.models: what the backward pass saves of the scanned layers, and that recomputing the
rest (`EngineOptions.rematerialize`) changes no number, for one model and for replicas trained as
the GPU engine trains them. Parity with torch_ref is parity_tests/."""

from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from flaxdepth import cpu_kernels, models, objective, registry, train
from flaxdepth.options import EngineOptions

DEPTH, BATCH = 12, 8  # 3 scanned layers a stage


def loss_fn(model):
    """Loss and, as auxiliary output, the updated BatchNorm running statistics."""
    def loss(params, batch_stats, images, labels):
        outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                       mutable=["batch_stats"])
        return objective.cross_entropy(outputs, labels), updates
    return loss


def assert_close(actual, expected):
    """Equal to float32 rounding, leaf by leaf: the parity suite's float32 tolerance (rtol 1e-4)
    with an absolute floor at 1e-6 of the tree's largest value (the gradients of biases followed by
    BatchNorm are zero in exact arithmetic and rounding noise here); integers exactly."""
    largest = max((float(jnp.abs(a).max()) for a in jax.tree.leaves(expected)), default=0.0)
    actual_leaves = dict(jax.tree_util.tree_leaves_with_path(actual))
    for path, e in jax.tree_util.tree_leaves_with_path(expected):
        a = actual_leaves[path]
        if jnp.issubdtype(e.dtype, jnp.integer):
            np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6 * largest, err_msg=jax.tree_util.keystr(path))


@functools.lru_cache(maxsize=None)
def problem(variant: str, seed: int = 0):
    """(params, batch_stats, images, labels) of a fresh model: the same for any EngineOptions.
    Initialized as the engine does it, jitted without optimization (eagerly, every random draw
    would be an optimizing compile of its own)."""
    init = functools.partial(models.init_variables, models.build_model(variant, DEPTH))
    variables = jax.jit(init, compiler_options=train.INIT_COMPILER_OPTIONS)(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, registry.NUM_CLASSES, BATCH), jnp.int32)
    return variables["params"], variables.get("batch_stats", {}), images, labels


@pytest.mark.parametrize("variant", registry.VARIANT_NAMES)
@pytest.mark.parametrize("rematerialize", [True, False])
def test_scanned_layers_save_one_array_per_operation(variant, rematerialize):
    """Per scanned layer of the first stage (arrays of shape (layers, N, 28, 28, 4)) the backward
    pass keeps the layer's input and, recomputing the rest, its convolution's output; or, saving
    (flaxdepth.ops), the activation's slope and, with BatchNorm, the centred activations; with
    BatchNorm + activation as the CPU kernel (float32), the convolution's output alone: nothing else of
    that size (JAX's own autodiff kept 3-7)."""
    model = models.build_model(variant, DEPTH, options=EngineOptions(rematerialize=rematerialize))
    params, batch_stats, images, labels = problem(variant)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda *args: loss_fn(model)(*args)[0], params, batch_stats, images, labels)
    stacked = f"[{registry.layers_per_stage(DEPTH) - 1},{BATCH},28,28,4]"
    saved = [line for line in printed.getvalue().splitlines() if stacked in line]
    spec = registry.get_variant(variant)
    fused = spec.batchnorm and spec.activation in cpu_kernels.ACTIVATIONS and cpu_kernels.available()
    expected = 2 if rematerialize or fused else 2 + spec.batchnorm
    assert len(saved) == expected, saved


@pytest.mark.parametrize("variant", registry.VARIANT_NAMES)
def test_rematerialization_changes_no_number(variant):
    """The loss, every gradient and the updated BatchNorm statistics are the same with and without
    recomputing the layers' cheap parts: the same operations on the same values, but XLA fuses the
    two programs differently, so equal to float32 rounding, not bit for bit."""
    params, batch_stats, images, labels = problem(variant)
    results = {}
    for rematerialize in (False, True):
        model = models.build_model(variant, DEPTH, options=EngineOptions(rematerialize=rematerialize))
        results[rematerialize] = jax.jit(jax.value_and_grad(loss_fn(model), has_aux=True))(
            params, batch_stats, images, labels)
    ((loss_saved, stats_saved), grads_saved), ((loss_remat, stats_remat), grads_remat) = results[False], results[True]
    assert float(loss_remat) == pytest.approx(float(loss_saved), rel=1e-6)
    assert_close(grads_remat, grads_saved)
    assert_close(stats_remat, stats_saved)


@pytest.mark.parametrize("bn_train", [True, False], ids=["train", "notebook-eval"])
def test_rematerialization_under_the_gpu_engines_vmap(bn_train):
    """Three elu_bn replicas, one SGD step as the GPU engine runs it (vmapped: conv.py's batching
    rule and custom VJP inside the checkpointed, scanned layers), with and without recomputing:
    the same weights, momentum and BatchNorm statistics after the step, in BatchNorm's train mode
    and in the notebook's eval-mode epochs (running statistics, left unchanged)."""
    seeds, lrs = jnp.arange(3, dtype=jnp.int32), jnp.full(3, 0.05)
    _, _, images, labels = problem("elu_bn")
    init = jax.jit(jax.vmap(lambda s, lr: train.init_state(models.build_model("elu_bn", DEPTH), s, lr)),
                   compiler_options=train.INIT_COMPILER_OPTIONS)
    state = init(seeds, lrs)
    images_u8 = jnp.asarray(np.random.default_rng(1).integers(0, 256, images.shape[:-1]), jnp.uint8)
    states = {}
    for rematerialize in (False, True):
        model = models.build_model("elu_bn", DEPTH, options=EngineOptions(rematerialize=rematerialize))
        step = train.per_replica(lambda s, x, y: train.train_step(model, s, x, y, bn_train), (0, None, None), "gpu")
        states[rematerialize], _ = jax.jit(step)(state, images_u8, labels)
    assert_close(states[True].params, states[False].params)
    assert_close(states[True].opt_state, states[False].opt_state)
    assert_close(states[True].batch_stats, states[False].batch_stats)
