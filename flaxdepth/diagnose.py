"""Why a depth fails: per-layer signal diagnostics of one training run.

`python -m flaxdepth.diagnose --variant NAME --depth K` trains one run with the sweep's protocol
(flaxdepth.train: initial weights, batch order, SGD momentum, BatchNorm modes) step by step, and
records flaxdepth.measure's per-layer diagnostics at the requested steps on a fixed probe batch,
the first `probe_size` test images, with BatchNorm in the mode training uses from that step on:
`diagnostics.json` and two PNGs in `--out`. `--framework torch` trains and measures torch_ref's
model (torch_ref.diagnose) with the same initial weights and batches.

What each measured key means: flaxdepth.measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from flaxdepth import cli, data, registry
from flaxdepth.config import DEFAULT_OUT, FRAMEWORKS, RESULTS_ENV, RUN_FIELDS, ConfigError, RunConfig, environment, \
    portable_path
from flaxdepth.measure import check_probe_fits, layer_diagnostics
from flaxdepth.options import EngineOptions

PROG = "python -m flaxdepth.diagnose"

# ------------------------------------------------------------------------------ one run, step by step


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """One diagnosed run: what it trains (`run`, with one learning rate), its depth and seed, the
    steps at which to measure and the probe batch; stored in diagnostics.json."""

    run: RunConfig
    depth: int
    seed: int = 0
    steps: tuple[str, ...] = ("0", "10", "100", "epoch")  # step numbers, "epoch" (every end), "epochN"
    framework: str = "jax"
    # the first probe_size test images; more than a sweep's (SweepConfig.probe_size), which
    # measures every run twice
    probe_size: int = 256
    out: str | None = None  # None: default_out()
    engine: EngineOptions = EngineOptions()

    def validate(self) -> "DiagnoseConfig":
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < registry.NUM_STAGES:
            raise ConfigError(f"--depth must be an integer of at least {registry.NUM_STAGES}, got {self.depth!r}")
        self.run.validate()
        if len(self.run.learning_rates) != 1:
            raise ConfigError(f"a diagnosed run trains at one learning rate, got {list(self.run.learning_rates)}")
        if self.framework not in FRAMEWORKS:
            raise ConfigError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        if self.probe_size < 1:
            raise ConfigError(f"--probe-size must be at least 1, got {self.probe_size}")
        parse_steps(self.steps, self.run.epochs)
        return self

    @property
    def spec(self) -> registry.Variant:
        return self.run.spec

    @property
    def variant(self) -> str:
        return self.run.variant

    @property
    def learning_rate(self) -> float:
        return self.run.learning_rates[0]

    def default_out(self) -> Path:
        return (Path(os.environ.get(RESULTS_ENV) or DEFAULT_OUT) / "diagnostics"
                / f"{self.variant}_k{self.depth}_{self.framework}_{self.run.protocol}_seed{self.seed}")

    def as_dict(self) -> dict:
        """As diagnostics.json stores it, one flat dict: paths as config.portable_path writes them
        (no private paths)."""
        run = {name: getattr(self.run, name) for name in RUN_FIELDS if name != "lrs"}
        data = {"variant": self.variant, "depth": self.depth, "steps": list(self.steps), "seed": self.seed,
                "lr": None if self.run.lrs is None else self.run.lrs[0], **run, "framework": self.framework,
                "probe_size": self.probe_size, "out": self.out, "engine": self.engine.as_dict()}
        for key in ("out", "data_dir"):
            data[key] = None if data[key] is None else portable_path(data[key])
        return data


_EPOCH_STEP = re.compile(r"epoch(\d*)")


def parse_steps(tokens, epochs: int) -> tuple[str, ...]:
    """The --steps tokens, checked: step numbers >= 0, "epoch", or "epochN" with 1 <= N <= epochs."""
    tokens = tuple(str(token).strip() for token in tokens)
    if not tokens or any(not token for token in tokens):
        raise ConfigError(f"--steps takes a comma-separated list of step numbers, 'epoch' or 'epochN', got "
                          f"{','.join(tokens)!r}")
    for token in tokens:
        match = _EPOCH_STEP.fullmatch(token)
        if token.isdigit() or (match and not match.group(1)):
            continue
        if match and 1 <= int(match.group(1)) <= epochs:
            continue
        what = f"epochs are 1 to {epochs}" if match else "use step numbers (0, 10, ...), 'epoch' or 'epochN'"
        raise ConfigError(f"--steps: {token!r} is not a step of this run; {what}")
    return tokens


def resolve_steps(tokens, epochs: int, steps_per_epoch: int) -> list[int]:
    """The step numbers (SGD steps taken) that `tokens` name, sorted, with 0 (initialization)
    always among them; "epoch" is the end of every epoch, "epochN" the end of epoch N."""
    last = epochs * steps_per_epoch
    steps = {0}
    for token in parse_steps(tokens, epochs):
        if token == "epoch":
            steps.update(steps_per_epoch * (epoch + 1) for epoch in range(epochs))
        elif token.startswith("epoch"):
            steps.add(steps_per_epoch * int(token.removeprefix("epoch")))
        elif int(token) > last:
            raise ConfigError(f"--steps: step {token} is past the run's end ({epochs} epochs of {steps_per_epoch} "
                              f"steps: step {last}); add --epochs")
        else:
            steps.add(int(token))
    return sorted(steps)


@dataclasses.dataclass(frozen=True)
class Probe:
    """The fixed batch every measurement uses."""

    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray

    def describe(self) -> str:
        return f"the first {len(self.labels)} test images"


#: record(step, bn_train, measured) stores one step's {"loss", "layers"}.
Recorder = Callable[[int, bool, dict], None]


def _bn_train_at(config: DiagnoseConfig, step: int, steps_per_epoch: int) -> bool:
    """The BatchNorm mode training uses from `step` on (the mode of the epoch its next step is in)."""
    from flaxdepth import train

    return train.bn_train_mode(step // steps_per_epoch, config.run.notebook_quirks, config.spec)


def train_jax(config: DiagnoseConfig, dataset, probe: Probe, steps: list[int], record: Recorder,
              on_step: Callable[[], None], log: Callable[[str], None]) -> list[dict]:
    """Train the run with flaxdepth's engine one jitted step at a time (its train_step, batch order,
    initial weights and BatchNorm modes), calling `record` at `steps`; returns the completed epochs'
    {"epoch", "train_error", "test_error"}."""
    import jax
    import jax.numpy as jnp

    from flaxdepth import train

    spec, n, b = config.spec, len(dataset.train_labels), config.run.batch_size
    steps_per_epoch = -(-n // b)
    model, init, _, _ = train.compiled_functions(spec, config.depth, b, config.run.fan, config.engine)
    replicas = init(np.asarray([config.seed], np.int32), np.asarray([config.learning_rate], jnp.result_type(float)))
    state = jax.tree.map(lambda a: a[0], replicas)
    device_data = train.DeviceData.put(dataset)

    @functools.partial(jax.jit, static_argnames=("size", "bn_train"))
    def step_fn(state, data, order, start, size, bn_train):
        # the batch's start traced, its size static: one program for every full batch
        indices = jax.lax.dynamic_slice_in_dim(order, start, size)
        return train.train_step(model, state, data.train_images[indices], data.train_labels[indices], bn_train)

    test_fn = jax.jit(lambda state, data: train.test_error(model, state, data, b))
    images, labels = train.normalize(probe.images), probe.labels.astype(np.int32)

    def measure(step):
        bn_train = _bn_train_at(config, step, steps_per_epoch)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        record(step, bn_train, layer_diagnostics(spec, config.depth, variables, images, labels, bn_train,
                                                 config.run.fan, config.engine))

    step, epochs = 0, []
    measure(0)
    for epoch in range(-(-steps[-1] // steps_per_epoch)):
        order = train.epoch_orders([config.seed], epoch, n)[0]
        bn_train = train.bn_train_mode(epoch, config.run.notebook_quirks, spec)
        correct = 0
        for start in range(0, n, b):
            if step == steps[-1]:
                break
            state, metrics = step_fn(state, device_data, order, start, min(b, n - start), bn_train)
            correct += metrics["correct"]
            step += 1
            on_step()
            if step in steps:
                measure(step)
        else:
            train_error, test_error = 1 - float(correct) / n, float(test_fn(state, device_data))
            epochs.append({"epoch": epoch + 1, "train_error": train_error, "test_error": test_error})
            log(train.notebook_log_line(epoch, config.run.epochs, train_error, test_error))
    return epochs


class _MeasuringLoader:
    """Batches of flaxdepth.torch_runner's epoch orders, none past step `last`; after each step
    (when the training loop asks for the next batch) `on_step()` and `measure(steps done)`:
    torch_ref's own training loop, observed between its steps."""

    def __init__(self, loader, last: int, measure: Callable[[int], None], on_step: Callable[[], None]):
        self.loader, self.last, self.measure, self.on_step = loader, last, measure, on_step
        self.step = 0

    def __iter__(self):  # a generator, as EpochOrderLoader's: the epoch starts when iteration does
        for batch in self.loader:
            if self.step == self.last:
                return
            yield batch
            self.step += 1
            self.on_step()
            self.measure(self.step)


def train_torch(config: DiagnoseConfig, dataset, probe: Probe, steps: list[int], record: Recorder,
                on_step: Callable[[], None], log: Callable[[str], None]) -> list[dict]:
    """train_jax's run with torch_ref's model and the notebook's training loop (torch_ref.training),
    as `--framework torch` sweeps train it (flaxdepth.torch_runner): flaxdepth's initial weights
    for the seed and its batch order."""
    import torch

    import torch_ref
    from flaxdepth import torch_runner, train
    from torch_ref import diagnose as torch_diagnose
    from torch_ref import training

    spec, n, b = config.spec, len(dataset.train_labels), config.run.batch_size
    steps_per_epoch = -(-n // b)
    epochs_run = -(-steps[-1] // steps_per_epoch)
    complete_epochs = steps[-1] // steps_per_epoch  # the last one run may stop early
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as torch_runner's
    model = torch_ref.build(spec, config.depth, fan=config.run.fan)
    torch_ref.load_weights(model, torch_runner.initial_state_dict(spec, config.depth, config.seed, config.run.fan, b))
    model.to(device)
    images = training.normalize(probe.images).to(device)
    labels = torch.from_numpy(probe.labels.astype(np.int64)).to(device)

    def measure(step):
        if step in steps:
            bn_train = _bn_train_at(config, step, steps_per_epoch)
            record(step, bn_train, torch_diagnose.layer_diagnostics(model, images, labels, bn_train))

    lines = []

    def epoch_log(line):
        lines.append(line)
        if len(lines) <= complete_epochs:  # a partial epoch's error is not the protocol's
            log(line)

    orders = [np.array(train.epoch_orders([config.seed], epoch, n)[0]) for epoch in range(epochs_run)]
    loader = _MeasuringLoader(torch_runner.EpochOrderLoader(training.normalize(dataset.train_images),
                                                            dataset.train_labels, orders, b),
                              steps[-1], measure, on_step)
    test_loader = list(training.batches(training.normalize(dataset.test_images), dataset.test_labels,
                                        np.arange(len(dataset.test_labels)), b))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=train.MOMENTUM)
    criterion = torch.nn.CrossEntropyLoss()
    with torch_runner.torch_precision(config.engine.precision):
        measure(0)
        if epochs_run == 0:
            return []
        if spec.multihead:  # the notebook's multihead loop always calls model.train()
            errors = training.train_multihead(epochs_run, model, criterion, optimizer, loader, test_loader,
                                              log=epoch_log)
        else:
            errors = training.train(epochs_run, model, criterion, optimizer, loader, test_loader,
                                    notebook_quirks=config.run.notebook_quirks, log=epoch_log)
    return [{"epoch": epoch + 1, "train_error": train_error, "test_error": test_error}
            for epoch, (train_error, test_error) in enumerate(zip(*errors)) if epoch < complete_epochs]


def run(config: DiagnoseConfig, dataset, log: Callable[[str], None] = print, progress=None) -> dict:
    """Train and measure one run; returns diagnostics.json's content. `dataset` is whole: the probe
    is its first test images, training and testing use `config.run.limit_train` / `limit_test` of it.
    `progress`: a tqdm-like factory for a bar of steps."""
    config = config.validate()
    if config.probe_size > len(dataset.test_labels):
        raise ConfigError(f"--probe-size {config.probe_size} is more than the {len(dataset.test_labels)} test images")
    probe = Probe(dataset.test_images[:config.probe_size], dataset.test_labels[:config.probe_size])
    if config.framework == "jax":
        import jax

        from flaxdepth import train

        # record the rematerialization the run trains with, not "auto"
        config = dataclasses.replace(config, engine=train.step_options(config.engine, config.spec, config.depth,
                                                                       config.run.batch_size))
        check_probe_fits(config.spec, config.depth, train.normalize(probe.images), probe.labels.astype(np.int32),
                         train.available_memory(jax.devices()[0]), config.run.fan, config.engine)
    trained = data.subset(dataset, config.run.limit_train, config.run.limit_test)
    steps_per_epoch = -(-len(trained.train_labels) // config.run.batch_size)
    steps = resolve_steps(config.steps, config.run.epochs, steps_per_epoch)
    records = []
    bar = progress(total=steps[-1], desc=f"{config.variant} k={config.depth} ({config.framework})", unit="step",
                   leave=False) if progress and steps[-1] else None

    def record(step, bn_train, measured):
        records.append({"step": step, "epoch": step / steps_per_epoch, "bn_train": bn_train, **measured})

    trainer = train_jax if config.framework == "jax" else train_torch
    try:
        epochs = trainer(config, trained, probe, steps, record, bar.update if bar else (lambda: None), log)
    finally:
        if bar is not None:
            bar.close()
    return {"config": config.as_dict(), "spec": config.spec.fields(), "protocol": config.run.protocol,
            "learning_rate": config.learning_rate, "steps_per_epoch": steps_per_epoch,
            "probe": probe.describe(), "environment": environment(), "epochs": epochs, "steps": records}


# ------------------------------------------------------------------------------ figures


def _stage_starts(layers: list[dict]) -> list[int]:
    return [i for i, layer in enumerate(layers) if layer["layer"] == 0 and i > 0]


def _log10(values) -> np.ndarray:
    """log10 of positive finite values; NaN (drawn blank) elsewhere: zeros, nulls, a diverged run."""
    array = np.array([np.nan if v is None else v for v in values], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(array) & (array > 0), np.log10(np.where(array > 0, array, 1)), np.nan)


def heatmaps_figure(diagnostics: dict):
    """Conv layer x recorded step: log10 activation variance and log10 output-gradient norm, as a
    matplotlib Figure (which Jupyter shows); `write` saves it as heatmaps.png."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is
    from matplotlib.ticker import MaxNLocator

    records = diagnostics["steps"]
    layers = records[0]["layers"]
    height = min(12.0, 3.2 + 0.12 * len(layers))
    fig = Figure(figsize=(max(8.0, 4 + 0.6 * len(records)), height))
    axes = fig.subplots(1, 2, sharey=True)
    labels = [f"{r['step']}" + ("\nepoch %d" % round(r["epoch"]) if r["step"] and float(r["epoch"]).is_integer()
                                else "") for r in records]
    for ax, key, title in zip(axes, ("activation_variance", "output_grad_norm"),
                              ("log10 activation variance", "log10 |dloss / d layer output|")):
        # gray cells: zero or not finite (a dead or diverged layer)
        grid = np.stack([_log10([layer[key] for layer in r["layers"]]) for r in records], axis=1)
        # rows at 1..L, as the signal-propagation plot numbers the layers
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=colormaps["viridis"].with_extremes(
            bad="lightgray"), extent=(-0.5, len(records) - 0.5, len(layers) + 0.5, 0.5))
        fig.colorbar(image, ax=ax)
        for start in _stage_starts(layers):
            ax.axhline(start + 0.5, color="white", lw=1)
        ax.set_xticks(range(len(records)), labels, fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("conv layer (white lines: stage boundaries)")
    c = diagnostics["config"]
    fig.suptitle(f"{c['variant']} k={c['depth']}, {diagnostics['protocol']} protocol, {c['framework']}, seed {c['seed']}; "
                 f"{diagnostics['probe']}; gray: zero or not finite", fontsize=10)
    fig.tight_layout()
    return fig


def signal_propagation_figure(diagnostics: dict):
    """Brock et al.'s signal-propagation plot at initialization: per layer, the average channel
    squared mean and variance of the output and the residual branch's variance, log scale; a
    matplotlib Figure (`write` saves it as signal_propagation.png)."""
    from matplotlib.figure import Figure

    layers = diagnostics["steps"][0]["layers"]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    index = np.arange(1, len(layers) + 1)
    for key, label in (("avg_channel_squared_mean", "average channel squared mean"),
                       ("avg_channel_variance", "average channel variance"),
                       ("residual_variance", "residual branch variance")):
        if not any(key in layer for layer in layers):  # residual_variance: residual variants only
            continue
        values = _log10([layer.get(key) for layer in layers])
        shown = np.isfinite(values)
        if shown.any():
            ax.plot(index[shown], 10 ** values[shown], marker="o", ms=3, lw=1, label=label)
        else:
            ax.plot([], [], label=f"{label}: zero at every layer")
    for start in _stage_starts(layers):
        ax.axvline(start + 0.5, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("conv layer (network order; dotted: stage boundaries)")
    ax.set_ylabel("value on the probe batch")
    c = diagnostics["config"]
    ax.set_title(f"{c['variant']} k={c['depth']} at initialization ({c['framework']}, seed {c['seed']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(diagnostics: dict, out: Path) -> dict[str, Path]:
    """diagnostics.json and its figures in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "diagnostics.json", "heatmaps": out / "heatmaps.png",
             "signal_propagation": out / "signal_propagation.png"}
    paths["json"].write_text(json.dumps(diagnostics, indent=1, allow_nan=False) + "\n")
    heatmaps_figure(diagnostics).savefig(paths["heatmaps"], dpi=110)
    signal_propagation_figure(diagnostics).savefig(paths["signal_propagation"], dpi=120)
    return paths


# ------------------------------------------------------------------------------ command line


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help="a registered variant (python -m flaxdepth.variants lists them)")
    cli.add_variants_file_argument(p)
    p.add_argument("--depth", type=int, required=True, help="depth k (k // 3 conv layers per stage)")
    p.add_argument("--steps", default=",".join(DiagnoseConfig.steps),
                   help="when to measure, in SGD steps taken: numbers, 'epoch' (every epoch's end), 'epochN' "
                        "(the end of epoch N); step 0 (initialization) always")
    p.add_argument("--seed", type=int, default=DiagnoseConfig.seed,
                   help="the run's seed (initial weights and batch order, as the sweep's)")
    p.add_argument("--framework", default=DiagnoseConfig.framework, choices=FRAMEWORKS)
    cli.add_run_arguments(p, several_lrs=False)
    p.add_argument("--probe-size", type=int, default=DiagnoseConfig.probe_size,
                   help="measure on the first N test images")
    p.add_argument("--out", default=DiagnoseConfig.out,
                   help=f"folder of diagnostics.json and the figures (default: ${RESULTS_ENV}, else ./{DEFAULT_OUT}, "
                        f"/diagnostics/VARIANT_kK_FRAMEWORK_PROTOCOL_seedS)")
    cli.add_engine_arguments(p)
    return p.parse_args(argv)


def config_from_args(args) -> DiagnoseConfig:
    cli.load_variants_files(args.variants_file)
    return DiagnoseConfig(
        run=RunConfig(args.variant, **cli.run_fields(args)), depth=args.depth, seed=args.seed,
        steps=tuple(args.steps.split(",")), framework=args.framework, probe_size=args.probe_size, out=args.out,
        engine=cli.engine_options(args)).validate()


@cli.command(PROG)
def main(argv=None) -> int:
    config = config_from_args(parse_args(argv))
    dataset = data.load_dataset(config.run.dataset, config.run.data_dir)
    from tqdm import tqdm

    diagnostics = run(config, dataset, log=tqdm.write, progress=tqdm)
    paths = write(diagnostics, Path(config.out) if config.out else config.default_out())
    print("\n".join(f"{name + ':':<19} {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
