"""The notebook's protocol (BatchNorm in eval mode from epoch 2) with one knob turned at a time:
what makes a BatchNorm net survive, or not, its first eval-mode epoch.

    python experiments/eval_mode_collapse.py --depth 3 --seeds 0,1,2 [--lr 0.05] [--momentum 0.9]
        [--bn-eps 1e-5] [--last-batch keep|drop] [--running-stats ema|population]
        [--precision default|highest|tf32] [--dtype float32|float64] [--epochs 2]
        [--limit-train N] [--limit-test N] [--out FILE.jsonl] [--threads N]

One run per seed with torch_ref's model and the notebook's loop, from flaxdepth's initial weights
and batch order for the seed (flaxdepth.torch_runner), so that at the default knobs a run is
`python -m flaxdepth.sweep --framework torch --notebook-quirks`'s (tests/test_eval_mode_collapse.py).
The knobs, each the notebook's by default:
- --lr, --momentum: SGD's (the notebook's 0.05 for elu_bn and 0.9);
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
"""

# no `from __future__ import annotations`: dataclasses resolves string annotations through
# sys.modules, which a script loaded from its file (tests/conftest.py's load_experiment) is not in
import argparse
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


@dataclasses.dataclass(frozen=True)
class Knobs:
    """One run's protocol: the notebook's, with whatever this sets otherwise."""

    variant: str = "elu_bn"
    depth: int = 3
    seed: int = 0
    lr: float | None = None  # None: the variant's
    momentum: float = 0.9
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
        if not (self.lr is None or self.lr > 0) or not self.bn_eps > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, bn eps > 0 and 0 <= momentum < 1, got {self.lr}, {self.bn_eps}, "
                             f"{self.momentum}")
        return self

    @property
    def learning_rate(self) -> float:
        from flaxdepth import registry

        return self.lr if self.lr is not None else registry.get_variant(self.variant).lr


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


def train_run(knobs: Knobs, dataset) -> dict:
    """One run of the notebook's loop with these knobs; its results row (without the environment)."""
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
    train_errors, test_errors, eval_losses = [], [], []
    start = time.perf_counter()
    with torch_runner.torch_precision(knobs.precision):
        model.train()  # epoch 1 only: the notebook's test() leaves the model in eval mode after it
        for epoch in range(knobs.epochs):
            order = np.array(train.epoch_orders([knobs.seed], epoch, n)[0])
            if epoch == 0 and knobs.last_batch == "drop":
                order = order[: n // knobs.batch_size * knobs.batch_size]
            correct, seen, losses = 0, 0, []
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
            "first_eval_epoch_losses": eval_losses, "wall_s": time.perf_counter() - start}


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
    p.add_argument("--momentum", type=float, default=defaults.momentum)
    p.add_argument("--bn-eps", type=float, default=defaults.bn_eps)
    p.add_argument("--last-batch", default=defaults.last_batch, choices=LAST_BATCH)
    p.add_argument("--running-stats", default=defaults.running_stats, choices=RUNNING_STATS)
    p.add_argument("--precision", default=defaults.precision)
    p.add_argument("--dtype", default=defaults.dtype, choices=tuple(DTYPES))
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="folder of the MNIST IDX files (else $FLAXDEPTH_DATA)")
    p.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSONL file the rows are appended to (default: print only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flaxdepth import data

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        knobs = [Knobs(variant=args.variant, depth=args.depth, seed=int(seed), lr=args.lr, momentum=args.momentum,
                       bn_eps=args.bn_eps, last_batch=args.last_batch, running_stats=args.running_stats,
                       precision=args.precision, dtype=args.dtype, epochs=args.epochs).validate()
                 for seed in args.seeds.split(",")]
        dataset = data.subset(data.load_dataset("mnist", args.data_dir), args.limit_train, args.limit_test)
    except (ValueError, data.DataError) as error:
        print(f"eval_mode_collapse.py: error: {error}", file=sys.stderr)
        return 2
    env = environment()
    for k in knobs:
        row = {**train_run(k, dataset), "limit_train": args.limit_train, "limit_test": args.limit_test,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **env}
        errors = " ".join(f"{100 * a:.2f}/{100 * b:.2f}" for a, b in zip(row["train_errors"], row["test_errors"]))
        print(f"seed {k.seed}: train/test error per epoch {errors}, finite {row['finite']}, {row['wall_s']:.0f} s",
              flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
