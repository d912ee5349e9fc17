"""Per-layer signal diagnostics of a torch_ref model, through forward hooks and retained gradients:
the statistics and keys of flaxdepth.measure (whose docstring defines them), computed
independently, so that the parity suite can compare the two frameworks."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from torch_ref.models import DepthCNN

#: The same thresholds as flaxdepth.measure's.
SATURATION = 0.99
BATCHNORM_EPS = 1e-5
_SATURATION_MEASURES = {"tanh": torch.abs, "sigmoid": lambda y: torch.abs(2 * y - 1)}


@dataclasses.dataclass(frozen=True)
class ConvUnit:
    """The modules of one conv layer: conv, norm (None without), activation, and the residual block
    that adds its branch to its input (None for a layer without a skip)."""

    stage: int
    layer: int
    conv: nn.Conv2d
    norm: nn.Module | None
    activation: nn.Module
    residual: nn.Module | None


def conv_units(model: DepthCNN) -> list[ConvUnit]:
    """Every conv layer of a torch_ref model, in network order."""
    spec = model.spec
    units = []
    for stage, sequential in enumerate(model.conv_stages):
        modules = list(sequential)[:-1]  # the last is the average pool
        if spec.skip:  # the first layer a plain Sequential, the others residual blocks around one
            layers = [(None, list(modules[0]))] + [(block, list(block.block)) for block in modules[1:]]
        else:  # the layers' modules one after the other
            size = 3 if spec.norm != "none" else 2
            layers = [(None, modules[i:i + size]) for i in range(0, len(modules), size)]
        for index, (residual, parts) in enumerate(layers):
            units.append(ConvUnit(stage, index, parts[0], parts[1] if len(parts) == 3 else None, parts[-1],
                                  residual))
    return units


def _moments(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims)


def _unit_statistics(unit: ConvUnit, seen: dict[str, Any], activation: str) -> dict[str, float]:
    everything, pixels = (0, 1, 2, 3), (0, 2, 3)
    stats = {}
    for name in ("pre_activation", "activation"):
        mean, var = _moments(seen[name], everything)
        stats[f"{name}_mean"], stats[f"{name}_variance"] = mean.item(), var.item()
    output = seen["output"]
    channel_mean, channel_var = _moments(output, pixels)
    stats["avg_channel_squared_mean"] = channel_mean.square().mean().item()
    stats["avg_channel_variance"] = channel_var.mean().item()
    if "residual_branch" in seen:
        stats["residual_variance"] = _moments(seen["residual_branch"], pixels)[1].mean().item()
    if activation in _SATURATION_MEASURES:
        saturated = _SATURATION_MEASURES[activation](seen["activation"]) > SATURATION
        stats["saturated_fraction"] = saturated.to(output.dtype).mean().item()
    stats["output_grad_norm"] = output.grad.norm().item()
    if "batchnorm_input" in seen:
        x = seen["batchnorm_input"]
        batch_mean = x.mean(pixels)
        batch_var = x.var(pixels, unbiased=True)  # as torch's running_var
        running_mean, running_var = seen["running_mean"], seen["running_var"]
        stats["running_mean_distance"] = ((running_mean - batch_mean).norm() / batch_mean.norm()).item()
        stats["running_var_distance"] = ((running_var - batch_var).norm() / batch_var.norm()).item()
        stats["running_mean_shift"] = ((running_mean - batch_mean).square() / (batch_var + BATCHNORM_EPS)
                                       ).mean().sqrt().item()
    return stats


def _parameters(unit: ConvUnit) -> dict[str, nn.Parameter]:
    """The layer's parameters under flaxdepth.measure's names."""
    named = {"conv_weight": unit.conv.weight, "conv_bias": unit.conv.bias}
    if unit.norm is not None:
        named.update(norm_weight=unit.norm.weight, norm_bias=unit.norm.bias)
    if unit.residual is not None and hasattr(unit.residual, "gate"):
        named["gate"] = unit.residual.gate
    return named


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def layer_diagnostics(model: DepthCNN, images: torch.Tensor, labels: torch.Tensor,
                      bn_train: bool = True) -> dict[str, Any]:
    """{"loss", "layers"} as flaxdepth.measure.layer_diagnostics computes them, for a torch_ref
    model on normalized NCHW `images` and int64 `labels`, BatchNorm in train mode or on its
    running statistics. Measured on a copy: the model, its statistics and gradients stay as they are."""
    model = copy.deepcopy(model).train(bn_train)
    model.zero_grad(set_to_none=True)
    units = conv_units(model)
    seen: list[dict[str, Any]] = [{} for _ in units]
    handles = []

    def keep(record: dict, name: str, retain_grad: bool = False):
        def hook(module, inputs, output):
            if retain_grad:
                output.retain_grad()
            record[name] = output
        return hook

    def keep_batchnorm_input(record: dict):
        def hook(module, inputs):
            # before the forward moves them (train mode)
            record.update(batchnorm_input=inputs[0], running_mean=module.running_mean.clone(),
                          running_var=module.running_var.clone())
        return hook

    for unit, record in zip(units, seen):
        if isinstance(unit.norm, nn.BatchNorm2d):
            handles.append(unit.norm.register_forward_pre_hook(keep_batchnorm_input(record)))
        handles.append((unit.norm or unit.conv).register_forward_hook(keep(record, "pre_activation")))
        handles.append(unit.activation.register_forward_hook(keep(record, "activation",
                                                                  retain_grad=unit.residual is None)))
        if unit.residual is not None:
            handles.append(unit.residual.register_forward_hook(keep(record, "output", retain_grad=True)))
    try:
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()
    heads = output if isinstance(output, tuple) else (output,)
    loss = sum(nn.functional.cross_entropy(head, labels) for head in heads) / len(heads)
    loss.backward()

    layers = []
    for unit, record in zip(units, seen):
        with torch.no_grad():
            if unit.residual is None:
                record["output"] = record["activation"]
            else:  # what the block adds to its input: gate * block(x), or block(x)
                gate = getattr(unit.residual, "gate", None)
                record["residual_branch"] = record["activation"] if gate is None else gate * record["activation"]
            layer = {"stage": unit.stage, "layer": unit.layer}
            layer.update({name: _finite_or_none(value) for name, value in
                          _unit_statistics(unit, record, model.spec.activation).items()})
            layer["param_grad_norms"] = {name: _finite_or_none(parameter.grad.norm().item())
                                         for name, parameter in _parameters(unit).items()}
        layers.append(layer)
    return {"loss": _finite_or_none(loss.item()), "layers": layers}
