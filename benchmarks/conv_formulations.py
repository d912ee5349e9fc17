"""How fast can R replicated 3x3 convolutions (each replica its own weights) run, by formulation?

A microbenchmark for issue 3: the engine vmaps per-replica weights, which turns every convolution
into a grouped one (R groups of 4-16 channels), unless a batching rule says otherwise (the
engine's, flaxdepth/conv.py, adopted after this benchmark's first run). This times one conv
layer's forward and backward (gradients for input, kernel and bias, as in training) at the three
stage shapes of the models (28x28x4, 14x14x8, 7x7x16, batch 256), for several ways of writing the
same convolution, all in one process, interleaved, median of the rounds. It also checks each against `lax.conv_general_dilated`.

    python benchmarks/conv_formulations.py --replicas 32 [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from flaxdepth import conv

STAGE_SHAPES = ((28, 4), (14, 8), (7, 16))  # (height = width, channels) of stages 1..3
TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]


def conv_lax(x, w, b):
    """XLA's convolution, NHWC / HWIO, pad 1: the engine's form before flaxdepth/conv.py."""
    y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _shifted(x):
    """The 9 views x_pad[:, dy:dy+H, dx:dx+W, :] of the zero-padded input, in TAPS order."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, dy:dy + h, dx:dx + w, :] for dy, dx in TAPS]


def conv_shift_fma(x, w, b):
    """9 * C_in broadcast multiply-adds: one elementwise (loop) fusion, no conv, no dot."""
    y = b
    for (dy, dx), xs in zip(TAPS, _shifted(x)):
        for i in range(x.shape[-1]):
            y = y + xs[..., i:i + 1] * w[dy, dx, i]
    return y


def conv_shift_einsum(x, w, b):
    """9 shifted dots with contraction over C_in."""
    return b + sum(jnp.einsum("nhwi,io->nhwo", xs, w[dy, dx]) for (dy, dx), xs in zip(TAPS, _shifted(x)))


def conv_patches(x, w, b):
    """im2col (XLA's patch extraction, a conv with a fixed identity kernel) and one dot."""
    patches = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # patch features are ordered (C_in, kh, kw)
    kernel = w.transpose(2, 0, 1, 3).reshape(-1, w.shape[-1])
    return patches @ kernel + b


@jax.custom_vjp
def conv_shift_custom(x, w, b):
    """Forward and input gradient as shift multiply-adds; kernel gradient from XLA's conv."""
    return conv_shift_fma(x, w, b)


def _shift_custom_fwd(x, w, b):
    return conv_shift_fma(x, w, b), (x, w)


def _shift_custom_bwd(residuals, g):
    x, w = residuals
    # input gradient of a pad-1 3x3 conv: the same conv of g with the kernel flipped and in/out swapped
    dx = conv_shift_fma(g, w[::-1, ::-1].transpose(0, 1, 3, 2), jnp.zeros(x.shape[-1], g.dtype))
    _, kernel_vjp = jax.vjp(lambda kernel: conv_lax(x, kernel, 0.0), w)
    (dw,) = kernel_vjp(g)
    return dx, dw, g.sum((0, 1, 2))


conv_shift_custom.defvjp(_shift_custom_fwd, _shift_custom_bwd)


def conv_engine(x, w, b):
    """flaxdepth's own (flaxdepth/conv.py): under vmap, the block-diagonal batching rule."""
    return conv.conv3x3(x, w) + b


PER_REPLICA = {"lax (grouped under vmap)": conv_lax, "engine (flaxdepth.conv)": conv_engine,
               "shift_fma": conv_shift_fma, "shift_fma custom_vjp": conv_shift_custom,
               "shift_einsum": conv_shift_einsum, "patches": conv_patches}


def conv_block_diagonal(xs, ws, bs):
    """Replicas folded into the channel axis: one dense conv with a block-diagonal kernel
    (R times the arithmetic, but a plain conv of R*C channels). Takes the stacked (R, ...) arrays."""
    r, n, h, wd, c = xs.shape
    x = xs.transpose(1, 2, 3, 0, 4).reshape(n, h, wd, r * c)
    kernel = jnp.einsum("rs,rhwio->hwriso", jnp.eye(r, dtype=ws.dtype), ws).reshape(3, 3, r * c, r * c)
    y = conv_lax(x, kernel, bs.reshape(-1))
    return y.reshape(n, h, wd, r, c).transpose(3, 0, 1, 2, 4)


def training_grads(conv, replicated: bool):
    """jit of (x, w, b, g) -> gradients of sum(conv(x) * g) for input, kernel and bias, R replicas."""
    def loss(x, w, b, g):
        return jnp.sum(conv(x, w, b) * g)
    grads = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(grads if replicated else jax.vmap(grads))


def measure(replicas: int, batch: int, rounds: int, steps: int, names=None, shapes=STAGE_SHAPES):
    """Yields one result row per (stage shape, formulation), a stage shape at a time."""
    formulations = {name: training_grads(fn, False) for name, fn in PER_REPLICA.items()}
    formulations["block_diagonal (replicas in channels)"] = training_grads(conv_block_diagonal, True)
    if names:  # the first (lax) stays: speedups are relative to it
        formulations = {k: v for i, (k, v) in enumerate(formulations.items())
                        if i == 0 or any(k.startswith(n) for n in names)}
    for size, channels in shapes:
        keys = jax.random.split(jax.random.key(size), 4)
        x = jax.random.normal(keys[0], (replicas, batch, size, size, channels))
        w = jax.random.normal(keys[1], (replicas, 3, 3, channels, channels)) / (3 * channels ** 0.5)
        b = jax.random.normal(keys[2], (replicas, channels))
        g = jax.random.normal(keys[3], x.shape)
        with jax.default_matmul_precision("highest"):
            reference = jax.jit(jax.vmap(jax.grad(lambda *a: jnp.sum(conv_lax(*a[:3]) * a[3]),
                                                  argnums=(0, 1, 2))))(x, w, b, g)
        times = {}
        for name, fn in formulations.items():
            start = time.perf_counter()
            out = jax.block_until_ready(fn(x, w, b, g))
            compile_s = time.perf_counter() - start
            error = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r))) for o, r in zip(out, reference))
            times[name] = {"compile_s": compile_s, "max_rel_error": error, "ms": []}
        for _ in range(rounds):
            for name, fn in formulations.items():
                start = time.perf_counter()
                for _ in range(steps):
                    out = fn(x, w, b, g)
                jax.block_until_ready(out)
                times[name]["ms"].append((time.perf_counter() - start) * 1000 / steps)
        base = statistics.median(times[next(iter(times))]["ms"])
        for name, t in times.items():
            ms = statistics.median(t["ms"])
            yield {"stage_shape": f"{size}x{size}x{channels}", "formulation": name, "replicas": replicas,
                   "ms_per_layer_fwd_bwd": round(ms, 3), "ms_per_model": round(ms / replicas, 4),
                   "speedup_vs_lax": round(base / ms, 2), "compile_s": round(t["compile_s"], 2),
                   "max_rel_error_vs_lax_highest": float(f"{t['max_rel_error']:.2e}")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--only", nargs="*", help="formulation name prefixes to time (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    for row in measure(args.replicas, args.batch_size, args.rounds, args.steps, args.only):
        row["device"] = f"{device.platform}:{device.device_kind}"
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['stage_shape']:>9}  {row['formulation']:<38} {row['ms_per_layer_fwd_bwd']:9.3f} ms"
                  f"  x{row['speedup_vs_lax']:<6} err {row['max_rel_error_vs_lax_highest']:.1e}"
                  f"  compile {row['compile_s']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
