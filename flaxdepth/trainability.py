"""Trainability as a probability: a psychometric curve of depth, fitted as a posterior on a grid.

The model (a decreasing psychometric function of log depth, x = log2 k):

    P(k) = guess + (1 - guess - lapse) * sigmoid(-(log2 k - mu) / s)

`lapse`: shallow networks that fail anyway (a diverged run); `guess`: deep ones that train by luck.
The target is k50, the depth where P(k) = 0.5 (what a researcher asks; with guess and lapse it is
not the sigmoid's midpoint mu unless guess = lapse). The grid is laid on x50 = log2 k50 itself,
mu = x50 + s * logit((0.5 - guess) / (1 - guess - lapse)), so k50's marginal is a sum over the grid.

Overdispersion (psignifit 4's beta-binomial, per depth): the runs at one depth share one success
probability drawn from a Beta with mean P(k) and concentration nu = 1 / eta^2 - 1 (eta = 0: binomial;
the variance of a depth's fraction of n runs grows by 1 + (n - 1) eta^2). Chosen because the data
show depth-to-depth oddities (0/3 at k=48, 3/3 at k=51 in one sweep) that a binomial model reads as
a certain, sharp curve; with eta a depth's runs count for less than independent runs, intervals
widen where depths disagree, and next_depth prefers a new depth to more seeds at a tried one.

Priors (a grid posterior, psignifit 4's method, never maximum likelihood: 0/3 next to 3/3
separates and sends the ML slope to infinity; here the width prior bounds it):
  - log2 k50 uniform over [log2 min depth - 0.5, log2 max depth + 0.5] of the tested depths, or of
    `depth_range` (a sequential design passes its candidates' range, so the prior stays put);
  - s (the sigmoid's scale in log2 depth; 10%-90% width 4.39 s) log-uniform on [0.02, 2];
  - lapse and guess each Beta(1, 10), truncated to [0, 0.2];
  - eta Beta(1, 4) truncated to [0, 0.7].

The grid: lapse and guess get 5 cells of equal prior mass each (nodes at the cells' medians,
crowded near 0 as the prior is), eta 4 equal-width cells carrying their prior masses (so a node
reaches strong overdispersion, nu ~ 1.7); log2 k50 and log s get a coarse pass over the whole prior
(48 x 12 nodes), then a fine grid (48 x 16) over the box that holds all but 1e-5 of the coarse
posterior: 76,800 points. Deterministic; a fit and a choice of the next depth take well under a
second (next_depth's time grows as (runs + 1)^2; benchmarks/BENCHMARKS.md).

k50's interval is equal-tailed; where an end lies outside the tested depths the data do not bound
it there (Fit.k50_beyond_tested), and when every run trained, or none did, the data bound k50 on
one side only (Fit.censored): the command line then prints the bound, not the prior's numbers.

next_depth is Psi-marginal (Prins 2013): the candidate whose next batch of runs has the largest
expected information gain (mutual information, nats) about log2 k50 alone; s, lapse, guess and
eta are nuisance parameters summed out, so no runs are spent to learn them for their own sake.

Imports numpy and scipy and flaxdepth's light modules only (no JAX, no PyTorch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
from numpy.polynomial import polynomial
from scipy import special

from flaxdepth import cli
from flaxdepth.config import ConfigError
from flaxdepth.results import final_error, parse_lines

PROG = "python -m flaxdepth.trainability"
MODEL = "P(k) = guess + (1 - guess - lapse) * sigmoid(-(log2 k - mu) / s), beta-binomial per depth (eta)"
K50_DEFINITION = "k50: the depth where P(k) = 0.5 (posterior median; interval: equal-tailed credible)"

#: log2 units the k50 prior extends beyond the tested (or candidate) depths on each side.
X50_MARGIN = 0.5
#: The sigmoid's scale s in log2 depth: log-uniform between these.
S_RANGE = (0.02, 2.0)
#: Beta(a, b) priors truncated to [0, bound], and the number of equal cells each gets.
LAPSE_PRIOR = (1.0, 10.0, 0.2, 5)
GUESS_PRIOR = (1.0, 10.0, 0.2, 5)
ETA_PRIOR = (1.0, 4.0, 0.7, 4)
#: Grid sizes (log2 k50, log s): the coarse pass over the whole prior, then the fine grid.
COARSE = (48, 12)
FINE = (48, 16)
#: Posterior mass the fine grid may leave outside its box (split over the two tails of each axis).
BOX_TAIL = 1e-5


def _equal_mass_cells(a: float, b: float, bound: float, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Beta(a, b) truncated to [0, bound] cut into cells of equal prior mass: each cell's median as
    its node (so the nodes crowd where the prior does, near 0), and the masses."""
    top = special.betainc(a, b, bound)  # Beta(a, b)'s cdf: scipy.special, lighter to import than scipy.stats
    nodes = special.betaincinv(a, b, (np.arange(cells) + 0.5) / cells * top)
    return nodes, np.full(cells, 1.0 / cells)


def _equal_width_cells(a: float, b: float, bound: float, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Beta(a, b) truncated to [0, bound] cut into equal cells: midpoints and prior masses (the
    nodes reach the strong overdispersion an equal-mass cut would leave to its last cell)."""
    edges = np.linspace(0.0, bound, cells + 1)
    mass = np.diff(special.betainc(a, b, edges))
    return (edges[:-1] + edges[1:]) / 2, mass / mass.sum()


LAPSES, LAPSE_MASS = _equal_mass_cells(*LAPSE_PRIOR)
GUESSES, GUESS_MASS = _equal_mass_cells(*GUESS_PRIOR)
ETAS, ETA_MASS = _equal_width_cells(*ETA_PRIOR)
#: Beta concentration of each eta node.
NUS = 1.0 / ETAS**2 - 1.0


def priors() -> dict:
    """The priors, as data (Fit.to_json carries them)."""
    def beta(prior, nodes, masses):
        a, b, bound, cells = prior
        return {"distribution": f"Beta({a:g}, {b:g}) truncated to [0, {bound:g}]", "cells": cells,
                "nodes": [round(float(v), 5) for v in nodes], "masses": [round(float(v), 5) for v in masses]}
    return {
        "log2_k50": f"uniform over [log2 min depth - {X50_MARGIN:g}, log2 max depth + {X50_MARGIN:g}]",
        "s": f"log-uniform on [{S_RANGE[0]:g}, {S_RANGE[1]:g}] (sigmoid scale in log2 depth)",
        "lapse": beta(LAPSE_PRIOR, LAPSES, LAPSE_MASS), "guess": beta(GUESS_PRIOR, GUESSES, GUESS_MASS),
        "eta": dict(beta(ETA_PRIOR, ETAS, ETA_MASS), meaning="beta-binomial overdispersion per depth, nu = 1/eta^2 - 1"),
    }


def curve(depth, k50: float, s: float, lapse: float = 0.0, guess: float = 0.0) -> np.ndarray:
    """P(k) of the model with k50 (where P = 0.5) in place of mu; depth scalar or array."""
    q50 = (0.5 - guess) / (1.0 - guess - lapse)
    return guess + (1.0 - guess - lapse) * special.expit(special.logit(q50) - (np.log2(depth) - np.log2(k50)) / s)


def mu_of(k50: float, s: float, lapse: float = 0.0, guess: float = 0.0) -> float:
    """The sigmoid's midpoint mu (log2 depth) of a curve given by its k50."""
    return math.log2(k50) + s * float(special.logit((0.5 - guess) / (1.0 - guess - lapse)))


# --- per-depth fractions -----------------------------------------------------------------------

def jeffreys_interval(trained, runs, level: float = 0.95) -> tuple:
    """Equal-tailed Jeffreys interval of a fraction: quantiles of Beta(t + 1/2, n - t + 1/2), with
    the lower end 0 at t = 0 and the upper end 1 at t = n (Brown, Cai & DasGupta 2001); (0, 1) at
    n = 0. Scalars give floats, arrays arrays."""
    t, n = np.asarray(trained, dtype=float), np.asarray(runs, dtype=float)
    alpha = 1.0 - level
    with np.errstate(invalid="ignore"):
        lo = np.where(t <= 0, 0.0, special.betaincinv(t + 0.5, n - t + 0.5, alpha / 2))
        hi = np.where(t >= n, 1.0, special.betaincinv(t + 0.5, n - t + 0.5, 1 - alpha / 2))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def counts(rows: Iterable[dict], threshold: float = 0.2,
           error: Callable[[dict], float] = final_error) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(depths, trained, runs, diverged) per depth, sorted by depth, of results rows: a run trained
    when it stayed finite and `error(row)` (the criterion; the project's: min of the last train and
    test errors) is under `threshold`. A diverged run (not finite) counts as a run that did not train."""
    tally: dict[int, list[int]] = {}
    for row in rows:
        finite = bool(row["finite"])
        entry = tally.setdefault(int(row["depth"]), [0, 0, 0])
        entry[0] += finite and error(row) < threshold
        entry[1] += 1
        entry[2] += not finite
    depths = np.array(sorted(tally), dtype=int)
    table = np.array([tally[d] for d in depths], dtype=int).reshape(-1, 3)
    return depths, table[:, 0], table[:, 1], table[:, 2]


# --- the grid posterior ------------------------------------------------------------------------

def _log_rising(base: np.ndarray, count: int) -> np.ndarray:
    """sum_{i < count} log(base + i) (the log of a rising factorial), by products of 16 factors."""
    total = np.zeros(np.shape(base))
    for start in range(0, count, 16):
        product = np.ones(np.shape(base))
        for i in range(start, min(count, start + 16)):
            product = product * (base + i)
        total += np.log(product)
    return total


def _psi(log2_depths: np.ndarray, x50, s, lapse, guess) -> np.ndarray:
    """P at each depth (last axis) for broadcast parameter arrays."""
    q50 = (0.5 - guess) / (1.0 - guess - lapse)
    z = special.logit(q50)[..., None] - (log2_depths - x50[..., None]) / s[..., None]
    return guess[..., None] + (1.0 - guess - lapse)[..., None] * special.expit(z)


def _axes(x50: np.ndarray, s: np.ndarray):
    """The five parameter axes, broadcast to (x50, s, lapse, guess) (eta is handled apart)."""
    return (x50[:, None, None, None], s[None, :, None, None],
            LAPSES[None, None, :, None], GUESSES[None, None, None, :])


def _log_posterior(x50: np.ndarray, s: np.ndarray, log2_depths, trained, runs) -> np.ndarray:
    """Unnormalized log posterior on the grid (x50, s, lapse, guess, eta); the prior of x50 and of
    log s is uniform over their (uniformly spaced) nodes, so only the nuisance masses enter."""
    psi = _psi(log2_depths, *_axes(x50, s))  # (X, S, L, G, D)
    loglik = np.zeros(psi.shape[:-1] + (len(NUS),))
    for d, (t, n) in enumerate(zip(trained, runs)):
        a = psi[..., d, None] * NUS  # beta-binomial: Beta(P nu, (1 - P) nu) per depth
        loglik += _log_rising(a, int(t)) + _log_rising(NUS - a, int(n - t))
    loglik -= sum(_log_rising(NUS, int(n)) for n in runs)
    log_prior = (np.log(LAPSE_MASS)[:, None, None] + np.log(GUESS_MASS)[None, :, None]
                 + np.log(ETA_MASS)[None, None, :])
    return loglik + log_prior


def _normalized(log_post: np.ndarray) -> np.ndarray:
    w = np.exp(log_post - log_post.max())
    return w / w.sum()


def _box(nodes: np.ndarray, marginal: np.ndarray, tail: float) -> tuple[float, float]:
    """The span of nodes holding all but `tail` of the mass on each side, one node wider each way."""
    cdf = np.cumsum(marginal)
    first = max(int(np.searchsorted(cdf, tail)) - 1, 0)
    last = min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, len(nodes) - 1)
    return float(nodes[first]), float(nodes[last])


def _cell_quantiles(nodes: np.ndarray, mass: np.ndarray, qs) -> np.ndarray:
    """Quantiles of a marginal on uniform nodes, each node's mass spread evenly over its cell."""
    h = nodes[1] - nodes[0] if len(nodes) > 1 else 1.0
    edges = np.concatenate([[nodes[0] - h / 2], nodes + h / 2])
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    return np.interp(qs, cdf, edges)


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    """Quantiles of weighted samples (1-d; midpoint rule on the sorted cumulative weights)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    return np.interp(qs, (cum - w / 2) / cum[-1], v)


class Band(NamedTuple):
    """A posterior median with its equal-tailed credible band."""
    median: float | np.ndarray
    lo: float | np.ndarray
    hi: float | np.ndarray


class DepthAt(NamedTuple):
    """The depth where P(k) = p: posterior median and interval given that the curve reaches p, and
    the posterior probability that it does (p outside [guess, 1 - lapse] is never reached)."""
    depth: float
    interval: tuple[float, float]
    probability: float


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
    """The posterior of one sweep's curve on its grid; see the module docstring."""

    depths: np.ndarray  # per tested depth, sorted
    trained: np.ndarray
    runs: np.ndarray
    x50_range: tuple[float, float]  # the prior's range of log2 k50
    x50: np.ndarray  # the fine grid's nodes
    s: np.ndarray
    weights: np.ndarray  # posterior mass, shape (x50, s, lapse, guess, eta)
    level: float = 0.95

    @property
    def x50_marginal(self) -> np.ndarray:
        return self.weights.sum(axis=(1, 2, 3, 4))

    def _x50_quantiles(self, qs) -> np.ndarray:
        return _cell_quantiles(self.x50, self.x50_marginal, qs)

    @property
    def k50(self) -> float:
        """Posterior median of the depth where P = 0.5."""
        return float(2.0 ** self._x50_quantiles(0.5))

    @property
    def k50_interval(self) -> tuple[float, float]:
        """Equal-tailed credible interval of k50 at `level` (0.95)."""
        alpha = 1.0 - self.level
        lo, hi = 2.0 ** self._x50_quantiles([alpha / 2, 1 - alpha / 2])
        return float(lo), float(hi)

    @property
    def k50_beyond_tested(self) -> tuple[bool, bool]:
        """Whether the interval's (low, high) end lies below the shallowest (beyond the deepest)
        tested depth: there the data do not bound k50, the curve's extrapolation and the prior's
        range (X50_MARGIN beyond the tested or candidate depths) do."""
        lo, hi = self.k50_interval
        return bool(lo < self.depths[0]), bool(hi > self.depths[-1])

    @property
    def censored(self) -> str | None:
        """"above" when every run trained, "below" when none did: the data then bound k50 on one
        side only and the prior sets the rest; None otherwise."""
        if np.all(self.trained == self.runs):
            return "above"
        if np.all(self.trained == 0):
            return "below"
        return None

    def _nuisance_weights(self) -> np.ndarray:
        return self.weights.sum(axis=-1)  # P does not depend on eta

    def probability(self, k, level: float | None = None) -> Band:
        """Posterior median of P(k) and its band at `level` (default the fit's); k scalar or array."""
        level = self.level if level is None else level
        k = np.asarray(k, dtype=float)
        psi = _psi(np.log2(k).reshape(-1), *_axes(self.x50, self.s))
        psi = psi.reshape(-1, psi.shape[-1])  # (grid points, depths)
        w = self._nuisance_weights().reshape(-1)
        qs = [(1 - level) / 2, 0.5, (1 + level) / 2]
        lo, median, hi = np.array([_weighted_quantiles(column, w, qs) for column in psi.T]).T
        if k.ndim == 0:
            return Band(float(median[0]), float(lo[0]), float(hi[0]))
        return Band(median.reshape(k.shape), lo.reshape(k.shape), hi.reshape(k.shape))

    def k_at(self, p: float, level: float | None = None) -> DepthAt:
        """The depth where P(k) = p (e.g. 0.9: the deepest depth that still trains 9 runs in 10)."""
        if not 0.0 < p < 1.0:
            raise ConfigError(f"p must lie strictly between 0 and 1, got {p}")
        level = self.level if level is None else level
        x50, s, lapse, guess = _axes(self.x50, self.s)
        q50 = (0.5 - guess) / (1.0 - guess - lapse)
        qp = (p - guess) / (1.0 - guess - lapse)
        reached = (qp > 0) & (qp < 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            xp = x50 + s * (special.logit(q50) - special.logit(np.clip(qp, 1e-12, 1 - 1e-12)))
        w = self._nuisance_weights()
        xp, reached = np.broadcast_to(xp, w.shape), np.broadcast_to(reached, w.shape)
        probability = float(w[reached].sum())
        if probability <= 1e-12:
            return DepthAt(math.nan, (math.nan, math.nan), 0.0)
        lo, median, hi = 2.0 ** _weighted_quantiles(xp[reached], w[reached], [(1 - level) / 2, 0.5, (1 + level) / 2])
        return DepthAt(float(median), (float(lo), float(hi)), probability)

    def parameters(self) -> dict:
        """Posterior medians of the nuisance parameters (s in log2 depth)."""
        def median(nodes, axis):
            marginal = self.weights.sum(axis=tuple(a for a in range(5) if a != axis))
            return float(nodes[np.searchsorted(np.cumsum(marginal), 0.5)])
        return {"s": median(self.s, 1), "lapse": median(LAPSES, 2), "guess": median(GUESSES, 3),
                "eta": median(ETAS, 4)}

    def to_json(self, points: int = 48) -> dict:
        """The fit as JSON-able data: data, model, priors, k50 and its interval, the depth where
        P = 0.9, and the curve (median and band) on `points` depths over the prior's range."""
        k = np.unique(np.round(2.0 ** np.linspace(*self.x50_range, points), 3))
        band = self.probability(k)
        k90 = self.k_at(0.9)
        finite = (lambda v: None if not math.isfinite(v) else v)
        return {
            "model": MODEL, "definition": K50_DEFINITION, "priors": priors(), "level": self.level,
            "grid": {"coarse": list(COARSE), "fine": list(FINE), "lapse": len(LAPSES), "guess": len(GUESSES),
                     "eta": len(ETAS)},
            "data": [{"depth": int(d), "trained": int(t), "runs": int(n)}
                     for d, t, n in zip(self.depths, self.trained, self.runs)],
            "k50": self.k50, "k50_interval": list(self.k50_interval),
            "k50_beyond_tested": list(self.k50_beyond_tested), "censored": self.censored,
            "k90": {"depth": finite(k90.depth), "interval": [finite(v) for v in k90.interval],
                    "probability_reached": k90.probability},
            "parameters": self.parameters(),
            "curve": {"depth": k.tolist(), "median": band.median.tolist(), "lo": band.lo.tolist(),
                      "hi": band.hi.tolist()},
        }


def _check_counts(depths, trained, runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated per-depth arrays, repeated depths merged, sorted by depth."""
    d, t, n = (np.atleast_1d(np.asarray(a)) for a in (depths, trained, runs))
    if not (d.ndim == t.ndim == n.ndim == 1 and len(d) == len(t) == len(n)):
        raise ConfigError("depths, trained and runs must be 1-d arrays of one length")
    if len(d) == 0:
        raise ConfigError("no runs to fit")
    for name, a in (("depths", d), ("trained", t), ("runs", n)):
        if not np.all(np.isfinite(a.astype(float))) or np.any(a != np.round(a)):
            raise ConfigError(f"{name} must be whole numbers, got {a.tolist()}")
    if np.any(d < 1):
        raise ConfigError(f"depths must be at least 1, got {d.tolist()}")
    if np.any(t < 0) or np.any(t > n):
        raise ConfigError(f"each depth needs 0 <= trained <= runs, got trained {t.tolist()} of runs {n.tolist()}")
    unique, index = np.unique(d.astype(int), return_inverse=True)
    merged_t, merged_n = np.zeros(len(unique), int), np.zeros(len(unique), int)
    np.add.at(merged_t, index, t.astype(int))
    np.add.at(merged_n, index, n.astype(int))
    keep = merged_n > 0
    if not keep.any():
        raise ConfigError("no runs to fit")
    return unique[keep], merged_t[keep], merged_n[keep]


def fit(depths, trained, runs, depth_range: tuple[float, float] | None = None, level: float = 0.95) -> Fit:
    """The grid posterior of the curve from per-depth counts: `trained` of `runs` runs trained at
    each depth (diverged runs count as not trained). `depth_range` (min, max): the depths the k50
    prior spans (plus X50_MARGIN in log2 each side), widened to the tested depths; default the
    tested depths'."""
    d, t, n = _check_counts(depths, trained, runs)
    lo_depth, hi_depth = (d.min(), d.max()) if depth_range is None else depth_range
    if not 0 < lo_depth <= hi_depth:
        raise ConfigError(f"depth_range must be 0 < min <= max, got {depth_range}")
    lo_depth, hi_depth = min(lo_depth, d.min()), max(hi_depth, d.max())  # the prior covers every tested depth
    x_range = (math.log2(lo_depth) - X50_MARGIN, math.log2(hi_depth) + X50_MARGIN)
    x = np.log2(d.astype(float))

    # coarse pass over the whole prior, to find where the posterior lives
    cx = np.linspace(*x_range, COARSE[0])
    cs = np.geomspace(*S_RANGE, COARSE[1])
    coarse = _normalized(_log_posterior(cx, cs, x, t, n))
    x_lo, x_hi = _box(cx, coarse.sum(axis=(1, 2, 3, 4)), BOX_TAIL / 2)
    s_lo, s_hi = _box(cs, coarse.sum(axis=(0, 2, 3, 4)), BOX_TAIL / 2)
    # the fine grid's cells must stay inside the prior: nodes half a cell in from the box's ends
    fx = _cell_centres(max(x_lo, x_range[0]), min(x_hi, x_range[1]), FINE[0])
    fs = 2.0 ** _cell_centres(math.log2(max(s_lo, S_RANGE[0])), math.log2(min(s_hi, S_RANGE[1])), FINE[1])
    weights = _normalized(_log_posterior(fx, fs, x, t, n))
    return Fit(d, t, n, x_range, fx, fs, weights, level)


def _cell_centres(lo: float, hi: float, cells: int) -> np.ndarray:
    edges = np.linspace(lo, hi, cells + 1)
    return (edges[:-1] + edges[1:]) / 2


# --- where to run next -------------------------------------------------------------------------

def _predictive_coefficients(runs: int, t0: int, n0: int) -> np.ndarray:
    """c[e, t, m]: P(t of `runs` new runs train | psi, nu_e, t0 of n0 trained there already)
    = sum_m c[e, t, m] psi^m. The beta-binomial's conditional predictive is a polynomial in psi of
    degree `runs`: C(r, t) prod_{i<t} (psi nu + t0 + i) prod_{j<r-t} ((1 - psi) nu + n0 - t0 + j)
    over the constant prod_{m<r} (nu + n0 + m)."""
    c = np.zeros((len(NUS), runs + 1, runs + 1))
    for e, nu in enumerate(NUS):
        denominator = np.prod(nu + n0 + np.arange(runs))
        for t in range(runs + 1):
            poly = np.array([1.0])
            for i in range(t):
                poly = polynomial.polymul(poly, [t0 + i, nu])
            for j in range(runs - t):
                poly = polynomial.polymul(poly, [nu + n0 - t0 + j, -nu])
            c[e, t] = math.comb(runs, t) * poly / denominator
    return c


#: Above this many runs per batch the predictive's polynomial loses digits to cancellation.
MAX_BATCH_RUNS = 12


def information_gain(fit: Fit, candidates: Sequence[int], runs: int) -> np.ndarray:
    """Expected information (nats) that `runs` more runs at each candidate depth give about log2 k50
    (its marginal on the fit's grid; the other parameters summed out): Psi-marginal's criterion.
    Runs at a depth already tried share its beta-binomial draw with the runs there."""
    candidates = np.asarray(candidates)
    if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or not 1 <= runs <= MAX_BATCH_RUNS:
        raise ConfigError(f"runs (a batch at one depth) must be a whole number from 1 to {MAX_BATCH_RUNS}, got {runs}")
    if candidates.ndim != 1 or len(candidates) == 0 or np.any(candidates < 1):
        raise ConfigError(f"candidates must be depths >= 1, got {np.asarray(candidates).tolist()}")
    w = fit.weights
    # the points that carry the posterior (all but 1e-6 of it), in grid order, so sorted by x50
    flat = w.reshape(-1, w.shape[-1])
    point_mass = flat.sum(axis=1)
    order = np.argsort(point_mass)
    keep = np.ones(len(point_mass), bool)
    keep[order[np.cumsum(point_mass[order]) <= 1e-6]] = False
    index = np.nonzero(keep)[0]
    xi, si, li, gi = np.unravel_index(index, w.shape[:4])
    weights = flat[index]  # (P, eta)
    x50, s, lapse, guess = fit.x50[xi], fit.s[si], LAPSES[li], GUESSES[gi]
    lq50 = special.logit((0.5 - guess) / (1.0 - guess - lapse))
    starts = np.concatenate([[0], np.nonzero(np.diff(xi))[0] + 1])  # each x50 node's first point
    x_mass = np.add.reduceat(weights.sum(axis=1), starts)
    h_x = -float(special.xlogy(x_mass, x_mass).sum())

    tried = dict(zip(fit.depths.tolist(), zip(fit.trained.tolist(), fit.runs.tolist())))
    # the predictive, eta summed out, as a polynomial in psi per point: W[t, m, point]
    by_history: dict[tuple[int, int], np.ndarray] = {}
    for k in candidates.tolist():
        history = tried.get(int(k), (0, 0))
        if history not in by_history:
            by_history[history] = np.einsum("pe,etm->tmp", weights, _predictive_coefficients(runs, *history))
    gains = np.empty(len(candidates))
    for history, coefficients in by_history.items():
        chosen = np.nonzero([tried.get(int(k), (0, 0)) == history for k in candidates.tolist()])[0]
        for first in range(0, len(chosen), 16):
            at = chosen[first:first + 16]
            ks = candidates[at].astype(float)
            psi = guess + (1.0 - guess - lapse) * special.expit(lq50 - (np.log2(ks)[:, None] - x50) / s)  # (C, P)
            joint = np.zeros((runs + 1,) + psi.shape)  # (T, C, P)
            power = np.ones_like(psi)
            for m in range(runs + 1):
                joint += power * coefficients[:, m, None, :]
                power = power * psi
            joint_x = np.maximum(np.add.reduceat(joint, starts, axis=-1), 0.0)  # (T, C, X)
            p_t = joint_x.sum(axis=-1)  # (T, C)
            # I(T; X) = H(X) + H(T) - H(T, X)
            h_joint = -special.xlogy(joint_x, joint_x).sum(axis=(0, 2))
            h_t = -special.xlogy(p_t, p_t).sum(axis=0)
            gains[at] = np.maximum(h_x + h_t - h_joint, 0.0)
    return gains


def run_costs(candidates: Sequence[int], cost=None) -> np.ndarray:
    """The cost of one run at each candidate: 1 (cost None), its depth ("depth"), a callable's
    value per depth, or a sequence of costs, one per candidate."""
    k = np.asarray(candidates, dtype=float)
    if cost is None:
        costs = np.ones_like(k)
    elif isinstance(cost, str):
        if cost != "depth":
            raise ConfigError(f"cost must be None, 'depth', a function of depth or one cost per candidate, got {cost!r}")
        costs = k
    elif callable(cost):
        costs = np.array([float(cost(int(d))) for d in k])
    else:
        costs = np.asarray(cost, dtype=float)
        if costs.shape != k.shape:
            raise ConfigError(f"give one cost per candidate: {len(k)} candidates, {costs.size} costs")
    if np.any(~np.isfinite(costs)) or np.any(costs <= 0):
        raise ConfigError("costs must be finite and positive")
    return costs


def next_depth(fit: Fit, candidates: Sequence[int], runs: int, cost=None) -> int:
    """The candidate depth where `runs` more runs are expected to tell most about k50 (expected
    information gain, Psi-marginal), per unit of cost when `cost` is given ("depth": a run costs
    its depth; see run_costs). Ties go to the first candidate."""
    gains = information_gain(fit, candidates, runs) / run_costs(candidates, cost)
    return int(np.asarray(candidates)[int(np.argmax(gains))])


# --- command line ------------------------------------------------------------------------------

#: A fit per results file and per these row fields. Per file as well: a file is one configuration
#: (its name says the epochs, batch size, data and precision), and two files may hold reruns of the
#: same seeds, which pooled would count twice.
GROUP_FIELDS = ("variant", "protocol", "framework", "lr", "device")


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description="Refit results rows, without training: per results file and "
                   f"({', '.join(GROUP_FIELDS)}), the runs, trained and diverged per depth, the fraction with "
                   "its Jeffreys interval, the fitted P(k) with its band, k50 and the depth where P = 0.9 "
                   "(the model and priors: pydoc flaxdepth.trainability).")
    p.add_argument("results", metavar="RESULTS", help="a results file (.jsonl) or a folder of them (searched "
                                                      "recursively)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="a run trained when finite with min(last train error, last test error) below this")
    p.add_argument("--json", action="store_true", help="one JSON object per line, one per fit")
    return p


def _results_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise ConfigError(f"no results files (*.jsonl) under {path}")
        return files
    if path.is_file():
        return [path]
    raise ConfigError(f"no results file or folder at {path}")


def groups(files: Sequence[Path], warn: Callable[[str], None]) -> list[tuple[Path, tuple, list[dict]]]:
    """(file, key, rows) per results file and GROUP_FIELDS key, in file and key order."""
    found = []
    for file in files:
        try:
            rows, damaged = parse_lines(file)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {file}: {error}")
        if damaged:
            warn(f"{file}: skipped {len(damaged)} line(s) that are not intact runs "
                 f"(line {', '.join(str(number) for number, _ in damaged)})")
        by_key: dict[tuple, list[dict]] = {}
        for row in rows:
            by_key.setdefault(tuple(row.get(field) for field in GROUP_FIELDS), []).append(row)
        found += [(file, key, by_key[key]) for key in sorted(by_key, key=str)]
    return found


def _describe(key: tuple) -> str:
    variant, protocol, framework, lr, device = key
    lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
    return f"{variant}, {protocol}, {framework}, lr {lr}, {device}"


def _format_k(value: float, depths=None) -> str:
    """A depth to two or three digits; with `depths`, "<3" or ">96" outside the tested ones."""
    if depths is not None and value < depths[0]:
        return f"<{depths[0]}"
    if depths is not None and value > depths[-1]:
        return f">{depths[-1]}"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def fit_lines(table, result: Fit) -> list[str]:
    """The printed form of a fit: per depth the runs, trained, diverged, the fraction with its
    Jeffreys interval and the fitted P with its band, then k50 with its interval and the depth where
    P = 0.9 where the curve reaches it. `table` is `counts(...)`'s (depths, trained, runs, diverged)."""
    depths, trained, runs, diverged = table
    frac_lo, frac_hi = jeffreys_interval(trained, runs)
    band = result.probability(depths)
    lines = [f"  {'k':>5} {'runs':>4} {'trained':>7} {'diverged':>8}  {'fraction [95% Jeffreys]':<24}  fitted P [95%]"]
    for i, k in enumerate(depths):
        fitted = "-" if result.censored else f"{band.median[i]:.2f} [{band.lo[i]:.2f}, {band.hi[i]:.2f}]"
        fraction = f"{trained[i] / runs[i]:.2f} [{frac_lo[i]:.2f}, {frac_hi[i]:.2f}]"
        lines.append(f"  {k:>5} {runs[i]:>4} {trained[i]:>7} {diverged[i]:>8}  {fraction:<24}  {fitted}")
    if result.censored == "above":
        return lines + [f"  k50 > {depths[-1]}: every run trained (no curve to fit: the prior would set k50)"]
    if result.censored == "below":
        return lines + [f"  k50 < {depths[0]}: no run trained (no curve to fit: the prior would set k50)"]
    lo, hi = result.k50_interval
    below, above = result.k50_beyond_tested
    prior_lo, prior_hi = (_format_k(2.0 ** x) for x in result.x50_range)
    note = {(True, True): f"; both ends outside the tested depths, the prior spans {prior_lo}-{prior_hi}",
            (True, False): f"; lower end below the tested depths, the prior stops at {prior_lo}",
            (False, True): f"; upper end beyond the tested depths, the prior stops at {prior_hi}"}.get((below, above), "")
    lines.append(f"  k50 = {_format_k(result.k50)} [{_format_k(lo)}, {_format_k(hi)}] ({100 * result.level:g}%{note})")
    k90 = result.k_at(0.9)
    if k90.probability < 0.5:
        lines.append(f"  P = 0.9: the curve reaches it with probability {k90.probability:.2f} only (no depth given)")
    elif k90.interval[1] < depths[0]:
        lines.append(f"  P = 0.9 only below the shallowest tested depth, {depths[0]} "
                     f"(the curve reaches 0.9 with probability {k90.probability:.2f})")
    else:
        lines.append(f"  P = 0.9 at k = {_format_k(k90.depth, depths)} [{_format_k(k90.interval[0], depths)}, "
                     f"{_format_k(k90.interval[1], depths)}] (95%; the curve reaches 0.9 with probability "
                     f"{k90.probability:.2f})")
    return lines


def _print_fit(file: Path, key: tuple, table, result: Fit, threshold: float) -> None:
    print(f"{file}: {_describe(key)} (trained: finite and error < {threshold:g})")
    print("\n".join(fit_lines(table, result)))


@cli.command(PROG)
def main(argv=None) -> int:
    """Refit every group of committed results rows; no training."""
    args = _parser().parse_args(argv)
    if not (math.isfinite(args.threshold) and 0 < args.threshold <= 1):
        raise ConfigError(f"--threshold is an error rate: give a number in (0, 1], not {args.threshold}")
    warn = (lambda line: print(line, file=sys.stderr))
    found = groups(_results_files(Path(args.results)), warn)
    if not found:
        raise ConfigError(f"no intact runs in {args.results}")
    for number, (file, key, rows) in enumerate(found):
        try:
            table = counts(rows, args.threshold)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"{file}: a row lacks what the criterion reads ({error!r})")
        result = fit(*table[:3])
        if args.json:
            print(json.dumps({"file": str(file), **dict(zip(GROUP_FIELDS, key)), "threshold": args.threshold,
                              "diverged": table[3].tolist(), **result.to_json()}))
        else:
            if number:
                print()
            _print_fit(file, key, table, result, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
