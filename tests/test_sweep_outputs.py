"""What a sweep keeps of each run beside its errors: `--save-weights` (Flax msgpack and torch
state_dict files beside the results file) and `--diagnostics` (a per-layer summary at init and at
the end in each row), in both frameworks (flaxdepth.run_outputs).

One tiny real run per framework (elu_bn k = 6, one seed, one epoch of 512 images, 256 test images)
serves every real-run test; the rest writes files or runs a fake trainer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from flaxdepth import data, interop, measure, run_outputs, search, sweep, torch_runner, train
from flaxdepth.config import RunConfig, SweepConfig
from flaxdepth.options import EngineOptions
from flaxdepth.data import Dataset
from flaxdepth.search import run_sweep
from flaxdepth.train import RunResult

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
PROG_ERROR = "python -m flaxdepth.sweep: error: "

needs_mnist = pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"the project's MNIST copy is absent ({SHARED_MNIST})")

VARIANT, DEPTH, TRAIN, TEST, PROBE = "elu_bn", 6, 512, 256, 64
#: Both flags on one run; elu_bn, so that the saved weights carry BatchNorm's running statistics,
#: which the test error (eval mode) reads.
TINY_SWEEP = ["--variant", VARIANT, "--depths", str(DEPTH), "--seeds", "1", "--epochs", "1",
              "--limit-train", str(TRAIN), "--limit-test", str(TEST), "--data-dir", str(SHARED_MNIST),
              "--skip-parity", "--quiet", "--save-weights", "--diagnostics", "--probe-size", str(PROBE)]
#: Two logits closer than this may swap order between two float32 computations of one model (they
#: differ by about 1e-6 here); the images whose top two logits are that close form the allowance of
#: misclassified images by which two frameworks' test errors may differ.
FLIP_MARGIN = 1e-4


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, one_torch_thread):
    """The tiny sweep in each framework: {framework: (exit status, results file)}."""
    runs = {}
    for framework in ("jax", "torch"):
        out = tmp_path_factory.mktemp(framework)
        status = sweep.main([*TINY_SWEEP, "--framework", framework, "--out", str(out)])
        name = f"{VARIANT}_{framework}_corrected_e1_b256_mnist_train{TRAIN}_test{TEST}.jsonl"
        runs[framework] = status, out / name
    return runs


def the_row(tiny_runs, framework: str) -> tuple[Path, dict]:
    status, path = tiny_runs[framework]
    assert status == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1
    return path, rows[0]


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def tiny_test_set():
    dataset = data.subset(data.load_dataset("mnist", str(SHARED_MNIST)), TRAIN, TEST)
    return dataset.test_images, dataset.test_labels


def torch_misclassified(state_dict, images, labels, batch_size=256) -> tuple[int, int]:
    """(misclassified, images whose top two logits are within FLIP_MARGIN) of torch_ref's model
    with these weights, in eval mode, in float32, batched as the sweep tests."""
    import torch

    import torch_ref
    from torch_ref import training

    model = torch_ref.build(VARIANT, DEPTH)
    model.load_state_dict(state_dict)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tiny runs ran
    try:
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in training.batches(training.normalize(images), labels,
                                                                      np.arange(len(labels)), batch_size)])
    finally:
        torch.set_num_threads(threads)
    top2 = logits.topk(2, dim=1).values
    wrong = int((logits.argmax(1).numpy() != labels).sum())
    return wrong, int(((top2[:, 0] - top2[:, 1]) < FLIP_MARGIN).sum())


# ------------------------------------------------------------------------------ saved weights


@pytest.mark.slow
@needs_mnist
def test_a_saved_jax_run_loaded_into_torch_ref_gives_its_test_error(tiny_runs):
    """The .pt file, loaded with torch_ref.build + load_state_dict, misclassifies as many of the
    256 test images as flaxdepth did, up to the images near a tie (FLIP_MARGIN)."""
    path, row = the_row(tiny_runs, "jax")
    assert row["weights"] == {
        "flax": f"{path.stem}.weights/{VARIANT}-k{DEPTH}-seed0-lr0.05.msgpack",
        "torch": f"{path.stem}.weights/{VARIANT}-k{DEPTH}-seed0-lr0.05.pt"}
    _, state_dict = run_outputs.load_weights(path, row)
    assert "conv_stages.0.1.running_var" in state_dict  # BatchNorm's statistics travel with the weights
    flaxdepth_wrong = round(row["test_errors"][-1] * TEST)
    wrong, near_ties = torch_misclassified(state_dict, *tiny_test_set())
    assert near_ties <= 2  # else the comparison says little
    assert abs(wrong - flaxdepth_wrong) <= near_ties, (wrong, flaxdepth_wrong, near_ties)


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_the_msgpack_and_the_state_dict_hold_the_same_weights(framework, tiny_runs):
    path, row = the_row(tiny_runs, framework)
    variables, state_dict = run_outputs.load_weights(path, row)
    assert sorted(variables) == ["batch_stats", "params"]
    saved, converted = flat(variables), flat(interop.from_torch(VARIANT, DEPTH, state_dict))
    assert sorted(saved) == sorted(converted)
    for key, value in saved.items():
        np.testing.assert_array_equal(value, converted[key], err_msg=key)


@pytest.mark.slow
@needs_mnist
def test_a_saved_torch_run_gives_its_test_error_exactly(tiny_runs):
    """--framework torch saves torch_ref's own state_dict: reloaded, the same computation as the
    sweep's test gives the same count."""
    path, row = the_row(tiny_runs, "torch")
    _, state_dict = run_outputs.load_weights(path, row)
    wrong, _ = torch_misclassified(state_dict, *tiny_test_set())
    assert wrong == round(row["test_errors"][-1] * TEST)


@pytest.mark.slow
@needs_mnist
def test_training_with_the_callback_gives_the_same_numbers(tiny_runs):
    """train_replicas without on_state trains the run the sweep trained with it to the same errors."""
    _, row = the_row(tiny_runs, "jax")
    dataset = data.subset(data.load_dataset("mnist", str(SHARED_MNIST)), TRAIN, TEST)
    options = EngineOptions(**row["config"]["engine"])
    [result] = train.train_replicas(RunConfig(VARIANT, epochs=1), DEPTH, train.DeviceData.put(dataset), [(0, 0.05)],
                                    options=options)
    assert (result.train_errors, result.test_errors) == (row["train_errors"], row["test_errors"])


def test_weight_files_are_named_once_and_written_atomically(tmp_path, monkeypatch):
    """A name another row holds (another device's run, an edited variant's) gets a suffix; a write
    that fails leaves neither a partial file nor a temporary one, and a file no row names is
    replaced by the next run of that name."""
    import torch

    results = tmp_path / "runs.jsonl"
    variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    state_dict = {"w": np.arange(6, dtype=np.float32).reshape(3, 2)}
    taken = {"runs.weights/tanh-k3-seed0-lr0.05.msgpack", "runs.weights/tanh-k3-seed0-lr0.05.pt"}
    names = run_outputs.save_weights(results, "tanh-k3-seed0-lr0.05", variables, state_dict, taken)
    assert names == {"flax": "runs.weights/tanh-k3-seed0-lr0.05-2.msgpack",
                     "torch": "runs.weights/tanh-k3-seed0-lr0.05-2.pt"}
    assert set(names.values()) <= taken
    restored, tensors = run_outputs.load_weights(results, {"weights": names})
    np.testing.assert_array_equal(restored["params"]["w"], variables["params"]["w"])
    np.testing.assert_array_equal(tensors["w"].numpy(), state_dict["w"])

    real_save = torch.save

    def cut_save(obj, f):
        real_save(obj, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", cut_save)
    with pytest.raises(OSError, match="disk full"):
        run_outputs.save_weights(results, "tanh-k6-seed0-lr0.05", variables, state_dict, set())
    folder = tmp_path / "runs.weights"
    assert sorted(os.listdir(folder)) == ["tanh-k3-seed0-lr0.05-2.msgpack", "tanh-k3-seed0-lr0.05-2.pt",
                                          "tanh-k6-seed0-lr0.05.msgpack"]  # no .pt, no .tmp
    monkeypatch.setattr(torch, "save", real_save)
    names = run_outputs.save_weights(results, "tanh-k6-seed0-lr0.05", variables, state_dict, set())
    assert names["flax"] == "runs.weights/tanh-k6-seed0-lr0.05.msgpack"  # no row named the file left behind
    assert len(os.listdir(folder)) == 4


# ------------------------------------------------------------------------------ diagnostics


def check_summary(summary: dict, bn_train: bool) -> None:
    assert summary["bn_train"] is bn_train and summary["loss"] > 0
    assert sorted(summary) == sorted(["bn_train", "loss", *run_outputs.SUMMARY_KEYS])
    for key in run_outputs.SUMMARY_KEYS:
        assert len(summary[key]) == DEPTH and all(value > 0 for value in summary[key]), key


def assert_close(measured: dict, recorded: dict, rel: float = 2e-3) -> None:
    """Two summaries equal to the row's rounding (4 significant digits)."""
    assert sorted(measured) == sorted(recorded)
    for key, value in measured.items():
        assert value == pytest.approx(recorded[key], rel=rel), key


@pytest.mark.slow
@needs_mnist
def test_diagnostics_measure_the_initial_and_the_final_weights(tiny_runs):
    """The row's summaries are flaxdepth.diagnose's measurement of the seed's initial weights and of
    the saved final weights on the first 64 test images."""
    path, row = the_row(tiny_runs, "jax")
    recorded = row["diagnostics"]
    assert recorded["probe"] == f"the first {PROBE} test images" and recorded["wall_s"] > 0
    check_summary(recorded["init"], True)
    check_summary(recorded["end"], True)
    assert recorded["init"]["running_mean_distance"] == [1.0] * DEPTH  # running mean 0: ||0 - m|| / ||m||
    assert recorded["end"]["running_mean_distance"] != recorded["init"]["running_mean_distance"]
    images, labels = tiny_test_set()
    probe = train.normalize(images[:PROBE]), labels[:PROBE].astype(np.int32)
    options = EngineOptions(**row["config"]["engine"])
    final, _ = run_outputs.load_weights(path, row)
    initial = interop.from_torch(VARIANT, DEPTH, torch_runner.initial_state_dict(VARIANT, DEPTH, 0))
    for moment, variables in (("init", initial), ("end", final)):
        measured = measure.layer_diagnostics(VARIANT, DEPTH, variables, *probe, True, None, options,
                                                 fast_compile=True)  # the sweep's program, compiled
        assert_close(run_outputs.summary(measured, True), recorded[moment])


@pytest.mark.slow
@needs_mnist
def test_torch_diagnostics_agree_with_jax_at_initialization(tiny_runs):
    """--framework torch measures with torch_ref.diagnose: the same initial weights and probe give
    the same summary as flaxdepth.diagnose, to float32 and the row's rounding."""
    _, jax_row = the_row(tiny_runs, "jax")
    _, torch_row = the_row(tiny_runs, "torch")
    check_summary(torch_row["diagnostics"]["init"], True)
    check_summary(torch_row["diagnostics"]["end"], True)
    assert_close(torch_row["diagnostics"]["init"], jax_row["diagnostics"]["init"])


# ------------------------------------------------------------------------------ the command line


def test_rows_and_help_carry_the_flags(monkeypatch):
    monkeypatch.delenv("FLAXDEPTH_CPU_KERNELS", raising=False)
    args = sweep.parse_args(["--variant", "tanh", "--save-weights", "--diagnostics", "--probe-size", "16"])
    [config] = sweep.configs(args)
    assert (config.save_weights, config.diagnostics, config.probe_size) == (True, True, 16)
    assert {"save_weights": True, "diagnostics": True, "probe_size": 16}.items() <= config.as_row().items()
    [plain] = sweep.configs(sweep.parse_args(["--variant", "tanh"]))
    assert (plain.save_weights, plain.diagnostics, plain.probe_size) == (False, False, 64)
    assert plain.results_path() == config.results_path()  # outputs, not what is trained: one file


@pytest.mark.parametrize("argv, message", [
    (["--diagnostics", "--probe-size", "0"], "--probe-size must be at least 1, got 0"),
    (["--diagnostics", "--probe-size", "300", "--limit-test", "256"],
     "--probe-size 300 is more than the 256 test images; lower --probe-size or raise --limit-test"),
])
@needs_mnist
def test_a_bad_probe_size_exits_2_with_one_line_before_training(argv, message, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(search, "run_sweep", forbidden)
    out = tmp_path / "out"
    assert sweep.main(["--variant", "tanh", "--data-dir", str(SHARED_MNIST), *argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"{PROG_ERROR}{message}\n"
    assert not out.exists()


@needs_mnist
def test_diagnostics_that_would_not_fit_in_memory_stop_the_sweep_before_training(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "available_memory", lambda device: 2**20)
    monkeypatch.setattr(train, "train_replicas", forbidden)
    out = tmp_path / "out"
    assert sweep.main(["--variant", "tanh", "--depths", "3", "--seeds", "1", "--limit-train", "256", "--limit-test",
                       "64", "--data-dir", str(SHARED_MNIST), "--skip-parity", "--quiet", "--diagnostics",
                       "--out", str(out)]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith(PROG_ERROR)]
    assert re.fullmatch(f"{re.escape(PROG_ERROR)}--probe-size 64: the per-layer diagnostics of tanh k=3 on 64 images "
                        r"need [\d.]+ MiB, 1\.0 MiB of memory is available; use --probe-size \d+ or fewer", line)
    assert not any(path.read_text() for path in out.glob("*.jsonl"))  # no row


def test_reused_runs_keep_what_they_were_trained_with(tmp_path, monkeypatch):
    """A rerun with --save-weights --diagnostics reuses runs trained without them, and says so."""
    monkeypatch.setattr(search, "save_plot", lambda report: None)
    monkeypatch.setattr(search.Sweep, "_train", lambda self, depth, runs: [
        RunResult(seed, lr, [0.05], [0.05], True) for seed, lr in runs])
    config = SweepConfig(variant="tanh", depths=(3,), seeds=2, epochs=1, out=str(tmp_path), skip_parity=True)
    dataset = Dataset("mnist", *[np.zeros((n, 28, 28), np.uint8) if images else np.zeros(n, np.uint8)
                                 for n, images in ((8, True), (8, False), (64, True), (64, False))])
    run_sweep(config, dataset, log=lambda line: None)
    logged = []
    run_sweep(dataclasses.replace(config, save_weights=True, diagnostics=True), dataset, log=logged.append)
    assert [line for line in logged if "reused runs" in line] == [
        f"  k=3: 2 reused runs in {config.results_path()} were trained without {flag} and have no {key}; "
        f"a new --out trains them again" for flag, key in (("--save-weights", "weights"), ("--diagnostics",
                                                                                         "diagnostics"))]
