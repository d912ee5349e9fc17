"""experiments/run.py: bad input, and a small real run of two sweeps in two worker processes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
RUN = [sys.executable, "experiments/run.py"]


ENTRIES = tomllib.loads((REPO / "experiments" / "sweeps.toml").read_text())["sweep"]


@pytest.fixture(scope="module")
def run_module(load_experiment):
    return load_experiment("run")


def test_plan_runs_entries_in_file_order_and_variants_in_the_order_given(run_module, tmp_path):
    sweeps = run_module.plan(ENTRIES, ["search-faithful", "pairs-faithful"], ["resnet", "tanh"], tmp_path, None)
    assert [(name, c.variant) for name, c in sweeps] == [
        ("pairs-faithful", "resnet"), ("pairs-faithful", "tanh"),
        ("search-faithful", "resnet"), ("search-faithful", "tanh")]
    assert [c.depths for _, c in sweeps] == [(102, 105), (6, 9), None, None]


def test_plan_without_filters_is_every_entry_in_registry_order(run_module, tmp_path):
    from flaxdepth import registry
    sweeps = run_module.plan(ENTRIES, None, None, tmp_path, None)
    expected = [(e["name"], v) for e in ENTRIES
                for v in (registry.VARIANT_NAMES if e["variants"] == "all" else
                          [n for n in registry.variant_names() if n in e["variants"]])
                for _ in (e["depths"] if "lr_at_depth" in e else [None])]  # lr_at_depth: a sweep per depth
    assert [(name, c.variant) for name, c in sweeps] == expected


def test_declared_variants_sweep_on_their_entrys_subset(run_module, tmp_path):
    """experiments/variants.toml's variants are registered by run.py itself (and so in its
    workers), and an entry's limit_train / limit_test win over the command line's."""
    sweeps = run_module.plan(ENTRIES, ["declared-cpu"], None, tmp_path, None, limit_train=512)
    declared_cpu = next(e for e in ENTRIES if e["name"] == "declared-cpu")["variants"]
    assert [c.variant for _, c in sweeps] == [n for n in run_module.DECLARED if n in declared_cpu]
    assert set(declared_cpu) <= set(run_module.DECLARED)
    assert {(c.limit_train, c.limit_test, c.depths) for _, c in sweeps} == {(6000, 2000, (6, 24, 96))}


def test_lr_at_depth_makes_one_sweep_per_depth_at_its_lr(run_module, tmp_path):
    entry = {"name": "e", "variants": ["tanh", "tanh_newinit"], "depths": [30, 300], "seeds": 1,
             "lr_at_depth": {"30": 0.05, "300": 0.005}, "batch_size": 64}
    sweeps = run_module.plan([entry], None, ["tanh_newinit", "tanh"], tmp_path, None)
    assert [(c.variant, c.depths, c.lrs, c.batch_size) for _, c in sweeps] == [
        ("tanh_newinit", (30,), (0.05,), 64), ("tanh_newinit", (300,), (0.005,), 64),
        ("tanh", (30,), (0.05,), 64), ("tanh", (300,), (0.005,), 64)]


def test_startable_never_runs_two_sweeps_of_one_results_file_at_once(run_module, tmp_path):
    """pairs-faithful and search-faithful of a variant share a results file; torch-agreement has
    its own."""
    sweeps = run_module.plan(ENTRIES, ["pairs-faithful", "torch-agreement", "search-faithful"],
                             ["tanh", "elu"], tmp_path, None)
    names = lambda chosen: [(name, c.variant) for name, c in chosen]  # noqa: E731
    for slots in (3, 5):  # with 5 slots the searches still wait for the pairs chosen before them
        assert names(run_module.startable(sweeps, set(), slots)) == [
            ("pairs-faithful", "tanh"), ("pairs-faithful", "elu"), ("torch-agreement", "tanh")]
    busy = {c.results_path() for _, c in sweeps[:2]}  # both pairs sweeps still running
    assert names(run_module.startable(sweeps[2:], busy, 5)) == [("torch-agreement", "tanh")]
    busy = {sweeps[0][1].results_path()}  # tanh's pairs still running, elu's done
    assert names(run_module.startable(sweeps[2:], busy, 5)) == [
        ("torch-agreement", "tanh"), ("search-faithful", "elu")]
    assert run_module.startable(sweeps, set(), 0) == []


def test_workers_run_everything_once_one_sweep_per_file_and_survive_a_failure(run_module, tmp_path, capsys):
    """run_in_workers on a thread pool with a fake sweep: every sweep runs once, never two of one
    results file at once, and elu's failing pairs sweep is reported while the rest go on."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    sweeps = run_module.plan(ENTRIES, ["pairs-faithful", "torch-agreement", "search-faithful"], ["tanh", "elu"],
                             tmp_path, None)
    lock, active, ran, overlaps = threading.Lock(), set(), [], []

    def fake_run(name, config, deadline):
        with lock:
            overlaps.append(config.results_path() in active)
            active.add(config.results_path())
            ran.append((name, config.variant))
        time.sleep(0.05)
        with lock:
            active.discard(config.results_path())
        if (name, config.variant) == ("pairs-faithful", "elu"):
            raise RuntimeError("out of memory")
        return f"[{name}] {config.variant}: done"

    with ThreadPoolExecutor(3) as pool:
        ok = run_module.run_in_workers(sweeps, pool, 3, None, run=fake_run)
    assert ok is False
    assert sorted(ran) == sorted((name, c.variant) for name, c in sweeps) and not any(overlaps)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(sweeps)
    assert "[pairs-faithful] elu: failed (RuntimeError: out of memory); its finished runs are kept, rerun to " \
           "retry" in lines
    assert "[search-faithful] elu: done" in lines  # the same file's next sweep still ran


@pytest.mark.parametrize("entry, message", [
    ('name = "e"\nvariants = ["tanh"]\ndepths = [3]\nseed = 2\n', "sweep 'e': unknown key 'seed'; the keys are name,"),
    ('name = "e"\nvariants = ["tanh"]\n', "sweep 'e' has no 'depths'"),
])
def test_sweeps_toml_is_read_strictly(run_module, tmp_path, entry, message):
    """A mistyped key is an error naming the file, the entry and the key, not a silent default."""
    path = tmp_path / "sweeps.toml"
    path.write_text("[[sweep]]\n" + entry)
    with pytest.raises(run_module.ConfigError, match=f"^{re.escape(f'{path}: {message}')}"):
        run_module.read_entries(path)
    assert run_module.read_entries(run_module.CONFIG) == ENTRIES  # the committed file reads as it is


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


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_asks_for_its_share_of_the_cpu_devices_before_jax_starts(jobs, env_without_device_count, run_module,
                                                                     tmp_path):
    """The main process (and, alike, each worker) splits its share of the cores, cores // jobs, into
    devices for the plan's largest batch (the adaptive entries' 32 seeds); checked where the parity
    check would start JAX (stopped there)."""
    from flaxdepth import train

    largest = max(config.runs_per_depth for _, config in run_module.plan(ENTRIES, None, None, tmp_path, None))
    assert largest == 32

    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the project's MNIST copy is absent ({SHARED_MNIST})")
    code = (
        "import sys, jax\n"
        "sys.path.insert(0, 'experiments')\n"
        "import run\n"
        "from flaxdepth import parity_check\n"
        "def stop(*args):\n"
        "    print(jax.device_count())\n"
        "    raise SystemExit(0)\n"
        "parity_check.quick_parity = stop\n"
        f"run.main(['--data-dir', {str(SHARED_MNIST)!r}, '--jobs', '{jobs}'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_without_device_count,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == train.cpu_device_count(largest, max(1, train.usable_cores() // jobs))


@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST copy")
def test_gpu_step_variants_script_applies_each_setting(tmp_path, env_without_device_count):
    """benchmarks/gpu_step_variants.sh's plumbing, on a CPU and tiny: a setting's engine options
    reach the bench (the JSON records the block size it set), a failing setting (an XLA flag the
    jaxlib lacks) loses only its row, and the whole-run stage runs the baseline and the fastest
    with their own bench arguments."""
    settings = ("b3||--replicas 2 --cpu-devices 1 --batch-size 32 --steps 1 --rounds 1 --replicas-per-block 3\n"
                "bad|--xla_no_such_flag=1|--replicas 2\n"
                "b1||--replicas 2 --cpu-devices 1 --batch-size 32 --steps 1 --rounds 1 --replicas-per-block 1")
    env = dict(env_without_device_count, OUT=str(tmp_path), SKIP_PROFILE="1", SETTINGS=settings,
               DATA_DIR=str(SHARED_MNIST), FULL_ARGS="--limit-train 64 --limit-test 32")
    proc = subprocess.run(["bash", "benchmarks/gpu_step_variants.sh", "tanh", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "step_variants.jsonl").read_text().splitlines()]
    assert [(d["setting"], d["engine"]["replicas_per_block"], d["replicas"]) for d in steps] == [("b3", 3, 2),
                                                                                                  ("b1", 1, 2)]
    assert "bad: failed" in proc.stdout
    fastest = min(steps, key=lambda d: d["jax_ms_per_model_step_replicas"])["setting"]
    runs = [json.loads(line) for line in (tmp_path / "full_run.jsonl").read_text().splitlines()]
    assert [d["setting"] for d in runs] == (["b3"] if fastest == "b3" else ["b3", "b1"])
    assert all(d["train_images"] == 64 and d["epochs"] == 3 and math.isfinite(d["speedup_per_model"]) for d in runs)
    assert all(d["jax_devices"] == 1 for d in runs)  # the setting's --cpu-devices 1, replayed
    assert "whole run b3" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST copy")
def test_gpu_frontier_script_on_a_cpu_then_resumed(tmp_path, env_without_device_count):
    """experiments/gpu_frontier.sh's CPU path, tiny: a critical variant and a control, at the lrs
    c / k for each c of LR_TIMES_DEPTH, engine options passed through to every row, the results
    files copied to $OUT/gpu_frontier/; a second call trains nothing (the sweeps reuse the finished
    runs)."""
    env = dict(env_without_device_count, OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "results"),
               DEPTHS="3", VARIANTS="tanh_critical_delta", CONTROLS="tanh", CONTROL_DEPTHS="3", SEEDS="1",
               EPOCHS="1", BATCH_SIZE="32", LIMIT_TRAIN="64", LIMIT_TEST="32", SKIP_PARITY="1", LR_TIMES_DEPTH="0.03 0.06")
    argv = ["bash", "experiments/gpu_frontier.sh", str(SHARED_MNIST), "--rematerialize", "nested"]
    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    back = tmp_path / "out" / "gpu_frontier"
    files = sorted(path.name for path in back.glob("*.jsonl"))
    assert files == ["tanh_critical_delta_jax_corrected_e1_b32_mnist_train64_test32.jsonl",
                     "tanh_jax_corrected_e1_b32_mnist_train64_test32.jsonl"]
    rows = {name: [json.loads(line) for line in (back / name).read_text().splitlines()] for name in files}
    assert [sorted((r["depth"], r["lr"]) for r in rows[name]) for name in files] == [[(3, 0.01), (3, 0.02)]] * 2
    assert {r["config"]["engine"]["rematerialize"] for rs in rows.values() for r in rs} == {"nested"}
    assert "== " in first.stdout and "Epoch 000/001" in first.stdout  # timestamped progress lines
    before = [(back / name).read_bytes() for name in files]
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [(back / name).read_bytes() for name in files] == before
    assert "Epoch" not in again.stdout  # nothing trained
