"""Figures of the STARD 2015 report, drawn with matplotlib from results.json.

Every function takes the results mapping (see docs/RESULTS.md) and returns a
:class:`matplotlib.figure.Figure`, built without pyplot so nothing global is
touched. The figures are meant to survive grayscale printing: groups differ
by line style, marker and hatching, never by colour alone.
:func:`save_figure` writes PNG and SVG deterministically (fixed SVG hash
salt, no dates in the metadata), so identical results give identical files.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib import patheffects
from matplotlib.patches import Patch

from covreport._io import atomic_write_bytes
from covreport.constants import IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import ReportError

#: Fixed drawing style per outcome group (grayscale-safe).
GROUP_STYLE = {
    WORSE: {"face": "0.35", "hatch": "///", "marker": "o", "edge": "black"},
    STABLE: {"face": "0.95", "hatch": "", "marker": "s", "edge": "black"},
    IMPROVED: {"face": "0.75", "hatch": "...", "marker": "^", "edge": "black"},
}
_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "hatch.linewidth": 0.6,
    "svg.fonttype": "path",
    "svg.hashsalt": "covreport",
    "path.simplify": True,
}
INDEX_STAGE = "index test not done"
#: The flow diagram's eligibility stage when no exclusion criterion removed a pair.
ELIGIBLE = "eligible"
#: Box-plot whiskers reach the most extreme pair within this many IQRs of the box (Tukey 1977).
WHISKER_IQR = 1.5
FLOW_WIDTH = 6.4  # inches; x positions below are in % of the width
MAIN_X, SIDE_X = 25, 49
REFERENCE_STAGE = "reference standard not available"


def _plain(text):
    """Text from data made safe for matplotlib (no mathtext from '$')."""
    return str(text).replace("$", r"\$")


def _figure(width, height):
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
    return fig


def _wrap(text, width):
    return "\n".join(textwrap.wrap(_plain(text), width)) or _plain(text)


def _grid(n, ncols=5):
    ncols = max(1, min(ncols, n))
    return int(math.ceil(n / ncols)), ncols


def _n(k, noun):
    return f"{k} {noun}" if k == 1 else f"{k} {noun}s"


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


# --- flow diagram (STARD item 19) --------------------------------------------


def projection_counts(results):
    """``{outcome: {"same", "changed", "unknown", "pairs"}}`` from ``projection_changes`` (outcome "All" too).

    Empty when results.json has no projection counts (older results) or no pair has both projections
    recorded. Shared by the flow diagram and Table 1.
    """
    out = {}
    for row in results.get("projection_changes") or []:
        g = out.setdefault(row.get("outcome"), {"same": 0, "changed": 0, "unknown": 0, "pairs": 0})
        kind = row.get("projection_change") if row.get("projection_change") in ("same", "changed") else "unknown"
        g[kind] += int(row.get("pairs") or 0)
        g["pairs"] += int(row.get("pairs") or 0)
    if all(g["unknown"] == g["pairs"] for g in out.values()):
        return {}
    return out


def _classes(results):
    """The prediction's (positive, negative) classes: Worse and Improved, or a clinical target's."""
    pred = results.get("prediction") or {}
    return str(pred.get("positive_class") or WORSE), str(pred.get("negative_class") or IMPROVED)


def _index_results(block, classes=(WORSE, IMPROVED)):
    """Counts of the index test's results in the prediction subset, with the reference standard of each.

    ``{"positive": {pos: tp, neg: fp}, "negative": {...}, "inconclusive": {...}}`` from the
    stored pairs (``predicted`` None: inconclusive), else from the confusion matrix.
    """
    pos, neg = classes
    out = {k: {pos: 0, neg: 0} for k in ("positive", "negative", "inconclusive")}
    pairs = block.get("pairs") or []
    if pairs:
        for p in pairs:
            kind = ("positive" if p.get("predicted") == pos else "negative" if p.get("predicted") == neg
                    else "inconclusive")
            if p.get("outcome") in (pos, neg):
                out[kind][p["outcome"]] += 1
    else:
        c = block.get("confusion") or {}
        out["positive"] = {pos: c.get("tp", 0), neg: c.get("fp", 0)}
        out["negative"] = {pos: c.get("fn", 0), neg: c.get("tn", 0)}
    return out


def flow_diagram(results):
    """STARD 2015 flow diagram of pairs and patients, in the form of the STARD diagram.

    Top to bottom: the source population (the pairs of the manifest); the
    index test performed (not performed, with reasons, at the side); the
    reference standard available (not available, with reasons); the final
    category of the analysed pairs (Worse, Stable, Improved, with the pairs
    whose projection changed); then, for the prediction of Worse vs Improved,
    the index test's results (positive, negative, inconclusive) each with the
    reference standard of its pairs. As in STARD's diagram every stage has its
    side box of exclusions, with n = 0 where none were excluded; without an
    exclusion criterion that removed a pair, an "Eligible" box stands for the
    eligibility stage.

    Parameters
    ----------
    results : dict
        results.json content; uses ``flow``, ``prediction`` and ``projection_changes``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    flow = results["flow"]
    counts = flow.get("exclusion_counts") or []
    stages = [s for s in dict.fromkeys(c["stage"] for c in counts)
              if s not in (INDEX_STAGE, REFERENCE_STAGE)]
    if not any(c["pairs"] for c in counts if c["stage"] not in (INDEX_STAGE, REFERENCE_STAGE)):
        stages = [ELIGIBLE]      # STARD's "eligible" box, with its "excluded (n = 0)" side box
    stages += [INDEX_STAGE, REFERENCE_STAGE]
    block, name = _headline_block(results)
    projection = projection_counts(results)

    height = 40.0   # drawn from the top; the limits are set to what was drawn
    with matplotlib.rc_context(_RC):
        fig = _figure(FLOW_WIDTH, height)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, 100)
        ax.set_ylim(0, height)
        ax.axis("off")
        main_box = {"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": "black", "linewidth": 1.0}
        side_box = {"boxstyle": "square,pad=0.5", "facecolor": "0.93", "edgecolor": "black",
                    "linewidth": 0.8, "linestyle": "--"}
        arrow = {"arrowstyle": "-|>", "color": "black", "linewidth": 0.9, "shrinkA": 0, "shrinkB": 0}

        def half(text, size=8):
            # half height of a text box in inches (= data units): lines * leading + padding
            return (text.count("\n") + 1) * size * 1.18 / 72 / 2 + size * 0.5 / 72 + 0.02

        y = height - 0.7
        top = (f"Source population: pairs of consecutive CXRs\nof one patient in the manifest\n"
               f"n = {flow['pairs_in_manifest']} pairs of {flow['patients_in_manifest']} patients")
        if flow.get("images_in_manifest") is not None:
            top += f"\n{flow['images_in_manifest']} distinct images"
        ax.text(MAIN_X, y, top, ha="center", va="center", fontsize=8, bbox=main_box)
        h_prev = half(top)
        top_edge = y + h_prev + 0.08
        remaining = flow["pairs_in_manifest"]
        for stage in stages:
            rows = [c for c in counts if c["stage"] == stage]
            n_ex = int(sum(c["pairs"] for c in rows))
            remaining -= n_ex
            if stage == ELIGIBLE:
                text = f"Eligible\nn = {_n(remaining, 'pair')}"
                side = f"Excluded, n = {_n(0, 'pair')}\n- no pair met an exclusion criterion"
            elif stage == INDEX_STAGE:
                text = "Index test performed on both CXRs\n" + f"n = {_n(remaining, 'pair')}"
                side = f"Index test not performed, n = {_n(n_ex, 'pair')}"
                if flow.get("images_scored") is not None:
                    text += f"\n{flow['images_scored']} images scored"
                    if flow.get("images_from_cache"):
                        text += f" ({flow['images_from_cache']} from the cache)"
            elif stage == REFERENCE_STAGE:
                text = ("Reference standard available: analysed\n"
                        f"n = {flow['pairs_analysed']} pairs of {flow['patients_analysed']} patients")
                side = f"Reference standard not available, n = {_n(n_ex, 'pair')}"
            else:
                if not n_ex:
                    continue
                text = f"Eligible\nn = {_n(remaining, 'pair')}"
                side = f"Excluded: {_plain(stage)}, n = {_n(n_ex, 'pair')}"
            h_next = half(text)
            y_next = y - h_prev - 0.8 - h_next
            ax.annotate("", xy=(MAIN_X, y_next + h_next), xytext=(MAIN_X, y - h_prev), arrowprops=arrow)
            # STARD draws every exclusion box, with n = 0 where nothing was excluded
            y_side = (y - h_prev + y_next + h_next) / 2
            ax.annotate("", xy=(SIDE_X - 1, y_side), xytext=(MAIN_X, y_side), arrowprops=arrow)
            lines = [side]
            shown = rows[:4]
            for c in shown:
                lines.append(f"- {_wrap(c['reason'], 46)} (n = {c['pairs']})".replace("\n", "\n   "))
            if len(rows) > len(shown):
                more = sum(c["pairs"] for c in rows[len(shown):])
                lines.append(f"- {len(rows) - len(shown)} other reasons (n = {more}); see the exclusions table")
            ax.text(SIDE_X, y_side, "\n".join(lines), ha="left", va="center", fontsize=6.5, bbox=side_box)
            ax.text(MAIN_X, y_next, text, ha="center", va="center", fontsize=8,
                    fontweight="bold" if stage == REFERENCE_STAGE else "normal", bbox=main_box)
            y, h_prev = y_next, h_next

        # final category of the analysed pairs
        y_bar = y - h_prev - 0.3
        xs = (15, 50, 85)
        by = flow.get("by_outcome") or {}
        ax.plot([xs[0], xs[-1]], [y_bar, y_bar], color="black", linewidth=0.9)
        ax.plot([MAIN_X, MAIN_X], [y - h_prev, y_bar], color="black", linewidth=0.9)
        bottom = y_bar
        group_box = {}
        for x, outcome in zip(xs, OUTCOMES):
            g = by.get(outcome, {})
            text = (f"Final category: {outcome}\n{_n(g.get('pairs', 0), 'pair')} of "
                    f"{_n(g.get('patients', 0), 'patient')}")
            if projection:
                text += f"\nprojection changed: {projection.get(outcome, {}).get('changed', 0)}"
            y_g = y_bar - 0.35 - half(text)
            ax.annotate("", xy=(x, y_g + half(text)), xytext=(x, y_bar), arrowprops=arrow)
            ax.text(x, y_g, text, ha="center", va="center", fontsize=7.5,
                    bbox={"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": "black",
                          "linewidth": 1.4 if outcome == WORSE else 1.0,
                          "linestyle": {WORSE: "-", STABLE: "--", IMPROVED: ":"}[outcome]})
            group_box[outcome] = (x, y_g - half(text))
            bottom = min(bottom, y_g - half(text))
        # the prediction of Worse vs Improved (or of a clinical target): index test results, then the
        # reference standard of each
        if block:
            pos, neg = _classes(results)
            res = _index_results(block, (pos, neg))
            pairs = block.get("pairs") or []
            n_pairs = block.get("n_pairs") or sum(sum(v.values()) for v in res.values())
            n_pat = block.get("n_patients") or len({p.get("patient_id") for p in pairs})
            target = results.get("prediction_target")
            if target:
                left_out = len(target.get("excluded") or [])
                head = (f"Prediction of {_plain(pos)} vs {_plain(neg)} from the first CXR ({name})\n"
                        f"{_n(n_pairs, 'pair')} of {_n(n_pat, 'patient')} (every category; "
                        f"{_plain(target.get('column'))} not recorded: {_n(left_out, 'pair')}, not included)")
                sources = ((WORSE, -8), (STABLE, 0), (IMPROVED, 8))
            else:
                head = (f"Prediction of {WORSE} vs {IMPROVED} from the first CXR ({name})\n"
                        f"{_n(n_pairs, 'pair')} of {_n(n_pat, 'patient')} ({WORSE} and {IMPROVED}; "
                        f"{STABLE} not included)")
                sources = ((WORSE, -8), (IMPROVED, 8))
            y_head = bottom - 0.45 - half(head, 7.5)
            for outcome, dx in sources:
                x, y_top = group_box[outcome]
                ax.annotate("", xy=(50 + dx, y_head + half(head, 7.5)), xytext=(x, y_top), arrowprops=arrow)
            ax.text(50, y_head, head, ha="center", va="center", fontsize=7.5, bbox=main_box)
            y_bar2 = y_head - half(head, 7.5) - 0.3
            ax.plot([xs[0], xs[-1]], [y_bar2, y_bar2], color="black", linewidth=0.9)
            ax.plot([50, 50], [y_head - half(head, 7.5), y_bar2], color="black", linewidth=0.9)
            titles = {"positive": f"Index test positive\n(predicts {_plain(pos)})",
                      "negative": f"Index test negative\n(predicts {_plain(neg)})",
                      "inconclusive": "Index test inconclusive\n(no prediction)"}
            low = y_bar2
            for x, kind in zip(xs, ("positive", "negative", "inconclusive")):
                k = res[kind]
                t1 = f"{titles[kind]}\nn = {_n(k[pos] + k[neg], 'pair')}"
                y1 = y_bar2 - 0.35 - half(t1, 7)
                ax.annotate("", xy=(x, y1 + half(t1, 7)), xytext=(x, y_bar2), arrowprops=arrow)
                ax.text(x, y1, t1, ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "square,pad=0.5", "facecolor": "white", "edgecolor": "black",
                              "linewidth": 0.9})
                t2 = (f"{'Target' if target else 'Reference standard'}\n{_plain(pos)}: {k[pos]}\n"
                      f"{_plain(neg)}: {k[neg]}")
                y2 = y1 - half(t1, 7) - 0.35 - half(t2, 7)
                ax.annotate("", xy=(x, y2 + half(t2, 7)), xytext=(x, y1 - half(t1, 7)), arrowprops=arrow)
                ax.text(x, y2, t2, ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": "black",
                              "linewidth": 0.9})
                low = min(low, y2 - half(t2, 7))
            bottom = low - 0.1
            bottom = _added_value_box(ax, results.get("added_value"), bottom, half, main_box)
        counted = sum((by.get(o) or {}).get("patients", 0) for o in OUTCOMES)
        note = ""
        if counted != flow.get("patients_analysed"):
            note = (f"A patient can have pairs in several outcome groups: the groups count {counted} patients "
                    f"for {flow.get('patients_analysed')} patients analysed.")
        total_ex = flow["pairs_in_manifest"] - flow["pairs_analysed"]
        if remaining != flow["pairs_analysed"]:
            note += (f" Note: {total_ex} pairs not analysed, {flow['pairs_in_manifest'] - remaining} listed as "
                     "exclusions.")
        if note:
            note = _wrap(note.strip(), 110)
            bottom -= 0.15
            ax.text(50, bottom, note, ha="center", va="top", fontsize=6.5, style="italic")
            bottom -= 0.13 * (note.count("\n") + 1) + 0.05
        bottom -= 0.05
        ax.set_ylim(bottom, top_edge)
        fig.set_size_inches(FLOW_WIDTH, top_edge - bottom)
    return fig


def _added_value_box(ax, added, bottom, half, box):
    """The pairs of the clinical, imaging and combined models (``--predictors``) and those missing a
    predictor, below the index test's results; returns the new bottom."""
    if not added:
        return bottom
    names = ", ".join(s["name"] for s in added.get("predictors") or [])
    missing = {}
    for row in added.get("excluded") or []:
        missing[row["reason"]] = missing.get(row["reason"], 0) + 1
    text = (f"Added value of the images: clinical, imaging and combined models\n(clinical predictors: "
            f"{names})\n{_n(added.get('pairs_analysed') or 0, 'pair')} of "
            f"{_n(added.get('patients_analysed') or 0, 'patient')} with every predictor\n"
            f"Not in these models, missing a predictor: {_n(len(added.get('excluded') or []), 'pair')}")
    for reason, n in sorted(missing.items(), key=lambda kv: (-kv[1], kv[0]))[:3]:
        text += f"\n- {_wrap(reason, 60)} (n = {n})"
    if len(missing) > 3:
        text += f"\n- {len(missing) - 3} other reasons; see results.json added_value.excluded"
    y = bottom - 0.35 - half(text, 7)
    ax.text(50, y, text, ha="center", va="center", fontsize=7, bbox={**box, "linestyle": "--"})
    return y - half(text, 7) - 0.1


def _headline_block(results):
    """The headline prediction block and its name, or (None, None)."""
    pred = results.get("prediction") or {}
    name = pred.get("headline", "nested")
    block = pred.get(name)
    return (block, f"{name} protocol") if isinstance(block, dict) and block.get("confusion") else (None, None)


# --- ROC curves (validation) -------------------------------------------------


def roc_grid(results, ncols=5):
    """Grid of validation ROC curves, one panel per label, with AUC and DeLong CI.

    Labels whose AUC is not estimable (too few positives) get a panel saying
    so. Parameters: ``results`` (uses ``roc_curves`` and ``validation_auc``);
    ``ncols`` panels per row. Returns a :class:`~matplotlib.figure.Figure`.
    """
    aucs = {r["label"]: r for r in results.get("validation_auc") or []}
    curves = results.get("roc_curves") or {}
    labels = [lab for lab in results.get("labels", []) if lab in aucs or lab in curves]
    labels += [lab for lab in aucs if lab not in labels]
    if not labels:
        fig = _figure(6, 1.2)
        with matplotlib.rc_context(_RC):
            fig.text(0.5, 0.5, "No validation set: ROC curves were not computed.", ha="center", va="center")
        return fig
    nrows, ncols = _grid(len(labels), ncols)
    with matplotlib.rc_context(_RC):
        fig = _figure(7.5 * ncols / 5, 1.75 * nrows + 0.3)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        for ax, lab in zip(axes.flat, labels):
            rec = aucs.get(lab, {})
            ax.plot([0, 1], [0, 1], linestyle=":", color="0.5", linewidth=0.8)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_aspect("equal")
            ax.set_title(_wrap(lab, 20), fontsize=7)
            ax.tick_params(length=2, labelsize=6)
            ax.set_xticks([0, 0.5, 1])
            ax.set_yticks([0, 0.5, 1])
            if lab in curves and rec.get("auc") is not None:
                c = curves[lab]
                ax.plot(c["fpr"], c["tpr"], color="black", linewidth=1.2, drawstyle="steps-post")
                txt = (f"AUC {_fmt(rec['auc'])}\n({_fmt(rec.get('ci_low'))}-{_fmt(rec.get('ci_high'))})\n"
                       f"{rec.get('n_pos', '?')} pos / {rec.get('n_neg', '?')} neg")
                ax.text(0.97, 0.04, txt, ha="right", va="bottom", fontsize=5.5,
                        bbox={"facecolor": "white", "edgecolor": "0.6", "linewidth": 0.5, "pad": 1.5})
            else:
                ax.add_patch(matplotlib.patches.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="0.6",
                                                          hatch="xx", linewidth=0))
                note = rec.get("note") or "AUC not estimable"
                ax.text(0.5, 0.5, _wrap(note, 20), ha="center", va="center", fontsize=5.5,
                        bbox={"facecolor": "white", "edgecolor": "black", "linewidth": 0.5})
        for ax in axes[-1]:
            ax.set_xlabel("1 - specificity")
        for ax in axes[:, 0]:
            ax.set_ylabel("sensitivity")
        fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.12, wspace=0.35, hspace=0.5)
    return fig


# --- box plots of change by outcome group ------------------------------------


def change_boxplots(results, ncols=5):
    """Box plots of each label's change (second minus first CXR) by outcome group.

    Boxes are hatched and shaded per group and the pairs are overlaid as
    jittered points with a group-specific marker, so the figure reads in
    grayscale. The median is a white line outlined in black (visible on the
    dark Worse box); whiskers reach the most extreme pair within
    :data:`WHISKER_IQR` interquartile ranges of the box (Tukey 1977). Uses the ``"<label> change"`` columns of ``results["pairs"]``.
    Returns a :class:`~matplotlib.figure.Figure`.
    """
    labels = list(results.get("labels") or [])
    pairs = results.get("pairs") or []
    nrows, ncols = _grid(max(1, len(labels)), ncols)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    with matplotlib.rc_context(_RC):
        fig = _figure(7.5 * ncols / 5, 2.0 * nrows + 0.4)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        for ax, lab in zip(axes.flat, labels):
            data, present = [], []
            for outcome in OUTCOMES:
                vals = np.array([p[f"{lab} change"] for p in pairs
                                 if p.get("outcome") == outcome and p.get(f"{lab} change") is not None],
                                dtype=float)
                data.append(vals)
                present.append(outcome)
            pos = np.arange(1, len(present) + 1)
            bp = ax.boxplot([d if d.size else [np.nan] for d in data], positions=pos, widths=0.6,
                            patch_artist=True, showfliers=False, whis=WHISKER_IQR,
                            medianprops={"color": "black", "linewidth": 1.4},
                            whiskerprops={"linewidth": 0.8}, capprops={"linewidth": 0.8})
            for patch, outcome in zip(bp["boxes"], present):
                st = GROUP_STYLE[outcome]
                patch.set_facecolor(st["face"])
                patch.set_hatch(st["hatch"])
                patch.set_edgecolor(st["edge"])
                patch.set_linewidth(0.8)
            for med, outcome in zip(bp["medians"], present):
                # a white median with a black outline reads on the dark Worse box and on the light ones
                med.set_color("white")
                med.set_linewidth(1.6)
                med.set_path_effects([patheffects.Stroke(linewidth=3.0, foreground="black"), patheffects.Normal()])
                med.set_zorder(4)
            for x, d, outcome in zip(pos, data, present):
                if d.size:
                    jit = rng.uniform(-0.18, 0.18, d.size)
                    ax.scatter(x + jit, d, s=7, marker=GROUP_STYLE[outcome]["marker"], facecolor="white",
                               edgecolor="black", linewidth=0.5, zorder=3)
            ax.axhline(0, color="0.4", linestyle="--", linewidth=0.7, zorder=0)
            ax.set_xticks(pos)
            ax.set_xticklabels([f"{o[0]}\n{d.size}" for o, d in zip(present, data)], fontsize=6)
            ax.set_title(_wrap(lab, 20), fontsize=7)
            ax.tick_params(length=2, labelsize=6)
        for ax in axes[:, 0]:
            ax.set_ylabel("change in probability\n(second - first CXR)", fontsize=6.5)
        handles = [Patch(facecolor=GROUP_STYLE[o]["face"], hatch=GROUP_STYLE[o]["hatch"], edgecolor="black",
                         label=f"{o} ({o[0]})") for o in OUTCOMES]
        fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.subplots_adjust(left=0.1, right=0.99, top=0.92, bottom=0.2 if nrows == 1 else 0.13,
                            wspace=0.12, hspace=0.6)
    return fig


# --- calibration of the prediction --------------------------------------------


#: Panel titles of the known protocols (others are shown by their name).
PROTOCOL_TITLES = {"penalised": "Penalised (main)", "nested": "Nested (replication)",
                   "global": "Global (replication, OPTIMISTIC)", "reversed": "Reversed order (control)"}


def _protocol_panels(results, want):
    """(name, block) of every prediction protocol holding ``want`` (a callable on the block), headline first."""
    pred = results.get("prediction") or {}
    head = pred.get("headline")
    names = [n for n, b in pred.items() if isinstance(b, dict) and want(b)]
    return sorted(names, key=lambda n: n != head), head


def calibration_drawable(block):
    """Whether a protocol block gets a calibration panel (records without ``drawable``: a finite slope).

    A block marked not informative (``informative`` False: one predicted
    class, or an AUC below chance) gets none: its calibration is not evidence.
    """
    cal = (block or {}).get("calibration") if isinstance(block, dict) else None
    if not isinstance(cal, dict) or block.get("informative") is False:
        return False
    if "drawable" in cal:
        return bool(cal["drawable"])
    return isinstance(cal.get("slope"), (int, float)) and math.isfinite(cal["slope"])


def calibration_figure(results):
    """Flexible calibration curves of the out-of-fold probability of Worse (or of a target's positive
    class), one panel per protocol.

    Each panel shows the lowess calibration curve stored in
    ``prediction[protocol].calibration.curve`` with its patient-bootstrap
    band (Austin & Steyerberg 2019), the observed proportion of Worse pairs
    against the mean predicted probability in bins (marker area proportional
    to the pairs), the diagonal of perfect calibration, and a rug of the
    pairs (Worse at the bottom, Improved at the top). Protocols whose
    calibration is degenerate (``drawable`` False: the model predicts one
    class, or the slope is not estimable) get no panel; the report says why.
    Black and gray only, so it reads in grayscale.

    Parameters
    ----------
    results : dict
        results.json content; uses ``prediction[protocol]["pairs"]`` and
        ``prediction[protocol]["calibration"]``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ReportError
        When no protocol has a drawable calibration record.

    References
    ----------
    Austin PC, Steyerberg EW. Stat Med 2019;38:4051-4065. Cleveland WS.
    J Am Stat Assoc 1979;74:829-836.
    """
    names, head = _protocol_panels(results, calibration_drawable)
    if not names:
        raise ReportError("nothing to plot: no prediction protocol has a drawable calibration record")
    pred = results["prediction"]
    pos, _neg = _classes(results)
    nrows, ncols = _grid(len(names), ncols=2)
    with matplotlib.rc_context(_RC):
        fig = _figure(max(2.6 * ncols + 0.4, 5.2), 2.6 * nrows + 0.6)
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = grid.ravel()
        for ax in axes[len(names):]:
            ax.set_visible(False)
        for ax, name in zip(axes, names):
            block = pred[name]
            cal = block["calibration"]
            ax.plot([0, 1], [0, 1], linestyle=":", color="0.5", linewidth=0.8, label="perfect calibration")
            curve = cal.get("curve") or {}
            x = np.array([np.nan if v is None else v for v in curve.get("probability") or []], dtype=float)
            if len(x):
                obs, lo, hi = (np.array([np.nan if v is None else v for v in curve.get(k) or [None] * len(x)],
                                        dtype=float) for k in ("observed", "lower", "upper"))
                band = np.isfinite(lo) & np.isfinite(hi)
                if band.any():
                    ax.fill_between(x[band], lo[band], hi[band], color="0.85", linewidth=0,
                                    label="95% bootstrap band")
                ax.plot(x, obs, color="black", linewidth=1.2, label="lowess curve")
            rows = [(float(p["probability"]), 1.0 if p.get("outcome") == pos else 0.0)
                    for p in block.get("pairs") or [] if p.get("probability") is not None]
            if rows:
                px, py = np.array(rows).T
                ax.plot(px[py == 1], np.full((py == 1).sum(), -0.03), "|", color="black", markersize=4)
                ax.plot(px[py == 0], np.full((py == 0).sum(), 1.03), "|", color="0.45", markersize=4)
            bins = [b for b in cal.get("bins") or []
                    if b.get("predicted") is not None and b.get("observed") is not None]
            if bins:
                ax.scatter([b["predicted"] for b in bins], [b["observed"] for b in bins],
                           s=[8 + 4 * (b.get("n") or 1) for b in bins], facecolor="white", edgecolor="black",
                           linewidth=0.8, zorder=3, label="bins (area ~ pairs)")
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.06, 1.06)
            ax.set_aspect("equal")
            ax.set_title(PROTOCOL_TITLES.get(name, name) + (" [headline]" if name == head else ""), fontsize=7.5)
            ax.set_xlabel(f"predicted probability of {_plain(pos)}")
            ax.tick_params(length=2, labelsize=6)
            txt = [f"{label} {_fmt(cal.get(key), nd)}" for key, label, nd in
                   (("brier", "Brier", 3), ("intercept", "intercept", 2), ("slope", "slope", 2), ("ici", "ICI", 3),
                    ("e90", "E90", 3)) if cal.get(key) is not None]
            ax.text(0.97, 0.07, "\n".join(txt), ha="right", va="bottom", fontsize=5.5,
                    transform=ax.transAxes, bbox={"facecolor": "white", "edgecolor": "0.6", "linewidth": 0.5,
                                                  "pad": 1.5})
        for ax in grid[:, 0]:
            ax.set_ylabel(f"observed proportion {_plain(pos)}")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=6.5)
        fig.subplots_adjust(left=0.1, right=0.98, top=1 - 0.25 / (2.6 * nrows + 0.6),
                            bottom=0.75 / (2.6 * nrows + 0.6), wspace=0.3, hspace=0.45)
    return fig


# --- decision curves ---------------------------------------------------------------


def decision_curve_figure(results):
    """Decision curves: net benefit of each protocol against threshold probability, one panel per protocol.

    Each panel shows the protocol's net benefit (solid, black) with its
    patient-bootstrap band (gray), treat all (dashed) and treat none (dotted
    at 0), from ``results["decision_curve"]["rows"]``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ReportError
        When results.json holds no decision curve.

    References
    ----------
    Vickers AJ, Elkin EB. Med Decis Making 2006;26:565-574.
    """
    rows = (results.get("decision_curve") or {}).get("rows") or []
    by = {}
    for r in rows:
        by.setdefault(r["protocol"], []).append(r)
    if not by:
        raise ReportError("nothing to plot: results.json holds no decision curve")
    head = (results.get("prediction") or {}).get("headline")
    names = sorted(by, key=lambda n: n != head)

    def col(rs, key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in rs], dtype=float)

    nrows, ncols = _grid(len(names), ncols=2)
    height = 2.3 * nrows + 0.6
    with matplotlib.rc_context(_RC):
        fig = _figure(max(3.1 * ncols + 0.4, 5.2), height)
        grid = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        axes = grid.ravel()
        for ax in axes[len(names):]:
            ax.set_visible(False)
        top = max(float(np.nanmax(col(rs, "prevalence"))) for rs in by.values())
        for ax, name in zip(axes, names):
            rs = sorted(by[name], key=lambda r: r["threshold"])
            t = col(rs, "threshold")
            lo, hi = col(rs, "lower"), col(rs, "upper")
            band = np.isfinite(lo) & np.isfinite(hi)
            if band.any():
                ax.fill_between(t[band], lo[band], hi[band], color="0.85", linewidth=0, label="95% bootstrap band")
            ax.plot(t, col(rs, "treat_all"), linestyle="--", color="0.35", linewidth=0.9, label="treat all")
            ax.plot(t, np.zeros(len(t)), linestyle=":", color="0.35", linewidth=0.9, label="treat none")
            ax.plot(t, col(rs, "net_benefit"), color="black", linewidth=1.2, label="model")
            ax.set_xlim(float(t.min()), float(t.max()))
            ax.set_ylim(-0.1, top + 0.05)
            ax.set_title(PROTOCOL_TITLES.get(name, name) + (" [headline]" if name == head else ""), fontsize=7.5)
            ax.set_xlabel("threshold probability")
            ax.tick_params(length=2, labelsize=6)
        for ax in grid[:, 0]:
            ax.set_ylabel("net benefit")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=6.5)
        fig.subplots_adjust(left=0.1, right=0.98, top=1 - 0.25 / height, bottom=0.75 / height, wspace=0.12,
                            hspace=0.55)
    return fig


def site_forest_figure(results, external=False):
    """Forest plots of the AUC and the calibration slope by site, with their random-effects pooling.

    From ``results["sites"]`` (issue 22, section 4): per site the estimate (a square whose area follows
    its random-effects weight) and its 95% CI; below, the pooled estimate of the main estimator as a
    diamond spanning its CI and the 95% prediction interval as a line with end ticks. Black and gray
    only. Sites not pooled (one class, an AUC of 0 or 1, no site recorded) are drawn hollow. With
    ``external``, the internal-external cross-validation (``sites.iecv``) instead.
    """
    rec = results.get("sites") or {}
    if external:
        rec = rec.get("iecv") or {}
    rows = [r for r in rec.get("rows") or []]
    if not rows:
        raise ReportError("nothing to plot: results.json holds no performance by site")
    panels = (("auc", "AUC", "auc", "auc_ci_low", "auc_ci_high", 0.5),
              ("calibration_slope", "calibration slope", "slope", "slope_ci_low", "slope_ci_high", 1.0))
    height = 0.32 * (len(rows) + 3) + 0.9
    with matplotlib.rc_context(_RC):
        fig = _figure(6.4, height)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (key, title, est, lo, hi, ref) in zip(axes, panels):
            meta = (rec.get("meta") or {}).get(key) or {}
            main = (meta.get("estimators") or {}).get(meta.get("primary")) or {}
            pooled = dict(zip(meta.get("sites") or [], main.get("weights") or []))
            for i, r in enumerate(rows):
                yy = len(rows) - i + 1
                if r.get(est) is None:
                    ax.text(ref, yy, "n/a", ha="center", va="center", fontsize=6.5, color="0.4")
                    continue
                if r.get(lo) is not None and r.get(hi) is not None:
                    ax.plot([r[lo], r[hi]], [yy, yy], color="black", linewidth=0.9)
                w = pooled.get(r["site"])
                ax.plot([r[est]], [yy], marker="s", markersize=4 + 10 * math.sqrt(w) if w else 4,
                        color="black", markerfacecolor="black" if w else "white", linestyle="none")
            if main:
                yd = 0.6
                c, a, b = main["estimate"], main["ci_low"], main["ci_high"]
                ax.fill([a, c, b, c], [yd, yd + 0.25, yd, yd - 0.25], color="0.35", edgecolor="black",
                        linewidth=0.8)
                if main.get("pi_low") is not None:
                    ax.plot([main["pi_low"], main["pi_high"]], [yd - 0.45, yd - 0.45], color="black",
                            linewidth=0.8)
                    for x in (main["pi_low"], main["pi_high"]):
                        ax.plot([x, x], [yd - 0.55, yd - 0.35], color="black", linewidth=0.8)
                ax.set_title(f"{title}\n{meta.get('primary')}: tau\u00b2 {main['tau2']:.3g}, "
                             f"I\u00b2 {100 * main['i2']:.0f}%", fontsize=7.5)
            else:
                ax.set_title(f"{title}\n{_plain(meta.get('note') or 'not pooled')}", fontsize=7)
            ax.axvline(ref, color="0.6", linestyle=":", linewidth=0.8)
            ax.tick_params(labelsize=6.5, length=2)
            ax.set_xlabel(title)
        labels = [f"{_plain(r['site'])} ({r['n_pairs']} pairs)" for r in rows]
        axes[0].set_yticks([len(rows) - i + 1 for i in range(len(rows))] + [0.6, 0.15])
        axes[0].set_yticklabels(labels + ["pooled (random effects)", "95% prediction interval"], fontsize=6.5)
        axes[0].set_ylim(-0.3, len(rows) + 1.6)
        fig.subplots_adjust(left=0.3, right=0.98, top=1 - 0.55 / height, bottom=0.45 / height, wspace=0.12)
    return fig


def added_value_decision_figure(results):
    """Decision curves of the clinical, imaging and combined models on one panel (issue 22, section 3).

    The models differ by line style (clinical dash-dot, imaging dashed, combined solid, all black), beside
    treat all (grey, dashed) and treat none (grey, dotted at 0), from ``results["added_value"]["decision_curve"]``.
    """
    rows = (results.get("added_value") or {}).get("decision_curve") or []
    if not rows:
        raise ReportError("nothing to plot: results.json holds no decision curve of the added-value models")
    styles = {"clinical": ("-.", 1.0), "imaging": ("--", 1.0), "combined": ("-", 1.4)}
    with matplotlib.rc_context(_RC):
        fig = _figure(5.2, 3.2)
        ax = fig.add_axes((0.12, 0.2, 0.85, 0.75))
        first = None
        for name, (style, width) in styles.items():
            rs = sorted((r for r in rows if r.get("model") == name), key=lambda r: r["threshold"])
            if not rs:
                continue
            t = np.array([r["threshold"] for r in rs], dtype=float)
            ax.plot(t, [r["net_benefit"] for r in rs], linestyle=style, color="black", linewidth=width,
                    label=f"{name} model")
            first = first or rs
        t = np.array([r["threshold"] for r in first], dtype=float)
        ax.plot(t, [r["treat_all"] for r in first], linestyle="--", color="0.6", linewidth=0.9, label="treat all")
        ax.plot(t, np.zeros(len(t)), linestyle=":", color="0.6", linewidth=0.9, label="treat none")
        top = max(r["net_benefit"] for r in rows)
        ax.set_xlim(float(t.min()), float(t.max()))
        ax.set_ylim(-0.1, max(top, first[0]["treat_all"]) + 0.05)
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.tick_params(length=2, labelsize=6)
        ax.legend(loc="lower left", frameon=False, fontsize=6.5)
    return fig


# --- class activation maps -----------------------------------------------------


def cam_figure(cams):
    """Class activation maps on the first and second CXR of each given pair, one colour scale per pair.

    Parameters
    ----------
    cams : list of dict
        ``{"pair_id", "label", "first": {"image", "heatmap"}, "second": {...}}``,
        optionally ``"outcome"``, ``"probability"`` (out-of-fold probability of
        Worse), ``"label_first"`` and ``"label_second"`` (the label's probability
        on each CXR); ``image`` and ``heatmap`` are 2-D float arrays (the
        heatmap is stretched over the image if the sizes differ).

    Returns
    -------
    matplotlib.figure.Figure
        One row per pair: the CXR in gray, the map overlaid with a
        perceptually ordered colour map (inferno, monotone in lightness) and
        contour lines at 50% and 80% of the pair's maximum, so it reads in
        grayscale. Both CXRs of a pair share one scale (0 = the lower of the two
        minima, 1 = the higher of the two maxima), so their activations compare.

    References
    ----------
    Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A. Learning deep features
    for discriminative localization. Proc IEEE CVPR 2016:2921-2929.
    """
    cams = list(cams or [])
    nrows = max(1, len(cams))
    with matplotlib.rc_context(_RC):
        fig = _figure(6.6, 3.1 * nrows + 0.2)
        axes = fig.subplots(nrows, 2, squeeze=False)
        mappable = None
        for row, cam in zip(axes, cams):
            heats = {w: np.asarray(cam[w]["heatmap"], dtype=float) for w in ("first", "second")}
            lo = min(np.nanmin(h) for h in heats.values())
            hi = max(np.nanmax(h) for h in heats.values())
            for ax, which in zip(row, ("first", "second")):
                img = np.asarray(cam[which]["image"], dtype=float)
                if img.ndim == 3:
                    img = img.mean(axis=-1) if img.shape[-1] in (1, 3, 4) else img[0]
                heat = heats[which]
                h, w = img.shape
                extent = (0, w, h, 0)
                norm_heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
                ax.imshow(img, cmap="gray", extent=extent, interpolation="bilinear")
                mappable = ax.imshow(norm_heat, cmap="inferno", alpha=0.45, extent=extent, vmin=0, vmax=1,
                                     interpolation="bilinear")
                yy = np.linspace(0, h, norm_heat.shape[0])
                xx = np.linspace(0, w, norm_heat.shape[1])
                for level, style in ((0.5, "--"), (0.8, "-")):
                    if np.nanmin(norm_heat) < level < np.nanmax(norm_heat):
                        ax.contour(xx, yy, norm_heat, levels=[level], colors="white", linestyles=style,
                                   linewidths=0.8)
                title = f"Pair {_plain(cam.get('pair_id', '?'))}"
                if cam.get("outcome"):
                    title += f" ({_plain(cam['outcome'])})"
                title += f", {which} CXR\n{_plain(cam.get('label', ''))}"
                p_lab = cam.get(f"label_{which}")
                if p_lab is not None:
                    title += f": probability {_fmt(p_lab, 2)}"
                ax.set_title(title, fontsize=7.5)
                ax.set_xticks([])
                ax.set_yticks([])
        if not cams:
            for ax in axes.flat:
                ax.axis("off")
            fig.text(0.5, 0.5, "No class activation maps were computed.", ha="center")
        elif mappable is not None:
            fig.subplots_adjust(left=0.02, right=0.86, top=0.94, bottom=0.03, wspace=0.05, hspace=0.25)
            cax = fig.add_axes((0.885, 0.15, 0.025, 0.7))
            cb = fig.colorbar(mappable, cax=cax)
            cb.set_label("activation, one scale per pair (0-1)")
    return fig


# --- revalidation: headline estimates across validations ---------------------


def _panels(revalidation):
    """The series shown: headline protocol accuracy and AUC, then the per-label validation AUCs."""
    protocol = revalidation.get("headline_protocol") or "nested"
    by_key = {(s["quantity"], s["label"], s["protocol"]): s for s in revalidation.get("series") or []}
    panels = []
    for quantity, title in (("accuracy", "accuracy"), ("AUC", "AUC")):
        s = by_key.get((quantity, None, protocol))
        if s is not None:
            panels.append((f"Prediction {title} ({protocol})", s))
    for s in revalidation.get("series") or []:
        if s["quantity"] == "validation AUC":
            panels.append((f"{s['label']}: validation AUC", s))
    return panels


def trend_figure(revalidation, *, ncols=4):
    """Headline estimates with 95% CIs across successive validations (small multiples).

    One panel per headline number: the headline protocol's prediction
    accuracy and AUC, then each label's validation AUC. In each panel, one
    point per validation (oldest left, the new one right) with its CI as an
    error bar; a validation not comparable with the new one (other weights or
    preprocessing) is drawn with an open marker. Black and gray only, so it
    reads in grayscale.

    Parameters
    ----------
    revalidation : dict
        The record :func:`compare` returns.
    ncols : int, default 4
        Panels per row.

    Returns
    -------
    matplotlib.figure.Figure
        Drawn with the Agg canvas (no pyplot, no global state).

    Raises
    ------
    ReportError
        When the record holds no series to plot.
    """
    from matplotlib.lines import Line2D

    panels = _panels(revalidation)
    if not panels:
        raise ReportError("nothing to plot: the revalidation record has no headline series "
                          "(no validation AUCs and no prediction results)")
    n = len(panels)
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.2 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    points0 = panels[0][1]["points"]
    ticks = list(range(1, len(points0) + 1))
    ticklabels = [(p["created"] or "")[:10] + ("\n(new)" if p["which"] == "new" else "") or p["which"]
                  for p in points0]
    for ax, (title, s) in zip(axes.flat, panels):
        xs_ok, ys_ok, err_ok, xs_nc, ys_nc, err_nc, line_x, line_y = [], [], [], [], [], [], [], []
        for x, p in zip(ticks, s["points"]):
            y = p["estimate"]
            if y is None:
                continue
            lo = max(0.0, y - p["ci_low"]) if p["ci_low"] is not None else 0.0
            hi = max(0.0, p["ci_high"] - y) if p["ci_high"] is not None else 0.0
            line_x.append(x)
            line_y.append(y)
            if p["comparable"]:
                xs_ok.append(x), ys_ok.append(y), err_ok.append((lo, hi))
            else:
                xs_nc.append(x), ys_nc.append(y), err_nc.append((lo, hi))
        if line_x:
            ax.plot(line_x, line_y, color="0.6", linewidth=0.8, zorder=1)
        if xs_ok:
            ax.errorbar(xs_ok, ys_ok, yerr=list(zip(*err_ok)), fmt="o", color="black", markersize=4,
                        capsize=2, linewidth=1, zorder=2)
        if xs_nc:
            ax.errorbar(xs_nc, ys_nc, yerr=list(zip(*err_nc)), fmt="o", color="0.35", markerfacecolor="white",
                        markersize=4, capsize=2, linewidth=1, linestyle="none", zorder=2)
        if not line_x:
            ax.text(0.5, 0.5, "not estimable", ha="center", va="center", transform=ax.transAxes, color="0.4")
        if s["quantity"] in ("validation AUC", "AUC", "accuracy"):
            ax.set_ylim(0, 1.02)
            ax.axhline(0.5, color="0.8", linewidth=0.6, linestyle="--", zorder=0)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xticks(ticks)
        ax.set_xticklabels(ticklabels, rotation=45, ha="right", fontsize=6)
        ax.set_xlim(0.5, len(ticks) + 0.5)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", color="black", linestyle="none", markersize=4,
                      label="estimate with 95% CI"),
               Line2D([], [], marker="o", color="0.35", markerfacecolor="white", linestyle="none", markersize=4,
                      label="not comparable (other weights or preprocessing)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    fig.suptitle("Headline estimates across successive validations", fontsize=10)
    return fig


# --- saving -------------------------------------------------------------------


def save_figure(fig, stem, folder, *, dpi=200):
    """Write ``fig`` as ``folder/stem.png`` and ``folder/stem.svg``, deterministically.

    The SVG uses a fixed hash salt and no date; the PNG carries no time
    stamp. Each file is written atomically (:func:`covreport._io.atomic_write_bytes`).

    Returns
    -------
    dict
        ``{"png": Path, "svg": Path}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with matplotlib.rc_context(_RC):
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=dpi, metadata=meta, facecolor="white", bbox_inches="tight",
                        pad_inches=0.05)
            out[ext] = atomic_write_bytes(folder / f"{stem}.{ext}", buf.getvalue(), error_class=ReportError)
    return out
