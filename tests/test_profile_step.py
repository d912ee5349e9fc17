"""benchmarks/profile_step.py: the trace summary of a real (tiny) step, and its name rules."""

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
    ("flaxdepth_conv3x3_kernel_grad", "flaxdepth_conv3x3_kernel_grad", "convolution"),
    ("flaxdepth_batch_norm_activation_grad", "flaxdepth_batch_norm_activation_grad", "batchnorm"),
    ("ffi_call.7", "ffi_call", "other ffi call"),  # a call whose target was not found
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


def test_ffi_calls_are_named_by_their_target(profile_step):
    program = ('  %ffi_call.12 = f32[8,5,5,4]{3,2,1,0} custom-call(%a, %b), custom_call_target="flaxdepth_conv3x3", '
               'api_version=API_VERSION_TYPED_FFI\n  ffi_call = (f32[8,5,5,4], f32[4], f32[4]) custom-call(%c, %d, %e), '
               'custom_call_target="flaxdepth_batch_norm_activation"\n  %copy.1 = f32[4] copy(%f)\n')
    targets = profile_step.ffi_targets(program)
    assert targets == {"ffi_call.12": "flaxdepth_conv3x3", "ffi_call": "flaxdepth_batch_norm_activation"}
    summary = profile_step.summarize(iter([("t", "ffi_call.12", 2e6), ("t", "ffi_call", 1e6), ("t", "copy.1", 1e6)]),
                                     top=3, targets=targets)
    assert summary["classes"]["convolution"]["ms"] == 2.0 and summary["classes"]["batchnorm"]["ms"] == 1.0


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
