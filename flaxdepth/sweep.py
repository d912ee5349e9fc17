"""python -m flaxdepth.sweep --variant NAME: the deepest depth at which a variant still trains.

Parses flags and calls the library (flaxdepth.search); see `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys

from flaxdepth import registry
from flaxdepth.cli import quiet_on_closed_pipe
from flaxdepth.variants import add_variants_file_argument, load_variants_files
from flaxdepth.options import AUTO, PRECISIONS, REMATERIALIZATIONS, EngineOptions
from flaxdepth.search import DEFAULT_OUT, FRAMEWORKS, RESULTS_ENV, ConfigError, SweepConfig

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
    p.add_argument("--variant", required=True,
                   help=f"one of {', '.join(registry.VARIANT_NAMES)}, a variant of a --variants-file, or 'all' "
                        f"(every one of both)")
    add_variants_file_argument(p)
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
    p.add_argument("--out", default=os.environ.get(RESULTS_ENV) or DEFAULT_OUT,
                   help=f"folder of the results files and plots (default: ${RESULTS_ENV}, else ./{DEFAULT_OUT})")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="test on the first N test images")
    p.add_argument("--notebook-quirks", action="store_true",
                   help="reproduce the notebook's missing model.train(): BatchNorm in eval mode after epoch 1")
    p.add_argument("--framework", default="jax", choices=FRAMEWORKS)
    p.add_argument("--fan", default=None, choices=registry.FANS,
                   help="fan of the glorot / he / lecun sigma, overriding the variant's init_fan (the "
                        "notebook's Glorot-style sigma is over fan-out)")
    outputs = p.add_argument_group("what each run keeps beside its errors (both frameworks)")
    outputs.add_argument("--save-weights", action="store_true",
                         help="write each run's final weights beside the results file, in RESULTS.weights/ as "
                              "VARIANT-kK-seedS-lrLR.msgpack (Flax variables, flax.serialization) and .pt (the "
                              "torch state_dict); the row names the files")
    outputs.add_argument("--diagnostics", action="store_true",
                         help="record in each row a per-layer summary at initialization and at the end: activation "
                              "variance, output-gradient norm and, with BatchNorm, the running statistics' distance "
                              "to the probe batch's (flaxdepth.diagnose; torch_ref.diagnose with --framework torch)")
    outputs.add_argument("--probe-size", type=int, default=SweepConfig.probe_size,
                         help="--diagnostics measures on the first N test images")
    add_engine_arguments(p)
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="on CPUs, split each depth's runs over N devices that train side by side; default: "
                        "by the number of runs and cores (flaxdepth.train.cpu_device_count), 1 with --distributed")
    p.add_argument("--skip-parity", action="store_true", help="skip the quick check against torch_ref")
    p.add_argument("--quiet", action="store_true", help="no per-run epoch lines, only the summary")
    group = p.add_argument_group(
        "several processes or hosts (jax.distributed)",
        "Every process runs the same command; replicas are split over all their devices and process 0 "
        "writes the results. On SLURM or Open MPI, --distributed alone is enough; elsewhere give the three "
        "options below (the coordinator address may also come from $JAX_COORDINATOR_ADDRESS).")
    group.add_argument("--distributed", action="store_true", help="join the other processes with jax.distributed")
    group.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 to N-1")
    return p.parse_args(argv)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of flaxdepth.options.EngineOptions (shared with flaxdepth.bench)."""
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


def engine_options(args) -> EngineOptions:
    """The EngineOptions the flags ask for; a bad value is a ConfigError."""
    if args.replicas_per_block < 1:
        raise ConfigError(f"--replicas-per-block must be at least 1, got {args.replicas_per_block}")
    overrides = {} if args.cpu_kernels is None else {"cpu_kernels": args.cpu_kernels}
    return EngineOptions.from_environment(rematerialize=args.rematerialize, precision=args.precision,
                                          replicas_per_block=args.replicas_per_block, **overrides)


def join_processes(args) -> None:
    """jax.distributed.initialize with whatever was given; JAX detects SLURM and Open MPI itself."""
    given = [f"--{name.replace('_', '-')}" for name in ("coordinator_address", "num_processes", "process_id")
             if getattr(args, name) is not None]
    if not args.distributed:
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --distributed")
        return
    import jax

    # CPU processes exchange the gathered metrics through gloo (GPUs use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except Exception as error:  # JAX raises several types; the user needs the one line
        message = " ".join(str(error).split())
        raise ConfigError(f"could not join the other processes ({message}); outside SLURM/Open MPI give "
                          f"--coordinator-address, --num-processes and --process-id") from None


def configs(args) -> list[SweepConfig]:
    bad = [d for d in args.depths or () if d < 3 or d % 3]
    if bad:
        raise ConfigError(f"--depths must be positive multiples of 3 (3, 6, 9, ...), got {bad}")
    load_variants_files(args.variants_file)
    names = registry.variant_names() if args.variant == "all" else (args.variant,)
    engine = engine_options(args)
    return [SweepConfig(
        variant=name, lrs=args.lr, seeds=args.seeds, first_seed=args.first_seed, depths=args.depths,
        max_depth=args.max_depth, epochs=args.epochs, batch_size=args.batch_size, threshold=args.threshold,
        dataset=args.dataset, data_dir=args.data_dir, out=args.out, limit_train=args.limit_train,
        limit_test=args.limit_test, notebook_quirks=args.notebook_quirks, framework=args.framework,
        fan=args.fan, skip_parity=args.skip_parity, engine=engine, save_weights=args.save_weights,
        diagnostics=args.diagnostics, probe_size=args.probe_size,
    ).validate() for name in names]


def cpu_devices(args, sweep_configs: list[SweepConfig]) -> int | None:
    """The CPU device count to ask JAX for, or None to leave JAX's default: with --distributed the
    processes share the machine's cores, so each keeps one device unless --cpu-devices says."""
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise ConfigError(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
        return args.cpu_devices
    if args.distributed or args.framework != "jax":
        return None
    from flaxdepth import train

    return train.cpu_device_count(max(config.runs_per_depth for config in sweep_configs))


@quiet_on_closed_pipe
def main(argv=None) -> int:
    args = parse_args(argv)
    from flaxdepth.data import DataError

    try:
        sweep_configs = configs(args)  # every input checked before anything trains
        device_count = cpu_devices(args, sweep_configs)
        if device_count is not None and args.framework == "jax":  # before JAX starts, which fixes the count
            from flaxdepth import train

            train.request_cpu_devices(device_count)
        join_processes(args)
        import jax

        if jax.process_count() > 1 and args.framework != "jax":
            raise ConfigError("--distributed splits JAX replicas over processes; --framework torch runs "
                              "in one process")
        from flaxdepth import data

        dataset = data.subset(data.load_dataset(args.dataset, args.data_dir),
                              args.limit_train, args.limit_test)
        for config in sweep_configs:
            config.check_dataset(dataset)
    except (ConfigError, registry.SpecError, DataError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from flaxdepth import parity_check, search

    log = (lambda line: None) if args.quiet else tqdm.write
    show = print if jax.process_index() == 0 else (lambda *a, **k: None)  # one process speaks
    for config in sweep_configs:
        if not config.skip_parity:  # every process checks, so that all stop alike on a mismatch
            try:
                show(parity_check.quick_parity(config.variant, dataset, options=config.engine), flush=True)
            except parity_check.ParityError as error:
                print(f"{PROG}: error: {error}", file=sys.stderr)
                return 1
        try:
            report = search.run_sweep(config, dataset, log=log, progress=tqdm)
        except ConfigError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        show(report.table())
        show(f"results: {report.path}\nplot:    {report.plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
