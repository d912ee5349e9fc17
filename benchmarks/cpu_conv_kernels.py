"""flaxdepth's CPU convolution kernels against XLA's CPU convolutions and PyTorch's, per layer shape.

For each convolution a training step of the models runs (the three stages' channel pairs, batch
256: forward, which with the kernel flipped is also the input gradient, and kernel gradient),
times one call inside a jitted `lax.map` of 16 calls (as the scanned layers call them) with
`flaxdepth.cpu_kernels`, with XLA's plain CPU convolution (the fallback, engine option
`cpu_kernels` off), and PyTorch's `conv2d` and its weight gradient, all in one process, interleaved
rounds, median. Also checks the kernels against XLA.

    python benchmarks/cpu_conv_kernels.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from flaxdepth import conv

CALLS = 16  # calls per timed program, as the 16 scanned layers of a stage at depth 48
# (height = width, C_in, C_out): the models' forward convolutions (whose kernel gradients a step
# takes too), then the input gradients' reverse pairs (forward only)
SHAPES = ((28, 1, 4), (28, 4, 4), (14, 4, 8), (14, 8, 8), (7, 8, 16), (7, 16, 16))
INPUT_GRADIENT_SHAPES = ((28, 4, 1), (14, 8, 4), (7, 16, 8))


def compiled(fn, *args, use_kernels: bool):
    program = jax.jit(lambda a, b: lax.map(lambda pair: fn(*pair, use_kernels), (a, b))).lower(*args).compile()
    return lambda: jax.block_until_ready(program(*args))


def torch_runners(x, kernel, grad_out):
    xs = [torch.from_numpy(np.array(a.transpose(0, 3, 1, 2))) for a in x]
    ks = [torch.from_numpy(np.array(k.transpose(3, 2, 0, 1))).requires_grad_() for k in kernel]
    gs = [torch.from_numpy(np.array(g.transpose(0, 3, 1, 2))) for g in grad_out]

    def forward():
        with torch.no_grad():
            for a, k in zip(xs, ks):
                torch.nn.functional.conv2d(a, k, padding=1)

    def kernel_grad():
        for a, k, g in zip(xs, ks, gs):
            torch.autograd.grad(torch.nn.functional.conv2d(a, k, padding=1), k, g)
    return forward, kernel_grad


def xla_reference(x, kernel, grad_out):
    """XLA's forward convolution and JAX's autodiff of it for the kernel, at highest precision."""
    def forward(k):
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST)
    y, vjp = jax.vjp(forward, kernel)
    return y, vjp(grad_out)[0]


def measure(rounds: int, batch: int = 256):
    for size, c_in, c_out in SHAPES + INPUT_GRADIENT_SHAPES:
        with_kernel_grad = (size, c_in, c_out) in SHAPES
        rng = np.random.default_rng(size * 100 + c_in * 10 + c_out)
        x = jnp.asarray(rng.normal(size=(CALLS, batch, size, size, c_in)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(CALLS, 3, 3, c_in, c_out)), jnp.float32)
        grad_out = jnp.asarray(rng.normal(size=(CALLS, batch, size, size, c_out)), jnp.float32)
        runners = {}
        for name, use in (("kernels", True), ("xla", False)):
            runners[f"forward_{name}"] = compiled(conv._conv, x, kernel, use_kernels=use)
            if with_kernel_grad:
                runners[f"kernel_grad_{name}"] = compiled(conv._kernel_grad, x, grad_out, use_kernels=use)
        runners["forward_torch"], kernel_grad_torch = torch_runners(*map(np.asarray, (x, kernel, grad_out)))
        if with_kernel_grad:
            runners["kernel_grad_torch"] = kernel_grad_torch
        got = (jax.jit(lambda a, b: conv._conv(a, b, True))(x[0], kernel[0]),
               jax.jit(lambda a, b: conv._kernel_grad(a, b, True))(x[0], grad_out[0]))
        error = max(float(jnp.abs(g - w).max() / jnp.abs(w).max())
                    for g, w in zip(got, xla_reference(x[0], kernel[0], grad_out[0])))
        for run in runners.values():
            run()
        times = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000 / CALLS)
        ms = {name: statistics.median(t) for name, t in times.items()}
        row = {"shape": f"{size}x{size} {c_in}->{c_out}", "batch": batch, "max_rel_error_vs_xla": error,
               **{f"{name}_ms": value for name, value in ms.items()}}
        for op in ("forward", "kernel_grad") if with_kernel_grad else ("forward",):
            row[f"{op}_speedup_vs_xla"] = ms[f"{op}_xla"] / ms[f"{op}_kernels"]
            row[f"{op}_speedup_vs_torch"] = ms[f"{op}_torch"] / ms[f"{op}_kernels"]
        yield row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"ms per call, median of {args.rounds} rounds")
    for row in measure(args.rounds):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            line = f"{row['shape']:<14}"
            for op in ("forward", "kernel_grad"):
                if f"{op}_kernels_ms" in row:
                    line += (f" | {op.replace('_', ' ')}: kernels {row[f'{op}_kernels_ms']:6.2f}"
                             f"  xla {row[f'{op}_xla_ms']:6.2f}  torch {row[f'{op}_torch_ms']:6.2f}")
            print(f"{line} | error {row['max_rel_error_vs_xla']:.1e}", flush=True)


if __name__ == "__main__":
    main()
