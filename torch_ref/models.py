"""The notebook's eight models, rebuilt from the variant registry.

Class names, the `Class(k)` constructor, module nesting and hence state_dict keys are the
notebook's, so a checkpoint saved from the notebook's own classes loads with strict=True.
Modules are also created and initialized in the notebook's order, so that under the same
torch seed both draw bit-identical weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from flaxdepth import registry

IMAGE_SIZE = 28  # MNIST; each stage's 2x2 average pool halves it: 28 -> 14 -> 7 -> 3

_ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU}


def _conv_unit(variant: registry.Variant, channels_in: int, channels_out: int) -> list[nn.Module]:
    """Conv 3x3 (stride 1, padding 1), optional BatchNorm, activation: one notebook layer."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1, padding=1)
    ]
    if variant.batchnorm:
        layers.append(nn.BatchNorm2d(channels_out))
    layers.append(_ACTIVATIONS[variant.activation]())
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


_RESIDUAL_BLOCKS = {"resnet": ResidualBlock, "resnet_nobn": ResidualBlock_noBN}


def _stage(variant: registry.Variant, stage: int, num_layers: int) -> nn.Sequential:
    """One stage: `num_layers` conv units, then a 2x2 average pool."""
    channels_in, channels_out = registry.stage_channels(stage)
    if variant.residual:
        # The notebook nests every unit: the first (which changes the channel count, so it
        # has no skip) as a plain Sequential, the others as residual blocks.
        layers: list[nn.Module] = [nn.Sequential(*_conv_unit(variant, channels_in, channels_out))]
        block = _RESIDUAL_BLOCKS[variant.name]
        layers += [block(channels_out, channels_out) for _ in range(num_layers - 1)]
    else:
        # Non-residual variants put all units' modules flat into one Sequential.
        layers = []
        for i in range(num_layers):
            layers += _conv_unit(variant, channels_in if i == 0 else channels_out, channels_out)
    layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _flat_size(stage: int) -> int:
    """Features after stage `stage`, flattened (C * H * W)."""
    return registry.stage_channels(stage)[1] * (IMAGE_SIZE // 2 ** (stage + 1)) ** 2


class _NotebookCNN(nn.Module):
    """Three stages of k // 3 conv units each, then the classifier head(s)."""

    variant_name: ClassVar[str]

    def __init__(self, k: int, *, fan: str = "out"):
        super().__init__()
        variant = registry.get_variant(self.variant_name)
        per_stage = registry.layers_per_stage(k)
        self.conv_stages = nn.ModuleList(
            _stage(variant, s, per_stage) for s in range(registry.NUM_STAGES)
        )
        self._build_heads()
        # After the heads, as in the notebook: the Linear layers' default init draws from the
        # RNG before the conv weights are redrawn, and the same seed must give the same weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                std = registry.conv_init_std(variant, m.in_channels, m.out_channels, fan)
                with torch.no_grad():
                    m.weight.normal_(0, std)
                    m.bias.zero_()

    @property
    def variant(self) -> registry.Variant:
        return registry.VARIANTS[self.variant_name]

    def _build_heads(self) -> None:
        self.fc = nn.Linear(_flat_size(registry.NUM_STAGES - 1), registry.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.conv_stages:
            x = stage(x)
        return self.fc(x.flatten(1))


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

    def _build_heads(self) -> None:
        self.fc1 = nn.Linear(_flat_size(0), registry.NUM_CLASSES)
        self.fc2 = nn.Linear(_flat_size(1), registry.NUM_CLASSES)
        self.fc3 = nn.Linear(_flat_size(2), registry.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = (self.fc1, self.fc2, self.fc3)
        logits = []
        for stage, head in zip(self.conv_stages, heads):
            x = stage(x)
            logits.append(head(x.flatten(1)))
        return tuple(logits)
