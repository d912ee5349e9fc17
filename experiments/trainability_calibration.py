"""Calibration of flaxdepth.trainability: on simulated sweeps whose true curve is known, does the
95% credible interval of k50 hold the true k50, when the module's own next_depth picks the depths?

    python experiments/trainability_calibration.py [--sweeps-per-case 20] [--seed 0]
        [--budget 60] [--ratio 1.3] [--out experiments/notes/trainability_calibration.md]

A sweep: a first batch that brackets any boundary in the candidate range (RUNS seeds at each of
FIRST_DEPTHS, 3 to 768 by factors of 4), then batches of RUNS seeds at the depth next_depth picks,
until the interval's hi/lo ratio is at most --ratio or --budget runs are spent. The k50 prior spans
the candidates' range. Each case fixes the true curve: k50, slope s, lapse, guess and an
overdispersion eta (a depth's success probability drawn once per sweep from a Beta of mean P(k)
and concentration 1 / eta^2 - 1, as the model assumes); one case lies outside the model (a
Gumbel-shaped, asymmetric curve) and is reported apart from the contract (>= 90% coverage).

Writes the markdown (command, date, machine, coverage, interval widths, runs spent per case) and
the raw per-sweep records as JSON beside it.
"""

# no `from __future__ import annotations`: dataclasses resolves string annotations through
# sys.modules, which a script loaded from its file (tests/conftest.py's load_experiment) is not in
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from flaxdepth import trainability

HERE = Path(__file__).resolve().parent
#: Depths a sweep may choose: multiples of 3 about 2^(1/8) apart, from 3 to 768.
CANDIDATES = tuple(sorted({3 * round(3 * 2 ** (j / 8) / 3) for j in range(0, 65)} - {0}))
FIRST_DEPTHS = (3, 12, 48, 192, 768)
RUNS = 3  # seeds per batch
COVERAGE_CONTRACT = 0.90


@dataclasses.dataclass(frozen=True)
class Case:
    """A true curve: P(k) = guess + (1 - guess - lapse) F, F logistic in log2 k (or Gumbel:
    `shape` "gumbel", outside the model), P = 0.5 at k50."""
    name: str
    k50: float
    s: float
    lapse: float = 0.0
    guess: float = 0.0
    eta: float = 0.0
    cost: object = None  # next_depth's cost
    shape: str = "logistic"

    @property
    def in_model(self) -> bool:
        return self.shape == "logistic"

    def probability(self, depth) -> np.ndarray:
        if self.shape == "logistic":
            return trainability.curve(depth, self.k50, self.s, self.lapse, self.guess)
        # decreasing Gumbel: F = exp(-exp((x - m) / s)), m set so that P(k50) = 0.5
        q = (0.5 - self.guess) / (1 - self.guess - self.lapse)
        m = math.log2(self.k50) - self.s * math.log(-math.log(q))
        f = np.exp(-np.exp((np.log2(depth) - m) / self.s))
        return self.guess + (1 - self.guess - self.lapse) * f


CASES = (
    Case("sharp, shallow k50", k50=12, s=0.1),
    Case("tanh-like step", k50=50, s=0.05, lapse=0.02, guess=0.02),
    Case("moderate", k50=40, s=0.3, lapse=0.05, guess=0.05),
    Case("shallow slope, lapse 0.1", k50=100, s=0.5, lapse=0.1, guess=0.02),
    Case("guess 0.15", k50=30, s=0.3, lapse=0.02, guess=0.15),
    Case("deep k50", k50=400, s=0.2, lapse=0.02, guess=0.02),
    Case("overdispersed eta 0.3", k50=48, s=0.15, lapse=0.05, guess=0.05, eta=0.3),
    Case("overdispersed eta 0.5", k50=200, s=0.3, lapse=0.05, guess=0.1, eta=0.5),
    Case("very shallow, eta 0.2", k50=20, s=0.8, lapse=0.05, guess=0.05, eta=0.2),
    Case("cost=depth", k50=60, s=0.2, lapse=0.1, guess=0.1, eta=0.3, cost="depth"),
    Case("cost=depth, eta 0.4", k50=45, s=0.25, lapse=0.05, guess=0.05, eta=0.4, cost="depth"),
    Case("outside the model: Gumbel", k50=80, s=0.3, lapse=0.05, guess=0.05, shape="gumbel"),
)


@dataclasses.dataclass(frozen=True)
class Sweep:
    case: str
    covered: bool
    k50: float
    interval: tuple
    runs: int
    cost: float  # sum of the depths run (a run costs about its depth)
    depths: int  # distinct depths tried
    stopped: str  # "ratio" or "budget"
    seconds: float


def simulate_sweep(case: Case, rng: np.random.Generator, budget: int = 60, ratio: float = 1.3,
                   runs: int = RUNS, candidates=CANDIDATES, first_depths=FIRST_DEPTHS) -> Sweep:
    """One simulated sweep of `case`, its depths chosen by trainability.next_depth."""
    started = time.perf_counter()
    chance: dict[int, float] = {}  # a depth's success probability, drawn once (overdispersion)
    trained: dict[int, int] = {}
    tried: dict[int, int] = {}

    def run_batch(depth: int) -> None:
        if depth not in chance:
            p = float(case.probability(depth))
            if case.eta > 0:
                nu = 1 / case.eta**2 - 1
                p = float(rng.beta(max(p * nu, 1e-9), max((1 - p) * nu, 1e-9)))
            chance[depth] = p
        trained[depth] = trained.get(depth, 0) + int(rng.binomial(runs, chance[depth]))
        tried[depth] = tried.get(depth, 0) + runs

    for depth in first_depths:
        run_batch(depth)
    depth_range = (min(candidates), max(candidates))
    while True:
        depths = sorted(tried)
        result = trainability.fit(depths, [trained[d] for d in depths], [tried[d] for d in depths], depth_range)
        lo, hi = result.k50_interval
        spent = sum(tried.values())
        if hi / lo <= ratio or spent + runs > budget:
            stopped = "ratio" if hi / lo <= ratio else "budget"
            break
        run_batch(trainability.next_depth(result, candidates, runs, case.cost))
    true_k50 = case.k50
    return Sweep(case.name, bool(lo <= true_k50 <= hi), result.k50, (lo, hi), spent,
                 float(sum(d * n for d, n in tried.items())), len(tried), stopped, time.perf_counter() - started)


def run_cases(cases, sweeps_per_case: int, seed: int, budget: int, ratio: float, log=None) -> list[Sweep]:
    sweeps = []
    for c, case in enumerate(cases):
        for i in range(sweeps_per_case):
            sweeps.append(simulate_sweep(case, np.random.default_rng([seed, c, i]), budget, ratio))
        if log:
            done = sweeps[-sweeps_per_case:]
            log(f"{case.name}: {sum(s.covered for s in done)}/{len(done)} covered, "
                f"{sum(s.seconds for s in done):.0f} s")
    return sweeps


def _summary_rows(cases, sweeps):
    for case in cases:
        done = [s for s in sweeps if s.case == case.name]
        ratios = np.array([s.interval[1] / s.interval[0] for s in done])
        yield case, done, ratios


def markdown(cases, sweeps, args, seconds: float) -> str:
    in_model = [s for s in sweeps if next(c for c in cases if c.name == s.case).in_model]
    covered = sum(s.covered for s in in_model)
    lines = [
        "# Calibration of flaxdepth.trainability's k50 interval",
        "",
        f"Written by `{' '.join(['python', 'experiments/trainability_calibration.py', *sys.argv[1:]])}` on "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} cores shared with other jobs, Python {platform.python_version()}, "
        f"numpy {np.__version__}); {seconds:.0f} s.",
        "",
        f"Each sweep: {RUNS} seeds at each of {', '.join(map(str, FIRST_DEPTHS))}, then batches of {RUNS} seeds at "
        f"the depth `trainability.next_depth` picks among {len(CANDIDATES)} candidates (multiples of 3 about "
        f"2^(1/8) apart, 3 to 768), until the 95% interval's hi/lo ratio is at most {args.ratio:g} or "
        f"{args.budget} runs are spent. k50 prior over the candidates' range. {args.sweeps_per_case} sweeps per "
        f"case, seed {args.seed}. Cost: the sum of the depths run (a run costs about its depth).",
        "",
        "Covered: the true k50 (the depth where the true P = 0.5) lies in the 95% credible interval of the "
        "sweep's last fit.",
        "",
        f"**Coverage of the true k50 by the 95% interval, cases inside the model: {covered}/{len(in_model)} = "
        f"{covered / len(in_model):.1%}** (contract: at least {COVERAGE_CONTRACT:.0%}).",
        "",
        "| case | k50 | s | lapse | guess | eta | cost | covered | hi/lo median [10%, 90%] | runs mean (max) "
        "| cost mean | depths mean | stopped by ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, done, ratios in _summary_rows(cases, sweeps):
        name = case.name if case.in_model else f"{case.name} (not in the contract)"
        lines.append(
            f"| {name} | {case.k50:g} | {case.s:g} | {case.lapse:g} | {case.guess:g} | {case.eta:g} | "
            f"{case.cost or 'runs'} | {sum(s.covered for s in done)}/{len(done)} | "
            f"{np.median(ratios):.2f} [{np.quantile(ratios, 0.1):.2f}, {np.quantile(ratios, 0.9):.2f}] | "
            f"{np.mean([s.runs for s in done]):.1f} ({max(s.runs for s in done)}) | "
            f"{np.mean([s.cost for s in done]):.0f} | {np.mean([s.depths for s in done]):.1f} | "
            f"{sum(s.stopped == 'ratio' for s in done)}/{len(done)} |")
    ratios = np.array([s.interval[1] / s.interval[0] for s in in_model])
    lines += [
        "",
        f"Inside the model, all cases: hi/lo median {np.median(ratios):.2f} [10%: {np.quantile(ratios, 0.1):.2f}, "
        f"90%: {np.quantile(ratios, 0.9):.2f}], runs mean {np.mean([s.runs for s in in_model]):.1f}, "
        f"{np.mean([s.seconds for s in in_model]):.2f} s per sweep (fits and next_depth calls included).",
        "",
        "Misses (the true k50 outside the final 95% interval):",
        "",
        *[f"- {s.case}: true k50 {next(c for c in cases if c.name == s.case).k50:g}, estimate {s.k50:.1f} "
          f"[{s.interval[0]:.1f}, {s.interval[1]:.1f}] after {s.runs} runs at {s.depths} depths"
          for s in sweeps if not s.covered],
        "",
        "s is the sigmoid's scale in log2 depth (10%-90% of the sigmoid: 4.39 s, e.g. s = 0.3: a factor 2.5 in "
        "depth); eta the per-depth beta-binomial overdispersion of the simulation (the model's too).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps-per-case", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=60, help="runs per sweep at most")
    p.add_argument("--ratio", type=float, default=1.3, help="stop when the k50 interval's hi/lo is at most this")
    p.add_argument("--out", type=Path, default=HERE / "notes" / "trainability_calibration.md")
    args = p.parse_args(argv)
    started = time.perf_counter()
    sweeps = run_cases(CASES, args.sweeps_per_case, args.seed, args.budget, args.ratio,
                       log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(CASES, sweeps, args, seconds))
    raw = {"cases": [dataclasses.asdict(c) for c in CASES],
           "settings": {"sweeps_per_case": args.sweeps_per_case, "seed": args.seed, "budget": args.budget,
                        "ratio": args.ratio, "runs": RUNS, "first_depths": FIRST_DEPTHS, "candidates": CANDIDATES},
           "sweeps": [dataclasses.asdict(s) for s in sweeps]}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
