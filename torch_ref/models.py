"""The notebook's eight models, and any declared variant, built from the variant registry.

Class names, the `Class(k)` constructor, module nesting and hence state_dict keys are the
notebook's, so a checkpoint saved from the notebook's own classes loads with strict=True.
Modules are also created and initialized in the notebook's order, so that under the same
torch seed both draw bit-identical weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from flaxdepth import registry

IMAGE_SIZE = 28  # MNIST; each stage's 2x2 average pool halves it: 28 -> 14 -> 7 -> 3


def activation_module(spec: registry.Variant) -> nn.Module:
    """The torch module of the spec's activation (registry.ACTIVATIONS)."""
    if spec.activation == "leaky_relu":
        return nn.LeakyReLU(spec.negative_slope)
    if spec.activation in ("gelu", "gelu_tanh"):
        return nn.GELU(approximate="tanh" if spec.activation == "gelu_tanh" else "none")
    return {"tanh": nn.Tanh, "elu": nn.ELU, "relu": nn.ReLU, "selu": nn.SELU, "silu": nn.SiLU,
            "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "identity": nn.Identity}[spec.activation]()


def _conv_unit(variant: registry.Variant, channels_in: int, channels_out: int) -> list[nn.Module]:
    """Conv 3x3 (stride 1, padding 1), optional norm, activation: one notebook layer."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1, padding=1)
    ]
    if variant.norm == "batch":
        layers.append(nn.BatchNorm2d(channels_out))
    elif variant.norm == "group":
        layers.append(nn.GroupNorm(variant.norm_groups, channels_out))
    layers.append(activation_module(variant))
    return layers


class _Residual(nn.Module):
    """u = block(x) + x; `block` is the notebook's Sequential, kept for its state_dict keys."""

    block: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x


class ResidualBlock(_Residual):
    """x + ELU(BN(conv(x))), the notebook's ResNet block."""

    def __init__(self, channel_in: int, channel_out: int):
        super().__init__()
        self.block = nn.Sequential(*_conv_unit(registry.VARIANTS["resnet"], channel_in, channel_out))


class ResidualBlock_noBN(_Residual):
    """x + ELU(conv(x)), the notebook's ResNet_noBN block."""

    def __init__(self, channel_in: int, channel_out: int):
        super().__init__()
        self.block = nn.Sequential(
            *_conv_unit(registry.VARIANTS["resnet_nobn"], channel_in, channel_out)
        )


class IdentityResidual(_Residual):
    """x + block(x) for a declared variant with residual = "identity"."""

    def __init__(self, block: nn.Sequential):
        super().__init__()
        self.block = block


class GatedResidual(nn.Module):
    """u = x + gate * block(x), gate a learned scalar starting at `gate_init` (0: SkipInit/ReZero)."""

    def __init__(self, block: nn.Sequential, gate_init: float):
        super().__init__()
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.block(x)


_RESIDUAL_BLOCKS = {"resnet": ResidualBlock, "resnet_nobn": ResidualBlock_noBN}


def _residual_block(variant: registry.Variant, channels: int) -> nn.Module:
    if variant.name in _RESIDUAL_BLOCKS and variant == registry.VARIANTS.get(variant.name):
        return _RESIDUAL_BLOCKS[variant.name](channels, channels)
    block = nn.Sequential(*_conv_unit(variant, channels, channels))
    if variant.residual == "gated":
        return GatedResidual(block, variant.residual_gate_init)
    return IdentityResidual(block)


def _stage(variant: registry.Variant, stage: int, num_layers: int) -> nn.Sequential:
    """One stage: `num_layers` conv units, then a 2x2 average pool."""
    channels_in, channels_out = registry.stage_channels(stage, variant.channels)
    if variant.skip:
        # The notebook nests every unit: the first (which changes the channel count, so it
        # has no skip) as a plain Sequential, the others as residual blocks.
        layers: list[nn.Module] = [nn.Sequential(*_conv_unit(variant, channels_in, channels_out))]
        layers += [_residual_block(variant, channels_out) for _ in range(num_layers - 1)]
    else:
        # Non-residual variants put all units' modules flat into one Sequential.
        layers = []
        for i in range(num_layers):
            layers += _conv_unit(variant, channels_in if i == 0 else channels_out, channels_out)
    layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def delta_orthogonal_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Xiao et al. 2018's delta-orthogonal init, in place: gain times an orthogonal C_out x C_in
    matrix (orthonormal columns: torch's orthogonal_, a sign-corrected QR) at the centre tap of an
    (C_out, C_in, kh, kw) kernel, zeros at the other taps. torch has no such initializer."""
    channels_out, channels_in, kh, kw = weight.shape
    if channels_in > channels_out:
        raise ValueError(f"delta_orthogonal needs C_in <= C_out, got {channels_in} -> {channels_out}")
    centre = torch.empty(channels_out, channels_in, dtype=weight.dtype, device=weight.device)
    nn.init.orthogonal_(centre, gain=gain)
    with torch.no_grad():
        weight.zero_()
        weight[:, :, (kh - 1) // 2, (kw - 1) // 2] = centre
    return weight


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to one for the block: each conv's init is a few small
    operations, and on more threads each pays the thread pool's start (the QR of an orthogonal
    init most; figures at k = 10,002: benchmarks/BENCHMARKS.md, "the engine at extreme depth").
    The same draws and values either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def init_conv_(conv: nn.Conv2d, variant: registry.Variant, fan: str | None = None) -> None:
    """Draw a conv's weight and bias from the spec's distributions (bias zero: no draw)."""
    with torch.no_grad():
        if variant.init == "orthogonal":
            nn.init.orthogonal_(conv.weight, gain=variant.init_gain)
        elif variant.init == "delta_orthogonal":
            delta_orthogonal_(conv.weight, variant.init_gain)
        else:
            conv.weight.normal_(0, registry.conv_init_std(variant, conv.in_channels, conv.out_channels, fan))
        if variant.bias_std > 0:
            conv.bias.normal_(0, variant.bias_std)
        else:
            conv.bias.zero_()


def load_weights(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """`model.load_state_dict(state_dict)` (strict; tensors or numpy arrays, cast to the model's
    dtypes) in time linear in the entries: torch's own filters the remaining entries once per
    child module, quadratic in depth (figures: benchmarks/BENCHMARKS.md, "the engine at extreme
    depth").
    Copies into the model's parameters and buffers, as torch's does for modules without load
    hooks, which torch_ref's have none of. Returns the model."""
    own = model.state_dict(keep_vars=True)
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong = [f"{key} {tuple(state_dict[key].shape)} (expected {tuple(own[key].shape)})" for key in own
             if key in state_dict and tuple(state_dict[key].shape) != tuple(own[key].shape)]
    problems = [f"{what} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong)) if keys]
    if problems:
        raise RuntimeError(f"state_dict does not fit {type(model).__name__}: {'; '.join(problems)}")
    with torch.no_grad():
        for key, target in own.items():
            value = state_dict[key]
            target.copy_(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value)))
    return model


class DepthCNN(nn.Module):
    """Any registered variant: three stages of k // 3 conv units each, then the classifier head(s).

    Module nesting and names follow the notebook's (`conv_stages.{s}`, `fc` or `fc1..fc3`), and
    modules are created and initialized in the notebook's order, so that a declared copy of a
    built-in draws the same weights under the same torch seed, with the same state_dict keys.
    """

    def __init__(self, variant: registry.Variant | str, k: int, *, fan: str | None = None):
        super().__init__()
        variant = registry.resolve(variant)
        self.spec = variant
        per_stage = registry.layers_per_stage(k)
        self.conv_stages = nn.ModuleList(
            _stage(variant, s, per_stage) for s in range(registry.NUM_STAGES)
        )
        if variant.multihead:
            self.fc1 = nn.Linear(registry.head_features(variant, 0), registry.NUM_CLASSES)
            self.fc2 = nn.Linear(registry.head_features(variant, 1), registry.NUM_CLASSES)
            self.fc3 = nn.Linear(registry.head_features(variant, 2), registry.NUM_CLASSES)
        else:
            self.fc = nn.Linear(registry.head_features(variant, registry.NUM_STAGES - 1), registry.NUM_CLASSES)
        # After the heads, as in the notebook: the Linear layers' default init draws from the
        # RNG before the conv weights are redrawn, and the same seed must give the same weights.
        with _one_thread():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    init_conv_(m, variant, fan)

    @property
    def variant(self) -> registry.Variant:
        return self.spec

    def forward(self, x: torch.Tensor):
        """Logits; with heads="every_stage" a tuple (u1, u2, u3), one per stage."""
        if not self.spec.multihead:
            for stage in self.conv_stages:
                x = stage(x)
            return self.fc(x.flatten(1))
        logits = []
        for stage, head in zip(self.conv_stages, (self.fc1, self.fc2, self.fc3)):
            x = stage(x)
            logits.append(head(x.flatten(1)))
        return tuple(logits)


class _NotebookCNN(DepthCNN):
    """A notebook class: `Class(k)` builds its built-in variant."""

    variant_name: ClassVar[str]

    def __init__(self, k: int, *, fan: str | None = None):
        super().__init__(registry.VARIANTS[self.variant_name], k, fan=fan)


class CNNtanh(_NotebookCNN):
    """tanh CNN, conv weights N(0, 0.05)."""

    variant_name = "tanh"


class CNNtanh_newinit(_NotebookCNN):
    """tanh CNN, Glorot-style conv init."""

    variant_name = "tanh_newinit"


class CNNelu(_NotebookCNN):
    """ELU CNN, Glorot-style conv init."""

    variant_name = "elu"


class CNNeluBN(_NotebookCNN):
    """ELU CNN with BatchNorm between each conv and its activation."""

    variant_name = "elu_bn"


class ResNet(_NotebookCNN):
    """CNNeluBN with a skip connection around every unit but the first of each stage."""

    variant_name = "resnet"


class CNNtanhBN_oldinit(_NotebookCNN):
    """tanh CNN with BatchNorm, conv weights N(0, 0.05)."""

    variant_name = "tanh_bn_oldinit"


class ResNet_noBN(_NotebookCNN):
    """ResNet without BatchNorm."""

    variant_name = "resnet_nobn"


class CNNelu_multihead(_NotebookCNN):
    """CNNelu with a linear head after every stage; forward returns (u1, u2, u3)."""

    variant_name = "elu_multihead"
