"""What every flaxdepth command line shares: the parser whose errors are one line, the one-line
error exit, the flags of the run configuration (flaxdepth.config.RunConfig) and of the engine
options (flaxdepth.options.EngineOptions), and `--variants-file`. Defaults come from the
configuration objects' fields, so a command line and a Python caller get the same run."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable

from flaxdepth import registry
from flaxdepth.config import RUN_FIELDS, ConfigError, RunConfig
from flaxdepth.data import DATASETS, DataError
from flaxdepth.options import AUTO, PRECISIONS, REMATERIALIZATIONS, EngineOptions

#: Bad input: a command reports these in one line and exits with status 2, without a traceback.
USER_ERRORS = (ConfigError, registry.SpecError, DataError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a ConfigError: one line, exit status 2, like every other bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ConfigError(message)


def error_line(prog: str, error: BaseException) -> str:
    """`prog: error: message`, the message on one line."""
    return f"{prog}: error: {' '.join(str(error).split())}"


def command(prog: str, also: tuple[type[BaseException], ...] = ()) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A command line's `main`: bad input (USER_ERRORS, and the command's own `also`) ends it with
    one line on stderr and status 2, and a reader that stops reading (`... | head`) with status 1,
    neither with a traceback."""
    errors = (*USER_ERRORS, *also)

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        @quiet_on_closed_pipe
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except errors as error:
                print(error_line(prog, error), file=sys.stderr)
                return 2

        return wrapped

    return decorate


def quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, ending with status 1 and no traceback when its reader stops reading (`... | head`),
    as Python's documentation on SIGPIPE advises."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()  # a block-buffered pipe fails here, not at the interpreter's exit
            return status
        except BrokenPipeError:
            # the interpreter flushes stdout once more at exit: point it at /dev/null so that
            # flush cannot fail a second time
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return wrapped


def numbers(kind, flag: str):
    """An argparse type: a comma- or space-separated list of `kind`, as a tuple."""
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a comma-separated list of numbers, got {text!r}")
    return parse


def add_variants_file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants-file", action="append", default=[], metavar="FILE",
                   help="TOML file of your own variants ([variants.NAME] tables, experiments/variants.toml "
                        "has examples); repeat for several files")


def load_variants_files(paths: list[str]) -> list[str]:
    """Register every variant of the files (a SpecError names the file, variant and field);
    returns the declared names in order."""
    return [name for path in paths for name in registry.load_variants(path)]


def add_run_arguments(p: argparse.ArgumentParser, several_lrs: bool = True) -> None:
    """The flags of RunConfig but the variant (each command names its own --variant)."""
    if several_lrs:
        p.add_argument("--lr", type=numbers(float, "--lr"), default=RunConfig.lrs,
                       help="learning rate(s), trained side by side; default: the variant's (the notebook's)")
    else:
        p.add_argument("--lr", type=float, default=RunConfig.lrs, help="learning rate; default: the variant's")
    p.add_argument("--epochs", type=int, default=RunConfig.epochs)
    p.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    p.add_argument("--notebook-quirks", action="store_true", default=RunConfig.notebook_quirks,
                   help="reproduce the notebook's missing model.train(): BatchNorm in eval mode after epoch 1")
    p.add_argument("--fan", default=RunConfig.fan, choices=registry.FANS,
                   help="fan of the glorot / he / lecun sigma, overriding the variant's init_fan (the "
                        "notebook's Glorot-style sigma is over fan-out)")
    p.add_argument("--dataset", default=RunConfig.dataset, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=RunConfig.data_dir,
                   help="folder of the IDX files (else $FLAXDEPTH_DATA, the cache)")
    p.add_argument("--limit-train", type=int, default=RunConfig.limit_train, help="train on the first N training images")
    p.add_argument("--limit-test", type=int, default=RunConfig.limit_test, help="test on the first N test images")


def run_fields(args: argparse.Namespace) -> dict:
    """The RunConfig fields (but the spec) that add_run_arguments' flags gave."""
    fields = {name: getattr(args, name) for name in RUN_FIELDS if name != "lrs"}
    lr = args.lr
    fields["lrs"] = None if lr is None else (tuple(lr) if isinstance(lr, tuple) else (lr,))
    return fields


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of flaxdepth.options.EngineOptions."""
    group = p.add_argument_group("engine options (how flaxdepth computes; stored in every results row)")
    group.add_argument("--precision", default="default", choices=PRECISIONS,
                       help="convolution and matmul arithmetic: each framework's default (TF32 on recent NVIDIA "
                            "GPUs), highest (float32 in both), or tf32 (convolution operands rounded to TF32 in "
                            "both, on any device, as torch's cuDNN default; matmuls float32); other than default, "
                            "results go to their own file")
    group.add_argument("--cpu-kernels", default=None, action=argparse.BooleanOptionalAction,
                       help="flaxdepth's C++ kernels on CPUs (default: on, unless FLAXDEPTH_CPU_KERNELS=0); "
                            "off: XLA's operations")
    group.add_argument("--rematerialize", nargs="?", const="layers", default=AUTO, choices=(AUTO, *REMATERIALIZATIONS),
                       help="what the backward pass recomputes of the scanned layers: none, layers (BatchNorm and "
                            "activations; the flag alone), nested (every block of ~sqrt(L) layers: memory ~sqrt(L)) "
                            "or auto (per depth: the fastest whose estimated step memory fits)")
    group.add_argument("--replicas-per-block", type=int, default=EngineOptions.replicas_per_block,
                       help="on GPUs, replicas per block-diagonal convolution")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions the flags ask for; a bad value is a ConfigError."""
    if args.replicas_per_block < 1:
        raise ConfigError(f"--replicas-per-block must be at least 1, got {args.replicas_per_block}")
    overrides = {} if args.cpu_kernels is None else {"cpu_kernels": args.cpu_kernels}
    return EngineOptions.from_environment(rematerialize=args.rematerialize, precision=args.precision,
                                          replicas_per_block=args.replicas_per_block, **overrides)
