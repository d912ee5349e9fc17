"""Tests of experiments/report.py (and its modules report_rows, report_figures, report_markdown) on
a tiny synthetic results folder (nothing is trained), and of README.md's findings table against the
committed results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("error_vs_depth.png", "boundaries.png", "epoch_curves.png", "theory_vs_measured.png")


@pytest.fixture(scope="module")
def report(load_experiment):
    return load_experiment("report")


@pytest.fixture(scope="module")
def rows(report):
    """experiments/report_rows.py, which report.py imports: the runs read and selected."""
    return report.report_rows


@pytest.fixture(scope="module")
def markdown(report):
    """experiments/report_markdown.py: REPORT.md's text and README.md's findings table."""
    return report.report_markdown


def row(variant, depth, seed, train, test, framework="jax", protocol="faithful", lr=0.05, device="gpu:Fake GPU",
        precision=None, **config):
    """One results row in the sweep's format; `trainable` deliberately wrong, the report recomputes it."""
    if precision is not None:  # an engine option
        config["engine"] = {"precision": precision}
    return {"variant": variant, "depth": depth, "lr": lr, "seed": seed, "framework": framework, "protocol": protocol,
            "train_errors": train, "test_errors": test, "finite": True, "trainable": "stale", "wall_s": 2.5,
            "replicas_trained_together": 3, "device": device, "device_count": 1,
            "versions": {"jax": "0.0.1", "torch": None}, "finished_at": "2026-01-02T03:04:05+0000",
            "config": {"epochs": 3, "batch_size": 256, "threshold": 0.2, "dataset": "mnist", "limit_train": None,
                       "limit_test": None, "fan": "out", "notebook_quirks": protocol == "faithful", **config}}


GOOD, BAD = [0.5, 0.1, 0.05], [0.9, 0.9, 0.9]
COLLAPSE_TEST = [0.03, 0.9, 0.9]


def write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def results(tmp_path):
    folder = tmp_path / "results"
    write(folder, "tanh_jax_faithful_e3_b256_mnist.jsonl",
          [row("tanh", k, s, GOOD, GOOD) for k in (3, 6) for s in range(3)]
          + [row("tanh", 9, s, BAD, BAD) for s in range(2)]
          + [row("tanh", 9, 2, BAD, [0.9, 0.9, 0.1])]  # min(train, test) counts: this seed trains
          + [row("tanh", 12, s, BAD, BAD) for s in range(3)])
    write(folder, "tanh_torch_faithful_e3_b256_mnist.jsonl",
          [row("tanh", 6, 0, [0.5, 0.1, 0.06], GOOD, framework="torch")])
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist.jsonl", [row("elu_bn", 63, 0, [0.2, 0.9, 0.9], COLLAPSE_TEST)])
    write(folder, "elu_bn_jax_corrected_e3_b256_mnist.jsonl",
          [row("elu_bn", 63, 0, GOOD, GOOD, protocol="corrected")])
    write(folder, "elu_jax_faithful_e3_b256_mnist_train100.jsonl",  # a smoke test: listed, not tabulated
          [row("elu", 39, 0, GOOD, GOOD, limit_train=100)])
    # Another machine's runs: compared framework against framework on that device, not tabulated.
    write(folder / "cpu", "tanh_jax_faithful_e3_b256_mnist.jsonl",
          [row("tanh", 9, s, BAD, BAD, device="cpu:cpu") for s in range(2)])
    write(folder / "cpu", "tanh_torch_faithful_e3_b256_mnist.jsonl",
          [row("tanh", 9, 0, BAD, [0.9, 0.8, 0.7], device="cpu:cpu", framework="torch"),
           row("tanh", 9, 1, BAD, [0.9, 0.8, 0.1], device="cpu:cpu", framework="torch")])
    return folder


def table_row(text: str, variant: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_from_synthetic_results(report, results, tmp_path):
    out = tmp_path / "out"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()

    tanh = table_row(text, "tanh")
    assert tanh[:5] == ["tanh", "0.05", "6 / 9", "3/3 seeds", "1/3 seeds"]
    assert tanh[5:8] == ["same (no BatchNorm)", "same (no BatchNorm)", "k=6 / k=9"]  # a search: 3, 6, 12, 9
    assert tanh[8] == "8.3 [5.3, >12]"  # 3/3, 3/3, 1/3, 0/3 at k = 3, 6, 9, 12: the upper end past k=12
    assert tanh[9:11] == ["same", "same"]
    assert tanh[11] == ("k=6 on gpu: verdicts agree 1/1, max diff 1.00 pp; "
                        "k=9 on cpu: verdicts agree 1/2, max diff 80.00 pp")

    elu_bn = table_row(text, "elu_bn")  # one run a protocol, at k=63: k50 censored on one side
    assert elu_bn[3:12] == ["0/1 seeds", "not run", "1/1 seeds", "not run", "not run", "< 63: no run trained",
                            "not run", "> 63: every run trained", "not run"]
    assert table_row(text, "elu")[3:5] == ["not run", "not run"]  # the smoke-test row is not tabulated
    assert set(table_row(text, "resnet")[3:]) == {"not run"}

    assert "**tanh** (faithful; k=6: 3/3 seeds, k=9: 1/3 seeds) agrees with the notebook" in text
    assert "its own search puts the boundary at k=6 / k=9" in text
    assert "**elu_bn** (faithful; k=63: 0/1 seeds, k=66: not run) differs from the notebook" in text
    assert "**elu_bn** (corrected; k=63: 1/1 seeds, k=66: not run) agrees with the notebook" in text
    assert "elu_bn at k=63 (faithful): 1/1 seeds reach 3.0% test error after epoch 1, then 90.0% after" in text
    assert "Corrected protocol at this depth: 1/1 seeds." in text

    assert "| [elu_jax_faithful_e3_b256_mnist_train100.jsonl](../results/elu_jax_faithful_e3_b256_mnist_train100" \
           ".jsonl) | 1 | 0 |" in text
    assert "| tanh_jax_faithful_e3_b256_mnist.jsonl | 12 | gpu:Fake GPU | 1 | 3 | 30.0 s |" in text
    assert "jax 0.0.1 |" in text and "torch None" not in text
    assert "| cpu/tanh_torch_faithful_e3_b256_mnist.jsonl | 2 | cpu:cpu |" in text
    assert "Total: 20 runs, 50.0 s of training." in text

    theory = text[text.index("## Theory beside measurement"):text.index("## What was run")]
    assert table_row(theory, "tanh") == [
        "tanh", "tanh, normal 0.05", "0.09 / 0.18 / 0.36", "0", "ordered / ordered / ordered", "0.09 / 0.18 / 0.36",
        "2.49 / 3.5 / 5.87", "7.48", "k=6 / k=9", "prediction within the measured bracket"]
    assert table_row(theory, "elu")[8:] == ["not run", "not run"]
    assert table_row(theory, "tanh_newinit")[4] == "critical / critical / critical"
    assert "elu_bn (batch normalization after every conv)" in theory
    assert "resnet_nobn (identity residual connections)" in theory
    assert "- Ordered stages (tanh: k=6 / k=9)" in theory
    for name in FIGURES:
        assert f"](figures/{name})" in text
        assert (out / "figures" / name).read_bytes()[:8] == PNG_MAGIC

    # what was found by hand is linked, not written: every note the text links exists
    assert "Why, and why not always (measured for elu_bn): [notes/elu_bn_eval_mode_why.md]" in text
    notes = re.findall(r"\]\((notes/[^)#]+)", text)
    assert "notes/elu_bn_eval_mode_why.md" in notes
    assert [note for note in notes if not (REPO / "experiments" / note).is_file()] == []


def test_figures_leave_no_pyplot_figure_open(report, results, tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    assert report.main(["--results", str(results), "--out", str(tmp_path / "out")]) == 0
    assert plt.get_fignums() == open_before


def test_report_without_results(report, tmp_path):
    out = tmp_path / "out"
    readme = (REPO / "README.md").read_text()
    assert report.main(["--results", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert (REPO / "README.md").read_text() == readme  # another --out: the repository's README stays as it is
    text = (out / "REPORT.md").read_text()
    for variant in ("tanh", "elu_multihead"):
        assert set(table_row(text, variant)[3:]) - {"same", "same (no BatchNorm)"} == {"not run"}
    assert 'No results yet: every cell of the table is "not run".' in text
    assert all((out / "figures" / name).stat().st_size > 0 for name in FIGURES)


def test_verdicts_are_recomputed_with_the_rows_threshold(rows, tmp_path):
    folder = tmp_path / "results"
    write(folder, "tanh.jsonl", [row("tanh", 6, 0, [0.3, 0.3, 0.3], [0.3, 0.3, 0.3], threshold=0.5),
                                 row("tanh", 6, 1, [0.3, 0.3, 0.3], [0.3, 0.3, 0.3])])
    runs = rows.standard_rows(rows.load(folder))
    assert runs.sort_values("seed")["trainable"].tolist() == [True, False]


def test_corrected_protocol_training_at_both_depths_is_called_out(report, tmp_path):
    folder = tmp_path / "results"
    write(folder, "tanh_bn_oldinit_jax_corrected_e3_b256_mnist.jsonl",
          [row("tanh_bn_oldinit", k, s, GOOD, GOOD, protocol="corrected") for k in (48, 51) for s in range(3)])
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert ("**tanh_bn_oldinit** (corrected; k=48: 3/3 seeds, k=51: 3/3 seeds) differs from the notebook: the "
            "notebook failed at k=51, here 3/3 seeds train; with BatchNorm in train mode every epoch both depths "
            "train, so k=51 is no depth limit of this variant; its corrected boundary lies deeper.") in text
    assert text.count("is no depth limit") == 1  # said of the corrected protocol only


def test_k50_column_gives_the_fitted_interval_or_the_censored_bound(rows, markdown, tmp_path):
    """The k50 [95%] cells, from synthetic rows: a clear transition (3/3 seeds train at k = 3, 6,
    none at 9, 12) gives k50 with an interval between the tested depths, unmarked; every run
    trained (elu_bn, corrected) or none (faithful) gives the bound the runs set; the cells are
    flaxdepth.trainability's fit of the same counts, in REPORT.md and README's table alike."""
    from flaxdepth import trainability

    folder = tmp_path / "results"
    write(folder, "tanh_jax_faithful_e3_b256_mnist.jsonl",
          [row("tanh", k, s, GOOD if k < 9 else BAD, GOOD if k < 9 else BAD) for k in (3, 6, 9, 12) for s in range(3)])
    write(folder, "elu_bn_jax_corrected_e3_b256_mnist.jsonl",
          [row("elu_bn", k, s, GOOD, GOOD, protocol="corrected") for k in (3, 6, 12, 24, 48, 96) for s in range(3)])
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist.jsonl",
          [row("elu_bn", k, s, [0.2, 0.9, 0.9], COLLAPSE_TEST) for k in (3, 63) for s in range(3)])
    selection = rows.select(folder)  # REPORT.md's text and README's table, without drawing the figures
    text, findings = markdown.report(selection, "../results", tmp_path), markdown.findings_table(selection.verdicts)

    fit = trainability.fit([3, 6, 9, 12], [3, 3, 0, 0], [3, 3, 3, 3])
    cell = table_row(text, "tanh")[8]
    assert cell == rows.k50_text(fit) and "<" not in cell and ">" not in cell
    k50, lo, hi = (float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
    assert 3 <= lo < 6 <= k50 <= 9 < hi <= 12  # between the tested depths, around the transition
    assert (k50, lo, hi) == tuple(round(x, 1) for x in (fit.k50, *fit.k50_interval))
    assert table_row(text, "tanh")[7] == "k=6 / k=9"  # the majority vote's boundary beside it

    elu_bn = table_row(text, "elu_bn")
    assert elu_bn[7:11] == ["none trains / k=3", "< 3: no run trained", "k=96 / none fails so far (search "
                            "unfinished, next k=192)", "> 96: every run trained"]
    assert "*k50 [95%]*: the depth where P(trains | k) = 0.5" in text and "An end marked > (<) lies beyond" in text
    assert ("| elu_bn | 63 / 66 | none trains / 3 | < 3: no run trained | 96 / none fails so far | > 96: every run "
            "trained |") in findings
    assert f"| tanh | 6 / 9 | 6 / 9 | {cell} | same (no BatchNorm) | same |" in findings


def test_k50_text_marks_the_ends_beyond_the_tested_depths(rows):
    from flaxdepth import trainability

    fit = trainability.fit([3, 6, 9, 12], [3, 3, 1, 0], [3, 3, 3, 3])  # the fall reaches past k=12
    assert fit.k50_beyond_tested == (False, True)
    lo, hi = fit.k50_interval
    assert rows.k50_text(fit) == f"{fit.k50:.1f} [{lo:.1f}, >{hi:.0f}]" and rows.k50_marked(fit)
    assert rows.k50_text(None) == "not run"
    assert rows.k50_text(trainability.fit([3, 6], [3, 3], [3, 3])) == "> 6: every run trained"
    assert rows.k50_text(trainability.fit([6, 3], [0, 0], [2, 3])) == "< 3: no run trained"


def test_fall_text_says_how_the_fitted_curve_falls_or_that_the_runs_do_not_place_it(rows, markdown):
    from flaxdepth import trainability

    fit = trainability.fit([3, 6, 12, 24, 48], [3, 3, 3, 0, 0], [3] * 5)
    depth, lo, hi = (rows.depth_number(k) for k in (fit.k_at(0.9).depth, *fit.k_at(0.9).interval))
    assert markdown.fall_text(fit) == (
        f"the fitted P(trains) falls from 0.9 at k = {depth} [{lo}, {hi}] to 0.5 at k50 = {rows.k50_text(fit)} (95% "
        "credible intervals"
        + ("; < and >: outside the tested k = 3-48)" if rows.k50_marked(fit) else ")"))
    odd = trainability.fit([3, 105], [0, 2], [3, 3])  # none trains at k=3, 2/3 at k=105: no decreasing curve fits
    assert odd.k50_beyond_tested == (True, True)
    assert markdown.fall_text(odd).startswith(f"the fitted curve does not place the fall: k50 = {rows.k50_text(odd)} ")


def test_boundary_is_the_search_replayed_on_the_recorded_depths(rows, tmp_path):
    """tanh_newinit as measured: the search stops at 45 / 48 although the pair's k=51 trains too
    (not asked by the search); elu's search is unfinished (12 trains, 24 was never trained)."""
    folder = tmp_path / "results"
    newinit = {3: GOOD, 6: GOOD, 12: GOOD, 24: GOOD, 36: GOOD, 42: GOOD, 45: GOOD, 48: BAD, 51: GOOD}
    write(folder, "tanh_newinit_jax_faithful_e3_b256_mnist.jsonl",
          [row("tanh_newinit", k, s, e, e) for k, e in newinit.items() for s in range(3)])
    write(folder, "elu_jax_faithful_e3_b256_mnist.jsonl",
          [row("elu", k, s, GOOD, GOOD) for k in (3, 6, 12, 39) for s in range(3)])
    runs = rows.standard_rows(rows.load(folder))
    assert rows.boundary(runs, "tanh_newinit", "faithful") == (45, 48, None)
    assert rows.boundary(runs, "elu", "faithful") == (12, None, 24)
    assert rows.boundary_text(rows.boundary(runs, "elu", "faithful")) == \
        "k=12 / none fails so far (search unfinished, next k=24)"
    assert rows.boundary_text(rows.boundary(runs, "elu", "faithful"), short=True) == "12 / none fails so far"
    assert rows.boundary_text(rows.boundary(runs, "tanh_newinit", "faithful"), short=True) == "45 / 48"
    assert rows.boundary(runs, "elu", "corrected") is None  # no rows at k=3: no search


def test_boundary_needs_a_search_and_follows_the_deepest_max_depth(rows, tmp_path):
    """Pair rows alone are no search; a search capped at --max-depth 12 ends there ("none fails"),
    and one of its rows started with --max-depth 768 makes the replay go on (unfinished at 24)."""
    folder = tmp_path / "results"
    write(folder, "tanh_bn_oldinit_jax_corrected_e3_b256_mnist.jsonl",
          [row("tanh_bn_oldinit", k, s, GOOD, GOOD, protocol="corrected") for k in (48, 51) for s in range(3)])
    capped = [row("elu", k, s, GOOD, GOOD, max_depth=12) for k in (3, 6, 12) for s in range(3)]
    write(folder, "elu_jax_faithful_e3_b256_mnist.jsonl", capped)
    runs = rows.standard_rows(rows.load(folder))
    assert rows.boundary(runs, "tanh_bn_oldinit", "corrected") is None
    assert rows.boundary(runs, "elu", "faithful") == (12, None, None)
    write(folder, "elu_jax_faithful_e3_b256_mnist.jsonl", capped[:-1] + [row("elu", 12, 2, GOOD, GOOD, max_depth=768)])
    runs = rows.standard_rows(rows.load(folder))
    assert rows.boundary(runs, "elu", "faithful") == (12, None, 24)


def test_depths_training_past_the_first_failure_and_the_shallowest_collapse_are_reported(report, rows, tmp_path):
    from flaxdepth import trainability

    folder = tmp_path / "results"
    newinit = {3: GOOD, 6: GOOD, 12: GOOD, 24: GOOD, 36: GOOD, 42: GOOD, 45: GOOD, 48: BAD, 51: GOOD}
    write(folder, "tanh_newinit_jax_faithful_e3_b256_mnist.jsonl",
          [row("tanh_newinit", k, s, e, e) for k, e in newinit.items() for s in range(3)])
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist.jsonl",
          [row("elu_bn", 3, s, [0.1, 0.9, 0.9], [0.025 + 0.003 * s, 0.902, 0.902]) for s in range(3)])
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    # the reading says how the fitted P(trains) falls, with the numbers of the fit of these runs
    fit = trainability.fit(list(newinit), [3 * (e is GOOD) for e in newinit.values()], [3] * len(newinit))
    k90 = fit.k_at(0.9)
    assert fit.censored is None and k90.probability >= 0.5 and k90.interval[1] >= 3
    found = re.search(r"its own search puts the boundary at k=45 / k=48; yet k=51 \(3/3 seeds\) beyond that first "
                      r"failure trains: the fitted P\(trains\) falls from 0\.9 at k = (\S+) \[(\S+), (\S+)\] "
                      r"to 0\.5 at k50 = (\S+ \[\S+, \S+\]) \(95% credible intervals[;)]", text)
    assert found, text[text.index("tanh_newinit** (faithful"):][:800]
    assert found.group(4) == rows.k50_text(fit) == table_row(text, "tanh_newinit")[8]
    assert found.group(1) == rows.depth_number(k90.depth)
    assert "not sharp" not in text
    assert ("elu_bn at k=3 (faithful): 3/3 seeds reach 2.5-3.1% test error after epoch 1, then 90.2% after the "
            "later epochs. Corrected protocol at this depth: not run.") in text
    assert "none trains / k=3" in table_row(text, "elu_bn")[7]


def test_float32_rows_get_their_own_line_and_stay_out_of_the_table(report, tmp_path):
    folder = tmp_path / "results"
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist.jsonl",
          [row("elu_bn", 63, s, [0.2, 0.9, 0.9], COLLAPSE_TEST) for s in range(3)])
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist_prechighest.jsonl",
          [row("elu_bn", 63, s, GOOD, GOOD, precision="highest") for s in range(2)]
          + [row("elu_bn", 63, 2, BAD, BAD, precision="highest")])
    write(folder, "elu_bn_torch_faithful_e3_b256_mnist_prechighest.jsonl",
          [row("elu_bn", 63, s, GOOD, GOOD, framework="torch", precision="highest") for s in range(3)])
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert table_row(text, "elu_bn")[3] == "0/3 seeds"  # the default-precision rows only
    assert ("- elu_bn (faithful) in float32 (`--precision highest`) on gpu: k=63 jax 2/3 seeds (default "
            "precision: 0/3 seeds); k=63 torch 3/3 seeds (default precision: not run).") in text
    assert "- `precision-highest`: 1/1 (elu_bn)" in text and "- `precision-highest-torch`: 1/1 (elu_bn)" in text


def test_tf32_rows_get_their_own_line_and_every_precision_a_name(report, markdown, tmp_path):
    from flaxdepth.options import PRECISIONS

    assert set(markdown.PRECISION_NAMES) == set(PRECISIONS) - {"default"}
    folder = tmp_path / "results"
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist.jsonl",
          [row("elu_bn", 63, s, [0.2, 0.9, 0.9], COLLAPSE_TEST) for s in range(3)])
    write(folder, "elu_bn_jax_faithful_e3_b256_mnist_prectf32.jsonl",
          [row("elu_bn", 63, 0, GOOD, GOOD, precision="tf32")] + [row("elu_bn", 63, s, BAD, BAD, precision="tf32")
                                                                  for s in (1, 2)])
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert table_row(text, "elu_bn")[3] == "0/3 seeds"
    assert ("- elu_bn (faithful) with TF32-rounded convolution operands (`--precision tf32`) on gpu: k=63 jax "
            "1/3 seeds (default precision: 0/3 seeds).") in text


def test_declared_variants_get_their_own_table_on_their_subset(report, tmp_path):
    """Rows of experiments/variants.toml's variants, trained with the current spec on a subset,
    fill their own table (rows of an edited spec stay out of it); a variant without rows is
    'not run'."""
    from flaxdepth import registry

    spec = registry.get_variant("relu_he").fields()
    rows = [row("relu_he", 6, s, GOOD, GOOD, protocol="corrected", limit_train=6000, limit_test=2000)
            for s in range(2)]
    rows += [row("relu_he", 24, 0, GOOD, GOOD, protocol="corrected", limit_train=6000, limit_test=2000),
             row("relu_he", 24, 1, BAD, BAD, protocol="corrected", limit_train=6000, limit_test=2000)]
    for r in rows:
        r["spec"] = spec
    edited = row("relu_he", 96, 0, GOOD, GOOD, protocol="corrected", limit_train=6000)
    edited["spec"] = {**spec, "init": "lecun"}
    write(tmp_path / "results", "relu_he_jax_corrected_e3_b256_mnist_train6000_test2000.jsonl", rows + [edited])
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    # where and on what they trained comes from their rows (the edited spec's k=96 row stays out)
    assert ("They were swept on the GPU (`gpu:Fake GPU`), on the first 6,000 training / 2,000 test images (the "
            "`declared-cpu` entry of `sweeps.toml`), at 2 depths (k = 6, 24) rather than searched: ") in text
    cells = table_row(text, "relu_he")
    assert cells[2] == "6000 / 2000 images, 3 epochs, lr 0.05"
    assert cells[3] == "k=6: 2/2 seeds (5.0%, 5.0%)<br>k=24: 1/2 seeds (5.0%, 90.0%)"
    assert table_row(text, "selu_lecun")[2] == "not run"
    theory = text[text.index("## Theory beside measurement"):]
    assert table_row(theory, "relu_he")[4] == "critical / critical / critical"
    assert table_row(theory, "relu_he")[8:] == [
        "k=6 trains, k=24 fails (of k = 6, 24; subset)",
        "no depth limit predicted (every stage critical); the failure at k=24 comes from outside the theory"]
    assert table_row(theory, "selu_lecun")[8] == "not run"
    assert "resnet_skipinit (gated residual connections)" in theory
    assert (tmp_path / "figures" / "declared_variants.png").read_bytes()[:8] == PNG_MAGIC


def test_depth_frontier_from_cpu_and_gpu_rows(report, tmp_path):
    """The frontier's CPU rows are its sweeps.toml entry's (its subset, epochs, batch size and the
    depth's lr: a row at another lr stays out), experiments/gpu_frontier.sh's are those of
    results/gpu_frontier/; a table per setup, the deepest network trained, the figure."""
    from flaxdepth import registry

    spec = registry.get_variant("tanh_critical_delta").fields()
    cpu = dict(protocol="corrected", limit_train=1536, limit_test=512, epochs=2, batch_size=64, device="cpu:cpu")
    delta = [row("tanh_critical_delta", 30, 0, GOOD, GOOD, lr=0.05, **cpu),
             row("tanh_critical_delta", 1002, 0, BAD, BAD, lr=0.0015, **cpu),
             row("tanh_critical_delta", 1002, 1, GOOD, GOOD, lr=0.05, **cpu)]  # not the entry's lr at k=1002
    gpu = [row("tanh_critical_delta", 3000, s, GOOD, GOOD, lr=0.0005, protocol="corrected") for s in range(2)]
    gpu += [row("tanh_critical_delta", 3000, s, BAD, BAD, lr=0.00017, protocol="corrected") for s in range(2)]
    for r in delta + gpu:
        r["spec"] = spec
    folder = tmp_path / "results"
    write(folder, "tanh_critical_delta_jax_corrected_e2_b64_mnist_train1536_test512.jsonl", delta)
    write(folder, "tanh_jax_corrected_e2_b64_mnist_train1536_test512.jsonl",
          [row("tanh", 30, 0, BAD, BAD, lr=0.05, **cpu)])
    write(folder / "gpu_frontier", "tanh_critical_delta_jax_corrected_e3_b256_mnist.jsonl", gpu)
    assert report.main(["--results", str(folder), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    frontier = text[text.index("## Depth frontier"):text.index("## What was run")]
    assert "On the CPU (`cpu:cpu`) on a subset (`python experiments/run.py --only frontier-cpu`)" in frontier
    cpu_table = frontier[frontier.index("**cpu:cpu, the first 1,536 training / 512 test images, 2 epochs in batches "
                                        "of 64, lr = 1.5 / k**"):]
    assert table_row(cpu_table, "tanh_critical_delta: tanh CNN, delta-orthogonal at the critical point sigma_b^2 "
                                "= 1e-5")[1:] == ["1/1 seeds (5.0%)", "0/1 seeds (90.0%)"]
    assert "| init | k=30 (lr 0.05) | k=1002 (lr 0.0015) |" in cpu_table
    # each lr rule a table of its own: c / k with c to one decimal (0.00017 * 3000 = 0.51)
    for lr, c, cell in ((0.0005, "1.5", "2/2 seeds (5.0%, 5.0%)"), (0.00017, "0.5", "0/2 seeds (90.0%, 90.0%)")):
        table = frontier[frontier.index(f"**gpu:Fake GPU, full MNIST, 3 epochs in batches of 256, lr = {c} / k**"):]
        assert f"| init | k=3000 (lr {lr:g}) |" in table
        assert table_row(table, "tanh_critical_delta: tanh CNN, delta-orthogonal at the critical point sigma_b^2 "
                                "= 1e-5")[1:] == [cell]
    assert ("The deepest network trained (most seeds under 20%): tanh_critical_delta at k=3000 (gpu:Fake GPU, "
            "full MNIST, 3 epochs in batches of 256, lr = 1.5 / k)") in frontier
    assert "- tanh (cpu:cpu, the first 1,536 training / 512 test images, 2 epochs in batches of 64, lr = 1.5 / k): " \
           "trains at no depth; fails at k=30." in frontier
    assert "- `frontier-cpu`: 2/4 (tanh_critical_delta, tanh)" in text
    assert (tmp_path / "figures" / "depth_frontier.png").read_bytes()[:8] == PNG_MAGIC


def test_a_frontier_subset_that_trains_nowhere_says_how_little_it_trained(report, tmp_path):
    """The reading counts the subset's SGD steps from the rows' configuration (1,536 images in
    batches of 64, 2 epochs: 48) against the notebook's (60,000 in batches of 256, 3 epochs: 705)."""
    from flaxdepth import registry

    spec = registry.get_variant("tanh_critical_delta").fields()
    cpu = dict(protocol="corrected", limit_train=1536, limit_test=512, epochs=2, batch_size=64, device="cpu:cpu")
    runs = [row("tanh_critical_delta", k, 0, BAD, BAD, lr=lr, **cpu) for k, lr in ((30, 0.05), (1002, 0.0015))]
    for r in runs:
        r["spec"] = spec
    write(tmp_path / "results", "tanh_critical_delta_jax_corrected_e2_b64_mnist_train1536_test512.jsonl", runs)
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert ("- cpu:cpu, the first 1,536 training / 512 test images, 2 epochs in batches of 64, lr = 1.5 / k: no run "
            "gets under 20% at any depth, the shallowest included: this subset's 48 SGD steps are 15 times fewer "
            "than the notebook's 705 (3 epochs of full MNIST in batches of 256)") in text


def test_findings_table_goes_between_the_readme_markers(report, markdown, results, tmp_path):
    """--readme FILE: the findings table replaces what lies between the markers, from the same
    boundaries as REPORT.md's verdict table; the rest of the file stays as it is."""
    readme = tmp_path / "README.md"
    above, below = "# title\n\nabove\n\n<!-- findings:start -->\n", "<!-- findings:end -->\n\nbelow\n"
    readme.write_text(above + "| stale |\n" + below)
    arguments = ["--results", str(results), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    assert report.main(arguments) == 0
    text = readme.read_text()
    assert text.startswith(above + "| variant | notebook (one run) | faithful: boundary | faithful: k50 [95%] | "
                           "corrected: boundary | corrected: k50 [95%] |\n")
    assert text.endswith(" |\n\n" + markdown.FINDINGS_K50_NOTE + "\n" + below) and "| stale |" not in text
    assert "| tanh | 6 / 9 | 6 / 9 | 8.3 [5.3, >12] | same (no BatchNorm) | same |" in text
    # no search (no rows at k=3), yet a fit of the one run per protocol
    assert "| elu_bn | 63 / 66 | not run | < 63: no run trained | not run | > 63: every run trained |" in text
    report_text = (tmp_path / "out" / "REPORT.md").read_text()
    assert table_row(report_text, "tanh")[7:9] == ["k=6 / k=9", "8.3 [5.3, >12]"]
    assert table_row(report_text, "elu_bn")[7:11] == ["not run", "< 63: no run trained", "not run",
                                                      "> 63: every run trained"]
    assert report.main(arguments) == 0 and readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="findings:start"):
        markdown.write_findings(readme, "| table |")


def test_readme_findings_table_is_what_the_committed_results_give(rows, markdown):
    """README.md's findings table is report.py's, from experiments/results/: after new results,
    `python experiments/report.py` rewrites it (and REPORT.md)."""
    selection = rows.select(REPO / "experiments" / "results")
    expected = markdown.findings_table(selection.verdicts)
    assert markdown.findings_block((REPO / "README.md").read_text()) == expected
    table = expected.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(selection.verdicts) <= 12 and expected.endswith(markdown.FINDINGS_K50_NOTE)
