"""Precision "tf32": TF32 rounding in both frameworks, and convolutions whose operands (forward and
backward) are rounded before a float32 convolution (flaxdepth/conv.py, torch_ref/tf32.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxdepth import conv, cpu_kernels
from flaxdepth.options import PRECISIONS, EngineOptions
from torch_ref.tf32 import round_to_tf32 as torch_round_to_tf32
from torch_ref.tf32 import tf32_convolutions

# float32 bit pattern -> its TF32 rounding, by hand: TF32 keeps the top 10 of float32's 23 mantissa
# bits, so one TF32 ulp at 1.0 is 0x2000 in the pattern and the halfway point 0x1000.
ROUNDINGS = [
    (0x3F800000, 0x3F800000),  # 1.0: exact
    (0x3F801000, 0x3F800000),  # 1 + half an ulp: a tie, to the even mantissa (down)
    (0x3F803000, 0x3F804000),  # 1 + 1.5 ulp: a tie between an odd and an even mantissa (up)
    (0x3F801001, 0x3F802000),  # just past halfway: up
    (0x3F800FFF, 0x3F800000),  # just short of halfway: down
    (0xBF801001, 0xBF802000),  # negative: the magnitude rounds, the sign stays
    (0x3FFFF000, 0x40000000),  # a carry out of the mantissa into the exponent (1.9995 -> 2.0)
    (0x7F7FFFFF, 0x7F800000),  # float32's largest: past TF32's largest, to infinity
    (0xFF800000, 0xFF800000),  # -infinity stays
    (0x00003000, 0x00004000),  # a subnormal tie, up to the even neighbour
    (0x00000001, 0x00000000),  # the smallest subnormal: down to zero
]
NAN = 0x7F800001  # a NaN whose payload sits in the dropped bits (rounding it would give infinity)


def bits_to_float32(patterns) -> np.ndarray:
    return np.asarray(patterns, np.uint32).view(np.float32)


def float32_bits(values) -> list[int]:
    return [int(b) for b in np.asarray(values, np.float32).view(np.uint32)]


def jax_round(values: np.ndarray) -> np.ndarray:
    return np.asarray(conv.round_to_tf32(jnp.asarray(values)))


def torch_round(values: np.ndarray) -> np.ndarray:
    return torch_round_to_tf32(torch.from_numpy(values.copy())).numpy()


@pytest.mark.parametrize("round_fn", [jax_round, torch_round], ids=["jax", "torch"])
def test_rounding_matches_hand_computed_bit_patterns(round_fn):
    given, expected = zip(*ROUNDINGS)
    assert [hex(b) for b in float32_bits(round_fn(bits_to_float32(given)))] == [hex(b) for b in expected]
    assert float32_bits(round_fn(bits_to_float32([NAN]))) == [NAN]


@pytest.mark.parametrize("round_fn", [jax_round, torch_round], ids=["jax", "torch"])
def test_rounding_leaves_float64_alone(round_fn):
    """TF32 replaces float32 arithmetic only; float64 operands are convolved as they are."""
    values = np.array([1 + 2.0 ** -30, np.pi])
    with jax.enable_x64(True):
        rounded = round_fn(values)
    assert rounded.dtype == np.float64 and np.array_equal(rounded, values)


def test_tf32_is_a_precision():
    assert "tf32" in PRECISIONS and EngineOptions(precision="tf32").precision == "tf32"


def random_operands(seed=0, batch=2, size=7, channels_in=3, channels_out=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, channels_in)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, channels_in, channels_out)).astype(np.float32)
    grad_out = rng.normal(size=(batch, size, size, channels_out)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad_out)


KERNEL_SETTINGS = [pytest.param(False, id="xla"),
                   pytest.param(True, id="cpu_kernels", marks=pytest.mark.skipif(
                       not cpu_kernels.available(), reason="flaxdepth's CPU kernels are not built here"))]


@pytest.mark.parametrize("use_kernels", KERNEL_SETTINGS)
def test_tf32_conv_is_the_float32_conv_of_rounded_operands(use_kernels):
    """Bit for bit: the forward pass convolves the rounded input and kernel; the input and kernel
    gradients are the float32 ones with the output gradient rounded as well (the backward
    convolutions' operands, as cuDNN's under TF32)."""
    x, kernel, grad_out = random_operands()
    rounded = [conv.round_to_tf32(a) for a in (x, kernel, grad_out)]
    assert all(not np.array_equal(a, r) for a, r in zip((x, kernel, grad_out), rounded))  # the rounding bites
    tf32 = functools.partial(conv.conv3x3, options=EngineOptions(precision="tf32", cpu_kernels=use_kernels))
    float32 = functools.partial(conv.conv3x3, options=EngineOptions(precision="highest", cpu_kernels=use_kernels))
    y, vjp = jax.vjp(tf32, x, kernel)
    expected_y, expected_vjp = jax.vjp(float32, *rounded[:2])
    assert np.array_equal(y, expected_y)
    for actual, expected in zip(vjp(grad_out), expected_vjp(rounded[2])):
        assert np.array_equal(actual, expected)
    if not use_kernels:  # and XLA's own convolution of the rounded operands
        xla = jax.lax.conv_general_dilated(*rounded[:2], (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           precision=jax.lax.Precision.HIGHEST)
        assert np.array_equal(y, xla)


def test_tf32_replicas_round_their_operands():
    """vmapped replicas (the block-diagonal batching rule) convolve rounded operands as well: bit for
    bit the float32 results of rounded operands, forward and backward."""
    operands = [jnp.stack([a, a[::-1] * 0.7]) for a in random_operands(seed=1)]
    options = {"cpu_kernels": False, "replicas_per_block": 2}

    def forward_and_backward(precision, x, kernel, grad_out):
        def one(x, kernel, grad_out):
            y, vjp = jax.vjp(functools.partial(conv.conv3x3, options=EngineOptions(precision=precision, **options)),
                             x, kernel)
            return y, *vjp(grad_out)
        return jax.vmap(one)(x, kernel, grad_out)

    actual = forward_and_backward("tf32", *operands)
    expected = forward_and_backward("highest", *(conv.round_to_tf32(a) for a in operands))
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))


def test_torch_tf32_conv_is_the_float32_conv_of_rounded_operands():
    """torch_ref.tf32: forward, input and weight gradients bit for bit those of the float32 conv2d
    of rounded operands (the output gradient rounded for the backward convolutions); the bias
    gradient the sum of the unrounded output gradient."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Conv2d(3, 5, 3, 1, 1)
    x = torch.randn(2, 3, 7, 7, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 5, 7, 7, generator=generator)
    with tf32_convolutions():
        y = layer(x)
        y.backward(grad_out)
    rx, rw = torch_round_to_tf32(x.detach()).requires_grad_(), torch_round_to_tf32(layer.weight.detach()).requires_grad_()
    expected = torch.nn.functional.conv2d(rx, rw, layer.bias.detach(), 1, 1)
    expected.backward(torch_round_to_tf32(grad_out))
    assert torch.equal(y, expected)
    assert torch.equal(x.grad, rx.grad) and torch.equal(layer.weight.grad, rw.grad)
    assert torch.equal(layer.bias.grad, grad_out.sum((0, 2, 3)))
    assert not torch.equal(x.detach(), rx.detach())  # the rounding bites


def test_torch_tf32_mode_leaves_float64_and_the_outside_alone():
    layer = torch.nn.Conv2d(2, 2, 3, 1, 1).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with tf32_convolutions():
        inside = layer(x)
    assert torch.equal(inside, layer(x))
    layer32, x32 = layer.float(), x.float()
    with tf32_convolutions():
        rounded = layer32(x32)
    assert not torch.equal(rounded, layer32(x32))  # outside the context: float32 as torch computes it


def test_sweep_command_line_takes_tf32(tmp_path):
    """--precision tf32 reaches the sweep's engine options (stored in every row) and its own file."""
    from flaxdepth import sweep

    [config] = sweep.configs(sweep.parse_args(["--variant", "elu_bn", "--precision", "tf32", "--out", str(tmp_path)]))
    assert config.engine.precision == "tf32" and config.as_row()["engine"]["precision"] == "tf32"
    assert config.results_path().name == "elu_bn_jax_corrected_e3_b256_mnist_prectf32.jsonl"
