"""The one registry of variants, shared by flaxdepth and torch_ref.

A variant is a declared `Variant` spec (activation, normalization, residual form, conv
initialization, width, heads, lr) from which both frameworks build their model. The notebook's
eight are built-in entries; `load_variants(path)` registers a TOML file's, `register(spec)` a spec
object. Pure Python on purpose: importing it pulls in neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

NUM_STAGES = 3
NUM_CLASSES = 10
#: Conv std of the notebook's "naive" initialization.
OLD_INIT_SIGMA = 0.05

#: gelu is the exact, erf-based GELU (torch's nn.GELU()); gelu_tanh its tanh approximation
#: (torch's nn.GELU(approximate="tanh")). softplus is torch's (beta 1, linear above 20).
ACTIVATIONS = ("tanh", "elu", "relu", "leaky_relu", "gelu", "gelu_tanh", "selu", "silu", "softplus",
               "sigmoid", "identity")
NORMS = ("none", "batch", "group")
RESIDUALS = ("none", "identity", "gated")
INITS = ("normal", "glorot", "he", "lecun", "orthogonal", "delta_orthogonal")
FANS = ("out", "in")
HEADS = ("last", "every_stage")


class SpecError(ValueError):
    """A variant spec that cannot be built; the message names the variant and the field."""


class UnknownVariantError(SpecError):
    """A variant name that is not in the registry."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One network family: what both frameworks build at any depth k, and its training lr.

    Every field but `name` and `activation` has the notebook's value as its default. A stage is a
    conv 3x3 (padding 1) -> [norm] -> activation [-> skip] layer repeated k // 3 times, then a 2x2
    average pool; widths `channels`, 2 * `channels`, 4 * `channels`.
    """

    name: str
    activation: str
    description: str = ""
    negative_slope: float = 0.01  # leaky_relu's slope for x < 0
    norm: str = "none"  # "batch": torch's BatchNorm2d; "group": GroupNorm(norm_groups, C)
    norm_groups: int = 1  # GroupNorm's group count (1: the layer-norm case); must divide `channels`
    residual: str = "none"  # "identity": u = f(x) + x; "gated": u = x + a * f(x), a learned per layer
    residual_gate_init: float = 0.0  # a's initial value (0: SkipInit / ReZero)
    init: str = "normal"  # conv weights, see `conv_init_std` and the orthogonal ones
    init_std: float = OLD_INIT_SIGMA  # "normal"'s std
    init_fan: str = "out"  # fan of glorot / he / lecun
    init_gain: float = 1.0  # scales orthogonal, delta_orthogonal, glorot, he and lecun weights ("normal": init_std)
    bias_std: float = 0.0  # conv bias N(0, bias_std); 0: zeros, the notebook's
    channels: int = 4  # the first stage's width; each later stage doubles it
    heads: str = "last"  # "every_stage": a Linear head after every stage, losses averaged
    lr: float = 0.05
    notebook_class: str | None = None  # the notebook's class, for the eight built-ins
    notebook_pair: tuple[int, int] | None = None  # the notebook's (deepest trainable, shallowest untrainable) k

    @property
    def batchnorm(self) -> bool:
        return self.norm == "batch"

    @property
    def skip(self) -> bool:
        """Whether the same-shape layers have a skip connection."""
        return self.residual != "none"

    @property
    def multihead(self) -> bool:
        return self.heads == "every_stage"

    def fields(self) -> dict[str, Any]:
        """The spec as TOML-ready data (what a results row stores): every field but the name."""
        data = dataclasses.asdict(self)
        del data["name"]
        if data["notebook_pair"] is not None:
            data["notebook_pair"] = list(data["notebook_pair"])
        return data


def _notebook(name, notebook_class, activation, pair, description, **fields) -> Variant:
    return Variant(name, activation, description, notebook_class=notebook_class, notebook_pair=pair, **fields)


#: The notebook's eight, in the notebook's order. Glorot-style: N(0, sqrt(1 / (9 * C_out))).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _notebook("tanh", "CNNtanh", "tanh", (6, 9), "tanh CNN, naive init N(0, 0.05)"),
        _notebook("tanh_newinit", "CNNtanh_newinit", "tanh", (48, 51), "tanh CNN, Glorot-style init",
                  init="glorot"),
        _notebook("elu", "CNNelu", "elu", (39, 42), "ELU CNN, Glorot-style init", init="glorot"),
        _notebook("elu_bn", "CNNeluBN", "elu", (63, 66), "ELU CNN with BatchNorm after every conv",
                  init="glorot", norm="batch"),
        _notebook("resnet", "ResNet", "elu", (102, 105), "ELU + BatchNorm with skip connections",
                  init="glorot", norm="batch", residual="identity"),
        _notebook("tanh_bn_oldinit", "CNNtanhBN_oldinit", "tanh", (48, 51), "tanh CNN with BatchNorm, naive init",
                  norm="batch"),
        # The notebook trained ResNet_noBN with lr 0.005.
        _notebook("resnet_nobn", "ResNet_noBN", "elu", (21, 24), "ELU with skip connections, no BatchNorm",
                  init="glorot", residual="identity", lr=0.005),
        # The notebook's multihead cells set `l = 0.05` (a typo), so `lr` kept 0.005.
        _notebook("elu_multihead", "CNNelu_multihead", "elu", (139, 142), "ELU CNN with a loss head after each stage",
                  init="glorot", heads="every_stage", lr=0.005),
    )
}

#: The built-in (notebook) variants' names.
VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)

#: Variants registered at run time (TOML files, `register`), by name.
_DECLARED: dict[str, Variant] = {}


def variant_names() -> tuple[str, ...]:
    """Every registered variant: the built-ins, then the declared ones in registration order."""
    return VARIANT_NAMES + tuple(_DECLARED)


def get_variant(name: str) -> Variant:
    """The registry entry for `name`, or a clear error listing the valid names."""
    found = VARIANTS.get(name) or _DECLARED.get(name)
    if found is None:
        hint = "" if _DECLARED else " (a variant of your own: declare it in a TOML file, --variants-file)"
        raise UnknownVariantError(f"unknown variant {name!r}; choose one of: {', '.join(variant_names())}{hint}")
    return found


def resolve(variant: str | Variant) -> Variant:
    """A spec from a registered name or a spec object (validated)."""
    if isinstance(variant, Variant):
        return validate(variant)
    return get_variant(variant)


def register(spec: Variant) -> Variant:
    """Add a declared variant (validated) under its name; built-in names cannot be shadowed.
    Registering the same name again replaces the earlier declaration."""
    _check_not_builtin(validate(spec).name)
    _DECLARED[spec.name] = spec
    return spec


def _check_not_builtin(name: str) -> None:
    if name in VARIANTS:
        raise SpecError(f"variant {name!r}: name shadows the built-in variant {name!r}; pick another name")


def unregister(name: str) -> None:
    """Remove a declared variant (tests, notebooks that redeclare)."""
    _DECLARED.pop(name, None)


_FIELDS = {f.name: f for f in dataclasses.fields(Variant)}
#: Fields a TOML table may not set: the name is the table's, the notebook facts are the built-ins'.
_NOT_DECLARABLE = ("name", "notebook_class", "notebook_pair")
_CHOICES = {"activation": ACTIVATIONS, "norm": NORMS, "residual": RESIDUALS, "init": INITS, "init_fan": FANS,
            "heads": HEADS}


def _field_error(spec_name: str, field: str, message: str) -> SpecError:
    return SpecError(f"variant {spec_name!r}, field {field!r}: {message}")


def validate(spec: Variant) -> Variant:
    """`spec` if every field is valid and the network can be built; else a SpecError naming the
    variant and the field, with the valid choices."""
    n = spec.name
    if not isinstance(n, str) or not n.isidentifier():
        raise SpecError(f"variant name {n!r}: use letters, digits and underscores (a Python identifier)")
    for field, choices in _CHOICES.items():
        value = getattr(spec, field)
        if value not in choices:
            raise _field_error(n, field, f"{value!r} is not one of: {', '.join(choices)}")
    for field in ("negative_slope", "residual_gate_init", "init_std", "init_gain", "bias_std", "lr"):
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _field_error(n, field, f"must be a finite number, got {value!r}")
    for field in ("init_std", "bias_std"):
        if getattr(spec, field) < 0:
            raise _field_error(n, field, f"a standard deviation cannot be negative, got {getattr(spec, field)}")
    for field in ("init_gain", "lr"):
        if not getattr(spec, field) > 0:
            raise _field_error(n, field, f"must be positive, got {getattr(spec, field)}")
    if spec.init == "normal" and spec.init_gain != 1.0:
        raise _field_error(n, "init_gain", 'scales the orthogonal and variance-scaling inits, not "normal" '
                                           "(its std is `init_std`); set init_std instead of init_gain")
    for field in ("channels", "norm_groups"):
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _field_error(n, field, f"must be a positive integer, got {value!r}")
    if spec.norm == "group" and spec.channels % spec.norm_groups:
        raise _field_error(n, "norm_groups", f"{spec.norm_groups} groups do not divide the first stage's "
                                             f"{spec.channels} channels; pick a divisor of `channels`")
    if not isinstance(spec.description, str):
        raise _field_error(n, "description", f"must be a string, got {spec.description!r}")
    if spec.init == "delta_orthogonal":
        for stage in range(NUM_STAGES):
            c_in, c_out = stage_channels(stage, spec.channels)
            if c_in > c_out:
                raise _field_error(n, "init", f"delta_orthogonal needs C_in <= C_out, stage {stage} has "
                                              f"{c_in} -> {c_out}; use orthogonal")
    return spec


def spec_from_table(name: str, table: dict[str, Any]) -> Variant:
    """A validated spec from one TOML table's fields (`name` is the table's key)."""
    for field in table:
        if field not in _FIELDS or field in _NOT_DECLARABLE:
            valid = [f for f in _FIELDS if f not in _NOT_DECLARABLE]
            raise _field_error(name, field, f"unknown field; valid fields: {', '.join(valid)}")
    if "activation" not in table:
        raise _field_error(name, "activation", f"missing (required); one of: {', '.join(ACTIVATIONS)}")
    for field, value in table.items():
        expected = _FIELDS[field].type
        if "float" in expected and isinstance(value, int) and not isinstance(value, bool):
            table = {**table, field: float(value)}  # TOML `lr = 1` means 1.0
    return validate(Variant(name=name, **table))


def read_variants(path: str | Path) -> list[Variant]:
    """The validated specs of a TOML file's `[variants.NAME]` tables (nothing registered)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None
    tables = document.get("variants")
    if not isinstance(tables, dict) or not tables:
        raise SpecError(f"{path}: no [variants.NAME] tables; declare each variant as [variants.my_name]")
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise SpecError(f"{path}: variants.{name} must be a table ([variants.{name}]), got {table!r}")
        try:
            spec = spec_from_table(name, table)
            _check_not_builtin(name)
        except SpecError as error:
            raise SpecError(f"{path}: {error}") from None
        specs.append(spec)
    return specs


def load_variants(path: str | Path) -> list[str]:
    """Register every variant of a TOML file (all validated first: a bad one registers none);
    returns their names."""
    specs = read_variants(path)
    for spec in specs:
        register(spec)
    return [spec.name for spec in specs]


def check_depth(depth: int) -> int:
    """Validate a depth k: any integer >= 3 (the models build k // 3 layers per stage)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < NUM_STAGES:
        raise ValueError(f"depth must be an integer >= {NUM_STAGES}, got {depth!r}")
    return depth


def layers_per_stage(depth: int) -> int:
    """k // 3, as the notebook computes it (k = 139 builds 46 layers per stage)."""
    return check_depth(depth) // NUM_STAGES


def stage_channels(stage: int, channels: int = 4) -> tuple[int, int]:
    """(input channels of the stage's first conv, output channels of every conv in the stage),
    for a network whose first stage is `channels` wide (the notebook's 4)."""
    channels_out = channels * 2**stage
    return (1 if stage == 0 else channels_out // 2), channels_out


def head_features(spec: Variant, stage: int) -> int:
    """Features after stage `stage`, flattened (C * H * W) for a 28 x 28 image."""
    return stage_channels(stage, spec.channels)[1] * (28 // 2 ** (stage + 1)) ** 2


#: Gaussian conv inits: std = init_gain * sqrt(scale / (9 * fan)), fan = C_out or C_in per
#: `init_fan`. The notebook's Glorot-style sigma sqrt(1 / (9 * C_out)) is "glorot" (the same formula
#: as lecun's, named as the notebook names it). The gain puts a Gaussian init at any sigma_w^2 =
#: init_gain^2 * scale (fan in), such as a critical point of flaxdepth.theory.
_GAUSSIAN_SCALES = {"glorot": 1.0, "he": 2.0, "lecun": 1.0}


def conv_init_std(variant: Variant, channels_in: int, channels_out: int, fan: str | None = None) -> float:
    """Std of the N(0, std) that a Gaussian-initialized conv weight is drawn from.

    `fan` (None: the spec's `init_fan`) overrides the fan of glorot / he / lecun; the notebook's
    text allows sqrt(1 / (3 * 3 * C_in)) beside its sqrt(1 / (3 * 3 * C_out)). "normal" ignores it
    and `init_gain` (its std is `init_std`).
    """
    fan = variant.init_fan if fan is None else fan
    if fan not in FANS:
        raise ValueError(f"fan must be one of {FANS}, got {fan!r}")
    if variant.init == "normal":
        return variant.init_std
    if variant.init not in _GAUSSIAN_SCALES:
        raise ValueError(f"init {variant.init!r} is not Gaussian")
    # Times 1.0 (every built-in's gain) is exact in floating point: their draws do not change.
    fan_size = 3 * 3 * (channels_out if fan == "out" else channels_in)
    return variant.init_gain * (_GAUSSIAN_SCALES[variant.init] / fan_size) ** 0.5
