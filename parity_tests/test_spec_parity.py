"""Any spec a user can declare computes the same in flaxdepth and torch_ref: a property-based test
(hypothesis) draws specs from the whole space (every field of registry.Variant) and compares, in
float64 at small depths, the forward pass in train and eval mode, the normalization statistics,
the loss and every gradient (relative error <= 1e-10, conftest's FLOAT64).

The example count is bounded for CI: 6 specs, derandomized so that a run is reproducible.
`FLAXDEPTH_SPEC_EXAMPLES=200 python -m pytest parity_tests/test_spec_parity.py` draws 200 at random.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flaxdepth import interop, registry
from flaxdepth.data import normalize
from conftest import FLOAT64, assert_close, assert_state_dicts_close, state_dict_numpy, torch_model

EXAMPLES = os.environ.get("FLAXDEPTH_SPEC_EXAMPLES")


@st.composite
def specs(draw) -> registry.Variant:
    channels = draw(st.integers(1, 6))
    init = draw(st.sampled_from(registry.INITS))
    return registry.validate(registry.Variant(
        name="drawn",
        activation=draw(st.sampled_from(registry.ACTIVATIONS)),
        negative_slope=draw(st.floats(0.0, 0.5)),
        norm=draw(st.sampled_from(registry.NORMS)),
        norm_groups=draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0])),
        residual=draw(st.sampled_from(registry.RESIDUALS)),
        residual_gate_init=draw(st.floats(-1.0, 1.0)),
        init=init,
        init_std=draw(st.floats(0.01, 0.3)),
        init_fan=draw(st.sampled_from(registry.FANS)),
        init_gain=1.0 if init == "normal" else draw(st.floats(0.5, 2.0)),  # normal's scale is init_std
        bias_std=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.5))),
        channels=channels,
        heads=draw(st.sampled_from(registry.HEADS)),
        lr=draw(st.floats(1e-4, 0.5)),
    ))


def heads(output) -> list[np.ndarray]:
    output = output if isinstance(output, tuple) else (output,)
    return [h.detach().numpy() if isinstance(h, torch.Tensor) else h for h in output]


@settings(max_examples=int(EXAMPLES or 6), derandomize=EXAMPLES is None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(), depth=st.sampled_from([3, 6]))
def test_any_spec_computes_the_same_in_both_frameworks(spec, depth, mnist_batches):
    images = normalize(mnist_batches[0][0], np.float64)
    labels = mnist_batches[1][0]
    with FLOAT64.active() as precision:
        model = torch_model(spec, depth, precision)
        variables = interop.from_torch(spec, depth, state_dict_numpy(model))
        for train_mode in (False, True):
            model.train(train_mode)
            with torch.no_grad():
                expected = heads(model(torch.from_numpy(images)))
            logits, updated = interop.apply(spec, depth, variables, images, train=train_mode)
            for i, (a, e) in enumerate(zip(heads(logits), expected)):
                assert_close(a, e, precision.rtol, f"{'train' if train_mode else 'eval'}-mode logits, head {i}")
            # train mode: BatchNorm's running statistics updated as torch updates them
            assert_state_dicts_close(interop.to_torch(spec, depth, updated), state_dict_numpy(model),
                                     precision.rtol, "normalization state")
        model = torch_model(spec, depth, precision).train()
        output = model(torch.from_numpy(images))
        outputs = output if isinstance(output, tuple) else (output,)
        torch_loss = sum(torch.nn.functional.cross_entropy(h, torch.from_numpy(labels)) for h in outputs) / len(outputs)
        torch_loss.backward()
        loss, grads = interop.loss_and_grads(spec, depth, variables, images, labels, train=True)
    assert_close(loss, torch_loss.item(), precision.rtol, "loss")
    assert_state_dicts_close(grads, {k: p.grad.numpy() for k, p in model.named_parameters()}, precision.rtol,
                             "gradients")
