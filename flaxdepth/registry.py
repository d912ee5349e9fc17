"""The one registry of variant names, shared by flaxdepth and torch_ref.

Pure Python on purpose: importing it pulls in neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses

NUM_STAGES = 3
FIRST_STAGE_CHANNELS = 4
NUM_CLASSES = 10
#: Conv std of the notebook's "naive" initialization.
OLD_INIT_SIGMA = 0.05


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model family of the notebook: its architecture switches and its training lr."""

    name: str
    notebook_class: str
    activation: str  # "tanh" or "elu"
    batchnorm: bool
    residual: bool
    glorot_init: bool  # False: conv weights N(0, 0.05); True: N(0, sqrt(1 / (9 * fan)))
    multihead: bool
    lr: float  # the learning rate the notebook trained this variant with
    notebook_pair: tuple[int, int]  # (deepest trainable k, shallowest untrainable k) in the notebook
    description: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("tanh", "CNNtanh", "tanh", False, False, False, False, 0.05, (6, 9),
                "tanh CNN, naive init N(0, 0.05)"),
        Variant("tanh_newinit", "CNNtanh_newinit", "tanh", False, False, True, False, 0.05, (48, 51),
                "tanh CNN, Glorot-style init"),
        Variant("elu", "CNNelu", "elu", False, False, True, False, 0.05, (39, 42),
                "ELU CNN, Glorot-style init"),
        Variant("elu_bn", "CNNeluBN", "elu", True, False, True, False, 0.05, (63, 66),
                "ELU CNN with BatchNorm after every conv"),
        Variant("resnet", "ResNet", "elu", True, True, True, False, 0.05, (102, 105),
                "ELU + BatchNorm with skip connections"),
        Variant("tanh_bn_oldinit", "CNNtanhBN_oldinit", "tanh", True, False, False, False, 0.05, (48, 51),
                "tanh CNN with BatchNorm, naive init"),
        # The notebook trained ResNet_noBN with lr 0.005.
        Variant("resnet_nobn", "ResNet_noBN", "elu", False, True, True, False, 0.005, (21, 24),
                "ELU with skip connections, no BatchNorm"),
        # The notebook's multihead cells set `l = 0.05` (a typo), so `lr` kept 0.005.
        Variant("elu_multihead", "CNNelu_multihead", "elu", False, False, True, True, 0.005, (139, 142),
                "ELU CNN with a loss head after each stage"),
    )
}

VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)


class UnknownVariantError(ValueError):
    """Raised for a variant name that is not in the registry."""


def get_variant(name: str) -> Variant:
    """The registry entry for `name`, or a clear error listing the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariantError(
            f"unknown variant {name!r}; choose one of: {', '.join(VARIANT_NAMES)}"
        ) from None


def check_depth(depth: int) -> int:
    """Validate a depth k: any integer >= 3 (the models build k // 3 layers per stage)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < NUM_STAGES:
        raise ValueError(f"depth must be an integer >= {NUM_STAGES}, got {depth!r}")
    return depth


def layers_per_stage(depth: int) -> int:
    """k // 3, as the notebook computes it (k = 139 builds 46 layers per stage)."""
    return check_depth(depth) // NUM_STAGES


def stage_channels(stage: int) -> tuple[int, int]:
    """(input channels of the stage's first conv, output channels of every conv in the stage)."""
    channels_out = FIRST_STAGE_CHANNELS * 2**stage
    return (1 if stage == 0 else channels_out // 2), channels_out


GLOROT_FANS = ("out", "in")


def conv_init_std(variant: Variant, channels_in: int, channels_out: int, fan: str = "out") -> float:
    """Std of the N(0, std) that a conv weight is drawn from.

    The notebook's Glorot-style sigma is sqrt(1 / (3 * 3 * C_out)) (fan="out"); its text also
    allows sqrt(1 / (3 * 3 * C_in)) (fan="in"). Naive-init variants ignore `fan`.
    """
    if fan not in GLOROT_FANS:
        raise ValueError(f"fan must be one of {GLOROT_FANS}, got {fan!r}")
    if not variant.glorot_init:
        return OLD_INIT_SIGMA
    return (1.0 / (3 * 3 * (channels_out if fan == "out" else channels_in))) ** 0.5
