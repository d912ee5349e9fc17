"""experiments/profile_step.py: the trace summary of a real (tiny) step, and its name rules."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profile_step(load_experiment):
    return load_experiment("profile_step")


@pytest.mark.parametrize("name, kind, label", [
    ("conv_general_dilated.81", "conv_general_dilated", "convolution"),
    ("cudnn-conv-bw-filter.3.1", "cudnn-conv-bw-filter", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_tf32f32", "sm90_xmma_fprop_implicit_gemm_tf32f32", "convolution"),
    ("transpose_fusion.2", "transpose_fusion", "layout"),
    ("copy.17", "copy", "layout"),
    ("input_reduce_fusion_4", "input_reduce_fusion", "reduction"),
    ("select_exponential-minus-one_fusion", "select_exponential-minus-one_fusion", "other fusion"),
    # not copies or convolutions, though their names contain "bitcast" or "conv"
    ("bitcast_dynamic-update-slice_fusion.3", "bitcast_dynamic-update-slice_fusion", "other fusion"),
    ("convert_multiply_fusion.1", "convert_multiply_fusion", "other fusion"),
    ("wrapped_broadcast.2", "wrapped_broadcast", "other"),
])
def test_operation_names_are_grouped_and_classified(profile_step, name, kind, label):
    assert profile_step.kind_of(name) == kind
    assert profile_step.classify(kind) == label
    assert profile_step.is_operation(name)


@pytest.mark.parametrize("name", ["while.3", "ThunkExecutor::Execute", "SlinkyThreadPool::Await", "end: copy.1",
                                  "call.2"])
def test_containers_and_runtime_events_are_not_operations(profile_step, name):
    assert not profile_step.is_operation(name)


def test_summary_shares_add_up(profile_step):
    events = [("XLA Ops", "conv.1", 3e6), ("XLA Ops", "conv.2", 1e6), ("XLA Ops", "loop_fusion.1", 4e6),
              ("Stream #1", "copy.1", 2e6)]
    summary = profile_step.summarize(iter(events), top=2)
    assert summary["device_ms"] == 10.0
    assert summary["trace_lines"] == ["Stream #1", "XLA Ops"]
    assert summary["classes"]["layout"] == {"ms": 2.0, "share": 0.2}
    assert [k["kind"] for k in summary["kinds"]] == ["conv", "loop_fusion"]  # top 2 kinds
    assert summary["kinds"][0] == {"kind": "conv", "ms": 4.0, "count": 2, "share": 0.4}
    assert sum(c["share"] for c in summary["classes"].values()) == pytest.approx(1.0)


def test_a_real_step_is_mostly_convolution_and_fusions(profile_step, capsys):
    """elu_bn k=3, two replicas, one traced step on this machine's device."""
    import json
    assert profile_step.main(["--depth", "3", "--replicas", "2", "--steps", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device_ms_per_step"] > 0 and summary["wall_ms_per_step"] > 0
    assert summary["classes"]["convolution"]["share"] > 0.05  # 3 convs a layer, forward and backward
    assert all(profile_step.is_operation(o["name"]) for o in summary["operations"])
    # the step's operations, counted once each: their time fits in the step's wall time on 2 cores
    assert summary["device_ms_per_step"] < 2 * summary["wall_ms_per_step"]


def test_bad_input_is_one_line(profile_step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--replicas", "0"])
    assert exit_info.value.code == 2
    assert "--replicas must be at least 1, got 0" in capsys.readouterr().err
