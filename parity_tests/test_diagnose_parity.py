"""flaxdepth.diagnose == torch_ref.diagnose: every per-layer statistic of every registered variant,
with the same weights (conftest's torch_model: BatchNorm state, norm affines and gates off their
defaults) and the same 16 training digits, in float64, BatchNorm in train mode.

k = 6: each stage's first conv and one scanned layer, so both kinds of layer and the stacked
intermediates of the scan are compared (deeper scans stack more of the same). One compiled
program per variant, compiled without XLA's backend optimizations (it runs once on 16 images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flaxdepth import interop, measure
from flaxdepth.data import normalize
from torch_ref import diagnose as torch_diagnose
from conftest import FLOAT64, NOISE_FLOOR, PARITY_VARIANTS, record, state_dict_numpy, torch_model

DEPTH = 6


def statistic_errors(actual: dict, expected: dict) -> dict[str, float]:
    """Per key, the relative error of one layer's statistics against torch_ref's.

    Sums of terms of both signs are measured against their terms' size, not their own: a mean
    against the root mean square of its values (sqrt(mean^2 + variance)), an average channel
    squared mean against the layer's second moment (plus its average channel variance), and a
    parameter's gradient norm against NOISE_FLOOR x the layer's whole gradient: a conv bias before
    train-mode BatchNorm has a zero gradient in exact arithmetic, which both frameworks hold as
    rounding noise (1e-17 here) whose own ratio means nothing.
    """
    def scale(key):
        if key.endswith("_mean") and key != "avg_channel_squared_mean":
            return math.hypot(expected[key], math.sqrt(expected[key.removesuffix("_mean") + "_variance"]))
        if key == "avg_channel_squared_mean":
            return expected[key] + expected["avg_channel_variance"]
        return abs(expected[key])

    errors = {key: abs(actual[key] - expected[key]) / scale(key) if scale(key) else abs(actual[key])
              for key in expected if key not in ("stage", "layer", "param_grad_norms")}
    grads, expected_grads = actual["param_grad_norms"], expected["param_grad_norms"]
    floor = NOISE_FLOOR * math.sqrt(sum(g * g for g in expected_grads.values()))
    errors.update({f"grad {name}": abs(grads[name] - g) / max(g, floor) for name, g in expected_grads.items()})
    return errors


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_layer_diagnostics_agree_with_torch_ref(variant, mnist_batches):
    images_u8, labels = mnist_batches[0][0], mnist_batches[1][0]
    with FLOAT64.active():
        model = torch_model(variant, DEPTH, FLOAT64)
        variables = interop.from_torch(variant, DEPTH, state_dict_numpy(model))
        images = normalize(images_u8, np.float64)
        expected = torch_diagnose.layer_diagnostics(model, torch.from_numpy(images), torch.from_numpy(labels))
        actual = measure.layer_diagnostics(variant, DEPTH, variables, images.transpose(0, 2, 3, 1), labels,
                                            fast_compile=True)

    assert [(layer["stage"], layer["layer"]) for layer in actual["layers"]] == \
        [(stage, layer) for stage in range(3) for layer in range(DEPTH // 3)]
    assert [(layer["stage"], layer["layer"]) for layer in expected["layers"]] == \
        [(layer["stage"], layer["layer"]) for layer in actual["layers"]]
    worst = abs(actual["loss"] - expected["loss"]) / expected["loss"]
    for index, (mine, theirs) in enumerate(zip(actual["layers"], expected["layers"])):
        assert list(mine) == list(theirs), f"layer {index}: keys differ"
        assert list(mine["param_grad_norms"]) == list(theirs["param_grad_norms"]), f"layer {index}: parameters differ"
        assert all(value is not None for value in theirs.values()), f"layer {index}: a non-finite statistic"
        for key, error in statistic_errors(mine, theirs).items():
            assert error <= FLOAT64.rtol, f"layer {index} {key}: {mine.get(key)} vs {theirs.get(key)}, " \
                                          f"relative error {error:.3g} > {FLOAT64.rtol:g}"
            worst = max(worst, error)
    record(variant, FLOAT64, worst)
