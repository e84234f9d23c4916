"""The line report's figures: perplexity per generation, and how many generations trained each tensor.

Drawn like charts.py (Agg, no pyplot state, LaTeX off, text from data through `literal`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .charts import DPI, _no_latex, _png, grid_axes, literal

PROMOTED_COLOR = "#2ca02c"
REJECTED_COLOR = "#d62728"
BASE_COLOR = "#7f7f7f"
PRODUCTION_BAND = "#fff2b3"
MAX_ANNOTATED_CELLS = 600  # counts are written in the cells of a map up to this size
MAX_LABEL = 40  # characters of a dataset or drop name drawn in a chart (the page's text and tables hold the whole name)


@dataclass(frozen=True)
class Series:
    """One dataset's perplexity over the line: the trained model's and its starting (base) model's, per generation."""

    label: str
    trained: list[float | None]
    base: list[float | None]


@dataclass(frozen=True)
class Panel:
    title: str
    series: list[Series]


@dataclass(frozen=True)
class CountCell:
    """One cell of the map: a layer (None: not in a layer) and a module type, and the generations that trained it."""

    layer: int | None
    module_type: str
    count: int


@_no_latex
def perplexity_over_generations(
    generations: Sequence[int], ticks: Sequence[str], promoted: Sequence[bool], production: int | None, panels: Sequence[Panel]
) -> bytes:
    """One panel per kind of perplexity: trained (promoted o, rejected x) and starting model (dashed), production shaded."""
    figure = Figure(figsize=(10, 3.9), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels), squeeze=False).ravel())
    x = np.array(generations, dtype=float)
    kept = np.array(promoted, dtype=bool)
    for ax, panel in zip(axes, panels, strict=True):
        if production is not None:
            ax.axvspan(production - 0.4, production + 0.4, color=PRODUCTION_BAND, zorder=0)
        for series in panel.series:
            trained, base = _values(series.trained), _values(series.base)
            label = literal(_clip(series.label))
            line = ax.plot(x, trained, linewidth=1.6, label=label, zorder=2)[0]
            ax.plot(x, base, linestyle="--", color=line.get_color(), alpha=0.55, linewidth=1.2, zorder=1)
            ax.scatter(x[kept], trained[kept], s=46, c=PROMOTED_COLOR, edgecolors="black", linewidths=0.5, zorder=3)
            ax.scatter(x[~kept], trained[~kept], s=70, c=REJECTED_COLOR, marker="X", edgecolors="black", linewidths=0.5, zorder=3)
            ax.scatter(x, base, s=18, facecolors="white", edgecolors=BASE_COLOR, zorder=2)
        ax.set_title(literal(panel.title), fontsize=11, loc="left")
        ax.set_xticks(x, [literal(_clip(t)) for t in ticks], fontsize=8)
        ax.set_xlim(x.min() - 0.6, x.max() + 0.6)
        ax.set_xlabel("generation")
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
        if len(panel.series) > 1:
            ax.legend(fontsize=8, frameon=False)
        if not panel.series:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color=BASE_COLOR)
    handles = [
        Line2D([], [], marker="o", linestyle="", markerfacecolor=PROMOTED_COLOR, markeredgecolor="black", label="promoted"),
        Line2D([], [], marker="X", linestyle="", markerfacecolor=REJECTED_COLOR, markeredgecolor="black", markersize=8, label="rejected"),
        Line2D([], [], marker="o", linestyle="--", color=BASE_COLOR, markerfacecolor="white", label="starting model (base)"),
    ]
    if production is not None:
        handles.append(Patch(facecolor=PRODUCTION_BAND, label="production now"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    return _png(figure)


@_no_latex
def trained_count_map(cells: Sequence[CountCell], generations: int, title: str) -> bytes:
    """Layers (rows) x module types (columns), colour = how many of the line's generations trained the cell's tensors."""
    types = list(dict.fromkeys([c.module_type for c in cells if c.layer is not None] + [c.module_type for c in cells]))
    layers = sorted({c.layer for c in cells if c.layer is not None})
    rows: list[int | None] = [*layers, *([None] if any(c.layer is None for c in cells) else [])]
    grid = np.full((len(rows), len(types)), np.nan)
    for cell in cells:
        r, c = rows.index(cell.layer), types.index(cell.module_type)
        grid[r, c] = cell.count if np.isnan(grid[r, c]) else max(grid[r, c], cell.count)
    width = min(11.0, max(6.5, 2.2 + 0.8 * len(types)))
    height = min(16.0, max(3.2, 1.9 + 0.3 * len(rows)))
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    cmap = colormaps["Blues"].resampled(generations + 1).with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=generations + 0.5, aspect="auto", interpolation="nearest")
    if grid.size <= MAX_ANNOTATED_CELLS:
        for r, c in zip(*np.nonzero(np.isfinite(grid)), strict=True):
            value = int(grid[r, c])
            ax.text(c, r, str(value), ha="center", va="center", fontsize=8, color="white" if value > generations / 2 else "black")
    grid_axes(ax, types, rows, title)
    bar = figure.colorbar(image, ax=ax, label=f"generations (of {generations})", shrink=0.9)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(
        handles=[Patch(facecolor=cmap.get_bad(), edgecolor="#cccccc", label="no tensor")],
        loc="outside lower center",
        frameon=False,
        fontsize=9,
    )
    return _png(figure)


def _values(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None or not math.isfinite(v) else float(v) for v in values], dtype=float)


def _clip(text: str) -> str:
    return "\n".join(line if len(line) <= MAX_LABEL else line[: MAX_LABEL - 1] + "…" for line in str(text).split("\n"))
