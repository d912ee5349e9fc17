"""Move weights and batches between the PyTorch notebook's models and flaxdepth's.

Public API (numpy in, numpy out, torch state_dict keys and layouts on the torch side):

- `from_torch(variant, depth, state_dict) -> variables`
- `to_torch(variant, depth, variables) -> dict[str, numpy.ndarray]` (the exact inverse)
- `apply(variant, depth, variables, images, train=False) -> (logits, variables)`
- `loss_and_grads(variant, depth, variables, images, labels) -> (loss, grads)`

`variant` is a registered name or a `registry.Variant` spec. `images` are NCHW float arrays,
normalized as the notebook feeds them. Computations here run at
'highest' matmul precision: they exist to compare frameworks, so TF32 on GPUs is off.
Missing, extra or mis-shaped entries raise `InteropError` naming them; nothing is dropped.
To compare in float64, call `jax.config.update("jax_enable_x64", True)` first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxdepth import models, objective, registry


class InteropError(ValueError):
    """A state_dict or variables tree that does not fit the variant and depth."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one torch state_dict entry lives in the Flax variables."""

    torch_key: str
    torch_shape: tuple[int, ...]
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # inside the collection
    layer: int | None  # index along the scanned layer axis, None outside a scan
    kind: str  # "conv_weight", "fc_weight" (transposed) or "plain"


def _torch_prefixes(variant: registry.Variant, stage: int, layer: int) -> tuple[str, str, str | None]:
    """torch module prefixes (conv, norm, residual block or None) of one layer, as the notebook's
    nn.Sequential numbers them."""
    base = f"conv_stages.{stage}"
    if variant.skip:
        # ResNet: the first block of a stage is a plain Sequential(conv, [bn,] act); the others
        # are residual blocks wrapping that Sequential as `.block` (a gated block holds `.gate`).
        block = f"{base}.0" if layer == 0 else f"{base}.{layer}.block"
        return f"{block}.0", f"{block}.1", None if layer == 0 else f"{base}.{layer}"
    modules_per_layer = 3 if variant.norm != "none" else 2  # conv, [norm,] activation
    first = layer * modules_per_layer
    return f"{base}.{first}", f"{base}.{first + 1}", None


#: torch BatchNorm2d / GroupNorm entries -> (collection, Flax name); GroupNorm has the first two
_NORM_ENTRIES = (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
    ("num_batches_tracked", "batch_stats", "num_batches_tracked"),
)


def layout(variant: str | registry.Variant, depth: int) -> list[Slot]:
    """Every torch state_dict entry of `variant` (a name or spec) at depth k, in the notebook's order."""
    spec = registry.resolve(variant)
    layers = registry.layers_per_stage(depth)
    slots: list[Slot] = []
    for stage in range(registry.NUM_STAGES):
        channels_in, channels_out = registry.stage_channels(stage, spec.channels)
        for layer in range(layers):
            scope = (f"stage{stage}", "first" if layer == 0 else "layers")
            index = None if layer == 0 else layer - 1
            conv, norm, block = _torch_prefixes(spec, stage, layer)
            c_in = channels_in if layer == 0 else channels_out
            if block is not None and spec.residual == "gated":
                slots.append(Slot(f"{block}.gate", (), "params", (*scope, "gate"), index, "plain"))
            slots.append(Slot(f"{conv}.weight", (channels_out, c_in, 3, 3), "params",
                              (*scope, "conv", "kernel"), index, "conv_weight"))
            slots.append(Slot(f"{conv}.bias", (channels_out,), "params",
                              (*scope, "conv", "bias"), index, "plain"))
            if spec.norm != "none":
                entries = _NORM_ENTRIES if spec.norm == "batch" else _NORM_ENTRIES[:2]
                module = "bn" if spec.norm == "batch" else "gn"
                for torch_name, collection, name in entries:
                    shape = () if torch_name == "num_batches_tracked" else (channels_out,)
                    slots.append(Slot(f"{norm}.{torch_name}", shape, collection,
                                      (*scope, module, name), index, "plain"))
    heads = ((1, 0), (2, 1), (3, 2)) if spec.multihead else ((None, registry.NUM_STAGES - 1),)
    for number, stage in heads:
        name = "fc" if number is None else f"fc{number}"
        slots.append(Slot(f"{name}.weight", (registry.NUM_CLASSES, registry.head_features(spec, stage)), "params",
                          (name, "kernel"), None, "fc_weight"))
        slots.append(Slot(f"{name}.bias", (registry.NUM_CLASSES,), "params",
                          (name, "bias"), None, "plain"))
    return slots


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _torch_to_flax_array(slot: Slot, value: np.ndarray) -> np.ndarray:
    if slot.kind == "conv_weight":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if slot.kind == "fc_weight":
        return value.T  # (out, in) -> (in, out)
    return value


def _flax_to_torch_array(slot: Slot, value: np.ndarray) -> np.ndarray:
    if slot.kind == "conv_weight":
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if slot.kind == "fc_weight":
        return value.T
    if slot.path[-1] == "num_batches_tracked":
        return value.astype(np.int64)  # torch keeps this counter as int64
    return value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_keys(what: str, expected: list[str], given: list[str]) -> None:
    given_set, expected_set = set(given), set(expected)
    missing = [k for k in expected if k not in given_set]
    extra = [k for k in given if k not in expected_set]
    problems = []
    if missing:
        problems.append(f"missing {_describe(missing)}")
    if extra:
        problems.append(f"unexpected {_describe(extra)}")
    if problems:
        raise InteropError(f"{what}: {'; '.join(problems)}")


def from_torch(variant: str | registry.Variant, depth: int, state_dict: Mapping[str, Any]) -> dict:
    """A torch state_dict (tensors or numpy arrays, the notebook's keys) as Flax variables,
    BatchNorm running statistics included. Dtypes are kept (float64 needs jax_enable_x64)."""
    variant = registry.resolve(variant)
    slots = layout(variant, depth)
    _check_keys(f"state_dict for {variant.name} k={depth}", [s.torch_key for s in slots], list(state_dict))
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    bad_shapes = [
        f"{s.torch_key} {tuple(arrays[s.torch_key].shape)} (expected {s.torch_shape})"
        for s in slots
        if tuple(arrays[s.torch_key].shape) != s.torch_shape
    ]
    if bad_shapes:
        raise InteropError(f"state_dict for {variant.name} k={depth}: wrong shape for {_describe(bad_shapes)}")

    stacked: dict[tuple[str, ...], list[np.ndarray]] = {}
    variables: dict = {}
    for slot in slots:
        value = _torch_to_flax_array(slot, arrays[slot.torch_key])
        if slot.layer is None:
            _set(variables, (slot.collection, *slot.path), value)
        else:
            stacked.setdefault((slot.collection, *slot.path), []).append(value)
    for path, values in stacked.items():
        _set(variables, path, np.stack(values))
    return jax.tree.map(jnp.asarray, variables)


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*prefix, name))
        else:
            yield (*prefix, name)


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _export(variant: registry.Variant, depth: int, tree: Mapping, collections: tuple[str, ...]) -> dict[str, np.ndarray]:
    slots = [s for s in layout(variant, depth) if s.collection in collections]
    tree = {c: tree[c] for c in tree if c in collections}
    expected = {(s.collection, *s.path) for s in slots}
    _check_keys(
        f"variables for {variant.name} k={depth}",
        ["/".join(p) for p in sorted(expected)],
        ["/".join(p) for p in _leaf_paths(tree)],
    )
    layers_per_stage = registry.layers_per_stage(depth)
    result: dict[str, np.ndarray] = {}
    for slot in slots:
        value = np.asarray(_get(tree, (slot.collection, *slot.path)))
        if slot.layer is not None:
            if value.shape[:1] != (layers_per_stage - 1,):
                raise InteropError(
                    f"variables for {variant.name} k={depth}: {'/'.join(slot.path)} has "
                    f"{value.shape[:1]} scanned layers, expected {layers_per_stage - 1}"
                )
            value = value[slot.layer]
        value = _flax_to_torch_array(slot, value)
        if value.shape != slot.torch_shape:
            raise InteropError(
                f"variables for {variant.name} k={depth}: {slot.torch_key} has shape {value.shape} "
                f"in torch layout, expected {slot.torch_shape}"
            )
        result[slot.torch_key] = value
    return result


def to_torch(variant: str | registry.Variant, depth: int, variables: Mapping) -> dict[str, np.ndarray]:
    """Flax variables as a torch state_dict of numpy arrays: the notebook's keys, order and layouts.

    Load it with `torch_ref.load_weights(model, sd)` (`model.load_state_dict` works too, in time
    quadratic in depth: see torch_ref.load_weights).
    """
    return _export(registry.resolve(variant), depth, variables, ("params", "batch_stats"))


@functools.lru_cache(maxsize=None)
def _model(variant: registry.Variant, depth: int) -> models.DepthCNN:
    return models.build_model(variant, depth)


def _images_nhwc(images: Any) -> jax.Array:
    images = _to_numpy(images)
    if images.ndim != 4 or images.shape[1] != 1:
        raise InteropError(f"images must be NCHW with one channel, got shape {images.shape}")
    return jnp.asarray(images.transpose(0, 2, 3, 1))  # NCHW -> NHWC


@functools.partial(jax.jit, static_argnames=("variant", "depth", "train"))
def _apply(variant, depth, variables, images, train):
    model = _model(variant, depth)
    if train and "batch_stats" in variables:
        outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return outputs, {**variables, **updates}
    return model.apply(variables, images, train=train), variables


def apply(variant: str | registry.Variant, depth: int, variables: Mapping, images: Any, train: bool = False):
    """Logits (numpy; a tuple of three for elu_multihead) for NCHW `images`, and the variables,
    whose BatchNorm statistics are updated exactly as torch updates them when `train=True`."""
    registry.check_depth(depth)
    with jax.default_matmul_precision("highest"):
        outputs, new_variables = _apply(registry.resolve(variant), depth, dict(variables), _images_nhwc(images), train)
    logits = jax.tree.map(np.asarray, outputs)
    return logits, new_variables


@functools.partial(jax.jit, static_argnames=("variant", "depth", "train"))
def _loss_and_grads(variant, depth, variables, images, labels, train):
    model = _model(variant, depth)

    def loss_fn(params):
        if train:
            outputs = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])[0]
        else:
            outputs = model.apply({**variables, "params": params}, images, train=False)
        return objective.cross_entropy(outputs, labels)

    return jax.value_and_grad(loss_fn)(variables["params"])


def loss_and_grads(variant: str | registry.Variant, depth: int, variables: Mapping, images: Any, labels: Any, train: bool = True):
    """The notebook's training loss (mean of the three heads' cross-entropies for elu_multihead)
    and its gradients as a dict keyed and laid out like the torch state_dict. `train=False` is the
    loss of a model in eval mode (BatchNorm on its running statistics), which the notebook's loop
    trains from epoch 2 on."""
    variant = registry.resolve(variant)
    registry.check_depth(depth)
    labels = jnp.asarray(_to_numpy(labels))
    with jax.default_matmul_precision("highest"):
        loss, grads = _loss_and_grads(variant, depth, dict(variables), _images_nhwc(images), labels, train)
    return float(loss), _export(variant, depth, {"params": grads}, ("params",))
