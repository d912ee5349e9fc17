"""Shared fixtures of the parity suite: precision modes, MNIST batches, torch models with
non-trivial BatchNorm state, and comparison helpers with documented tolerances."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import torch_ref
from flaxdepth import data, registry

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "mnist"
EXPERIMENT_VARIANTS = Path(__file__).resolve().parents[1] / "experiments" / "variants.toml"

#: The suite covers the registry: the notebook's eight and the variants that experiments/ declares.
DECLARED_VARIANTS = tuple(registry.load_variants(EXPERIMENT_VARIANTS))
PARITY_VARIANTS = registry.variant_names()

#: Depths every parity check runs the notebook's variants at: 3 (no scanned layer) and 31 (scans of
#: nine layers, residual blocks on residual blocks; not a multiple of 3, as the notebook's k = 139:
#: it builds k // 3 = 10 layers per stage). Other depths compile the same programs with other scan
#: lengths; depth 6, a scan of one layer, is proven for every registered variant by
#: test_diagnose_parity.py (per-layer activations and gradients) and test_training_loop.py (whole
#: runs). Declared variants are built by the same code from their fields, so they run at 6 (every
#: kind of layer: a first conv and a scanned one with its skip), as the property-based
#: test_spec_parity.py runs random specs.
PARITY_DEPTHS = (3, 31)
DECLARED_DEPTHS = (6,)


def parity_depths(variant: str) -> tuple[int, ...]:
    return PARITY_DEPTHS if variant in registry.VARIANTS else DECLARED_DEPTHS


def variant_depth_cases(variants=PARITY_VARIANTS) -> list:
    """(variant, depth) parameters of the checks without a precision, ids "variant-k"."""
    return [pytest.param(v, d, id=f"{v}-{d}") for v in variants for d in parity_depths(v)]


def variant_depth_precision_cases(variants=PARITY_VARIANTS) -> list:
    """(variant, depth, precision) parameters of the numerical checks, ids "variant-k-dtype"; the
    precision is the `precision` fixture's indirect parameter. Every parity depth in float64; in
    float32 the deepest only: float32 differs from float64 in rounding, not in the program's
    structure (k = 3 against a scan), and rounding accumulates most, straining the float32
    tolerance most, at the deepest."""
    return [pytest.param(v, d, p, id=f"{v}-{d}-{p.name}")
            for v in variants for d in parity_depths(v) for p in (FLOAT64, FLOAT32)
            if p is FLOAT64 or d == max(parity_depths(v))]


@dataclasses.dataclass(frozen=True)
class Precision:
    """A dtype and the relative tolerance that float rounding allows in it.

    float64: the two frameworks sum in different orders; with unit rounding ~1e-16 their
    differences stay orders of magnitude below 1e-10, which catches any real bug.
    float32: unit rounding is 6e-8; through up to 33 layers, a 784-wide fc and BatchNorm's
    division by small variances the differences stay well below 1e-4, which leaves margin
    without hiding a wrong layout or formula (those give O(1)).
    `rtol` is the fixed bound of the checks of one computation (forward, statistics, loss,
    gradients); the SGD trajectories of test_parity.py take max(rtol, a multiple of what rounding
    alone does to torch's own run), as CHAOS_FACTOR there describes.
    """

    name: str
    numpy_dtype: type
    torch_dtype: torch.dtype
    rtol: float

    @contextlib.contextmanager
    def active(self):
        """JAX's x64 mode on or off to match, and torch's default dtype set accordingly."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.torch_dtype)
        try:
            with jax.enable_x64(self.numpy_dtype == np.float64):
                yield self
        finally:
            torch.set_default_dtype(previous)


FLOAT64 = Precision("float64", np.float64, torch.float64, 1e-10)
FLOAT32 = Precision("float32", np.float32, torch.float32, 1e-4)


@pytest.fixture(params=[FLOAT64, FLOAT32], ids=lambda p: p.name)
def precision(request):
    """A Precision, active for the test: both, or the one a case gives (variant_depth_precision_cases)."""
    with request.param.active() as p:
        yield p


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # torch's intra-op threads beside XLA's own pool slow the suite's small steps: one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist() -> data.Dataset:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"MNIST not found at {SHARED_MNIST}")
    return data.load_dataset("mnist", SHARED_MNIST)


@pytest.fixture(scope="session")
def mnist_batches(mnist):
    """Twenty distinct batches of 16 real training digits (uint8) with their labels."""
    images = mnist.train_images[: 20 * 16].reshape(20, 16, 28, 28)
    labels = mnist.train_labels[: 20 * 16].reshape(20, 16).astype(np.int64)
    return images, labels


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """One xdist group per variant (`--dist loadgroup`, pyproject.toml): a variant's parity tests
    run in one worker, where its compiled programs (the engine's are cached per variant, depth and
    dtype) serve every test that uses them instead of being compiled again in the other worker."""
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "variant" in params and item.path.parent == Path(__file__).parent:
            item.add_marker(pytest.mark.xdist_group(f"variant-{params['variant']}"))


def torch_model(variant: str, depth: int, precision: Precision, seed: int = 0) -> torch.nn.Module:
    """A torch_ref model with the variant's init, and norm affine parameters, BatchNorm running
    statistics and residual gates moved away from their defaults so that every term is exercised
    (a gate at 0 would give its branch's weights zero gradients)."""
    torch.manual_seed(seed)
    model = torch_ref.build(variant, depth).to(precision.torch_dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gate"):
                parameter.copy_(0.5 + torch.rand((), generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(0.5 + torch.rand(module.num_channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.num_channels, generator=generator))
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.num_batches_tracked.fill_(7)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over a whole tensor (0 when both are zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(actual, expected, rtol: float, what: str) -> float:
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"
    return error


#: Tensors much smaller than the rest of their state dict are compared against this fraction of
#: its global norm instead of their own: a conv bias followed by BatchNorm has a mathematically
#: zero gradient, so both frameworks hold rounding noise there whose ratio means nothing. A
#: wholly wrong tensor still fails unless it is smaller than rtol * NOISE_FLOOR of the global norm.
NOISE_FLOOR = 0.1


def state_dict_error(actual: dict, expected: dict) -> float:
    """The largest per-tensor relative error, each tensor scaled by max(its own norm, the floor)."""
    assert list(actual) == list(expected), "keys differ"
    floating = [k for k in expected if np.issubdtype(np.asarray(expected[k]).dtype, np.floating)]
    floor = NOISE_FLOOR * np.sqrt(sum(np.sum(np.square(expected[k], dtype=np.float64)) for k in floating))
    worst = 0.0
    for key in expected:
        a, e = np.asarray(actual[key], np.float64), np.asarray(expected[key], np.float64)
        worst = max(worst, float(np.linalg.norm(a - e) / max(np.linalg.norm(e), floor, np.finfo(float).tiny)))
    return worst


def assert_state_dicts_close(actual: dict, expected: dict, rtol: float, what: str) -> float:
    error = state_dict_error(actual, expected)
    if not error <= rtol:  # also catches NaN
        worst = max(expected, key=lambda k: state_dict_error({k: actual[k]}, {k: expected[k]}))
        raise AssertionError(f"{what} relative error {error:.3g} > {rtol:g} (worst tensor {worst})")
    return error


#: Largest relative error measured per (variant, precision), printed at the end of the run.
MEASURED: dict[tuple[str, str], float] = {}


def record(variant: str, precision: Precision, error: float) -> None:
    key = (variant, precision.name)
    MEASURED[key] = max(MEASURED.get(key, 0.0), error)


def pytest_sessionfinish(session):
    # Under pytest-xdist each worker measures its share: hand it to the controller.
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity_errors"] = json.dumps(
            [[variant, precision, error] for (variant, precision), error in MEASURED.items()])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for variant, precision, value in json.loads(node.workeroutput.get("parity_errors", "[]")):
        MEASURED[(variant, precision)] = max(MEASURED.get((variant, precision), 0.0), value)


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("largest relative error flaxdepth vs torch_ref")
    for (variant, precision), error in sorted(MEASURED.items()):
        terminalreporter.write_line(f"{variant:16s} {precision:8s} {error:.3g}")
