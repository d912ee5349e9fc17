"""TF32 convolutions on any device: what cuDNN computes under torch's default
`torch.backends.cudnn.allow_tf32`, reproducible on a CPU.

TF32 tensor cores take float32 operands with their mantissas cut to 10 bits (to nearest or by
truncation, as the GPU kernel chooses; here to nearest, ties to even) and accumulate in float32.
Inside `tf32_convolutions()`, every float32 `conv2d` (nn.Conv2d's forward) rounds its
input and weight to TF32 (`round_to_tf32`: to nearest, ties to even) and convolves them in float32;
its backward rounds the output gradient, and the input and weight, before the two backward
convolutions (input gradient, weight gradient), as cuDNN runs those in TF32 too. The bias gradient
is a sum of the unrounded output gradient (a reduction, not a tensor-core operation). This is
flaxdepth's precision "tf32" (flaxdepth/conv.py) in torch; matmuls (nn.Linear) stay float32, as
under torch's default `torch.backends.cuda.matmul.allow_tf32 = False`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

#: float32 keeps 23 mantissa bits, TF32 10: the low 13 are rounded off.
_DROPPED_BITS = 13


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 `x` rounded to TF32 (sign, 8-bit exponent, 10-bit mantissa): to the nearest, ties to
    even, on the float32 bit pattern. Infinities and NaNs stay as they are; a value past TF32's
    largest rounds to infinity. Tensors of other dtypes are returned unchanged (TF32 replaces
    float32 arithmetic only)."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    # on the magnitude (below 2^31 for every finite value, so no int32 overflow); the sign apart
    magnitude = bits & 0x7FFFFFFF
    # just under half a TF32 ulp, plus one where the kept last bit is odd: carries exactly the
    # values past the halfway point and the odd ties into the kept bits
    half = (1 << (_DROPPED_BITS - 1)) - 1 + ((magnitude >> _DROPPED_BITS) & 1)
    rounded = ((magnitude + half) & -(1 << _DROPPED_BITS)) | (bits & -(1 << 31))
    return torch.where(torch.isnan(x), x, rounded.view(torch.float32))


class _TF32Conv2d(torch.autograd.Function):
    """conv2d of TF32-rounded operands, with the backward convolutions' operands rounded too."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        x, weight = round_to_tf32(x), round_to_tf32(weight)
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation, groups
        ctx.has_bias = bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        to_pair = torch.nn.modules.utils._pair
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            round_to_tf32(grad_out), x, weight, None, to_pair(stride), to_pair(padding), to_pair(dilation),
            False, [0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class _TF32Mode(TorchFunctionMode):
    """Routes float32 conv2d calls to _TF32Conv2d; every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv2d and args[0].dtype == torch.float32:
            x, weight, bias, stride, padding, dilation, groups = _conv2d_arguments(*args, **kwargs)
            if isinstance(padding, str):  # convolution_backward takes numbers; nn.Conv2d(padding=1) gives them
                raise ValueError(f"TF32 convolutions take numeric padding, got {padding!r}")
            return _TF32Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
        return func(*args, **kwargs)


def _conv2d_arguments(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d's arguments, by position or name, with its defaults."""
    return input, weight, bias, stride, padding, dilation, groups


@contextlib.contextmanager
def tf32_convolutions():
    """Inside, float32 conv2d (forward and backward) computes on TF32-rounded operands."""
    with _TF32Mode():
        yield
