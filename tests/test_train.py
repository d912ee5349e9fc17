"""Tests of the training engine (flaxdepth.train) and of flaxdepth.bench's entry point.

XLA's CPU compiles are the cost here (seconds per program), so every test that really trains
uses the same small problem: tanh, k=3, batch 64, 300 training and 100 test images (4 full
batches plus a partial one of 44; one full test batch plus 36), 2 epochs. compiled_functions is
cached per (variant, depth, batch size) and the jitted programs per replica count, so the whole
module compiles two epoch programs: one replica and two replicas.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdepth import data, registry, train
from flaxdepth.config import ConfigError, RunConfig
from flaxdepth.options import EngineOptions
from flaxdepth.train import RunResult
from registered_variants import REGISTERED_VARIANTS

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
VARIANT, DEPTH, BATCH, EPOCHS = "tanh", 3, 64, 2
N_TRAIN, N_TEST = 300, 100
LR = registry.get_variant(VARIANT).lr


@pytest.fixture(scope="module")
def small_data() -> train.DeviceData:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the project's MNIST copy is absent ({SHARED_MNIST})")
    dataset = data.subset(data.load_dataset("mnist", SHARED_MNIST), N_TRAIN, N_TEST)
    return train.DeviceData.put(dataset)


def run(small_data, runs, **kwargs) -> list[RunResult]:
    return train.train_replicas(RunConfig(VARIANT, epochs=EPOCHS, batch_size=BATCH), DEPTH, small_data, runs, **kwargs)


@pytest.fixture(scope="module")
def pair(small_data) -> list[RunResult]:
    """Seeds 0 and 1 at the notebook's lr, trained together (the two-replica program)."""
    return run(small_data, [(0, LR), (1, LR)])


@pytest.fixture(scope="module")
def alone(small_data) -> list[RunResult]:
    """Seed 0 trained by itself (the one-replica program)."""
    return run(small_data, [(0, LR)])


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_errors(small_data, pair):
    again = run(small_data, [(0, LR), (1, LR)])
    assert again == pair  # exact: same keys, same batch orders, same program


def test_different_seeds_differ(pair):
    assert (pair[0].train_errors, pair[0].test_errors) != (pair[1].train_errors, pair[1].test_errors)


def test_seed_keys_and_orders_are_per_seed_and_per_epoch():
    n = N_TRAIN  # two replicas, as in `pair`: the permutation program compiles per replica count
    same = np.asarray(train.epoch_orders([0, 0], 0, n))
    other = np.asarray(train.epoch_orders([0, 1], 0, n))
    assert np.array_equal(same[0], same[1]) and not np.array_equal(other[0], other[1])
    assert not np.array_equal(same[0], np.asarray(train.epoch_orders([0, 0], 1, n))[0])
    for order in (*same, *other):  # a permutation: every image exactly once per epoch
        assert np.array_equal(np.sort(order), np.arange(n))


def test_result_format(pair):
    for (seed, lr), result in zip([(0, LR), (1, LR)], pair):
        assert (result.seed, result.lr) == (seed, lr)
        assert len(result.train_errors) == len(result.test_errors) == EPOCHS
        assert all(isinstance(e, float) and 0 <= e <= 1 for e in result.train_errors + result.test_errors)
        assert result.finite is True


# ------------------------------------------------------------------------------ vmap consistency


def test_replica_trained_alone_equals_replica_trained_with_others(alone, pair):
    """On GPUs the replicas are vmapped (block-diagonal convolutions, flaxdepth/conv.py), and the
    one- and two-replica programs may round differently. The GPU figures below were measured with
    XLA's grouped convolution for the vmapped replicas. Measured, seed 0 alone against seed 0 beside
    seed 1 (errors are counts / n, so they differ by whole samples):
    - this project's CPU, jax 0.10.2: bit-identical here (and for 512 images, batch 256);
    - an H200, jax 0.11.2, default precision (TF32): identical for this small problem, but one
      epoch on all 60000 images differed by 1 train sample (tanh k=3) and by 27 train / 9 test
      samples (elu_bn k=6): the two programs round differently and training amplifies it;
    - the same H200 at jax_default_matmul_precision 'highest': bit-identical in all three.
    Reruns of the same program were bit-identical everywhere. So exact on the CPU; elsewhere this
    small problem may differ by one sample per epoch."""
    if jax.default_backend() == "cpu":
        assert alone[0] == pair[0]
    else:
        assert alone[0].finite == pair[0].finite
        np.testing.assert_allclose(alone[0].train_errors, pair[0].train_errors, atol=1.01 / N_TRAIN, rtol=0)
        np.testing.assert_allclose(alone[0].test_errors, pair[0].test_errors, atol=1.01 / N_TEST, rtol=0)


def test_accelerator_replica_path_gives_the_cpu_path_results(small_data):
    """The GPU engine's program (replicas vmapped under shard_map, convolutions through conv.py's
    block-diagonal batching rule, its custom VJP) run on this CPU trains like the CPU engine's
    (replicas one after the other, plain convolutions): elu_bn k=3 has BatchNorm and convs in
    every stage; the infinite lr makes one replica diverge, which must not reach the others through
    the shared block-diagonal conv. Float32 sums in another order may flip a prediction, so one
    sample of tolerance; measured here: identical."""
    runs = [(0, 0.05), (1, math.inf), (2, 0.01)]
    run_config = RunConfig("elu_bn", epochs=2, batch_size=BATCH)
    cpu_path = train.train_replicas(run_config, 3, small_data, runs)
    gpu_path = train.train_replicas(run_config, 3, small_data, runs,
                                    options=EngineOptions(vmap_replicas=True, replicas_per_block=2))
    assert [r.finite for r in cpu_path] == [r.finite for r in gpu_path] == [True, False, True]
    for a, b in zip(cpu_path, gpu_path):
        np.testing.assert_allclose(a.train_errors, b.train_errors, atol=1.01 / N_TRAIN, rtol=0)
        np.testing.assert_allclose(a.test_errors, b.test_errors, atol=1.01 / N_TEST, rtol=0)


# ------------------------------------------------------------------------------ partial last batch


@pytest.mark.parametrize("batch_size", [BATCH, 512])
def test_partial_last_batch_is_trained_and_counted(small_data, batch_size):
    """With lr 0 the weights never move, so an epoch's batch-by-batch train error must equal the
    initial model's error on all 300 images: 256 in full batches plus the 44 of the last one,
    over the denominator 300 (the notebook's DataLoader keeps the partial batch). With batches of
    512, larger than either set, each is one partial batch and nothing else."""
    assert N_TRAIN % batch_size and N_TEST % batch_size  # the point of the sizes
    results = train.train_replicas(RunConfig(VARIANT, epochs=EPOCHS, batch_size=batch_size), DEPTH, small_data,
                                   [(0, 0.0), (1, 0.0)])
    model, init, _, _ = train.compiled_functions(VARIANT, DEPTH, batch_size)
    state = init(jnp.asarray([0, 1], jnp.int32), jnp.zeros(2))
    apply = jax.jit(lambda params, images: model.apply({"params": params}, train.normalize(images)))
    for r, result in enumerate(results):
        params = jax.tree.map(lambda a: a[r], state.params)
        for split, errors, n in (("train", result.train_errors, N_TRAIN), ("test", result.test_errors, N_TEST)):
            images, labels = getattr(small_data, f"{split}_images"), getattr(small_data, f"{split}_labels")
            correct = int((jnp.argmax(apply(params, images), -1) == labels).sum())
            for error in errors:
                assert error == pytest.approx(1 - correct / n, abs=1e-6), split
                assert error * n == pytest.approx(round(error * n), abs=1e-4)  # a count over n


# ------------------------------------------------------------------------------ divergence


def test_non_finite_loss_is_recorded_not_raised(small_data, pair):
    """A diverging run ends as finite=False and untrainable; its neighbour is unaffected.

    A huge finite lr is not enough for tanh: the activations saturate, the loss stays finite up
    to lr 1e30 (measured), so an infinite lr forces inf * 0 = NaN in the first update."""
    diverged, neighbour = run(small_data, [(0, math.inf), (1, LR)])
    assert diverged.finite is False
    assert not diverged.trainable(1.0) and not diverged.trainable(0.2)
    assert all(np.isfinite(diverged.train_errors + diverged.test_errors))  # errors are still numbers
    assert neighbour == pair[1]  # replicas are independent, even next to NaN


def test_nan_in_the_partial_last_batch_alone_marks_the_run(monkeypatch):
    """The partial last batch is a step of its own, outside the scan: its loss feeds `finite` too."""
    real_step = train.train_step

    def poisoned(model, state, images_u8, labels, bn_train):
        new_state, metrics = real_step(model, state, images_u8, labels, bn_train)
        if images_u8.shape[0] != BATCH:  # static under tracing: only the partial batch
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return new_state, metrics

    monkeypatch.setattr(train, "train_step", poisoned)
    model, init, _, _ = train.compiled_functions(VARIANT, DEPTH, BATCH)
    state = jax.tree.map(lambda a: a[0], init(jnp.zeros(1, jnp.int32), jnp.full((1,), LR)))
    n = 2 * BATCH + 5
    images, labels = jnp.zeros((n, 28, 28), jnp.uint8), jnp.zeros(n, jnp.int32)
    device_data = train.DeviceData(images, labels, images[:8], labels[:8])
    _, metrics = jax.jit(lambda s: train.train_epoch(model, s, jnp.arange(n), device_data, BATCH, True))(state)
    assert not bool(metrics["finite"])


# ------------------------------------------------------------------------------ trainable


@pytest.mark.parametrize("train_errors, test_errors, finite, expected", [
    ([0.9, 0.15], [0.9, 0.5], True, True),     # train error alone under the threshold
    ([0.9, 0.5], [0.9, 0.15], True, True),     # test error alone under the threshold
    ([0.1, 0.5], [0.1, 0.5], True, False),     # only an earlier epoch was under it
    ([0.9, 0.2], [0.9, 0.2], True, False),     # equal is not under
    ([0.9, 0.05], [0.9, 0.05], False, False),  # diverged: never trainable, whatever the counts
])
def test_trainable_threshold_semantics(train_errors, test_errors, finite, expected):
    assert RunResult(0, LR, train_errors, test_errors, finite).trainable(0.2) is expected


def test_trainable_follows_the_threshold():
    result = RunResult(0, LR, [0.5, 0.3], [0.5, 0.25], True)
    assert not result.trainable(0.2) and not result.trainable(0.25) and result.trainable(0.26)


# ------------------------------------------------------------------------------ BatchNorm mode


@pytest.mark.parametrize("name", REGISTERED_VARIANTS)
def test_bn_train_mode(name):
    variant = registry.get_variant(name)
    assert [train.bn_train_mode(e, False, variant) for e in range(3)] == [True, True, True]
    # The notebook's missing model.train(): eval-mode BatchNorm from the second epoch on, except
    # in its multihead loop, which does call model.train().
    quirky = [True, True, True] if variant.multihead else [True, False, False]
    assert [train.bn_train_mode(e, True, variant) for e in range(3)] == quirky


@pytest.mark.parametrize("name, quirks, expected", [
    ("elu_bn", False, [True, True, True]),
    ("elu_bn", True, [True, False, False]),
    ("elu_multihead", True, [True, True, True]),
])
def test_train_replicas_runs_each_epoch_in_its_bn_mode(small_data, monkeypatch, name, quirks, expected):
    """The wiring, with fake compiled programs: which epoch program each epoch runs."""
    modes = []

    def epoch_fn(mode):
        def run_epoch(state, orders, data_):
            modes.append(mode)
            assert orders.shape == (2, N_TRAIN)
            return state, {"train_error": jnp.full(2, 0.5), "finite": jnp.ones(2, bool)}
        return run_epoch

    fake = (None, lambda keys, lrs: jnp.zeros(len(lrs)), {m: epoch_fn(m) for m in (True, False)},
            lambda state, data_: jnp.full(2, 0.4))
    monkeypatch.setattr(train, "compiled_functions", lambda *args: fake)
    seen = []
    results = train.train_replicas(RunConfig(name, epochs=3, notebook_quirks=quirks), 9, small_data,
                                   [(0, 0.1), (1, 0.1)], on_epoch=lambda epoch, rs: seen.append((epoch, [len(r.train_errors) for r in rs])))
    assert modes == expected
    assert seen == [(0, [1, 1]), (1, [2, 2]), (2, [3, 3])]
    assert [r.train_errors for r in results] == [[0.5] * 3] * 2


def test_eval_mode_step_freezes_batchnorm_statistics():
    """bn_train=False (the quirk) normalizes with the running statistics and leaves them as they
    are; bn_train=True updates them."""
    model, init, _, _ = train.compiled_functions("elu_bn", 3, 16)  # its init: an unoptimized compile
    state = jax.tree.map(lambda a: a[0], init(jnp.zeros(1, jnp.int32), jnp.full((1,), 0.05)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
    step = jax.jit(lambda s, mode: train.train_step(model, s, images, labels, mode), static_argnums=1)
    frozen, _ = step(state, False)
    updated, _ = step(state, True)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.batch_stats, frozen.batch_stats)
    assert all(jax.tree.leaves(same))
    changed = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.batch_stats, updated.batch_stats)
    assert not any(jax.tree.leaves(changed))
    moved = jax.tree.map(lambda a, b: not bool(jnp.array_equal(a, b)), state.params, frozen.params)
    assert any(jax.tree.leaves(moved))  # eval-mode BatchNorm still trains the weights


# ------------------------------------------------------------------------------ CPU devices


@pytest.mark.parametrize("replicas, cores, expected", [
    (1, 2, 1), (2, 2, 2),
    (3, 2, 3),  # 3 devices rather than 2 and a padding replica
    (4, 2, 2), (6, 2, 2), (9, 2, 3),
    (5, 2, 2), (7, 2, 2),  # no divisor up to 2 per core: one per core, the last replica padded
    (3, 16, 3), (32, 16, 16), (48, 16, 16), (17, 16, 17), (35, 16, 16),
])
def test_cpu_device_count(replicas, cores, expected):
    assert train.cpu_device_count(replicas, cores) == expected


def cpu_devices_in_a_fresh_process(requested: int, env: dict[str, str]) -> int:
    """jax.device_count() of a new process that calls request_cpu_devices(requested) first."""
    code = (f"from flaxdepth import train; train.request_cpu_devices({requested}); "
            "import jax; print(jax.device_count())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return int(proc.stdout)


@pytest.mark.parametrize("environment, expected", [
    ({}, 3),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, 2),  # the user's choice wins
    ({"JAX_NUM_CPU_DEVICES": "1"}, 1),
])
def test_request_cpu_devices_before_jax_starts(environment, expected, env_without_device_count):
    assert cpu_devices_in_a_fresh_process(3, {**env_without_device_count, **environment}) == expected


def test_request_cpu_devices_after_jax_started_changes_nothing():
    count = jax.device_count()
    train.request_cpu_devices(count + 1)  # no error: JAX keeps its devices
    assert jax.device_count() == count


# ------------------------------------------------------------------------------ bench


def test_bench_times_every_form_with_the_engine_options_it_was_given(env_without_device_count):
    """`python -m flaxdepth.bench` in a fresh process (JAX's CPU device count is fixed when it
    starts): by default one CPU device per replica (here 2), as the sweep; one JSON object with
    torch's and flaxdepth's step, the replicas over the devices, on one device and vmapped, the
    compile time per depth asked for, and the engine options given on its command line."""
    proc = subprocess.run(
        [sys.executable, "-m", "flaxdepth.bench", "--variant", "tanh", "--depth", "3", "--steps", "1",
         "--rounds", "1", "--compile-depths", "3", "--json", "--batch-size", "32", "--replicas", "2",
         "--replicas-per-block", "5", "--rematerialize"],
        cwd=REPO, env=env_without_device_count, capture_output=True, text=True, timeout=600, check=True)
    [line] = proc.stdout.strip().splitlines()
    result = json.loads(line)
    assert (result["replicas"], result["jax_devices"]) == (2, train.cpu_device_count(2))  # 2 on 2 cores
    assert result["engine"] == EngineOptions(replicas_per_block=5, rematerialize=True).as_dict()
    assert result["cpu_kernels_used"] == (jax.default_backend() == "cpu")
    assert set(result["compile_s"]) == {"3"}
    timed = {"torch_ms_per_step", "jax_ms_per_step", "jax_ms_per_step_replicas", "speedup", "speedup_replicas",
             "speedup_replicas_one_device", "speedup_replicas_vmapped"}
    assert timed <= set(result) and all(math.isfinite(result[key]) for key in timed)


def test_bench_full_run_without_data_says_where_to_point_it(tmp_path, capsys):
    """A missing MNIST folder is the user's to fix: one line naming --data-dir, exit 2, no traceback."""
    assert bench_main(["--full-run", "--variant", "tanh", "--depth", "3", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m flaxdepth.bench: error:") and "--data-dir" in err and len(err.splitlines()) == 1


def bench_main(argv):
    from flaxdepth import bench
    return bench.main(argv)


def test_bench_measures_a_steps_memory_in_a_fresh_process_with_auto_resolved():
    """--depth-scaling's memory row: a child process's peak (above its peak before the step) and
    XLA's buffers of the step, with rematerialize "auto" named as what it chose there."""
    from flaxdepth import bench

    row = bench.step_memory_in_subprocess("tanh", 6, 8, EngineOptions(rematerialize="auto"), [])
    assert row["rematerialize"] in ("none", "layers", "nested"), row
    assert row["peak_rss_bytes"] >= row["peak_rss_before_step_bytes"] > 0 and row["xla_temp_bytes"] > 0


def test_bench_depth_scaling_options():
    from flaxdepth import bench

    args = bench.parse_args(["--depth-scaling", "--rematerializations", "none,nested,auto"])
    assert (args.compile_depths, args.memory_depths, args.time_depths) == ([30, 10002], [3000], [300, 3000])
    assert (args.steps, args.rounds, args.rematerializations) == (1, 3, ["none", "nested", "auto"])
    assert bench.parse_args([]).compile_depths == [30, 300]
    with pytest.raises(ConfigError, match="--rematerializations takes none, layers, nested, auto, got"):
        bench.parse_args(["--depth-scaling", "--rematerializations", "blocks"])


def test_bench_full_run_times_both_loops_and_the_one_device_engine(env_without_device_count):
    """--full-run on a subset, in a fresh process with 2 CPU devices: the notebook loop, the
    engine over the devices and the engine on one device (2 interleaved rounds) on the subset
    asked for, every time and ratio reported; of a variant declared in experiments/variants.toml."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the project's MNIST copy is absent ({SHARED_MNIST})")
    proc = subprocess.run(
        [sys.executable, "-m", "flaxdepth.bench", "--full-run", "--variants-file", "experiments/variants.toml",
         "--variant", "selu_lecun", "--depth", "3",
         "--replicas", "2", "--cpu-devices", "2", "--epochs", "1", "--rounds", "2", "--limit-train", "300",
         "--limit-test", "100", "--data-dir", str(SHARED_MNIST), "--json"],
        cwd=REPO, env=env_without_device_count, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(proc.stdout)
    assert result["variant"] == "selu_lecun"
    assert (result["train_images"], result["test_images"], result["jax_devices"], result["rounds"]) == (300, 100, 2, 2)
    timed = ("torch_notebook_loop_s", "jax_run_s", "jax_one_device_run_s", "jax_compile_s", "speedup_per_model",
             "cpu_devices_speedup")
    assert all(math.isfinite(result[key]) for key in timed)
