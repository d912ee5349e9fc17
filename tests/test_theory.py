"""flaxdepth.theory: mean-field values that follow from the formulas by hand, closed forms against
the quadrature, the CLI, the per-variant predictions and a wide random network at initialization."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from scipy import integrate

from flaxdepth import registry, theory
from registered_variants import REGISTERED_VARIANTS


def field(name, sigma_w2, sigma_b2, **kwargs) -> theory.MeanField:
    return theory.mean_field(name, sigma_w2, sigma_b2, **kwargs)


def arc_cosine(q, c):
    """E[relu(u1) relu(u2)] (Cho & Saul's arc-cosine kernel of degree 1)."""
    return q / (2 * math.pi) * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c)


@pytest.mark.parametrize("name", registry.ACTIVATIONS)
def test_derivatives_match_finite_differences(name):
    act = theory.activation(name, 0.2)
    x = np.array([-2.7, -0.9, -0.3, 0.4, 1.1, 3.2])  # away from the kinks at 0
    step = 1e-5
    for branch, points in ((act.positive, x[x > 0]), (act.negative, x[x < 0])):
        first = (branch.value(points + step) - branch.value(points - step)) / (2 * step)
        second = (branch.first(points + step) - branch.first(points - step)) / (2 * step)
        np.testing.assert_allclose(branch.first(points), first, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(branch.second(points), second, rtol=1e-6, atol=1e-8)


def test_numpy_activations_match_their_definitions():
    x = np.linspace(-4, 4, 17)
    pieces = {name: theory.activation(name) for name in ("elu", "selu", "gelu", "gelu_tanh", "silu", "softplus")}

    def value(name):
        return pieces[name](x)
    np.testing.assert_allclose(value("elu"), np.where(x > 0, x, np.exp(x) - 1), rtol=1e-14)
    np.testing.assert_allclose(value("selu"), 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
                               rtol=1e-14)
    np.testing.assert_allclose(value("gelu"), [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x], rtol=1e-13,
                               atol=1e-16)
    np.testing.assert_allclose(value("gelu_tanh"), value("gelu"), atol=1e-3)  # the tanh approximation's error
    np.testing.assert_allclose(value("silu"), x / (1 + np.exp(-x)), rtol=1e-14)
    np.testing.assert_allclose(value("softplus"), np.log1p(np.exp(x)), rtol=1e-14)


@pytest.mark.parametrize("sigma_w2", [0.09, 0.36, 0.8])
def test_tanh_without_bias_below_one_is_ordered_at_zero_length(sigma_w2):
    """q* = 0, chi_1 = sigma_w^2 tanh'(0)^2 = sigma_w^2, xi_c = -1 / log(sigma_w^2)."""
    f = field("tanh", sigma_w2, 0.0)
    assert f.q_star == 0.0
    assert f.chi_1 == pytest.approx(sigma_w2, abs=1e-12)
    assert f.xi_c == pytest.approx(-1 / math.log(sigma_w2), rel=1e-10)
    assert f.xi_q == pytest.approx(f.xi_c, rel=1e-10)  # the length map's slope at 0 is sigma_w^2 too
    assert f.phase == "ordered" and f.c_star == 1.0
    assert f.predicted_depth == pytest.approx(6 * f.xi_c)


def test_notebook_naive_init_is_deep_in_the_ordered_phase():
    assert field("tanh", 9 * 4 * 0.05**2, 0.0).xi_c == pytest.approx(0.4153, abs=1e-4)


@pytest.mark.parametrize("sigma_w2, sigma_b2", [(0.5, 0.0), (1.0, 0.3), (1.5, 0.1), (1.99, 0.02)])
def test_relu_closed_forms(sigma_w2, sigma_b2):
    """chi_1 = sigma_w^2 / 2 exactly; the length map sigma_w^2 q / 2 + sigma_b^2 has q* = sigma_b^2 /
    (1 - sigma_w^2 / 2)."""
    f = field("relu", sigma_w2, sigma_b2)
    assert abs(f.chi_1 - sigma_w2 / 2) <= 1e-12
    assert f.q_star == pytest.approx(sigma_b2 / (1 - sigma_w2 / 2), rel=1e-12, abs=1e-300)
    assert f.phase == "ordered" and f.xi_c == pytest.approx(-1 / math.log(sigma_w2 / 2), rel=1e-12)
    act = theory.activation("relu")
    assert theory.length_map(act, sigma_w2, sigma_b2, 0.7) == pytest.approx(sigma_w2 * 0.7 / 2 + sigma_b2, rel=1e-14)


def test_relu_is_critical_at_two_and_explodes_beyond():
    at_two = field("relu", 2.0, 0.0, q0=0.3)
    assert at_two.chi_1 == 1.0 and at_two.phase == "critical"
    assert at_two.q_star == 0.3  # the length map is the identity: every q is fixed
    assert math.isinf(at_two.xi_c) and math.isinf(at_two.xi_q) and math.isinf(at_two.predicted_depth)
    assert theory.critical_sigma_w2("relu", 0.0) == 2.0
    assert theory.critical_sigma_w2("relu", 0.1) is None  # chi_1 = 1 only where q grows without bound
    beyond = field("relu", 2.5, 0.0)
    assert beyond.phase == "exploding" and math.isinf(beyond.q_star) and beyond.chi_1 == 1.25
    assert math.isnan(beyond.xi_c) and math.isnan(beyond.predicted_depth)
    assert field("relu", 2.0, 0.1).phase == "exploding"  # q grows by sigma_b^2 every layer
    assert field("leaky_relu", 2.0, 0.0, negative_slope=0.5).chi_1 == pytest.approx(1.25, abs=1e-15)


def test_piecewise_quadrature_matches_relus_closed_forms():
    """relu through the quadrature for kinked activations (Gauss-Legendre either side of 0, polar
    sectors for pairs): E[phi'^2] = 1/2 to 1e-12, so chi_1 = 1 at sigma_w^2 = 2 (Gauss-Hermite with
    finite differences across the kink gives 0.94), and the arc-cosine kernel."""
    quadrature = dataclasses.replace(theory.activation("relu"), linear_slopes=None)
    for q in (1e-6, 0.3, 1.0, 40.0):
        assert abs(theory.slope_moment(quadrature, q) - 0.5) <= 1e-12
        assert theory.second_moment(quadrature, q) == pytest.approx(q / 2, rel=1e-12)
        assert abs(theory.length_slope_moment(quadrature, q) - 0.5) <= 1e-12
    assert abs(2 * theory.slope_moment(quadrature, theory.fixed_point(quadrature, 2.0, 0.0)) - 1) <= 1e-12
    for c in (-0.9, 0.0, 0.5, 0.99, 1.0):
        assert theory.pair_moment(quadrature, 0.7, c) == pytest.approx(arc_cosine(0.7, c), rel=1e-11, abs=1e-14)
        assert theory.pair_moment(theory.activation("relu"), 0.7, c) == pytest.approx(arc_cosine(0.7, c), rel=1e-14)
        slopes = (math.pi - math.acos(c)) / (2 * math.pi)
        assert theory.pair_slope_moment(quadrature, 0.7, c) == pytest.approx(slopes, rel=1e-11)


def density(z):
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def cartesian_pair_integral(act, q, c, nodes=100) -> float:
    """E[phi(u1) phi(u2)] over (z1, z2) on [-12, 12]^2: Gauss-Legendre in z1 on each side of 0, and
    in z2 on each side of the kink line c z1 + sqrt(1 - c^2) z2 = 0 (independent of the module's
    polar sectors)."""
    x, w = leggauss(nodes)
    root, s = math.sqrt(q), math.sqrt(1 - c * c)

    def scaled(low, high):  # nodes and weights on [low, high] (arrays broadcast)
        return (high - low) / 2 * x + (high + low) / 2, (high - low) / 2 * w

    total = 0.0
    for z1, w1 in (scaled(-12.0, 0.0), scaled(0.0, 12.0)):
        kink = (-c * z1 / s)[:, None]
        for z2, w2 in (scaled(-12.0, kink), scaled(kink, 12.0)):
            values = act(root * z1)[:, None] * act(root * (c * z1[:, None] + s * z2))
            density = np.exp(-(z1[:, None] ** 2 + z2**2) / 2) / (2 * math.pi)
            total += float(np.sum(w1[:, None] * w2 * density * values))
    return total


@pytest.mark.parametrize("name", ["elu", "selu", "tanh", "gelu"])
def test_pair_integrals_against_their_limits_and_a_nested_integral(name):
    """c = 1: the one-variable moments; c = 0: E[phi]^2; c = 0.9: a Cartesian product rule."""
    act = theory.activation(name)
    for q in (1.3, 30.0):
        assert theory.pair_moment(act, q, 1.0) == pytest.approx(theory.second_moment(act, q), rel=1e-11)
        assert theory.pair_slope_moment(act, q, 1.0) == pytest.approx(theory.slope_moment(act, q), rel=1e-11)
        mean = theory.gaussian_mean(act, q, lambda b, u: b.value(u))
        assert theory.pair_moment(act, q, 0.0) == pytest.approx(mean * mean, rel=1e-10, abs=1e-15)
        assert theory.pair_moment(act, q, 0.9) == pytest.approx(cartesian_pair_integral(act, q, 0.9), rel=1e-9)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "elu", "selu"])
def test_one_variable_integrals_against_adaptive_quad_and_gauss_hermite(name):
    """E[phi(sqrt(q) z)^2] against scipy's quad (split at the kink) up to q = 1e3, where Gauss-Hermite
    stops converging for tanh, and against 101-node Gauss-Hermite at q <= 0.5 for smooth ones."""
    act = theory.activation(name)
    for q in (0.01, 0.5, 3.0, 1e3):
        exact = sum(integrate.quad(lambda z: float(act(np.array(math.sqrt(q) * z))) ** 2 * density(z), a, b,
                                   epsabs=1e-15, epsrel=1e-12, limit=200)[0] for a, b in ((-40, 0), (0, 40)))
        assert theory.second_moment(act, q) == pytest.approx(exact, rel=1e-11)
    nodes, weights = hermegauss(101)
    if name in ("tanh", "sigmoid", "gelu"):
        for q in (0.01, 0.5):
            hermite = weights @ act(math.sqrt(q) * nodes) ** 2 / weights.sum()
            assert theory.second_moment(act, q) == pytest.approx(hermite, rel=1e-12)


def test_selu_with_lecun_weights_has_its_self_normalizing_fixed_point():
    """E[selu(z)^2] = 1 for z ~ N(0, 1) (Klambauer et al. 2017): q* = 1 at sigma_w^2 = 1, sigma_b = 0."""
    assert field("selu", 1.0, 0.0, q0=3.0).q_star == pytest.approx(1.0, abs=1e-9)
    assert field("selu", 1.0, 0.0, q0=0.2).q_star == pytest.approx(1.0, abs=1e-9)


def test_identity_is_linear():
    ordered = field("identity", 0.5, 0.2)
    assert ordered.q_star == pytest.approx(0.4, rel=1e-14) and ordered.chi_1 == 0.5
    assert ordered.xi_c == pytest.approx(1 / math.log(2)) and ordered.xi_q == pytest.approx(1 / math.log(2))
    assert field("identity", 1.0, 0.0, q0=2.5).q_star == 2.5
    assert field("identity", 1.0, 0.0).phase == "critical"
    assert field("identity", 1.1, 0.0).phase == "exploding"
    assert theory.pair_moment(theory.activation("identity"), 2.0, 0.3) == pytest.approx(0.6, rel=1e-14)
    np.testing.assert_allclose(theory.variance_map(theory.activation("identity"), 0.5, 0.2, 2.0, 3),
                               [2.0, 1.2, 0.8, 0.6], rtol=1e-14)


def test_tanh_critical_line():
    critical = theory.critical_sigma_w2("tanh", 0.05)
    assert 1.75 <= critical <= 1.77
    at = field("tanh", critical, 0.05)
    assert at.phase == "critical" and abs(at.chi_1 - 1) <= 1e-9 and math.isinf(at.xi_c)
    assert 0.55 <= at.q_star <= 0.59
    assert math.isfinite(at.xi_q)  # xi_q stays finite on the critical line (Schoenholz et al.)
    assert theory.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-6)


def test_xi_c_diverges_toward_the_critical_line():
    critical = theory.critical_sigma_w2("tanh", 0.05)
    for side, phase in ((-1, "ordered"), (1, "chaotic")):
        points = [field("tanh", critical * (1 + side * gap), 0.05) for gap in (0.1, 0.01, 0.001)]
        assert [p.phase for p in points] == [phase] * 3
        depths = [p.xi_c for p in points]
        assert depths[0] < depths[1] < depths[2] and depths[2] > 100, depths
    # ordered side: xi_c = -1 / log(chi_1) ~ 1 / (1 - chi_1)
    near = field("tanh", critical * 0.999, 0.05)
    assert near.xi_c * (1 - near.chi_1) == pytest.approx(1, abs=1e-3)


def test_chaotic_phase_has_its_correlation_fixed_point():
    """tanh with sigma_b = 0 is odd: c* = 0. With a bias c* lies in (0, 1) and maps to itself."""
    odd = field("tanh", 3.0, 0.0)
    assert odd.phase == "chaotic" and odd.chi_1 > 1 and abs(odd.c_star) < 1e-9 and 0 < odd.xi_c < math.inf
    biased = field("tanh", 3.0, 0.1)
    assert 0 < biased.c_star < 1
    act = theory.activation("tanh")
    assert theory.correlation_map(act, 3.0, 0.1, biased.q_star, biased.c_star) == pytest.approx(biased.c_star,
                                                                                                 abs=1e-12)


def test_phase_labels():
    assert field("tanh", 0.5, 0.05).phase == "ordered"
    assert field("tanh", 1.0, 0.0).phase == "critical"
    assert field("elu", 1.0, 0.0).phase == "critical"  # q* = 0 and elu'(0) = 1
    assert field("tanh", 4.0, 0.05).phase == "chaotic"
    assert field("elu", 3.0, 0.0).phase == "exploding"
    assert field("sigmoid", 4.0, 0.1).phase == "ordered"


def test_variance_map_iterates_the_length_map_to_q_star():
    act = theory.activation("tanh")
    q = theory.variance_map(act, 1.5, 0.05, 2.0, 60)
    assert q[0] == 2.0 and q[1] == pytest.approx(theory.length_map(act, 1.5, 0.05, 2.0))
    assert q[-1] == pytest.approx(field("tanh", 1.5, 0.05, q0=2.0).q_star, rel=1e-10)


def test_bad_values_raise():
    with pytest.raises(ValueError, match="sigma_w"):
        theory.mean_field("tanh", -1.0, 0.0)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        theory.mean_field("swish", 1.0, 0.0)


# --- command line --------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = theory.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_point(capsys):
    code, out, err = run_cli(capsys, "--activation", "tanh", "--sigma-w2", "0.36", "--sigma-b2", "0", "--json",
                             "--layers", "2")
    data = json.loads(out)
    assert code == 0 and not err
    assert {"q_star", "chi_1", "xi_q", "xi_c", "phase", "predicted_depth", "c_star"} <= set(data)
    assert data["q_star"] == 0.0 and data["phase"] == "ordered"
    assert data["xi_c"] == pytest.approx(-1 / math.log(0.36)) and data["predicted_depth"] == pytest.approx(6 * data["xi_c"])
    assert data["variances"][0] == 1.0 and len(data["variances"]) == 3


def test_cli_json_infinite_and_undefined(capsys):
    _, out, _ = run_cli(capsys, "--activation", "relu", "--sigma-w2", "3", "--sigma-b2", "0", "--json")
    data = json.loads(out)
    assert data["q_star"] == "inf" and data["phase"] == "exploding"
    assert data["xi_c"] is None and data["predicted_depth"] is None and data["chi_1"] == 1.5
    _, out, _ = run_cli(capsys, "--activation", "tanh", "--sigma-w2", "1", "--sigma-b2", "0", "--json")
    assert json.loads(out)["xi_c"] == "inf"


def test_cli_critical_and_tables(capsys):
    _, out, _ = run_cli(capsys, "--critical", "--activation", "tanh", "--sigma-b2", "0.05", "--json")
    assert 1.75 <= json.loads(out)["critical_sigma_w2"] <= 1.77
    _, out, _ = run_cli(capsys, "--critical", "--activation", "relu", "--sigma-b2", "0.05")
    assert "no sigma_w^2 with chi_1 = 1" in out
    _, out, _ = run_cli(capsys, "--activation", "tanh", "--sigma-w2", "4", "--sigma-b2", "0.05")
    assert "phase    chaotic" in out
    code, out, _ = run_cli(capsys, "--variant", "tanh")
    assert code == 0 and out.count("ordered") == 3
    _, out, _ = run_cli(capsys, "--variant", "elu_bn")
    assert "does not apply" in out and "batch normalization" in out


def test_cli_variant_json(capsys):
    _, out, _ = run_cli(capsys, "--variant", "tanh_newinit", "--json")
    data = json.loads(out)
    assert data["applies"] is True and [s["phase"] for s in data["stages"]] == ["critical"] * 3
    assert data["predicted_k"] == "inf"
    _, out, _ = run_cli(capsys, "--variant", "resnet", "--json")
    data = json.loads(out)
    assert data["applies"] is False and data["stages"] == [] and data["predicted_k"] is None and data["reason"]


def test_cli_declared_variant(capsys, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[variants.t_theory_orthogonal]\nactivation = "tanh"\ninit = "orthogonal"\ninit_gain = 1.2\n')
    try:
        _, out, _ = run_cli(capsys, "--variant", "t_theory_orthogonal", "--variants-file", str(path), "--json")
    finally:
        registry.unregister("t_theory_orthogonal")
    assert [s["sigma_w2"] for s in json.loads(out)["stages"]] == pytest.approx([1.44] * 3)


@pytest.mark.parametrize("argv, message", [
    (["--activation", "swish", "--sigma-w2", "1", "--sigma-b2", "0"], "unknown activation 'swish'; choose one of"),
    (["--activation", "tanh", "--sigma-w2", "-1", "--sigma-b2", "0"], "--sigma-w2 is a variance"),
    (["--activation", "tanh", "--sigma-w2", "1", "--sigma-b2", "nan"], "--sigma-b2 is a variance"),
    (["--activation", "tanh", "--sigma-w2", "1", "--sigma-b2", "0", "--q0", "0"], "--q0 is the input variance"),
    (["--activation", "tanh", "--sigma-w2", "x", "--sigma-b2", "0"], "invalid float value: 'x'"),
    (["--activation", "tanh", "--sigma-w2", "1"], "give --activation NAME --sigma-w2 X --sigma-b2 Y"),
    (["--variant", "nope"], "unknown variant 'nope'; choose one of"),
    (["--variant", "tanh", "--sigma-w2", "1"], "drop --sigma-w2"),
    (["--variant", "x", "--variants-file", "/nonexistent/variants.toml"], "no such file"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert err.startswith("python -m flaxdepth.theory: error: ")


def test_importing_theory_pulls_in_neither_jax_nor_torch():
    code = "import sys, flaxdepth.theory; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# --- per variant ---------------------------------------------------------------------------------

def test_notebook_naive_init_per_stage():
    """s = 0.05: sigma_w^2 = 9 C 0.0025 for the stage's C x C layers (q* = 0, chi_1 = sigma_w^2), its
    first conv 9 C_in 0.0025."""
    prediction = theory.predict_variant("tanh")
    assert prediction.applies and prediction.reason is None
    for stage, (c_in, c) in zip(prediction.stages, ((1, 4), (4, 8), (8, 16))):
        f = stage.mean_field
        assert (stage.channels_in, stage.channels) == (c_in, c)
        assert f.sigma_w2 == pytest.approx(9 * c * 0.0025) and f.sigma_b2 == 0
        assert stage.first_layer_sigma_w2 == pytest.approx(9 * c_in * 0.0025)
        assert f.q_star == 0 and f.chi_1 == pytest.approx(f.sigma_w2) and f.phase == "ordered"
        assert f.xi_c == pytest.approx(-1 / math.log(9 * c * 0.0025))
    assert prediction.predicted_k == pytest.approx(3 * 6 / -math.log(0.09))


def test_glorot_style_same_width_layers_are_critical():
    for name in ("tanh_newinit", "elu", "elu_multihead"):
        prediction = theory.predict_variant(name)
        assert [s.mean_field.sigma_w2 for s in prediction.stages] == pytest.approx([1.0] * 3)
        assert [s.first_layer_sigma_w2 for s in prediction.stages] == pytest.approx([0.25, 0.5, 0.5])
        assert {s.mean_field.phase for s in prediction.stages} == {"critical"}


@pytest.mark.parametrize("name", REGISTERED_VARIANTS)
def test_theory_applies_exactly_to_plain_variants(name):
    spec = registry.get_variant(name)
    prediction = theory.predict_variant(name)
    plain = spec.norm == "none" and spec.residual == "none"
    assert prediction.applies == plain
    if not plain:
        assert prediction.stages == () and math.isnan(prediction.predicted_k)
        assert ("normalization" in prediction.reason) == (spec.norm != "none")
        assert ("residual" in prediction.reason) == (spec.residual != "none")
        assert prediction.to_json()["predicted_k"] is None


def test_declared_inits():
    """He (fan in) gives relu sigma_w^2 = 2; orthogonal and delta-orthogonal same-width layers gain^2;
    a bias its std squared; widths from `channels`."""
    he = theory.predict_variant(registry.Variant("t_he", "relu", init="he", init_fan="in", bias_std=0.1, channels=6))
    assert [(s.channels_in, s.channels) for s in he.stages] == [(1, 6), (6, 12), (12, 24)]
    assert [s.mean_field.sigma_w2 for s in he.stages] == pytest.approx([2.0] * 3)
    assert he.stages[0].mean_field.sigma_b2 == pytest.approx(0.01)
    assert he.stages[0].mean_field.phase == "exploding"  # relu at sigma_w^2 = 2 with a bias
    delta = theory.predict_variant(registry.Variant("t_delta", "tanh", init="delta_orthogonal", init_gain=0.9))
    assert [s.mean_field.sigma_w2 for s in delta.stages] == pytest.approx([0.81] * 3)
    assert [s.first_layer_sigma_w2 for s in delta.stages] == pytest.approx([0.81 / 4, 0.81 / 2, 0.81 / 2])
    orthogonal = theory.predict_variant(registry.Variant("t_orth", "tanh", init="orthogonal", init_gain=1.5))
    assert [s.first_layer_sigma_w2 for s in orthogonal.stages] == pytest.approx([2.25] * 3)


def test_conv_sigma_w2_follows_the_drawn_orthogonal_kernels():
    """The convention against explicit draws like flaxdepth's: an orthogonal (9 C_in x C_out) kernel
    with orthonormal columns and a delta-orthogonal centre tap M with M M^T = I, times the gain:
    mean over output channels of the squared weight norm into them."""
    rng = np.random.default_rng(0)
    gain = 1.3
    for c_in, c_out in ((4, 4), (4, 8), (8, 16)):
        columns, _ = np.linalg.qr(rng.standard_normal((9 * c_in, c_out)))
        spec = registry.Variant("t_o", "tanh", init="orthogonal", init_gain=gain)
        assert theory.conv_sigma_w2(spec, c_in, c_out) == pytest.approx(np.mean(np.sum((gain * columns) ** 2, 0)))
        rows, _ = np.linalg.qr(rng.standard_normal((c_out, c_in)))  # (C_out x C_in), orthonormal columns
        centre = gain * rows.T  # C_in x C_out with orthonormal rows
        spec = registry.Variant("t_d", "tanh", init="delta_orthogonal", init_gain=gain)
        assert theory.conv_sigma_w2(spec, c_in, c_out) == pytest.approx(np.mean(np.sum(centre**2, 0)))


# --- a wide random network at initialization -----------------------------------------------------

WIDTH, LAYERS, BATCH, NETWORKS = 500, 6, 8, 16


def measured_variances(name, sigma_w2, sigma_b2, q0, rng) -> np.ndarray:
    """Mean squared pre-activation per layer of NETWORKS fully connected networks of WIDTH units,
    weights N(0, sigma_w^2 / WIDTH), biases N(0, sigma_b^2), on BATCH Gaussian inputs of variance q0."""
    phi = theory.activation(name)
    h = rng.standard_normal((NETWORKS, BATCH, WIDTH)) * math.sqrt(q0)
    variances = [np.mean(h * h)]
    for _ in range(LAYERS):
        weights = rng.standard_normal((NETWORKS, WIDTH, WIDTH), dtype=np.float32) * math.sqrt(sigma_w2 / WIDTH)
        # einsum rather than @: OpenBLAS' threads slow these small products 50-fold on a loaded machine
        h = np.einsum("nbi,nij->nbj", phi(h), weights) + rng.standard_normal((NETWORKS, 1, WIDTH)) * math.sqrt(sigma_b2)
        variances.append(np.mean(h * h))
    return np.array(variances)


def allowed_deviation(act, predicted: np.ndarray) -> np.ndarray:
    """3 standard deviations of layer l's measured mean of h^2 relative to its prediction, l >= 1.

    At layer k, h = W phi(h_prev) + b: the mean of phi^2 over the WIDTH units of one input spreads by
    Var(phi^2) / E[phi^2]^2 / WIDTH relative (its variance; E[phi^4] / E[phi^2]^2 - 1, with phi's
    argument N(0, q_(k-1))), and given phi the WIDTH Gaussian rows add a chi-square's 2 / WIDTH.
    The batch's inputs share the weights and grow correlated, so they are counted as one; the
    NETWORKS independent networks divide the variance by NETWORKS. Over l layers the variances add
    up (a relative error passes through the length map at most unshrunk: its slope in log q is at
    most 1 for these maps)."""
    def moment(q, power):
        return theory.gaussian_mean(act, q, lambda b, u: b.value(u) ** power)
    per_layer = [(moment(q, 4) / moment(q, 2) ** 2 + 1) / WIDTH for q in predicted[:-1]]
    return 3 * np.sqrt(np.cumsum(per_layer) / NETWORKS)


@pytest.mark.parametrize("name, sigma_w2, sigma_b2, q0", [
    ("tanh", 0.5, 0.0, 2.0), ("tanh", 1.76, 0.05, 2.0), ("tanh", 3.0, 0.1, 0.2),
    ("relu", 2.0, 0.0, 1.0), ("relu", 1.5, 0.1, 2.0), ("elu", 1.2, 0.1, 2.0)])
def test_variance_map_matches_a_wide_random_network(name, sigma_w2, sigma_b2, q0):
    """Layer l's measured mean of h^2 against the length map iterated l times from the measured
    input variance, within `allowed_deviation` (finite-width fluctuations: 0.14-0.22 relative at
    l = 6). A length map off by 10% a layer fails every case; the quadrature tests above hold the
    integrals to 1e-9."""
    measured = measured_variances(name, sigma_w2, sigma_b2, q0, np.random.default_rng(7))
    predicted = theory.variance_map(theory.activation(name), sigma_w2, sigma_b2, measured[0], LAYERS)
    allowed = allowed_deviation(theory.activation(name), predicted)
    deviation = np.abs(measured[1:] / predicted[1:] - 1)
    assert np.all(deviation <= allowed), f"relative deviation {deviation.round(3)} allowed {allowed.round(3)}"
