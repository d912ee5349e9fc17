"""flaxdepth.trainability: the model's formula, the Jeffreys interval, the grid posterior on
separable data, next_depth's preference for the transition, the command line, and a fixed-seed
smoke of the calibration (experiments/trainability_calibration.py runs the full one)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special, stats

from flaxdepth import trainability as tr

# tanh_newinit's committed sweep (faithful protocol, jax): 0/3 at k=48 between 3/3 at 45 and 51
ODD_DEPTHS, ODD_TRAINED = [3, 6, 12, 24, 36, 42, 45, 48, 51], [3, 3, 3, 2, 2, 3, 3, 0, 3]


def test_curve_is_the_model_and_k50_is_where_p_is_one_half():
    k, k50, s, lapse, guess = np.array([6.0, 40.0, 300.0]), 40.0, 0.3, 0.1, 0.05
    mu = tr.mu_of(k50, s, lapse, guess)
    expected = guess + (1 - guess - lapse) / (1 + np.exp((np.log2(k) - mu) / s))
    np.testing.assert_allclose(tr.curve(k, k50, s, lapse, guess), expected, rtol=1e-13)
    assert tr.curve(k50, k50, s, lapse, guess) == pytest.approx(0.5, abs=1e-14)
    # k50 is the sigmoid's midpoint only when guess = lapse
    assert abs(mu - math.log2(k50)) > 0.01
    assert tr.mu_of(k50, s, 0.05, 0.05) == pytest.approx(math.log2(k50), abs=1e-14)


def test_jeffreys_interval_is_the_beta_quantiles_with_the_edges_closed():
    trained, runs = np.array([1, 2, 5, 0, 3]), np.array([3, 3, 10, 3, 3])
    lo, hi = tr.jeffreys_interval(trained, runs)
    # (1 - 0.95) / 2 is 0.025 to within an ulp: equal to rounding
    np.testing.assert_allclose(lo[:3], stats.beta.ppf(0.025, trained[:3] + 0.5, runs[:3] - trained[:3] + 0.5), rtol=1e-13)
    np.testing.assert_allclose(hi[:4], stats.beta.ppf(0.975, trained[:4] + 0.5, runs[:4] - trained[:4] + 0.5), rtol=1e-13)
    assert lo[3] == 0.0 and hi[4] == 1.0  # 0 of n: lower end 0; n of n: upper end 1
    np.testing.assert_allclose(tr.jeffreys_interval(1, 3, level=0.9),
                               (stats.beta.ppf(0.05, 1.5, 2.5), stats.beta.ppf(0.95, 1.5, 2.5)), rtol=1e-13)


def test_beta_binomial_predictive_polynomial_matches_scipy():
    psi, runs, t0, n0 = 0.37, 4, 1, 3
    coefficients = tr._predictive_coefficients(runs, t0, n0)  # (eta, t, power of psi)
    for e, nu in enumerate(tr.NUS):
        a, b = psi * nu + t0, (1 - psi) * nu + n0 - t0  # the Beta after t0 of n0 at this depth
        expected = stats.betabinom.pmf(np.arange(runs + 1), runs, a, b)
        np.testing.assert_allclose(coefficients[e] @ psi ** np.arange(runs + 1), expected, rtol=1e-9)


def test_counts_from_rows_diverged_runs_are_failures():
    def row(depth, error, finite=True):
        return {"depth": depth, "finite": finite, "train_errors": [0.9, error], "test_errors": [0.9, error + 0.01]}
    rows = [row(6, 0.05), row(6, 0.3), row(3, 0.01), row(6, 0.01, finite=False), row(3, 0.19)]
    depths, trained, runs, diverged = tr.counts(rows, threshold=0.2)
    assert depths.tolist() == [3, 6] and trained.tolist() == [2, 1]
    assert runs.tolist() == [2, 3] and diverged.tolist() == [0, 1]
    assert tr.counts(rows, threshold=0.1)[1].tolist() == [1, 1]


def test_separable_data_give_a_finite_interval_between_the_depths():
    fitted = tr.fit([24, 48], [3, 0], [3, 3])
    lo, hi = fitted.k50_interval
    assert 12 < lo < fitted.k50 < hi < 96 and lo < 34 < hi
    assert all(math.isfinite(v) for v in (fitted.k50, lo, hi))
    band = fitted.probability(np.array([24, 48]))
    assert band.median[0] > 0.5 > band.median[1] and np.all(band.lo <= band.median) and np.all(band.median <= band.hi)


def test_fit_is_deterministic_and_merges_repeated_depths():
    first = tr.fit(ODD_DEPTHS, ODD_TRAINED, [3] * 9)
    again = tr.fit(ODD_DEPTHS, ODD_TRAINED, [3] * 9)
    assert first.k50 == again.k50 and first.k50_interval == again.k50_interval
    assert json.dumps(first.to_json()) == json.dumps(again.to_json())
    split = tr.fit([24, 48, 24], [2, 0, 1], [2, 3, 1])
    assert split.k50 == tr.fit([24, 48], [3, 0], [3, 3]).k50


def test_k_at_and_json():
    fitted = tr.fit([6, 12, 24, 48, 96], [3, 3, 2, 0, 0], [6, 6, 6, 6, 6])
    k90, k50 = fitted.k_at(0.9), fitted.k_at(0.5)
    assert k50.probability == pytest.approx(1.0)  # lapse and guess are below 0.5: P = 0.5 always reached
    assert k50.depth == pytest.approx(fitted.k50, rel=0.03)
    assert 0 < k90.probability < 1 and k90.depth < fitted.k50
    data = json.loads(json.dumps(fitted.to_json()))
    assert data["k50"] == fitted.k50 and data["k50_interval"] == list(fitted.k50_interval)
    assert data["k90"]["probability_reached"] == k90.probability and "lapse" in data["priors"]
    assert len(data["curve"]["depth"]) == len(data["curve"]["median"]) == len(data["curve"]["lo"])


def test_bad_counts_are_config_errors():
    with pytest.raises(tr.ConfigError, match="trained <= runs"):
        tr.fit([3, 6], [4, 0], [3, 3])
    with pytest.raises(tr.ConfigError, match="one length"):
        tr.fit([3, 6], [3], [3, 3])
    with pytest.raises(tr.ConfigError, match="no runs"):
        tr.fit([3], [0], [0])


def test_next_depth_prefers_the_transition_over_far_depths():
    fitted = tr.fit([3, 12, 48, 192, 768], [3, 3, 1, 0, 0], [3] * 5)
    candidates = [3, 6, 24, 36, 60, 96, 384, 768]
    gains = tr.information_gain(fitted, candidates, 3)
    chosen = tr.next_depth(fitted, candidates, 3)
    assert chosen in (24, 36, 60)
    assert gains[candidates.index(chosen)] > 5 * max(gains[0], gains[-1], gains[-2])
    # per unit of cost the shallower side of the transition wins over the deeper
    assert tr.next_depth(fitted, [36, 60], 3, cost="depth") <= tr.next_depth(fitted, [36, 60], 3)
    with pytest.raises(tr.ConfigError):
        tr.next_depth(fitted, candidates, 3, cost="time")


def test_information_gain_matches_a_direct_sum():
    """The polynomial shortcut against the mutual information computed from scipy's beta-binomial."""
    fitted = tr.fit([6, 24, 48], [3, 2, 0], [3, 3, 3])
    runs, depth = 3, 24  # a tried depth: its new runs share the depth's beta-binomial draw
    w = fitted.weights
    x50, s, lapse, guess = (a for a in np.meshgrid(fitted.x50, fitted.s, tr.LAPSES, tr.GUESSES, indexing="ij"))
    psi = tr.curve(depth, 2.0 ** x50, s, lapse, guess)[..., None]
    a, b = psi * tr.NUS + 2, (1 - psi) * tr.NUS + 1
    p_t = np.stack([stats.betabinom.pmf(t, runs, a, b) for t in range(runs + 1)])  # (T, X, S, L, G, eta)
    joint = (p_t * w).sum(axis=(2, 3, 4, 5))  # (T, X)
    p_x, p_tt = joint.sum(axis=0), joint.sum(axis=1)
    expected = (special.xlogy(joint, joint).sum() - special.xlogy(p_x, p_x).sum()
                - special.xlogy(p_tt, p_tt).sum())
    assert tr.information_gain(fitted, [depth], runs)[0] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def _row(depth, seed, trained, finite=True, lr=0.05):
    error = 0.05 if trained else 0.9
    return {"depth": depth, "seed": seed, "lr": lr, "finite": finite, "variant": "tanh", "protocol": "faithful",
            "framework": "jax", "device": "cpu:cpu", "train_errors": [0.5, error], "test_errors": [0.5, error]}


def test_cli_refits_a_tiny_results_file(tmp_path, capsys):
    path = tmp_path / "tiny.jsonl"
    rows = [_row(k, seed, k <= 12, finite=not (k == 48 and seed == 0)) for k in (3, 6, 12, 24, 48) for seed in range(3)]
    rows += [_row(k, 0, True, lr=0.01) for k in (3, 6)]  # a group where every run trained
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "not a run\n")
    assert tr.main([str(path)]) == 0
    out, err = capsys.readouterr()
    assert "skipped 1 line(s)" in err
    assert "tanh, faithful, jax, lr 0.05, cpu:cpu" in out and "lr 0.01" in out
    assert "k50 > 6: every run trained" in out
    line_48 = next(line for line in out.splitlines() if line.split()[:1] == ["48"])
    assert line_48.split()[1:4] == ["3", "0", "1"]  # runs, trained, diverged
    k50_line = next(line for line in out.splitlines() if "k50 =" in line)
    assert "(95%" in k50_line
    assert tr.main([str(tmp_path), "--json", "--threshold", "0.1"]) == 0
    every, data = (json.loads(line) for line in capsys.readouterr().out.splitlines())  # lr 0.01, then 0.05
    assert every["censored"] == "above" and data["censored"] is None
    assert 12 <= data["k50"] <= 24 and data["diverged"] == [0, 0, 0, 0, 1] and data["variant"] == "tanh"


@pytest.mark.parametrize("argv, message", [
    (["no/such/file.jsonl"], "no results file or folder"),
    (["{tiny}", "--threshold", "2"], "--threshold is an error rate"),
    (["{tiny}", "--threshold", "x"], "invalid float value"),
    (["{empty}"], "no intact runs"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "tiny.jsonl").write_text(json.dumps(_row(3, 0, True)) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    argv = [a.format(tiny=tmp_path / "tiny.jsonl", empty=tmp_path / "empty.jsonl") for a in argv]
    assert tr.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith(tr.PROG + ": error: ")


def test_calibration_smoke_covers_the_true_k50(load_experiment):
    """30 simulated sweeps (fixed seed), depths chosen by next_depth: at least 26 intervals hold the
    true k50. The budget is half the full calibration's, to keep this test short."""
    calibration = load_experiment("trainability_calibration")
    cases = [case for case in calibration.CASES if case.in_model]
    sweeps = [calibration.simulate_sweep(cases[i % len(cases)], np.random.default_rng([7, i]), budget=30)
              for i in range(30)]
    assert sum(sweep.covered for sweep in sweeps) >= 26, [s for s in sweeps if not s.covered]
    assert all(sweep.runs <= 30 for sweep in sweeps)
