"""A quick check, before a sweep trains anything, that a variant computes what torch_ref computes.

A small depth, a few SGD steps on real batches, through the interop API and the engine's own
train_step. The full proof is the parity suite in parity_tests/; this guards a sweep against a
broken install or a local edit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_ref
from flaxdepth import interop, models, registry, train
from flaxdepth.data import Dataset, normalize
from flaxdepth.options import EngineOptions

#: float32 through a few layers and steps differs by ~1e-6 relative (parity suite); a wrong
#: layout, formula or init gives O(1). 1e-3 separates the two with room on any device.
TOLERANCE = 1e-3


class ParityError(RuntimeError):
    """flaxdepth and torch_ref disagree."""


@dataclasses.dataclass
class ParityReport:
    variant: str
    depth: int
    steps: int
    worst_logit_error: float
    worst_loss_error: float
    worst_param_error: float

    @property
    def worst(self) -> float:
        return max(self.worst_logit_error, self.worst_loss_error, self.worst_param_error)

    def __str__(self) -> str:
        return (f"parity {self.variant} k={self.depth}, {self.steps} SGD steps: relative error logits "
                f"{self.worst_logit_error:.1e}, loss {self.worst_loss_error:.1e}, "
                f"parameters {self.worst_param_error:.1e} (tolerance {TOLERANCE:g})")


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _heads(output):
    return output if isinstance(output, tuple) else (output,)


def quick_parity(variant: str | registry.Variant, dataset: Dataset, depth: int = 6, steps: int = 3, batch: int = 32,
                 lr: float | None = None, options: EngineOptions = EngineOptions()) -> ParityReport:
    """Compare eval-mode logits, then `steps` SGD-momentum steps of the engine's train_step as
    `options` compute it (losses and parameters)."""
    spec = registry.resolve(variant)
    lr = spec.lr if lr is None else lr
    torch.manual_seed(0)
    model = torch_ref.build(spec, depth).float()
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    variables = interop.from_torch(spec, depth, state_dict)

    images_u8 = dataset.train_images[: steps * batch].reshape(steps, batch, 28, 28)
    labels = dataset.train_labels[: steps * batch].reshape(steps, batch).astype(np.int64)
    model.eval()
    with torch.no_grad():
        expected = _heads(model(torch.from_numpy(normalize(images_u8[0]))))
    logits, _ = interop.apply(spec, depth, variables, normalize(images_u8[0]))
    logit_error = max(_relative(a, e.numpy()) for a, e in zip(_heads(logits), expected))

    flax_model = models.build_model(spec, depth, options=train.step_options(options, spec, depth, batch))
    state = train.TrainState(variables["params"], variables.get("batch_stats", {}),
                             train.optimizer_init(variables["params"], lr))
    step = jax.jit(lambda s, x, y: train.train_step(flax_model, s, x, y, bn_train=True))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=train.MOMENTUM)
    loss_error = param_error = 0.0
    with jax.default_matmul_precision("highest"):
        for i in range(steps):
            heads = _heads(model(torch.from_numpy(normalize(images_u8[i]))))
            target = torch.from_numpy(labels[i])
            loss = sum(torch.nn.functional.cross_entropy(h, target) for h in heads) / len(heads)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state, metrics = step(state, jnp.asarray(images_u8[i]), jnp.asarray(labels[i]))
            loss_error = max(loss_error, abs(float(metrics["loss"]) - loss.item()) / abs(loss.item()))
    exported = interop.to_torch(spec, depth, {"params": state.params, "batch_stats": state.batch_stats}
                                if spec.batchnorm else {"params": state.params})
    # Weights and residual gates: conv biases before a norm carry rounding noise (zero true gradient).
    for key, value in model.state_dict().items():
        if key.endswith(("weight", "gate")):
            param_error = max(param_error, _relative(exported[key], value.numpy()))
    report = ParityReport(spec.name, depth, steps, logit_error, loss_error, param_error)
    if not report.worst <= TOLERANCE:  # also catches NaN
        raise ParityError(f"flaxdepth disagrees with torch_ref: {report}; run `pytest parity_tests` "
                          f"for the full comparison, or pass --skip-parity to train anyway")
    return report
