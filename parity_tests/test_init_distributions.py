"""flaxdepth's fresh parameters follow the notebook's initialization *distributions*.

The same seed cannot give torch and JAX the same numbers, so parity here is statistical: the
engine's own initializer (`train.compiled_functions(...)[1]`, vmapped) draws SEEDS models per
variant, every parameter tensor is pooled over the seeds and tested against the distribution
the notebook specifies, written out below from the notebook rather than taken from the code:

- conv weight N(0, sigma): sigma 0.05 ("old init") or sqrt(1 / (9 * C_out)) (the notebook's
  Glorot-style choice; sqrt(1 / (9 * C_in)) with fan="in"); conv bias exactly 0;
- Linear weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default);
- BatchNorm scale 1, bias 0, running mean 0, running variance 1, exactly.

Each check has a negative control on the same sample sizes (sigma 10% off, bounds 10% off,
flax's default lecun_normal / zero-bias Dense), so the thresholds provably have power; and
torch_ref's own init, drawn for as many seeds, passes the same checks and agrees with flaxdepth
in a two-sample test. Only numpy is used for the statistics (no scipy here).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from flaxdepth import interop, registry, train

#: 3 layers per stage: the first conv and two scanned layers, so that the scan's per-layer
#: random streams are checked too (nn.scan without split_rngs would repeat one draw).
DEPTH = 9
#: Models drawn per variant. The smallest pooled tensor (stage 0's first conv, 1 -> 4 channels,
#: 36 weights) then has 9216 samples: the relative standard error of its std is 1/sqrt(2n)
#: = 0.7%, so a sigma 10% off lies 13 standard errors away.
SEEDS = 256

#: Deviations allowed for the moments, in standard errors; and the Kolmogorov-Smirnov test's
#: level. Both are set for a false-alarm rate near 1e-6 per check, since a suite of ~1500
#: checks must not fail by chance when the PRNG's implementation changes; the negative controls
#: below show that they still reject the mistakes that matter.
Z = 5.0
KS_ALPHA = 1e-6
KS_C = math.sqrt(-0.5 * math.log(KS_ALPHA / 2))  # asymptotic Kolmogorov critical value, ~2.69

#: The notebook's conv initialization of each variant (its classes' __init__ code).
NOTEBOOK_CONV_INIT = {
    "tanh": "naive",
    "tanh_newinit": "glorot",
    "elu": "glorot",
    "elu_bn": "glorot",
    "resnet": "glorot",
    "tanh_bn_oldinit": "naive",
    "resnet_nobn": "glorot",
    "elu_multihead": "glorot",
}
NAIVE_SIGMA = 0.05

CASES = [pytest.param(v, fan, id=f"{v}-fan_{fan}")
         for v in registry.VARIANT_NAMES
         for fan in (("out", "in") if NOTEBOOK_CONV_INIT.get(v) == "glorot" else ("out",))]
VARIANTS = pytest.mark.parametrize("variant", registry.VARIANT_NAMES)


# ------------------------------------------------------------------------------ statistics

# The standard normal CDF on a grid, from math.erf; interpolating it linearly is off by at most
# step^2 / 8 * max|phi'| < 1e-8, far below any KS threshold here, and vectorizes (no scipy).
_GRID = np.linspace(-10.0, 10.0, 40001)
_PHI = np.array([0.5 * (1.0 + math.erf(t / math.sqrt(2))) for t in _GRID])


def normal_cdf(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.interp(np.asarray(x, np.float64) / sigma, _GRID, _PHI)


def uniform_cdf(x: np.ndarray, bound: float) -> np.ndarray:
    return np.clip((np.asarray(x, np.float64) + bound) / (2 * bound), 0.0, 1.0)


def ks_statistic(samples: np.ndarray, cdf) -> float:
    """sup |empirical CDF - cdf| of the samples (one-sample Kolmogorov-Smirnov)."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    f = cdf(x)
    i = np.arange(n)
    return float(max(((i + 1) / n - f).max(), (f - i / n).max()))


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def normal_problems(x: np.ndarray, sigma: float) -> list[str]:
    """Why the samples are not N(0, sigma) draws (empty: consistent with them)."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    problems = []
    mean = x.mean()
    if abs(mean) > Z * sigma / math.sqrt(n):
        problems.append(f"mean {mean:.3g} is over {Z:g} standard errors from 0")
    # The mean is known (0), so the root mean square estimates sigma; its relative standard
    # error is 1 / sqrt(2n).
    ratio = math.sqrt(np.mean(x * x)) / sigma
    if abs(ratio - 1) > Z / math.sqrt(2 * n):
        problems.append(f"std / sigma = {ratio:.4f}, over {Z:g} standard errors from 1 (n={n})")
    d, limit = ks_statistic(x, lambda t: normal_cdf(t, sigma)), KS_C / math.sqrt(n)
    if d > limit:
        problems.append(f"Kolmogorov-Smirnov D = {d:.4f} > {limit:.4f} against N(0, {sigma:.4g}) (n={n})")
    return problems


def uniform_problems(x: np.ndarray, bound: float) -> list[str]:
    """Why the samples are not U(-bound, bound) draws (empty: consistent with them)."""
    x = np.asarray(x).ravel()
    problems = []
    # Both frameworks draw float32 uniforms between the float32-rounded bounds.
    edge = np.float32(bound)
    outside = int(np.count_nonzero(np.abs(x) > edge))
    if outside:
        problems.append(f"{outside} of {x.size} samples outside +-{bound:.4g}")
    d, limit = ks_statistic(x, lambda t: uniform_cdf(t, bound)), KS_C / math.sqrt(x.size)
    if d > limit:
        problems.append(f"Kolmogorov-Smirnov D = {d:.4f} > {limit:.4f} against U(+-{bound:.4g}) (n={x.size})")
    return problems


# ------------------------------------------------------------------------------ what the notebook specifies


def notebook_sigma(variant: str, slot: interop.Slot, fan: str) -> float:
    if variant not in NOTEBOOK_CONV_INIT:
        raise KeyError(f"variant {variant!r} is not in NOTEBOOK_CONV_INIT: add its notebook init")
    if NOTEBOOK_CONV_INIT[variant] == "naive":
        return NAIVE_SIGMA
    channels_out, channels_in = slot.torch_shape[:2]
    return math.sqrt(1.0 / (3 * 3 * (channels_out if fan == "out" else channels_in)))


def fc_fan_in(variant: str, slot: interop.Slot) -> int:
    """The fan_in of the Linear layer a `fc*.weight` or `fc*.bias` slot belongs to."""
    weight_key = slot.torch_key.rsplit(".", 1)[0] + ".weight"
    (weight,) = [s for s in interop.layout(variant, DEPTH) if s.torch_key == weight_key]
    return weight.torch_shape[1]


BN_CONSTANTS = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0, "num_batches_tracked": 0}


def slot_problems(variant: str, fan: str, slot: interop.Slot, values: np.ndarray) -> list[str]:
    """Why `values` (one parameter of SEEDS fresh models) do not follow the notebook's init."""
    if slot.kind == "conv_weight":
        return normal_problems(values, notebook_sigma(variant, slot, fan))
    if slot.torch_key.startswith("fc"):
        return uniform_problems(values, fc_fan_in(variant, slot) ** -0.5)
    if "bn" in slot.path:
        expected = BN_CONSTANTS[slot.path[-1]]
        wrong = int(np.count_nonzero(values != expected))
        return [f"{wrong} of {values.size} entries differ from {expected}"] if wrong else []
    assert slot.path[-2:] == ("conv", "bias"), slot
    wrong = int(np.count_nonzero(values))
    return [f"{wrong} of {values.size} conv biases are not 0"] if wrong else []


# ------------------------------------------------------------------------------ samples


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


@functools.lru_cache(maxsize=None)
def flax_samples(variant: str, fan: str) -> dict[str, np.ndarray]:
    """flaxdepth's fresh parameters of seeds 0..SEEDS-1, by torch key, seeds on the first axis."""
    # The engine's own initializer (compiled without optimization: it runs once per depth).
    _, init, _, _ = train.compiled_functions(variant, DEPTH, 1, fan)
    state = init(jnp.arange(SEEDS, dtype=jnp.int32), jnp.zeros(SEEDS))
    variables = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    samples = {}
    for slot in interop.layout(variant, DEPTH):
        value = _get(variables[slot.collection], slot.path)
        samples[slot.torch_key] = value if slot.layer is None else value[:, slot.layer]
    return samples


@functools.lru_cache(maxsize=None)
def torch_samples(variant: str, fan: str) -> dict[str, np.ndarray]:
    """torch_ref's own init (the notebook's code) for SEEDS torch seeds, by state_dict key."""
    state_dicts = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = torch_ref.build(variant, DEPTH, fan=fan)
        state_dicts.append({k: v.numpy() for k, v in model.state_dict().items()})
    return {k: np.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}


def check_all(variant: str, fan: str, samples: dict[str, np.ndarray], who: str) -> int:
    failures = []
    for slot in interop.layout(variant, DEPTH):
        failures += [f"{who} {slot.torch_key}: {p}" for p in slot_problems(variant, fan, slot, samples[slot.torch_key])]
    assert not failures, "\n".join(failures)
    return len(interop.layout(variant, DEPTH))


# ------------------------------------------------------------------------------ tests


def test_every_variant_has_its_notebook_init():
    assert set(NOTEBOOK_CONV_INIT) == set(registry.VARIANT_NAMES)


@pytest.mark.parametrize("variant, fan", CASES)
def test_flax_init_follows_notebook_distributions(variant, fan):
    samples = flax_samples(variant, fan)
    check_all(variant, fan, samples, "flaxdepth")


@pytest.mark.parametrize("variant, fan", CASES)
def test_draws_are_independent_across_layers_and_seeds(variant, fan):
    """Scanned layers must get their own random streams, and seeds their own weights: a repeated
    or correlated draw has the right marginal distribution but is not the notebook's init."""
    samples = flax_samples(variant, fan)
    slots = [s for s in interop.layout(variant, DEPTH) if s.kind == "conv_weight"]
    scanned = {}
    for slot in slots:
        if slot.layer is not None:
            scanned.setdefault(slot.path, []).append(samples[slot.torch_key])
    assert scanned, "DEPTH must give at least two scanned layers per stage"
    pairs = [(f"{'/'.join(path)} layers 0, 1", a[0], a[1]) for path, a in scanned.items()]
    pairs += [(f"{s.torch_key} seeds i, i+1", samples[s.torch_key][:-1], samples[s.torch_key][1:]) for s in slots]
    for what, a, b in pairs:
        a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
        r = np.corrcoef(a, b)[0, 1]
        assert abs(r) < Z / math.sqrt(a.size), f"{what}: correlation {r:.4f} (n={a.size})"


@pytest.mark.parametrize("variant, fan", CASES)
def test_torch_ref_init_follows_the_same_distributions(variant, fan):
    """The reference passes the same checks (so they encode what the notebook's code draws), and
    flaxdepth's and torch_ref's pooled draws agree in a two-sample Kolmogorov-Smirnov test."""
    reference = torch_samples(variant, fan)
    check_all(variant, fan, reference, "torch_ref")
    ours = flax_samples(variant, fan)
    for slot in interop.layout(variant, DEPTH):
        if slot.kind == "conv_weight" or slot.torch_key.startswith("fc"):
            a, b = ours[slot.torch_key], reference[slot.torch_key]
            d = ks_two_sample(a, b)
            limit = KS_C * math.sqrt((a.size + b.size) / (a.size * b.size))
            assert d <= limit, f"{slot.torch_key}: two-sample D = {d:.4f} > {limit:.4f}"


@functools.lru_cache(maxsize=None)
def flax_default_draws(shape: tuple[int, ...], what: str) -> np.ndarray:
    """SEEDS draws of what flax.linen's Conv / Dense would hold by default for this shape."""
    init = nn.linear.default_kernel_init if what == "kernel" else nn.initializers.zeros_init()
    keys = jax.random.split(jax.random.key(12345), SEEDS)
    # Unoptimized, as the engine compiles its init: XLA's optimizing compile of the random bit
    # generator takes seconds per shape on this CPU, the draw itself milliseconds.
    draw = jax.jit(jax.vmap(lambda key: init(key, shape, jnp.float32)),
                   compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(draw(keys))


@VARIANTS
def test_checks_reject_wrong_distributions(variant):
    """Negative controls, at the sample sizes used above: the same flaxdepth draws rescaled so
    that sigma (or the uniform bound) is 10% off, and flax's own defaults (lecun_normal, a
    truncated normal with std 1/sqrt(fan_in), and zero Dense biases), must all be rejected."""
    fan = "out"
    samples = flax_samples(variant, fan)
    for slot in interop.layout(variant, DEPTH):
        values = samples[slot.torch_key]
        what = f"{variant} {slot.torch_key}"
        if slot.kind == "conv_weight":
            flax_shape = tuple(slot.torch_shape[i] for i in (2, 3, 1, 0))  # OIHW -> HWIO
            wrong = {"sigma x 1.1": values * 1.1, "sigma x 0.9": values * 0.9,
                     "lecun_normal": flax_default_draws(flax_shape, "kernel")}
        elif slot.torch_key.startswith("fc") and slot.kind == "fc_weight":
            wrong = {"bound x 1.1": values * 1.1, "bound x 0.9": values * 0.9,
                     "lecun_normal": flax_default_draws(slot.torch_shape[::-1], "kernel")}
        elif slot.torch_key.startswith("fc"):
            wrong = {"bound x 1.1": values * 1.1, "zeros (flax's Dense bias)": flax_default_draws(slot.torch_shape, "bias")}
        else:
            continue
        # The controls are only meaningful if the real draws pass.
        assert not slot_problems(variant, fan, slot, values), what
        for name, draws in wrong.items():
            assert slot_problems(variant, fan, slot, draws), f"{what}: {name} draws were not rejected"
