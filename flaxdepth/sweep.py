"""python -m flaxdepth.sweep --variant NAME: the deepest depth at which a variant still trains.

Parses flags and calls the library (flaxdepth.search); see `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys

from flaxdepth import cli, registry
from flaxdepth.config import DEFAULT_OUT, FRAMEWORKS, RESULTS_ENV, SEARCH_DEFAULTS, SEARCHES, ConfigError, SweepConfig

PROG = "python -m flaxdepth.sweep"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True,
                   help=f"one of {', '.join(registry.VARIANT_NAMES)}, a variant of a --variants-file, or 'all' "
                        f"(every one of both)")
    cli.add_variants_file_argument(p)
    p.add_argument("--depths", type=cli.numbers(int, "--depths"), default=SweepConfig.depths,
                   help="evaluate these depths (multiples of 3, e.g. 3,6,9) instead of searching")
    cli.add_run_arguments(p)
    p.add_argument("--seeds", type=int, default=SweepConfig.seeds,
                   help="seeds per depth, a batch (first-seed, first-seed + 1, ...); default by device: "
                        + ", ".join(f"{seeds} on {kind}" for kind, (seeds, _) in SEARCH_DEFAULTS.items()))
    p.add_argument("--first-seed", type=int, default=SweepConfig.first_seed, help="first seed")
    p.add_argument("--search", default=SweepConfig.search, choices=SEARCHES,
                   help="without --depths: adaptive (fit P(trains | depth) and train the next batch where it "
                        "tells most about k50, flaxdepth.trainability) or bisect (grow, then bisect by a "
                        "majority of seeds)")
    p.add_argument("--target-ratio", type=float, default=SweepConfig.target_ratio,
                   help="the adaptive search stops when k50's 95%% interval has hi / lo at most this")
    p.add_argument("--max-runs", type=int, default=SweepConfig.max_runs,
                   help="the adaptive search's run budget; default by device: "
                        + ", ".join(f"{runs} on {kind}" for kind, (_, runs) in SEARCH_DEFAULTS.items()))
    p.add_argument("--threshold", type=float, default=SweepConfig.threshold,
                   help="trainable: train or test error below this")
    p.add_argument("--max-depth", type=int, default=SweepConfig.max_depth, help="the search stops growing k here")
    p.add_argument("--out", default=os.environ.get(RESULTS_ENV) or DEFAULT_OUT,
                   help=f"folder of the results files and plots (default: ${RESULTS_ENV}, else ./{DEFAULT_OUT})")
    p.add_argument("--framework", default=SweepConfig.framework, choices=FRAMEWORKS)
    outputs = p.add_argument_group("what each run keeps beside its errors (both frameworks)")
    outputs.add_argument("--save-weights", action="store_true",
                         help="write each run's final weights beside the results file, in RESULTS.weights/ as "
                              "VARIANT-kK-seedS-lrLR.msgpack (Flax variables, flax.serialization) and .pt (the "
                              "torch state_dict); the row names the files")
    outputs.add_argument("--diagnostics", action="store_true",
                         help="record in each row a per-layer summary at initialization and at the end: activation "
                              "variance, output-gradient norm and, with BatchNorm, the running statistics' distance "
                              "to the probe batch's (flaxdepth.measure; torch_ref.diagnose with --framework torch)")
    outputs.add_argument("--probe-size", type=int, default=SweepConfig.probe_size,
                         help="--diagnostics measures on the first N test images")
    cli.add_engine_arguments(p)
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="on CPUs, split each depth's runs over N devices that train side by side; default: "
                        "by the number of runs and cores (flaxdepth.train.cpu_device_count), 1 with --distributed")
    p.add_argument("--skip-parity", action="store_true", help="skip the quick check against torch_ref")
    p.add_argument("--quiet", action="store_true",
                   help="no parity line and no per-run epoch lines, only the summary")
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
    cli.load_variants_files(args.variants_file)
    names = registry.variant_names() if args.variant == "all" else (args.variant,)
    engine = cli.engine_options(args)
    run = cli.run_fields(args)
    return [SweepConfig(
        variant=name, **run, seeds=args.seeds, first_seed=args.first_seed, depths=args.depths,
        max_depth=args.max_depth, search=args.search, target_ratio=args.target_ratio, max_runs=args.max_runs,
        threshold=args.threshold, out=args.out, framework=args.framework,
        skip_parity=args.skip_parity, engine=engine, save_weights=args.save_weights,
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

    return train.cpu_device_count(max(config.for_device("cpu").runs_per_depth for config in sweep_configs))


@cli.command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    sweep_configs = configs(args)  # every input checked before anything trains
    device_count = cpu_devices(args, sweep_configs)
    if device_count is not None and args.framework == "jax":  # before JAX starts, which fixes the count
        from flaxdepth import train

        train.request_cpu_devices(device_count)
    join_processes(args)
    import jax

    if jax.process_count() > 1 and args.framework != "jax":
        raise ConfigError("--distributed splits JAX replicas over processes; --framework torch runs in one process")
    from flaxdepth import data

    dataset = data.subset(data.load_dataset(args.dataset, args.data_dir), args.limit_train, args.limit_test)
    for config in sweep_configs:
        config.check_dataset(dataset)

    from tqdm import tqdm

    from flaxdepth import parity_check, search

    show = print if jax.process_index() == 0 else (lambda *a, **k: None)  # one process speaks
    log = (lambda line: None) if args.quiet else tqdm.write
    for config in sweep_configs:
        try:  # every process checks the parity, so that all stop alike on a mismatch
            report = search.run_sweep(config, dataset, log=log, progress=tqdm)
        except parity_check.ParityError as error:
            print(cli.error_line(PROG, error), file=sys.stderr)
            return 1
        show(report.table())
        show(f"results: {report.path}\nplot:    {report.plot_path}\nfit:     {report.fit_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
