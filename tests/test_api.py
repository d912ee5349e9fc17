"""The Python API (flaxdepth.run_sweep, SweepReport.to_dataframe and figure, load_results): a sweep
trains on the images its configuration names and says so in its rows, reuses only rows of the same
images, and every committed results file loads and is reused as the sweep that wrote it reused it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import flaxdepth
from flaxdepth import data, registry, search
from flaxdepth.config import ROW_SCHEMA, RUN_FIELDS, ConfigError, RunConfig, SweepConfig
from flaxdepth.data import Dataset
from flaxdepth.options import EngineOptions
from flaxdepth.train import RunResult

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
RESULTS = REPO / "experiments" / "results"


def synthetic(train: int = 8, test: int = 6, value: int = 0) -> Dataset:
    return Dataset("mnist", np.full((train, 28, 28), value, np.uint8), np.arange(train, dtype=np.uint8) % 10,
                   np.full((test, 28, 28), value, np.uint8), np.arange(test, dtype=np.uint8) % 10)


@pytest.fixture
def trained(monkeypatch):
    """Fake training (errors from the depth) that records the image counts each call trained on."""
    seen = []

    def fake_train(self, depth, runs):
        seen.append((depth, len(self.dataset.train_labels), len(self.dataset.test_labels)))
        return [RunResult(seed, lr, [0.05 if depth <= 3 else 0.9], [0.1 if depth <= 3 else 0.95], True)
                for seed, lr in runs]

    monkeypatch.setattr(search.Sweep, "_train", fake_train)
    return seen


def config(tmp_path, **fields) -> SweepConfig:
    return SweepConfig(**{"variant": "tanh", "depths": (3, 6), "seeds": 2, "epochs": 1, "out": str(tmp_path),
                          "skip_parity": True, **fields})


def test_run_sweep_trains_on_the_images_its_configuration_names(tmp_path, trained):
    """A loaded dataset is cut to limit_train / limit_test, never taken as it is; the rows say how
    many images they trained and were tested on."""
    report = flaxdepth.run_sweep(config(tmp_path, limit_train=5, limit_test=3), synthetic(), log=lambda line: None)
    assert trained == [(3, 5, 3), (6, 5, 3)]
    rows = report.rows()
    assert {(row["train_images"], row["test_images"], row["schema"]) for row in rows} == {(5, 3, ROW_SCHEMA)}
    subset = data.subset(synthetic(), 5, 3)
    assert {row["dataset_sha256"] for row in rows} == {search.dataset_fingerprint(subset)}
    with pytest.raises(ConfigError, match="trains on mnist, the dataset given is fashion_mnist"):
        flaxdepth.run_sweep(config(tmp_path), dataclasses.replace(synthetic(), name="fashion_mnist"))


@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST copy")
def test_run_sweep_loads_what_its_configuration_names(tmp_path, trained):
    flaxdepth.run_sweep(config(tmp_path, limit_train=256, limit_test=100, data_dir=str(SHARED_MNIST), depths=(3,)),
                        log=lambda line: None)
    assert trained == [(3, 256, 100)]
    [row, _] = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert (row["train_images"], row["test_images"]) == (256, 100)


def test_rows_of_other_images_are_not_reused(tmp_path, trained):
    logged = []
    flaxdepth.run_sweep(config(tmp_path), synthetic(value=0), log=lambda line: None)
    flaxdepth.run_sweep(config(tmp_path), synthetic(value=0), log=logged.append)
    assert len(trained) == 2 and any("already in" in line for line in logged)
    flaxdepth.run_sweep(config(tmp_path), synthetic(value=1), log=logged.append)
    assert len(trained) == 4
    assert any("trained on other images (another dataset checksum); they are not reused" in line for line in logged)


def test_a_row_without_a_checksum_counts_as_full_mnist(tmp_path, trained):
    """The oldest rows carry no dataset_sha256: their files were named for full MNIST."""
    full = config(tmp_path, depths=(3,))
    flaxdepth.run_sweep(full, synthetic(), log=lambda line: None)
    rows = [json.loads(line) for line in full.results_path().read_text().splitlines()]
    legacy = [{key: value for key, value in row.items() if key not in ("dataset_sha256", "schema")} for row in rows]
    full.results_path().write_text("".join(json.dumps(row) + "\n" for row in legacy))
    flaxdepth.run_sweep(full, synthetic(value=7), log=lambda line: None)
    assert len(trained) == 1  # reused, whatever full MNIST's checksum
    limited = config(tmp_path, depths=(3,), limit_train=4)
    limited.results_path().write_text("".join(json.dumps(row) + "\n" for row in legacy))
    flaxdepth.run_sweep(limited, synthetic(), log=lambda line: None)
    assert len(trained) == 2  # a subset's sweep does not take them as its own


def test_the_report_as_a_dataframe_and_a_figure(tmp_path, trained):
    from matplotlib.figure import Figure

    report = flaxdepth.run_sweep(config(tmp_path), synthetic(), log=lambda line: None)
    frame = report.to_dataframe()
    assert len(frame) == 4 and list(frame["depth"]) == [3, 3, 6, 6] and list(frame["seed"]) == [0, 1, 0, 1]
    assert list(frame["final_error"]) == pytest.approx([0.05, 0.05, 0.9, 0.9])
    assert list(frame["trainable"]) == [True, True, False, False]
    assert set(frame["epochs"]) == {1} and set(frame["precision"]) == {"default"}
    figure = report.figure()
    assert isinstance(figure, Figure) and figure.axes[0].get_lines()
    assert report.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_load_results_reads_a_file_or_a_folder_and_moves_no_line(tmp_path, trained):
    flaxdepth.run_sweep(config(tmp_path / "a"), synthetic(), log=lambda line: None)
    flaxdepth.run_sweep(config(tmp_path / "b", variant="elu"), synthetic(), log=lambda line: None)
    damaged = next((tmp_path / "b").glob("*.jsonl"))
    damaged.write_text(damaged.read_text() + '{"cut": \n')
    before = damaged.read_text()
    warnings = []
    frame = flaxdepth.load_results(tmp_path, warn=warnings.append)
    assert len(frame) == 8 and sorted(set(frame["variant"])) == ["elu", "tanh"]
    assert warnings == [f"{damaged}: skipped 1 line(s) that are not intact runs (line 5)"]
    assert damaged.read_text() == before
    assert len(flaxdepth.load_results(next((tmp_path / "a").glob("*.jsonl")))) == 4
    with pytest.raises(FileNotFoundError):
        flaxdepth.load_results(tmp_path / "none")


def committed_sweep_files() -> list[Path]:
    """The committed files of sweep rows (the eval-mode-collapse knob files hold other rows)."""
    return sorted(path for path in RESULTS.rglob("*.jsonl") if "_jax_" in path.name or "_torch_" in path.name)


def config_of(row: dict, out: Path) -> SweepConfig:
    """The SweepConfig a committed row was written by, as far as its stored configuration says."""
    stored = row["config"]
    fields = {f.name for f in dataclasses.fields(SweepConfig) if f.name != "run"}
    given = {key: value for key, value in stored.items() if key in fields}
    for key in ("lrs", "depths"):
        given[key] = None if given.get(key) is None else tuple(given[key])
    given["engine"] = EngineOptions(**stored.get("engine", {}))
    return SweepConfig(**{**given, "out": str(out), "data_dir": None})


@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST copy")
def test_every_committed_results_file_loads_and_its_runs_are_reused(monkeypatch):
    """Each committed sweep file is the results file of its rows' configuration (the same name), and
    a sweep of that configuration on the rows' device reuses every run of it."""
    registry.load_variants(REPO / "experiments" / "variants.toml")
    mnist = data.load_dataset("mnist", SHARED_MNIST)
    files = committed_sweep_files()
    assert len(files) >= 30
    frame = flaxdepth.load_results(RESULTS, warn=lambda line: None)
    assert set(frame["file"]) >= {str(path) for path in files}
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_config = {}
        for row in rows:
            by_config.setdefault(json.dumps({k: v for k, v in row["config"].items() if k in RUN_FIELDS},
                                            sort_keys=True), []).append(row)
        for same in by_config.values():
            sweep_config = config_of(same[0], path.parent)
            assert sweep_config.results_path() == path
            environment = {**search.environment(), "device": same[0]["device"]}
            monkeypatch.setattr(search, "environment", lambda environment=environment: environment)
            subset = data.subset(mnist, sweep_config.limit_train, sweep_config.limit_test)
            sweep = search.Sweep(sweep_config.validate(), subset, log=lambda line: None)
            for depth in sorted({row["depth"] for row in same}):
                reused = sweep._finished(depth)
                wanted = {(row["seed"], row["lr"]) for row in same if row["depth"] == depth}
                assert wanted <= set(reused), (path.name, depth)


def test_sweep_config_keeps_run_config_defaults():
    """SweepConfig's keyword fields for what a run trains are RunConfig's, with its defaults."""
    sweep_fields = {f.name: f.default for f in dataclasses.fields(SweepConfig)}
    run_fields = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert {name: sweep_fields[name] for name in RUN_FIELDS} == {name: run_fields[name] for name in RUN_FIELDS}
    made = SweepConfig(variant="elu", epochs=2, limit_train=10)
    assert made.run == RunConfig("elu", epochs=2, limit_train=10) and made.spec is registry.get_variant("elu")
    # a spec object that is not registered keeps its fields through dataclasses.replace
    mine = registry.Variant("unregistered_relu", "relu", init="he")
    replaced = dataclasses.replace(SweepConfig(variant=mine), epochs=1).for_device("cpu")
    assert replaced.spec is mine and replaced.variant == "unregistered_relu" and replaced.run.epochs == 1
    assert "run" not in replaced.as_row() and replaced.as_row()["variant"] == "unregistered_relu"


# ------------------------------------------------------------------------------ the adaptive search


@pytest.fixture
def seeded_boundary(monkeypatch):
    """Fake training whose runs train up to a depth that depends on the seed (21 to 33): P(trains)
    falls from 1 to 0 between k = 21 and 36. Records each batch's (depth, seeds)."""
    batches = []

    def fake_train(self, depth, runs):
        batches.append((depth, sorted({seed for seed, _ in runs})))
        return [RunResult(seed, lr, [0.05 if depth <= 21 + 3 * (seed % 5) else 0.9], [0.95], True)
                for seed, lr in runs]

    monkeypatch.setattr(search.Sweep, "_train", fake_train)
    return batches


def adaptive(tmp_path, **fields) -> SweepConfig:
    return config(tmp_path, **{"depths": None, "seeds": 3, "max_runs": 30, **fields})


def test_the_adaptive_search_brackets_then_samples_where_k50_is(tmp_path, seeded_boundary):
    report = flaxdepth.run_sweep(adaptive(tmp_path), synthetic(), log=lambda line: None)
    assert [batch["depth"] for batch in report.design[:5]] == [3, 6, 12, 24, 48]  # the bracket: 48 fails
    assert sum(len(batch["seeds"]) for batch in report.design) <= 30
    assert all(21 <= batch["depth"] <= 48 for batch in report.design[5:]) and len(report.design) > 5
    # a depth tried again gets the next seeds, so its runs stay independent
    again = [batch for batch in report.design if batch["depth"] == report.design[-1]["depth"]]
    assert [seed for batch in again for seed in batch["seeds"]] == list(range(3 * len(again)))
    fit = report.fits[0.05]
    low, high = fit.k50_interval
    assert 21 <= low <= fit.k50 <= high <= 40
    saved = json.loads(report.fit_path.read_text())
    assert saved["design"] == report.design and saved["fits"][0]["k50"] == pytest.approx(fit.k50)
    assert "k50 = " in report.table()


def test_batches_larger_than_the_design_computes_go_where_their_first_runs_tell_most(tmp_path, seeded_boundary):
    """An accelerator's default batch (16 seeds) passes trainability.MAX_BATCH_RUNS."""
    from flaxdepth import trainability

    assert 16 > trainability.MAX_BATCH_RUNS
    report = flaxdepth.run_sweep(adaptive(tmp_path, seeds=16, max_runs=96), synthetic(), log=lambda line: None)
    assert [batch["depth"] for batch in report.design[:5]] == [3, 6, 12, 24, 48] and len(report.design) > 5
    assert all(len(batch["seeds"]) == 16 for batch in report.design)


def test_the_adaptive_search_resumes_where_it_stood(tmp_path, seeded_boundary):
    """The design is a function of the rows: a sweep stopped early (a smaller budget) and run again
    trains only what the whole sweep would have trained after it, to the same design."""
    whole = flaxdepth.run_sweep(adaptive(tmp_path / "whole"), synthetic(), log=lambda line: None)
    trained_whole = list(seeded_boundary)
    seeded_boundary.clear()
    flaxdepth.run_sweep(adaptive(tmp_path / "parts", max_runs=18), synthetic(), log=lambda line: None)
    resumed = flaxdepth.run_sweep(adaptive(tmp_path / "parts"), synthetic(), log=lambda line: None)
    assert resumed.design == whole.design and seeded_boundary == trained_whole
    seeded_boundary.clear()
    flaxdepth.run_sweep(adaptive(tmp_path / "whole"), synthetic(), log=lambda line: None)
    assert seeded_boundary == []  # everything reused


@pytest.mark.parametrize("fields, message", [
    (dict(target_ratio=1.0), "--target-ratio is k50's interval hi / lo, more than 1, got 1.0"),
    (dict(max_runs=2), "--max-runs 2 is less than one batch of --seeds 3"),
    (dict(lrs=(0.05, 0.01)), "the adaptive search fits one learning rate"),
    (dict(search="grid"), "--search must be one of adaptive, bisect"),
])
def test_bad_adaptive_settings_stop_before_training(tmp_path, seeded_boundary, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flaxdepth.run_sweep(adaptive(tmp_path, **fields), synthetic())
    assert seeded_boundary == []


def test_seeds_and_budget_default_by_device():
    cpu, gpu = SweepConfig(variant="tanh").for_device("cpu"), SweepConfig(variant="tanh").for_device("gpu")
    assert (cpu.seeds, cpu.max_runs, gpu.seeds, gpu.max_runs) == (3, 30, 16, 160)
    assert SweepConfig(variant="tanh", seeds=40).for_device("cpu").max_runs == 40  # one batch at least
