"""python -m flaxdepth.convert: exact file round trips, the Flax file format, and the error paths."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import serialization

import torch_ref
from flaxdepth import convert, interop, models, registry

PREFIX = "python -m flaxdepth.convert: error: "


def state_dict(variant: str, depth: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """torch_ref's weights, BatchNorm state moved off its defaults so that every entry matters."""
    torch.manual_seed(0)
    model = torch_ref.build(variant, depth).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(12345)
    return model.state_dict()


def run(argv, capsys) -> tuple[int, str, str]:
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(PREFIX), err
    for fragment in fragments:
        assert fragment in err, err


EXPERIMENT_VARIANTS = Path(__file__).resolve().parents[1] / "experiments" / "variants.toml"


@pytest.fixture
def declared_variants():
    """experiments/variants.toml's variants registered, as the commands register them with
    --variants-file (unregistered afterwards)."""
    before = set(registry.variant_names())
    registry.load_variants(EXPERIMENT_VARIANTS)
    yield ["--variants-file", EXPERIMENT_VARIANTS]
    for name in set(registry.variant_names()) - before:  # what was registered before stays
        registry.unregister(name)


@pytest.mark.parametrize("variant, depth, dtype", [
    ("elu_bn", 7, torch.float32),  # BatchNorm buffers, num_batches_tracked included
    ("elu_multihead", 6, torch.float32),  # three heads
    ("resnet", 9, torch.float64),  # residual keys; float64 must not be narrowed
    ("resnet_skipinit", 9, torch.float32),  # declared in a TOML file: residual gates
    ("elu_groupnorm", 6, torch.float64),  # declared in a TOML file: GroupNorm's affine parameters
])
def test_round_trip_through_files_is_exact(variant, depth, dtype, tmp_path, capsys, declared_variants):
    original = state_dict(variant, depth, dtype)
    torch.save(original, tmp_path / "in.pt")
    args = ["--variant", variant, "--depth", depth, *declared_variants]
    code, out, _ = run(["to-flax", *args, tmp_path / "in.pt", tmp_path / "flax.msgpack"], capsys)
    assert code == 0 and "wrote" in out
    code, _, _ = run(["to-torch", *args, tmp_path / "flax.msgpack", tmp_path / "back.pt"], capsys)
    assert code == 0

    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(original)
    for key, value in original.items():
        assert isinstance(back[key], torch.Tensor) and back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    torch_ref.build(variant, depth).load_state_dict(back, strict=True)

    # The Flax file holds interop's variables, with the checkpoint's dtypes.
    with jax.enable_x64(True):
        expected = interop.from_torch(variant, depth, original)
    restored = convert.load_flax(tmp_path / "flax.msgpack")
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert isinstance(a, np.ndarray) and a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


def test_flax_file_restores_into_the_models_own_variables(tmp_path):
    torch.save(state_dict("elu_bn", 6), tmp_path / "in.pt")
    variables = convert.torch_to_flax("elu_bn", 6, tmp_path / "in.pt", tmp_path / "out.msgpack")
    # The standard Flax route, restoring into a target with the model's structure (shapes only).
    init = functools.partial(models.init_variables, models.build_model("elu_bn", 6))
    shapes = jax.eval_shape(init, jax.random.key(0))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    restored = serialization.from_bytes(target, (tmp_path / "out.msgpack").read_bytes())
    assert jax.tree.map(np.shape, restored) == jax.tree.map(np.shape, target)
    assert jax.tree.all(jax.tree.map(np.array_equal, restored, variables))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_wrapped_checkpoints_are_unwrapped(key, tmp_path, capsys):
    original = state_dict("tanh_bn_oldinit", 3)
    torch.save(original, tmp_path / "plain.pt")
    torch.save({key: original, "epoch": 3, "optimizer_state_dict": {"state": {}}}, tmp_path / "wrapped.pt")
    for name in ("plain", "wrapped"):
        code, _, _ = run(["to-flax", "--variant", "tanh_bn_oldinit", "--depth", 3,
                          tmp_path / f"{name}.pt", tmp_path / f"{name}.msgpack"], capsys)
        assert code == 0
    assert (tmp_path / "plain.msgpack").read_bytes() == (tmp_path / "wrapped.msgpack").read_bytes()


@pytest.fixture
def files(tmp_path):
    """A valid elu_bn k=6 torch checkpoint and Flax file, foreign files, and an existing output."""
    torch.save(state_dict("elu_bn", 6), tmp_path / "elu_bn.pt")
    convert.torch_to_flax("elu_bn", 6, tmp_path / "elu_bn.pt", tmp_path / "elu_bn.msgpack")
    (tmp_path / "text.txt").write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "out").write_bytes(b"previous")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["to-flax", "--variant", "elu_bn", "--depth", 6, "missing.pt"], ["missing.pt"]),
    (["to-flax", "--variant", "elu_bn", "--depth", 6, "text.txt"], ["text.txt", "not a torch state_dict"]),
    (["to-flax", "--variant", "elu_bn", "--depth", 6, "elu_bn.msgpack"], ["not a torch state_dict"]),
    (["to-flax", "--variant", "elu_bn", "--depth", 6, "tensor.pt"], ["holds a Tensor"]),
    # Wrong variant or depth: the keys that do not fit are named.
    (["to-flax", "--variant", "elu", "--depth", 6, "elu_bn.pt"], ["missing conv_stages.0.2.weight", "unexpected conv_stages.0.1.weight", "running_mean"]),
    (["to-flax", "--variant", "elu_bn", "--depth", 9, "elu_bn.pt"], ["missing conv_stages.0.6.weight"]),
    (["to-torch", "--variant", "elu_bn", "--depth", 6, "elu_bn.pt"], ["not a Flax msgpack checkpoint"]),
    (["to-torch", "--variant", "elu_multihead", "--depth", 6, "elu_bn.msgpack"], ["missing params/fc1/bias"]),
    (["to-torch", "--variant", "elu_bn", "--depth", 9, "elu_bn.msgpack"], ["scanned layers"]),
    (["to-torch", "--variant", "tanh", "--depth", 6, "elu_bn.msgpack"], ["unexpected batch_stats/"]),
    (["to-flax", "--variant", "nope", "--depth", 6, "elu_bn.pt"], ["unknown variant 'nope'"]),
    (["to-flax", "--variant", "elu_bn", "--depth", 2, "elu_bn.pt"], ["--depth", ">= 3"]),
    (["sideways", "--variant", "elu_bn", "--depth", 6, "elu_bn.pt"], ["invalid choice: 'sideways'"]),
])
def test_bad_input_is_one_line_and_leaves_the_output_alone(argv, fragments, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    before = sorted(p.name for p in files.iterdir())
    code, out, err = run([*argv, "out"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert (files / "out").read_bytes() == b"previous"
    assert sorted(p.name for p in files.iterdir()) == before  # no temp file left behind


def test_missing_output_folder_is_named(files, capsys):
    target = files / "no" / "such" / "out.pt"
    code, _, err = run(["to-torch", "--variant", "elu_bn", "--depth", 6, files / "elu_bn.msgpack", target], capsys)
    assert_one_line_error(code, err, str(target.parent))


def test_a_failed_write_keeps_the_previous_file(files, monkeypatch):
    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(convert.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert.flax_to_torch("elu_bn", 6, files / "elu_bn.msgpack", files / "out")
    assert (files / "out").read_bytes() == b"previous"
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]


def test_command_line_exit_code_and_stderr(files):
    result = subprocess.run(
        [sys.executable, "-m", "flaxdepth.convert", "to-flax", "--variant", "elu", "--depth", "6",
         str(files / "elu_bn.pt"), str(files / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert_one_line_error(result.returncode, result.stderr, "state_dict for elu k=6")
