"""A sweep's results: one JSON-lines file of runs, rewritten atomically, and its plot."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


class ResultsFile:
    """One row per finished run. Every write replaces the whole file through a temporary file
    and `os.replace`, so a sweep killed at any moment leaves the previous complete file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        with self.path.open() as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(
                            f"{self.path}:{number} is not valid JSON; move the file away to start over"
                        ) from None
        return rows

    def append(self, new_rows: Iterable[dict]) -> None:
        rows = self.rows() + list(new_rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                for row in rows:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def final_error(row: dict) -> float:
    """The error the trainability criterion reads: the smaller of the last train and test errors."""
    return min(row["train_errors"][-1], row["test_errors"][-1])


def plot(rows: list[dict], path: Path, title: str, threshold: float,
         boundary: dict[float, tuple[int | None, int | None]] | None = None) -> None:
    """Final error against depth, one line per (seed, lr), the threshold and boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lrs = sorted({row["lr"] for row in rows})
    markers = "osD^v<>p"
    for li, lr in enumerate(lrs):
        for seed in sorted({row["seed"] for row in rows if row["lr"] == lr}):
            points = sorted((row["depth"], 100 * final_error(row)) for row in rows
                            if row["lr"] == lr and row["seed"] == seed)
            label = f"seed {seed}" + (f", lr {lr:g}" if len(lrs) > 1 else "")
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
