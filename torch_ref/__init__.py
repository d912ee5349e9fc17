"""The PyTorch reference: the notebook's models (and any declared variant's) and training loop."""

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
    DepthCNN,
    ResidualBlock,
    ResidualBlock_noBN,
    ResNet,
    ResNet_noBN,
    load_weights,
)

#: Variant name -> the notebook's class for it.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    name: getattr(models, variant.notebook_class) for name, variant in registry.VARIANTS.items()
}


def build(variant: str | registry.Variant, k: int, fan: str | None = None) -> nn.Module:
    """The model of a registered variant (name or spec) with depth `k` (k // 3 conv layers per
    stage): the notebook's own class for the eight built-ins, a `DepthCNN` for a declared spec."""
    spec = registry.resolve(variant)  # the registry's error for an unknown name or a bad spec
    if spec.name in MODEL_CLASSES and spec == registry.VARIANTS[spec.name]:
        return MODEL_CLASSES[spec.name](k, fan=fan)
    return models.DepthCNN(spec, k, fan=fan)


__all__ = [
    "MODEL_CLASSES",
    "build",
    "load_weights",
    "DepthCNN",
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
