"""What a sweep keeps of a run beside its errors: the final weights (`--save-weights`) and a
per-layer diagnostics summary at initialization and at the end (`--diagnostics`).

`RunOutputs` collects both while a depth's runs train, through the trainers' callbacks
(`train.train_replicas(on_state=...)`, `torch_runner.train_torch_runs(on_model=...)`), and then
adds them to the runs' results rows, writing the weight files beside the results file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flaxdepth.results import atomic_write

#: flaxdepth.measure's per-layer keys a results row keeps (the last two: BatchNorm layers only).
SUMMARY_KEYS = ("activation_variance", "output_grad_norm", "running_mean_distance", "running_var_distance")
#: The weight formats a row names: Flax's msgpack (flax.serialization) and a torch state_dict.
WEIGHT_SUFFIXES = {"flax": ".msgpack", "torch": ".pt"}


#: Significant digits a row keeps of each value: a summary to read at a glance (python -m
#: flaxdepth.diagnose keeps every digit).
SUMMARY_DIGITS = 4


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.{SUMMARY_DIGITS}g}")


def summary(measured: dict, bn_train: bool) -> dict:
    """measure.layer_diagnostics' {"loss", "layers"} as a row keeps it: the loss and, per
    SUMMARY_KEYS key, one value per conv layer in network order, to SUMMARY_DIGITS digits (None:
    not finite)."""
    layers = measured["layers"]
    kept = {"bn_train": bn_train, "loss": _rounded(measured["loss"])}
    kept.update({key: [_rounded(layer.get(key)) for layer in layers] for key in SUMMARY_KEYS
                 if any(key in layer for layer in layers)})
    return kept


def host_replicas(tree, count: int) -> list:
    """The first `count` replicas of a replica-stacked tree, one numpy tree each, on every process
    (with several processes an all-gather: every process must call it)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return [jax.tree.map(lambda a, r=r: np.asarray(a[r]), tree) for r in range(count)]


def weights_folder(results_path: Path) -> Path:
    """`<results file without .jsonl>.weights`: one folder per results file, so that sweeps of other
    results files in the same folder never write the same weight file."""
    return Path(results_path).with_suffix(".weights")


def save_weights(results_path: Path, name: str, variables: dict, state_dict: dict[str, np.ndarray],
                 taken: set[str]) -> dict[str, str]:
    """Write one run's weights as `name.msgpack` (Flax variables) and `name.pt` (torch state_dict)
    in weights_folder(results_path), each atomically; returns {"flax", "torch"}: the files' paths
    relative to the results file's folder. A name in `taken` (another run's files: an edited
    variant, another device) gets a suffix -2, -3, ... The caller holds the depth's lock, so no
    other sweep of this results file picks a name meanwhile."""
    import flax.serialization
    import torch

    folder = weights_folder(results_path)
    stem, number = name, 1
    while any(f"{folder.name}/{stem}{suffix}" in taken for suffix in WEIGHT_SUFFIXES.values()):
        number += 1
        stem = f"{name}-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    payload = flax.serialization.msgpack_serialize(variables)
    atomic_write(folder / f"{stem}.msgpack", lambda f: f.write(payload))
    tensors = {key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}
    atomic_write(folder / f"{stem}.pt", lambda f: torch.save(tensors, f))
    names = {fmt: f"{folder.name}/{stem}{suffix}" for fmt, suffix in WEIGHT_SUFFIXES.items()}
    taken.update(names.values())
    return names


def taken_names(rows: list[dict]) -> set[str]:
    """The weight files that rows of a results file name."""
    return {path for row in rows for path in (row.get("weights") or {}).values()}


def load_weights(results_path: Path, row: dict) -> tuple[dict, dict]:
    """(Flax variables, torch state_dict of tensors) of a row saved with --save-weights."""
    import flax.serialization
    import torch

    folder = Path(results_path).parent
    variables = flax.serialization.msgpack_restore((folder / row["weights"]["flax"]).read_bytes())
    return variables, torch.load(folder / row["weights"]["torch"])


class RunOutputs:
    """Collects one depth's outputs while its runs train, for a sweep configuration
    (config.SweepConfig: save_weights, diagnostics), a probe batch (uint8 images, labels: the
    first test images) and the engine options the runs train with (rematerialize resolved, so that
    process 0 measures alone without any collective step). Everything measured is numbers on the
    host; `elapsed` is the time spent here, which the rows' wall_s leaves out."""

    def __init__(self, config, depth: int, runs: list[tuple[int, float]], probe_images: np.ndarray,
                 probe_labels: np.ndarray, engine=None, measure: bool = True):
        self.config, self.depth, self.runs = config, depth, list(runs)
        self.engine = config.engine if engine is None else engine
        self.spec = config.spec
        self.probe_images, self.probe_labels = probe_images, probe_labels
        self.measure = measure  # False on processes that write nothing
        self.diagnostics: dict[tuple[int, float], dict[str, Any]] = {}
        self.weights: dict[tuple[int, float], tuple[dict, dict]] = {}
        self.elapsed = 0.0
        self.diagnostics_s = 0.0

    def check_memory(self) -> None:
        """A ConfigError before training where the per-layer diagnostics would not fit in the memory
        available (flaxdepth.measure.check_probe_fits). With one process only: the processes of a
        distributed sweep could see different memory and part ways."""
        import jax

        if not (self.config.diagnostics and self.measure and jax.process_count() == 1):
            return
        from flaxdepth import measure, train

        start = time.perf_counter()  # mostly the measuring program's compile, which the measuring then reuses
        measure.check_probe_fits(self.spec, self.depth, train.normalize(self.probe_images),
                                  self.probe_labels.astype(np.int32), train.available_memory(jax.devices()[0]),
                                  self.config.fan, self.engine, fast_compile=True)
        self.diagnostics_s += time.perf_counter() - start
        self.elapsed += time.perf_counter() - start

    def _moment(self, epochs_trained: int) -> str | None:
        """The moment a row records: "init", "end", or None (an epoch between)."""
        return {0: "init", self.config.epochs: "end"}.get(epochs_trained)

    def _bn_train(self, epochs_trained: int) -> bool:
        """BatchNorm's mode from this point of training on, as flaxdepth.diagnose measures in."""
        from flaxdepth import train

        return train.bn_train_mode(epochs_trained, self.config.run.notebook_quirks, self.spec)

    def jax_state(self, epochs_trained: int, state) -> None:
        """train.train_replicas' on_state."""
        moment = self._moment(epochs_trained)
        if moment is None or (moment == "init" and not self.config.diagnostics):
            return
        start = time.perf_counter()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        for run, replica in zip(self.runs, host_replicas(variables, len(self.runs))):
            if not replica["batch_stats"]:  # variants without BatchNorm
                del replica["batch_stats"]
            if self.measure and self.config.diagnostics:
                self._diagnose_jax(run, moment, replica, self._bn_train(epochs_trained))
            if self.measure and moment == "end" and self.config.save_weights:
                from flaxdepth import interop

                self.weights[run] = replica, interop.to_torch(self.spec, self.depth, replica)
        self.elapsed += time.perf_counter() - start

    def _diagnose_jax(self, run, moment: str, variables: dict, bn_train: bool) -> None:
        from flaxdepth import measure, train

        start = time.perf_counter()
        c = self.config
        # Without BatchNorm both modes compute the same: one program (compile time is most of the cost).
        measured = measure.layer_diagnostics(self.spec, self.depth, variables, train.normalize(self.probe_images),
                                              self.probe_labels.astype(np.int32), bn_train or not self.spec.batchnorm,
                                              c.fan, self.engine, fast_compile=True)
        self.diagnostics.setdefault(run, {})[moment] = summary(measured, bn_train)
        self.diagnostics_s += time.perf_counter() - start

    def torch_model(self, seed: int, lr: float, epochs_trained: int, model) -> None:
        """torch_runner.train_torch_runs' on_model."""
        moment = self._moment(epochs_trained)
        if moment is None or not self.measure:
            return
        start = time.perf_counter()
        run = (seed, lr)
        if self.config.diagnostics:
            self._diagnose_torch(run, moment, model, self._bn_train(epochs_trained))
        if moment == "end" and self.config.save_weights:
            import jax

            from flaxdepth import interop

            state_dict = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
            variables = jax.tree.map(np.asarray, interop.from_torch(self.spec, self.depth, state_dict))
            self.weights[run] = variables, state_dict
        self.elapsed += time.perf_counter() - start

    def _diagnose_torch(self, run, moment: str, model, bn_train: bool) -> None:
        import torch

        from torch_ref import diagnose as torch_diagnose
        from torch_ref import training

        start = time.perf_counter()
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        images = training.normalize(self.probe_images, dtype).to(device)
        labels = torch.from_numpy(self.probe_labels.astype(np.int64)).to(device)
        measured = torch_diagnose.layer_diagnostics(model, images, labels, bn_train)
        self.diagnostics.setdefault(run, {})[moment] = summary(measured, bn_train)
        self.diagnostics_s += time.perf_counter() - start

    def add_to(self, rows: list[dict], results_path: Path, taken: set[str]) -> None:
        """Give each row of this depth its diagnostics and its saved weights' file names."""
        for row in rows:
            run = (row["seed"], row["lr"])
            if run in self.diagnostics:
                row["diagnostics"] = {"probe": f"the first {len(self.probe_labels)} test images",
                                      "wall_s": self.diagnostics_s / len(self.runs), **self.diagnostics[run]}
            if run in self.weights:
                variables, state_dict = self.weights[run]
                name = f"{self.config.variant}-k{self.depth}-seed{row['seed']}-lr{row['lr']:g}"
                row["weights"] = save_weights(results_path, name, variables, state_dict, taken)
