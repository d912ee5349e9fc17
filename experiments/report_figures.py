"""The figures of experiments/REPORT.md, drawn from report_rows' selections into experiments/figures/.

Each figure is a `matplotlib.figure.Figure` of its own, saved and dropped: no pyplot, so no global
figure state and no backend to choose (a notebook importing this keeps its own)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullLocator
from matplotlib.transforms import offset_copy

import report_rows
from flaxdepth import registry, trainability
from report_rows import FRONTIER_VARIANTS, NOT_RUN, PROTOCOLS, STANDARD, setup_text

COLOR, MARKER = {"faithful": "tab:blue", "corrected": "tab:orange"}, {"faithful": "o", "corrected": "s"}
FRONTIER_COLOR = dict(zip(FRONTIER_VARIANTS, ("tab:green", "tab:olive", "tab:purple", "tab:blue", "tab:red")))
DPI = 110
#: The figures `draw` writes, by name under the figures folder.
FIGURES = ("error_vs_depth.png", "boundaries.png", "epoch_curves.png", "declared_variants.png",
           "theory_vs_measured.png", "depth_frontier.png", "frontier_init_gradients.png")


def draw(selection: report_rows.Selection, folder: Path) -> list[Path]:
    """Every figure of the report (FIGURES) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in FIGURES]
    s = selection
    fig_error_vs_depth(s.rows, paths[0], s.pct)
    fig_boundaries(s.verdicts, paths[1])
    fig_epoch_curves(s.rows, paths[2], s.pct)
    fig_declared(s.declared, paths[3], s.pct)
    fig_theory_vs_measured(s.theory, paths[4])
    fig_depth_frontier(s.frontier, paths[5], s.pct)
    fig_frontier_init(s.diagnostics, paths[6])
    return paths


def _save(fig: Figure, path: Path, **layout) -> None:
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=DPI)


def _not_run(ax, empty: bool) -> None:
    """Write 'not run' across an axis without data."""
    if empty:
        ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=12)


def fig_error_vs_depth(rows: pd.DataFrame, path: Path, pct: float) -> None:
    """Final error against depth per variant: a marker per seed, colour/shape per protocol, torch hollow."""
    fig = Figure(figsize=(16, 7.6))
    axes = fig.subplots(2, 4, sharey=True)
    for ax, v in zip(axes.flat, registry.VARIANTS.values()):
        runs = rows.loc[rows["variant"] == v.name]
        depths = list(runs["depth"]) + list(v.notebook_pair)
        pad = 0.15 * (max(depths) - min(depths)) + 3
        ax.set(xlim=(min(depths) - pad, max(depths) + pad), ylim=(-3, 103), title=f"{v.name} (lr {v.lr:g})")
        ax.axvline(v.notebook_pair[0], color="tab:green", ls="--", lw=1.2)
        ax.axvline(v.notebook_pair[1], color="tab:red", ls=":", lw=1.2)
        ax.axhline(pct, color="k", ls="--", lw=0.8)
        for r in runs.itertuples(index=False):
            shift = offset_copy(ax.transData, fig=fig, x=6 * (r.seed % 3 - 1), units="points")
            ax.scatter(r.depth, 100 * r.final_error, transform=shift, marker=MARKER[r.protocol], s=34,
                       facecolors="none" if r.framework == "torch" else COLOR[r.protocol],
                       edgecolors=COLOR[r.protocol])
        _not_run(ax, runs.empty)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("depth k")
    for ax in axes[:, 0]:
        ax.set_ylabel("final error, min(train, test) [%]")
    handles = [Line2D([], [], ls="", marker=MARKER[p], color=COLOR[p], mfc=mfc, label=f"{p}, {fw}")
               for p in PROTOCOLS for fw, mfc in (("jax", COLOR[p]), ("torch", "none"))]
    handles += [Line2D([], [], color="k", ls="--", lw=0.8, label=f"threshold {pct:g}%"),
                Line2D([], [], color="tab:green", ls="--", label="notebook: deepest trainable k"),
                Line2D([], [], color="tab:red", ls=":", label="notebook: shallowest untrainable k")]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=9, frameon=False)
    fig.suptitle("Final error against depth, one marker per seed (seeds side by side)")
    _save(fig, path, rect=(0, 0.05, 1, 1))


def _depth_ticks(ax, lo: float, hi: float) -> None:
    """Ticks at 3 x 2^n (the search's depths) with plain labels on a log depth axis."""
    ticks = [3 * 2 ** n for n in range(-1, 12) if lo <= 3 * 2 ** n <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _k50_interval(ax, fit, color: str) -> None:
    """k50 at P = 0.5 with its 95% interval: solid over the tested depths, dotted where an end lies
    beyond them (there the prior's range, not the runs, sets it)."""
    k_lo, k_hi = fit.k50_interval
    first, last = float(fit.depths[0]), float(fit.depths[-1])
    inner = (max(k_lo, first), min(k_hi, last))
    if inner[0] < inner[1]:
        ax.plot(inner, (0.5, 0.5), color=color, lw=2.4, solid_capstyle="butt", zorder=4)
    for a, b in ((k_lo, min(first, k_hi)), (max(last, k_lo), k_hi)):
        if a < b:
            ax.plot((a, b), (0.5, 0.5), color=color, lw=2.4, ls=(0, (1, 1)), zorder=4)
    ax.plot((k_lo, k_hi), (0.5, 0.5), ls="", marker="|", ms=9, mew=2, color=color, zorder=4)
    ax.plot([fit.k50], [0.5], ls="", marker="D", ms=7, color=color, mec="k", zorder=5)


def fig_boundaries(verdicts: list[report_rows.Verdict], path: Path) -> None:
    """P(trains | k) per notebook variant (a panel each, both protocols in it), log depth axis: the
    fraction of runs that train at each tested depth with its 95% Jeffreys interval, the curve
    flaxdepth.trainability fits (posterior median) with its 95% band, and k50 with its 95% interval
    at P = 0.5. A censored fit (every run trained, or none) has no curve: an arrow points to the side
    where k50 lies. Grey dotted lines: the notebook's pair."""
    fig = Figure(figsize=(16, 8.4))
    axes = fig.subplots(2, 4, sharey=True)
    for ax, verdict in zip(axes.flat, verdicts):
        v = verdict.variant
        fits = {p: fit for p, fit in verdict.fit.items() if fit is not None}
        depths = [int(d) for fit in fits.values() for d in fit.depths] + list(v.notebook_pair)
        lo, hi = min(depths) / 1.6, max(depths) * 1.6
        ax.set(xscale="log", xlim=(lo, hi), ylim=(-0.04, 1.04), title=f"{v.name} (lr {v.lr:g})")
        _depth_ticks(ax, lo, hi)
        for k in v.notebook_pair:
            ax.axvline(k, color="0.45", ls=":", lw=1.1)
        ax.axhline(0.5, color="0.75", lw=0.8)
        grid = np.geomspace(lo, hi, 90)
        notes = []
        for p, fit in fits.items():
            shift = {"faithful": 1 / 1.035, "corrected": 1.035}[p] if len(fits) > 1 else 1.0
            fraction = fit.trained / fit.runs
            f_lo, f_hi = trainability.jeffreys_interval(fit.trained, fit.runs)
            ax.errorbar(fit.depths * shift, fraction, yerr=[fraction - f_lo, f_hi - fraction], fmt=MARKER[p], ms=4.5,
                        color=COLOR[p], elinewidth=0.9, capsize=2, alpha=0.75, zorder=3)
            notes.append((p, report_rows.k50_text(fit)))
            if fit.censored is None:
                band = fit.probability(grid)
                ax.fill_between(grid, band.lo, band.hi, color=COLOR[p], alpha=0.16, lw=0)
                ax.plot(grid, band.median, color=COLOR[p], lw=1.8)
                _k50_interval(ax, fit, COLOR[p])
            else:  # k50 beyond every tested depth: an arrow from the last one that bounds it
                edge, end = (fit.depths[-1], hi) if fit.censored == "above" else (fit.depths[0], lo)
                ax.annotate("", xy=(end, 0.5), xytext=(edge, 0.5), zorder=4,
                            arrowprops=dict(arrowstyle="-|>", color=COLOR[p], lw=2.2, shrinkA=0, shrinkB=0))
        ax.text(0.03, 0.03, "\n".join(f"{p}: k50 = {text}" if text[0] not in "<>" else f"{p}: k50 {text}"
                                      for p, text in notes), transform=ax.transAxes, fontsize=8, va="bottom")
        _not_run(ax, not fits)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("depth k (log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("P(trains)")
    handles, labels = [], []
    for p in PROTOCOLS:
        handles += [Line2D([], [], ls="", marker=MARKER[p], color=COLOR[p]),
                    (Rectangle((0, 0), 1, 1, color=COLOR[p], alpha=0.16, lw=0), Line2D([], [], color=COLOR[p], lw=1.8))]
        labels += [f"{p}: fraction of runs that train (95% Jeffreys interval)",
                   f"{p}: fitted P(trains), median and 95% band"]
    handles += [Line2D([], [], ls="", marker="D", mfc="0.5", mec="k"), Line2D([], [], color="0.45", ls=":")]
    labels += ["k50 (P = 0.5), its 95% interval (dotted: beyond the tested depths)",
               "notebook's pair: deepest trainable / shallowest failing k"]
    fig.legend(handles=handles, labels=labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("P(trains) against depth (flaxdepth.trainability): per-depth fractions, fitted curves and k50; "
                 "arrow: every run trained (k50 deeper) or none did (k50 shallower)")
    # fixed margins: tight_layout's extra draw of eight log axes would double the figure's time
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.145, top=0.91, wspace=0.06, hspace=0.24)
    fig.savefig(path, dpi=DPI)


def fig_epoch_curves(rows: pd.DataFrame, path: Path, pct: float) -> None:
    """Per-epoch test error at the notebook's pair for BatchNorm variants, both protocols."""
    bn = [v for v in registry.VARIANTS.values() if v.batchnorm]
    fig = Figure(figsize=(5.2 * len(bn), 4.4))
    axes = fig.subplots(1, len(bn), sharey=True)
    for ax, v in zip(axes, bn):
        drawn = []
        for p in PROTOCOLS:
            for k, ls, fill in zip(v.notebook_pair, ("-", "--"), (COLOR[p], "white")):
                for j, r in enumerate(report_rows.pick(rows, v.name, p, depth=k).itertuples(index=False)):
                    drawn.append(r)
                    ax.plot(range(1, len(r.test_errors) + 1), [100 * e for e in r.test_errors], ls=ls,
                            marker=MARKER[p], mfc=fill, color=COLOR[p], alpha=0.8, label=None if j else f"{p}, k={k}")
        ax.axhline(pct, color="k", ls=":", lw=0.8)
        _not_run(ax, not drawn)
        epochs = max((len(r.test_errors) for r in drawn), default=3)
        ax.set(title=f"{v.name}, notebook pair k={v.notebook_pair[0]}/{v.notebook_pair[1]}", xlabel="epoch",
               ylim=(-3, 103), xlim=(0.8, epochs + 0.2), xticks=range(1, epochs + 1))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("test error [%] (one line per seed)")
    _save(fig, path)


def _mean_by_depth(runs: pd.DataFrame) -> tuple[list[int], list[float]]:
    """The depths run and the mean final error [%] at each."""
    depths = sorted(set(runs["depth"]))
    return depths, [100 * sum(runs.loc[runs["depth"] == d, "final_error"]) / int((runs["depth"] == d).sum())
                    for d in depths]


def fig_declared(declared: dict[str, pd.DataFrame], path: Path, pct: float) -> None:
    """Final error (mean over seeds) against depth of experiments/variants.toml's variants."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for name, runs in declared.items():
        if len(runs):
            ax.plot(*_mean_by_depth(runs), marker="o", label=name)
    ax.axhline(pct, color="k", ls="--", lw=0.8)
    ran = report_rows.combined(declared.values())
    where = ", ".join(report_rows.platforms(ran))
    subset = any(config.get("limit_train") for config in ran["config"])
    on = " ".join(filter(None, (where, "subset" if subset else "full MNIST"))) if len(ran) else NOT_RUN
    ax.set(xscale="log", xlabel="depth k", ylabel="final error, mean over seeds [%]", ylim=(-3, 103),
           title=f"experiments/variants.toml: final error against depth ({on})")
    ax.grid(alpha=0.3)
    _not_run(ax, ran.empty)
    if len(ran):
        ax.legend(fontsize=9)
    _save(fig, path)


def fig_theory_vs_measured(comparison: report_rows.TheoryComparison, path: Path) -> None:
    """Left: per variant, the predicted k and each stage's 3 x 6 xi_c against the measured limit.
    Right: the variants' stages on the (sigma_w^2, sigma_b^2) plane with their activations' critical lines."""
    covered, measured = comparison.covered, comparison.measured
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
    left.set_xticks(range(len(covered)),
                    [p.variant + (" (subset)" if p.variant in report_rows.DECLARED else "") for p in covered],
                    rotation=25, ha="right", fontsize=8)
    left.grid(alpha=0.3)
    handles = [left.scatter([], [], marker="D", color="tab:red", label="predicted k = 3 x smallest 6 xi_c"),
               left.scatter([], [], marker=".", color="tab:red", alpha=0.5, label="3 x 6 xi_c of each stage"),
               left.scatter([], [], marker="o", color="tab:blue", label="deepest k that trains"),
               left.scatter([], [], marker="x", color="tab:blue", label="shallowest k that fails beyond it")]
    left.legend(handles=handles, fontsize=7.5, loc="lower right")
    activations = sorted({p.stages[0].mean_field.activation for p in covered})
    colors = dict(zip(activations, ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")))
    critical_lines = {name: report_rows.critical_line(name) for name in activations}
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
    _save(fig, path)


def fig_depth_frontier(by_setup: dict[str, pd.DataFrame], path: Path, pct: float) -> None:
    """Final error against depth (log axis), one colour per init, one line style per setup (a marker
    per seed, the line through the means); the notebook's failure of naive tanh, the threshold and
    the deepest network trained are marked."""
    fig = Figure(figsize=(9, 6.4))
    ax = fig.subplots()
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    best, handles, inits = None, [], []
    for (setup, rows), ls, marker in zip(by_setup.items(), styles, markers):
        handles.append(Line2D([], [], color="0.3", ls=ls, marker=marker, label=setup))
        for v in (v for v in FRONTIER_VARIANTS if (rows["variant"] == v).any()):
            runs = rows.loc[rows["variant"] == v]
            ax.scatter(list(runs["depth"]), [100 * e for e in runs["final_error"]], color=FRONTIER_COLOR[v],
                       marker=marker, s=22, alpha=0.7)
            ax.plot(*_mean_by_depth(runs), ls=ls, color=FRONTIER_COLOR[v])
            inits += [v] if v not in inits else []
            for r in runs.itertuples(index=False):
                if r.final_error < r.config["threshold"] and (best is None or r.depth > best.depth):
                    best = r
    handles += [Line2D([], [], color=FRONTIER_COLOR[v], lw=3, label=v) for v in FRONTIER_VARIANTS if v in inits]
    naive = registry.VARIANTS["tanh"]
    handles.append(ax.axvline(naive.notebook_pair[1], color="tab:red", ls=":", lw=1.2,
                              label=f"notebook (full MNIST, {STANDARD['epochs']} epochs): naive tanh fails at "
                                    f"k={naive.notebook_pair[1]}"))
    handles.append(ax.axhline(pct, color="k", ls="--", lw=0.8, label=f"threshold {pct:g}%"))
    if best is not None:
        handles.append(ax.scatter([best.depth], [100 * best.final_error], marker="*", s=260, color="gold",
                                  edgecolors="k", zorder=5,
                                  label=f"deepest trained: {best.variant} k={best.depth} ({setup_text(best)})"))
    ax.set(xscale="log", xlabel="depth k (log scale)", ylabel="final error, min(train, test) [%]", ylim=(-3, 103),
           title="Depth frontier of the tanh CNN: final error against depth per init")
    ax.grid(alpha=0.3)
    _not_run(ax, not by_setup)
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    _save(fig, path, rect=(0, 0.05 + 0.03 * math.ceil(len(handles) / 2), 1, 1))


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
        _not_run(ax, not diagnostics)
    _save(fig, path)
