"""Run every sweep of experiments/sweeps.toml, resumably (with `--jobs 1`, in one process, whose
compiled programs are shared between sweeps of the same variant and depth).

    python experiments/run.py [--only NAME ...] [--variants NAME ...] [--jobs N]
                              [--time-budget SECONDS] [--data-dir DIR]

Finished runs are read back from experiments/results/, so rerunning trains only what is missing.
`--time-budget` stops starting new sweeps after that many seconds (a sweep in flight finishes).
`--jobs N` runs sweeps in N worker processes at once, so that their XLA compilations overlap on a
machine with many CPU cores (on one GPU their kernels time-slice: each run is slower than alone,
see BENCHMARKS.md). Sweeps start in sweeps.toml order, variants in `--variants` order when given;
a sweep waits while another sweep of its results file runs (both would train into that file).
A sweep that fails gets a line saying so and the others go on; the exit status is then 1.
Then `python experiments/report.py` rebuilds REPORT.md and the figures from the results.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

from flaxdepth import cli, data, registry, train
from flaxdepth.config import ConfigError, SweepConfig
from flaxdepth.options import EngineOptions
from flaxdepth.search import run_sweep

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "sweeps.toml"
RESULTS = HERE / "results"
# The declared variants some sweeps train; registered at import, so in spawned workers too.
DECLARED = registry.load_variants(HERE / "variants.toml")
PROG = "experiments/run.py"
#: The study's seeds per depth and its search, where an entry names none: the committed rows'
#: (3 seeds, the bisection of flaxdepth.search.boundary_search), so that a rerun reuses them.
STUDY_SEEDS = 3
#: The keys of a [[sweep]] entry: required, then optional (each optional one a SweepConfig field's
#: value, or lr_at_depth: {"k" = lr} for each of the entry's depths, or precision: EngineOptions').
REQUIRED_KEYS = ("name", "variants", "depths")
OPTIONAL_KEYS = ("description", "seeds", "search", "lrs", "lr_at_depth", "batch_size", "epochs", "notebook_quirks",
                 "framework", "precision", "limit_train", "limit_test")


def read_entries(path: Path = CONFIG) -> list[dict]:
    """The [[sweep]] entries of a sweeps file, read strictly: a missing or unknown key is a
    ConfigError naming the file, the entry and the key."""
    entries = tomllib.loads(Path(path).read_text()).get("sweep", [])
    for number, entry in enumerate(entries, 1):
        name = entry.get("name", f"number {number}")
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise ConfigError(f"{path}: sweep {name!r} has no {key!r}")
        unknown = sorted(set(entry) - {*REQUIRED_KEYS, *OPTIONAL_KEYS})
        if unknown:
            raise ConfigError(f"{path}: sweep {name!r}: unknown key {unknown[0]!r}; the keys are "
                              f"{', '.join((*REQUIRED_KEYS, *OPTIONAL_KEYS))}")
    return entries


def expand(entry: dict, out: Path, data_dir: str | None, limit_train: int | None = None,
           limit_test: int | None = None) -> list[SweepConfig]:
    """One SweepConfig per variant of a sweeps.toml entry; an entry's own limit_train / limit_test
    (a CPU-sized subset) win over the command line's. An entry's lrs (for every variant alike, so
    that inits compare at one lr; default: each variant's lr) and batch_size (default 256) apply;
    its lr_at_depth table ({"k" = lr} for each of its depths) makes one SweepConfig per variant and
    depth, at that depth's lr."""
    variants = registry.VARIANT_NAMES if entry["variants"] == "all" else tuple(entry["variants"])
    lrs = tuple(entry["lrs"]) if "lrs" in entry else None
    configs = []
    for name in variants:
        depths = entry["depths"]
        if depths == "notebook_pair":
            depths = registry.get_variant(name).notebook_pair
        depths = None if depths == "search" else tuple(depths)
        by_depth = entry.get("lr_at_depth")
        for sweep_depths, sweep_lrs in ([((k,), (by_depth[str(k)],)) for k in depths] if by_depth
                                        else [(depths, lrs)]):
            configs.append(SweepConfig(
                variant=name, depths=sweep_depths, seeds=entry.get("seeds", STUDY_SEEDS), lrs=sweep_lrs,
                search=entry.get("search", "bisect"),
                batch_size=entry.get("batch_size", SweepConfig.batch_size),
                epochs=entry.get("epochs", SweepConfig.epochs),
                notebook_quirks=entry.get("notebook_quirks", SweepConfig.notebook_quirks),
                framework=entry.get("framework", SweepConfig.framework),
                engine=EngineOptions(precision=entry.get("precision", EngineOptions.precision)),
                out=str(out), data_dir=data_dir,
                limit_train=entry.get("limit_train", limit_train), limit_test=entry.get("limit_test", limit_test),
                skip_parity=True,  # the parity suite and one check per process (below) cover it
            ).validate())
    return configs


@functools.lru_cache(maxsize=1)
def _dataset(data_dir, limit_train, limit_test):
    return data.subset(data.load_dataset("mnist", data_dir), limit_train, limit_test)


def run_one(name: str, config: SweepConfig, deadline: float | None) -> str:
    """Run one sweep, in this process or a worker; its summary line. `deadline` is a time.time()
    after which the sweep does not start."""
    if deadline is not None and time.time() > deadline:
        return f"[{name}] {config.variant}: not started, time budget spent; rerun to continue"
    start = time.perf_counter()
    report = run_sweep(config, _dataset(config.data_dir, config.limit_train, config.limit_test),
                       log=lambda line: None)
    deepest, shallowest = report.boundary()
    return f"[{name}] {report.boundary_sentence(deepest, shallowest)} ({time.perf_counter() - start:.0f}s)"


def plan(entries: list[dict], only, variants, out: Path, data_dir, limit_train=None,
         limit_test=None) -> list[tuple[str, SweepConfig]]:
    """(entry name, config) of every sweep to run, in run order: sweeps.toml's entries in file
    order, each entry's variants in `variants` order (registry order when None)."""
    rank = {name: i for i, name in enumerate(variants or registry.variant_names())}
    sweeps = []
    for entry in entries:
        if only and entry["name"] not in only:
            continue
        configs = [c for c in expand(entry, out, data_dir, limit_train, limit_test) if c.variant in rank]
        sweeps += [(entry["name"], c) for c in sorted(configs, key=lambda c: rank[c.variant])]
    return sweeps


def startable(pending: list[tuple[str, SweepConfig]], busy_files: set[Path], slots: int):
    """The pending sweeps to start now, in order: up to `slots` of them, skipping any whose results
    file a running sweep (or one chosen before it) trains into, since both would append to it."""
    chosen, busy = [], set(busy_files)
    for name, config in pending:
        if len(chosen) == slots:
            break
        if config.results_path() not in busy:
            chosen.append((name, config))
            busy.add(config.results_path())
    return chosen


def failed_line(name: str, config: SweepConfig, error: BaseException) -> str:
    return (f"[{name}] {config.variant}: failed ({type(error).__name__}: {error}); its finished runs are kept, "
            "rerun to retry")


def print_outcome(name: str, config: SweepConfig, summary: Callable[[], str]) -> bool:
    """Print a sweep's summary line, or that it failed (the other sweeps go on); True if it did not fail."""
    try:
        print(summary(), flush=True)
        return True
    except Exception as error:  # noqa: BLE001 - any failure of one sweep is reported, not raised
        print(failed_line(name, config, error), flush=True)
        return False


def run_in_workers(sweeps: list[tuple[str, SweepConfig]], pool: Executor, jobs: int, deadline: float | None,
                   run: Callable[[str, SweepConfig, float | None], str] = run_one) -> bool:
    """Run the sweeps on `pool`, at most `jobs` at once, in order as `startable` allows; print each
    summary line as its sweep ends. A failed sweep (or a dead worker) gets a line and the others go
    on. True when none failed."""
    pending, running, ok = list(sweeps), {}, True  # running: future -> (name, config)
    while pending or running:
        busy = {config.results_path() for _, config in running.values()}
        for name, config in startable(pending, busy, jobs - len(running)):
            pending.remove((name, config))
            try:
                running[pool.submit(run, name, config, deadline)] = (name, config)
            except BrokenExecutor as error:  # a worker died (e.g. killed for memory): none can start
                ok = False
                print(failed_line(name, config, error), flush=True)
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            ok &= print_outcome(*running.pop(future), future.result)
    return ok


@cli.command(PROG)
def main(argv=None) -> int:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="names of sweeps.toml entries to run (default: all)")
    p.add_argument("--variants", nargs="*", help="run only these variants of the entries")
    p.add_argument("--jobs", type=int, default=1, help="sweeps run at once, each in its own process")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new sweep starts after")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--limit-train", type=int, default=None, help="smoke tests only: first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="smoke tests only: first N test images")
    args = p.parse_args(argv)
    # The budget counts from here, before the dataset load and the parity check.
    deadline = None if args.time_budget is None else time.time() + args.time_budget
    entries = read_entries(CONFIG)
    unknown = set(args.only or ()) - {e["name"] for e in entries}
    if unknown:
        raise ConfigError(f"no sweep named {', '.join(sorted(unknown))} in {CONFIG}")
    bad = set(args.variants or ()) - set(registry.variant_names())
    if bad:
        raise ConfigError(f"unknown variant {', '.join(sorted(bad))}; choose from {', '.join(registry.variant_names())}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    dataset = _dataset(args.data_dir, args.limit_train, args.limit_test)

    sweeps = plan(entries, args.only, args.variants, Path(args.out), args.data_dir, args.limit_train, args.limit_test)
    # On CPUs, each process presents its share of the cores as several devices (as the sweep does).
    cpu_devices = train.cpu_device_count(max((config.runs_per_depth for _, config in sweeps), default=1),
                                         max(1, train.usable_cores() // args.jobs))
    train.request_cpu_devices(cpu_devices)  # before JAX starts (the parity check starts it)
    from flaxdepth import parity_check

    print(parity_check.quick_parity("resnet", dataset), flush=True)
    if args.jobs == 1:
        ok = all([print_outcome(name, config, functools.partial(run_one, name, config, deadline))
                  for name, config in sweeps])  # a list, so that every sweep runs
    else:
        # spawn, not fork: a forked child would inherit this process's initialized JAX runtime.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=train.request_cpu_devices, initargs=(cpu_devices,)) as pool:
            ok = run_in_workers(sweeps, pool, args.jobs, deadline)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
