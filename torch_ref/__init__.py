"""The PyTorch reference: the notebook's models and training loop."""

from __future__ import annotations

from torch import nn

from flaxdepth import registry
from torch_ref import models
from torch_ref.models import (
    CNNelu,
    CNNelu_multihead,
    CNNeluBN,
    CNNtanh,
    CNNtanh_newinit,
    CNNtanhBN_oldinit,
    ResidualBlock,
    ResidualBlock_noBN,
    ResNet,
    ResNet_noBN,
)

#: Variant name -> the notebook's class for it.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    name: getattr(models, variant.notebook_class) for name, variant in registry.VARIANTS.items()
}


def build(variant: str, k: int, fan: str = "out") -> nn.Module:
    """The notebook's model for `variant` with depth `k` (k // 3 conv layers per stage)."""
    registry.get_variant(variant)  # the registry's error for an unknown name
    return MODEL_CLASSES[variant](k, fan=fan)


__all__ = [
    "MODEL_CLASSES",
    "build",
    "CNNtanh",
    "CNNtanh_newinit",
    "CNNelu",
    "CNNeluBN",
    "ResNet",
    "CNNtanhBN_oldinit",
    "ResNet_noBN",
    "CNNelu_multihead",
    "ResidualBlock",
    "ResidualBlock_noBN",
]
