"""Run every sweep of experiments/sweeps.toml, resumably, in one process (compiled programs are
shared between sweeps of the same variant and depth).

    python experiments/run.py [--only NAME ...] [--variants NAME ...] [--jobs N]
                              [--time-budget SECONDS] [--data-dir DIR]

Finished runs are read back from experiments/results/, so rerunning trains only what is missing.
`--time-budget` stops starting new sweeps after that many seconds (a sweep in flight finishes).
`--jobs N` runs sweeps in N worker processes at once, so that their XLA compilations overlap on a
machine with many CPU cores (on one GPU their kernels time-slice: each run is slower than alone,
see BENCHMARKS.md). Sweeps that share a results file run one after the other in the same worker.
Then `python experiments/report.py` rebuilds REPORT.md and the figures from the results.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from flaxdepth import data, registry
from flaxdepth.search import SweepConfig, run_sweep

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "sweeps.toml"
RESULTS = HERE / "results"


def expand(entry: dict, out: Path, data_dir: str | None, limit_train: int | None = None,
           limit_test: int | None = None) -> list[SweepConfig]:
    """One SweepConfig per variant of a sweeps.toml entry."""
    variants = registry.VARIANT_NAMES if entry["variants"] == "all" else tuple(entry["variants"])
    configs = []
    for name in variants:
        depths = entry["depths"]
        if depths == "notebook_pair":
            depths = registry.get_variant(name).notebook_pair
        configs.append(SweepConfig(
            variant=name, depths=None if depths == "search" else tuple(depths), seeds=entry.get("seeds", 3),
            epochs=entry.get("epochs", 3), notebook_quirks=entry.get("notebook_quirks", False),
            framework=entry.get("framework", "jax"), out=str(out), data_dir=data_dir,
            limit_train=limit_train, limit_test=limit_test,
            skip_parity=True,  # the parity suite and one check per process (below) cover it
        ).validate())
    return configs


@functools.lru_cache(maxsize=1)
def _dataset(data_dir, limit_train, limit_test):
    return data.subset(data.load_dataset("mnist", data_dir), limit_train, limit_test)


def run_group(sweeps: list[tuple[str, SweepConfig]], deadline: float | None) -> list[str]:
    """Run (entry name, config) sweeps one after the other, in this process or a worker; one
    summary line each. `deadline` is a time.time() after which no further sweep starts."""
    lines = []
    for name, config in sweeps:
        if deadline is not None and time.time() > deadline:
            lines.append(f"[{name}] {config.variant}: not started, time budget spent; rerun to continue")
            continue
        start = time.perf_counter()
        report = run_sweep(config, _dataset(config.data_dir, config.limit_train, config.limit_test),
                           log=lambda line: None)
        deepest, shallowest = report.boundary()
        lines.append(f"[{name}] {report.boundary_sentence(deepest, shallowest)} ({time.perf_counter() - start:.0f}s)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="names of sweeps.toml entries to run (default: all)")
    p.add_argument("--variants", nargs="*", help="run only these variants of the entries")
    p.add_argument("--jobs", type=int, default=1, help="sweeps run at once, each in its own process")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new sweep starts after")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--limit-train", type=int, default=None, help="smoke tests only: first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="smoke tests only: first N test images")
    args = p.parse_args(argv)
    entries = tomllib.loads(CONFIG.read_text())["sweep"]
    unknown = set(args.only or ()) - {e["name"] for e in entries}
    if unknown:
        print(f"experiments/run.py: error: no sweep named {', '.join(sorted(unknown))} in {CONFIG}", file=sys.stderr)
        return 2
    bad = set(args.variants or ()) - set(registry.VARIANT_NAMES)
    if bad:
        print(f"experiments/run.py: error: unknown variant {', '.join(sorted(bad))}; choose from "
              f"{', '.join(registry.VARIANT_NAMES)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"experiments/run.py: error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        dataset = _dataset(args.data_dir, args.limit_train, args.limit_test)
    except data.DataError as error:
        print(f"experiments/run.py: error: {error}", file=sys.stderr)
        return 2

    from flaxdepth import parity_check

    print(parity_check.quick_parity("resnet", dataset), flush=True)
    # Sweeps grouped by results file, in sweeps.toml order: a group runs in one worker.
    groups: dict[Path, list[tuple[str, SweepConfig]]] = {}
    for entry in entries:
        if args.only and entry["name"] not in args.only:
            continue
        for config in expand(entry, Path(args.out), args.data_dir, args.limit_train, args.limit_test):
            if args.variants and config.variant not in args.variants:
                continue
            groups.setdefault(config.results_path(), []).append((entry["name"], config))
    deadline = None if args.time_budget is None else time.time() + args.time_budget
    if args.jobs == 1:
        for sweeps in groups.values():
            for line in run_group(sweeps, deadline):
                print(line, flush=True)
        return 0
    # spawn, not fork: a forked child would inherit this process's initialized JAX runtime.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_group, sweeps, deadline) for sweeps in groups.values()]
        for future in as_completed(futures):
            for line in future.result():
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
