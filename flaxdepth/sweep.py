"""python -m flaxdepth.sweep --variant NAME: the deepest depth at which a variant still trains.

Parses flags and calls the library (flaxdepth.search); see `--help`.
"""

from __future__ import annotations

import argparse
import sys

from flaxdepth import registry
from flaxdepth.search import DEFAULT_OUT, FRAMEWORKS, ConfigError, SweepConfig

PROG = "python -m flaxdepth.sweep"


def _numbers(kind, what):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of numbers, got {text!r}")
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", required=True, help=f"one of {', '.join(registry.VARIANT_NAMES)}, or 'all'")
    p.add_argument("--depths", type=_numbers(int, "--depths"), default=None,
                   help="evaluate these depths (multiples of 3, e.g. 3,6,9) instead of searching")
    p.add_argument("--lr", type=_numbers(float, "--lr"), default=None,
                   help="learning rate(s), trained side by side; default: the notebook's for the variant")
    p.add_argument("--seeds", type=int, default=3, help="seeds per depth (0, 1, ...)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.2, help="trainable: train or test error below this")
    p.add_argument("--max-depth", type=int, default=768, help="the search stops growing k here")
    p.add_argument("--dataset", default="mnist", help="mnist or fashion_mnist")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (else $FLAXDEPTH_DATA, the cache)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the results files and plots")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="test on the first N test images")
    p.add_argument("--notebook-quirks", action="store_true",
                   help="reproduce the notebook's missing model.train(): BatchNorm in eval mode after epoch 1")
    p.add_argument("--framework", default="jax", choices=FRAMEWORKS)
    p.add_argument("--fan", default="out", choices=registry.GLOROT_FANS,
                   help="Glorot-style sigma over fan-out (the notebook's) or fan-in")
    p.add_argument("--skip-parity", action="store_true", help="skip the quick check against torch_ref")
    p.add_argument("--quiet", action="store_true", help="no per-run epoch lines, only the summary")
    return p.parse_args(argv)


def configs(args) -> list[SweepConfig]:
    bad = [d for d in args.depths or () if d < 3 or d % 3]
    if bad:
        raise ConfigError(f"--depths must be positive multiples of 3 (3, 6, 9, ...), got {bad}")
    names = registry.VARIANT_NAMES if args.variant == "all" else (args.variant,)
    return [SweepConfig(
        variant=name, lrs=args.lr, seeds=args.seeds, first_seed=args.first_seed, depths=args.depths,
        max_depth=args.max_depth, epochs=args.epochs, batch_size=args.batch_size, threshold=args.threshold,
        dataset=args.dataset, data_dir=args.data_dir, out=args.out, limit_train=args.limit_train,
        limit_test=args.limit_test, notebook_quirks=args.notebook_quirks, framework=args.framework,
        fan=args.fan, skip_parity=args.skip_parity,
    ).validate() for name in names]


def main(argv=None) -> int:
    args = parse_args(argv)
    from flaxdepth.data import DataError

    try:
        sweep_configs = configs(args)  # every input checked before anything trains
        from flaxdepth import data

        dataset = data.subset(data.load_dataset(args.dataset, args.data_dir),
                              args.limit_train, args.limit_test)
    except (ConfigError, registry.UnknownVariantError, DataError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from flaxdepth import parity_check, search

    log = (lambda line: None) if args.quiet else tqdm.write
    for config in sweep_configs:
        if not config.skip_parity:
            try:
                print(parity_check.quick_parity(config.variant, dataset), flush=True)
            except parity_check.ParityError as error:
                print(f"{PROG}: error: {error}", file=sys.stderr)
                return 1
        report = search.run_sweep(config, dataset, log=log, progress=tqdm)
        print(report.table())
        print(f"results: {report.path}\nplot:    {report.plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
