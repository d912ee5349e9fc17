"""python -m flaxdepth.diagnose: its step list, a tiny real run in each framework (the JSON's
structure, the figures, the frameworks' agreement), and bad input (one line, exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flaxdepth import diagnose, measure, registry
from flaxdepth.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
PROG_ERROR = "python -m flaxdepth.diagnose: error: "
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_mnist = pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"the project's MNIST copy is absent ({SHARED_MNIST})")

#: 512 training images in batches of 256: 2 steps per epoch, no partial batch; tanh (saturation
#: recorded, one BatchNorm mode) at k = 6 (first and scanned layers).
TINY_RUN = ["--variant", "tanh", "--depth", "6", "--steps", "0,1,epoch", "--epochs", "2", "--limit-train", "512",
            "--limit-test", "64", "--probe-size", "16", "--data-dir", str(SHARED_MNIST)]


@pytest.mark.parametrize("tokens, expected", [
    (("0", "10", "epoch"), [0, 5, 10, 15]),  # 10 is also the end of epoch 2
    (("epoch2",), [0, 10]),
    (("3", "1"), [0, 1, 3]),
    (("epoch", "epoch3", "15"), [0, 5, 10, 15]),
])
def test_steps_name_sgd_steps_with_initialization_always_among_them(tokens, expected):
    assert diagnose.resolve_steps(tokens, epochs=3, steps_per_epoch=5) == expected


def test_a_step_past_the_run_is_refused():
    with pytest.raises(ConfigError, match="step 16 is past the run's end"):
        diagnose.resolve_steps(("16",), epochs=3, steps_per_epoch=5)


def test_a_probe_batch_that_does_not_fit_in_memory_is_refused_with_a_size_that_fits():
    """XLA's accounting of the compiled program against the memory available; the suggestion is
    the batch scaled to the budget (the sown intermediates grow in proportion to it)."""
    import numpy as np

    spec = registry.get_variant("tanh")
    images, labels = np.zeros((16, 28, 28, 1), np.float32), np.zeros(16, np.int32)
    need = measure.diagnostics_memory_bytes(spec, 6, images, labels)
    assert need > 16 * 6 * 28 * 28 * 4  # at least one activation-sized array a layer
    measure.check_probe_fits(spec, 6, images, labels, 2 * need)  # fits: no error
    measure.check_probe_fits(spec, 6, images, labels, None)  # unknown memory: no check
    with pytest.raises(ConfigError) as error:
        measure.check_probe_fits(spec, 6, images, labels, need)
    assert str(error.value).startswith("--probe-size 16: the per-layer diagnostics of tanh k=6 on 16 images need ")
    assert str(error.value).endswith(f"available; use --probe-size {int(16 * measure.PROBE_MEMORY_FRACTION)} or fewer")
    with pytest.raises(ConfigError, match="not even one image fits; measure a smaller depth"):
        measure.check_probe_fits(spec, 6, images, labels, need // 100)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, one_torch_thread):
    """The tiny run in both frameworks: {framework: (exit status, output folder)}."""
    runs = {}
    for framework in ("jax", "torch"):
        out = tmp_path_factory.mktemp(framework)
        runs[framework] = diagnose.main([*TINY_RUN, "--framework", framework, "--out", str(out)]), out
    return runs


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_run_writes_its_diagnostics_and_figures(framework, tiny_runs):
    status, out = tiny_runs[framework]
    assert status == 0
    result = json.loads((out / "diagnostics.json").read_text())
    assert result["config"]["variant"] == "tanh" and result["config"]["depth"] == 6
    assert result["config"]["framework"] == framework and result["config"]["engine"]["precision"] == "default"
    # jax records the rematerialization it trained with ("auto" resolved: a 6-layer net fits whole)
    assert result["config"]["engine"]["rematerialize"] == {"jax": "none", "torch": "auto"}[framework]
    assert result["spec"]["activation"] == "tanh" and result["protocol"] == "corrected"
    assert result["probe"] == "the first 16 test images" and result["steps_per_epoch"] == 2
    assert [epoch["epoch"] for epoch in result["epochs"]] == [1, 2]
    assert [record["step"] for record in result["steps"]] == [0, 1, 2, 4]
    for record in result["steps"]:
        assert record["bn_train"] is True
        assert [(layer["stage"], layer["layer"]) for layer in record["layers"]] == \
            [(stage, layer) for stage in range(3) for layer in range(2)]
        for layer in record["layers"]:
            assert layer["activation_variance"] > 0 and layer["output_grad_norm"] > 0
            assert 0 <= layer["saturated_fraction"] <= 1
            assert "residual_variance" not in layer and "running_mean_shift" not in layer  # no skip, no BatchNorm
            assert list(layer["param_grad_norms"]) == ["conv_weight", "conv_bias"]
    for figure in ("heatmaps.png", "signal_propagation.png"):
        assert (out / figure).read_bytes().startswith(PNG_MAGIC)
    from matplotlib.figure import Figure  # the same drawings for a notebook

    assert len(diagnose.heatmaps_figure(result).axes) == 4  # two heatmaps and their colour bars
    assert isinstance(diagnose.signal_propagation_figure(result), Figure)


@pytest.mark.slow
@needs_mnist
def test_both_frameworks_record_the_same_run(tiny_runs):
    """The same initial weights, batches and steps: float32 rounding apart, the same numbers."""
    jax_result, torch_result = (json.loads((tiny_runs[f][1] / "diagnostics.json").read_text())
                                for f in ("jax", "torch"))
    # Per-epoch errors are counts of misclassified images over the same images: float32 rounding
    # moves logits by ~1e-6 relative, which flips no prediction of this run, so they are equal.
    assert jax_result["epochs"] == torch_result["epochs"]
    for mine, theirs in zip(jax_result["steps"], torch_result["steps"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        for layer, expected in zip(mine["layers"], theirs["layers"], strict=True):
            where = f"step {mine['step']}, stage {layer['stage']} layer {layer['layer']}"
            grads, expected_grads = layer.pop("param_grad_norms"), expected.pop("param_grad_norms")
            assert layer == pytest.approx(expected, rel=1e-3, abs=1e-7), where
            assert grads == pytest.approx(expected_grads, rel=1e-3, abs=1e-7), where


BAD_INPUT = {
    "unknown variant": (["--variant", "nope", "--depth", "6"], "unknown variant 'nope'"),
    "depth too small": (["--variant", "tanh", "--depth", "2"], "--depth must be an integer of at least 3"),
    "depth not a number": (["--variant", "tanh", "--depth", "six"], "argument --depth: invalid int value"),
    "no depth": (["--variant", "tanh"], "the following arguments are required: --depth"),
    "steps not numbers": (["--variant", "tanh", "--depth", "6", "--steps", "0,ten"], "'ten' is not a step"),
    "steps negative": (["--variant", "tanh", "--depth", "6", "--steps=-1"], "'-1' is not a step"),
    "epoch past the run": (["--variant", "tanh", "--depth", "6", "--steps", "epoch4"], "epochs are 1 to 3"),
    "step past the run": (["--variant", "tanh", "--depth", "6", "--steps", "0,10", "--limit-train", "512",
                           "--data-dir", str(SHARED_MNIST)], "step 10 is past the run's end"),
    "empty step": (["--variant", "tanh", "--depth", "6", "--steps", "0,,5"], "--steps takes"),
    "probe of no images": (["--variant", "tanh", "--depth", "6", "--probe-size", "0"], "--probe-size must be"),
    "bad framework": (["--variant", "tanh", "--depth", "6", "--framework", "mxnet"], "argument --framework"),
    "negative lr": (["--variant", "tanh", "--depth", "6", "--lr=-1"], "learning rates must be positive"),
    "missing variants file": (["--variants-file", str(REPO / "no-such-variants.toml"), "--variant", "tanh",
                               "--depth", "6"], "no-such-variants.toml: no such file"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_before_training(case, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(diagnose, "train_jax", forbidden)
    monkeypatch.setattr(diagnose, "train_torch", forbidden)
    argv, message = BAD_INPUT[case]
    if "--data-dir" in argv and not SHARED_MNIST.is_dir():
        pytest.skip(f"the project's MNIST copy is absent ({SHARED_MNIST})")
    out = tmp_path / "out"
    assert diagnose.main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(PROG_ERROR) and message in lines[0], lines[0]
    assert not out.exists()
