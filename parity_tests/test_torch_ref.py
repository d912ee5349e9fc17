"""torch_ref against the notebook: architecture, initialization, forward, and training loop.

Parametrized over registry.VARIANT_NAMES, so a variant added to the registry without a model
fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torch_ref
from flaxdepth import registry
from torch_ref import training

VARIANTS = registry.VARIANT_NAMES
# 31 is >= 30 and not a multiple of 3 (the notebook's k = 139 is not either).
DEPTHS = (3, 6, 9, 31)
BN_VARIANTS = tuple(n for n in VARIANTS if registry.VARIANTS[n].batchnorm)


def _load_notebook_module():
    # By path, so that this works whether or not parity_tests/ becomes a package.
    path = Path(__file__).with_name("notebook_models.py")
    spec = importlib.util.spec_from_file_location("_notebook_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def notebook():
    return _load_notebook_module()


@pytest.fixture(scope="module")
def tiny_data():
    """40 random 'images' with random labels: 16 + 16 + a partial batch of 8."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(40, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    train = list(training.batches(images, labels, torch.randperm(40, generator=g), 16))
    test = list(training.batches(images[:24], labels[:24], list(range(24)), 16))
    return train, test


# ---------------------------------------------------------------------------- registry glue


def test_model_classes_cover_the_registry():
    assert tuple(torch_ref.MODEL_CLASSES) == VARIANTS
    for name, cls in torch_ref.MODEL_CLASSES.items():
        assert cls.__name__ == registry.VARIANTS[name].notebook_class
        assert getattr(torch_ref, cls.__name__) is cls
    assert torch_ref.ResidualBlock.__name__ == "ResidualBlock"
    assert torch_ref.ResidualBlock_noBN.__name__ == "ResidualBlock_noBN"


@pytest.mark.parametrize("variant", VARIANTS)
def test_build(variant):
    model = torch_ref.build(variant, 6)
    assert type(model) is torch_ref.MODEL_CLASSES[variant]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_toml_copy_of_a_builtin_draws_the_same_weights_with_the_same_keys(variant, tmp_path):
    """A built-in's fields declared in a TOML file under another name build a generic DepthCNN
    that creates and initializes its modules in the notebook's order: under the same torch seed,
    the same state_dict keys and bit-identical weights as the notebook's class."""
    fields = {k: v for k, v in registry.VARIANTS[variant].fields().items() if k not in ("notebook_class", "notebook_pair")}
    (tmp_path / "copy.toml").write_text(f"[variants.{variant}_copy]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    [name] = registry.load_variants(tmp_path / "copy.toml")
    try:
        for k in (6, 10):  # residual blocks nested on residual blocks from k = 9
            torch.manual_seed(k)
            original = torch_ref.build(variant, k).state_dict()
            torch.manual_seed(k)
            copy = torch_ref.build(name, k)
            assert type(copy) is torch_ref.DepthCNN
            assert list(copy.state_dict()) == list(original)
            for key, value in copy.state_dict().items():
                assert torch.equal(value, original[key]), key
    finally:
        registry.unregister(name)


def test_build_rejects_unknown_variant():
    with pytest.raises(registry.UnknownVariantError, match="choose one of"):
        torch_ref.build("tahn", 6)


@pytest.mark.parametrize("k", [2, 0, -3, 3.0, True, "9"])
def test_bad_depth_rejected(k):
    with pytest.raises(ValueError):
        torch_ref.CNNtanh(k)


def test_bad_fan_rejected():
    with pytest.raises(ValueError, match="fan"):
        torch_ref.build("elu", 3, fan="sideways")


# ------------------------------------------------------------------------------ architecture


def _expected_shapes(variant: str, k: int) -> dict[str, tuple[int, ...]]:
    """The notebook's state_dict keys and shapes, derived from its code by hand."""
    v = registry.VARIANTS[variant]
    n = k // 3
    expected: dict[str, tuple[int, ...]] = {}
    for s in range(3):
        c_out = 4 * 2**s
        for i in range(n):
            c_in = (1 if s == 0 else c_out // 2) if i == 0 else c_out
            if v.skip:  # stage Sequential -> [Sequential | ResidualBlock.block] -> conv, bn
                unit = f"conv_stages.{s}.{i}." + ("" if i == 0 else "block.")
                conv, bn = unit + "0", unit + "1"
            else:  # one flat Sequential: conv, [bn,] act, conv, [bn,] act, ..., pool
                width = 3 if v.batchnorm else 2
                conv, bn = f"conv_stages.{s}.{i * width}", f"conv_stages.{s}.{i * width + 1}"
            expected[f"{conv}.weight"] = (c_out, c_in, 3, 3)
            expected[f"{conv}.bias"] = (c_out,)
            if v.batchnorm:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    expected[f"{bn}.{p}"] = (c_out,)
                expected[f"{bn}.num_batches_tracked"] = ()
    heads = {"fc1": 4 * 14 * 14, "fc2": 8 * 7 * 7, "fc3": 16 * 3 * 3} if v.multihead else {"fc": 144}
    for head, fan_in in heads.items():
        expected[f"{head}.weight"] = (10, fan_in)
        expected[f"{head}.bias"] = (10,)
    return expected


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes(variant, k):
    model = torch_ref.build(variant, k)
    got = [(key, tuple(t.shape)) for key, t in model.state_dict().items()]
    assert got == list(_expected_shapes(variant, k).items())


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_structure(variant, k):
    v = registry.VARIANTS[variant]
    model = torch_ref.build(variant, k)
    assert len(model.conv_stages) == 3
    act = nn.Tanh if v.activation == "tanh" else nn.ELU
    for stage in model.conv_stages:
        assert isinstance(stage, nn.Sequential)
        pool = stage[-1]
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
        units = list(stage)[:-1]
        if v.skip:
            block = torch_ref.ResidualBlock if v.batchnorm else torch_ref.ResidualBlock_noBN
            assert type(units[0]) is nn.Sequential
            assert all(type(u) is block for u in units[1:])
            units = [units[0]] + [u.block for u in units[1:]]
            assert len(units) == k // 3
            modules = [m for u in units for m in u]
        else:
            modules = units
        width = 3 if v.batchnorm else 2
        assert len(modules) == width * (k // 3)
        for i in range(0, len(modules), width):
            conv = modules[i]
            assert isinstance(conv, nn.Conv2d)
            assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
            if v.batchnorm:
                assert isinstance(modules[i + 1], nn.BatchNorm2d)
            assert type(modules[i + width - 1]) is act


# ---------------------------------------------------------------------------- initialization
# torch_ref's initialization is the notebook's bit for bit (same seed, same weights:
# test_notebook_checkpoint.test_same_seed_draws_the_notebooks_weights), and its distributions, with
# both Glorot fans, are checked against the notebook's formulas in test_init_distributions.


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes(variant, k):
    model = torch_ref.build(variant, k)
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    if registry.VARIANTS[variant].multihead:
        assert isinstance(out, tuple) and len(out) == 3
        assert all(o.shape == (2, 10) for o in out)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    # float64 runs too (the parity suite uses it to compare at ~1e-12).
    out64 = model.double().eval()(x.double())
    assert all(o.dtype == torch.float64 for o in training._heads(out64))


@pytest.mark.parametrize("variant", ["resnet", "resnet_nobn"])
def test_residual_blocks_add_their_input(variant):
    block_cls = torch_ref.ResidualBlock if variant == "resnet" else torch_ref.ResidualBlock_noBN
    block = block_cls(8, 8).eval()
    x = torch.randn(3, 8, 7, 7)
    assert torch.equal(block(x), block.block(x) + x)


# ----------------------------------------------------------------------------- training loop

LOG_LINE = re.compile(r"Epoch \d{3}/\d{3}, Train Error \d+\.\d{2}% \|\| Test Error \d+\.\d{2}%")


def _sgd(model, lr=0.01):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_runs_and_reports_errors(variant, tiny_data):
    train_batches, test_batches = tiny_data
    torch.manual_seed(0)
    model = torch_ref.build(variant, 6)
    lines: list[str] = []
    train_errs, test_errs = training.train(
        3, model, nn.CrossEntropyLoss(), _sgd(model), train_batches, test_batches, log=lines.append
    )
    assert len(train_errs) == len(test_errs) == 3
    assert all(0.0 <= e <= 1.0 for e in train_errs + test_errs)
    assert len(lines) == 3 and all(LOG_LINE.fullmatch(line) for line in lines)
    assert lines[0].startswith("Epoch 000/003, ") and lines[2].startswith("Epoch 002/003, ")


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_matches_the_notebooks_own_loop(variant, notebook, tiny_data, capsys):
    """Same seed, same batches: the notebook's functions and ours agree bit for bit."""
    train_batches, test_batches = tiny_data
    cls_name = registry.VARIANTS[variant].notebook_class
    multihead = registry.VARIANTS[variant].multihead
    criterion = nn.CrossEntropyLoss()

    torch.manual_seed(0)
    theirs = getattr(notebook, cls_name)(6)
    nb_train = notebook.train_multihead if multihead else notebook.train
    capsys.readouterr()
    nb_last = nb_train(3, theirs, criterion, _sgd(theirs, 0.05), train_batches, test_batches)
    nb_lines = capsys.readouterr().out.splitlines()

    torch.manual_seed(0)
    ours = torch_ref.build(variant, 6)
    our_train = training.train_multihead if multihead else training.train
    lines: list[str] = []
    train_errs, test_errs = our_train(
        3, ours, criterion, _sgd(ours, 0.05), train_batches, test_batches, log=lines.append
    )

    assert lines == nb_lines
    assert (train_errs[-1], test_errs[-1]) == nb_last
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_multihead_scores_are_head_means_and_loss_is_mean_ce():
    class ThreeHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            # Head 0 right on all 4 samples, head 1 on 2, head 2 on none.
            right = nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
            half = torch.cat([right[:2], nn.functional.one_hot(torch.tensor([9, 9]), 10).float()])
            wrong = nn.functional.one_hot(torch.tensor([5, 5, 5, 5]), 10).float()
            return right + self.w * 0, half + self.w * 0, wrong + self.w * x.sum()

    model = ThreeHeads()
    batch = [(torch.ones(4, 1), torch.tensor([0, 1, 2, 3]))]
    err = training.train_epoch_multihead(model, nn.CrossEntropyLoss(), _sgd(model), batch)
    assert err == 1 - ((4 + 2 + 0) / 3) / 4
    assert training.test_multihead(model, batch) == err

    heads = model(batch[0][0])
    ce = nn.CrossEntropyLoss()
    expected = (ce(heads[0], batch[0][1]) + ce(heads[1], batch[0][1]) + ce(heads[2], batch[0][1])) / 3
    assert torch.equal(training._loss(ce, heads, batch[0][1]), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_error_uses_outputs_before_each_step(variant, tiny_data):
    train_batches, _ = tiny_data
    torch.manual_seed(0)
    model = torch_ref.build(variant, 3)
    seen: list[float] = []

    def record(module, inputs, output):
        if torch.is_grad_enabled():
            # Scored on the spot, i.e. before the optimizer step that follows the forward.
            seen.append(training._correct(training._heads(output), record.targets.pop(0)))

    record.targets = [t for _, t in train_batches]
    model.register_forward_hook(record)
    err = training.train_epoch(model, nn.CrossEntropyLoss(), _sgd(model, 0.5), train_batches)
    assert err == 1 - sum(seen) / 40


def _mode_spy(model: nn.Module) -> list[tuple[bool, bool]]:
    """Records (grad enabled, every module in train mode) at each forward call."""
    calls: list[tuple[bool, bool]] = []

    def hook(module, inputs):
        modes = {m.training for m in module.modules()}
        assert len(modes) == 1  # train()/eval() always switch the whole tree
        calls.append((torch.is_grad_enabled(), modes.pop()))

    model.register_forward_pre_hook(hook)
    return calls


def _run(variant, quirks, data, epochs=3):
    train_batches, test_batches = data
    torch.manual_seed(0)
    model = torch_ref.build(variant, 6)
    calls = _mode_spy(model)
    errs = training.train(
        epochs, model, nn.CrossEntropyLoss(), _sgd(model, 0.05), train_batches, test_batches,
        notebook_quirks=quirks, log=None,
    )
    return model, calls, errs


@pytest.mark.parametrize("variant", VARIANTS)
def test_notebook_quirk_only_changes_the_train_mode(variant, tiny_data):
    n_train, n_test = (len(b) for b in tiny_data)
    quirk_model, quirk_calls, quirk_errs = _run(variant, True, tiny_data)
    clean_model, clean_calls, clean_errs = _run(variant, False, tiny_data)

    train_phase = [True] * n_train
    test_phase = [(False, False)] * n_test
    # Fresh models start in train mode; test() leaves them in eval mode, which the notebook's
    # train_epoch never undoes.
    assert quirk_calls == (
        list(zip(train_phase, [True] * n_train)) + test_phase
        + 2 * (list(zip(train_phase, [False] * n_train)) + test_phase)
    )
    assert clean_calls == 3 * (list(zip(train_phase, [True] * n_train)) + test_phase)

    quirk_state, clean_state = quirk_model.state_dict(), clean_model.state_dict()
    if variant in BN_VARIANTS:
        # Epoch 0 is identical; then the quirk freezes BatchNorm's running statistics.
        assert quirk_errs[0][0] == clean_errs[0][0] and quirk_errs[1][0] == clean_errs[1][0]
        tracked = {k: v.item() for k, v in quirk_state.items() if k.endswith("num_batches_tracked")}
        assert tracked and set(tracked.values()) == {n_train}
        assert all(clean_state[k].item() == 3 * n_train for k in tracked)
        # Training through eval-mode BatchNorm takes other steps: the weights part ways.
        assert not torch.equal(quirk_state["fc.weight"], clean_state["fc.weight"])
    else:
        assert quirk_errs == clean_errs
        for key, value in quirk_state.items():
            assert torch.equal(clean_state[key], value), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_multihead_loop_calls_model_train(variant, tiny_data):
    train_batches, test_batches = tiny_data
    torch.manual_seed(0)
    model = torch_ref.build(variant, 3)
    calls = _mode_spy(model)
    model.eval()
    training.train_multihead(
        2, model, nn.CrossEntropyLoss(), _sgd(model), train_batches, test_batches, log=None
    )
    assert calls == 2 * ([(True, True)] * len(train_batches) + [(False, False)] * len(test_batches))


@pytest.mark.parametrize("variant", BN_VARIANTS)
def test_test_changes_nothing(variant, tiny_data):
    _, test_batches = tiny_data
    model = torch_ref.build(variant, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training.test(model, test_batches)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_one_shot_iterators_are_refused_for_several_epochs(tiny_data):
    train_batches, test_batches = tiny_data
    model = torch_ref.build("tanh", 3)
    with pytest.raises(TypeError, match="one-shot"):
        training.train(2, model, nn.CrossEntropyLoss(), _sgd(model), iter(train_batches), test_batches)
    # One epoch over a generator is fine.
    errs = training.train(
        1, model, nn.CrossEntropyLoss(), _sgd(model), iter(train_batches), iter(test_batches), log=None
    )
    assert len(errs[0]) == 1


def test_empty_loader_is_an_error():
    model = torch_ref.build("tanh", 3)
    with pytest.raises(ValueError, match="no samples"):
        training.test(model, [])


# ------------------------------------------------------------------------------------ data


def test_batches_keeps_the_partial_last_batch():
    images = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    labels = np.arange(10, dtype=np.uint8)
    order = np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    got = list(training.batches(images, labels, order, 4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in got]), torch.as_tensor(order))
    assert torch.equal(torch.cat([x for x, _ in got]), torch.as_tensor(images[order]))
    assert all(y.dtype == torch.int64 for _, y in got)
    with pytest.raises(ValueError):
        next(training.batches(images, labels, order, 0))


def test_normalize_matches_totensor_and_normalize():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    images[0, 0, :] = np.arange(28) * 9  # make sure 0 and 243 appear
    images[0, 1, 0] = 255

    x32 = training.normalize(images)
    assert x32.shape == (3, 1, 28, 28) and x32.dtype == torch.float32
    # The same float32 operations, done in numpy: IEEE rounding makes them bit-identical.
    f = images.astype(np.float32) / np.float32(255)
    expected32 = (f - np.float32(0.1307)) / np.float32(0.3081)
    np.testing.assert_array_equal(x32.numpy()[:, 0], expected32)

    x64 = training.normalize(images, dtype=torch.float64)
    assert x64.dtype == torch.float64
    np.testing.assert_array_equal(x64.numpy()[:, 0], (images / 255.0 - 0.1307) / 0.3081)
    assert np.abs(x64.numpy() - x32.numpy()).max() < 1e-6

    for bad in (images.astype(np.float32), images[0]):
        with pytest.raises(ValueError):
            training.normalize(bad)


def test_normalize_matches_torchvision():
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    images = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    expected = torch.stack([tf(Image.fromarray(im, mode="L")) for im in images])
    assert torch.equal(training.normalize(images), expected)
