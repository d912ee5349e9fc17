"""The notebook's protocol (BatchNorm in eval mode from epoch 2) with one knob turned at a time:
what makes a BatchNorm net survive, or not, its first eval-mode epoch.

    python experiments/eval_mode_collapse.py --depth 3 --seeds 0,1,2 [--lr 0.05] [--eval-lr LR]
        [--momentum 0.9] [--reset-momentum] [--bn-eps 1e-5] [--last-batch keep|drop]
        [--running-stats ema|population] [--precision default|highest|tf32] [--dtype float32|float64]
        [--epochs 2] [--sharpness-iterations N] [--limit-train N] [--limit-test N] [--out FILE.jsonl]
        [--threads N]
    python experiments/eval_mode_collapse.py --plot FIGURE.png --out FILE.jsonl [--out FILE2.jsonl]

One run per seed with torch_ref's model and the notebook's loop, from flaxdepth's initial weights
and batch order for the seed (flaxdepth.torch_runner), so that at the default knobs a run is
`python -m flaxdepth.sweep --framework torch --notebook-quirks`'s (tests/test_eval_mode_collapse.py).
The knobs, each the notebook's by default:
- --lr, --momentum: SGD's (the notebook's 0.05 for elu_bn and 0.9); --eval-lr: the lr from the
  first eval-mode epoch on (epoch 1 trains at --lr); --reset-momentum: SGD's momentum buffers
  zeroed at the switch to eval mode, so that the first eval-mode step is the eval-mode gradient's;
- --bn-eps: every BatchNorm's eps (1e-5);
- --last-batch drop: epoch 1 (train mode, the epoch whose running statistics eval mode then uses)
  skips its partial last batch (60000 = 234 x 256 + 96), so the running statistics end on a full
  batch; "keep" trains on it, as the notebook's DataLoader does;
- --running-stats population: after epoch 1 the running statistics are replaced by the whole
  training set's (each batch's mean and unbiased variance, averaged; the weights as at the end of
  epoch 1): eval mode then normalizes with the population's statistics instead of an average
  weighted towards the last ten batches;
- --precision, --dtype: torch's arithmetic (flaxdepth.torch_runner.torch_precision; tf32 rounds the
  convolutions' operands) and float64.
Each run appends one JSON row: the knobs, per-epoch train and test errors, whether the weights
stayed finite, and the loss of every step of the first eval-mode epoch (null where not finite).

With --sharpness-iterations N the row also holds the sharpness at the switch: the largest
eigenvalue of the loss's Hessian with respect to the parameters, on the first batch of epoch 2,
with BatchNorm in train mode (batch statistics) and in eval mode (running statistics), by N steps of
power iteration on Hessian-vector products (torch's double backward, in the run's dtype, float32
convolutions whatever --precision), beside the stability limit of SGD with heavy-ball momentum on
a quadratic, 2 (1 + momentum) / lr: a direction curved more than that grows at every step; and
the eval-mode direction's share in each parameter (`eval_direction`, by state_dict name).

--plot draws the rows of the --out files instead of training: each setting's first eval-mode epoch
loss per step (one line per seed), and the test error after epoch 2 against the eval-mode sharpness
at the switch over the stability limit.
"""

# no `from __future__ import annotations`: dataclasses resolves string annotations through
# sys.modules, which a script loaded from its file (tests/conftest.py's load_experiment) is not in
import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
LAST_BATCH = ("keep", "drop")
RUNNING_STATS = ("ema", "population")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: The figure's loss axis ends here.
LOSS_SHOWN = 1e4


@dataclasses.dataclass(frozen=True)
class Knobs:
    """One run's protocol: the notebook's, with whatever this sets otherwise."""

    variant: str = "elu_bn"
    depth: int = 3
    seed: int = 0
    lr: float | None = None  # None: the variant's
    eval_lr: float | None = None  # from the first eval-mode epoch on; None: lr
    momentum: float = 0.9
    reset_momentum: bool = False
    bn_eps: float = 1e-5
    last_batch: str = "keep"
    running_stats: str = "ema"
    precision: str = "default"
    dtype: str = "float32"
    epochs: int = 2
    batch_size: int = 256

    def validate(self) -> "Knobs":
        from flaxdepth import registry
        from flaxdepth.options import PRECISIONS

        if not registry.get_variant(self.variant).batchnorm:
            raise ValueError(f"{self.variant} has no BatchNorm: eval mode changes nothing")
        choices = {"last_batch": LAST_BATCH, "running_stats": RUNNING_STATS, "precision": PRECISIONS,
                   "dtype": tuple(DTYPES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.epochs < 2:
            raise ValueError(f"--epochs must be at least 2 (eval mode starts in epoch 2), got {self.epochs}")
        if any(lr is not None and not lr > 0 for lr in (self.lr, self.eval_lr)) or not self.bn_eps > 0 \
                or not 0 <= self.momentum < 1:
            raise ValueError(f"need lrs > 0, bn eps > 0 and 0 <= momentum < 1, got lr {self.lr}, eval lr "
                             f"{self.eval_lr}, eps {self.bn_eps}, momentum {self.momentum}")
        return self

    @property
    def learning_rate(self) -> float:
        from flaxdepth import registry

        return self.lr if self.lr is not None else registry.get_variant(self.variant).lr

    @property
    def eval_learning_rate(self) -> float:
        return self.eval_lr if self.eval_lr is not None else self.learning_rate


def population_statistics(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to the mean over the training set's batches of the
    batch mean and unbiased variance, the weights fixed (torch's momentum=None cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def sharpness(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, train_mode: bool,
              iterations: int, seed: int = 0) -> float:
    """The largest eigenvalue of the Hessian of the cross-entropy on (images, labels) with respect to
    the parameters (the Rayleigh quotient after `iterations` power-iteration steps), BatchNorm in
    train or eval mode; on a copy, so that the model's running statistics stay as they are."""
    return sharpest_direction(model, images, labels, train_mode, iterations, seed)[0]


def sharpest_direction(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, train_mode: bool,
                       iterations: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    """`sharpness`, and its eigenvector's share in each parameter (squared entries summed per
    parameter name, summing to 1): which parameters the sharpest direction moves."""
    model = copy.deepcopy(model).train(train_mode)
    params = list(model.parameters())
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(images), labels), params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    eigenvalue, shares = float("nan"), {}
    for _ in range(iterations):
        norm = torch.sqrt(sum(v.square().sum() for v in vector))
        vector = [v / norm for v in vector]
        shares = {name: float(v.square().sum()) for (name, _), v in zip(model.named_parameters(), vector)}
        product = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
        eigenvalue = float(sum((h * v).sum() for h, v in zip(product, vector)))
        vector = [h.detach() for h in product]
    return eigenvalue, shares


def train_run(knobs: Knobs, dataset, sharpness_iterations: int = 0) -> dict:
    """One run of the notebook's loop with these knobs; its results row (without the environment).
    With `sharpness_iterations`, the sharpness at the switch (see the module docstring)."""
    from flaxdepth import torch_runner, train
    from torch_ref import build, training

    knobs = knobs.validate()
    dtype = DTYPES[knobs.dtype]
    images = training.normalize(dataset.train_images, dtype)
    test_loader = list(training.batches(training.normalize(dataset.test_images, dtype), dataset.test_labels,
                                        np.arange(len(dataset.test_labels)), knobs.batch_size))
    model = build(knobs.variant, knobs.depth).to(dtype=dtype)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in torch_runner.initial_state_dict(
        knobs.variant, knobs.depth, knobs.seed, batch_size=knobs.batch_size).items()})
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = knobs.bn_eps
    optimizer = torch.optim.SGD(model.parameters(), lr=knobs.learning_rate, momentum=knobs.momentum)
    n = len(dataset.train_labels)
    train_errors, test_errors, eval_losses, at_switch = [], [], [], None
    start = time.perf_counter()
    model.train()  # epoch 1 only: the notebook's test() leaves the model in eval mode after it
    for epoch in range(knobs.epochs):
        order = np.array(train.epoch_orders([knobs.seed], epoch, n)[0])
        if epoch == 0 and knobs.last_batch == "drop":
            order = order[: n // knobs.batch_size * knobs.batch_size]
        if epoch == 1:  # the switch: the notebook's test() has put the model in eval mode
            for group in optimizer.param_groups:
                group["lr"] = knobs.eval_learning_rate
            if knobs.reset_momentum:
                optimizer.state.clear()  # SGD starts its buffers again from the next gradient
            if sharpness_iterations:  # in float32 or float64: TF32's rounding has no second derivative
                first = order[: knobs.batch_size]
                batch = images[first], torch.as_tensor(dataset.train_labels[first]).long()
                with torch_runner.torch_precision("highest"):
                    at_switch = {"train": sharpness(model, *batch, True, sharpness_iterations)}
                    at_switch["eval"], at_switch["eval_direction"] = sharpest_direction(
                        model, *batch, False, sharpness_iterations)
                at_switch["stability_limit"] = 2 * (1 + knobs.momentum) / knobs.eval_learning_rate
        correct, seen, losses = 0, 0, []
        with torch_runner.torch_precision(knobs.precision):
            for x, y in training.batches(images, dataset.train_labels, order, knobs.batch_size):
                output = model(x)
                loss = torch.nn.functional.cross_entropy(output, y)
                correct += (output.argmax(1) == y).sum().item()
                seen += len(y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if epoch == 0 and knobs.running_stats == "population":
                population_statistics(model, images, knobs.batch_size)
            train_errors.append(1 - correct / seen)
            test_errors.append(training.test(model, test_loader))  # model.eval(), as the notebook's
        if epoch == 1:
            eval_losses = [loss if math.isfinite(loss) else None for loss in losses]
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    return {"knobs": dataclasses.asdict(knobs), "learning_rate": knobs.learning_rate,
            "train_errors": train_errors, "test_errors": test_errors, "finite": finite,
            "first_eval_epoch_losses": eval_losses, "sharpness_at_switch": at_switch,
            "wall_s": time.perf_counter() - start}


def setting(knobs: dict) -> str:
    """A row's knobs that differ from the notebook's, as a label ("notebook" when none do)."""
    defaults = dataclasses.asdict(Knobs())
    changed = [f"{name}={value}" for name, value in knobs.items()
               if name not in ("seed", "depth", "variant") and value != defaults[name]]
    return ", ".join(changed) or "notebook"


def plot(rows: list[dict], path: Path) -> None:
    """The figure of --plot (see the module docstring)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(setting(r["knobs"]) for r in rows))
    colors = {label: colormaps["tab20"](i % 20) for i, label in enumerate(labels)}
    fig = Figure(figsize=(13, 5.2))
    losses, errors = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    for r in rows:
        label, values = setting(r["knobs"]), r["first_eval_epoch_losses"]
        finite = [v for v in values if v is not None]
        first = r["knobs"]["seed"] == min(x["knobs"]["seed"] for x in rows if setting(x["knobs"]) == label)
        losses.plot(range(1, len(finite) + 1), finite, color=colors[label], lw=1, label=label if first else None)
        if len(finite) < len(values):  # the step after which the loss is not finite
            losses.plot(len(finite), finite[-1] if finite else 1, "x", color=colors[label], ms=6)
        sharp = r.get("sharpness_at_switch")
        if sharp:
            errors.plot(sharp["eval"] / sharp["stability_limit"], 100 * r["test_errors"][1],
                        "o" if r["finite"] else "x", color=colors[label], ms=6)
    losses.set_yscale("log")
    losses.set_xscale("log")
    losses.set_ylim(1e-3, LOSS_SHOWN)  # past this a run has diverged; float64 runs reach 1e260 first
    losses.set_xlabel("step of the first eval-mode epoch (x: the last finite loss)")
    losses.set_ylabel(f"training loss of the step's batch (shown up to {LOSS_SHOWN:g})")
    losses.legend(fontsize=7, ncol=2)
    errors.axvline(1, color="k", ls=":", lw=1)
    errors.set_xscale("log")
    errors.set_xlabel("eval-mode sharpness at the switch / 2 (1 + momentum) / lr")
    errors.set_ylabel("test error after epoch 2 (%; x: weights not finite)")
    for ax in (losses, errors):
        ax.grid(alpha=0.3, which="both")
    depths = sorted({r["knobs"]["depth"] for r in rows})
    fig.suptitle(f"{rows[0]['knobs']['variant']} k={', '.join(map(str, depths))}, the notebook's protocol with one "
                 f"knob changed (seeds {', '.join(str(s) for s in sorted({r['knobs']['seed'] for r in rows}))})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    import importlib.metadata

    return {"host": platform.node(), "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "versions": {p: importlib.metadata.version(p) for p in ("torch", "jax", "flax", "numpy")}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Knobs()
    p.add_argument("--variant", default=defaults.variant)
    p.add_argument("--depth", type=int, default=defaults.depth)
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    p.add_argument("--lr", type=float, default=None, help="default: the variant's")
    p.add_argument("--eval-lr", type=float, default=None, help="lr of the eval-mode epochs (default: --lr)")
    p.add_argument("--momentum", type=float, default=defaults.momentum)
    p.add_argument("--reset-momentum", action="store_true", help="zero SGD's momentum buffers at the switch")
    p.add_argument("--bn-eps", type=float, default=defaults.bn_eps)
    p.add_argument("--last-batch", default=defaults.last_batch, choices=LAST_BATCH)
    p.add_argument("--running-stats", default=defaults.running_stats, choices=RUNNING_STATS)
    p.add_argument("--precision", default=defaults.precision)
    p.add_argument("--dtype", default=defaults.dtype, choices=tuple(DTYPES))
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--sharpness-iterations", type=int, default=0,
                   help="measure the sharpness at the switch with this many power-iteration steps (0: not)")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="folder of the MNIST IDX files (else $FLAXDEPTH_DATA)")
    p.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, action="append",
                   help="JSONL file the rows are appended to (default: print only); with --plot, files to read")
    p.add_argument("--plot", default=None, help="draw the --out files' rows into this PNG instead of training")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flaxdepth import data

    if args.plot:
        if not args.out:
            print("eval_mode_collapse.py: error: --plot draws the rows of --out files; give one", file=sys.stderr)
            return 2
        plot([json.loads(line) for name in args.out for line in Path(name).read_text().splitlines() if line.strip()],
             Path(args.plot))
        return 0
    if args.out and len(args.out) > 1:
        print("eval_mode_collapse.py: error: training appends to one --out file", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        knobs = [Knobs(variant=args.variant, depth=args.depth, seed=int(seed), lr=args.lr, eval_lr=args.eval_lr,
                       momentum=args.momentum, reset_momentum=args.reset_momentum, bn_eps=args.bn_eps, last_batch=args.last_batch, running_stats=args.running_stats,
                       precision=args.precision, dtype=args.dtype, epochs=args.epochs).validate()
                 for seed in args.seeds.split(",")]
        dataset = data.subset(data.load_dataset("mnist", args.data_dir), args.limit_train, args.limit_test)
    except (ValueError, data.DataError) as error:
        print(f"eval_mode_collapse.py: error: {error}", file=sys.stderr)
        return 2
    env = environment()
    for k in knobs:
        row = {**train_run(k, dataset, args.sharpness_iterations), "limit_train": args.limit_train, "limit_test": args.limit_test,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **env}
        errors = " ".join(f"{100 * a:.2f}/{100 * b:.2f}" for a, b in zip(row["train_errors"], row["test_errors"]))
        sharp = row["sharpness_at_switch"]
        sharp = "" if sharp is None else (f", sharpness at the switch: train mode {sharp['train']:.3g}, eval mode "
                                          f"{sharp['eval']:.3g} (limit {sharp['stability_limit']:.3g})")
        print(f"seed {k.seed}: train/test error per epoch {errors}, finite {row['finite']}{sharp}, "
              f"{row['wall_s']:.0f} s", flush=True)
        if args.out:
            Path(args.out[0]).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out[0], "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
