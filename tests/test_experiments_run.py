"""experiments/run.py: bad input, and a small real run of two sweeps in two worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
RUN = [sys.executable, "experiments/run.py"]


@pytest.mark.parametrize("argv, message", [
    (["--only", "no-such-sweep"], "no sweep named no-such-sweep"),
    (["--variants", "nope"], "unknown variant nope"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    proc = subprocess.run(RUN + argv + ["--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("experiments/run.py: error: ") and message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST copy")
def test_two_sweeps_in_two_workers_then_nothing_left_to_do(tmp_path):
    """tanh's notebook pair (k=6, 9) with jax and with torch_ref: two results files, so two
    groups, one per worker; a rerun trains nothing and leaves both files as they were."""
    out = tmp_path / "out"
    argv = RUN + ["--data-dir", str(SHARED_MNIST), "--limit-train", "512", "--limit-test", "256", "--only",
                  "pairs-faithful", "torch-agreement", "--variants", "tanh", "--jobs", "2", "--out", str(out)]
    first = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    names = ["tanh_jax_faithful_e3_b256_mnist_train512_test256.jsonl",
             "tanh_torch_faithful_e3_b256_mnist_train512_test256.jsonl"]
    for name in names:
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert sorted((r["depth"], r["seed"]) for r in rows) == [(d, s) for d in (6, 9) for s in range(3)]
    assert {line.split("]")[0] for line in first.stdout.splitlines() if line.startswith("[")} == {
        "[pairs-faithful", "[torch-agreement"}
    before = [(out / name).read_bytes() for name in names]
    again = subprocess.run(argv[:-4] + ["--jobs", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr
    assert [(out / name).read_bytes() for name in names] == before
