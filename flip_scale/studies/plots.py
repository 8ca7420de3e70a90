"""Figures and summary tables of runs (matplotlib, headless: the Agg backend, no display needed)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

from .runs import AXIS_LABELS, Run, format_value, group_order, run_labels

METRIC_LABELS = {"loss": "training loss", "zero_shot_top1": "zero-shot top-1", "zero_shot_top5": "zero-shot top-5",
                 "retrieval_i2t_r1": "image->text R@1", "retrieval_t2i_r1": "text->image R@1"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (set before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _log_x(ax) -> None:
    """A logarithmic x axis with labels at the decades only (minor labels overlap on narrow panels)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (tensorboard's smoothing); 0 keeps the values."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n) if weight else value)
    return out


def plot_runs(runs: list[Run], x: str, metrics: list[str], size=(1000, 400), dpi: int = 100,
              smoothing: float = 0.0, log_x: Optional[bool] = None, labels: Optional[list[str]] = None):
    """One panel per metric, one curve per run, labelled by what differs between the runs' configs.
    -> the matplotlib Figure (its axes' lines carry the labels)."""
    plt = pyplot()
    labels = labels or run_labels(runs)
    width, height = size
    fig, axes = plt.subplots(1, len(metrics), figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False)
    log_x = x in ("flops",) if log_x is None else log_x
    for ax, metric in zip(axes[0], metrics):
        for run, label in zip(runs, labels):
            xs, ys = run.series(metric, x)
            if not xs:
                continue
            if metric == "loss" and smoothing:
                ys = smooth(ys, smoothing)
            marker = "o" if len(xs) <= 12 else None
            ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        ax.set_xlabel(AXIS_LABELS[x])
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        if log_x:
            _log_x(ax)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=ax.transAxes)
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    if notes:
        fig.text(0.01, 0.005, "; ".join(notes), fontsize="x-small", color="firebrick", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    return fig


def final_points(runs: list[Run], x: str, metric: str, group_key: str) -> dict:
    """{group value: ([x of each run's last `metric`], [that value], [run names])}, each group in
    increasing x: the runs of one value of `group_key` (e.g. one mask ratio at several lengths)."""
    from ..config import flatten_tree

    groups: dict = {}
    for run in runs:
        xs, ys = run.series(metric, x)
        if not xs:
            continue
        flat = flatten_tree(run.config)
        if group_key not in flat:
            raise ValueError(f"{run.name}: {group_key} is not one of its config keys")
        groups.setdefault(format_value(flat[group_key]), []).append((xs[-1], ys[-1], run.name))
    return {k: tuple(map(list, zip(*sorted(groups[k])))) for k in sorted(groups, key=group_order)}


def plot_finals(runs: list[Run], x: str, metrics: list[str], group_key: str, size=(1000, 400), dpi: int = 100,
                log_x: Optional[bool] = None):
    """One panel per metric: each run's final value as a point at its x (its whole training), the
    runs of one value of `group_key` joined into a curve labelled `group_key=value` (FLIP's figure:
    accuracy of each schedule length against its time or compute, one curve per mask ratio)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    log_x = x in ("flops",) if log_x is None else log_x
    for ax, metric in zip(axes[0], metrics):
        for value, (xs, ys, _names) in final_points(runs, x, metric, group_key).items():
            ax.plot(xs, ys, marker="o", markersize=4, label=f"{group_key}={value}")
        ax.set_xlabel(AXIS_LABELS[x] + (" of the run" if x != "step" else ""))
        ax.set_ylabel(f"final {METRIC_LABELS.get(metric, metric)}")
        if log_x:
            _log_x(ax)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, out, svg: bool = False, dpi: int = 100) -> list[Path]:
    """Write the figure as PNG at its own size in pixels (and SVG beside it); -> the files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    files = [out]
    if svg:
        files.append(out.with_suffix(".svg"))
        fig.savefig(files[-1])
    return files


SUMMARY_COLUMNS = ("run", "label", "steps", "samples", "compute (FLOPs)", "train time (s)", "final loss",
                   "zero-shot top-1", "notes")


def summary_rows(runs: list[Run], labels: Optional[list[str]] = None) -> list[list[str]]:
    labels = labels or run_labels(runs)
    rows = []
    for run, label in zip(runs, labels):
        loss, top1 = run.final("loss"), run.final("zero_shot_top1")
        seconds = run.train_seconds()
        rows.append([run.name, label, f"{run.last_step}/{run.max_steps}", str(int(run.samples_at(run.last_step))),
                     f"{run.compute:.3e}", f"{seconds[-1]:.0f}" if seconds else "-",
                     "-" if loss is None else f"{loss:.4f}", "-" if top1 is None else f"{top1:.3f}",
                     "; ".join(run.notes)])
    return rows


def summary_text(runs: list[Run], labels: Optional[list[str]] = None) -> str:
    rows = [list(SUMMARY_COLUMNS), *summary_rows(runs, labels)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_summary(runs: list[Run], out, labels: Optional[list[str]] = None) -> Path:
    """The summary table as HTML (out ends in .html) or as a PNG table (.png)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs, labels)
    if out.suffix == ".html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        out.write_text(f"<!doctype html><meta charset='utf-8'><title>runs</title>"
                       f"<style>td,th{{padding:2px 8px;font-family:monospace;text-align:left}}</style>"
                       f"<table border='1' style='border-collapse:collapse'><tr>{head}</tr>{body}</table>\n")
        return out
    if out.suffix != ".png":
        raise ValueError(f"summary table {out}: use a .html or .png file name")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(14, 0.6 + 0.3 * (len(rows) + 1)), dpi=100)
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=list(SUMMARY_COLUMNS), loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(SUMMARY_COLUMNS))))
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_fit(groups: dict, fits: dict, frontier_points: list[tuple[float, float]], ylabel: str,
             size=(800, 500), dpi: int = 100, target: Optional[float] = None, accuracy: bool = False):
    """Points per group (e.g. per mask ratio), each group's fitted law, the frontier and the target.
    `groups`: name -> (compute list, value list); `fits`: name -> PowerLawFit of error or loss."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    every = [c for xs, _ in groups.values() for c in xs]
    grid = np.geomspace(min(every) / 1.5, max(every) * 1.5, 200) if every else np.array([])
    for name, (xs, ys) in groups.items():
        points = ax.plot(xs, ys, "o", label=f"{name}")[0]
        fit = fits.get(name)
        if fit is not None and len(grid):
            curve = fit(grid)
            unreliable = bool(fit.doubts())
            ax.plot(grid, 1 - curve if accuracy else curve, ":" if unreliable else "-", color=points.get_color(),
                    alpha=0.6, label=f"{name} fit: b={fit.b:.2f}" + (" (unreliable)" if unreliable else ""))
    if frontier_points:
        fx, fy = zip(*frontier_points)
        ax.plot(fx, fy, "k--", linewidth=1, label="frontier")
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {format_value(target)}")
    _log_x(ax)
    ax.set_xlabel(AXIS_LABELS["flops"])
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
