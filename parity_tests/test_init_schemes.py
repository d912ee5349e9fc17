"""Every conv initialization a spec can declare follows its formula in both frameworks.

Gaussian schemes (normal, glorot, he, lecun, fan in and out, a gain) and N(0, bias_std) biases:
the pooled draws of SEEDS models against N(0, sigma) (test_init_distributions' moment and
Kolmogorov-Smirnov checks). orthogonal: each draw, its kernel flattened to C_out x 9 C_in as torch flattens it, has
orthonormal rows (or columns, when C_out > 9 C_in) times the gain. delta_orthogonal: the centre
tap is gain times an orthonormal C_in x C_out matrix (M M^T = gain^2 I), the other eight taps are
exactly zero. Gates and GroupNorm affine parameters start at their constants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from flaxdepth import interop, registry, train

from test_init_distributions import normal_problems

DEPTH = 6  # a stage's first conv (1 -> C, C -> 2C) and one scanned same-shape conv
SEEDS = 64  # Gaussian: the smallest pooled tensor, stage 0's first conv, has 36 * 64 samples

SCHEMES = [
    registry.Variant("s_normal", "tanh", init="normal", init_std=0.3, bias_std=0.2),
    registry.Variant("s_glorot_in", "elu", init="glorot", init_fan="in"),
    registry.Variant("s_he_in", "relu", init="he", init_fan="in", channels=6),
    registry.Variant("s_he_out", "relu", init="he", init_fan="out", init_gain=0.8, bias_std=0.05),
    registry.Variant("s_lecun_in", "selu", init="lecun", init_fan="in", norm="group", norm_groups=2),
    registry.Variant("s_orthogonal", "tanh", init="orthogonal", init_gain=1.5, channels=8),
    registry.Variant("s_delta_orthogonal", "tanh", init="delta_orthogonal", init_gain=1.2, bias_std=0.1,
                     residual="gated", residual_gate_init=0.25),
]
assert {s.init for s in SCHEMES} == set(registry.INITS), "a scheme without an init test"


@functools.lru_cache(maxsize=None)
def samples(spec: registry.Variant, framework: str) -> dict[str, np.ndarray]:
    """SEEDS fresh models' parameters by torch key (seeds on the first axis), torch layout."""
    if framework == "torch":
        state_dicts = []
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            state_dicts.append({k: v.numpy() for k, v in torch_ref.build(spec, DEPTH).state_dict().items()})
        return {k: np.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}
    _, init, _, _ = train.compiled_functions(spec, DEPTH, 1)
    state = init(jnp.arange(SEEDS, dtype=jnp.int32), jnp.zeros(SEEDS))
    variables = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    if not spec.batchnorm:
        del variables["batch_stats"]
    exported = [interop.to_torch(spec, DEPTH, jax.tree.map(lambda a: a[i], variables)) for i in range(SEEDS)]
    return {k: np.stack([sd[k] for sd in exported]) for k in exported[0]}


def conv_problems(spec: registry.Variant, key: str, weights: np.ndarray) -> list[str]:
    """Why SEEDS draws (SEEDS, C_out, C_in, 3, 3) of one conv do not follow the spec's init."""
    c_out, c_in = weights.shape[1:3]
    g = spec.init_gain
    if spec.init == "orthogonal":
        flat = weights.reshape(SEEDS, c_out, -1).astype(np.float64)
        gram = flat @ flat.transpose(0, 2, 1) if c_out <= 9 * c_in else flat.transpose(0, 2, 1) @ flat
        error = np.abs(gram - g * g * np.eye(gram.shape[-1])).max()
        return [f"{key}: W W^T differs from gain^2 I by {error:.2g}"] if error > 1e-5 else []
    if spec.init == "delta_orthogonal":
        problems = []
        off_centre = weights.copy()
        off_centre[:, :, :, 1, 1] = 0
        if np.any(off_centre):
            problems.append(f"{key}: {np.count_nonzero(off_centre)} nonzero weights off the centre tap")
        centre = weights[:, :, :, 1, 1].transpose(0, 2, 1).astype(np.float64)  # (C_in, C_out) as HWIO's tap
        error = np.abs(centre @ centre.transpose(0, 2, 1) - g * g * np.eye(c_in)).max()
        if error > 1e-5:
            problems.append(f"{key}: centre tap M M^T differs from gain^2 I by {error:.2g}")
        return problems
    return [f"{key}: {p}" for p in normal_problems(weights, registry.conv_init_std(spec, c_in, c_out))]


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("spec", SCHEMES, ids=lambda s: s.name)
def test_conv_init_follows_the_scheme(spec, framework):
    drawn = samples(spec, framework)
    problems = []
    for slot in interop.layout(spec, DEPTH):
        values = drawn[slot.torch_key]
        if slot.kind == "conv_weight":
            problems += conv_problems(spec, slot.torch_key, values)
        elif slot.path[-2:] == ("conv", "bias"):
            if spec.bias_std > 0:
                problems += [f"{slot.torch_key}: {p}" for p in normal_problems(values, spec.bias_std)]
            elif np.any(values):
                problems.append(f"{slot.torch_key}: nonzero bias")
        elif slot.path[-1] == "gate":
            if np.any(values != np.float32(spec.residual_gate_init)):
                problems.append(f"{slot.torch_key}: gate differs from {spec.residual_gate_init}")
        elif "gn" in slot.path:
            if np.any(values != (1.0 if slot.path[-1] == "scale" else 0.0)):
                problems.append(f"{slot.torch_key}: GroupNorm {slot.path[-1]} not at its constant")
    assert not problems, "\n".join(problems)


def test_orthogonal_checks_have_power():
    """Gaussian draws of the same variance fail the orthogonality checks."""
    rng = np.random.default_rng(0)
    for spec in SCHEMES[-2:]:
        gaussian = rng.normal(0, spec.init_gain / 6, size=(SEEDS, 8, 8, 3, 3)).astype(np.float32)
        assert conv_problems(spec, "w", gaussian)
