"""flaxdepth.models: what the backward pass saves of the scanned layers, and that recomputing the
rest (`EngineOptions.rematerialize`) changes no number, for one model and for replicas trained as
the GPU engine trains them. Parity with torch_ref is parity_tests/."""

from __future__ import annotations

import contextlib
import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from flaxdepth import cpu_kernels, interop, models, objective, registry, train
from flaxdepth.options import EngineOptions
from registered_variants import REGISTERED_VARIANTS

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


def lean(variant: str) -> bool:
    """Whether every operation of the variant's layers has flaxdepth.ops' lean gradient (or saves
    no more than it): tanh, ELU or ReLU, BatchNorm or none, no gate. Other activations, GroupNorm
    and gated skips keep what JAX's own autodiff keeps."""
    spec = registry.get_variant(variant)
    return spec.activation in ("tanh", "elu", "relu") and spec.norm in ("none", "batch") and spec.residual != "gated"


@pytest.mark.parametrize("variant, rematerialize", [
    pytest.param(v, remat, id=f"{remat}-{v}") for v in REGISTERED_VARIANTS for remat in (True, False)
    if remat or lean(v)])
def test_scanned_layers_save_one_array_per_operation(variant, rematerialize):
    """Per scanned layer of the first stage (arrays of shape (layers, N, 28, 28, channels)) the
    backward pass keeps the layer's input and, recomputing the rest, its convolution's output (every
    variant); or, saving (flaxdepth.ops), the activation's slope and, with BatchNorm, the centred
    activations; with BatchNorm + activation as the CPU kernel (float32), the convolution's output
    alone: nothing else of that size (JAX's own autodiff kept 3-7)."""
    model = models.build_model(variant, DEPTH, options=EngineOptions(rematerialize=rematerialize))
    params, batch_stats, images, labels = problem(variant)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda *args: loss_fn(model)(*args)[0], params, batch_stats, images, labels)
    stacked = f"[{registry.layers_per_stage(DEPTH) - 1},{BATCH},28,28,{registry.get_variant(variant).channels}]"
    saved = [line for line in printed.getvalue().splitlines() if stacked in line]
    spec = registry.get_variant(variant)
    fused = spec.batchnorm and spec.activation in cpu_kernels.ACTIVATIONS and cpu_kernels.available()
    expected = 2 if rematerialize or fused else 2 + spec.batchnorm
    assert len(saved) == expected, saved


@pytest.mark.parametrize("variant", REGISTERED_VARIANTS)
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


# ------------------------------------------------------------------ nested rematerialization

NESTED_DEPTH = 24  # 7 scanned layers a stage: 3 blocks of 3, the last with 2 padding layers


def test_nested_blocks_cover_the_layers_in_about_sqrt_l_blocks_of_about_sqrt_l():
    for layers in range(1, 2000):
        size, blocks = models.nested_blocks(layers)
        assert 0 <= size * blocks - layers < blocks  # padding: less than a layer a block
        assert size <= math.isqrt(layers - 1) + 1 and blocks <= math.isqrt(layers - 1) + 1
    assert models.nested_blocks(3333) == (58, 58)  # k = 10,002


def test_nested_rematerialization_keeps_only_the_block_inputs():
    """Of the first stage's 7 scanned layers (arrays (.., N, 28, 28, 4)), the backward pass keeps
    the input of each of the 3 blocks; nothing stacked over all 7, as the plain engine keeps."""
    variant = "tanh"
    model = models.build_model(variant, NESTED_DEPTH, options=EngineOptions(rematerialize="nested"))
    init = functools.partial(models.init_variables, models.build_model(variant, NESTED_DEPTH))
    variables = jax.eval_shape(init, jax.random.key(0))
    images, labels = jnp.zeros((BATCH, 28, 28, 1)), jnp.zeros(BATCH, jnp.int32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda *args: loss_fn(model)(*args)[0], variables["params"], {}, images, labels)
    stacked = [line.split()[0] for line in printed.getvalue().splitlines() if f",{BATCH},28,28,4]" in line]
    assert stacked == ["f32[3,8,28,28,4]"], stacked


def test_nested_rematerialization_initializes_as_the_plain_engine():
    """The same initialization program, so the same parameters and BatchNorm statistics."""
    def init_program(mode):
        model = models.build_model("elu_bn", NESTED_DEPTH, options=EngineOptions(rematerialize=mode))
        return str(jax.make_jaxpr(functools.partial(models.init_variables, model))(jax.random.key(0)))

    assert init_program("nested") == init_program("none")


def test_nested_rematerialization_is_the_plain_engine_in_float64():
    """Blocks with padding layers (7 layers in 3 blocks of 3): in float64 the same loss, gradients
    and updated BatchNorm statistics as the plain engine, to 1e-13 (the same operations on the same
    values; only XLA's fusion may differ). Any variables serve, so random ones of the right shapes."""
    with jax.enable_x64(True):
        model = models.build_model("elu_bn", NESTED_DEPTH)
        shapes = jax.eval_shape(functools.partial(models.init_variables, model, dtype=jnp.float64), jax.random.key(0))
        rng = np.random.default_rng(0)
        variables = jax.tree.map(lambda a: jnp.asarray(np.abs(rng.normal(0.5, 0.3, a.shape)) if jnp.issubdtype(
            a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype)), shapes)
        images = jnp.asarray(rng.normal(size=(2, 28, 28, 1)))
        labels = jnp.asarray(rng.integers(0, registry.NUM_CLASSES, 2), jnp.int32)
        results = {}
        for mode in ("none", "nested"):
            model = models.build_model("elu_bn", NESTED_DEPTH, options=EngineOptions(rematerialize=mode))
            # unoptimized programs: they compile in half the time, and compute the same operations
            results[mode] = jax.jit(jax.value_and_grad(loss_fn(model), has_aux=True),
                                    compiler_options=train.INIT_COMPILER_OPTIONS)(
                variables["params"], variables["batch_stats"], images, labels)
    results = jax.tree.map(np.asarray, results)
    (loss, stats), grads = results["nested"]
    (loss_plain, stats_plain), grads_plain = results["none"]
    assert jax.tree.structure(grads) == jax.tree.structure(grads_plain)
    assert float(loss) == pytest.approx(float(loss_plain), rel=1e-13)
    for actual, expected in ((grads, grads_plain), (stats, stats_plain)):
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            assert e.dtype in (np.float64, np.int32)
            np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-13 * np.abs(e).max())


def test_nested_variables_keep_the_interop_layout():
    """A nested model's variables are the plain model's: interop's torch state_dict keys and shapes."""
    model = models.build_model("elu_bn", NESTED_DEPTH, options=EngineOptions(rematerialize="nested"))
    variables = jax.eval_shape(functools.partial(models.init_variables, model), jax.random.key(0))
    arrays = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
    exported = interop.to_torch("elu_bn", NESTED_DEPTH, arrays)
    assert {k: v.shape for k, v in exported.items()} == {
        s.torch_key: s.torch_shape for s in interop.layout("elu_bn", NESTED_DEPTH)}


def test_rematerialization_is_a_choice_of_three_with_the_boolean_kept():
    assert EngineOptions(rematerialize=True) == EngineOptions(rematerialize="layers")
    assert EngineOptions(rematerialize=False) == EngineOptions()
    assert EngineOptions().rematerialize == "none"
    with pytest.raises(ValueError, match="rematerialize"):
        EngineOptions(rematerialize="blocks")
    with pytest.raises(ValueError, match="auto"):
        models.build_model("tanh", 6, options=EngineOptions(rematerialize="auto"))


def test_the_automatic_choice_is_the_fastest_that_fits():
    spec = registry.get_variant("elu_bn")  # BatchNorm: "layers" keeps one array a layer fewer than "none"
    need = {mode: models.step_memory_bytes(spec, 3000, 256, 4, mode) for mode in ("none", "layers", "nested")}
    assert need["none"] > need["layers"] > need["nested"]
    # memory per step: linear in the depth and the batch without nesting, ~sqrt(depth) with it
    assert models.step_memory_bytes(spec, 30000, 256, 4, "none") > 9 * need["none"]
    assert models.step_memory_bytes(spec, 30000, 256, 4, "nested") < 4 * need["nested"]
    assert models.step_memory_bytes(spec, 3000, 512, 4, "none") > 1.9 * need["none"]

    def choice(available, concurrent=1):
        return models.choose_rematerialization(spec, 3000, 256, 4, available, concurrent)

    room = {mode: need[mode] / models.MEMORY_FRACTION for mode in need}
    assert [choice(room["none"]), choice(room["none"] - 1), choice(room["layers"] - 1), choice(1)] == \
        ["none", "layers", "nested", "nested"]
    # two steps at once share the memory
    assert choice(2 * room["none"], concurrent=2) == "none" != choice(2 * room["none"] - 1, concurrent=2)
    assert choice(None) == "none"  # nothing known: the plain engine


def test_step_options_resolve_auto_before_any_program(monkeypatch):
    """train.step_options turns "auto" into a concrete choice from the device's available memory,
    which compiled_functions' model (and so its cache key) carries; concrete options pass as they are."""
    auto = EngineOptions(rematerialize="auto", cpu_kernels=False)
    monkeypatch.setattr(train, "available_memory", lambda device: 10**15)
    assert train.step_options(auto, "tanh", 30, 8) == EngineOptions(rematerialize="none", cpu_kernels=False)
    monkeypatch.setattr(train, "available_memory", lambda device: 10**6)
    assert train.step_options(auto, "tanh", 30, 8).rematerialize == "nested"
    assert train.step_options(EngineOptions(rematerialize="layers"), "tanh", 30, 8).rematerialize == "layers"
    model = train.compiled_functions("tanh", 30, 8, options=auto)[0]
    assert model.options.rematerialize == "nested"
    assert train.available_memory(jax.devices("cpu")[0]) > 0


def test_torch_ref_draws_orthogonal_inits_on_one_thread_without_changing_them(monkeypatch):
    """torch_ref.build initializes its convs on one intra-op thread (each QR of an orthogonal init
    would pay the thread pool's start): one seed draws the same weights as on the caller's two
    threads, and the caller's thread count is restored."""
    import contextlib

    import torch
    import torch_ref

    spec = registry.Variant("t_delta", "tanh", init="delta_orthogonal", bias_std=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        built = torch_ref.build(spec, 12).state_dict()
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch_ref.models, "_one_thread", contextlib.nullcontext)
        torch.manual_seed(0)
        on_two_threads = torch_ref.build(spec, 12).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(built[key], on_two_threads[key]) for key in on_two_threads)


def test_torch_ref_load_weights_is_load_state_dict():
    """torch_ref.load_weights (linear in the entries; torch's own load_state_dict is quadratic in
    depth) leaves a model as load_state_dict does, cast to its dtype; a missing entry is an error."""
    import torch
    import torch_ref

    state_dict = {key: np.asarray(value.numpy() + 1)
                  for key, value in torch_ref.build("elu_bn", 9).state_dict().items()}
    expected = torch_ref.build("elu_bn", 9).double()
    expected.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()})
    loaded = torch_ref.load_weights(torch_ref.build("elu_bn", 9).double(), state_dict).state_dict()
    assert all(torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype
               for key, value in expected.state_dict().items())
    del state_dict["fc.bias"]
    with pytest.raises(RuntimeError, match="missing fc.bias"):
        torch_ref.load_weights(torch_ref.build("elu_bn", 9), state_dict)
