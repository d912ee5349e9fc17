"""A checkpoint saved from the notebook's own classes loads into torch_ref unchanged.

The notebook's classes are quoted verbatim in notebook_models.py. Loading is strict, and both
models then compute bit-identical outputs, gradients and BatchNorm updates (same weights, same
ops, so exact equality, not a tolerance). The last test takes the same kind of checkpoint on
through flaxdepth.interop into Flax, which must agree with torch_ref to float32 rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import torch_ref
from conftest import FLOAT32, assert_close, assert_state_dicts_close, record, state_dict_numpy
from flaxdepth import interop, registry
from flaxdepth.data import normalize

VARIANTS = registry.VARIANT_NAMES
# 7 and 32 are not multiples of 3; 32 also gives every stage ten residual blocks.
DEPTHS = (3, 7, 32)


@pytest.fixture(scope="module")
def notebook():
    # Loaded by path, so that this works whether or not parity_tests/ becomes a package.
    path = Path(__file__).with_name("notebook_models.py")
    spec = importlib.util.spec_from_file_location("_notebook_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook_model(notebook, variant, k):
    return getattr(notebook, registry.VARIANTS[variant].notebook_class)(k)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_notebook_checkpoint_loads_strictly_and_computes_the_same(variant, k, notebook, tmp_path):
    torch.manual_seed(1)
    theirs = _notebook_model(notebook, variant, k)
    path = tmp_path / f"{variant}_{k}.pt"
    torch.save(theirs.state_dict(), path)

    torch.manual_seed(2)  # other weights, so that the load has to do the work
    ours = torch_ref.build(variant, k)
    result = ours.load_state_dict(torch.load(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(theirs, ours)
    # Same module tree, class names included (repr lists every submodule and its settings).
    assert repr(ours) == repr(theirs)

    x = torch.randn(8, 1, 28, 28)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        for a, b in zip(_outputs(theirs, x), _outputs(ours, x), strict=True):
            assert torch.equal(a, b)

    # Train mode: batch statistics, running-stat updates and gradients agree too.
    theirs.train(), ours.train()
    for model in (theirs, ours):
        sum(o.square().sum() for o in _outputs(model, x)).backward()
    _assert_same_state(theirs, ours)
    for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_ref_checkpoint_loads_into_the_notebook_class(variant, notebook, tmp_path):
    ours = torch_ref.build(variant, 7)
    path = tmp_path / "ours.pt"
    torch.save(ours.state_dict(), path)
    theirs = _notebook_model(notebook, variant, 7)
    theirs.load_state_dict(torch.load(path), strict=True)
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_draws_the_notebooks_weights(variant, k, notebook):
    # Modules are built and initialized in the notebook's order, and sigma is the same float,
    # so one seed gives both classes bit-identical initial weights.
    torch.manual_seed(3)
    theirs = _notebook_model(notebook, variant, k)
    torch.manual_seed(3)
    ours = torch_ref.build(variant, k)
    _assert_same_state(theirs, ours)


# ---- the same checkpoint through flaxdepth.interop into Flax ----

# 31 is not a multiple of 3 (k // 3 = 10 layers per stage) and is test_parity.py's float32 depth:
# the same compiled programs serve both tests.
FLAX_DEPTHS = (31,)


@pytest.fixture(scope="module")
def digits(request):
    """16 real MNIST training digits, normalized as the notebook feeds them (NCHW float32);
    random pixels where MNIST is not available, so that the test still runs."""
    try:
        images = request.getfixturevalue("mnist").train_images[:16]
    except pytest.skip.Exception:
        images = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    return normalize(images, np.float32)


@pytest.mark.parametrize("k", FLAX_DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_notebook_checkpoint_gives_the_same_logits_in_flax(variant, k, notebook, digits, tmp_path):
    torch.manual_seed(4)
    theirs = _notebook_model(notebook, variant, k)
    x = torch.from_numpy(digits)
    with torch.no_grad():
        # As after training: BatchNorm affine weights and running statistics off their defaults
        # (one train-mode forward sets the statistics and num_batches_tracked the notebook's way).
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        theirs.train()
        theirs(x)
    path = tmp_path / f"{variant}_{k}.pt"
    torch.save(theirs.state_dict(), path)

    ours = torch_ref.build(variant, k)
    ours.load_state_dict(torch.load(path), strict=True)
    with jax.enable_x64(False):  # float32 on both sides, whatever JAX's x64 mode in this process
        variables = interop.from_torch(variant, k, torch.load(path))
        modes = (False, True) if registry.VARIANTS[variant].batchnorm else (False,)
        for train_mode in modes:
            ours.train(train_mode)
            with torch.no_grad():
                expected = _outputs(ours, x)
            logits, new_variables = interop.apply(variant, k, variables, digits, train=train_mode)
            logits = logits if isinstance(logits, tuple) else (logits,)
            assert len(logits) == len(expected)
            for head, (a, e) in enumerate(zip(logits, expected)):
                record(variant, FLOAT32, assert_close(
                    a, e.numpy(), FLOAT32.rtol, f"{variant} k={k} train={train_mode} head {head}"))
            if train_mode:  # and the running statistics move the same way
                record(variant, FLOAT32, assert_state_dicts_close(
                    interop.to_torch(variant, k, new_variables), state_dict_numpy(ours),
                    FLOAT32.rtol, f"{variant} k={k} state after train forward"))
