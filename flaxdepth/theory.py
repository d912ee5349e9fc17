"""Mean-field signal propagation (Poole et al. 2016, Schoenholz et al. 2017) for flaxdepth's variants.

    python -m flaxdepth.theory --activation tanh --sigma-w2 1.5 --sigma-b2 0.05 [--json]
    python -m flaxdepth.theory --variant tanh [--variants-file F] [--json]
    python -m flaxdepth.theory --critical --activation tanh --sigma-b2 0.05 [--json]

A layer h = W phi(h_prev) + b with weights of variance sigma_w^2 / fan_in and biases of variance
sigma_b^2, at infinite width. Computed (../shared/docs/depth-theory.md has the formulas):
- q*, the fixed point of the length map q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2 that its
  iterates reach from q_0 (default 1); inf where they grow without bound;
- chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2], the slope of the correlation map at c = 1;
- the depth scales xi_q = -1 / log(slope of the length map at q*) and xi_c = -1 / log(sigma_w^2
  E[phi'(u1) phi'(u2)]) at the correlation map's fixed point c* (1 in the ordered phase);
- the phase: "critical" where |chi_1 - 1| <= PHASE_TOLERANCE (xi_c = inf there), else "ordered"
  (chi_1 < 1) or "chaotic" (chi_1 > 1); "exploding" where q* = inf (no fixed point: the forward
  variance grows without bound, so xi_q, xi_c and c* are undefined);
- the predicted trainable depth 6 xi_c, in layers (Schoenholz et al. 2017).

Gaussian integrals are Gauss-Legendre sums on each side of 0 (z = 10 t^2, nodes crowded toward 0;
pairs in polar coordinates, sectors bounded by the rays where an argument is 0); they agree with
scipy's adaptive quad to 1e-11 up to q = 1e3 for every activation: kinks at 0 (elu's second
derivative, selu's first) fall on the rule's edges, and tanh(sqrt(q) z), whose poles at
z = i pi / (2 sqrt(q)) approach the real line as q grows, keeps converging (Gauss-Hermite with 101
nodes is off by 6e-7 at q = 3 and 5e-4 at q = 10; it agrees to 1e-12 at q <= 0.5). Piecewise-linear activations (relu, leaky_relu, identity) have closed forms (relu:
E[phi'^2] = 1/2, the arc-cosine kernel). The delta functions in relu's, leaky_relu's and selu's
second derivatives meet phi(0) = 0 and add nothing.

JSON: an infinite quantity is the string "inf", an undefined one null.
numpy and scipy only: importing this module imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Callable

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy import optimize, special

from flaxdepth import cli, registry
from flaxdepth.config import ConfigError

PROG = "python -m flaxdepth.theory"
#: Schoenholz et al. 2017: networks trained roughly up to this many times xi_c layers.
TRAINABLE_DEPTH_FACTOR = 6
#: |chi_1 - 1| within this is the critical line (quadrature and float rounding put exact critical
#: points, tanh at sigma_w^2 = 1 or relu at 2, within 1e-12 of 1).
PHASE_TOLERANCE = 1e-9
#: The length map's iterates are taken to grow without bound (q* = inf) past this multiple of q_0.
UNBOUNDED_Q = 1e12
#: Below this fraction of q_0 with the map still shrinking q, q* is 0 (for phi(0) = 0, sigma_b = 0).
VANISHING_Q = 1e-12

# E_z over one side of 0, z = HALF_LINE_END t^2 with Gauss-Legendre nodes in t on [0, 1]: the
# nodes crowd toward 0, where a kink sits and where tanh(sqrt(q) z) turns at large q (the density
# beyond 10 is below 1e-22). Weights carry the normal density, normalized to 1/2 a side.
_HALF_LINE_END = 10.0


def _graded_half_line(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = leggauss(nodes)
    t = (x + 1) / 2
    z = _HALF_LINE_END * t * t
    weights = w * t * np.exp(-z * z / 2)  # dz = 2 HALF_LINE_END t dt; constants go in the normalization
    return z, weights / (2 * weights.sum())


_HALF_NODES, _HALF_WEIGHTS = _graded_half_line(100)
# Pairs in polar coordinates: radius r with density r e^(-r^2 / 2) / (2 pi) (the same graded nodes),
# angle by Gauss-Legendre within each sector where neither argument changes sign, the nodes
# crowded toward the sector's edges (x -> sin(pi x / 2)), where the arguments cross 0.
_RADII, _RADIAL_WEIGHTS = _graded_half_line(100)
_RADIAL_WEIGHTS = _RADIAL_WEIGHTS * _RADII / (2 * math.pi * (_RADIAL_WEIGHTS * _RADII).sum())
_legendre_x, _legendre_w = leggauss(64)
_ANGLE_X = np.sin(math.pi * _legendre_x / 2)
_ANGLE_W = _legendre_w * math.pi / 2 * np.cos(math.pi * _legendre_x / 2)
del _legendre_x, _legendre_w

SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
_GELU_TANH_K = math.sqrt(2 / math.pi)
_GELU_TANH_A = 0.044715


@dataclasses.dataclass(frozen=True)
class Branch:
    """phi, phi' and phi'' on (part of) the real line, as numpy functions."""

    value: Callable[[np.ndarray], np.ndarray]
    first: Callable[[np.ndarray], np.ndarray]
    second: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation for the Gaussian integrals: `positive` on x > 0, `negative` on x < 0 (the same
    branch for a smooth one; two that meet at a kink at 0 otherwise). `linear_slopes` (slope for
    x > 0, for x < 0) marks a piecewise-linear one, whose integrals have closed forms."""

    name: str
    positive: Branch
    negative: Branch
    linear_slopes: tuple[float, float] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # each branch only on its own side (elu's e^x would overflow at large positive x)
        return np.where(x > 0, self.positive.value(np.maximum(x, 0)), self.negative.value(np.minimum(x, 0)))

    def slope_at_infinity(self) -> float:
        """lim E[phi'(sqrt(q) z)^2] as q -> inf: the mean of phi'(+inf)^2 and phi'(-inf)^2."""
        far = 1e6
        high = float(self.positive.first(np.array(far)))
        low = float(self.negative.first(np.array(-far)))
        return (high * high + low * low) / 2


def _zero(x):
    return np.zeros_like(x, dtype=float)


def _one(x):
    return np.ones_like(x, dtype=float)


def _linear(slope: float) -> Branch:
    return Branch(lambda x: slope * x, lambda x: slope * _one(x), _zero)


def _exponential(scale: float) -> Branch:
    """scale * (e^x - 1), the negative side of elu (scale 1) and selu."""
    return Branch(lambda x: scale * np.expm1(x), lambda x: scale * np.exp(x), lambda x: scale * np.exp(x))


def _tanh_branch() -> Branch:
    def first(x):
        t = np.tanh(x)
        return 1 - t * t

    def second(x):
        t = np.tanh(x)
        return -2 * t * (1 - t * t)
    return Branch(np.tanh, first, second)


def _sigmoid_branch() -> Branch:
    def first(x):
        s = special.expit(x)
        return s * (1 - s)

    def second(x):
        s = special.expit(x)
        return s * (1 - s) * (1 - 2 * s)
    return Branch(special.expit, first, second)


def _gelu_branch() -> Branch:
    """x Phi(x), the exact (erf) GELU."""
    def cdf(x):
        return special.ndtr(x)

    def pdf(x):
        return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return Branch(lambda x: x * cdf(x), lambda x: cdf(x) + x * pdf(x), lambda x: (2 - x * x) * pdf(x))


def _gelu_tanh_branch() -> Branch:
    """0.5 x (1 + tanh(g(x))), g(x) = sqrt(2 / pi) (x + 0.044715 x^3)."""
    def parts(x):
        t = np.tanh(_GELU_TANH_K * (x + _GELU_TANH_A * x**3))
        return t, _GELU_TANH_K * (1 + 3 * _GELU_TANH_A * x * x), _GELU_TANH_K * 6 * _GELU_TANH_A * x

    def value(x):
        return 0.5 * x * (1 + parts(x)[0])

    def first(x):
        t, g1, _ = parts(x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * g1

    def second(x):
        t, g1, g2 = parts(x)
        return (1 - t * t) * (g1 + 0.5 * x * (g2 - 2 * t * g1 * g1))
    return Branch(value, first, second)


def _silu_branch() -> Branch:
    def first(x):
        s = special.expit(x)
        return s * (1 + x * (1 - s))

    def second(x):
        s = special.expit(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))
    return Branch(lambda x: x * special.expit(x), first, second)


def _softplus_branch() -> Branch:
    """log(1 + e^x); torch's linear branch above 20 differs from it by under 3e-9."""
    def second(x):
        s = special.expit(x)
        return s * (1 - s)
    return Branch(lambda x: np.logaddexp(x, 0), special.expit, second)


def activation(name: str, negative_slope: float = 0.01) -> Activation:
    """The registry activation `name` (registry.ACTIVATIONS) as numpy functions; leaky_relu with
    `negative_slope`."""
    if name == "relu":
        return Activation(name, _linear(1.0), _linear(0.0), linear_slopes=(1.0, 0.0))
    if name == "leaky_relu":
        return Activation(name, _linear(1.0), _linear(negative_slope), linear_slopes=(1.0, negative_slope))
    if name == "identity":
        return Activation(name, _linear(1.0), _linear(1.0), linear_slopes=(1.0, 1.0))
    if name == "elu":
        return Activation(name, _linear(1.0), _exponential(1.0))
    if name == "selu":
        return Activation(name, _linear(SELU_SCALE), _exponential(SELU_SCALE * SELU_ALPHA))
    smooth = {"tanh": _tanh_branch, "sigmoid": _sigmoid_branch, "gelu": _gelu_branch,
              "gelu_tanh": _gelu_tanh_branch, "silu": _silu_branch, "softplus": _softplus_branch}
    if name not in smooth:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(registry.ACTIVATIONS)}")
    branch = smooth[name]()
    return Activation(name, branch, branch)


# --- Gaussian integrals ------------------------------------------------------------------------

def gaussian_mean(act: Activation, q: float, integrand: Callable[[Branch, np.ndarray], np.ndarray]) -> float:
    """E_z[integrand(branch, sqrt(q) z)], z ~ N(0, 1), `branch` the activation's piece at the point."""
    scale = math.sqrt(q)
    return float(_HALF_WEIGHTS @ integrand(act.positive, scale * _HALF_NODES)
                 + _HALF_WEIGHTS @ integrand(act.negative, -scale * _HALF_NODES))


def pair_mean(act: Activation, q: float, c: float,
              integrand: Callable[[Branch, np.ndarray, Branch, np.ndarray], np.ndarray]) -> float:
    """E[integrand(branch1, u1, branch2, u2)] with u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2)."""
    scale, c = math.sqrt(q), min(max(c, -1.0), 1.0)
    # (z1, z2) = r (cos t, sin t) gives u1 = sqrt(q) r cos t, u2 = sqrt(q) r cos(t - beta), cos beta = c:
    # the kinks lie on four rays, between which both arguments keep their signs
    beta = math.acos(c)
    rays = sorted({0.0, 2 * math.pi} | {(a + beta * shifted) % (2 * math.pi)
                                        for a in (math.pi / 2, 3 * math.pi / 2) for shifted in (0, 1)})
    total = 0.0
    for start, end in zip(rays, rays[1:]):
        if end - start < 1e-15:
            continue
        middle = (start + end) / 2
        branch1 = act.positive if math.cos(middle) > 0 else act.negative
        branch2 = act.positive if math.cos(middle - beta) > 0 else act.negative
        angles = (start + end) / 2 + (end - start) / 2 * _ANGLE_X
        radial = scale * _RADII[:, None]
        values = integrand(branch1, radial * np.cos(angles), branch2, radial * np.cos(angles - beta))
        total += (end - start) / 2 * float(_RADIAL_WEIGHTS @ values @ _ANGLE_W)
    return total


def _sign_probabilities(c: float) -> tuple[float, float]:
    """(P(u1 > 0, u2 > 0), P(u1 > 0, u2 < 0)) for standard normals of correlation c."""
    same = 0.25 + math.asin(c) / (2 * math.pi)
    return same, 0.5 - same


def second_moment(act: Activation, q: float) -> float:
    """E[phi(sqrt(q) z)^2]."""
    if act.linear_slopes:
        p, m = act.linear_slopes
        return q * (p * p + m * m) / 2
    return gaussian_mean(act, q, lambda b, u: b.value(u) ** 2)


def slope_moment(act: Activation, q: float) -> float:
    """E[phi'(sqrt(q) z)^2]."""
    if act.linear_slopes:
        p, m = act.linear_slopes
        return (p * p + m * m) / 2
    return gaussian_mean(act, q, lambda b, u: b.first(u) ** 2)


def length_slope_moment(act: Activation, q: float) -> float:
    """d/dq E[phi(sqrt(q) z)^2] = E[phi'^2 + phi phi''] (Gaussian integration by parts)."""
    if act.linear_slopes:
        return slope_moment(act, q)
    return gaussian_mean(act, q, lambda b, u: b.first(u) ** 2 + b.value(u) * b.second(u))


def pair_moment(act: Activation, q: float, c: float) -> float:
    """E[phi(u1) phi(u2)]."""
    if act.linear_slopes:
        p, m = act.linear_slopes
        # phi(u) = a u + b |u|; E[u1 |u2|] = 0, E|u1| |u2| = q (2 / pi) (sqrt(1 - c^2) + c asin c)
        a, b = (p + m) / 2, (p - m) / 2
        return q * (a * a * c + b * b * 2 / math.pi * (math.sqrt(max(1 - c * c, 0.0)) + c * math.asin(c)))
    return pair_mean(act, q, c, lambda b1, u1, b2, u2: b1.value(u1) * b2.value(u2))


def pair_slope_moment(act: Activation, q: float, c: float) -> float:
    """E[phi'(u1) phi'(u2)]."""
    if act.linear_slopes:
        p, m = act.linear_slopes
        same, opposite = _sign_probabilities(c)
        return same * (p * p + m * m) + 2 * opposite * p * m
    return pair_mean(act, q, c, lambda b1, u1, b2, u2: b1.first(u1) * b2.first(u2))


# --- fixed points and depth scales ---------------------------------------------------------------

def length_map(act: Activation, sigma_w2: float, sigma_b2: float, q: float) -> float:
    """q_l from q_(l-1): sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2."""
    return sigma_w2 * second_moment(act, q) + sigma_b2


def variance_map(act: Activation, sigma_w2: float, sigma_b2: float, q0: float, layers: int) -> np.ndarray:
    """(q_0, q_1, ..., q_layers): the predicted pre-activation variance of each layer from q_0."""
    q = [float(q0)]
    for _ in range(layers):
        q.append(length_map(act, sigma_w2, sigma_b2, q[-1]))
    return np.array(q)


def _root(function, low: float, high: float) -> float:
    return optimize.brentq(function, low, high, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


def fixed_point(act: Activation, sigma_w2: float, sigma_b2: float, q0: float = 1.0) -> float:
    """q*: where the length map's iterates from q0 > 0 settle; inf where they grow without bound.

    The length maps of the registry's activations increase with q, so the iterates move
    monotonically to the nearest root of map(q) - q in the direction the map moves q0: a bracket
    is found on a grid of factors of 2 and refined by Brent's method. q* is exactly 0 where 0 is a
    fixed point (sigma_w^2 phi(0)^2 + sigma_b^2 = 0) and the map shrinks q all the way down to
    VANISHING_Q * q0."""
    if act.linear_slopes:
        gain = sigma_w2 * slope_moment(act, q0)  # the map is gain * q + sigma_b^2
        if abs(gain - 1) <= PHASE_TOLERANCE:
            return q0 if sigma_b2 == 0 else math.inf  # every q is fixed / q grows by sigma_b^2 a layer
        return sigma_b2 / (1 - gain) if gain < 1 else math.inf

    def excess(q):
        return length_map(act, sigma_w2, sigma_b2, q) - q

    start = excess(q0)
    if start == 0:
        return q0
    if start > 0:  # the map grows q: the nearest root above q0, if any
        low = q0
        while low < UNBOUNDED_Q * q0:
            high = 2 * low
            if excess(high) <= 0:
                return _root(excess, low, high)
            low = high
        return math.inf
    high = q0  # the map shrinks q: the nearest root below q0
    vanishes_at_zero = length_map(act, sigma_w2, sigma_b2, 0.0) == 0  # q = 0 is a fixed point
    while True:
        low = high / 2
        if excess(low) >= 0:
            return _root(excess, low, high)
        if vanishes_at_zero and low < VANISHING_Q * q0:
            return 0.0
        high = low


def _depth_scale(slope: float) -> float:
    """-1 / log(slope): the layers over which a deviation shrinking by `slope` a layer falls by e;
    inf within PHASE_TOLERANCE of 1 (a slope of 1 that quadrature rounds to 1 - 1e-15 diverges too)."""
    if slope >= 1 - PHASE_TOLERANCE:
        return math.inf
    if slope <= 0:
        return 0.0
    return -1 / math.log(slope)


def correlation_map(act: Activation, sigma_w2: float, sigma_b2: float, q_star: float, c: float) -> float:
    """c_l from c_(l-1) at the fixed length q*: (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*."""
    return (sigma_w2 * pair_moment(act, q_star, c) + sigma_b2) / q_star


def correlation_fixed_point(act: Activation, sigma_w2: float, sigma_b2: float, q_star: float) -> float:
    """c* of the chaotic phase: the largest root of map(c) - c below 1 (c = 1 repels there),
    bracketed on a grid of 1 - c from 1e-6 to 1 by factors of 1.5. 1.0 where map(c) - c at
    c = 1 - 1e-6 is within quadrature error (1e-13) of 0: c* lies within about 1e-6 of 1, right
    beside the critical line, and xi_c is taken as inf."""
    def excess(c):
        return correlation_map(act, sigma_w2, sigma_b2, q_star, c) - c

    high = 1 - 1e-6
    if excess(high) > -1e-13:
        return 1.0
    gap = 1 - high
    while gap < 1:
        gap = min(1.5 * gap, 1.0)
        low = 1 - gap
        if excess(low) >= 0:
            return _root(excess, low, high)
        high = low
    return 0.0  # map(0) - 0 = (sigma_w^2 E[phi]^2 + sigma_b^2) / q* >= 0: 0 up to rounding


def chi_1(act: Activation, sigma_w2: float, q_star: float) -> float:
    """sigma_w^2 E[phi'(sqrt(q*) z)^2]; at q* = inf its limit, sigma_w^2 (phi'(inf)^2 + phi'(-inf)^2) / 2."""
    if math.isinf(q_star):
        return sigma_w2 * act.slope_at_infinity()
    return sigma_w2 * slope_moment(act, q_star)


@dataclasses.dataclass(frozen=True)
class MeanField:
    """The mean-field quantities of one (activation, sigma_w^2, sigma_b^2); nan where undefined."""

    activation: str
    sigma_w2: float
    sigma_b2: float
    q0: float
    q_star: float
    chi_1: float
    c_star: float
    xi_q: float
    xi_c: float
    phase: str

    @property
    def predicted_depth(self) -> float:
        """TRAINABLE_DEPTH_FACTOR * xi_c layers."""
        return TRAINABLE_DEPTH_FACTOR * self.xi_c

    def to_json(self) -> dict:
        data = {key: json_number(value) if isinstance(value, float) else value
                for key, value in dataclasses.asdict(self).items()}
        data["predicted_depth"] = json_number(self.predicted_depth)
        return data


def json_number(value: float):
    """A float for JSON: itself if finite, "inf" if infinite, None if undefined (nan)."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _check_variances(sigma_w2: float, sigma_b2: float, q0: float) -> None:
    for label, value in (("sigma_w^2", sigma_w2), ("sigma_b^2", sigma_b2)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite variance >= 0, got {value}")
    if not (math.isfinite(q0) and q0 > 0):
        raise ValueError(f"q_0 must be a finite variance > 0, got {q0}")


def mean_field(activation_name: str, sigma_w2: float, sigma_b2: float, q0: float = 1.0,
               negative_slope: float = 0.01) -> MeanField:
    """q*, chi_1, c*, xi_q, xi_c and the phase of a deep network of `activation_name` layers."""
    _check_variances(sigma_w2, sigma_b2, q0)
    act = activation(activation_name, negative_slope)
    q_star = fixed_point(act, sigma_w2, sigma_b2, q0)
    chi = chi_1(act, sigma_w2, q_star)
    point = functools.partial(MeanField, activation_name, sigma_w2, sigma_b2, q0, q_star, chi)
    if math.isinf(q_star):
        return point(c_star=math.nan, xi_q=math.nan, xi_c=math.nan, phase="exploding")
    xi_q = _depth_scale(sigma_w2 * length_slope_moment(act, q_star))
    if abs(chi - 1) <= PHASE_TOLERANCE:
        return point(c_star=1.0, xi_q=xi_q, xi_c=math.inf, phase="critical")
    if chi < 1:
        return point(c_star=1.0, xi_q=xi_q, xi_c=_depth_scale(chi), phase="ordered")
    c_star = correlation_fixed_point(act, sigma_w2, sigma_b2, q_star)
    chi_c = sigma_w2 * pair_slope_moment(act, q_star, c_star)
    return point(c_star=c_star, xi_q=xi_q, xi_c=_depth_scale(chi_c), phase="chaotic")


def critical_sigma_w2(activation_name: str, sigma_b2: float, q0: float = 1.0,
                      negative_slope: float = 0.01) -> float | None:
    """The sigma_w^2 where chi_1 = 1 at a finite q* (reached from q0) for this sigma_b^2; None where
    there is none (relu with sigma_b > 0, or gelu at sigma_b^2 = 0.1, whose q* turns infinite
    before chi_1 reaches 1). The first crossing of chi_1 = 1 on a grid of sigma_w^2 from 1e-3 to
    1e3 (factors of 1.25), refined by Brent's method."""
    _check_variances(0.0, sigma_b2, q0)
    act = activation(activation_name, negative_slope)
    if act.linear_slopes:  # chi_1 = sigma_w^2 (p^2 + m^2) / 2 everywhere; q* finite there only at sigma_b = 0
        return 1 / slope_moment(act, q0) if sigma_b2 == 0 else None

    def excess(sigma_w2):
        return chi_1(act, sigma_w2, fixed_point(act, sigma_w2, sigma_b2, q0)) - 1

    low, low_value = 1e-3, excess(1e-3)
    while low < 1e3:
        high = 1.25 * low
        high_value = excess(high)
        if (low_value < 0) != (high_value < 0):
            found = _root(excess, low, high)
            # a jump of chi_1 across 1 where q* turns infinite (a saddle-node of the length map) is no crossing
            if abs(excess(found)) <= 1e-6 and math.isfinite(fixed_point(act, found, sigma_b2, q0)):
                return found
        low, low_value = high, high_value
    return None


# --- per variant ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StagePrediction:
    """One stage of a variant: its widths, its first conv's sigma_w^2 (C_in -> C_out, outside the
    fixed-point theory) and the mean field of its same-width layers."""

    stage: int
    channels_in: int
    channels: int
    first_layer_sigma_w2: float
    mean_field: MeanField

    def to_json(self) -> dict:
        return {"stage": self.stage, "channels_in": self.channels_in, "channels": self.channels,
                "first_layer_sigma_w2": self.first_layer_sigma_w2, **self.mean_field.to_json()}


@dataclasses.dataclass(frozen=True)
class VariantPrediction:
    """The mean field of a variant per stage, or `applies` False with the reason (no stages)."""

    variant: str
    applies: bool
    reason: str | None
    stages: tuple[StagePrediction, ...] = ()

    @property
    def predicted_k(self) -> float:
        """The network depth k (k // 3 layers a stage) at which the stage of smallest xi_c holds
        6 xi_c layers: 3 * min over stages of 6 xi_c; nan where the theory does not apply or a
        stage explodes."""
        depths = [s.mean_field.predicted_depth for s in self.stages]
        if not depths or any(math.isnan(d) for d in depths):
            return math.nan
        return registry.NUM_STAGES * min(depths)

    def to_json(self) -> dict:
        return {"variant": self.variant, "applies": self.applies, "reason": self.reason,
                "predicted_k": json_number(self.predicted_k), "stages": [s.to_json() for s in self.stages]}


def conv_sigma_w2(spec: registry.Variant, channels_in: int, channels_out: int) -> float:
    """sigma_w^2 = fan_in * Var(w) of a conv of `spec` (fan_in = 9 C_in), per output channel.

    Gaussian inits: 9 C_in s^2, s = registry.conv_init_std. flaxdepth's orthogonal kernel is gain
    times a (9 C_in x C_out) matrix with orthonormal columns (each output's 9 C_in weights have
    squared norm gain^2) when C_out <= 9 C_in; delta_orthogonal's centre tap is gain times a
    C_in x C_out matrix M with M M^T = I, whose columns have squared norm C_in / C_out on average.
    Either way a same-width layer has sigma_w^2 = gain^2."""
    gain2 = spec.init_gain**2
    if spec.init == "orthogonal":
        return gain2 * min(1.0, 9 * channels_in / channels_out)
    if spec.init == "delta_orthogonal":
        return gain2 * channels_in / channels_out
    return 9 * channels_in * registry.conv_init_std(spec, channels_in, channels_out) ** 2


def outside_theory(spec: registry.Variant) -> str | None:
    """Why the mean-field theory of plain layers does not describe `spec`; None where it does."""
    reasons = []
    if spec.norm != "none":
        reasons.append(f"{spec.norm} normalization after every conv")
    if spec.residual != "none":
        reasons.append(f"{spec.residual} residual connections")
    return " and ".join(reasons) or None


def predict_variant(variant: str | registry.Variant, q0: float = 1.0) -> VariantPrediction:
    """The mean field of a registered variant (name or spec) per stage, from its activation, init
    and bias: sigma_w^2 of the stage's same-width layers (conv_sigma_w2), sigma_b^2 = bias_std^2."""
    spec = registry.resolve(variant)
    reason = outside_theory(spec)
    if reason:
        return VariantPrediction(spec.name, False, reason)
    stages = []
    for stage in range(registry.NUM_STAGES):
        channels_in, channels = registry.stage_channels(stage, spec.channels)
        field = mean_field(spec.activation, conv_sigma_w2(spec, channels, channels), spec.bias_std**2, q0,
                           spec.negative_slope)
        stages.append(StagePrediction(stage, channels_in, channels, conv_sigma_w2(spec, channels_in, channels),
                                      field))
    return VariantPrediction(spec.name, True, None, tuple(stages))


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.HelpFormatter)
    p.add_argument("--activation", help=f"one of: {', '.join(registry.ACTIVATIONS)}")
    p.add_argument("--sigma-w2", type=float, help="weight variance times fan-in, sigma_w^2 >= 0")
    p.add_argument("--sigma-b2", type=float, help="bias variance sigma_b^2 >= 0")
    p.add_argument("--negative-slope", type=float, default=0.01, help="leaky_relu's slope for x < 0")
    p.add_argument("--q0", type=float, default=1.0, help="input variance the length map starts from (default 1)")
    p.add_argument("--layers", type=int, default=0, help="also print the predicted variances q_0 .. q_LAYERS")
    p.add_argument("--variant", help="a registered variant: the mean field of each stage")
    cli.add_variants_file_argument(p)
    p.add_argument("--critical", action="store_true", help="print the sigma_w^2 where chi_1 = 1 for --activation "
                                                           "and --sigma-b2")
    p.add_argument("--json", action="store_true", help="one JSON object (infinite: \"inf\", undefined: null)")
    return p


def _format(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ("undefined" if math.isnan(value) else "inf")


def _print_point(field: MeanField, variances: np.ndarray | None) -> None:
    print(f"{field.activation}, sigma_w^2 = {field.sigma_w2:g}, sigma_b^2 = {field.sigma_b2:g}, q_0 = {field.q0:g}")
    for label, value in (("q*", field.q_star), ("chi_1", field.chi_1), ("c*", field.c_star), ("xi_q", field.xi_q),
                         ("xi_c", field.xi_c), ("6 xi_c", field.predicted_depth)):
        print(f"  {label:<8} {_format(value)}")
    print(f"  {'phase':<8} {field.phase}")
    if variances is not None:
        print("  q_l      " + " ".join(_format(q) for q in variances))


def _print_variant(prediction: VariantPrediction) -> None:
    if not prediction.applies:
        print(f"{prediction.variant}: the mean-field theory of plain conv -> activation layers does not apply: "
              f"{prediction.reason}")
        return
    print(f"{prediction.variant}: mean field of each stage's same-width layers; predicted trainable "
          f"k = 3 * min over stages of 6 xi_c = {_format(prediction.predicted_k)}")
    print(f"{'stage':<6} {'C_in->C':<8} {'sigma_w^2':>10} {'sigma_b^2':>10} {'q*':>10} {'chi_1':>10} "
          f"{'xi_c':>10} {'6 xi_c':>10}  phase")
    for s in prediction.stages:
        f = s.mean_field
        print(f"{s.stage:<6} {f'{s.channels_in}->{s.channels}':<8} {f.sigma_w2:>10.4g} {f.sigma_b2:>10.4g} "
              f"{_format(f.q_star):>10} {_format(f.chi_1):>10} {_format(f.xi_c):>10} "
              f"{_format(f.predicted_depth):>10}  {f.phase}")


def _check_arguments(args) -> None:
    """A ConfigError saying what is wrong with the command line and how to fix it."""
    point = [flag for flag, value in (("--activation", args.activation), ("--sigma-w2", args.sigma_w2),
                                      ("--sigma-b2", args.sigma_b2), ("--critical", args.critical or None),
                                      ("--layers", args.layers or None))
             if value is not None]
    if args.variant:
        if point:
            raise ConfigError(f"--variant takes its activation and variances from the variant; drop {', '.join(point)}")
        return
    if args.activation is None or args.sigma_b2 is None or (args.sigma_w2 is None and not args.critical):
        raise ConfigError("give --activation NAME --sigma-w2 X --sigma-b2 Y, or --critical --activation NAME "
                          "--sigma-b2 Y, or --variant NAME")
    if args.activation not in registry.ACTIVATIONS:
        raise ConfigError(f"unknown activation {args.activation!r}; choose one of: {', '.join(registry.ACTIVATIONS)}")
    for flag, value in (("--sigma-w2", args.sigma_w2), ("--sigma-b2", args.sigma_b2)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} is a variance: give a finite number >= 0, not {value}")
    if not (math.isfinite(args.q0) and args.q0 > 0):
        raise ConfigError(f"--q0 is the input variance: give a finite number > 0, not {args.q0}")
    if args.layers < 0:
        raise ConfigError(f"--layers must be >= 0, got {args.layers}")


def _run(args) -> int:
    if args.variant:
        prediction = predict_variant(args.variant, args.q0)
        if args.json:
            print(json.dumps(prediction.to_json()))
        else:
            _print_variant(prediction)
        return 0
    if args.critical:
        found = critical_sigma_w2(args.activation, args.sigma_b2, args.q0, args.negative_slope)
        if args.json:
            print(json.dumps({"activation": args.activation, "sigma_b2": args.sigma_b2, "critical_sigma_w2": found}))
        elif found is None:
            print(f"{args.activation} at sigma_b^2 = {args.sigma_b2:g}: no sigma_w^2 with chi_1 = 1 at a finite q*")
        else:
            print(f"{args.activation} at sigma_b^2 = {args.sigma_b2:g}: critical sigma_w^2 = {found:.6f}")
        return 0
    field = mean_field(args.activation, args.sigma_w2, args.sigma_b2, args.q0, args.negative_slope)
    variances = (variance_map(activation(args.activation, args.negative_slope), args.sigma_w2, args.sigma_b2,
                              args.q0, args.layers) if args.layers else None)
    if args.json:
        data = field.to_json()
        if variances is not None:
            data["variances"] = [json_number(float(q)) for q in variances]
        print(json.dumps(data))
    else:
        _print_point(field, variances)
    return 0


@cli.command(PROG)
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_arguments(args)
    cli.load_variants_files(args.variants_file)
    if args.variant:
        registry.get_variant(args.variant)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
