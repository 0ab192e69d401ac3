"""The leaderboard's plots (matplotlib, written as SVG text that the HTML page inlines).

Accuracies carry error bars of ± 2 standard errors and a dashed line at the task's chance level, so a
reader sees at once which differences are noise; perplexities get their own panel, lower is better.
"""

from __future__ import annotations

import io
import re

from minitron.evaluate import CHANCE
from minitron.report import ACCURACY, PERPLEXITY, Row

_STYLE = {  # role → marker, face colour (None = hollow), size
    "teacher": ("s", "#1f4e9a", 90),
    "student": ("o", "#d9541e", 70),
    "model": ("D", "#3b8c3b", 60),
}


def svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE so the SVG can sit inside HTML
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # creator / date: not content


def figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit: the report is written from servers too
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "minitron"})
    return plt.figure(figsize=(width, height), layout="constrained")


def plot_accuracy_vs_params(rows: list[Row]) -> str | None:
    labels = [label for label in ACCURACY if any(label in r.scores for r in rows)]
    if not labels:
        return None
    fig = figure(4.2 * len(labels), 3.6)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        names: dict[tuple[float, float], list[Row]] = {}  # models on the same spot share one label
        for row in rows:
            if label not in row.scores:
                continue
            teacher = row.teacher
            if teacher is not None and label in teacher.scores:  # lineage: a line from teacher to student
                ax.plot([teacher.params, row.params], [teacher.scores[label], row.scores[label]],
                        color="#999999", lw=0.8, ls=":" if row.published else "-", zorder=1)
            marker, colour, size = _STYLE[row.role]
            face = "none" if row.published else colour
            if label in row.stderr:  # ± 2 standard errors (about the 95 % interval), within 0-100 %
                y, e = row.scores[label], 2 * row.stderr[label]
                ax.errorbar(row.params, y, yerr=[[min(e, y)], [min(e, 100 - y)]], color=colour, lw=1, capsize=3, zorder=1)
            ax.scatter(row.params, row.scores[label], marker=marker, s=size, facecolors=face,
                       edgecolors="#777777" if row.published else colour, linewidths=1.4, zorder=2)
            names.setdefault((row.params, row.scores[label]), []).append(row)
        for (params, score), same in names.items():
            published = all(r.published for r in same)
            ax.annotate(", ".join(r.name for r in same), (params, score), fontsize=6 if published else 7,
                        xytext=(4, 3), textcoords="offset points", color="#777777" if published else "#222222")
        if label in CHANCE:
            ax.axhline(CHANCE[label], color="#aa3333", lw=0.9, ls="--", zorder=0)  # named in the legend: a label
            # inside the axes sat on the points it should explain (GSM8K's chance is 0 %, where students land)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (total)")
        ax.set_ylabel(f"{label} accuracy (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles = [
        _legend_handle(role, published) for role, published in
        (("teacher", False), ("student", False), ("model", False), ("teacher", True), ("student", True))
        if any(r.role == role and r.published == published for r in rows)
    ]  # fmt: skip
    if any(label in CHANCE for label in labels):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="#aa3333", lw=0.9, ls="--", label="chance level"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return svg(fig)


def _legend_handle(role: str, published: bool):
    from matplotlib.lines import Line2D

    marker, colour, _ = _STYLE[role]
    return Line2D([], [], marker=marker, ls="", markersize=8, markerfacecolor="none" if published else colour,
                  markeredgecolor="#777777" if published else colour,
                  label=f"{role} ({'published' if published else 'measured'})")


def plot_task_bars(rows: list[Row]) -> str | None:
    labels = [label for label in ACCURACY if any(label in r.scores for r in rows)]
    if not labels:
        return None
    import numpy as np

    fig = figure(max(6.0, 1.2 + 0.5 * len(rows) * len(labels)), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for j, row in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i, label in enumerate(labels) if label in row.scores]
        ys = [row.scores[label] for label in labels if label in row.scores]
        errors = [2 * row.stderr.get(label, 0.0) for label in labels if label in row.scores]
        errors = [[min(e, y) for e, y in zip(errors, ys)], [min(e, 100 - y) for e, y in zip(errors, ys)]]
        ax.bar(xs, ys, width, color="white" if row.published else colours[j], edgecolor=colours[j],
               hatch="///" if row.published else None, label=f"{row.name}{' (published)' if row.published else ''}",
               yerr=errors if any(map(any, errors)) else None, error_kw={"lw": 1, "capsize": 2, "ecolor": "#333333"})
    for i, label in enumerate(labels):
        if label in CHANCE:
            ax.hlines(CHANCE[label], i - 0.45, i + 0.45, color="#aa3333", lw=1.2, ls="--",
                      label="chance" if i == 0 else None)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return svg(fig)


def plot_perplexity(rows: list[Row]) -> str | None:
    """Perplexities, one panel each, log scale: for small models these, not the accuracies, are the signal."""
    labels = [label for label in PERPLEXITY if any(label in r.scores for r in rows)]
    if not labels:
        return None
    shown = [r for r in rows if any(label in r.scores for label in labels)]
    fig = figure(4.2 * len(labels), 0.9 + 0.35 * len(shown))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        have = [r for r in shown if label in r.scores]
        ys = range(len(have))
        # Bars start at 1, the perplexity of a model that is always sure and right (0 has no place on a log axis).
        ax.barh(list(ys), [r.scores[label] - 1 for r in have], left=1, color=[f"C{shown.index(r) % 10}" for r in have])
        for y, row in zip(ys, have):
            ax.text(row.scores[label], y, f" {row.scores[label]:,.1f}", va="center", fontsize=7)
        ax.set_yticks(list(ys), [r.name for r in have], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(1, max(r.scores[label] for r in have) * 30)  # room for the value labels
        ax.set_xlabel(f"{label} (lower is better)")
        ax.grid(axis="x", alpha=0.3)
    return svg(fig)


def plot_retained(pairs: list[tuple[Row, Row, dict[str, float]]]) -> str | None:
    if not pairs:
        return None
    fig = figure(7.0, 0.9 + 0.45 * sum(len(kept) for _, _, kept in pairs))
    ax = fig.add_subplot(1, 1, 1)
    y, ticks = 0, []
    for student, teacher, kept in pairs:
        for label, value in kept.items():
            colour = f"C{ACCURACY.index(label)}"
            ax.barh(y, value, color="white" if student.published else colour, edgecolor=colour,
                    hatch="///" if student.published else None)
            ax.text(value + 1, y, f"{value:.1f}%", va="center", fontsize=7)
            ticks.append((y, f"{student.name} / {teacher.name}: {label}{' (published)' if student.published else ''}"))
            y += 1
    ax.axvline(100, color="#444444", lw=0.8)
    ax.set_yticks([t for t, _ in ticks], [name for _, name in ticks], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("student accuracy as % of its teacher's")
    ax.grid(axis="x", alpha=0.3)
    return svg(fig)
