"""Sweeps: train seeds x learning rates at each depth, find the deepest trainable depth, keep the
evidence. `python -m flaxdepth.sweep` is the command-line front of `run_sweep`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Callable

import filelock
import jax
import numpy as np

from flaxdepth import registry, run_outputs, train
from flaxdepth.data import DATASETS
from flaxdepth.options import AUTO, EngineOptions
from flaxdepth.results import ResultsFile, final_error, plot

FRAMEWORKS = ("jax", "torch")
#: Where results go unless --out says otherwise: a folder of the user's, in the working directory.
DEFAULT_OUT = "flaxdepth-results"
#: Setting this environment variable changes the command line's default --out.
RESULTS_ENV = "FLAXDEPTH_RESULTS"


class ConfigError(ValueError):
    """Bad input, reported in one line before any training starts."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; stored with every result row."""

    variant: str
    lrs: tuple[float, ...] | None = None  # None: the notebook's lr of the variant
    seeds: int = 3
    first_seed: int = 0
    depths: tuple[int, ...] | None = None  # None: search for the boundary
    max_depth: int = 768
    epochs: int = 3
    batch_size: int = 256
    threshold: float = 0.2
    dataset: str = "mnist"
    data_dir: str | None = None
    out: str = DEFAULT_OUT
    limit_train: int | None = None
    limit_test: int | None = None
    notebook_quirks: bool = False
    framework: str = "jax"
    fan: str | None = None  # overrides the variant's init_fan
    skip_parity: bool = False
    engine: EngineOptions = EngineOptions()  # how the engine computes (flaxdepth.options)
    save_weights: bool = False  # each run's final weights beside the results file (flaxdepth.run_outputs)
    diagnostics: bool = False  # a per-layer summary at init and at the end in each row (flaxdepth.run_outputs)
    probe_size: int = 64  # the diagnostics' probe batch: the first probe_size test images

    def validate(self) -> "SweepConfig":
        registry.get_variant(self.variant)  # UnknownVariantError lists the valid names
        if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
            raise ConfigError(f"learning rates must be positive numbers, got {list(self.lrs)}")
        for name in ("seeds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.probe_size < 1:
            raise ConfigError(f"--probe-size must be at least 1, got {self.probe_size}")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.depths is not None:
            # The command line asks for multiples of 3; the library also takes the notebook's
            # k = 139 and 142 (k // 3 layers per stage).
            bad = [d for d in self.depths if d < 3]
            if bad or not self.depths:
                raise ConfigError(f"depths must be at least 3, got {bad or 'none'}")
        if self.max_depth < 3:
            raise ConfigError(f"--max-depth must be at least 3, got {self.max_depth}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold is an error rate in (0, 1], got {self.threshold}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.framework not in FRAMEWORKS:
            raise ConfigError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        if not isinstance(self.engine, EngineOptions):
            raise ConfigError(f"engine must be an EngineOptions, got {type(self.engine).__name__}")
        if self.fan is not None and self.fan not in registry.FANS:
            raise ConfigError(f"--fan must be one of {', '.join(registry.FANS)}, got {self.fan!r}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"--data-dir {self.data_dir} is not a folder; point it at the folder "
                              f"holding the four IDX files")
        return self

    def check_dataset(self, dataset) -> None:
        """What only the loaded dataset can tell: enough test images for the diagnostics' probe."""
        if self.diagnostics and self.probe_size > len(dataset.test_labels):
            raise ConfigError(f"--probe-size {self.probe_size} is more than the {len(dataset.test_labels)} test "
                              f"images; lower --probe-size or raise --limit-test")

    @property
    def spec(self) -> registry.Variant:
        """The variant's registered spec."""
        return registry.get_variant(self.variant)

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.lrs or (self.spec.lr,)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def runs_per_depth(self) -> int:
        """Models trained side by side at each depth: seeds x learning rates."""
        return self.seeds * len(self.learning_rates)

    @property
    def protocol(self) -> str:
        return "faithful" if self.notebook_quirks else "corrected"

    def results_path(self) -> Path:
        """One file per protocol: reruns, more seeds or lrs and other depths all add to it."""
        parts = [self.variant, self.framework, self.protocol, f"e{self.epochs}", f"b{self.batch_size}", self.dataset]
        if self.limit_train:
            parts.append(f"train{self.limit_train}")
        if self.limit_test:
            parts.append(f"test{self.limit_test}")
        if self.fan is not None and self.fan != self.spec.init_fan:
            parts.append(f"fan{self.fan}")
        if self.engine.precision != "default":
            parts.append(f"prec{self.engine.precision}")
        return Path(self.out) / ("_".join(parts) + ".jsonl")

    def as_row(self) -> dict:
        """The configuration as stored in a results row: paths as given when relative, else as
        seen from the working directory or by their last component, never a machine's private path."""
        row = dataclasses.asdict(self)
        row["out"] = portable_path(self.out)
        row["data_dir"] = None if self.data_dir is None else portable_path(self.data_dir)
        return row


def portable_path(path: str) -> str:
    """`path` as a results row stores it: relative paths as given; absolute ones relative to the
    working directory when inside it, else their last component (no home or scratch folders)."""
    given = Path(path)
    if not given.is_absolute():
        return str(given)
    try:
        return str(given.relative_to(Path.cwd()))
    except ValueError:
        return given.name


def environment() -> dict:
    """Device and library versions, stored with every row."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {"device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count(),
            "process_count": jax.process_count(), "host": platform.node(), "versions": versions}


@dataclasses.dataclass
class DepthOutcome:
    depth: int
    rows: list[dict]

    def trainable_count(self, lr: float) -> int:
        return sum(row["trainable"] for row in self.rows if row["lr"] == lr)

    def trains(self, lr: float) -> bool:
        """Most seeds train at this lr."""
        runs = [row for row in self.rows if row["lr"] == lr]
        return 2 * self.trainable_count(lr) > len(runs)


@dataclasses.dataclass
class SweepReport:
    config: SweepConfig
    outcomes: dict[int, DepthOutcome]
    path: Path
    plot_path: Path

    def boundary(self, lr: float | None = None) -> tuple[int | None, int | None]:
        """(deepest depth where most seeds train, shallowest deeper depth where they don't); with
        `lr` None a depth counts as trainable when most seeds train at any of the lrs."""
        def trains(outcome):
            lrs = self.config.learning_rates if lr is None else (lr,)
            return any(outcome.trains(x) for x in lrs)

        depths = sorted(self.outcomes)
        passing = [d for d in depths if trains(self.outcomes[d])]
        deepest = max(passing) if passing else None
        failing = [d for d in depths if not trains(self.outcomes[d]) and (deepest is None or d > deepest)]
        return deepest, (min(failing) if failing else None)

    def table(self) -> str:
        lines = []
        seeds = self.config.seed_list
        header = f"{'k':>5} {'lr':>7}  " + "  ".join(f"seed {s:<3} final error" for s in seeds) + "  trainable"
        lines.append(header)
        for depth in sorted(self.outcomes):
            outcome = self.outcomes[depth]
            for lr in self.config.learning_rates:
                cells = []
                for seed in seeds:
                    row = next((r for r in outcome.rows if r["seed"] == seed and r["lr"] == lr), None)
                    cells.append("-".rjust(20) if row is None else
                                 f"{100 * final_error(row):6.2f}% {'yes' if row['trainable'] else 'no':>3}".rjust(20)
                                 + ("" if row["finite"] else " NaN"))
                runs = sum(1 for r in outcome.rows if r["lr"] == lr)
                lines.append(f"{depth:>5} {lr:>7g}  " + "  ".join(cells)
                             + f"  {outcome.trainable_count(lr)}/{runs}")
        deepest, shallowest = self.boundary()
        lines.append(self.boundary_sentence(deepest, shallowest))
        return "\n".join(lines)

    def boundary_sentence(self, deepest, shallowest) -> str:
        c = self.config
        where = f"{c.variant} ({c.protocol}, {c.framework}, lr {', '.join(f'{x:g}' for x in c.learning_rates)})"
        if deepest is None:
            return f"{where}: no evaluated depth trains for most seeds" + (
                f" (shallowest tried k={shallowest})" if shallowest else "")
        if shallowest is None:
            return f"{where}: deepest trainable k={deepest}; no deeper depth was tried, or all trained"
        return f"{where}: deepest trainable k={deepest}, shallowest untrainable k={shallowest}"


class Sweep:
    """Trains what a sweep needs, reusing every finished run of this device in its results file.

    A run (seed, lr, depth) is trained once: a depth's missing runs are trained under a lock
    beside the results file (`filelock`), so a second sweep of the same file, in another terminal
    or job, waits and then reuses what the first wrote. Rows of other devices (an H200's, say) are
    kept in the file but neither reused nor shown: each device's boundary is its own.

    JAX runs are split over every device of every process (`train.replica_mesh`). Under
    `jax.distributed` every process runs the same sweep in lockstep; process 0 alone reads and
    writes the results file, the plot and the log, and hands the finished rows to the others."""

    def __init__(self, config: SweepConfig, dataset, log: Callable[[str], None] = print, progress=None):
        self.config = config
        self.dataset = dataset
        self.writer = jax.process_index() == 0
        self.log = log if self.writer else (lambda line: None)
        self.progress = progress if self.writer else None  # a tqdm-like factory, or None
        self.file = ResultsFile(config.results_path(), repair=self.writer)  # warnings: stderr
        self._check_same_rows_everywhere(self.file.rows())
        self.env = environment()
        self.dataset_sha256 = None if dataset is None else dataset_fingerprint(dataset)
        if dataset is not None:
            config.check_dataset(dataset)
        self._outputs = None  # the run_outputs.RunOutputs of the depth in training
        self.outcomes: dict[int, DepthOutcome] = {}
        self.mesh = train.replica_mesh() if config.framework == "jax" else None
        self._device_data = None

    def _check_same_rows_everywhere(self, rows: list[dict]) -> None:
        """Every process must see the same results file: --out on a filesystem they all share."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).digest()
        digests = multihost_utils.process_allgather(np.frombuffer(digest[:8], np.int64))
        if len(np.unique(digests)) > 1:  # every process sees every digest, so all of them stop
            raise ConfigError(f"the processes read different contents of {self.file.path}; --out must be a "
                              f"folder that every process shares") from None

    @contextlib.contextmanager
    def _claim(self, depth: int):
        """Hold this depth's lock while its runs are looked up, trained and written."""
        if not self.writer:
            yield
            return
        lock = self.file.depth_lock(depth)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            self.log(f"  k={depth}: another sweep is training into {self.file.path}; waiting for it")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _finished(self, depth: int) -> dict[tuple[int, float], dict]:
        """This device's finished runs at `depth`, read from the file now (another sweep may have
        added some), the same on every process."""
        rows = self._from_process_zero([row for row in self.file.rows() if row["depth"] == depth]
                                       if self.writer else None)
        elsewhere = sorted({row.get("device") for row in rows} - {self.env["device"]}, key=str)
        if elsewhere:
            self.log(f"  k={depth}: runs of {', '.join(map(str, elsewhere))} in {self.file.path} are not reused "
                     f"on {self.env['device']}")
        rows = [row for row in rows if row.get("device") == self.env["device"]]
        other_spec = [row for row in rows if not self._same_spec(row)]
        if other_spec:
            self.log(f"  k={depth}: {len(other_spec)} runs in {self.file.path} were trained with other fields of "
                     f"{self.config.variant}; they are not reused")
        return {(row["seed"], row["lr"]): row for row in rows if self._same_spec(row)}

    def _same_spec(self, row: dict) -> bool:
        """Whether a row was trained with this sweep's spec (rows without one are the built-ins')."""
        spec = self.config.spec
        if "spec" not in row:
            return spec == registry.VARIANTS.get(spec.name)
        return row["spec"] == spec.fields()

    def _from_process_zero(self, value):
        """Process 0's `value` (JSON data) on every process."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils

        payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if self.writer else np.zeros(0, np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
        payload = multihost_utils.broadcast_one_to_all(payload if self.writer else np.zeros(size, np.uint8))
        return json.loads(np.asarray(payload).tobytes())

    def _row(self, depth: int, result, wall_s: float, replicas: int) -> dict:
        c = self.config
        return {
            "variant": c.variant, "depth": depth, "lr": result.lr, "seed": result.seed,
            "framework": c.framework, "protocol": c.protocol,
            "train_errors": result.train_errors, "test_errors": result.test_errors,
            "finite": result.finite, "trainable": result.trainable(c.threshold),
            "wall_s": wall_s, "replicas_trained_together": replicas,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.env, "cpu_kernels_used": self._cpu_kernels_used(), "dataset_sha256": self.dataset_sha256,
            "config": {**c.as_row(), "engine": self._engine.as_dict()}, "spec": c.spec.fields(),
        }

    def _engine_for(self, depth: int, runs: int) -> EngineOptions:
        """The engine options `runs` new runs at `depth` train with, as their rows record them:
        rematerialize "auto" chosen for this depth, or "none" for torch_ref (its autograd keeps
        every activation)."""
        c = self.config
        if c.framework == "jax":
            replicas = -(-runs // self.mesh.size) * self.mesh.size  # padded as train_replicas pads them
            return train.step_options(c.engine, c.spec, depth, c.batch_size, replicas, self.mesh)
        return dataclasses.replace(c.engine, rematerialize="none") if c.engine.rematerialize == AUTO else c.engine

    def _cpu_kernels_used(self) -> bool:
        """Whether this sweep's JAX programs ran flaxdepth's CPU kernels (float32 on a CPU, asked
        for, and built)."""
        if self.config.framework != "jax" or not self.config.engine.cpu_kernels or jax.default_backend() != "cpu":
            return False
        from flaxdepth import cpu_kernels

        return jax.numpy.result_type(float) == jax.numpy.float32 and cpu_kernels.available()

    def _train(self, depth: int, runs: list[tuple[int, float]]) -> list[train.RunResult]:
        c = self.config
        # jax trains the runs side by side (a bar step per epoch); torch one after the other.
        steps = c.epochs if c.framework == "jax" else c.epochs * len(runs)
        where = ""
        if self.mesh is not None and self.mesh.size > 1:
            where = f" on {self.mesh.size} {self.mesh.devices.flat[0].platform} devices"
        bar = self.progress(total=steps, desc=f"{c.variant} k={depth} ({len(runs)} runs{where})", unit="epoch",
                            leave=False) if self.progress else None

        def log_epoch(line: str) -> None:
            if bar is not None:
                bar.update(1)
            self.log(line)

        def on_epoch(epoch, results):
            log_epoch("\n".join(f"  k={depth} seed={r.seed} lr={r.lr:g}  " + train.notebook_log_line(
                epoch, c.epochs, r.train_errors[epoch], r.test_errors[epoch]) for r in results))

        outputs = None
        if c.save_weights or c.diagnostics:
            probe = self.dataset.test_images[:c.probe_size], self.dataset.test_labels[:c.probe_size]
            outputs = self._outputs = run_outputs.RunOutputs(c, depth, runs, *probe, self._engine, measure=self.writer)
        try:
            if c.framework == "jax":
                if outputs is not None:
                    outputs.check_memory()
                if self._device_data is None:
                    self._device_data = train.DeviceData.put(self.dataset, self.mesh)
                return train.train_replicas(c.variant, depth, self._device_data, runs, c.epochs, c.batch_size,
                                            c.notebook_quirks, c.fan, on_epoch, self.mesh, self._engine,
                                            on_state=None if outputs is None else outputs.jax_state)
            from flaxdepth import torch_runner

            return torch_runner.train_torch_runs(c.variant, depth, self.dataset, runs, c.epochs, c.batch_size,
                                                 c.notebook_quirks, c.fan,
                                                 log=lambda line: log_epoch(f"  k={depth} {line}"),
                                                 precision=c.engine.precision,
                                                 on_model=None if outputs is None else outputs.torch_model)
        finally:
            if bar is not None:
                bar.close()

    def evaluate(self, depth: int) -> DepthOutcome:
        """All (seed, lr) runs at this depth: finished ones read back, the others trained now."""
        c = self.config
        wanted = [(s, lr) for s in c.seed_list for lr in c.learning_rates]
        with self._claim(depth):
            finished = self._finished(depth)
            missing = [run for run in wanted if run not in finished]
            self._log_reused_without_outputs(depth, [finished[run] for run in wanted if run in finished])
            if missing:
                self._outputs = None
                self._engine = self._engine_for(depth, len(missing))
                start = time.perf_counter()
                results = self._train(depth, missing)
                # the time spent measuring and copying weights is not the runs' training time
                wall = time.perf_counter() - start - (0 if self._outputs is None else self._outputs.elapsed)
                rows = [self._row(depth, r, wall / len(results), len(results)) for r in results]
                if self.writer:
                    if self._outputs is not None:  # under the depth's lock: the weight files' names are ours
                        self._outputs.add_to(rows, self.file.path, run_outputs.taken_names(self.file.rows()))
                    self.file.append(rows)
                finished.update({(r["seed"], r["lr"]): r for r in rows})
            else:
                self.log(f"  k={depth}: all {len(wanted)} runs already in {self.file.path}, reused")
        # The verdict is recomputed, so a rerun with another --threshold judges the same errors.
        rows = [dict(finished[run], trainable=finished[run]["finite"] and final_error(finished[run]) < c.threshold)
                for run in wanted]
        outcome = DepthOutcome(depth, rows)
        self.outcomes[depth] = outcome
        return outcome

    def _log_reused_without_outputs(self, depth: int, reused: list[dict]) -> None:
        """Reused runs keep what they were trained with: say which asked-for outputs they lack."""
        for asked, key, flag in ((self.config.save_weights, "weights", "--save-weights"),
                                 (self.config.diagnostics, "diagnostics", "--diagnostics")):
            lacking = sum(key not in row for row in reused) if asked else 0
            if lacking:
                self.log(f"  k={depth}: {lacking} reused runs in {self.file.path} were trained without {flag} "
                         f"and have no {key}; a new --out trains them again")

    def trains(self, depth: int) -> bool:
        outcome = self.outcomes.get(depth) or self.evaluate(depth)
        return any(outcome.trains(lr) for lr in self.config.learning_rates)

    def run(self) -> SweepReport:
        if self.config.depths is None:
            boundary_search(self.trains, self.config.max_depth)
        else:
            for depth in self.config.depths:
                self.evaluate(depth)
        path = self.file.path
        plot_path = path.with_suffix(".png")
        report = SweepReport(self.config, self.outcomes, path, plot_path)
        rows = [row for outcome in self.outcomes.values() for row in outcome.rows]
        c = self.config
        if self.writer:
            plot(rows, plot_path, f"{c.variant}: {c.protocol} protocol, {c.framework}, {c.epochs} epochs "
                 f"({self.env['device']})", c.threshold, {lr: report.boundary(lr) for lr in c.learning_rates})
        return report


def dataset_fingerprint(dataset) -> str:
    """sha256 of the images and labels a sweep trains and tests on (after --limit-train/test): what
    identifies its data in a results row, wherever the files lay."""
    digest = hashlib.sha256()
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def boundary_search(trains: Callable[[int], bool], max_depth: int) -> tuple[int | None, int | None]:
    """The sweep's search, asking `trains(k)` (most seeds train at depth k) in its order: grow k
    geometrically (3, 6, 12, ...) until most seeds fail, then bisect on multiples of 3. Growth is
    capped at the largest multiple of 3 within `max_depth`, which is itself tried; with max_depth 150
    the search goes 96, 150 and bisects, rather than stop at 96. Returns (deepest k found to train,
    shallowest k found not to), None where there is none: every k it passed trains and every k it
    failed does not, so this is also the evaluated depths' boundary."""
    deepest_pass, shallowest_fail = None, None
    top = max_depth // 3 * 3
    depth = 3
    while True:
        if trains(depth):
            deepest_pass = depth
            if depth >= top:
                return deepest_pass, None
            depth = min(2 * depth, top)
        else:
            shallowest_fail = depth
            break
    if deepest_pass is None:
        return None, shallowest_fail
    low, high = deepest_pass // 3, shallowest_fail // 3  # in units of 3 layers
    while high - low > 1:
        middle = (low + high) // 2
        if trains(3 * middle):
            low = middle
        else:
            high = middle
    return 3 * low, 3 * high


def run_sweep(config: SweepConfig, dataset, log=print, progress=None) -> SweepReport:
    """Run (or resume) one variant's sweep and write its results file and plot."""
    return Sweep(config.validate(), dataset, log, progress).run()
