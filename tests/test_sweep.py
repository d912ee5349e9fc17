"""Tests of the sweep: its command line (flaxdepth.sweep), the boundary search, resuming, kill
safety of the results file (flaxdepth.search, flaxdepth.results), and two tiny real runs.

The search logic runs against a fake trainer (`Sweep._train` replaced by a function of depth,
seed and lr), so those tests compile nothing; only the end-to-end tests train for real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from flaxdepth import cli, config as run_config, parity_check, registry, results, search, sweep, torch_runner, train
from flaxdepth.options import EngineOptions
from flaxdepth.results import ResultsFile
from flaxdepth.config import SweepConfig
from flaxdepth.search import run_sweep
from flaxdepth.train import RunResult

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
PROG_ERROR = "python -m flaxdepth.sweep: error: "
ROW_FIELDS = {"variant", "depth", "lr", "seed", "framework", "protocol", "train_errors", "test_errors", "finite",
              "trainable", "wall_s", "replicas_trained_together", "finished_at", "device", "device_count", "host",
              "versions", "config", "cpu_kernels_used", "dataset_sha256", "train_images", "test_images", "spec",
              "schema"}
#: The images of the sweeps whose training is faked (the rows record their count and checksum), as
#: code, for the subprocesses of a test too.
TINY_CODE = ("import numpy as np\nfrom flaxdepth.data import Dataset\n"
             "TINY = Dataset('mnist', np.zeros((8, 28, 28), np.uint8), np.arange(8, dtype=np.uint8),"
             " np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8))\n")
_namespace: dict = {}
exec(TINY_CODE, _namespace)
TINY = _namespace["TINY"]

needs_mnist = pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"the project's MNIST copy is absent ({SHARED_MNIST})")


# ------------------------------------------------------------------------------ helpers


class FakeTrainer:
    """Stands in for Sweep._train: `error(depth, seed, lr)` is the final error of a run."""

    def __init__(self, error):
        self.error = error
        self.calls: list[tuple[int, list[tuple[int, float]]]] = []

    def __call__(self, depth, runs):  # a class attribute that is no function: called unbound
        self.calls.append((depth, list(runs)))
        return [RunResult(seed, lr, [0.9, self.error(depth, seed, lr)], [0.9, self.error(depth, seed, lr) + 0.01],
                          True) for seed, lr in runs]

    @property
    def depths(self) -> list[int]:
        return [depth for depth, _ in self.calls]


def boundary_at(b: int, good: float = 0.05, bad: float = 0.9):
    """Every run trains up to depth b and none beyond."""
    return lambda depth, seed, lr: good if depth <= b else bad


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeTrainer (replacing the previous one); plots are skipped unless a test wants one."""
    monkeypatch.setattr(search, "save_plot", lambda report: None)

    def install(error) -> FakeTrainer:
        trainer = FakeTrainer(error)
        monkeypatch.setattr(search.Sweep, "_train", trainer)
        return trainer
    return install


def never_train(monkeypatch):
    """Make every way to train (and the parity check) fail loudly, to prove none is reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("training started")

    for target, name in ((train, "train_replicas"), (torch_runner, "train_torch_runs"), (search.Sweep, "_train"),
                         (search, "run_sweep"), (parity_check, "quick_parity")):
        monkeypatch.setattr(target, name, forbidden)


def make_config(tmp_path, **kwargs) -> SweepConfig:
    """A sweep of the bisection search (the adaptive design's tests: test_api.py) with 3 seeds."""
    return SweepConfig(**{"variant": "tanh", "epochs": 2, "out": str(tmp_path / "out"), "skip_parity": True,
                          "search": "bisect", "seeds": 3, **kwargs})


def sweep_quietly(config, log=None, dataset=TINY):
    return run_sweep(config, dataset, log=log if log is not None else (lambda line: None))


def files_beside(config) -> list[str]:
    """The results folder's files but the locks (hidden, kept by filelock)."""
    return sorted(name for name in os.listdir(config.results_path().parent) if not name.endswith(".lock"))


def file_rows(config) -> list[dict]:
    """The results file, every line parsed strictly."""
    text = config.results_path().read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ------------------------------------------------------------------------------ bad input


BAD_INPUT = {
    "unknown variant": (["--variant", "nope"], "unknown variant 'nope'"),
    "depth not a multiple of 3": (["--variant", "tanh", "--depths", "3,4"], "--depths must be positive multiples of 3"),
    "depth zero": (["--variant", "tanh", "--depths", "0"], "--depths must be positive multiples of 3"),
    "depth negative": (["--variant", "tanh", "--depths=-3"], "--depths must be positive multiples of 3"),
    "negative lr": (["--variant", "tanh", "--lr=-0.1"], "learning rates must be positive"),
    "zero lr among others": (["--variant", "tanh", "--lr", "0.05,0"], "learning rates must be positive"),
    "seeds 0": (["--variant", "tanh", "--seeds", "0"], "--seeds must be at least 1"),
    "seeds 0 for all variants": (["--variant", "all", "--seeds", "0"], "--seeds must be at least 1"),
    "process options without --distributed": (["--variant", "tanh", "--num-processes", "2"],
                                               "--num-processes only apply with --distributed"),
    "cpu devices 0": (["--variant", "tanh", "--cpu-devices", "0"], "--cpu-devices must be at least 1"),
    "cpu devices 0 with torch": (["--variant", "tanh", "--framework", "torch", "--cpu-devices", "0"],
                                 "--cpu-devices must be at least 1"),
    "missing data folder": (["--variant", "tanh", "--data-dir", "{tmp}/no-such-folder"], "is not a folder"),
    "data folder without the files": (["--variant", "tanh", "--data-dir", "{tmp}"], "is missing"),
    "replicas per block 0": (["--variant", "tanh", "--replicas-per-block", "0"],
                             "--replicas-per-block must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_before_training(case, tmp_path, monkeypatch, capsys):
    never_train(monkeypatch)
    argv, message = BAD_INPUT[case]
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(out)]
    assert sweep.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(PROG_ERROR) and message in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()  # nothing written either


@pytest.mark.parametrize("argv, expected", [
    ([], train.cpu_device_count(3)),
    (["--seeds", "2", "--lr", "0.01,0.02,0.05", "--search", "bisect"], train.cpu_device_count(6)),
    (["--cpu-devices", "5"], 5),
    (["--framework", "torch"], None),  # torch_ref does not use JAX's devices
    (["--distributed"], None),  # processes may share the cores: one device each unless asked
])
def test_cpu_devices_are_requested_before_jax_starts(argv, expected, tmp_path, monkeypatch, capsys):
    requested = []
    monkeypatch.setattr(train, "request_cpu_devices", requested.append)
    never_train(monkeypatch)

    def stop(args):  # the next step after the request
        raise run_config.ConfigError("stopped here")
    monkeypatch.setattr(sweep, "join_processes", stop)
    assert sweep.main(["--variant", "tanh", *argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"{PROG_ERROR}stopped here\n"
    assert requested == ([] if expected is None else [expected])


@pytest.mark.parametrize("argv, expected", [
    ([], train.cpu_device_count(3)),
    (["--cpu-devices", "4"], 4),
    (["--distributed", "--cpu-devices", "2"], 2),
])
def test_a_real_sweep_process_gets_its_cpu_devices(argv, expected, tmp_path, env_without_device_count):
    """In a fresh `python -m flaxdepth.sweep`-like process nothing starts JAX before the request:
    the devices are there when the sweep joins the other processes (stopped there)."""
    code = textwrap.dedent(f"""
        import jax
        from flaxdepth import sweep
        def stop(args):
            print(jax.device_count())
            raise SystemExit(0)
        sweep.join_processes = stop
        sweep.main(["--variant", "tanh", "--out", {str(tmp_path)!r}, *{argv!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_without_device_count,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == expected


def test_bad_input_in_a_real_process(tmp_path):
    """The same through `python -m`: exit status 2, one line on stderr, no traceback, nothing else."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flaxdepth.sweep", "--variant", "tanh", "--depths", "4",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"{PROG_ERROR}--depths must be positive multiples of 3 (3, 6, 9, ...), got [4]"]
    assert not out.exists()


def test_config_validation_in_the_library(tmp_path):
    """run_sweep checks its config too (a library caller has no CLI in front of it). The library
    takes depths that are not multiples of 3 (the notebook's k = 139); the CLI does not."""
    for bad in (dict(variant="nope"), dict(depths=(3, 2)), dict(depths=()), dict(lrs=(-1.0,)), dict(lrs=()),
                dict(seeds=0), dict(threshold=0.0), dict(threshold=float("nan")), dict(max_depth=2),
                dict(engine="highest")):
        with pytest.raises(ValueError):  # ConfigError and UnknownVariantError are ValueErrors
            run_sweep(make_config(tmp_path, **bad), TINY)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the search


def test_search_path_geometric_then_bisection(tmp_path, fake):
    trainer = fake(boundary_at(21))
    report = sweep_quietly(make_config(tmp_path))
    assert trainer.depths == [3, 6, 12, 24, 18, 21]  # grow until 24 fails, then bisect (12, 24)
    assert report.boundary() == (21, 24)
    assert "deepest trainable k=21, shallowest untrainable k=24" in report.table()


def expected_path(b: int, max_depth: int = 768) -> list[int]:
    """The path the search should take, written out independently of search.py."""
    top, path, depth = max_depth // 3 * 3, [], 3
    while True:
        path.append(depth)
        if depth > b:
            low, high = path[-2] // 3 if len(path) > 1 else None, depth // 3
            break
        if depth >= top:
            return path
        depth = min(2 * depth, top)
    while low is not None and high - low > 1:
        middle = (low + high) // 2
        path.append(3 * middle)
        low, high = (middle, high) if 3 * middle <= b else (low, middle)
    return path


@pytest.mark.parametrize("b", [3, 6, 9, 15, 45, 48, 63, 102, 138, 381, 765])
def test_search_finds_the_exact_boundary_with_few_evaluations(b, tmp_path, fake):
    trainer = fake(boundary_at(b))
    report = sweep_quietly(make_config(tmp_path))
    assert report.boundary() == (b, b + 3)
    assert trainer.depths == expected_path(b)
    assert len(set(trainer.depths)) == len(trainer.depths)  # no depth trained twice
    assert all(d % 3 == 0 for d in trainer.depths)
    # geometric growth plus bisection: about 2 log2(b / 3) evaluations, not b / 3
    assert len(trainer.depths) <= 2 * (b // 3).bit_length() + 1


def test_search_when_depth_3_fails(tmp_path, fake):
    trainer = fake(boundary_at(0))
    report = sweep_quietly(make_config(tmp_path))
    assert trainer.depths == [3]
    assert report.boundary() == (None, 3)
    assert "no evaluated depth trains for most seeds (shallowest tried k=3)" in report.table()


@pytest.mark.parametrize("max_depth, path", [
    (48, [3, 6, 12, 24, 48]),
    (50, [3, 6, 12, 24, 48]),
    # Growth is capped at --max-depth, not stopped at the last doubling below it (96 here).
    (100, [3, 6, 12, 24, 48, 96, 99]),
    (4, [3]),
])
def test_search_stops_at_max_depth(max_depth, path, tmp_path, fake):
    trainer = fake(boundary_at(10_000))
    report = sweep_quietly(make_config(tmp_path, max_depth=max_depth))
    assert trainer.depths == path
    assert report.boundary() == (path[-1], None)
    assert f"deepest trainable k={path[-1]}; no deeper depth was tried, or all trained" in report.table()


def test_search_bisects_below_a_capped_max_depth(tmp_path, fake):
    trainer = fake(boundary_at(138))
    report = sweep_quietly(make_config(tmp_path, max_depth=150))
    assert trainer.depths[:7] == [3, 6, 12, 24, 48, 96, 150]
    assert max(trainer.depths) == 150
    assert report.boundary() == (138, 141)


@pytest.mark.parametrize("b, found", [(0, (None, 3)), (3, (3, 6)), (45, (45, 48)), (102, (102, 105)),
                                      (765, (765, 768)), (10_000, (768, None))])
def test_boundary_search_returns_what_it_found(b, found):
    """The search alone, as experiments/report.py replays it on recorded results."""
    asked = []

    def trains(depth):
        asked.append(depth)
        return depth <= b

    assert search.boundary_search(trains, 768) == found
    assert asked == expected_path(b)


def test_boundary_search_with_a_hole_reports_the_edge_it_bisected_to():
    """Non-monotone trainability: everything up to 45 trains except k=36. The bisection between 24
    and 48 meets the hole first and settles at 33 / 36, never asking for 39, 42 or 45."""
    asked = []

    def trains(depth):
        asked.append(depth)
        return depth <= 45 and depth != 36

    assert search.boundary_search(trains, 768) == (33, 36)
    assert asked == [3, 6, 12, 24, 48, 36, 30, 33]


def test_precision_highest_goes_into_its_own_file_with_its_engine_options(tmp_path, fake):
    """--precision highest (an engine option): its own results file, the options in every row."""
    fake(boundary_at(6))
    engine = EngineOptions(precision="highest", rematerialize=True)
    config = make_config(tmp_path, depths=(3, 6), engine=engine)
    sweep_quietly(config)
    assert config.results_path().name == "tanh_jax_corrected_e2_b256_mnist_prechighest.jsonl"
    assert all(row["config"]["engine"] == engine.as_dict() for row in file_rows(config))
    assert make_config(tmp_path).results_path().name == "tanh_jax_corrected_e2_b256_mnist.jsonl"


def test_rows_record_the_rematerialization_chosen_for_their_depth(tmp_path, fake, monkeypatch):
    """--rematerialize auto (the command line's default) is resolved per depth before training, and
    each row stores the choice: here memory for depth 3's plain step but not for depth 30's."""
    from flaxdepth import models

    fake(boundary_at(30))
    steps_at_once = len(train.replica_mesh().local_devices)  # the sweep's CPU devices share the memory
    need = steps_at_once * models.step_memory_bytes(registry.get_variant("tanh"), 30, 256, 4, "none")
    monkeypatch.setattr(train, "available_memory", lambda device: need / models.MEMORY_FRACTION - 1)
    config = make_config(tmp_path, depths=(3, 30), seeds=1, engine=EngineOptions(rematerialize="auto"))
    sweep_quietly(config)
    chosen = {row["depth"]: row["config"]["engine"]["rematerialize"] for row in file_rows(config)}
    assert chosen == {3: "none", 30: "nested"}


@pytest.mark.parametrize("precision, traced", [("highest", "HIGHEST"), ("default", None)])
def test_programs_are_traced_at_the_engines_precision(precision, traced):
    """EngineOptions.precision reaches the compiled programs' matmuls (the head's Dense; on GPUs
    the convolutions too), whatever JAX's global setting is, and leaves that setting alone."""
    import jax
    import jax.numpy as jnp

    options = EngineOptions(precision=precision, cpu_kernels=False)
    _, init, _, test = train.compiled_functions("tanh", 3, 8, options=options)
    state = init(jnp.zeros(1, jnp.int32), jnp.full(1, 0.05))
    data = train.DeviceData(*(jnp.zeros(shape, dtype) for shape, dtype in (
        ((8, 28, 28), jnp.uint8), ((8,), jnp.int32), ((8, 28, 28), jnp.uint8), ((8,), jnp.int32))))
    program = test.lower(state, data).as_text()
    assert ("HIGHEST" in program) == (traced is not None)
    assert jax.config.jax_default_matmul_precision is None


def test_torch_tf32_is_off_for_highest_and_restored():
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with torch_runner.tf32_allowed(False):
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_majority_of_seeds_decides(tmp_path, fake):
    """Seed 0 trains up to 21, seed 1 up to 9, seed 2 up to 45: two of three train up to 21."""
    limits = {0: 21, 1: 9, 2: 45}
    trainer = fake(lambda depth, seed, lr: 0.05 if depth <= limits[seed] else 0.9)
    report = sweep_quietly(make_config(tmp_path, seeds=3))
    assert report.boundary() == (21, 24)
    assert [(s, lr) for s, lr in trainer.calls[0][1]] == [(0, 0.05), (1, 0.05), (2, 0.05)]  # one call per depth
    assert report.outcomes[12].trainable_count(0.05) == 2 and report.outcomes[12].trains(0.05)
    assert report.outcomes[24].trainable_count(0.05) == 1 and not report.outcomes[24].trains(0.05)


def test_two_seeds_need_both(tmp_path, fake):
    """Most seeds means more than half: 1 of 2 is not enough."""
    fake(lambda depth, seed, lr: 0.05 if depth <= (21 if seed == 0 else 9) else 0.9)
    report = sweep_quietly(make_config(tmp_path, seeds=2))
    assert report.boundary() == (9, 12)


def test_several_learning_rates(tmp_path, fake):
    """A depth trains when most seeds train at any lr; each lr keeps its own boundary."""
    trainer = fake(lambda depth, seed, lr: 0.05 if depth <= {0.05: 12, 0.01: 30}[lr] else 0.9)
    report = sweep_quietly(make_config(tmp_path, lrs=(0.05, 0.01), seeds=2))
    assert trainer.depths == [3, 6, 12, 24, 48, 36, 30, 33]
    assert trainer.calls[0][1] == [(0, 0.05), (0, 0.01), (1, 0.05), (1, 0.01)]  # trained side by side
    assert report.boundary() == (30, 33)
    assert report.boundary(0.05) == (12, 24)
    assert report.boundary(0.01) == (30, 33)
    rows = file_rows(report.config)
    assert len(rows) == 4 * len(trainer.depths)
    assert {row["lr"] for row in rows} == {0.05, 0.01}


def test_explicit_depths_are_evaluated_as_given(tmp_path, fake):
    trainer = fake(boundary_at(6))
    report = sweep_quietly(make_config(tmp_path, depths=(9, 3, 6)))
    assert trainer.depths == [9, 3, 6]
    assert report.boundary() == (6, 9)


# ------------------------------------------------------------------------------ resuming


def test_rerun_reuses_every_finished_row(tmp_path, fake):
    fake(boundary_at(21))
    config = make_config(tmp_path)
    first = sweep_quietly(config)
    rows_before = file_rows(config)
    again = fake(boundary_at(21))
    logs = []
    second = sweep_quietly(config, log=logs.append)
    assert again.calls == []  # nothing trained
    assert file_rows(config) == rows_before  # nothing appended
    assert second.boundary() == first.boundary() == (21, 24)
    assert sorted(second.outcomes) == sorted(first.outcomes)
    assert second.table() == first.table()
    assert len(logs) == 6 and all("already in" in line and "reused" in line for line in logs)


def test_adding_a_seed_trains_only_the_missing_runs(tmp_path, fake):
    fake(boundary_at(21))
    sweep_quietly(make_config(tmp_path, seeds=3))
    trainer = fake(boundary_at(21))
    report = sweep_quietly(make_config(tmp_path, seeds=4))
    assert trainer.calls and all(runs == [(3, 0.05)] for _, runs in trainer.calls)
    assert trainer.depths == [3, 6, 12, 24, 18, 21]
    assert report.boundary() == (21, 24)
    rows = file_rows(report.config)
    assert sorted((r["depth"], r["seed"]) for r in rows) == sorted((d, s) for d in trainer.depths for s in range(4))


def test_a_new_lr_is_trained_the_old_one_reused(tmp_path, fake):
    fake(boundary_at(21))
    sweep_quietly(make_config(tmp_path, seeds=2, depths=(3, 6)))
    trainer = fake(boundary_at(21))
    sweep_quietly(make_config(tmp_path, seeds=2, depths=(3, 6), lrs=(0.05, 0.1)))
    assert trainer.calls == [(3, [(0, 0.1), (1, 0.1)]), (6, [(0, 0.1), (1, 0.1)])]


def test_threshold_change_on_rerun_recomputes_verdicts(tmp_path, fake):
    """Final errors depth / 100: under 0.2 up to k=18, under 0.1 up to k=9."""
    trainer = fake(lambda depth, seed, lr: depth / 100)
    first = sweep_quietly(make_config(tmp_path, threshold=0.2))
    assert trainer.depths == [3, 6, 12, 24, 18, 21]
    assert first.boundary() == (18, 21)
    trainer = fake(lambda depth, seed, lr: depth / 100)
    second = sweep_quietly(make_config(tmp_path, threshold=0.1))
    assert trainer.depths == [9]  # 3, 6 and 12 read back and judged again; only 9 is new
    assert second.boundary() == (9, 12)
    assert all(not row["trainable"] for row in second.outcomes[12].rows)
    line_12 = second.table().splitlines()[4]  # header, then k = 3, 6, 9, 12
    assert line_12.split()[0] == "12" and line_12.endswith("0/3")
    # the file keeps what each run's own sweep decided; only the report is judged again
    stored = {(r["depth"], r["seed"]): r["trainable"] for r in file_rows(second.config)}
    assert stored[(12, 0)] is True and stored[(9, 0)] is True


def test_diverged_runs_never_count_as_trainable(tmp_path, fake, monkeypatch):
    """A run whose loss went NaN is untrainable even with a low error count, on every rerun."""
    def diverging(self, depth, runs):
        return [RunResult(seed, lr, [0.05], [0.05], seed != 1) for seed, lr in runs]

    monkeypatch.setattr(search.Sweep, "_train", diverging)
    config = make_config(tmp_path, seeds=2, depths=(3,))
    for _ in range(2):  # trained, then read back and judged again
        report = sweep_quietly(config)
        assert [row["trainable"] for row in report.outcomes[3].rows] == [True, False]
        assert report.boundary() == (None, 3)  # 1 of 2 is no majority
        assert report.table().splitlines()[1].endswith("NaN  1/2")
    assert [row["finite"] for row in file_rows(config)] == [True, False]


def test_table_lists_every_run(tmp_path, fake):
    fake(lambda depth, seed, lr: 0.05 if depth <= 6 or seed == 0 else 0.9)
    report = sweep_quietly(make_config(tmp_path, seeds=2, depths=(3, 6, 9)))
    lines = report.table().splitlines()
    assert "seed 0" in lines[0] and "seed 1" in lines[0] and "trainable" in lines[0]
    assert lines[1].split()[:2] == ["3", "0.05"] and lines[1].endswith("2/2")
    assert lines[3].split()[:2] == ["9", "0.05"] and lines[3].endswith("1/2")
    assert lines[4].endswith("deepest trainable k=6, shallowest untrainable k=9")  # the majority vote
    assert lines[5] == "P(trains | depth), lr 0.05 (trained: finite and error < 0.2):"
    assert [line.split()[:3] for line in lines[7:10]] == [["3", "2", "2"], ["6", "2", "2"], ["9", "2", "1"]]
    assert lines[10].startswith("  k50 = ") and "(95%" in lines[10]


def test_plot_is_written(tmp_path, monkeypatch):
    trainer = FakeTrainer(boundary_at(9))
    monkeypatch.setattr(search.Sweep, "_train", trainer)
    report = sweep_quietly(make_config(tmp_path, seeds=2, lrs=(0.05, 0.01)))
    assert report.plot_path == report.path.with_suffix(".png")
    assert report.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.plot_path.stat().st_size > 10_000


# ------------------------------------------------------------------------------ kill safety


def test_crash_while_replacing_the_file_keeps_complete_rows(tmp_path, fake, monkeypatch):
    """The second write of a sweep fails at its os.replace: the file keeps the first depth's rows,
    no temporary file is left, and a rerun trains only what is missing."""
    fake(boundary_at(21))
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", crashing_replace)
    config = make_config(tmp_path)
    with pytest.raises(OSError, match="simulated crash"):
        sweep_quietly(config)
    monkeypatch.setattr(results.os, "replace", real_replace)
    rows = file_rows(config)
    assert [(r["depth"], r["seed"]) for r in rows] == [(3, 0), (3, 1), (3, 2)]
    assert all(ROW_FIELDS - {"dataset_sha256"} <= set(r) for r in rows)
    assert files_beside(config) == [config.results_path().name]
    trainer = fake(boundary_at(21))
    report = sweep_quietly(config)
    assert trainer.depths == [6, 12, 24, 18, 21]
    assert report.boundary() == (21, 24)
    assert len(file_rows(config)) == 3 * 6


def test_crash_in_the_middle_of_writing_rows_keeps_the_old_file(tmp_path, fake, monkeypatch):
    """json.dumps fails on the 5th row written, half-way through the second write (3 old rows,
    then the new ones): the half-written temporary file never becomes the results file."""
    fake(boundary_at(21))
    dumped = []

    class CrashingJson:
        loads = staticmethod(json.loads)
        JSONDecodeError = json.JSONDecodeError

        @staticmethod
        def dumps(obj, **kwargs):
            dumped.append(obj)
            if len(dumped) == 5:
                raise RuntimeError("simulated crash")
            return json.dumps(obj, **kwargs)

    monkeypatch.setattr(results, "json", CrashingJson)
    config = make_config(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep_quietly(config)
    monkeypatch.setattr(results, "json", json)
    assert [r["depth"] for r in file_rows(config)] == [3, 3, 3]
    assert files_beside(config) == [config.results_path().name]
    trainer = fake(boundary_at(21))
    assert sweep_quietly(config).boundary() == (21, 24)
    assert trainer.depths == [6, 12, 24, 18, 21]


WRITER = textwrap.dedent("""
    import sys
    from flaxdepth.results import ResultsFile

    f = ResultsFile(sys.argv[1])
    for batch in range(100000):  # each write rewrites the whole, growing file, row by row
        f.append([{"i": i, "payload": "x" * 100, "depth": 3, "seed": i, "lr": 0.05, "train_errors": [],
                   "test_errors": [], "finite": True} for i in range(1000 * batch, 1000 * (batch + 1))])
""")


def test_sigkill_at_any_moment_leaves_complete_rows(tmp_path):
    """Kill a process appending batches of 1000 rows with SIGKILL at several moments: each time
    the file is valid JSON lines of complete batches (rows 0, 1, ..., n-1), and appending
    afterwards works. (A writer that truncates and rewrites in place fails this: most of each
    write's time goes into the row-by-row loop, where a kill leaves a cut file.)"""
    path = tmp_path / "runs.jsonl"
    counts = []
    for delay in (0.4, 0.6, 0.8, 1.0, 1.2, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["i"] for row in rows] == list(range(len(rows)))
        assert len(rows) % 1000 == 0 and all(row["payload"] == "x" * 100 for row in rows)
        counts.append(len(rows))
        path.unlink()  # the next round starts over, so the file stays small
    assert counts, "no kill landed after the first write; lengthen the delays"
    for leftover in tmp_path.glob(".runs.jsonl.*.tmp"):  # SIGKILL cannot clean up; harmless
        leftover.unlink()
    row = {"depth": 3, "seed": 0, "lr": 0.05, "train_errors": [], "test_errors": [], "finite": True}
    ResultsFile(path).append([row])
    assert ResultsFile(path).rows() == [row]


SWEEPER = TINY_CODE + textwrap.dedent("""
    import sys, time
    from flaxdepth import search, train

    def slow_fake(self, depth, runs):
        time.sleep(0.5)
        return [train.RunResult(s, lr, [0.05 if depth <= 21 else 0.9], [0.5], True) for s, lr in runs]

    search.Sweep._train = slow_fake
    search.save_plot = lambda report: None
    config = search.SweepConfig(variant="tanh", epochs=1, out=sys.argv[1], skip_parity=True, search="bisect",
                                 seeds=3)
    search.run_sweep(config, TINY, log=lambda line: None)
    print("finished")
""")


def test_sweep_killed_mid_search_resumes(tmp_path, fake):
    """SIGKILL a sweep process once two depths are written; a rerun keeps their rows and trains
    only the rest of the search."""
    config = make_config(tmp_path, epochs=1)
    proc = subprocess.Popen([sys.executable, "-c", SWEEPER, config.out], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            path = config.results_path()
            if path.exists() and len(path.read_text().splitlines()) >= 6:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        else:
            pytest.fail("the sweep wrote nothing in time")
    finally:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "finished" not in out
    written = sorted({r["depth"] for r in file_rows(config)})
    assert written[:2] == [3, 6] and len(file_rows(config)) == 3 * len(written)
    trainer = fake(lambda depth, seed, lr: 0.05 if depth <= 21 else 0.9)
    report = sweep_quietly(config)
    assert report.boundary() == (21, 24)
    assert not set(trainer.depths) & set(written)
    assert sorted(set(trainer.depths) | set(written)) == [3, 6, 12, 18, 21, 24]


# ------------------------------------------------------------------------------ sharing a results file


CONCURRENT = TINY_CODE + textwrap.dedent("""
    import json, os, sys, time
    from flaxdepth import search, train

    def slow_fake(self, depth, runs):
        with open(sys.argv[2], "a") as log:  # every run this process trains, one line each
            log.writelines(json.dumps([os.getpid(), depth, seed]) + "\\n" for seed, _ in runs)
        time.sleep(0.3)
        return [train.RunResult(s, lr, [0.05 if depth <= 9 else 0.9], [0.5], True) for s, lr in runs]

    search.Sweep._train = slow_fake
    search.save_plot = lambda report: None
    config = search.SweepConfig(variant="tanh", epochs=1, out=sys.argv[1], skip_parity=True, search="bisect",
                                 seeds=3)
    print(search.run_sweep(config, TINY, log=lambda line: None).boundary())
""")


def test_two_sweeps_of_one_file_train_and_write_every_run_once(tmp_path):
    """Two processes start the same sweep on one results file at once (two terminals, a job
    array): each depth's runs are trained by one of them, the other waits and reuses them, and the
    file holds every run once; both find the same boundary."""
    out, trained = tmp_path / "out", tmp_path / "trained.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(out), str(trained)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert [stdout.strip() for stdout, _ in outputs] == ["(9, 12)"] * 2
    runs = [tuple(json.loads(line))[1:] for line in trained.read_text().splitlines()]
    assert sorted(runs) == sorted(set(runs)) == [(d, s) for d in (3, 6, 9, 12) for s in range(3)]
    rows = file_rows(make_config(tmp_path, epochs=1))
    assert sorted((r["depth"], r["seed"]) for r in rows) == sorted(runs)


def test_a_damaged_line_is_set_aside_and_every_intact_run_reused(tmp_path, fake, capsys):
    """A cut line (a partial write by another tool) and a merge marker in the results file: one
    warning line, the damaged lines kept in <file>.damaged, every intact run reused, no traceback."""
    config = make_config(tmp_path, depths=(3, 6))
    fake(boundary_at(21))
    sweep_quietly(config)
    path = config.results_path()
    lines = path.read_text().splitlines(keepends=True)
    damaged = [lines[4][:40] + "\n", "<<<<<<< HEAD\n"]
    path.write_text("".join(lines[:4] + damaged[:1] + lines[5:] + damaged[1:]))
    trainer = fake(boundary_at(21))
    report = sweep_quietly(config)
    assert trainer.calls == [(6, [(1, 0.05)])]  # only the run whose line was cut
    assert report.boundary() == (6, None)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "set aside 2 damaged line(s) (line 5, 7)" in err[0] and ".damaged" in err[0]
    assert Path(str(path) + ".damaged").read_text() == "".join(damaged)
    assert len(file_rows(config)) == 6


def test_runs_of_another_device_are_kept_but_not_reused(tmp_path, fake):
    """The committed results of an H200 are not a CPU user's: the CPU sweep trains its own runs
    beside them and its boundary is its own."""
    config = make_config(tmp_path, depths=(3,))
    other = {"depth": 3, "seed": 0, "lr": 0.05, "train_errors": [0.9, 0.9], "test_errors": [0.9, 0.9],
             "finite": True, "device": "gpu:NVIDIA H200"}
    ResultsFile(config.results_path()).append([other])
    logged = []
    trainer = fake(boundary_at(21))
    report = sweep_quietly(config, log=logged.append)
    assert trainer.calls == [(3, [(0, 0.05), (1, 0.05), (2, 0.05)])]
    assert report.boundary() == (3, None)
    assert any("gpu:NVIDIA H200" in line and "not reused" in line for line in logged)
    assert len(file_rows(config)) == 4


def test_runs_of_an_edited_variant_are_not_reused(tmp_path, fake):
    """A declared variant whose fields change under the same name trains again: a row is reused
    only for the spec it was trained with (rows without a spec are the built-ins')."""
    try:
        registry.register(registry.Variant("mine", "relu", init="he"))
        config = make_config(tmp_path, variant="mine", depths=(3,), seeds=1)
        trainer = fake(boundary_at(21))
        sweep_quietly(config)
        sweep_quietly(config)
        assert trainer.depths == [3]
        registry.register(registry.Variant("mine", "relu", init="he", init_fan="in"))
        assert config.spec.init_fan == "out"  # a configuration keeps the spec it was made with
        config = make_config(tmp_path, variant="mine", depths=(3,), seeds=1)
        logged = []
        sweep_quietly(config, log=logged.append)
        assert trainer.depths == [3, 3]
        assert any("other fields of mine" in line and "not reused" in line for line in logged)
        assert [row["spec"]["init_fan"] for row in file_rows(config)] == ["out", "in"]
    finally:
        registry.unregister("mine")


def test_default_output_is_the_users_folder(monkeypatch):
    """Not the repository's committed experiments/results: ./flaxdepth-results, or $FLAXDEPTH_RESULTS."""
    monkeypatch.delenv(run_config.RESULTS_ENV, raising=False)
    assert sweep.parse_args(["--variant", "tanh"]).out == "flaxdepth-results"
    monkeypatch.setenv(run_config.RESULTS_ENV, "/scratch/me/depth")
    assert sweep.parse_args(["--variant", "tanh"]).out == "/scratch/me/depth"


def test_rows_store_paths_without_the_machines_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = make_config(tmp_path, out=str(tmp_path / "results" / "mine"), data_dir="/home/someone/mnist")
    assert (config.as_row()["out"], config.as_row()["data_dir"]) == ("results/mine", "mnist")
    assert make_config(tmp_path, out="rel/out").as_row()["out"] == "rel/out"


def test_engine_options_from_the_command_line(monkeypatch):
    monkeypatch.delenv("FLAXDEPTH_CPU_KERNELS", raising=False)
    assert cli.engine_options(sweep.parse_args(["--variant", "tanh"])) == EngineOptions(rematerialize="auto")
    args = sweep.parse_args(["--variant", "tanh", "--no-cpu-kernels", "--rematerialize", "--replicas-per-block", "4",
                             "--precision", "highest"])
    assert cli.engine_options(args) == EngineOptions(False, "layers", 4, "highest")
    assert cli.engine_options(sweep.parse_args(["--variant", "tanh", "--rematerialize", "nested"])).rematerialize \
        == "nested"
    monkeypatch.setenv("FLAXDEPTH_CPU_KERNELS", "0")  # the environment sets the default once, at the edge
    assert not cli.engine_options(sweep.parse_args(["--variant", "tanh"])).cpu_kernels
    assert cli.engine_options(sweep.parse_args(["--variant", "tanh", "--cpu-kernels"])).cpu_kernels


# ------------------------------------------------------------------------------ real runs


#: The real runs train a variant declared in a TOML file, outside the CPU kernels' reach (ReLU,
#: GroupNorm, He init, a random bias): the whole path from the file to the rows and the plot.
DECLARED_TOML = """
[variants.relu_gn]
activation = "relu"
norm = "group"
norm_groups = 2
init = "he"
init_fan = "in"
bias_std = 0.01
description = "ReLU, GroupNorm, He init"
"""


@pytest.fixture
def declared(tmp_path):
    """A variants file declaring relu_gn (unregistered afterwards)."""
    path = tmp_path / "my_variants.toml"
    path.write_text(DECLARED_TOML)
    yield path
    registry.unregister("relu_gn")


def real_argv(variants_file: Path) -> list[str]:
    return ["--variants-file", str(variants_file), "--variant", "relu_gn", "--depths", "3", "--seeds", "2",
            "--epochs", "1", "--limit-train", "512", "--limit-test", "256", "--data-dir", str(SHARED_MNIST)]


def check_real_rows(rows: list[dict], framework: str, out: Path) -> None:
    assert [(r["depth"], r["seed"], r["lr"]) for r in rows] == [(3, 0, 0.05), (3, 1, 0.05)]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["variant"] == "relu_gn" and row["framework"] == framework and row["protocol"] == "corrected"
        assert row["spec"] == registry.get_variant("relu_gn").fields() and row["spec"]["norm"] == "group"
        assert len(row["train_errors"]) == len(row["test_errors"]) == 1
        assert all(0 <= e <= 1 for e in row["train_errors"] + row["test_errors"])
        # errors are counts over the subset sizes
        assert row["train_errors"][0] * 512 == pytest.approx(round(row["train_errors"][0] * 512), abs=1e-3)
        assert row["test_errors"][0] * 256 == pytest.approx(round(row["test_errors"][0] * 256), abs=1e-3)
        assert row["trainable"] == (row["finite"] and min(row["train_errors"][-1], row["test_errors"][-1]) < 0.2)
        assert row["wall_s"] > 0 and row["replicas_trained_together"] == 2
        assert (row["train_images"], row["test_images"], row["schema"]) == (512, 256, run_config.ROW_SCHEMA)
        assert isinstance(row["device"], str) and ":" in row["device"]
        assert row["versions"]["jax"] and row["versions"]["torch"]
        expected = SweepConfig(
            variant="relu_gn", depths=(3,), seeds=2, epochs=1, limit_train=512, limit_test=256,
            data_dir=str(SHARED_MNIST), out=str(out), framework=framework,
            skip_parity=framework == "torch").for_device(jax.default_backend()).as_row()
        assert row["config"] == json.loads(json.dumps(expected))
        # no private paths: folders outside the working directory by their names
        assert (row["config"]["out"], row["config"]["data_dir"]) == (out.name, SHARED_MNIST.name)
        assert len(row["dataset_sha256"]) == 64


def check_printed_table(stdout: str, framework: str) -> Path:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["k", "lr"])
    assert "seed 0" in lines[header] and "seed 1" in lines[header]
    assert lines[header + 1].split()[:2] == ["3", "0.05"] and re.search(r" [012]/2$", lines[header + 1])
    assert lines[header + 2].startswith(f"relu_gn (corrected, {framework}, lr 0.05): ")
    results_line = next(line for line in lines if line.startswith("results: "))
    plot_line = next(line for line in lines if line.startswith("plot: "))
    fit_line = next(line for line in lines if line.startswith("fit: "))
    path = Path(results_line.split(maxsplit=1)[1])
    assert Path(plot_line.split(maxsplit=1)[1]).read_bytes()[:4] == b"\x89PNG"
    fits = json.loads(Path(fit_line.split(maxsplit=1)[1]).read_text())
    assert [(f["lr"], [d["depth"] for d in f["data"]]) for f in fits["fits"]] == [(0.05, [3])]
    assert fits["design"] == []  # --depths: no adaptive batches
    return path


@pytest.mark.slow
@needs_mnist
def test_real_cli_run_jax_with_parity_check(tmp_path, capsys, declared):
    out = tmp_path / "results"
    assert sweep.main([*real_argv(declared), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("parity relu_gn k=6, 3 SGD steps: relative error")
    path = check_printed_table(stdout, "jax")
    assert path == out / "relu_gn_jax_corrected_e1_b256_mnist_train512_test256.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    check_real_rows(rows, "jax", out)


@pytest.mark.slow
@needs_mnist
def test_real_cli_run_torch_gives_the_same_row_format(tmp_path, capsys, declared):
    out = tmp_path / "results"
    assert sweep.main([*real_argv(declared), "--out", str(out), "--framework", "torch", "--skip-parity"]) == 0
    stdout = capsys.readouterr().out
    assert "parity" not in stdout
    path = check_printed_table(stdout, "torch")
    assert path == out / "relu_gn_torch_corrected_e1_b256_mnist_train512_test256.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    check_real_rows(rows, "torch", out)


@needs_mnist
def test_a_failing_parity_check_stops_the_sweep_before_training(tmp_path, capsys, monkeypatch, declared):
    """A flaxdepth that computes something else than torch_ref (here one conv kernel scaled after
    conversion) trains nothing: exit 1, one line with the errors and what to do."""
    import jax

    from flaxdepth import interop

    real_from_torch = interop.from_torch

    def off(variant, depth, state_dict):
        leaves, tree = jax.tree.flatten(real_from_torch(variant, depth, state_dict))
        return jax.tree.unflatten(tree, [leaf * 1.5 if leaf.ndim == 4 else leaf for leaf in leaves])

    monkeypatch.setattr(interop, "from_torch", off)
    monkeypatch.setattr(search.Sweep, "run", lambda *args, **kwargs: pytest.fail("training started"))
    out = tmp_path / "out"
    assert sweep.main([*real_argv(declared), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG_ERROR}flaxdepth disagrees with torch_ref: parity relu_gn")
    assert "--skip-parity" in lines[0] and "Traceback" not in captured.err
    assert not out.exists()


def test_a_results_file_has_the_permissions_of_any_new_file(tmp_path):
    """Written through a private temporary file, it still gets 0666 less the umask (others in a
    job array or a shared folder read it)."""
    path = tmp_path / "runs.jsonl"
    umask = os.umask(0o022)
    try:
        ResultsFile(path).append([{"depth": 3, "seed": 0, "lr": 0.05, "train_errors": [0.1], "test_errors": [0.1],
                                   "finite": True}])
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
