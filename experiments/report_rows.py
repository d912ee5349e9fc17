"""What experiments/report.py reads and computes: the committed runs (`flaxdepth.load_results`),
the rows of each table (the notebook's setup, the declared variants, the depth frontier per setup
and lr rule), the verdicts and boundaries (`flaxdepth.search.boundary_search` replayed on the
recorded depths), the fitted P(trains | depth) and its k50 (`flaxdepth.trainability`) and the
theory's predictions beside them. No text beyond a cell's, no drawing.

A run is a row of a pandas DataFrame (`load`); functions that select runs take such a frame and
return a part of it, with its index, so that a selection can be matched back to the runs read."""

from __future__ import annotations

import functools
import json
import math
import tomllib
from pathlib import Path
from typing import NamedTuple

import pandas as pd

import flaxdepth
from flaxdepth import registry, theory, trainability
from flaxdepth.config import SweepConfig
from flaxdepth.search import boundary_search

HERE = Path(__file__).resolve().parent
DECLARED = registry.load_variants(HERE / "variants.toml")  # the variants of your own that sweeps train
PROTOCOLS = ("faithful", "corrected")
NOT_RUN = "not run"
#: The results files read, relative to the results folder: sub-folders such as cpu/ hold runs from
#: other machines; deeper folders (cpu/eval_mode_collapse/, ...) belong to the notes, not the report.
RESULTS_FILES = ("*.jsonl", "*/*.jsonl")
# The notebook's setup; rows of other setups (smoke tests, other lrs) are listed but not tabulated.
STANDARD = {"epochs": 3, "batch_size": 256, "dataset": "mnist", "limit_train": None, "limit_test": None}
#: The notebook's fan; None is the variant's own init_fan, "out" for every built-in.
STANDARD_FANS = ("out", None)
#: What tells two runs apart: of rows with the same key the last written wins.
RUN_KEY = ["variant", "framework", "protocol", "depth", "seed", "device"]
#: Columns every frame of runs has, also when no results file was read.
COLUMNS = ("variant", "framework", "protocol", "depth", "seed", "lr", "device", "device_count",
           "replicas_trained_together", "wall_s", "finished_at", "versions", "config", "spec", "train_errors",
           "test_errors", "finite", "final_error", "threshold", "precision", "file", "file_name")
#: The sweeps.toml entry that trains the declared variants.
DECLARED_ENTRY = "declared-cpu"
#: The depth frontier: experiments/sweeps.toml's CPU entry, the sub-folder of the results into which
#: experiments/gpu_frontier.sh's files are copied, the per-layer diagnostics at init of the deepest
#: networks (python -m flaxdepth.diagnose --steps 0, diagnostics.json as VARIANT_kK.json), and its
#: inits: the critical ones (experiments/variants.toml), then the notebook's controls.
FRONTIER_ENTRY = "frontier-cpu"
FRONTIER_GPU = "gpu_frontier"
FRONTIER_INIT = "frontier_init"
FRONTIER_VARIANTS = ("tanh_critical_delta", "tanh_critical_delta_wide", "tanh_critical_gaussian", "tanh_newinit",
                     "tanh")
#: MNIST's training and test split sizes: a row's limit_train / limit_test of None is all of them.
MNIST_IMAGES = (60000, 10000)


# Reading and selecting runs

def load(results_dir: Path) -> pd.DataFrame:
    """Every run of the results files in `results_dir` and one folder down (RESULTS_FILES), read by
    `flaxdepth.load_results`, in file order: one row per run, `file_name` its file relative to
    `results_dir`, `trainable` recomputed with the row's own threshold."""
    folder = Path(results_dir)
    paths = [path for pattern in RESULTS_FILES for path in sorted(folder.glob(pattern))]
    frames = [flaxdepth.load_results(path).assign(file_name=path.relative_to(folder).as_posix()) for path in paths]
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    for column in COLUMNS:
        if column not in runs:
            runs[column] = None
    runs["trainable"] = runs["finite"].astype(bool) & (runs["final_error"] < runs["threshold"])
    return runs


def where(runs: pd.DataFrame, test) -> pd.DataFrame:
    """The runs for which `test(run)` holds, `run` a row of `runs.itertuples()`."""
    return runs.loc[pd.Series([bool(test(run)) for run in runs.itertuples(index=False)], index=runs.index,
                              dtype=bool)]


def combined(frames) -> pd.DataFrame:
    """Frames of runs as one (in their order), an empty one with every column if there are none."""
    frames = list(frames)
    return pd.concat(frames) if frames else pd.DataFrame(columns=list(COLUMNS))


def by_file(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The runs per results file (name relative to the results folder), in file order."""
    return {name: at for name, at in runs.groupby("file_name", sort=False)}


def main_folder(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the results folder itself, not of its sub-folders (other machines)."""
    return where(runs, lambda run: "/" not in run.file_name)


def standard_rows(runs: pd.DataFrame, precision: str = "default") -> pd.DataFrame:
    """Runs of the notebook's setup at the variant's lr and the given --precision, one per run (the
    last written wins)."""
    def standard(run) -> bool:
        variant = registry.VARIANTS.get(run.variant)
        return (variant is not None and run.lr == variant.lr
                and all(run.config.get(key) == value for key, value in STANDARD.items())
                and run.config.get("fan") in STANDARD_FANS and run.precision == precision)
    return where(runs, standard).drop_duplicates(RUN_KEY, keep="last")


def pick(runs: pd.DataFrame, variant: str, protocol: str | None = None, framework: str = "jax",
         depth: int | None = None) -> pd.DataFrame:
    """The runs of one variant, optionally of one protocol, framework and depth, by seed."""
    keep = (runs["variant"] == variant) & (runs["framework"] == framework)
    if protocol is not None:
        keep &= runs["protocol"] == protocol
    if depth is not None:
        keep &= runs["depth"] == depth
    return runs.loc[keep.astype(bool)].sort_values("seed", kind="stable")


def on_device(runs: pd.DataFrame, device: str) -> pd.DataFrame:
    return runs.loc[(runs["device"] == device).astype(bool)]


def devices(runs: pd.DataFrame) -> list[str]:
    """The devices the runs were trained on (their `device`, platform:kind), sorted."""
    return sorted(set(runs["device"].dropna()))


def platforms(runs: pd.DataFrame) -> list[str]:
    """'CPU', 'GPU', ...: the platforms of `devices(runs)`."""
    return sorted({device.split(":")[0].upper() for device in devices(runs)})


class Rate(NamedTuple):
    trained: int  # runs that train
    runs: int
    text: str  # 'k/n seeds', or 'not run'


def rate(runs: pd.DataFrame) -> Rate:
    trained, n = int(runs["trainable"].sum()), len(runs)
    return Rate(trained, n, f"{trained}/{n} seeds" if n else NOT_RUN)


def most_train(runs: pd.DataFrame) -> bool:
    """The criterion of a depth: most of its runs train."""
    return 2 * int(runs["trainable"].sum()) > len(runs)


def images_text(config: dict) -> str:
    """'full MNIST' or 'the first 1,536 training / 512 test images' of a row's configuration."""
    if not config.get("limit_train"):
        return "full MNIST"
    test = config.get("limit_test") or MNIST_IMAGES[1]
    return f"the first {config['limit_train']:,} training / {test:,} test images"


def sgd_steps(config: dict) -> int:
    """The SGD steps of a run of this configuration (a partial last batch is a step)."""
    images = config.get("limit_train") or MNIST_IMAGES[0]
    return math.ceil(images / config["batch_size"]) * config["epochs"]


# The boundary search replayed

class Boundary(NamedTuple):
    deepest: int | None  # deepest k found to train (most seeds), None if none
    shallowest: int | None  # shallowest k found not to train, None if none
    next_depth: int | None = None  # the depth an unfinished search would train next


class _NotEvaluated(LookupError):
    pass


def boundary(rows: pd.DataFrame, variant: str, protocol: str) -> Boundary | None:
    """flaxdepth's own boundary: the sweep's search (flaxdepth.search.boundary_search) replayed on
    the recorded depths, a depth trainable when most seeds train (rows of every device and seed
    pooled); where the search needs a depth with no rows it is unfinished, and its findings so far
    are returned with that depth. None where no search was run (no rows at k=3, which no notebook
    pair contains)."""
    runs = pick(rows, variant, protocol)
    if not (runs["depth"] == 3).any():
        return None
    trains = {int(depth): most_train(at) for depth, at in runs.groupby("depth")}
    asked = []

    def recorded(depth):
        if depth not in trains:
            raise _NotEvaluated(depth)
        asked.append(depth)
        return trains[depth]

    # The deepest limit any of these runs was started with: a search resumed with a larger
    # --max-depth goes on where the smaller one stopped.
    max_depth = max(config.get("max_depth", SweepConfig.max_depth) for config in runs["config"])
    try:
        return Boundary(*boundary_search(recorded, max_depth))
    except _NotEvaluated as missing:
        deepest = max((d for d in asked if trains[d]), default=None)
        failed = [d for d in asked if not trains[d] and (deepest is None or d > deepest)]
        return Boundary(deepest, min(failed, default=None), missing.args[0])


def boundary_text(b: Boundary | None, short: bool = False) -> str:
    """'k=D / k=S' for a boundary from `boundary`, 'not run' for None, the next depth where
    unfinished; `short`: 'D / S', an unfinished search's next depth left out ('so far' stays)."""
    if b is None:
        return NOT_RUN
    k = "" if short else "k="
    text = (f"{k}{b.deepest}" if b.deepest else "none trains") + " / " + (
        f"{k}{b.shallowest}" if b.shallowest else "none fails")
    if b.next_depth is None:
        return text
    return f"{text} so far" + ("" if short else f" (search unfinished, next k={b.next_depth})")


# P(trains | depth): flaxdepth.trainability's fit

def depth_counts(runs: pd.DataFrame) -> tuple[list[int], list[int], list[int]]:
    """(depths, trained, runs) per depth of a frame of runs, sorted by depth: a run trains when its
    `trainable` holds (finite and final error under the row's own threshold), so at the rows'
    threshold these are `flaxdepth.trainability.counts`' first three."""
    at = runs.groupby("depth")["trainable"].agg(["sum", "size"])
    return [int(d) for d in at.index], [int(t) for t in at["sum"]], [int(n) for n in at["size"]]


def trainability_fit(rows: pd.DataFrame, variant: str, protocol: str) -> trainability.Fit | None:
    """P(trains | depth) fitted (flaxdepth.trainability.fit, its default k50 prior over the tested
    depths, as `python -m flaxdepth.trainability` fits a results file) to every jax run of one
    variant and protocol in `rows` (every device pooled, as the verdicts pool them); None without runs."""
    runs = pick(rows, variant, protocol)
    return trainability.fit(*depth_counts(runs)) if len(runs) else None


def depth_number(k: float) -> str:
    """A fitted depth as `python -m flaxdepth.trainability` prints it: whole from 10 on, else to a tenth."""
    return f"{k:.0f}" if k >= 10 else f"{k:.1f}"


def k50_text(fit: trainability.Fit | None) -> str:
    """'57 [35, 71]': k50 and its 95% credible interval; an end beyond the tested depths marked
    ('57 [35, >71]': above the deepest, '<' below the shallowest: there the data do not bound k50,
    the prior's range does); '> 96: every run trained' / '< 3: no run trained' for a censored fit
    (the data bound k50 on one side only); 'not run' for None."""
    if fit is None:
        return NOT_RUN
    if fit.censored == "above":
        return f"> {fit.depths[-1]}: every run trained"
    if fit.censored == "below":
        return f"< {fit.depths[0]}: no run trained"
    (lo, hi), (below, above) = fit.k50_interval, fit.k50_beyond_tested
    return f"{depth_number(fit.k50)} [{'<' * below}{depth_number(lo)}, {'>' * above}{depth_number(hi)}]"


def k50_marked(fit: trainability.Fit | None) -> bool:
    """Whether `k50_text` marks an interval end beyond the tested depths."""
    return fit is not None and fit.censored is None and any(fit.k50_beyond_tested)


# The verdicts

class Verdict(NamedTuple):
    """One notebook variant's verdicts, per protocol that differs (corrected only with BatchNorm)."""
    variant: registry.Variant
    pair: dict[str, tuple[Rate, Rate]]  # protocol -> seeds that train at the notebook's pair
    boundary: dict[str, Boundary | None]  # protocol -> the replayed search (None: no search run)
    fit: dict[str, trainability.Fit | None]  # protocol -> P(trains | depth) of its runs (None: no runs)


def verdicts(rows: pd.DataFrame) -> list[Verdict]:
    """The notebook's variants in registry order: what REPORT.md's verdict table and README's
    findings table say."""
    found = []
    for v in registry.VARIANTS.values():
        protocols = PROTOCOLS[:1 + v.batchnorm]
        found.append(Verdict(v, {p: tuple(rate(pick(rows, v.name, p, depth=k)) for k in v.notebook_pair)
                                 for p in protocols},
                             {p: boundary(rows, v.name, p) for p in protocols},
                             {p: trainability_fit(rows, v.name, p) for p in protocols}))
    return found


def trainable_beyond(rows: pd.DataFrame, variant: str, protocol: str, first_failure: int) -> list[tuple[int, Rate]]:
    """(depth, rate) of each depth deeper than a search's first failure where most seeds train."""
    runs = pick(rows, variant, protocol)
    return [(int(depth), rate(at)) for depth, at in runs.groupby("depth") if depth > first_failure and most_train(at)]


def torch_pairs(rows: pd.DataFrame, variant: str) -> list[tuple[tuple[str, int], list[tuple]]]:
    """Torch runs beside the jax runs of the same device, protocol, depth and seed (same initial
    weights and batch order): ((device, depth), [(torch run, jax run), ...]) by depth, then device."""
    jax = {(r.device, r.protocol, r.depth, r.seed): r for r in pick(rows, variant).itertuples(index=False)}
    pairs = {}
    for t in pick(rows, variant, framework="torch").itertuples(index=False):
        if (key := (t.device, t.protocol, t.depth, t.seed)) in jax:
            pairs.setdefault((t.device, int(t.depth)), []).append((t, jax[key]))
    return sorted(pairs.items(), key=lambda item: (item[0][1], item[0][0]))


def max_error_difference(pairs: list[tuple]) -> float:
    """The largest |per-epoch train or test error difference| over (torch run, jax run) pairs."""
    return max(abs(a - b) for t, j in pairs for errors in ("train_errors", "test_errors")
               for a, b in zip(getattr(t, errors), getattr(j, errors)))


def quirk_depths(rows: pd.DataFrame, v: registry.Variant) -> list[int]:
    """Where to look for the eval-mode collapse: the notebook's pair, and the shallowest depth run
    under the faithful protocol (k=3 once a search ran), which shows whether it depends on depth."""
    faithful = pick(rows, v.name, "faithful")
    shallowest = int(faithful["depth"].min()) if len(faithful) else v.notebook_pair[0]
    return sorted(set(v.notebook_pair) | {shallowest})


def collapsed(rows: pd.DataFrame, variant: str, depth: int, pct: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs of the eval-mode collapse: under the threshold after epoch 1, over it at the end,
    all runs) at one depth under the faithful protocol."""
    runs = pick(rows, variant, "faithful", depth=depth)
    return where(runs, lambda r: r.test_errors[0] < pct / 100 <= r.test_errors[-1]), runs


# The sweeps of experiments/sweeps.toml

def sweep_entries() -> list[dict]:
    return tomllib.loads((HERE / "sweeps.toml").read_text())["sweep"]


def sweep_entry(name: str) -> dict:
    return next(entry for entry in sweep_entries() if entry["name"] == name)


def current_spec(run) -> bool:
    """A built-in's run, or a declared variant's trained with its current spec."""
    return run.variant not in DECLARED or run.spec == registry.get_variant(run.variant).fields()


def declared_rows(runs: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The main folder's jax runs of a declared variant trained with its current spec."""
    spec = registry.get_variant(variant).fields()
    return where(main_folder(runs), lambda r: r.variant == variant and r.framework == "jax" and r.spec == spec)


def declared_runs(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The runs of experiments/variants.toml's variants, by variant, but the frontier's (which have
    a section of their own)."""
    return {name: declared_rows(runs, name) for name in DECLARED if name not in FRONTIER_VARIANTS}


def subset_entry_rows(runs: pd.DataFrame, entry: dict, variant: str) -> pd.DataFrame:
    """The main folder's jax runs of a sweeps.toml entry that trains on a subset (limit_train): the
    variant's, on the entry's subset, epochs and batch size, at the entry's depths and lrs."""
    lrs = entry.get("lr_at_depth")

    def of_entry(r) -> bool:
        return (r.variant == variant and r.framework == "jax" and current_spec(r)
                and all(r.config.get(key) == entry.get(key, default) for key, default in
                        (("limit_train", None), ("limit_test", None), ("epochs", 3), ("batch_size", 256)))
                and (not isinstance(entry["depths"], list) or r.depth in entry["depths"])
                and (lrs is None or r.lr == lrs.get(str(r.depth)))
                and ("lrs" not in entry or r.lr in entry["lrs"]))
    return where(main_folder(runs), of_entry)


def sweep_progress(runs: pd.DataFrame) -> list[tuple[str, list[str], list[str]]]:
    """(entry, variants with results, variants in the entry) per sweeps.toml entry."""
    progress = []
    for e in sweep_entries():
        names = registry.VARIANT_NAMES if e["variants"] == "all" else e["variants"]
        protocol, pair = "faithful" if e.get("notebook_quirks") else "corrected", e["depths"] == "notebook_pair"
        if "limit_train" in e:  # an entry of its own subset: the rows on that subset
            done = [n for n in names if len(subset_entry_rows(runs, e, n))]
        elif all(n in DECLARED for n in names):  # declared variants: no notebook pair, their own subset
            done = [n for n in names if len(declared_rows(runs, n))]
        else:
            entry_rows = standard_rows(runs, e.get("precision", "default"))
            done = [n for n in names if any((depth in registry.get_variant(n).notebook_pair) == pair for depth in
                                            pick(entry_rows, n, protocol, e.get("framework", "jax"))["depth"])]
        progress.append((e["name"], done, list(names)))
    return progress


# The depth frontier

def setup_text(run) -> str:
    """What a frontier run was trained on, in words; its lr as c / k (c to one decimal: the lrs are
    c / k rounded to two significant digits)."""
    c = run.config
    return (f"{run.device}, {images_text(c)}, {c['epochs']} epochs in batches of {c['batch_size']}, "
            f"lr = {round(run.lr * run.depth, 1):g} / k")


def frontier_rows(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frontier's runs by setup (setup_text, which holds the lr rule: a table each): the CPU
    entry's, then experiments/gpu_frontier.sh's."""
    entry = sweep_entry(FRONTIER_ENTRY)
    gpu = where(runs, lambda r: r.file_name.startswith(f"{FRONTIER_GPU}/") and r.variant in FRONTIER_VARIANTS
                and r.framework == "jax" and current_spec(r))
    selected = combined([subset_entry_rows(runs, entry, v) for v in entry["variants"]] + [gpu])
    setups = [setup_text(r) for r in selected.itertuples(index=False)]
    return {setup: at.drop(columns="setup") for setup, at in selected.assign(setup=setups).groupby("setup", sort=False)}


class FrontierTable(NamedTuple):
    """One setup's table: its depths, the lrs at each, and per init the runs at each depth."""
    depths: list[int]
    lrs: dict[int, list[float]]
    cells: dict[str, dict[int, pd.DataFrame]]  # init -> depth -> its runs by seed (empty: not run)


def frontier_table(rows: pd.DataFrame) -> FrontierTable:
    depths = sorted(int(d) for d in set(rows["depth"]))
    lrs = {d: sorted(set(rows.loc[rows["depth"] == d, "lr"])) for d in depths}
    cells = {v: {d: pick(rows, v, depth=d) for d in depths} for v in FRONTIER_VARIANTS if (rows["variant"] == v).any()}
    return FrontierTable(depths, lrs, cells)


def frontier_trained(by_setup: dict[str, pd.DataFrame]) -> list[tuple[int, str, str]]:
    """(depth, init, setup) of every frontier cell where most seeds train."""
    return [(d, v, setup) for setup, rows in by_setup.items() for v, at_depth in frontier_table(rows).cells.items()
            for d, at in at_depth.items() if len(at) and most_train(at)]


def mean_errors(rows: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(init, depth) -> the mean final error of its runs."""
    return {(v, int(d)): sum(at["final_error"]) / len(at) for (v, d), at in rows.groupby(["variant", "depth"],
                                                                                        sort=False)}


def init_diagnostics(results_dir: Path) -> list[tuple[Path, dict]]:
    """The frontier's committed diagnostics files (python -m flaxdepth.diagnose's diagnostics.json)."""
    return [(path, json.loads(path.read_text())) for path in sorted((Path(results_dir) / FRONTIER_INIT).glob("*.json"))]


# Theory beside measurement

class Measured(NamedTuple):
    deepest: int | None  # deepest k where most seeds train
    shallowest: int | None  # shallowest k beyond `deepest` where most seeds fail
    text: str


def measured_limit(rows: pd.DataFrame, runs: pd.DataFrame, name: str) -> Measured:
    """A variant's measured depth limit: the replayed boundary search for the notebook's variants
    (no BatchNorm: the faithful rows), the depths run on a subset for experiments/variants.toml's."""
    if name not in DECLARED:
        found = boundary(rows, name, "faithful")
        return Measured(None, None, NOT_RUN) if found is None else Measured(found.deepest, found.shallowest,
                                                                            boundary_text(found))
    declared = declared_rows(runs, name)
    trains = {int(d): most_train(at) for d, at in declared.groupby("depth")}
    depths = sorted(trains)
    if not depths:
        return Measured(None, None, NOT_RUN)
    deepest = max((d for d in depths if trains[d]), default=None)
    shallowest = min((d for d in depths if not trains[d] and (deepest is None or d > deepest)), default=None)
    text = (f"k={deepest} trains" if deepest else "none trains") + (f", k={shallowest} fails" if shallowest else "")
    return Measured(deepest, shallowest, f"{text} (of k = {', '.join(map(str, depths))}; subset)")


class TheoryComparison(NamedTuple):
    predictions: list  # theory.VariantPrediction of every registered variant
    covered: list  # those the theory covers
    measured: dict[str, Measured]  # of the covered ones


def theory_comparison(rows: pd.DataFrame, runs: pd.DataFrame) -> TheoryComparison:
    predictions = [theory.predict_variant(name) for name in registry.variant_names()]
    covered = [p for p in predictions if p.applies]
    return TheoryComparison(predictions, covered, {p.variant: measured_limit(rows, runs, p.variant) for p in covered})


@functools.lru_cache(maxsize=None)
def critical_line(activation: str) -> tuple[tuple[float, float], ...]:
    """(critical sigma_w^2, sigma_b^2) for sigma_b^2 = 0, 0.01, ..., 0.3 where the activation has one."""
    biases = [0.01 * i for i in range(31)]
    return tuple((w, b) for b in biases if (w := theory.critical_sigma_w2(activation, b)) is not None)


# Everything a report is made of

class Selection(NamedTuple):
    runs: pd.DataFrame  # every run read
    rows: pd.DataFrame  # the notebook's setup, the main folder's runs: the verdict table's
    all_rows: pd.DataFrame  # the notebook's setup, every folder's: the torch comparisons'
    pct: float  # the threshold in percent
    verdicts: list[Verdict]
    declared: dict[str, pd.DataFrame]
    theory: TheoryComparison
    frontier: dict[str, pd.DataFrame]
    diagnostics: list[tuple[Path, dict]]


def select(results_dir: Path) -> Selection:
    """Read the results folder and select each table's runs."""
    runs = load(results_dir)
    # The table counts the main folder's runs; runs from other machines (sub-folders) only enter
    # the torch comparison, each against jax runs of its own device.
    rows = standard_rows(main_folder(runs))
    pct = 100 * max(rows["threshold"], default=0.2)
    return Selection(runs, rows, standard_rows(runs), pct, verdicts(rows), declared_runs(runs),
                     theory_comparison(rows, runs), frontier_rows(runs), init_diagnostics(results_dir))
