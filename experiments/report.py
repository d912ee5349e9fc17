"""Rebuild experiments/REPORT.md and experiments/figures/*.png from experiments/results/*.jsonl.

    python experiments/report.py [--results DIR] [--out DIR]

Nothing is trained here: every number in the report is computed from the results files, and
whatever has no rows is shown as "not run".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from flaxdepth import registry, theory  # noqa: E402
from flaxdepth.results import final_error  # noqa: E402
from flaxdepth.config import SweepConfig  # noqa: E402
from flaxdepth.search import boundary_search  # noqa: E402

HERE = Path(__file__).resolve().parent
DECLARED = registry.load_variants(HERE / "variants.toml")  # the variants of your own that sweeps train
PROTOCOLS = ("faithful", "corrected")
COLOR, MARKER = {"faithful": "tab:blue", "corrected": "tab:orange"}, {"faithful": "o", "corrected": "s"}
NOT_RUN = "not run"
# The notebook's setup; rows of other setups (smoke tests, other lrs) are listed but not tabulated.
STANDARD = {"epochs": 3, "batch_size": 256, "dataset": "mnist", "limit_train": None, "limit_test": None}
#: The notebook's fan; None is the variant's own init_fan, "out" for every built-in.
STANDARD_FANS = ("out", None)
INTRO = """\
The notebook trains each CNN variant once, unseeded, and reports a pair of depths k: the deepest
that trains (under {pct}% error after {epochs} epochs) and the next one that does not. flaxdepth trains
every depth with several seeds, under two protocols: *faithful* keeps the notebook's quirk
(BatchNorm in eval mode from epoch 2 on), *corrected* calls `model.train()` every epoch (the two
differ only for variants with BatchNorm). A depth counts as trainable when most seeds train."""
QUIRK = ("{name} at k={k} (faithful): {c}/{n} seeds reach {first} test error after epoch 1, then "
         "{later} after the later epochs. Corrected protocol at this depth: {corr}.")


def load(results_dir: Path) -> dict[str, list[dict]]:
    """Every results file's rows by name relative to `results_dir` (sub-folders such as cpu/ hold
    runs from other machines), verdicts recomputed with the row's own threshold."""
    files = {}
    for path in sorted(Path(results_dir).glob("*.jsonl")) + sorted(Path(results_dir).glob("*/*.jsonl")):
        name = path.relative_to(results_dir).as_posix()
        files[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in files[name]:
            row["trainable"] = bool(row["finite"]) and final_error(row) < row["config"]["threshold"]
    return files


def standard_rows(files: dict[str, list[dict]], precision: str = "default") -> list[dict]:
    """Rows of the notebook's setup at the variant's lr and the given --precision, one per run (the
    last written wins)."""
    keep = {}
    for r in (r for rows in files.values() for r in rows):
        v = registry.VARIANTS.get(r["variant"])
        if (v and r["lr"] == v.lr and all(r["config"].get(k) == x for k, x in STANDARD.items())
                and r["config"].get("fan") in STANDARD_FANS
                and r["config"].get("engine", {}).get("precision", "default") == precision):
            keep[r["variant"], r["framework"], r["protocol"], r["depth"], r["seed"], r["device"]] = r
    return list(keep.values())


def pick(rows, variant, protocol=None, framework="jax", depth=None) -> list[dict]:
    """The rows of one variant, optionally of one protocol, framework and depth, by seed."""
    return sorted((r for r in rows if r["variant"] == variant and r["framework"] == framework
                   and protocol in (None, r["protocol"]) and depth in (None, r["depth"])), key=lambda r: r["seed"])


def rate(rows) -> tuple[int, int, str]:
    """(runs that train, runs, 'k/n seeds' or 'not run')."""
    k, n = sum(r["trainable"] for r in rows), len(rows)
    return k, n, f"{k}/{n} seeds" if n else NOT_RUN


class Boundary(NamedTuple):
    deepest: int | None  # deepest k found to train (most seeds), None if none
    shallowest: int | None  # shallowest k found not to train, None if none
    next_depth: int | None = None  # the depth an unfinished search would train next


class _NotEvaluated(LookupError):
    pass


def boundary(rows, variant, protocol) -> Boundary | None:
    """flaxdepth's own boundary: the sweep's search (flaxdepth.search.boundary_search) replayed on
    the recorded depths, a depth trainable when most seeds train (rows of every device and seed
    pooled); where the search needs a depth with no rows it is unfinished, and its findings so far
    are returned with that depth. None where no search was run (no rows at k=3, which no notebook
    pair contains)."""
    by_depth = defaultdict(list)
    for r in pick(rows, variant, protocol):
        by_depth[r["depth"]].append(r)
    if 3 not in by_depth:
        return None
    trains = {d: 2 * rate(rs)[0] > len(rs) for d, rs in by_depth.items()}
    asked = []

    def recorded(depth):
        if depth not in trains:
            raise _NotEvaluated(depth)
        asked.append(depth)
        return trains[depth]

    # The deepest limit any of these runs was started with: a search resumed with a larger
    # --max-depth goes on where the smaller one stopped.
    max_depth = max(r["config"].get("max_depth", SweepConfig.max_depth) for rs in by_depth.values() for r in rs)
    try:
        return Boundary(*boundary_search(recorded, max_depth))
    except _NotEvaluated as missing:
        deepest = max((d for d in asked if trains[d]), default=None)
        failed = [d for d in asked if not trains[d] and (deepest is None or d > deepest)]
        return Boundary(deepest, min(failed, default=None), missing.args[0])


def boundary_text(b: Boundary | None) -> str:
    """'k=D / k=S' for a boundary from `boundary`, 'not run' for None, the next depth where unfinished."""
    if b is None:
        return NOT_RUN
    text = (f"k={b.deepest}" if b.deepest else "none trains") + " / " + (f"k={b.shallowest}" if b.shallowest
                                                                       else "none fails")
    return text if b.next_depth is None else f"{text} so far (search unfinished, next k={b.next_depth})"


def torch_agreement(rows, variant) -> str:
    """Torch rows against the jax rows of the same device, protocol, depth and seed: agreeing
    verdicts and the max |per-epoch train or test error difference| in percentage points."""
    jax = {(r["device"], r["protocol"], r["depth"], r["seed"]): r for r in pick(rows, variant)}
    pairs = defaultdict(list)
    for t in pick(rows, variant, framework="torch"):
        if (key := (t["device"], t["protocol"], t["depth"], t["seed"])) in jax:
            pairs[t["device"], t["depth"]].append((t, jax[key]))
    if not pairs:
        return NOT_RUN
    parts = []
    for (device, depth), ps in sorted(pairs.items(), key=lambda item: (item[0][1], item[0][0])):
        diff = max(abs(a - b) for t, j in ps for e in ("train_errors", "test_errors") for a, b in zip(t[e], j[e]))
        parts.append(f"k={depth} on {device.split(':')[0]}: verdicts agree "
                     f"{sum(t['trainable'] == j['trainable'] for t, j in ps)}/{len(ps)}, max diff {100 * diff:.2f} pp")
    return "; ".join(parts)


#: How the report names the rows of each --precision other than the default.
PRECISION_NAMES = {"highest": "in float32 (`--precision highest`)",
                   "tf32": "with TF32-rounded convolution operands (`--precision tf32`)"}


def precision_findings(files, default: list[dict]) -> list[str]:
    """One line per precision other than the default, variant, protocol and device: seeds that
    train per depth and framework, beside the default-precision rows (`default`,
    standard_rows(files)) of the same runs."""
    lines = []
    for precision, name in PRECISION_NAMES.items():
        others = standard_rows(files, precision)
        for variant, protocol, device in sorted({(r["variant"], r["protocol"], r["device"]) for r in others}):
            cells = []
            for depth in sorted({r["depth"] for r in others if (r["variant"], r["device"]) == (variant, device)}):
                for framework in ("jax", "torch"):
                    runs = [r for r in pick(others, variant, protocol, framework, depth) if r["device"] == device]
                    before = [r for r in pick(default, variant, protocol, framework, depth) if r["device"] == device]
                    if runs:
                        cells.append(f"k={depth} {framework} {rate(runs)[2]} (default precision: {rate(before)[2]})")
            lines.append(f"- {variant} ({protocol}) {name} on {device.split(':')[0]}: " + "; ".join(cells) + ".")
    return lines


def table(rows, all_rows) -> str:
    """The markdown table: one row per variant in registry order."""
    lines = ["| variant | lr | notebook: trainable k / untrainable k | faithful at trainable k | faithful at "
             "untrainable k | corrected at trainable k | corrected at untrainable k | flaxdepth boundary, "
             "faithful | flaxdepth boundary, corrected | torch vs jax |", "|" + " --- |" * 10]
    for v in registry.VARIANTS.values():
        cells = [v.name, f"{v.lr:g}", "{} / {}".format(*v.notebook_pair)]
        cells += [rate(pick(rows, v.name, "faithful", depth=k))[2] for k in v.notebook_pair]
        cells += [rate(pick(rows, v.name, "corrected", depth=k))[2] if v.batchnorm else "same (no BatchNorm)"
                  for k in v.notebook_pair]
        cells += [boundary_text(boundary(rows, v.name, "faithful")),
                  boundary_text(boundary(rows, v.name, "corrected")) if v.batchnorm else "same"]
        lines.append("| " + " | ".join(cells + [torch_agreement(all_rows, v.name)]) + " |")
    return "\n".join(lines)


def trainable_beyond(rows, variant, protocol, first_failure: int) -> list[str]:
    """'k=D (a/n seeds)' for each depth deeper than a search's first failure where most seeds train."""
    found = []
    for depth in sorted({r["depth"] for r in pick(rows, variant, protocol)}):
        trained, runs, cell = rate(pick(rows, variant, protocol, depth=depth))
        if depth > first_failure and 2 * trained > runs:
            found.append(f"k={depth} ({cell})")
    return found


def pair_finding(rows, v, protocol) -> str | None:
    """One line on a variant's verdicts at the notebook's pair under one protocol; None without data."""
    (kt, ku), found = v.notebook_pair, boundary(rows, v.name, protocol)
    search = boundary_text(found)
    (a, n, at), (b, m, au) = (rate(pick(rows, v.name, protocol, depth=k)) for k in (kt, ku))
    if n + m == 0 and search == NOT_RUN:
        return None
    differs = ([f"the notebook trained k={kt}, here {at} train"] if n and 2 * a <= n else []) + \
              ([f"the notebook failed at k={ku}, here {au} train"] if m and 2 * b > m else [])
    notes = [f"the deeper k={ku} trains more often than k={kt}: at these depths trainability depends on the "
             "seed more than on k"] if n and m and b * n > a * m else []
    if protocol == "corrected" and n and m and 2 * a > n and 2 * b > m and search == NOT_RUN:
        notes.append(f"with BatchNorm in train mode every epoch both depths train, so k={ku} is no depth limit "
                     "of this variant; its corrected boundary lies deeper")
    notes += [f"its own search puts the boundary at {search}"] if search != NOT_RUN else []
    beyond = trainable_beyond(rows, v.name, protocol, found.shallowest) if found and found.shallowest else []
    notes += [f"yet {', '.join(beyond)} beyond that first failure train{'s' * (len(beyond) == 1)}: the "
              "boundary is not sharp"] if beyond else []
    verdict = "differs from the notebook: " + "; ".join(differs) if differs else "agrees with the notebook"
    return f"- **{v.name}** ({protocol}; k={kt}: {at}, k={ku}: {au}) {verdict}" + "".join(f"; {s}" for s in notes) + "."


def quirk_depths(rows, v) -> list[int]:
    """Where to look for the eval-mode collapse: the notebook's pair, and the shallowest depth run
    under the faithful protocol (k=3 once a search ran), which shows whether it depends on depth."""
    shallowest = min((r["depth"] for r in pick(rows, v.name, "faithful")), default=v.notebook_pair[0])
    return sorted(set(v.notebook_pair) | {shallowest})


def percent_range(values) -> str:
    """'2.5-3.2%', or '90.2%' when all are equal to a tenth."""
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return f"{low}%" if low == high else f"{low}-{high}%"


def quirk_finding(rows, v, k, pct: float) -> str | None:
    """The eval-mode collapse (under the threshold after epoch 1, over it at the end) of a BatchNorm
    variant at depth k under the faithful protocol; None where no run shows it."""
    rs = pick(rows, v.name, "faithful", depth=k)
    fell = [r for r in rs if r["test_errors"][0] < pct / 100 <= r["test_errors"][-1]]
    if not fell:
        return None
    first, later = [100 * r["test_errors"][0] for r in fell], [100 * e for r in fell for e in r["test_errors"][1:]]
    return QUIRK.format(name=v.name, k=k, c=len(fell), n=len(rs), first=percent_range(first),
                        later=percent_range(later), corr=rate(pick(rows, v.name, "corrected", depth=k))[2])


def interpretation(rows, pct: float, all_rows, files) -> str:
    """Conditional text: where flaxdepth's verdicts differ from the notebook's, and the known causes."""
    lines = [pair_finding(rows, v, p) for v in registry.VARIANTS.values() for p in PROTOCOLS[:1 + v.batchnorm]]
    if not any(lines):
        return "No results yet: every cell of the table is \"not run\"."
    quirks = [quirk_finding(rows, v, k, pct) for v in registry.VARIANTS.values() if v.batchnorm
              for k in quirk_depths(rows, v)]
    torch = [f"- torch_ref vs flaxdepth, {v.name}: {agree}." for v in registry.VARIANTS.values()
             if (agree := torch_agreement(all_rows, v.name)) != NOT_RUN] + precision_findings(files, all_rows)
    multi = registry.get_variant("elu_multihead")
    causes = ["", "Known reasons the notebook's numbers can differ from flaxdepth's:", "",
              "- Each notebook row is a single unseeded run; flaxdepth trains several seeds (other initial weights "
              "and batch orders). Near the boundary one run can land either way.",
              "- The faithful protocol's eval-mode quirk, for BatchNorm variants: from epoch 2 on BatchNorm normalizes "
              "with running statistics and stops updating them, which can undo what epoch 1 learned."]
    causes += [f"  - {q}" for q in quirks if q] or ["  - No run here shows that collapse yet."]
    causes.append("  - Why (measured for elu_bn), and why not always: with its running statistics BatchNorm no "
                  "longer cancels what the conv biases and the weights' scale do to a layer's output, and the loss "
                  "becomes several times "
                  "sharper at the switch; at the notebook's lr that puts it at or past SGD-momentum's stability "
                  "limit 2 (1 + momentum) / lr, and the first eval-mode steps diverge in some runs and not in "
                  "others. Whether a run survives depends on its seed (and at depth on rounding), not on its "
                  "depth; float64 and TF32-rounded convolutions collapse alike, a smaller lr for the eval-mode "
                  "epochs alone trains them. Evidence: "
                  "[notes/elu_bn_eval_mode_collapse.md](notes/elu_bn_eval_mode_collapse.md); the frameworks at "
                  "the same weights and batch order: the torch vs jax rows above and "
                  "[notes/elu_bn_eval_mode_gpu_vs_cpu.md](notes/elu_bn_eval_mode_gpu_vs_cpu.md).")
    causes.append(f"- The multihead cells' `l = 0.05` typo: the notebook trained elu_multihead with lr {multi.lr:g}, "
                  f"and so does flaxdepth (so far: {rate(pick(rows, 'elu_multihead'))[2]}).")
    return "\n".join(line for line in lines + torch + causes if line is not None)


def what_was_run(files, results_link: str) -> str:
    """The results files with their row counts, and which sweeps.toml entries have results."""
    rows = standard_rows(files)
    used = {id(r) for r in rows}
    lines = ["| results file | rows | in table | framework | protocol | depths | seeds |", "|" + " --- |" * 7]
    for name, rs in files.items():
        col = lambda key: ", ".join(str(x) for x in sorted({r[key] for r in rs}))  # noqa: E731
        lines.append(f"| [{name}]({results_link}/{name}) | {len(rs)} | {sum(id(r) in used for r in rs)} | "
                     f"{col('framework')} | {col('protocol')} | {col('depth')} | {col('seed')} |")
    lines += ["", "Sweeps of `experiments/sweeps.toml` (variants with results / variants in the sweep):", ""]
    for e in tomllib.loads((HERE / "sweeps.toml").read_text())["sweep"]:
        names = registry.VARIANT_NAMES if e["variants"] == "all" else e["variants"]
        protocol, pair = "faithful" if e.get("notebook_quirks") else "corrected", e["depths"] == "notebook_pair"
        if "limit_train" in e:  # an entry of its own subset: the rows on that subset
            done = [n for n in names if subset_entry_rows(files, e, n)]
        elif all(n in DECLARED for n in names):  # declared variants: no notebook pair, their own subset
            done = [n for n in names if declared_rows(files, n)]
        else:
            entry_rows = standard_rows(files, e.get("precision", "default"))
            done = [n for n in names if any((r["depth"] in registry.get_variant(n).notebook_pair) == pair
                                            for r in pick(entry_rows, n, protocol, e.get("framework", "jax")))]
        lines.append(f"- `{e['name']}`: {len(done)}/{len(names)}" + (f" ({', '.join(done)})" if done else ""))
    return "\n".join(lines)


def declared_rows(files, variant: str) -> list[dict]:
    """The main folder's jax rows of a declared variant trained with its current spec."""
    spec = registry.get_variant(variant).fields()
    return [r for name, rs in files.items() if "/" not in name for r in rs
            if r["variant"] == variant and r["framework"] == "jax" and r.get("spec") == spec]


def declared_section(files, path: Path) -> str:
    """A table (and a figure) of experiments/variants.toml's variants: per depth, the seeds that
    train and their final errors, on the subset each was trained on."""
    table_rows, plotted = [], {}
    for name in (n for n in DECLARED if n not in FRONTIER_VARIANTS):  # those have a section of their own
        rows = declared_rows(files, name)
        plotted[name] = rows
        if not rows:
            table_rows.append(f"| {name} | {registry.get_variant(name).description} | {NOT_RUN} | |")
            continue
        c = rows[0]["config"]
        setup = (f"{c['limit_train'] or 60000} / {c['limit_test'] or 10000} images, {c['epochs']} epochs, "
                 f"lr {rows[0]['lr']:g}")
        cells = []
        for depth in sorted({r["depth"] for r in rows}):
            at = sorted((r for r in rows if r["depth"] == depth), key=lambda r: r["seed"])
            errors = ", ".join(f"{100 * final_error(r):.1f}%" for r in at)
            cells.append(f"k={depth}: {rate(at)[2]} ({errors})")
        table_rows.append(f"| {name} | {registry.get_variant(name).description} | {setup} | {'<br>'.join(cells)} |")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in plotted.items():
        depths = sorted({r["depth"] for r in rows})
        if depths:
            ax.plot(depths, [100 * sum(final_error(r) for r in rows if r["depth"] == d) /
                             sum(r["depth"] == d for r in rows) for d in depths], marker="o", label=name)
    ax.axhline(20, color="k", ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="depth k", ylabel="final error, mean over seeds [%]", ylim=(-3, 103),
           title="experiments/variants.toml: final error against depth (CPU subset)")
    ax.grid(alpha=0.3)
    _not_run(ax, [r for rows in plotted.values() for r in rows])
    if any(plotted.values()):
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(["| variant | what | trained on | seeds that train (final error per seed) |",
                      "|" + " --- |" * 4] + table_rows)


class Measured(NamedTuple):
    deepest: int | None  # deepest k where most seeds train
    shallowest: int | None  # shallowest k beyond `deepest` where most seeds fail
    text: str


def measured_limit(rows, files, name: str) -> Measured:
    """A variant's measured depth limit: the replayed boundary search for the notebook's variants
    (no BatchNorm: the faithful rows), the depths run on a subset for experiments/variants.toml's."""
    if name not in DECLARED:
        found = boundary(rows, name, "faithful")
        return Measured(None, None, NOT_RUN) if found is None else Measured(found.deepest, found.shallowest,
                                                                            boundary_text(found))
    runs = declared_rows(files, name)
    depths = sorted({r["depth"] for r in runs})
    if not depths:
        return Measured(None, None, NOT_RUN)
    trains = {d: 2 * rate([r for r in runs if r["depth"] == d])[0] > sum(r["depth"] == d for r in runs) for d in depths}
    deepest = max((d for d in depths if trains[d]), default=None)
    shallowest = min((d for d in depths if not trains[d] and (deepest is None or d > deepest)), default=None)
    text = (f"k={deepest} trains" if deepest else "none trains") + (f", k={shallowest} fails" if shallowest else "")
    return Measured(deepest, shallowest, f"{text} (of k = {', '.join(map(str, depths))}; subset)")


def theory_verdict(prediction: theory.VariantPrediction, measured: Measured) -> str:
    """Where the predicted k lies against the measured limit."""
    k = prediction.predicted_k
    if measured.text == NOT_RUN:
        return NOT_RUN
    if math.isnan(k):
        return "a stage's variance explodes: no prediction"
    if math.isinf(k):
        return "no depth limit predicted (every stage critical)" + (
            f"; the failure at k={measured.shallowest} comes from outside the theory" if measured.shallowest else "")
    if measured.deepest is not None and k < measured.deepest:
        return f"trains deeper than predicted (k={measured.deepest} > {k:.3g})"
    if measured.shallowest is not None and k >= measured.shallowest:
        return f"fails shallower than predicted (k={measured.shallowest} <= {k:.3g})"
    return "prediction within the measured bracket"


def _number(x: float) -> str:
    return "inf" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.3g}")


def theory_section(rows, files, path: Path) -> str:
    """Mean-field predictions (flaxdepth.theory) of every registered variant the theory covers,
    per stage, beside flaxdepth's measured limit; the variants it does not cover; a figure."""
    predictions = [theory.predict_variant(name) for name in registry.variant_names()]
    covered = [p for p in predictions if p.applies]
    measured = {p.variant: measured_limit(rows, files, p.variant) for p in covered}
    lines = ["| variant | activation, init | sigma_w^2 per stage | sigma_b^2 | phase per stage | chi_1 per stage | "
             "6 xi_c per stage (layers) | predicted k (3 x smallest 6 xi_c) | measured | theory vs measured |",
             "|" + " --- |" * 10]
    for p in covered:
        spec = registry.get_variant(p.variant)
        fields = [s.mean_field for s in p.stages]
        init = spec.init + (f" {spec.init_std:g}" if spec.init == "normal" else "")
        lines.append("| " + " | ".join([
            p.variant, f"{spec.activation}, {init}", " / ".join(f"{f.sigma_w2:.3g}" for f in fields),
            f"{spec.bias_std ** 2:g}", " / ".join(f.phase for f in fields), " / ".join(_number(f.chi_1) for f in fields),
            " / ".join(_number(f.predicted_depth) for f in fields), _number(p.predicted_k), measured[p.variant].text,
            theory_verdict(p, measured[p.variant])]) + " |")
    outside = [f"{p.variant} ({p.reason})" for p in predictions if not p.applies]
    fig_theory_vs_measured(covered, measured, path)
    return "\n\n".join(["\n".join(lines), "Outside the theory: " + "; ".join(outside) + ".",
                        theory_reading(covered, measured)])


def theory_reading(covered, measured: dict[str, Measured]) -> str:
    """Where prediction and measurement differ and why, from the predictions' phases."""
    def limits(ps):
        return "; ".join(f"{p.variant}: {measured[p.variant].text}" for p in ps)
    critical = [p for p in covered if all(s.mean_field.phase == "critical" for s in p.stages)]
    ordered = [p for p in covered if all(s.mean_field.phase == "ordered" for s in p.stages)]
    chaotic = [p for p in covered if any(s.mean_field.phase == "chaotic" for s in p.stages)]
    widths = sorted({s.channels for p in covered for s in p.stages})
    lines = ["Reading:", ""]
    if ordered:
        lines.append(
            f"- Ordered stages ({limits(ordered)}): correlations between inputs converge to 1 and gradients "
            "shrink by chi_1 a layer, so the theory sets a real limit: the network stops training once its stage "
            "of smallest xi_c holds about 6 xi_c layers ("
            + "; ".join(f"{p.variant}: stage {s.stage}, {s.channels} channels, sigma_w^2 = {s.mean_field.sigma_w2:.3g}"
                        for p in ordered for s in [min(p.stages, key=lambda s: s.mean_field.xi_c)])
            + "; with a fixed std s, sigma_w^2 = 9 C s^2 is smallest in the narrowest stage).")
    if critical:
        zero = [p for p in critical if all(s.mean_field.q_star == 0 for s in p.stages)]
        lines.append(
            f"- Critical stages ({limits(critical)}): xi_c diverges, so the theory sets no depth limit and the "
            "measured one comes from what it leaves out (below)."
            + (f" For {', '.join(p.variant for p in zero)} q* = 0 (sigma_b = 0 and phi(0) = 0): the forward "
               "variance decays polynomially with depth instead of settling (tanh: q_l ~ 1 / (2 l)), so deep layers "
               "work on ever smaller signals, which the depth scales do not measure." if zero else ""))
    multihead = [p.variant for p in covered if registry.get_variant(p.variant).multihead]
    if multihead:
        lines.append(f"- {', '.join(multihead)}: a loss head after every stage gives each stage's layers a gradient "
                     "path of their own, which the theory does not model; it describes the layers, the same as those of "
                     "the single-head variant with this activation and init.")
    if chaotic:
        lines.append(
            f"- Chaotic stages ({limits(chaotic)}): chi_1 > 1, gradients grow by chi_1 a layer and nearby inputs "
            "decorrelate over xi_c layers. A limit far below 6 xi_c has another cause.")
    lines += [
        "",
        "Why the two can differ, for every row: the theory describes infinitely wide stacks of identical layers "
        f"at initialization. These networks have {' to '.join(map(str, (widths[0], widths[-1])))} channels (fan-in "
        f"{9 * widths[0]}-{9 * widths[-1]}); the fluctuations of the per-layer variance around the mean-field map "
        "grow with depth / width (Hanin & Nica, \"Products of many large random matrices and gradients in deep "
        "neural networks\"), which at this width and tens of layers is far from small. Each stage begins with a "
        "conv from fewer channels (from the 1-channel image in stage 0) whose sigma_w^2 differs from the stage's "
        "(`first_layer_sigma_w2` in `python -m flaxdepth.theory --variant NAME --json`), and 2x2 average pooling "
        "between stages divides the variance by 1 to 4 depending on how correlated neighbouring pixels are; the "
        "table uses each stage's same-width layers alone. \"Trainable\" here is under 20% error after three epochs "
        "of SGD with momentum at a fixed learning rate, not Schoenholz et al.'s criterion; their 6 xi_c is itself "
        "an empirical fit on fully connected networks. The declared variants were trained on a subset of MNIST at "
        "a few depths (their section above), so their brackets are coarse.",
        "",
        "![theory against measurement](figures/theory_vs_measured.png)"]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def critical_line(activation: str) -> tuple[tuple[float, float], ...]:
    """(critical sigma_w^2, sigma_b^2) for sigma_b^2 = 0, 0.01, ..., 0.3 where the activation has one."""
    biases = [0.01 * i for i in range(31)]
    return tuple((w, b) for b in biases if (w := theory.critical_sigma_w2(activation, b)) is not None)


def fig_theory_vs_measured(covered, measured: dict[str, Measured], path: Path) -> None:
    """Left: per variant, the predicted k and each stage's 3 x 6 xi_c against the measured limit.
    Right: the variants' stages on the (sigma_w^2, sigma_b^2) plane with their activations' critical lines."""
    fig = Figure(figsize=(14, 5.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    top = 3000
    for i, p in enumerate(covered):
        m = measured[p.variant]
        if m.deepest:
            left.scatter(i, m.deepest, marker="o", color="tab:blue", zorder=3)
        if m.shallowest:
            left.scatter(i, m.shallowest, marker="x", color="tab:blue", s=60, zorder=3)
        if m.deepest and m.shallowest:
            left.plot([i, i], [m.deepest, m.shallowest], color="tab:blue", lw=2)
        stage_ks = [3 * s.mean_field.predicted_depth for s in p.stages]
        for k in stage_ks:
            left.scatter(i + 0.15, min(k, top), marker="^" if k >= top else ".", color="tab:red", alpha=0.5)
        if math.isfinite(p.predicted_k):
            left.scatter(i + 0.15, p.predicted_k, marker="D", color="tab:red", zorder=3)
        else:
            left.annotate("critical: no limit", (i + 0.15, top), xytext=(0, -14), textcoords="offset points",
                          ha="center", fontsize=7, color="tab:red")
    left.set(yscale="log", ylim=(1, top * 1.3), xlim=(-0.6, len(covered) - 0.4), ylabel="depth k",
             title="Mean-field predicted k (red) against the measured limit (blue)")
    left.set_xticks(range(len(covered)), [p.variant + (" (subset)" if p.variant in DECLARED else "") for p in covered],
                    rotation=25, ha="right", fontsize=8)
    left.grid(alpha=0.3)
    handles = [left.scatter([], [], marker="D", color="tab:red", label="predicted k = 3 x smallest 6 xi_c"),
               left.scatter([], [], marker=".", color="tab:red", alpha=0.5, label="3 x 6 xi_c of each stage"),
               left.scatter([], [], marker="o", color="tab:blue", label="deepest k that trains"),
               left.scatter([], [], marker="x", color="tab:blue", label="shallowest k that fails beyond it")]
    left.legend(handles=handles, fontsize=7.5, loc="lower right")
    activations = sorted({p.stages[0].mean_field.activation for p in covered})
    colors = dict(zip(activations, ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")))
    critical_lines = {name: critical_line(name) for name in activations}
    for name, line in critical_lines.items():
        if len(line) > 1:
            right.plot(*zip(*line), color=colors[name], label=f"{name}: critical line (chi_1 = 1)")
        elif line:
            right.scatter(*line[0], marker="*", s=150, color=colors[name], label=f"{name}: critical point")
    # stages at the same (sigma_w^2, sigma_b^2): one marker per activation side by side, one label
    groups = defaultdict(list)
    for p in covered:
        for stage in p.stages:
            f = stage.mean_field
            groups[round(f.sigma_w2, 9), round(f.sigma_b2, 9)].append((f.activation, p.variant, stage.stage))
    for (w, b), members in groups.items():
        for j, name in enumerate(sorted({m[0] for m in members})):
            shift = offset_copy(right.transData, fig=fig, x=9 * j, units="points")
            right.scatter(w, b, transform=shift, color=colors[name], s=40, zorder=3)
        names = defaultdict(list)
        for _, variant, stage in members:
            names[variant].append(str(stage))
        label = "\n".join(f"{v} (stage {', '.join(st)})" if len(st) < 3 else v for v, st in names.items())
        right.annotate(label, (w, b), xytext=(0, 10), textcoords="offset points", rotation=90, ha="center",
                       va="bottom", fontsize=7)
    # offset markers do not enter autoscaling: the limits cover every stage and critical line
    spread = [w for w, _ in groups] + [w for line in critical_lines.values() for w, _ in line]
    right.set(xscale="log", xlim=(min(spread) / 1.5, max(spread) * 1.5), ylim=(-0.01, 0.3),
              xlabel="sigma_w^2 of a stage's same-width layers", ylabel="sigma_b^2",
              title="Stages (dots, by activation): ordered left of the critical line")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: The depth frontier: experiments/sweeps.toml's CPU entry, the sub-folder of the results into which
#: experiments/gpu_frontier.sh's files are copied, the per-layer diagnostics at init of the deepest
#: networks (python -m flaxdepth.diagnose --steps 0, diagnostics.json as VARIANT_kK.json), and its
#: inits: the critical ones (experiments/variants.toml), then the notebook's controls.
FRONTIER_ENTRY = "frontier-cpu"
FRONTIER_GPU = "gpu_frontier"
FRONTIER_INIT = "frontier_init"
FRONTIER_VARIANTS = ("tanh_critical_delta", "tanh_critical_delta_wide", "tanh_critical_gaussian", "tanh_newinit",
                     "tanh")
FRONTIER_COLOR = dict(zip(FRONTIER_VARIANTS, ("tab:green", "tab:olive", "tab:purple", "tab:blue", "tab:red")))


def current_spec(row) -> bool:
    """A built-in's row, or a declared variant's trained with its current spec."""
    return row["variant"] not in DECLARED or row.get("spec") == registry.get_variant(row["variant"]).fields()


def subset_entry_rows(files, entry: dict, variant: str) -> list[dict]:
    """The main folder's jax rows of a sweeps.toml entry that trains on a subset (limit_train): the
    variant's, on the entry's subset, epochs and batch size, at the entry's depths and lrs."""
    lrs = entry.get("lr_at_depth")
    return [r for name, rs in files.items() if "/" not in name for r in rs
            if r["variant"] == variant and r["framework"] == "jax" and current_spec(r)
            and all(r["config"].get(key) == entry.get(key, default) for key, default in
                    (("limit_train", None), ("limit_test", None), ("epochs", 3), ("batch_size", 256)))
            and (not isinstance(entry["depths"], list) or r["depth"] in entry["depths"])
            and (lrs is None or r["lr"] == lrs.get(str(r["depth"])))
            and ("lrs" not in entry or r["lr"] in entry["lrs"])]


def setup_text(row) -> str:
    """What a frontier row was trained on, in words; its lr as c / k (c to one decimal: the lrs are
    c / k rounded to two significant digits)."""
    c = row["config"]
    images = (f"the first {c['limit_train']:,} training / {c['limit_test']:,} test images" if c["limit_train"]
              else "full MNIST")
    return (f"{row['device']}, {images}, {c['epochs']} epochs in batches of {c['batch_size']}, "
            f"lr = {round(row['lr'] * row['depth'], 1):g} / k")


def frontier_rows(files) -> dict[str, list[dict]]:
    """The frontier's rows by setup (setup_text): the CPU entry's, then experiments/gpu_frontier.sh's."""
    entry = next(e for e in tomllib.loads((HERE / "sweeps.toml").read_text())["sweep"] if e["name"] == FRONTIER_ENTRY)
    rows = [r for v in entry["variants"] for r in subset_entry_rows(files, entry, v)]
    rows += [r for name, rs in files.items() if name.startswith(f"{FRONTIER_GPU}/") for r in rs
             if r["variant"] in FRONTIER_VARIANTS and r["framework"] == "jax" and current_spec(r)]
    by_setup = defaultdict(list)
    for r in rows:
        by_setup[setup_text(r)].append(r)
    return dict(by_setup)


def _ratio(a: float, b: float) -> str:
    """a / b, where float32 underflow can make either zero."""
    if b == 0:
        return "0 / 0 (both underflow)" if a == 0 else "inf"
    return f"{a / b:.2g}"


def init_diagnostics(results_dir: Path) -> list[tuple[Path, dict]]:
    """The frontier's committed diagnostics files (python -m flaxdepth.diagnose's diagnostics.json)."""
    return [(path, json.loads(path.read_text())) for path in sorted((results_dir / FRONTIER_INIT).glob("*.json"))]


def init_signal(diagnostics: list[tuple[Path, dict]], results_link: str) -> list[str]:
    """One line per diagnostics file: how the loss's gradient with respect to each conv's output, at
    init, changes from the last conv to the first, over the network and per stage."""
    lines = []
    for path, d in diagnostics:
        layers = d["steps"][0]["layers"]
        grads = [layer["output_grad_norm"] for layer in layers]
        per_stage = []
        for stage in sorted({layer["stage"] for layer in layers}):
            g = [x for x, layer in zip(grads, layers) if layer["stage"] == stage]
            per_stage.append(_ratio(g[0], g[-1]))
        variances = [layer["pre_activation_variance"] for layer in layers]
        lines.append(f"- {d['config']['variant']} at k={d['config']['depth']} ([{path.name}]({results_link}/"
                     f"{FRONTIER_INIT}/{path.name}), on {d['probe']}): gradient at the first conv / at the last "
                     f"{_ratio(grads[0], grads[-1])} (per stage, the stage's first conv / its last: "
                     f"{', '.join(per_stage)}); "
                     f"{sum(g == 0 for g in grads)} of {len(grads)} convs' gradients underflow to 0; "
                     f"pre-activation variance {min(variances):.2g} to {max(variances):.2g}.")
    return lines


def fig_frontier_init(diagnostics: list[tuple[Path, dict]], path: Path) -> None:
    """Per conv layer at init, one line per diagnostics file: the loss's gradient with respect to
    the conv's output and the pre-activation variance (log scales; zeros, float32 underflow, left out)."""
    fig = Figure(figsize=(12, 4.4))
    grad_ax, var_ax = fig.subplots(1, 2)
    for _, d in diagnostics:
        layers = d["steps"][0]["layers"]
        label = f"{d['config']['variant']} k={d['config']['depth']}"
        color = FRONTIER_COLOR.get(d["config"]["variant"])
        for ax, key in ((grad_ax, "output_grad_norm"), (var_ax, "pre_activation_variance")):
            points = [(i, layer[key]) for i, layer in enumerate(layers) if layer[key]]
            ax.plot([i for i, _ in points], [x for _, x in points], color=color, lw=1, label=label)
    grad_ax.set(yscale="log", xlabel="conv layer (network order)", ylabel="|d loss / d conv output|",
                title="Gradient at initialization")
    var_ax.set(yscale="log", xlabel="conv layer (network order)", ylabel="pre-activation variance",
               title="Forward signal at initialization")
    for ax in (grad_ax, var_ax):
        ax.grid(alpha=0.3)
        if diagnostics:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def frontier_intro() -> str:
    """What the frontier trains, its critical point read from the spec."""
    spec = registry.get_variant(FRONTIER_VARIANTS[0])
    point = theory.mean_field(spec.activation, spec.init_gain ** 2, spec.bias_std ** 2)
    return ("The notebook's tanh network (no normalization, no skip) from k = 30 to thousands of layers under "
            "four initializations: delta-orthogonal and Gaussian weights at one critical point of the mean-field "
            f"theory (`experiments/variants.toml`: sigma_b^2 = {point.sigma_b2:.2g}, sigma_w^2 = {point.sigma_w2:.5g}, "
            f"chi_1 = {point.chi_1:.6g}, q* = {point.q_star:.2g}; why this point: there), and the notebook's naive "
            "and Glorot-style inits as controls; a 16-32-64-channel version of the delta-orthogonal one where a GPU "
            "trains it. Each depth's lr is the same for every init (the lr columns; why: `sweeps.toml`'s "
            "`frontier-cpu`). On the 2-core CPU on a subset (`python experiments/run.py --only frontier-cpu`); on "
            "a GPU on full MNIST (`experiments/gpu_frontier.sh`, its files in `results/gpu_frontier/`). Cells: "
            "seeds that train (final error, the smaller of the last train and test errors, per seed). What was "
            "measured and tried along the way: [notes/depth_frontier.md](notes/depth_frontier.md).")


def frontier_section(files, results_dir: Path, results_link: str, path: Path, pct: float) -> str:
    """Final error against depth per init and setup (a table per setup and the figure `path`), the
    deepest network trained, the signal at init of the deepest (frontier_init_gradients.png beside
    `path`), and a reading."""
    by_setup = frontier_rows(files)
    parts, trained = [], []
    for setup, rows in by_setup.items():
        depths = sorted({r["depth"] for r in rows})
        lrs = {d: ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in rows if r["depth"] == d})) for d in depths}
        lines = [f"**{setup}**", "", "| init | " + " | ".join(f"k={d} (lr {lrs[d]})" for d in depths) + " |",
                 "|" + " --- |" * (len(depths) + 1)]
        for v in (v for v in FRONTIER_VARIANTS if any(r["variant"] == v for r in rows)):
            cells = []
            for d in depths:
                at = sorted((r for r in rows if r["variant"] == v and r["depth"] == d), key=lambda r: r["seed"])
                errors = ", ".join(f"{100 * final_error(r):.1f}%" for r in at)
                cells.append(f"{rate(at)[2]} ({errors})" if at else NOT_RUN)
                if at and 2 * rate(at)[0] > len(at):
                    trained.append((d, v, setup))
            lines.append(f"| {v}: {registry.get_variant(v).description} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    fig_depth_frontier(by_setup, path, pct)
    naive = registry.VARIANTS["tanh"]
    reading = ["Reading:", ""]
    if trained:
        k, v, setup = max(trained)
        reading.append(f"- The deepest network trained (most seeds under {pct:g}%): {v} at k={k} ({setup}); the "
                       f"notebook's naive tanh network trains at k={naive.notebook_pair[0]} and fails at "
                       f"k={naive.notebook_pair[1]}.")
    else:
        reading.append(f"- No frontier run trained (most seeds under {pct:g}%).")
    for setup, rows in by_setup.items():
        runs = defaultdict(list)
        for r in rows:
            runs[r["variant"], r["depth"]].append(r)
        mean = {key: sum(final_error(r) for r in at) / len(at) for key, at in runs.items()}
        best = {d: min((v for v, dd in mean if dd == d), key=lambda v: mean[v, d]) for _, d in mean}
        depths = sorted(best)
        if len(set(best.values())) == 1 and len(depths) > 1:
            v = best[depths[0]]
            others = ", ".join(f"{w} {100 * mean[w, depths[-1]]:.1f}%" for w in FRONTIER_VARIANTS
                               if w != v and (w, depths[-1]) in mean)
            reading.append(f"- {setup}: the lowest error at every depth is {v}'s, {100 * mean[v, depths[0]]:.1f}% at "
                           f"k={depths[0]} to {100 * mean[v, depths[-1]]:.1f}% at k={depths[-1]} (at k={depths[-1]}: "
                           f"{others}).")
        if rows[0]["config"]["limit_train"] and not any(s == setup for _, _, s in trained):
            reading.append(f"- {setup}: no run gets under {pct:g}% at any depth, the shallowest included: this "
                           "subset's few SGD steps are far less training than the notebook's 3 epochs of full MNIST, "
                           "so these rows say how fast each init starts to learn at each depth, not the deepest "
                           "that trains ([notes/depth_frontier.md](notes/depth_frontier.md)).")
        for v in (v for v in FRONTIER_VARIANTS if any(r["variant"] == v for r in rows)
                  and any(s == setup for _, _, s in trained)):
            trains = sorted(d for d, w, s in trained if w == v and s == setup)
            fails = sorted({r["depth"] for r in rows if r["variant"] == v} - set(trains))
            reading.append(f"- {v} ({setup}): trains at " + (", ".join(f"k={d}" for d in trains) or "no depth")
                           + "; fails at " + (", ".join(f"k={d}" for d in fails) or "no depth") + ".")
    diagnostics = init_diagnostics(results_dir)
    fig_frontier_init(diagnostics, path.with_name("frontier_init_gradients.png"))
    signal = init_signal(diagnostics, results_link)
    if signal:
        reading += ["", "The signal at initialization of the deepest CPU networks (`python -m flaxdepth.diagnose "
                    "--steps 0`; figures below): the loss's gradient with respect to "
                    "each conv's output, and the pre-activation variance:", ""] + signal
    return "\n\n".join(parts) + "\n\n" + "\n".join(reading)


def fig_depth_frontier(by_setup: dict[str, list[dict]], path: Path, pct: float) -> None:
    """Final error against depth (log axis), one colour per init, one line style per setup (a marker
    per seed, the line through the means); the notebook's failure of naive tanh, the threshold and
    the deepest network trained are marked."""
    fig = Figure(figsize=(9, 6.4))
    ax = fig.subplots()
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    best, handles, inits = None, [], []
    for (setup, rows), ls, marker in zip(by_setup.items(), styles, markers):
        handles.append(Line2D([], [], color="0.3", ls=ls, marker=marker, label=setup))
        for v in (v for v in FRONTIER_VARIANTS if any(r["variant"] == v for r in rows)):
            runs = [r for r in rows if r["variant"] == v]
            depths = sorted({r["depth"] for r in runs})
            ax.scatter([r["depth"] for r in runs], [100 * final_error(r) for r in runs], color=FRONTIER_COLOR[v],
                       marker=marker, s=22, alpha=0.7)
            means = [100 * sum(final_error(r) for r in runs if r["depth"] == d) / sum(r["depth"] == d for r in runs)
                     for d in depths]
            ax.plot(depths, means, ls=ls, color=FRONTIER_COLOR[v])
            inits += [v] if v not in inits else []
            for r in runs:
                if final_error(r) < r["config"]["threshold"] and (best is None or r["depth"] > best["depth"]):
                    best = r
    handles += [Line2D([], [], color=FRONTIER_COLOR[v], lw=3, label=v) for v in FRONTIER_VARIANTS if v in inits]
    naive = registry.VARIANTS["tanh"]
    handles.append(ax.axvline(naive.notebook_pair[1], color="tab:red", ls=":", lw=1.2,
                              label=f"notebook (full MNIST, 3 epochs): naive tanh fails at k={naive.notebook_pair[1]}"))
    handles.append(ax.axhline(pct, color="k", ls="--", lw=0.8, label=f"threshold {pct:g}%"))
    if best is not None:
        handles.append(ax.scatter([best["depth"]], [100 * final_error(best)], marker="*", s=260, color="gold",
                                  edgecolors="k", zorder=5,
                                  label=f"deepest trained: {best['variant']} k={best['depth']} ({setup_text(best)})"))
    ax.set(xscale="log", xlabel="depth k (log scale)", ylabel="final error, min(train, test) [%]", ylim=(-3, 103),
           title="Depth frontier of the tanh CNN: final error against depth per init")
    ax.grid(alpha=0.3)
    if not by_setup:
        ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=12)
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * math.ceil(len(handles) / 2), 1, 1))
    fig.savefig(path, dpi=110)


def hardware(files) -> str:
    """Per sweep (one results file): device, versions, wall time as the sum of wall_s over its runs."""
    lines = ["| sweep (results file) | runs | device | devices | runs trained together | wall time | finished | "
             "versions |", "|" + " --- |" * 8]
    for name, rs in files.items():
        col = lambda key: ", ".join(sorted({str(r[key]) for r in rs}))  # noqa: E731
        versions = {", ".join(f"{k} {x}" for k, x in sorted(r["versions"].items()) if x) for r in rs}
        done = sorted(r["finished_at"][:16] for r in rs)
        lines.append(f"| {name} | {len(rs)} | {col('device')} | {col('device_count')} | "
                     f"{col('replicas_trained_together')} | {sum(r['wall_s'] for r in rs):.1f} s | "
                     f"{done[0]} to {done[-1]} | {'; '.join(sorted(versions))} |")
    total = sum(r["wall_s"] for rs in files.values() for r in rs)
    return "\n".join(lines) + f"\n\nTotal: {sum(map(len, files.values()))} runs, {total:.1f} s of training."


def _not_run(ax, rs) -> None:
    """Write 'not run' across an axis without data."""
    if not rs:
        ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=12)


def fig_error_vs_depth(rows, path: Path, pct: float) -> None:
    """Final error against depth per variant: a marker per seed, colour/shape per protocol, torch hollow."""
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.6), sharey=True)
    for ax, v in zip(axes.flat, registry.VARIANTS.values()):
        rs = [r for r in rows if r["variant"] == v.name]
        depths = [r["depth"] for r in rs] + list(v.notebook_pair)
        pad = 0.15 * (max(depths) - min(depths)) + 3
        ax.set(xlim=(min(depths) - pad, max(depths) + pad), ylim=(-3, 103), title=f"{v.name} (lr {v.lr:g})")
        ax.axvline(v.notebook_pair[0], color="tab:green", ls="--", lw=1.2)
        ax.axvline(v.notebook_pair[1], color="tab:red", ls=":", lw=1.2)
        ax.axhline(pct, color="k", ls="--", lw=0.8)
        for r in rs:
            shift = offset_copy(ax.transData, fig=fig, x=6 * (r["seed"] % 3 - 1), units="points")
            ax.scatter(r["depth"], 100 * final_error(r), transform=shift, marker=MARKER[r["protocol"]], s=34,
                       facecolors="none" if r["framework"] == "torch" else COLOR[r["protocol"]],
                       edgecolors=COLOR[r["protocol"]])
        _not_run(ax, rs)
        ax.grid(alpha=0.3)
    [ax.set_xlabel("depth k") for ax in axes[1]]
    [ax.set_ylabel("final error, min(train, test) [%]") for ax in axes[:, 0]]
    handles = [plt.Line2D([], [], ls="", marker=MARKER[p], color=COLOR[p], mfc=mfc, label=f"{p}, {fw}")
               for p in PROTOCOLS for fw, mfc in (("jax", COLOR[p]), ("torch", "none"))]
    handles += [plt.Line2D([], [], color="k", ls="--", lw=0.8, label=f"threshold {pct:g}%"),
                plt.Line2D([], [], color="tab:green", ls="--", label="notebook: deepest trainable k"),
                plt.Line2D([], [], color="tab:red", ls=":", label="notebook: shallowest untrainable k")]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=9, frameon=False)
    fig.suptitle("Final error against depth, one marker per seed (seeds side by side)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_boundaries(rows, path: Path) -> None:
    """Deepest trainable k per variant: the notebook's (grey), flaxdepth's search per protocol (solid),
    or, with only the pair evaluated, the deepest pair depth where most seeds train (hatched)."""
    fig, ax = plt.subplots(figsize=(12, 8))
    n = len(registry.VARIANTS)
    for i, v in enumerate(registry.VARIANTS.values()):
        y, (kt, ku) = n - 1 - i, v.notebook_pair
        ax.barh(y + 0.27, kt, height=0.25, color="0.6")
        ax.text(kt + 2, y + 0.27, f"notebook: k={kt} trains, k={ku} fails", va="center", fontsize=7.5)
        for yy, p in ((y, "faithful"), (y - 0.27, "corrected")):
            rates, end = {k: rate(pick(rows, v.name, p, depth=k)) for k in (kt, ku)}, 0
            if p == "corrected" and not v.batchnorm:
                label = "corrected: same as faithful (no BatchNorm)"
            elif (found := boundary(rows, v.name, p)) is not None:
                end = found.deepest or 0  # an unfinished search: pale, its boundary may lie deeper
                ax.barh(yy, end, height=0.25, color=COLOR[p], alpha=1.0 if found.next_depth is None else 0.4)
                label = f"{p} search: {boundary_text(found)}"
            else:
                end = max((k for k, (a, m, _) in rates.items() if m and 2 * a > m), default=0)
                ax.barh(yy, end, height=0.25, color="none", edgecolor=COLOR[p], hatch="///")
                ran = [f"k={k} {cell}" for k, (_, m, cell) in rates.items() if m]
                label = f"{p}: " + (", ".join(ran) + " (pair only, no search)" if ran else NOT_RUN)
            ax.text(end + 2, yy, label, va="center", fontsize=7.5, color=COLOR[p])
    ax.set_yticks(range(n), list(reversed(registry.VARIANT_NAMES)))
    right = 1.6 * max(v.notebook_pair[1] for v in registry.VARIANTS.values())
    ax.set(xlabel="deepest trainable depth k", xlim=(0, right),
           title="Boundaries: notebook vs flaxdepth (a depth trains when most seeds do)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=text) for c, text in (
        ("0.6", "notebook (one unseeded run)"), (COLOR["faithful"], "flaxdepth search, faithful"),
        (COLOR["corrected"], "flaxdepth search, corrected"))]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="0.3", alpha=0.4,
                                 label="search unfinished: deepest k trained so far"))
    handles.append(plt.Rectangle((0, 0), 1, 1, fc="none", ec="k", hatch="///",
                                 label="pair only: deepest pair depth where most seeds train"))
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collapse_figure(path: Path) -> list[str]:
    """The eval-mode collapse's knobs figure (drawn by experiments/eval_mode_collapse.py --plot),
    with its caption, where it exists."""
    if not path.is_file():
        return []
    return ["elu_bn at k=3 under the notebook's protocol, one knob at a time (torch_ref from flaxdepth's weights "
            "and batch order, `experiments/eval_mode_collapse.py`): left, the loss of every step of the first "
            "eval-mode epoch; right, the test error after it against the sharpness at the switch over "
            "SGD-momentum's stability limit (crosses: weights no longer finite). Details in "
            "[notes/elu_bn_eval_mode_collapse.md](notes/elu_bn_eval_mode_collapse.md).",
            f"![eval-mode collapse, one knob at a time](figures/{path.name})"]


def fig_epoch_curves(rows, path: Path, pct: float) -> None:
    """Per-epoch test error at the notebook's pair for BatchNorm variants, both protocols."""
    bn = [v for v in registry.VARIANTS.values() if v.batchnorm]
    fig, axes = plt.subplots(1, len(bn), figsize=(5.2 * len(bn), 4.4), sharey=True)
    for ax, v in zip(axes, bn):
        rs = []
        for p in PROTOCOLS:
            for k, ls, fill in zip(v.notebook_pair, ("-", "--"), (COLOR[p], "white")):
                for j, r in enumerate(pick(rows, v.name, p, depth=k)):
                    rs.append(r)
                    ax.plot(range(1, len(r["test_errors"]) + 1), [100 * e for e in r["test_errors"]], ls=ls,
                            marker=MARKER[p], mfc=fill, color=COLOR[p], alpha=0.8, label=None if j else f"{p}, k={k}")
        ax.axhline(pct, color="k", ls=":", lw=0.8)
        _not_run(ax, rs)
        epochs = max((len(r["test_errors"]) for r in rs), default=3)
        ax.set(title=f"{v.name}, notebook pair k={v.notebook_pair[0]}/{v.notebook_pair[1]}", xlabel="epoch",
               ylim=(-3, 103), xlim=(0.8, epochs + 0.2), xticks=range(1, epochs + 1))
        ax.grid(alpha=0.3)
        if rs:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("test error [%] (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """Read the results, write the figures and REPORT.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of *.jsonl results files")
    p.add_argument("--out", type=Path, default=HERE, help="folder for REPORT.md and figures/")
    args = p.parse_args(argv)
    files = load(args.results)
    # The table counts the main folder's runs; runs from other machines (sub-folders) only enter
    # the torch comparison, each against jax runs of its own device.
    rows = standard_rows({name: rs for name, rs in files.items() if "/" not in name})
    all_rows = standard_rows(files)
    pct = 100 * max((r["config"]["threshold"] for r in rows), default=0.2)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    fig_error_vs_depth(rows, args.out / "figures/error_vs_depth.png", pct)
    fig_boundaries(rows, args.out / "figures/boundaries.png")
    fig_epoch_curves(rows, args.out / "figures/epoch_curves.png", pct)
    declared = declared_section(files, args.out / "figures/declared_variants.png")
    link = Path(os.path.relpath(args.results.resolve(), args.out.resolve())).as_posix()
    (args.out / "REPORT.md").write_text("\n\n".join([
        "# flaxdepth: trainability against depth, results",
        f"_Generated by `python experiments/report.py` from `{link}/*.jsonl`; edit report.py, not this file._",
        INTRO.format(pct=f"{pct:g}", epochs=STANDARD["epochs"]),
        "## Verdicts at the notebook's depth pairs", table(rows, all_rows),
        "Cells: seeds that train (final error, the smaller of the last train and test errors, under the "
        "threshold). *flaxdepth boundary*: the sweep's boundary search (`python -m flaxdepth.sweep`: k = 3, 6, 12, "
        "... until most seeds fail, then bisection) replayed on the recorded depths: deepest k it found to train / "
        "shallowest k it found not to; *unfinished* where it needs a depth not yet trained. *torch vs jax*: "
        "torch_ref runs against jax runs of the same device, protocol, depth and seed (same initial weights and "
        "batch order); max diff over per-epoch train and test errors.",
        "![final error against depth](figures/error_vs_depth.png)", "![boundaries](figures/boundaries.png)",
        "## Interpretation", interpretation(rows, pct, all_rows, files),
        "![per-epoch test error](figures/epoch_curves.png)",
        *collapse_figure(args.out / "figures/eval_mode_collapse_k3_knobs.png"),
        "## Networks of your own: experiments/variants.toml",
        "Networks the notebook did not train, declared in `experiments/variants.toml` (each with the reason it "
        "is there) and trained by the same engine after the same parity check. They were swept on a 2-core CPU, "
        "so on a subset of MNIST (the `declared-cpu` entry of `sweeps.toml`: the first images of each split) "
        "at three depths rather than searched: a depth that trains here may fail on full MNIST and the other "
        "way round, and these errors are not comparable with the notebook's.",
        declared, "![declared variants](figures/declared_variants.png)",
        "## Theory beside measurement",
        "What the mean-field theory of signal propagation at initialization (Poole et al. 2016, Schoenholz et al. "
        "2017; `python -m flaxdepth.theory`, README \"Mean-field predictions\") predicts for each stage's "
        "same-width layers, from the variant's activation, init and bias: the phase, chi_1 (the factor by which "
        "the mean squared gradient changes per layer) and the trainable depth 6 xi_c in layers; a stage of a "
        "depth-k network holds k // 3 layers, so the network's predicted k is 3 times its smallest stage's "
        "6 xi_c. *measured*: flaxdepth's boundary search (table above) for the notebook's variants, the depths "
        "run for the declared ones.",
        theory_section(rows, files, args.out / "figures/theory_vs_measured.png"),
        "## Depth frontier",
        frontier_intro(),
        frontier_section(files, args.results, link, args.out / "figures/depth_frontier.png", pct),
        "![depth frontier](figures/depth_frontier.png)",
        "![gradient and signal at init](figures/frontier_init_gradients.png)",
        *[f"![{p.stem}](figures/{p.name})" for p in sorted((args.out / "figures").glob("frontier_init_*_k*.png"))],
        "## What was run", what_was_run(files, link),
        "## Hardware, versions and wall time per sweep", hardware(files)]) + "\n")
    print(f"wrote {args.out / 'REPORT.md'} and 7 figures in {args.out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
