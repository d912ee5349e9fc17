"""Engine options: how flaxdepth computes, as opposed to what it trains (`config.RunConfig`).

One frozen dataclass, passed explicitly from the command line (or the caller) down to the models
and the compiled programs. It is part of every compile cache key (`train.compiled_functions`),
so changing an option compiles new programs, and it is stored in every results row. Pure Python:
importing it pulls in neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses
import os

# Arithmetic of convolutions and matmuls: "default" is each framework's own (on recent NVIDIA GPUs
# TF32 for JAX's convs and matmuls and for torch's cuDNN convs), "highest" full float32 in both;
# "tf32" rounds the float32 operands of every convolution, forward and backward, to TF32 in both,
# on any device, and keeps the Linear head in float32: torch's GPU defaults (cuDNN convolutions
# TF32, CUDA matmuls not), reproducible on a CPU.
PRECISIONS = ("default", "highest", "tf32")
#: What a training step's backward pass recomputes of the scanned layers (flaxdepth/models.py):
#: "none" keeps what each layer's gradient needs (about one activation-sized array per layer);
#: "layers" keeps each layer's input and convolution output and recomputes BatchNorm and the
#: activation; "nested" keeps only the input of every block of about sqrt(L) layers and recomputes
#: the block's layers (memory ~ sqrt(L) activations for one more forward pass of arithmetic).
REMATERIALIZATIONS = ("none", "layers", "nested")
#: Not an option of a model: the command lines' request to choose per depth and batch
#: (flaxdepth.train.step_options), resolved before any program is built.
AUTO = "auto"
#: Setting this environment variable to 0 turns the CPU kernels off in the command lines' defaults.
CPU_KERNELS_ENV = "FLAXDEPTH_CPU_KERNELS"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine computes; none of these changes what a model computes beyond float rounding."""

    #: On CPUs, float32 convolutions and train-mode BatchNorm + activation run flaxdepth's own C++
    #: kernels (flaxdepth.cpu_kernels); False, or where they cannot be built: XLA's operations.
    cpu_kernels: bool = True
    #: What the backward pass recomputes of the scanned layers: one of REMATERIALIZATIONS, or AUTO
    #: (resolved by flaxdepth.train.step_options for each depth and batch size). True and False,
    #: the values of stored rows and of callers of the boolean form, mean "layers" and "none".
    rematerialize: str = "none"
    #: On accelerators, vmapped replicas are folded into block-diagonal convolutions of at most this
    #: many replicas each (flaxdepth/conv.py; the best block size on an H200, BENCHMARKS.md).
    replicas_per_block: int = 8
    #: "default", "highest" or "tf32" (PRECISIONS): the precision of the models' convolutions and
    #: matmuls (lax.Precision.HIGHEST: no TF32; tf32: operands rounded, flaxdepth/conv.py), and
    #: torch's for `--framework torch` (flaxdepth/torch_runner.py).
    precision: str = "default"
    #: How a device trains its replicas: None chooses by platform (vmapped on accelerators; on CPUs
    #: one after the other, since XLA's CPU grouped convolution is slower per model), True vmaps.
    vmap_replicas: bool | None = None

    def __post_init__(self):
        if isinstance(self.rematerialize, bool):
            object.__setattr__(self, "rematerialize", "layers" if self.rematerialize else "none")
        if self.rematerialize not in (*REMATERIALIZATIONS, AUTO):
            raise ValueError(f"rematerialize must be one of {', '.join((*REMATERIALIZATIONS, AUTO))}, "
                             f"got {self.rematerialize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.replicas_per_block, bool) or not isinstance(self.replicas_per_block, int) \
                or self.replicas_per_block < 1:
            raise ValueError(f"replicas per block must be an integer of at least 1, got {self.replicas_per_block!r}")

    @classmethod
    def from_environment(cls, **overrides) -> "EngineOptions":
        """The command lines' defaults: FLAXDEPTH_CPU_KERNELS=0 turns the CPU kernels off, unless
        `overrides` sets them."""
        defaults = {"cpu_kernels": os.environ.get(CPU_KERNELS_ENV, "1").strip() != "0"}
        return cls(**{**defaults, **overrides})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
