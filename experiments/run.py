"""Run every sweep of experiments/sweeps.toml, resumably, in one process (compiled programs are
shared between sweeps of the same variant and depth).

    python experiments/run.py [--only NAME ...] [--time-budget SECONDS] [--data-dir DIR]

Finished runs are read back from experiments/results/, so rerunning trains only what is missing.
`--time-budget` stops starting new sweeps after that many seconds (a sweep in flight finishes).
Then `python experiments/report.py` rebuilds REPORT.md and the figures from the results.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="names of sweeps.toml entries to run (default: all)")
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
    try:
        dataset = data.subset(data.load_dataset("mnist", args.data_dir), args.limit_train, args.limit_test)
    except data.DataError as error:
        print(f"experiments/run.py: error: {error}", file=sys.stderr)
        return 2

    from flaxdepth import parity_check

    print(parity_check.quick_parity("resnet", dataset), flush=True)
    start = time.perf_counter()
    for entry in entries:
        if args.only and entry["name"] not in args.only:
            continue
        for config in expand(entry, Path(args.out), args.data_dir, args.limit_train, args.limit_test):
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                print(f"time budget of {args.time_budget:g}s spent; rerun to continue", flush=True)
                return 0
            sweep_start = time.perf_counter()
            report = run_sweep(config, dataset, log=lambda line: None)
            deepest, shallowest = report.boundary()
            print(f"[{entry['name']}] {report.boundary_sentence(deepest, shallowest)} "
                  f"({time.perf_counter() - sweep_start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
