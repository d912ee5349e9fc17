"""Scale-out: the replica axis split over several devices (jax.sharding) and several processes
(jax.distributed with gloo CPU collectives) gives the same results file as one device.

Each configuration runs the real CLI in its own process, since the device count is fixed when JAX
starts: 4 CPU devices come from XLA_FLAGS=--xla_force_host_platform_device_count=4, two processes
join through a coordinator on localhost. 3 seeds on 4 devices (or 2 processes x 1 device) also
checks the padding of replica counts that do not divide the device count.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from flaxdepth import run_outputs, train

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
TIMEOUT_S = 900  # per command; each run is ~1 min on 2 idle cores, mostly XLA compilation
SWEEP = ["--variant", "elu_bn", "--depths", "3", "--seeds", "3", "--epochs", "2", "--limit-train", "600",
         "--limit-test", "300", "--data-dir", str(SHARED_MNIST), "--skip-parity", "--quiet",
         "--save-weights", "--diagnostics"]  # process 0 alone measures and writes, from all-gathered replicas
RESULTS_NAME = "elu_bn_jax_corrected_e2_b256_mnist_train600_test300.jsonl"
# What must agree between runs; the rest (wall time, device count, host, time stamp) may not.
SAME = ("variant", "depth", "lr", "seed", "train_errors", "test_errors", "finite", "trainable",
        "replicas_trained_together", "config", "diagnostics", "weights")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                       reason=f"the project's MNIST copy is absent ({SHARED_MNIST})"),
]


def env(devices: int = 1) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("JAX_COORDINATOR_ADDRESS", None)
    environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return environment


def sweep_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flaxdepth.sweep", *SWEEP, "--out", str(out), *extra]


def comparable(out: Path) -> list[dict]:
    """The rows' SAME fields, and in place of the weight files' names the weights they hold."""
    rows = [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines()]
    for row in rows:
        row["config"].pop("out")
        row["diagnostics"].pop("wall_s")
        variables, state_dict = run_outputs.load_weights(out / RESULTS_NAME, row)
        row["weights"] = (jax.tree.map(lambda a: a.tobytes(), variables),
                          {key: tensor.numpy().tobytes() for key, tensor in state_dict.items()})
    return [{key: row[key] for key in SAME} for row in sorted(rows, key=lambda r: r["seed"])]


def device_counts(out: Path) -> set[int]:
    return {json.loads(line)["device_count"] for line in (out / RESULTS_NAME).read_text().splitlines()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(out: Path | list[Path], processes: int) -> list[subprocess.CompletedProcess]:
    """The same sweep command in `processes` processes joined by jax.distributed on localhost
    (`out` may give each process its own --out)."""
    address = f"localhost:{free_port()}"
    outs = out if isinstance(out, list) else [out] * processes
    procs = [subprocess.Popen(sweep_command(outs[i], "--distributed", "--coordinator-address", address,
                                            "--num-processes", str(processes), "--process-id", str(i)),
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    try:
        finished = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            finished.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        return finished
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_device")
    proc = subprocess.run(sweep_command(out), cwd=REPO, env=env(1), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert device_counts(out) == {1}
    return out


def test_padded_runs_fill_every_device_and_keep_every_run():
    runs = [(0, 0.05), (1, 0.05), (2, 0.05)]
    assert train.padded_runs(runs, 1) == runs
    assert train.padded_runs(runs, 3) == runs
    assert train.padded_runs(runs, 4) == runs + [(2, 0.05)]
    assert train.padded_runs(runs, 8) == runs + [(2, 0.05)] * 5


def test_four_devices_give_the_one_device_results(one_device, tmp_path):
    out = tmp_path / "four_devices"
    proc = subprocess.run(sweep_command(out), cwd=REPO, env=env(4), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert device_counts(out) == {4}
    # Each device trains one replica here and three replicas share one device there: on the CPU
    # the per-replica arithmetic is the same, so the errors are equal, not merely close.
    assert comparable(out) == comparable(one_device)


def test_two_processes_write_one_results_file_equal_to_one_process(one_device, tmp_path):
    out = tmp_path / "two_processes"
    first = run_processes(out, 2)
    for proc in first:
        assert proc.returncode == 0, proc.stderr
    assert device_counts(out) == {2}
    assert comparable(out) == comparable(one_device)
    # Process 0 alone speaks and writes: only it prints the table (gloo's own connection line
    # appears on every process's stdout).
    assert "elu_bn (corrected, jax, lr 0.05)" in first[0].stdout and "elu_bn" not in first[1].stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        RESULTS_NAME.replace(".jsonl", ".fit.json"), RESULTS_NAME, RESULTS_NAME.replace(".jsonl", ".png"),
        RESULTS_NAME.replace(".jsonl", ".weights")]  # (the hidden files are filelock's)
    assert len(list((out / RESULTS_NAME.replace(".jsonl", ".weights")).iterdir())) == 2 * 3  # written once

    # Resume works as in one process: every run is reused, the file is left as it was.
    before = (out / RESULTS_NAME).read_bytes()
    again = run_processes(out, 2)
    for proc in again:
        assert proc.returncode == 0, proc.stderr
    assert (out / RESULTS_NAME).read_bytes() == before


def test_distributed_without_a_coordinator_is_one_clear_line(tmp_path):
    proc = subprocess.run(sweep_command(tmp_path / "out", "--distributed"), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()  # JAX's own reason sits in the parentheses; its words vary by version
    assert line.startswith("python -m flaxdepth.sweep: error: could not join the other processes (")
    assert line.endswith("); outside SLURM/Open MPI give --coordinator-address, --num-processes and --process-id")
    assert not (tmp_path / "out").exists()


def test_processes_that_see_different_results_files_stop_before_training(one_device, tmp_path):
    """--out on a folder that is not shared: process 1 finds finished runs that process 0 does
    not. Both stop with one line naming the file, before training anything."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    private.mkdir()
    (private / RESULTS_NAME).write_bytes((one_device / RESULTS_NAME).read_bytes())
    finished = run_processes([shared, private], 2)
    for proc in finished:
        assert proc.returncode == 2, proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("python -m flaxdepth.sweep: error: ")]
        assert "the processes read different contents of " in line
        assert line.endswith("--out must be a folder that every process shares") and "Traceback" not in proc.stderr
    assert not (shared / RESULTS_NAME).exists()
