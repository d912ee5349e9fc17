"""Where a training step of R replicas spends its time: a jax.profiler trace, summarized.

    python benchmarks/profile_step.py [--variant elu_bn] [--depth 48] [--replicas 32] [--steps 5]
                                       [--top 25] [--trace-dir DIR] [--json]

Runs the sweep engine's step (`flaxdepth.bench.jax_stepper`: R replicas, vmapped on a GPU) under
`jax.profiler.trace` and sums the device's events by operation: on a GPU the "/device:GPU:N"
planes, on a CPU the XLA thunks of the "/host:CPU" plane (threads named tf_XLA...). The table
gives, per operation kind (trailing ".N" of XLA's instruction names dropped) and for the `--top`
single operations, the total time, the count, and the share of all device time. Kinds are
classified as convolution, batchnorm (flaxdepth's CPU BatchNorm + activation kernel), layout (transpose,
copy), reduction, other fusion, other: the question it answers is how much of a step is not
convolution (the answers are in BENCHMARKS.md). On a CPU, flaxdepth's kernels (FFI calls, named
"ffi_call.N" in the trace) are of the kind of their FFI target, read from the compiled program. The events
of nested loops are counted where they run; events that span others (a while loop, a CPU thunk
sequence and its wait) and runtime internals are left out of the sums, so "device time" is the
operations' own time (operations that run concurrently each count).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter

import jax

from flaxdepth import bench, registry

# Classes of operation kinds, first match wins. Anchored, so that e.g. convert_* or
# bitcast_dynamic-update-slice fusions are not taken for convolutions or copies. The GPU kernel
# names are cuDNN's and CUTLASS's for convolutions (implicit GEMM, Winograd, fprop/dgrad/wgrad).
CLASSES = (("convolution", r"^conv_general|convolution|cudnn|xmma|implicit_gemm|winograd|fprop|dgrad|wgrad"
                           r"|^flaxdepth_conv"),  # flaxdepth's CPU kernels, by FFI target (ffi_targets)
           ("batchnorm", r"^flaxdepth_batch_norm"),
           ("other ffi call", r"^ffi_call"),  # an FFI call whose target ffi_targets did not find
           ("layout", r"^(copy|transpose)"),
           ("reduction", r"reduce|reduction"),
           ("other fusion", r"fusion"))
# Events that are not operations: containers counted through their contents (loops, a CPU thunk
# sequence), runtime internals ("ThunkExecutor::Execute", "SlinkyThreadPool::Await") and end markers.
CONTAINERS = ("while", "conditional", "call")


def kind_of(name: str) -> str:
    """XLA's instruction or kernel name without its numeric suffix (loop_fusion.12, loop_fusion_12 ->
    loop_fusion)."""
    return re.sub(r"([._]\d+)+$", "", name)


def ffi_targets(program: str) -> dict[str, str]:
    """FFI call instruction name -> its target, from a compiled program's HLO text: a CPU trace
    names flaxdepth's kernels only "ffi_call.N"."""
    return dict(re.findall(r"%?(ffi_call[.\d]*) = .*custom_call_target=\"([^\"]+)\"", program))


def classify(kind: str) -> str:
    return next((label for label, pattern in CLASSES if re.search(pattern, kind.lower())), "other")


def is_operation(name: str) -> bool:
    return not (kind_of(name).startswith(CONTAINERS) or "::" in name or name.startswith("end: "))


def device_events(profile, platform: str):
    """(name, duration ns) of every device operation in the trace: on a GPU the "XLA Ops" line of
    each device plane (one event per HLO operation), or its "Stream" lines (kernels) where a trace
    has no such line; on a CPU the XLA threads (tf_XLA...) of the host plane."""
    for plane in profile.planes:
        if platform == "cpu":
            lines = [l for l in plane.lines if plane.name.startswith("/host:CPU") and l.name.startswith("tf_XLA")]
        elif plane.name.startswith("/device:GPU"):
            lines = ([l for l in plane.lines if l.name == "XLA Ops"]
                     or [l for l in plane.lines if l.name.startswith("Stream")])
        else:
            continue
        for line in lines:
            for event in line.events:
                if is_operation(event.name):
                    yield line.name, event.name, event.duration_ns


def summarize(events, top: int, targets: dict[str, str] | None = None) -> dict:
    """Totals by class, kind and operation; FFI calls are of the kind of their target (`targets`)."""
    total, by_kind, by_name, count, by_class, lines = 0.0, Counter(), Counter(), Counter(), Counter(), set()
    for line, name, ns in events:
        total += ns
        kind = (targets or {}).get(name) or kind_of(name)
        by_kind[kind] += ns
        by_name[name] += ns
        count[kind] += 1
        by_class[classify(kind)] += ns
        lines.add(line)
    share = (lambda ns: ns / total) if total else (lambda ns: 0.0)
    return {
        "device_ms": total / 1e6,
        "trace_lines": sorted(lines),  # where the events came from, to check against the wall time
        "classes": {c: {"ms": ns / 1e6, "share": share(ns)} for c, ns in by_class.most_common()},
        "kinds": [{"kind": k, "ms": ns / 1e6, "count": count[k], "share": share(ns)}
                  for k, ns in by_kind.most_common(top)],
        "operations": [{"name": n, "ms": ns / 1e6, "share": share(ns)} for n, ns in by_name.most_common(top)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="elu_bn", choices=registry.VARIANT_NAMES)
    p.add_argument("--depth", type=int, default=48)
    p.add_argument("--replicas", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps traced (after 2 of warm-up)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace-dir", default=None, help="keep the raw trace here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for flag in ("depth", "replicas", "batch_size", "steps", "top"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")

    platform = jax.devices()[0].platform
    images, labels = bench.synthetic_batch(args.batch_size)
    run = bench.jax_stepper(args.variant, args.depth, images, labels, args.replicas)
    run(2)  # compile and warm up outside the trace
    targets = ffi_targets(run.compiled_text())
    with contextlib.ExitStack() as stack:
        trace_dir = args.trace_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="flaxdepth_profile_"))
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            run(args.steps)
            wall_ms = (time.perf_counter() - start) * 1000 / args.steps
        traces = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
        if not traces:
            print(f"profile_step.py: error: jax.profiler wrote no trace into {trace_dir}", file=sys.stderr)
            return 1
        summary = summarize(device_events(jax.profiler.ProfileData.from_file(traces[-1]), platform), args.top,
                            targets)
    summary.update(variant=args.variant, depth=args.depth, replicas=args.replicas, steps=args.steps,
                   device=f"{platform}:{jax.devices()[0].device_kind}", jax=jax.__version__,
                   device_ms_per_step=summary["device_ms"] / args.steps, wall_ms_per_step=wall_ms)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.variant} k={args.depth}, {args.replicas} replicas, {args.steps} steps on {summary['device']}: "
          f"{summary['device_ms_per_step']:.1f} ms of device operations per step, {wall_ms:.1f} ms wall "
          "(traced; operations that overlap count each)")
    for label, c in summary["classes"].items():
        print(f"  {label:<14} {c['ms'] / args.steps:9.2f} ms/step  {100 * c['share']:5.1f}%")
    print(f"\n{'operation kind':<48} {'ms/step':>9} {'count':>7} {'share':>6}")
    for k in summary["kinds"]:
        print(f"{k['kind'][:48]:<48} {k['ms'] / args.steps:9.2f} {k['count']:7d} {100 * k['share']:5.1f}%")
    print(f"\n{'single operation':<48} {'ms/step':>9} {'share':>6}")
    for o in summary["operations"]:
        print(f"{o['name'][:48]:<48} {o['ms'] / args.steps:9.2f} {100 * o['share']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
