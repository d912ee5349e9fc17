"""The training loop, flaxdepth == torch_ref: whole runs of the notebook's protocol.

For every variant (and, with BatchNorm, with the notebook's missing `model.train()` and
without it), flaxdepth's engine (`train.train_replicas`: scanned epochs over device-side
orders, the partial last batch as its own step, the train error accumulated batch by batch
before each update, the eval-mode test pass) and torch_ref's notebook loop, driven by
`torch_runner.train_torch_runs` with the same initial weights and the same batch order per
epoch, must report the same per-epoch train and test errors.

The subset is small but exercises every edge: 150 = 2 * 64 + 22 training images, so each epoch
ends with a partial batch, and 100 = 64 + 36 test images, a partial test batch too. (Small
batches keep float64 fast: XLA's float64 CPU convolution is a plain loop nest.)

float64: the same misclassified samples, exactly. Both frameworks then agree to ~1e-12 on every
logit (see test_parity.py), so a differing argmax would need two logits tied to 1e-12: any
difference is a bug. The comparison is on the counts that the error figures encode
(error = 1 - correct / N; for elu_multihead correct is the mean over three heads), because
the figures themselves may differ in the last bit: XLA may divide by the constant N as a
multiplication by 1/N.

float32: the frameworks' rounding differs by ~1e-6 relative (other summation orders in convs,
reductions and BatchNorm statistics) and grows over the SGD steps, so a sample whose two top
logits are that close can flip its argmax. At most FLOAT32_FLIPS such samples per figure are
allowed; a wrong loop moves them by more (the negative control at the end: BatchNorm in the
wrong mode in epoch 2, or the epochs' batch orders swapped, each move some figure by more).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxdepth import data, interop, registry, torch_runner, train
from flaxdepth.config import RunConfig
from conftest import FLOAT32, FLOAT64

#: Two layers per stage: the first conv and a scanned layer (a ResNet block adding its input);
#: deeper scans compile the same program and are compared layer by layer in test_parity.py.
DEPTH = 6
TRAIN_IMAGES, TEST_IMAGES, BATCH_SIZE, EPOCHS = 150, 100, 64, 2
SEED = 0
#: Allowed argmax flips per error figure in float32 (see the module docstring).
FLOAT32_FLIPS = 3

class NotFloat64(Exception):
    """The engine's training state is not all float64 in x64 mode (flax creates Conv and Dense
    parameters in float32 unless models.init_variables casts them)."""


#: Every notebook variant, in both BatchNorm protocols where it has BatchNorm (without it the quirk
#: changes nothing and would compile a second, identical epoch program). The loop is the same for
#: every spec but for the BatchNorm mode and the heads, which these cover; declared variants' models
#: are proven step by step in test_parity.py.
CASES = [
    pytest.param(v, quirks, precision, id=f"{v}-{'notebook_quirks' if quirks else 'train_mode'}-{precision.name}")
    for v in registry.VARIANT_NAMES
    for quirks in ((True, False) if registry.get_variant(v).batchnorm else (False,))
    for precision in (FLOAT64, FLOAT32)
]


@pytest.fixture(scope="module")
def small_mnist(mnist) -> data.Dataset:
    return data.subset(mnist, TRAIN_IMAGES, TEST_IMAGES)


def engine_initial_state(variant: str, seed: int, lr: float) -> train.TrainState:
    """The state train_replicas starts a run from (the same compiled init, same arguments)."""
    _, init, _, _ = train.compiled_functions(variant, DEPTH, BATCH_SIZE)
    return init(jnp.asarray([seed], jnp.int32), jnp.asarray([lr], jnp.result_type(float)))


def check_float64(state: train.TrainState) -> None:
    """Every floating array of the state (parameters, statistics, momentum) is float64, or the
    float64 comparison would compare float32 updates with torch's float64 ones."""
    wrong = [f"{jax.tree_util.keystr(path)}: {leaf.dtype}"
             for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float64]
    if wrong:
        raise NotFloat64(f"{len(wrong)} arrays are not float64 under jax_enable_x64, e.g. " + ", ".join(wrong[:4]))


def misclassified(errors: list[float], n: int, heads: int) -> np.ndarray:
    """Per-epoch misclassified samples (summed over heads) that the error figures encode."""
    counts = np.asarray(errors, np.float64) * n * heads
    np.testing.assert_allclose(counts, np.rint(counts), atol=0.01, err_msg="not a count / N")
    return np.rint(counts).astype(int)


@pytest.mark.parametrize("variant, notebook_quirks, precision", CASES)
def test_training_loop_errors_match(variant, notebook_quirks, precision, small_mnist):
    spec = registry.get_variant(variant)
    runs = [(SEED, spec.lr)]  # the variant's own lr: 0.05 (0.005 for two), enough to move weights
    heads = 3 if spec.multihead else 1
    with precision.active(), jax.default_matmul_precision("highest"):
        # Same initial weights: torch_runner's initial_state_dict is the engine's init, exported.
        state = engine_initial_state(variant, SEED, spec.lr)
        if precision is FLOAT64:
            check_float64(state)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if not spec.batchnorm:
            variables.pop("batch_stats")
        engine_weights = interop.to_torch(variant, DEPTH, jax.tree.map(lambda a: a[0], variables))
        torch_weights = torch_runner.initial_state_dict(variant, DEPTH, SEED)
        assert list(engine_weights) == list(torch_weights)
        for key in torch_weights:
            np.testing.assert_array_equal(engine_weights[key], torch_weights[key], err_msg=key)

        run = RunConfig(variant, epochs=EPOCHS, batch_size=BATCH_SIZE, notebook_quirks=notebook_quirks)
        [ours] = train.train_replicas(run, DEPTH, train.DeviceData.put(small_mnist), runs)
        [ref] = torch_runner.train_torch_runs(run, DEPTH, small_mnist, runs, device="cpu", dtype=precision.torch_dtype)

    print(f"{variant} quirks={notebook_quirks} {precision.name}: train errors flaxdepth {ours.train_errors} "
          f"torch_ref {ref.train_errors}; test errors flaxdepth {ours.test_errors} torch_ref {ref.test_errors}")
    assert ours.finite and ref.finite
    # The runs must really train, or equal errors would prove little: the model's predictions
    # change from one epoch to the next. Except at or past the notebook's deepest trainable depth
    # (tanh: k = 6), where 150 images and two epochs leave it predicting one class throughout.
    if DEPTH < spec.notebook_pair[0]:
        assert ours.train_errors[0] != ours.train_errors[1] or ours.test_errors[0] != ours.test_errors[1]

    for figure, n, a, b in (("train", TRAIN_IMAGES, ours.train_errors, ref.train_errors),
                            ("test", TEST_IMAGES, ours.test_errors, ref.test_errors)):
        ours_wrong, ref_wrong = misclassified(a, n, heads), misclassified(b, n, heads)
        what = f"{figure} errors per epoch: flaxdepth {a}, torch_ref {b}"
        if precision is FLOAT64:
            np.testing.assert_array_equal(ours_wrong, ref_wrong, err_msg=what)
        else:
            # One flipped argmax changes a single-head count by 1 and a multihead sum by 1 (of 3n).
            assert np.abs(ours_wrong - ref_wrong).max() <= FLOAT32_FLIPS * heads, what


def test_epoch_order_loader_gives_each_epoch_its_order():
    """torch_ref's train() calls iter() on the loader once up front (to reject one-shot
    iterators); that call must not consume an epoch's order, or epoch e trains on order e + 1."""
    orders = [np.array([2, 0, 1]), np.array([1, 2, 0]), np.array([0, 1, 2])]
    loader = torch_runner.EpochOrderLoader(torch.zeros(3, 1), np.array([10, 11, 12]), orders, batch_size=2)
    assert iter(loader) is not loader  # the up-front check, as training._check_reiterable makes it
    for order in orders:
        labels = torch.cat([target for _, target in loader]).numpy()
        np.testing.assert_array_equal(labels, 10 + order)


def test_float32_allowance_would_catch_a_wrong_loop(small_mnist, monkeypatch):
    """Negative control for FLOAT32_FLIPS, on torch_ref alone (the engine equals it, as shown
    above): two plausible loop mistakes, BatchNorm in train mode in the second epoch where the
    notebook trains in eval mode, and the two epochs' batch orders swapped, each move some error
    figure by more than the float32 allowance."""
    variant = "elu_bn"
    lr = registry.get_variant(variant).lr

    def misclassified_per_figure(notebook_quirks=True) -> np.ndarray:
        [run] = torch_runner.train_torch_runs(
            RunConfig(variant, epochs=EPOCHS, batch_size=BATCH_SIZE, notebook_quirks=notebook_quirks), DEPTH,
            small_mnist, [(SEED, lr)], device="cpu", dtype=torch.float32)
        return np.concatenate([misclassified(run.train_errors, TRAIN_IMAGES, 1),
                               misclassified(run.test_errors, TEST_IMAGES, 1)])

    with FLOAT32.active():
        right = misclassified_per_figure()
        wrong = {"train-mode BatchNorm in epoch 2": misclassified_per_figure(notebook_quirks=False)}
        orders = train.epoch_orders
        monkeypatch.setattr(train, "epoch_orders", lambda seeds, epoch, n: orders(seeds, EPOCHS - 1 - epoch, n))
        wrong["epoch orders swapped"] = misclassified_per_figure()
    for mistake, counts in wrong.items():
        print(f"{mistake}: misclassified {counts.tolist()} against {right.tolist()}")
        assert np.abs(counts - right).max() > FLOAT32_FLIPS, mistake
