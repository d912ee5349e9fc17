"""A sweep's results: one JSON-lines file of runs, rewritten atomically under a lock, its plot,
and `load_results`, which reads results files into one pandas DataFrame (`flaxdepth.load_results`)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import filelock

#: What a line must hold to count as a run; anything else is a damaged line.
REQUIRED_KEYS = ("depth", "seed", "lr", "train_errors", "test_errors", "finite")


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


class ResultsFile:
    """One row per finished run. Every write replaces the whole file through a temporary file and
    `os.replace`, under a lock beside it, so a sweep killed at any moment leaves the previous
    complete file and two sweeps writing at once lose no row.

    A damaged line (a partial write by another tool, a bad merge) is set aside: appended to
    `<name>.damaged` beside the file (never deleted) and dropped from the file, with one warning
    line; every intact run is kept. With `repair=False` (processes that only read) damaged lines
    are skipped and the file is left alone."""

    def __init__(self, path: Path, warn: Callable[[str], None] = _warn, repair: bool = True):
        self.path = Path(path)
        self.warn = warn
        self.repair = repair
        self._lock = filelock.FileLock(self._lock_path("lock"))

    def _lock_path(self, suffix: str) -> Path:
        # hidden, beside the file; filelock keeps the file and the OS releases a dead holder's lock
        return self.path.with_name(f".{self.path.name}.{suffix}")

    def depth_lock(self, depth: int) -> filelock.FileLock:
        """The lock a sweep holds while it trains and writes this depth's runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(self._lock_path(f"k{depth}.lock"))

    @property
    def damaged_path(self) -> Path:
        return self.path.with_name(self.path.name + ".damaged")

    def rows(self) -> list[dict]:
        """Every intact row; damaged lines are set aside (see the class docstring)."""
        if not self.path.exists():
            return []
        if not self.repair:
            return self._parse()[0]
        with self._locked():
            rows, damaged = self._parse()
            if damaged:
                with self.damaged_path.open("a") as side:
                    side.writelines(line if line.endswith("\n") else line + "\n" for _, line in damaged)
                    side.flush()
                    os.fsync(side.fileno())
                self._write(rows)
                numbers = ", ".join(str(number) for number, _ in damaged)
                self.warn(f"{self.path}: set aside {len(damaged)} damaged line(s) (line {numbers}) in "
                          f"{self.damaged_path}; the {len(rows)} intact run(s) are kept")
            return rows

    def _parse(self) -> tuple[list[dict], list[tuple[int, str]]]:
        return parse_lines(self.path)

    def append(self, new_rows: Iterable[dict]) -> None:
        with self._locked():
            self._write(self.rows() + list(new_rows))

    def _locked(self) -> filelock.FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self._lock

    def _write(self, rows: list[dict]) -> None:
        def write_rows(f):
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        atomic_write(self.path, write_rows, "w")


def parse_lines(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(intact rows, (line number, line) of each damaged line) of a results file."""
    rows, damaged = [], []
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and all(key in row for key in REQUIRED_KEYS):
                rows.append(row)
            else:
                damaged.append((number, line))
    return rows, damaged


def atomic_write(path: Path, write: Callable, mode: str = "wb") -> None:
    """`write(f)` fills a temporary file beside `path`, which then replaces `path` at once: a
    reader, or a process killed meanwhile, sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results and weights are read by others (a job array,
        # a shared folder): the permissions of a file created as usual, under the umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def final_error(row: dict) -> float:
    """The error the trainability criterion reads: the smaller of the last train and test errors."""
    return min(row["train_errors"][-1], row["test_errors"][-1])


def figure(rows: list[dict], title: str, threshold: float,
           boundary: dict[float, tuple[int | None, int | None]] | None = None, fits: dict | None = None):
    """Final error against depth, one line per (seed, lr), the threshold and boundaries marked;
    with `fits` ({lr: (depths, trained, runs, (Jeffreys lo, hi), trainability.Fit)}) a second
    panel: the fraction of runs that trained per depth with its interval, the fitted P(trains) with
    its 95% band and k50, on a log-depth axis. A matplotlib Figure (which Jupyter shows)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is

    fig = Figure(figsize=(12, 4.2) if fits else (7, 4.2))
    ax, *fit_axes = fig.subplots(1, 2 if fits else 1, squeeze=False)[0]
    lrs = sorted({row["lr"] for row in rows})
    markers = "osD^v<>p"
    for li, lr in enumerate(lrs):
        seeds = sorted({row["seed"] for row in rows if row["lr"] == lr})
        for seed in seeds:
            points = sorted((row["depth"], 100 * final_error(row)) for row in rows
                            if row["lr"] == lr and row["seed"] == seed)
            if len(lrs) == 1:
                label = f"seed {seed}" if len(seeds) <= 8 else None  # many seeds: no legend entry each
            else:
                label = f"lr {lr:g}" if seed == seeds[0] else None
            ax.plot(*zip(*points), marker=markers[li % len(markers)], lw=1, ms=4, alpha=0.8, label=label)
    ax.axhline(100 * threshold, color="k", ls="--", lw=1, label=f"threshold {100 * threshold:g}%")
    for lr, (deepest, _) in (boundary or {}).items():
        if deepest is not None:
            ax.axvline(deepest, color="tab:red", ls=":", lw=1.5,
                       label=f"deepest trainable k={deepest}" + (f" (lr {lr:g})" if len(lrs) > 1 else ""))
    ax.set_xlabel("depth k (conv layers)")
    ax.set_ylabel("final error, min(train, test) [%]")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    for (lr, drawn), color in zip(sorted((fits or {}).items()), ("tab:blue", "tab:orange", "tab:green")):
        _draw_fit(fit_axes[0], *drawn, color, f"lr {lr:g}" if len(fits) > 1 else "")
    fig.tight_layout()
    return fig


def _draw_fit(ax, depths, trained, runs, interval, fit, color: str, label: str) -> None:
    """A fit's panel: fractions with their intervals as error bars, the median curve and band, k50."""
    import numpy as np

    lo, hi = interval
    share = trained / runs
    ax.errorbar(depths, share, yerr=[share - lo, hi - share], fmt="o", color=color, ms=4, capsize=2,
                label=f"fraction trained {label}".strip())
    if not fit.censored:
        grid = np.geomspace(max(1.5, depths.min() / 2), depths.max() * 2, 60)  # smooth at this size; each point costs
        band = fit.probability(grid)
        ax.plot(grid, band.median, color=color, lw=1.5)
        ax.fill_between(grid, band.lo, band.hi, color=color, alpha=0.2, label=f"fitted P, 95% band {label}".strip())
        k_lo, k_hi = fit.k50_interval
        ax.axvline(fit.k50, color=color, ls="--", lw=1, label=f"k50 = {fit.k50:.3g} [{k_lo:.3g}, {k_hi:.3g}] (95%)")
    from matplotlib.ticker import NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks(depths)  # the tested depths, as plain numbers
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("depth k (log scale)")
    ax.set_ylabel("P(trains)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


#: Configuration fields a DataFrame gets as columns of their own (the whole configuration stays in
#: the `config` column): what tells the runs of several files apart.
CONFIG_COLUMNS = ("epochs", "batch_size", "threshold", "dataset", "limit_train", "limit_test", "notebook_quirks",
                  "fan")


def rows_frame(rows: list[dict]):
    """Results rows as a pandas DataFrame, one row per run: every key of the rows, `final_error`
    (what the criterion reads), CONFIG_COLUMNS and the engine's `precision` from each row's
    configuration (None where a row lacks it)."""
    import pandas as pd

    records = []
    for row in rows:
        config = row.get("config") or {}
        record = dict(row)
        record["final_error"] = final_error(row)
        for key in CONFIG_COLUMNS:
            record.setdefault(key, config.get(key))
        record.setdefault("precision", (config.get("engine") or {}).get("precision", "default"))
        records.append(record)
    return pd.DataFrame.from_records(records)


def load_results(path, warn: Callable[[str], None] = _warn):
    """One results file, or every `*.jsonl` under a folder (sorted), as one pandas DataFrame (see
    `rows_frame`) with a `file` column naming each row's file. Read only: a damaged line (or a line
    that is not a run) gets one warning per file naming its line numbers and stays where it is."""
    root = Path(path)
    if root.is_dir():
        files = sorted(root.rglob("*.jsonl"))
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"no results file or folder at {root}")
    rows = []
    for file in files:
        intact, damaged = parse_lines(file)
        if damaged:
            numbers = ", ".join(str(number) for number, _ in damaged)
            warn(f"{file}: skipped {len(damaged)} line(s) that are not intact runs (line {numbers})")
        rows += [dict(row, file=str(file)) for row in intact]
    return rows_frame(rows)
