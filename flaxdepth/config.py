"""The run configuration and the vocabulary every layer shares: what a run trains (`RunConfig`),
what a sweep asks for (`SweepConfig`), the one error type of bad input (`ConfigError`), where
results go, and the environment a results row records.

Configuration is data: frozen dataclasses, built once at the edge (a command line, a notebook
cell, experiments/sweeps.toml) and passed down as one object. A variant travels as its spec
(`registry.Variant`), resolved from its name once, here. This module imports neither JAX nor
PyTorch (`environment` asks JAX when it is called).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path

from flaxdepth import registry
from flaxdepth.data import DATASETS
from flaxdepth.options import EngineOptions

FRAMEWORKS = ("jax", "torch")
#: Where results go unless --out says otherwise: a folder of the user's, in the working directory.
DEFAULT_OUT = "flaxdepth-results"
#: Setting this environment variable changes the command line's default --out.
RESULTS_ENV = "FLAXDEPTH_RESULTS"
#: The version of a results row's layout: 2 added `schema`, `train_images` and `test_images`.
#: Rows without `schema` are version 1 (no `dataset_sha256` in the oldest of them).
ROW_SCHEMA = 2


class ConfigError(ValueError):
    """Bad input, reported in one line before any training starts."""


def _check_positive(flag: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run trains, whichever command trains it (a sweep, diagnose, the torch runner): the
    network, its learning rates, the training loop's settings and the data. How the engine
    computes is apart (`EngineOptions`); which seeds and depths a sweep visits is the sweep's.

    `spec` takes a registered variant's name or a spec object and holds the validated spec."""

    spec: registry.Variant
    lrs: tuple[float, ...] | None = None  # None: the variant's lr
    epochs: int = 3
    batch_size: int = 256
    notebook_quirks: bool = False  # the notebook's missing model.train(): BatchNorm in eval mode after epoch 1
    fan: str | None = None  # overrides the variant's init_fan
    dataset: str = "mnist"
    data_dir: str | None = None
    limit_train: int | None = None  # the first N training images
    limit_test: int | None = None  # the first N test images

    def __post_init__(self):
        object.__setattr__(self, "spec", registry.resolve(self.spec))  # UnknownVariantError lists the names
        if self.lrs is not None:
            object.__setattr__(self, "lrs", tuple(self.lrs))

    @property
    def variant(self) -> str:
        return self.spec.name

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.lrs or (self.spec.lr,)

    @property
    def protocol(self) -> str:
        """The notebook's BatchNorm modes ("faithful": its missing model.train()) or torch's usual ones."""
        return "faithful" if self.notebook_quirks else "corrected"

    @property
    def full_dataset(self) -> bool:
        """Whether the run trains and tests on every image of its dataset."""
        return self.limit_train is None and self.limit_test is None

    def validate(self) -> "RunConfig":
        if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
            raise ConfigError(f"learning rates must be positive numbers, got {list(self.lrs)}")
        _check_positive("--epochs", self.epochs)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--limit-train", self.limit_train, allow_none=True)
        _check_positive("--limit-test", self.limit_test, allow_none=True)
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.fan is not None and self.fan not in registry.FANS:
            raise ConfigError(f"--fan must be one of {', '.join(registry.FANS)}, got {self.fan!r}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"--data-dir {self.data_dir} is not a folder; point it at the folder "
                              f"holding the four IDX files")
        return self


#: How a sweep without --depths chooses its depths: "adaptive" (flaxdepth.trainability's fit and
#: next_depth, until k50's interval is narrow enough or the run budget is spent) or "bisect" (grow
#: geometrically until most seeds fail, then bisect on multiples of 3: a majority vote per depth).
SEARCHES = ("adaptive", "bisect")
#: (seeds a batch, run budget) by device: on a CPU a batch of 3 seeds at a few dozen layers costs
#: minutes, and 30 runs are about what the bisection spends (7-8 depths of 3); on an accelerator the
#: seeds of a batch are one vmapped program, so 16 cost about what 3 do, and 160 are 10 batches.
SEARCH_DEFAULTS = {"cpu": (3, 30), "accelerator": (16, 160)}

#: The fields of RunConfig that SweepConfig and DiagnoseConfig take as keywords (all but the spec).
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "spec")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; stored with every result row. The stable Python entry
    point: keyword fields, of which `variant` and RUN_FIELDS make up the runs' `RunConfig`
    (`.run`), with RunConfig's defaults."""

    variant: str | registry.Variant
    lrs: tuple[float, ...] | None = RunConfig.lrs
    seeds: int | None = None  # seeds per depth (a batch); None: SEARCH_DEFAULTS for the device (resolved)
    first_seed: int = 0
    depths: tuple[int, ...] | None = None  # None: search (`search`)
    max_depth: int = 768
    search: str = "adaptive"  # SEARCHES
    target_ratio: float = 1.5  # the adaptive search stops when k50's 95% interval has hi / lo at most this
    max_runs: int | None = None  # the adaptive search's run budget; None: SEARCH_DEFAULTS for the device
    epochs: int = RunConfig.epochs
    batch_size: int = RunConfig.batch_size
    threshold: float = 0.2
    dataset: str = RunConfig.dataset
    data_dir: str | None = RunConfig.data_dir
    out: str = DEFAULT_OUT
    limit_train: int | None = RunConfig.limit_train
    limit_test: int | None = RunConfig.limit_test
    notebook_quirks: bool = RunConfig.notebook_quirks
    framework: str = "jax"
    fan: str | None = RunConfig.fan
    skip_parity: bool = False  # the quick check against torch_ref before the first depth (flaxdepth.parity_check)
    engine: EngineOptions = EngineOptions()  # how the engine computes (flaxdepth.options)
    save_weights: bool = False  # each run's final weights beside the results file (flaxdepth.run_outputs)
    diagnostics: bool = False  # a per-layer summary at init and at the end in each row (flaxdepth.run_outputs)
    probe_size: int = 64  # the diagnostics' probe batch: the first probe_size test images (each run measures twice)
    # What the runs train, made from the fields above; carried by dataclasses.replace, so that a
    # spec given as an object (not registered) survives a replaced field.
    run: RunConfig | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        name = self.variant.name if isinstance(self.variant, registry.Variant) else self.variant
        spec = self.run.spec if self.run is not None and self.run.variant == name else self.variant
        run = RunConfig(spec, **{field: getattr(self, field) for field in RUN_FIELDS})
        object.__setattr__(self, "run", run)
        object.__setattr__(self, "variant", run.variant)  # the name, in rows and file names
        for key in ("lrs", "depths"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(getattr(self, key)))

    def for_device(self, platform: str) -> "SweepConfig":
        """The configuration with `seeds` and `max_runs` resolved for a JAX platform ("cpu", "gpu", ...)."""
        seeds, max_runs = SEARCH_DEFAULTS["cpu" if platform == "cpu" else "accelerator"]
        return dataclasses.replace(self, seeds=self.seeds or seeds, max_runs=self.max_runs or max(max_runs, self.seeds or 0))

    def validate(self) -> "SweepConfig":
        self.run.validate()
        _check_positive("--seeds", self.seeds, allow_none=True)
        _check_positive("--probe-size", self.probe_size)
        _check_positive("--max-runs", self.max_runs, allow_none=True)
        if self.search not in SEARCHES:
            raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if not self.target_ratio > 1:
            raise ConfigError(f"--target-ratio is k50's interval hi / lo, more than 1, got {self.target_ratio}")
        if None not in (self.seeds, self.max_runs) and self.max_runs < self.seeds:
            raise ConfigError(f"--max-runs {self.max_runs} is less than one batch of --seeds {self.seeds}")
        if self.depths is None and self.search == "adaptive" and len(self.learning_rates) > 1:
            raise ConfigError("the adaptive search fits one learning rate; give one --lr, or --depths to train "
                              "several side by side")
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
        if self.framework not in FRAMEWORKS:
            raise ConfigError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        if not isinstance(self.engine, EngineOptions):
            raise ConfigError(f"engine must be an EngineOptions, got {type(self.engine).__name__}")
        return self

    def check_dataset(self, dataset) -> None:
        """What only the loaded dataset can tell: enough test images for the diagnostics' probe."""
        if self.diagnostics and self.probe_size > len(dataset.test_labels):
            raise ConfigError(f"--probe-size {self.probe_size} is more than the {len(dataset.test_labels)} test "
                              f"images; lower --probe-size or raise --limit-test")

    @property
    def spec(self) -> registry.Variant:
        """The variant's spec, resolved once when the configuration was made."""
        return self.run.spec

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.run.learning_rates

    @property
    def seed_list(self) -> list[int]:
        """The first batch's seeds (`seeds` resolved: `for_device`)."""
        if self.seeds is None:
            raise ConfigError("seeds is not resolved for a device: SweepConfig.for_device(platform)")
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def runs_per_depth(self) -> int:
        """Models trained side by side at each depth (a batch): seeds x learning rates."""
        return len(self.seed_list) * len(self.learning_rates)

    @property
    def protocol(self) -> str:
        return self.run.protocol

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
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}
        row["engine"] = self.engine.as_dict()
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
    import jax

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {"device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count(),
            "process_count": jax.process_count(), "host": platform.node(), "versions": versions}
