"""python -m flaxdepth.bench: flaxdepth against torch_ref, measured side by side in one run.

Default: ms per training step (forward, backward, SGD-momentum update) of both frameworks on the
same batch size and device, after warm-up, in interleaved rounds (median of the rounds), plus the
per-model step time with R replicas as the engine trains them (vmapped on a GPU; on CPUs split
over `--cpu-devices`, with the one-device and vmapped forms beside it), and compile time of the
epoch program against depth.
`--full-run`: wall time of a whole training run, the notebook's loop (its DataLoader included)
against flaxdepth's scanned epochs with R replicas (on several CPU devices, also on one of them).
`--depth-scaling`: one model against depth under each rematerialization side by side: a training
step's peak memory, ms per step and per layer at two depths, and the epoch program's compile time.
A step's memory is measured twice: as the peak resident memory of a fresh process that builds the
model and runs the step (what the machine must have: the target is about it; it includes Python,
JAX and the model's initialization, reported beside it) and as XLA's memory_analysis of the
compiled step (its temporary buffers: the step's own need, independent of the process).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# torch is imported where it is used: `step_memory` runs in a child process that imports this
# module, and torch's ~180 MB would count in that process's peak memory.
from flaxdepth import cli, cpu_kernels, registry, train
from flaxdepth.config import ConfigError, RunConfig
from flaxdepth.options import AUTO, REMATERIALIZATIONS, EngineOptions

PROG = "python -m flaxdepth.bench"


def synthetic_batch(batch_size: int, seed: int = 0):
    """uint8 digits-like noise and labels: step time does not depend on pixel values."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (batch_size, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, batch_size).astype(np.int32))


def _time(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) * 1000 / steps


def bench_mesh():
    """Where the benchmark trains replicas: every CPU device (train.request_cpu_devices), or one
    accelerator (the figures are per model on one GPU)."""
    devices = jax.local_devices()
    return train.replica_mesh(devices if devices[0].platform == "cpu" else devices[:1])


def torch_stepper(variant: str, depth: int, images_u8, labels, device: str):
    """A closure running n notebook training steps of torch_ref on one fixed batch."""
    import torch
    import torch_ref
    from torch_ref import training as torch_training

    model = torch_ref.build(variant, depth).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=registry.get_variant(variant).lr, momentum=0.9)
    x = torch_training.normalize(images_u8).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)

    def run(n):
        for _ in range(n):
            out = model(x)
            heads = out if isinstance(out, tuple) else (out,)
            loss = sum(torch.nn.functional.cross_entropy(h, y) for h in heads) / len(heads)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()
    return run


def jax_stepper(variant: str, depth: int, images_u8, labels, replicas: int, options: EngineOptions = EngineOptions(),
                mesh=None):
    """A closure running n jitted flaxdepth steps of R replicas (each its own weights), split over
    `mesh`'s devices (default: `train.local_mesh()`) and mapped over each device's replicas as the
    engine does, computed as `options` say."""
    mesh = mesh or train.local_mesh()
    model, init, _, _ = train.compiled_functions(variant, depth, len(labels), options=options, mesh=mesh)
    lr = registry.get_variant(variant).lr
    split, whole = train.split_over_replicas(mesh), train.replicated(mesh)
    state = init(train.global_array(np.arange(replicas, dtype=np.int32), split),
                 train.global_array(np.full((replicas,), lr, jnp.result_type(float)), split))
    step = train.over_replicas(lambda s, x, y: train.train_step(model, s, x, y, True), mesh, (0, None, None),
                               (False, True), options, donate_argnums=0)
    x, y = train.global_array(images_u8, whole), train.global_array(labels, whole)
    holder = [state]

    def run(n):
        for _ in range(n):
            holder[0], metrics = step(holder[0], x, y)
        jax.block_until_ready(metrics)
    run.compiled_text = lambda: step.lower(holder[0], x, y).compile().as_text()  # for profiles
    run.memory_analysis = lambda: step.lower(holder[0], x, y).compile().memory_analysis()
    run.options = model.options  # rematerialize "auto" resolved
    return run


def step_benchmark(variant: str, depth: int, batch_size: int, replicas: int, steps: int, rounds: int,
                   device: str, options: EngineOptions = EngineOptions()) -> dict:
    import torch

    mesh = bench_mesh()
    if replicas % mesh.size:  # a count set by XLA_FLAGS or $JAX_NUM_CPU_DEVICES
        raise ConfigError(f"--replicas {replicas} must be a multiple of the {mesh.size} CPU devices")
    images, labels = synthetic_batch(batch_size)
    runners = {"torch": torch_stepper(variant, depth, images, labels, device),
               "jax": jax_stepper(variant, depth, images, labels, 1, options)}
    if replicas > 1:
        runners["jax_replicas"] = jax_stepper(variant, depth, images, labels, replicas, options, mesh)
        if jax.devices()[0].platform == "cpu":
            if mesh.size > 1:  # all replicas on one CPU device, one after the other
                runners["jax_replicas_one_device"] = jax_stepper(variant, depth, images, labels, replicas, options)
            # what the engine's CPU loop over replicas avoids
            runners["jax_replicas_vmapped"] = jax_stepper(
                variant, depth, images, labels, replicas, dataclasses.replace(options, vmap_replicas=True))
    for run in runners.values():  # warm-up: compilation, allocator, caches
        run(2)
    times = {name: [] for name in runners}
    for _ in range(rounds):  # interleaved, so load on a shared machine hits all alike
        for name, run in runners.items():
            times[name].append(_time(run, steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "variant": variant, "depth": depth, "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds,
        "torch_ms_per_step": med["torch"], "jax_ms_per_step": med["jax"], "speedup": med["torch"] / med["jax"],
        "torch_threads": torch.get_num_threads(),
    }
    if replicas > 1:
        per_model = med["jax_replicas"] / replicas
        result.update(replicas=replicas, jax_devices=mesh.size,
                      jax_ms_per_step_replicas=med["jax_replicas"],
                      jax_ms_per_model_step_replicas=per_model, speedup_replicas=med["torch"] / per_model)
        if "jax_replicas_one_device" in med:
            result["speedup_replicas_one_device"] = med["torch"] / (med["jax_replicas_one_device"] / replicas)
        if "jax_replicas_vmapped" in med:
            result["speedup_replicas_vmapped"] = med["torch"] / (med["jax_replicas_vmapped"] / replicas)
    return result


def compile_benchmark(variant: str, depths: list[int], batch_size: int,
                      options: EngineOptions = EngineOptions()) -> dict[int, float]:
    """Seconds to compile the epoch program (scan over batches + partial batch) at each depth."""
    images, labels = synthetic_batch(2 * batch_size + 8)
    data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(images[:64]),
                            jnp.asarray(labels[:64]))
    seconds = {}
    for depth in depths:
        _, init, epochs, _ = train.compiled_functions(variant, depth, batch_size, options=options)
        state = init(jnp.zeros(1, jnp.int32), jnp.full((1,), 0.05))
        orders = jnp.arange(len(labels))[None]
        start = time.perf_counter()
        epochs[True].lower(state, orders, data).compile()
        seconds[depth] = time.perf_counter() - start
    return seconds


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (getrusage counts kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def step_memory(variant: str, depth: int, batch_size: int, options: EngineOptions = EngineOptions()) -> dict:
    """Memory of one model's training step, measured in this process: its peak resident memory
    before the step (imports, the model's initialization) and after compiling and running two
    steps, and XLA's account of the compiled step's buffers (memory_analysis: temporaries, which
    hold what the backward pass keeps, and arguments). The peak is the process's high-water mark,
    so each configuration needs a fresh process (`step_memory_in_subprocess`)."""
    images, labels = synthetic_batch(batch_size)
    run = jax_stepper(variant, depth, images, labels, 1, options)
    before = peak_rss_bytes()
    run(2)
    peak = peak_rss_bytes()
    analysis = run.memory_analysis()
    return {"depth": depth, "rematerialize": run.options.rematerialize, "peak_rss_bytes": peak,
            "peak_rss_before_step_bytes": before, "xla_temp_bytes": analysis.temp_size_in_bytes,
            "xla_argument_bytes": analysis.argument_size_in_bytes}


def step_memory_in_subprocess(variant: str, depth: int, batch_size: int, options: EngineOptions,
                              variants_files: list[str]) -> dict:
    """`step_memory` in a fresh Python process with one CPU device (or this machine's first
    accelerator), so that its peak is this configuration's alone."""
    code = ("import json, sys; from flaxdepth import bench, cli, options; a = json.loads(sys.argv[1]); "
            "cli.load_variants_files(a['files']); print(json.dumps(bench.step_memory("
            "a['variant'], a['depth'], a['batch'], options.EngineOptions(**a['options']))))")
    arguments = json.dumps({"variant": variant, "depth": depth, "batch": batch_size, "options": options.as_dict(),
                            "files": variants_files})
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}  # one device, as a step runs
    proc = subprocess.run([sys.executable, "-c", code, arguments], capture_output=True, text=True, env=environment)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"depth": depth, "rematerialize": options.rematerialize, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def depth_time_benchmark(variant: str, depths: list[int], rematerializations: list[str], batch_size: int,
                         steps: int, rounds: int, options: EngineOptions = EngineOptions()) -> dict:
    """ms per training step and per layer of one model at each depth under each rematerialization,
    all compiled first and timed in interleaved rounds (median), and per rematerialization the
    deepest step's time over the shallowest's, divided by the depth ratio (1: flat per layer)."""
    images, labels = synthetic_batch(batch_size)
    runners = {(depth, mode): jax_stepper(variant, depth, images, labels, 1,
                                          dataclasses.replace(options, rematerialize=mode))
               for mode in rematerializations for depth in depths}
    for run in runners.values():  # warm-up: compilation, allocator
        run(1)
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            times[key].append(_time(run, steps))
    ms = {key: statistics.median(t) for key, t in times.items()}
    rows = [{"depth": depth, "rematerialize": runners[depth, mode].options.rematerialize,
             "ms_per_step": ms[depth, mode], "ms_per_layer": ms[depth, mode] / depth}
            for mode in rematerializations for depth in depths]
    first, last = depths[0], depths[-1]
    ratios = {runners[last, mode].options.rematerialize: ms[last, mode] / ms[first, mode] / (last / first)
              for mode in rematerializations}
    return {"steps_per_round": steps, "rounds": rounds, "time": rows, "time_ratio_to_linear": ratios}


def full_run_benchmark(variant: str, depth: int, replicas: int, epochs: int, device: str,
                       data_dir: str | None, limit_train: int | None, limit_test: int | None = None,
                       rounds: int = 1, options: EngineOptions = EngineOptions()) -> dict:
    """A whole run: the notebook's loop with a shuffling DataLoader over per-sample transforms,
    against flaxdepth's engine training `replicas` models at once (compile included and not; the
    median of `rounds` timed runs, interleaved with the one-device runs where there are those)."""
    import torch
    import torch_ref
    from torch_ref import training as torch_training
    from flaxdepth import data as data_module

    dataset = data_module.subset(data_module.load_dataset("mnist", data_dir), limit_train, limit_test)

    class NotebookMNIST(torch.utils.data.Dataset):
        """Like torchvision's MNIST with ToTensor + Normalize: one transform per sample."""

        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return torch_training.normalize(self.images[i][None])[0], int(self.labels[i])

    train_loader = torch.utils.data.DataLoader(NotebookMNIST(dataset.train_images, dataset.train_labels),
                                               batch_size=256, shuffle=True)
    test_loader = torch.utils.data.DataLoader(NotebookMNIST(dataset.test_images, dataset.test_labels),
                                              batch_size=256, shuffle=False)
    spec = registry.get_variant(variant)
    model = torch_ref.build(variant, depth).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    start = time.perf_counter()
    loop = torch_training.train_multihead if spec.multihead else torch_training.train
    loop(epochs, model, torch.nn.CrossEntropyLoss(), optimizer, train_loader, test_loader, log=None)
    torch_s = time.perf_counter() - start
    print(f"torch notebook loop: {torch_s:.1f}s for {epochs} epochs", file=sys.stderr, flush=True)

    runs = [(seed, spec.lr) for seed in range(replicas)]
    meshes = {"jax": bench_mesh()}
    if meshes["jax"].size > 1:  # several CPU devices: the same runs on one of them, in this process
        meshes["jax_one_device"] = train.local_mesh()
    device_data = {name: train.DeviceData.put(dataset, mesh) for name, mesh in meshes.items()}

    def train_runs(name: str, run_epochs: int) -> float:
        start = time.perf_counter()
        train.train_replicas(RunConfig(spec, epochs=run_epochs), depth, device_data[name], runs, mesh=meshes[name],
                             options=options)
        return time.perf_counter() - start

    # A one-epoch run compiles every program the timed runs use (init, epoch, test, orders);
    # compile time = that run's time less one epoch of the timed runs.
    first_epoch_s = {name: train_runs(name, 1) for name in meshes}
    for name, seconds in first_epoch_s.items():
        print(f"{name}: compile + 1 epoch of {replicas} replicas on {meshes[name].size} device(s): {seconds:.1f}s",
              file=sys.stderr, flush=True)
    times = {name: [] for name in meshes}
    for round_index in range(rounds):  # interleaved, in alternating order, so drift hits both alike
        for name in (list(meshes) if round_index % 2 == 0 else list(meshes)[::-1]):
            times[name].append(train_runs(name, epochs))
    run_s = {name: statistics.median(t) for name, t in times.items()}
    compile_s = max(first_epoch_s["jax"] - run_s["jax"] / epochs, 0.0)
    result = {"variant": variant, "depth": depth, "epochs": epochs, "replicas": replicas, "rounds": rounds,
              "train_images": len(dataset.train_labels), "test_images": len(dataset.test_labels),
              "jax_devices": meshes["jax"].size, "torch_notebook_loop_s": torch_s,
              "jax_run_s": run_s["jax"], "jax_compile_s": compile_s, "jax_run_with_compile_s": run_s["jax"] + compile_s,
              "model_epochs_per_s": replicas * epochs / run_s["jax"],
              "speedup_per_model": torch_s / (run_s["jax"] / replicas),
              "speedup_per_model_with_compile": torch_s / ((run_s["jax"] + compile_s) / replicas)}
    if "jax_one_device" in run_s:
        result.update(jax_one_device_run_s=run_s["jax_one_device"],
                      speedup_per_model_one_device=torch_s / (run_s["jax_one_device"] / replicas),
                      cpu_devices_speedup=run_s["jax_one_device"] / run_s["jax"])
    return result


def depth_scaling(args) -> dict:
    """--depth-scaling: memory, time per layer and compile time against depth, under each of
    --rematerializations, progress on stderr. "auto" is measured for memory only (its row names the
    choice): for time and compile it is one of the others, whose programs JAX would reuse."""
    result = {"variant": args.variant, "batch_size": args.batch_size, "memory": []}
    concrete = [mode for mode in args.rematerializations if mode != AUTO]
    for depth in args.memory_depths:
        for mode in args.rematerializations:
            row = step_memory_in_subprocess(args.variant, depth, args.batch_size,
                                            dataclasses.replace(args.engine, rematerialize=mode), args.variants_file)
            print(f"memory k={depth} {mode}: {row}", file=sys.stderr, flush=True)
            result["memory"].append(row)
    if args.time_depths and concrete:
        result.update(depth_time_benchmark(args.variant, args.time_depths, concrete, args.batch_size,
                                           args.steps, args.rounds, args.engine))
        print(f"time: {result['time']}", file=sys.stderr, flush=True)
    if args.compile_depths and concrete:
        result["compile_s"], result["compile_ratio"] = {}, {}
        first, last = args.compile_depths[0], args.compile_depths[-1]
        for mode in concrete:
            seconds = compile_benchmark(args.variant, args.compile_depths, args.batch_size,
                                        dataclasses.replace(args.engine, rematerialize=mode))
            result["compile_s"][mode] = {str(k): v for k, v in seconds.items()}
            result["compile_ratio"][mode] = seconds[last] / seconds[first]
            print(f"compile {mode}: {result['compile_s'][mode]}", file=sys.stderr, flush=True)
    return result


def parse_args(argv=None):
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="elu_bn", help="a registered variant (see python -m flaxdepth.variants)")
    cli.add_variants_file_argument(p)
    p.add_argument("--depth", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--replicas", type=int, default=1,
                   help="also time R replicas as the engine trains them (per-model figure)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="on CPUs, split the replicas over N devices (N divides R); default: as the sweep "
                        "(flaxdepth.train.cpu_device_count), reduced to a divisor of R")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 5, or 1 with "
                                                               "--depth-scaling)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds; the median is reported (default: 5, 1 with --full-run, 3 with "
                        "--depth-scaling)")
    p.add_argument("--compile-depths", default=None,
                   help="depths to time the epoch program's compilation at ('' to skip; default: 30,300, or "
                        "30,10002 with --depth-scaling)")
    p.add_argument("--full-run", action="store_true", help="time whole training runs instead of steps")
    scaling = p.add_argument_group(
        "--depth-scaling: the engine against depth, one model, each under every --rematerializations")
    scaling.add_argument("--depth-scaling", action="store_true",
                         help="a training step's peak memory (a fresh process per configuration) at --memory-depths, "
                              "ms per step and per layer at --time-depths, compile time at --compile-depths")
    scaling.add_argument("--rematerializations", default="none,nested",
                         help="the rematerializations compared side by side (none, layers, nested, auto)")
    scaling.add_argument("--memory-depths", default="3000", help="depths of the memory measurement ('' to skip)")
    scaling.add_argument("--time-depths", default="300,3000", help="depths of the step timing ('' to skip)")
    p.add_argument("--epochs", type=int, default=3, help="with --full-run")
    p.add_argument("--data-dir", default=None, help="with --full-run: MNIST folder")
    p.add_argument("--limit-train", type=int, default=None, help="with --full-run: first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="with --full-run: first N test images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    cli.add_engine_arguments(p)
    args = p.parse_args(argv)
    cli.load_variants_files(args.variants_file)
    registry.get_variant(args.variant)
    if args.compile_depths is None:
        args.compile_depths = "30,10002" if args.depth_scaling else "30,300"
    try:
        registry.check_depth(args.depth)
        for name in ("compile_depths", "memory_depths", "time_depths"):
            setattr(args, name, [registry.check_depth(int(d)) for d in getattr(args, name).split(",") if d.strip()])
    except ValueError as error:
        p.error(str(error))
    args.rematerializations = [mode.strip() for mode in args.rematerializations.split(",") if mode.strip()]
    bad = [mode for mode in args.rematerializations if mode not in (AUTO, *REMATERIALIZATIONS)]
    if bad or not args.rematerializations:
        p.error(f"--rematerializations takes {', '.join((*REMATERIALIZATIONS, AUTO))}, got {bad or 'none'}")
    args.engine = cli.engine_options(args)
    if args.rounds is None:
        args.rounds = 1 if args.full_run else 3 if args.depth_scaling else 5
    if args.steps is None:
        args.steps = 1 if args.depth_scaling else 5
    for name in ("batch_size", "replicas", "steps", "rounds", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.cpu_devices is None:  # the sweep's count, made to divide the replicas (the step timing does not pad)
        args.cpu_devices = math.gcd(train.cpu_device_count(args.replicas), args.replicas)
    elif args.cpu_devices < 1 or args.replicas % args.cpu_devices:
        p.error(f"--cpu-devices must be at least 1 and divide --replicas ({args.replicas}), got {args.cpu_devices}")
    return args


@cli.command(PROG)
def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    train.request_cpu_devices(args.cpu_devices)  # before JAX starts
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jax_device = jax.devices()[0]
    result = {"jax_device": f"{jax_device.platform}:{jax_device.device_kind}", "torch_device": device,
              "versions": {"jax": jax.__version__, "torch": torch.__version__},
              # the engine's settings that the timings depend on
              "engine": args.engine.as_dict(),
              "cpu_kernels_used": args.engine.cpu_kernels and cpu_kernels.available()}
    if args.full_run:  # no MNIST where it was looked for: a DataError, one line saying what to pass
        result.update(full_run_benchmark(args.variant, args.depth, args.replicas, args.epochs, device,
                                         args.data_dir, args.limit_train, args.limit_test, args.rounds,
                                         args.engine))
    elif args.depth_scaling:
        result.update(depth_scaling(args))
    else:
        result.update(step_benchmark(args.variant, args.depth, args.batch_size, args.replicas, args.steps,
                                     args.rounds, device, args.engine))
        if args.compile_depths:
            seconds = compile_benchmark(args.variant, args.compile_depths, args.batch_size, args.engine)
            result["compile_s"] = {str(k): v for k, v in seconds.items()}
            first, last = args.compile_depths[0], args.compile_depths[-1]
            result["compile_ratio"] = seconds[last] / seconds[first]
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
