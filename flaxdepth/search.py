"""Sweeps: train seeds x learning rates at each depth, find the deepest trainable depth, keep the
evidence. `run_sweep(config)` is the Python entry point (`flaxdepth.run_sweep`); `python -m
flaxdepth.sweep` is its command line."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import filelock
import jax
import numpy as np

from flaxdepth import data, registry, run_outputs, train, trainability
from flaxdepth.config import ROW_SCHEMA, ConfigError, SweepConfig, environment
from flaxdepth.data import Dataset
from flaxdepth.options import AUTO, EngineOptions
from flaxdepth.results import ResultsFile, atomic_write, figure, final_error, rows_frame

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
    """What a sweep found: its configuration, each evaluated depth's runs (rows as the results file
    holds them, the verdict recomputed), where the results file and plot are, the device."""

    config: SweepConfig
    outcomes: dict[int, DepthOutcome]
    path: Path
    plot_path: Path
    device: str = ""
    design: list[dict] = dataclasses.field(default_factory=list)  # the adaptive search's batches, in order

    @property
    def fit_path(self) -> Path:
        """The fits beside the results file, as JSON (`fits_json`)."""
        return self.path.with_suffix(".fit.json")

    def counts(self, lr: float):
        """trainability.counts of this lr's runs: (depths, trained, runs, diverged)."""
        return trainability.counts([row for row in self.rows() if row["lr"] == lr], self.config.threshold)

    @functools.cached_property
    def fits(self) -> dict[float, trainability.Fit]:
        """P(trains | depth) fitted per lr to this sweep's runs, the k50 prior over the depths a
        search may visit (3 to max_depth); fitted once (the table, figure and JSON read it)."""
        top = max(self.config.max_depth, *self.outcomes)
        return {lr: trainability.fit(*self.counts(lr)[:3], depth_range=(3, top)) for lr in self.config.learning_rates}

    def fits_json(self) -> dict:
        return {"variant": self.config.variant, "protocol": self.config.protocol, "framework": self.config.framework,
                "device": self.device, "threshold": self.config.threshold, "design": self.design,
                "fits": [{"lr": lr, "diverged": self.counts(lr)[3].tolist(), **fit.to_json()}
                         for lr, fit in self.fits.items()]}

    def rows(self) -> list[dict]:
        """Every run's row, depth by depth."""
        return [row for depth in sorted(self.outcomes) for row in self.outcomes[depth].rows]

    def to_dataframe(self):
        """A pandas DataFrame, one row per run (flaxdepth.results.rows_frame)."""
        return rows_frame(self.rows())

    def figure(self):
        """Final error against depth per seed and lr, the threshold and the boundary: a matplotlib
        Figure (the PNG beside the results file is this figure)."""
        c = self.config
        title = f"{c.variant}: {c.protocol} protocol, {c.framework}, {c.epochs} epochs" + (
            f" ({self.device})" if self.device else "")
        drawn = {}
        for lr, fit in self.fits.items():
            depths, trained, runs, _ = self.counts(lr)
            drawn[lr] = depths, trained, runs, trainability.jeffreys_interval(trained, runs), fit
        return figure(self.rows(), title, c.threshold, {lr: self.boundary(lr) for lr in c.learning_rates}, drawn)

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

    #: The per-seed table lists each seed's final error up to this many seeds, counts beyond.
    SEEDS_SHOWN = 6

    def table(self) -> str:
        """Per depth and lr each seed's final error and verdict (up to SEEDS_SHOWN seeds), the
        trained count, the majority-vote boundary; then per lr the fit: per-depth fractions with
        Jeffreys intervals, the fitted P with its band, k50 [95%] and the depth where P = 0.9."""
        lines = []
        seeds = sorted({row["seed"] for row in self.rows()})
        if len(seeds) > self.SEEDS_SHOWN:
            seeds = []
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
        for lr, fit in self.fits.items():
            lines.append(f"P(trains | depth), lr {lr:g} (trained: finite and error < {self.config.threshold:g}):")
            lines += trainability.fit_lines(self.counts(lr), fit)
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
        other_data = [row for row in rows if self._same_spec(row) and not self._same_data(row)]
        if other_data:
            self.log(f"  k={depth}: {len(other_data)} runs in {self.file.path} were trained on other images "
                     f"(another dataset checksum); they are not reused")
        return {(row["seed"], row["lr"]): row for row in rows if self._same_spec(row) and self._same_data(row)}

    def _same_data(self, row: dict) -> bool:
        """Whether a row was trained and tested on this sweep's images. A row without a checksum
        (the oldest rows) counts as full MNIST, as the configuration of its file said."""
        if row.get("dataset_sha256") is None:
            return self.config.dataset == "mnist" and self.config.run.full_dataset
        return row["dataset_sha256"] == self.dataset_sha256

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
            "train_images": len(self.dataset.train_labels), "test_images": len(self.dataset.test_labels),
            "config": {**c.as_row(), "engine": self._engine.as_dict()}, "spec": c.spec.fields(),
            "schema": ROW_SCHEMA,
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
                return train.train_replicas(c.run, depth, self._device_data, runs, on_epoch=on_epoch,
                                            mesh=self.mesh, options=self._engine,
                                            on_state=None if outputs is None else outputs.jax_state)
            from flaxdepth import torch_runner

            return torch_runner.train_torch_runs(c.run, depth, self.dataset, runs,
                                                 log=lambda line: log_epoch(f"  k={depth} {line}"),
                                                 precision=c.engine.precision,
                                                 on_model=None if outputs is None else outputs.torch_model)
        finally:
            if bar is not None:
                bar.close()

    def evaluate(self, depth: int, seeds: list[int] | None = None) -> DepthOutcome:
        """All (seed, lr) runs at this depth, `seeds` (default: the first batch's): finished ones
        read back, the others trained now."""
        c = self.config
        wanted = [(s, lr) for s in (c.seed_list if seeds is None else seeds) for lr in c.learning_rates]
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
        design = []
        if self.config.depths is not None:
            for depth in self.config.depths:
                self.evaluate(depth)
        elif self.config.search == "bisect":
            boundary_search(self.trains, self.config.max_depth)
        else:
            design = adaptive_search(self)
        path = self.file.path
        report = SweepReport(self.config, self.outcomes, path, path.with_suffix(".png"), self.env["device"], design)
        if self.writer:
            save_plot(report)
            fits = json.dumps(report.fits_json(), indent=1) + "\n"
            atomic_write(report.fit_path, lambda f: f.write(fits), "w")
        return report


def adaptive_search(sweep: Sweep) -> list[dict]:
    """The adaptive design; returns its batches ({"depth", "seeds"}) in order.

    First a bracket: batches of `seeds` seeds at 3, 6, 12, ... (multiples of 3 up to max_depth)
    until at most half of a depth's runs train. Then, until k50's 95% interval has hi / lo at most
    `target_ratio` or the next batch would pass `max_runs`, one batch at the depth that
    trainability.next_depth picks among the multiples of 3 up to twice the deepest depth tried.
    A batch at a depth already trained adds the next seeds there (first_seed + the runs it has), so
    every run is independent; and the design is a function of the rows, so a sweep stopped between
    batches resumes where it stood. It stops early where the data bound k50 on one side only and
    nothing is left to try: every run trained up to max_depth, or none at depth 3."""
    c = sweep.config
    lr = c.learning_rates[0]
    top = c.max_depth // 3 * 3
    seeds_at: dict[int, int] = {}
    design = []

    def batch(depth: int) -> None:
        done = seeds_at.get(depth, 0)
        seeds_at[depth] = done + c.seeds
        sweep.evaluate(depth, list(range(c.first_seed, c.first_seed + seeds_at[depth])))
        design.append({"depth": depth, "seeds": list(range(c.first_seed + done, c.first_seed + seeds_at[depth]))})

    def trained_share(depth: int) -> float:
        rows = sweep.outcomes[depth].rows
        return sum(row["trainable"] for row in rows) / len(rows)

    depth = 3
    while True:
        batch(depth)
        if trained_share(depth) <= 0.5 or depth >= top:
            break
        depth = min(2 * depth, top)
    while sum(seeds_at.values()) + c.seeds <= c.max_runs:
        rows = [row for outcome in sweep.outcomes.values() for row in outcome.rows if row["lr"] == lr]
        fit = trainability.fit(*trainability.counts(rows, c.threshold)[:3], depth_range=(3, top))
        if fit.censored == "above" and max(seeds_at) >= top or fit.censored == "below" and min(seeds_at) <= 3:
            break
        low, high = fit.k50_interval
        if fit.censored is None and high / low <= c.target_ratio:
            break
        reach = min(top, 2 * max(seeds_at))
        # A batch larger than next_depth can weigh (its predictive polynomial loses digits beyond
        # MAX_BATCH_RUNS runs) goes where its first MAX_BATCH_RUNS runs are expected to tell most.
        planned = min(c.seeds, trainability.MAX_BATCH_RUNS)
        batch(trainability.next_depth(fit, list(range(3, reach + 1, 3)), planned))
    return design


def save_plot(report: SweepReport) -> None:
    """The report's figure as the PNG beside its results file."""
    report.plot_path.parent.mkdir(parents=True, exist_ok=True)
    report.figure().savefig(report.plot_path, dpi=120)


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


def run_sweep(config: SweepConfig, dataset: Dataset | None = None, *, log: Callable[[str], None] = print,
              progress=None) -> SweepReport:
    """Run (or resume) one variant's sweep and write its results file and plot; returns its report.

    The images are those the configuration names: its dataset, loaded from `config.data_dir`
    (else $FLAXDEPTH_DATA, the cache), cut to `limit_train` / `limit_test`. An already loaded
    `dataset` saves the load and is cut the same way (a dataset already cut to the limits stays as
    it is). Unless `config.skip_parity`, the quick check against torch_ref runs first, as on the
    command line (a ParityError stops the sweep before it trains). `log` receives the epoch lines,
    `progress` is a tqdm-like factory for a bar per depth (None: no bar)."""
    config = config.validate().for_device(jax.default_backend())
    if dataset is None:
        dataset = data.load_dataset(config.dataset, config.data_dir)
    elif dataset.name != config.dataset:
        raise ConfigError(f"the configuration trains on {config.dataset}, the dataset given is {dataset.name}; "
                          f"pass its name as the configuration's dataset")
    dataset = data.subset(dataset, config.limit_train, config.limit_test)
    config.check_dataset(dataset)
    if not config.skip_parity:
        from flaxdepth import parity_check  # torch_ref and torch: only when the check runs

        report = parity_check.quick_parity(config.spec, dataset, options=config.engine)
        if jax.process_index() == 0:
            log(str(report))
    return Sweep(config, dataset, log, progress).run()
