"""The report's figures, drawn with matplotlib's Agg backend (no display, no pyplot state) and returned as PNG bytes.

Text from data (tensor and module names, run labels, methods) is drawn as it is: every such string
goes through `literal` (a `$` would start mathtext, and `$\\foo$` in a tensor name was a traceback),
and every figure is drawn with LaTeX off whatever the user's matplotlibrc says. Our own mathtext
(the log axes' powers of ten) still renders.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 110
SELECTED = "#d62728"
CHANGED = "#ff7f0e"
FROZEN = "#7f7f7f"
NO_LAYER = "no layer"


@dataclass(frozen=True)
class HeatCell:
    """One tensor on the SNR map."""

    layer: int | None  # None: not in a layer (embeddings, the output head)
    module_type: str
    snr: float
    selected: bool = False
    changed: bool = False


@dataclass(frozen=True)
class Curve:
    """One training's per-step loss and learning rate."""

    label: str
    steps: list[int]
    loss: list[float | None]
    learning_rate: list[float | None]


@dataclass(frozen=True)
class DriftPanel:
    label: str
    before: list[float]
    after: list[float]
    changed: list[bool]


def literal(text: object) -> str:
    """A string from data, shown by matplotlib exactly as it is (no mathtext)."""
    return str(text).replace("$", r"\$")


def _no_latex(draw):
    """Draw with LaTeX off (a matplotlibrc with text.usetex would send every name to a LaTeX that may not exist)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with rc_context({"text.usetex": False}):
            return draw(*args, **kwargs)

    return drawn


@_no_latex
def snr_heatmap(cells: Sequence[HeatCell], title: str, show_changed: bool) -> bytes:
    """Layers (rows) x module types (columns), colour = SNR; selected cells outlined, changed tensors dotted."""
    types = _unique([c.module_type for c in cells if c.layer is not None] + [c.module_type for c in cells if c.layer is None])
    layers = sorted({c.layer for c in cells if c.layer is not None})
    rows: list[int | None] = [*layers, *([None] if any(c.layer is None for c in cells) else [])]
    grid = np.full((len(rows), len(types)), np.nan)
    selected = np.zeros(grid.shape, dtype=bool)
    changed = np.zeros(grid.shape, dtype=bool)
    for cell in cells:
        r, c = rows.index(cell.layer), types.index(cell.module_type)
        if math.isfinite(cell.snr):
            grid[r, c] = cell.snr if np.isnan(grid[r, c]) else max(grid[r, c], cell.snr)  # a stack of tensors: its best
        selected[r, c] |= cell.selected
        changed[r, c] |= cell.changed
    width = min(11.0, max(6.5, 2.2 + 0.8 * len(types)))
    height = min(16.0, max(3.2, 1.9 + 0.3 * len(rows)))
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    finite = grid[np.isfinite(grid)]
    positive = finite.size and finite.min() > 0
    norm = LogNorm(finite.min(), finite.max()) if positive and finite.max() / finite.min() >= 20 else Normalize(*_span(finite))
    cmap = _colormap()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for r, c in zip(*np.nonzero(selected), strict=True):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=SELECTED, linewidth=2.4, zorder=3))
    if show_changed and changed.any():
        rs, cs = np.nonzero(changed)
        ax.scatter(cs, rs, s=_dot_size(len(rows)), c="white", edgecolors="black", linewidths=0.8, zorder=4)
    grid_axes(ax, types, rows, title)
    bar = figure.colorbar(image, ax=ax, label="SNR" + (" (log scale)" if isinstance(norm, LogNorm) else ""), shrink=0.9)
    if isinstance(norm, LogNorm):  # plain numbers at 1, 2, 5 x 10^k rather than powers of ten only
        bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    handles = [Patch(facecolor="none", edgecolor=SELECTED, linewidth=2, label="selected")]
    if show_changed:
        handles.append(
            Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black", label="changed in training")
        )
    handles.append(Patch(facecolor=cmap.get_bad(), edgecolor="#cccccc", label="no tensor"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    return _png(figure)


@_no_latex
def loss_curves(curves: Sequence[Curve]) -> bytes:
    """Training loss per step (top) and the learning rate (bottom), one line per training."""
    figure = Figure(figsize=(9, 5.6), dpi=DPI, layout="constrained")
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    for curve in curves:
        marker = "o" if len(curve.steps) <= 30 else None
        line = loss_ax.plot(curve.steps, _nan(curve.loss), label=literal(curve.label), linewidth=1.6, marker=marker, markersize=3)
        lr_ax.plot(curve.steps, _nan(curve.learning_rate), color=line[0].get_color(), linewidth=1.4)
    loss_ax.set_ylabel("training loss")
    loss_ax.grid(alpha=0.3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(curves) > 1:
        loss_ax.legend(fontsize=9, frameon=False, ncols=min(3, len(curves)))
    return _png(figure)


@_no_latex
def comparison_bars(rows: Sequence[dict], summary: Sequence[dict] | None = None) -> bytes:
    """Time per step, peak memory and perplexity of each method (ratios to full fine-tuning above the bars).

    With `summary` (compare_stats.summarize of rows over several seeds) the bars are the means over seeds with ±1 sd
    error bars, and a fourth panel draws each arm's paired difference in perplexity to the baseline with its 95% interval.
    """
    arms = _seed_means(summary) if summary is not None else [_one_seed(r) for r in rows]
    methods = [literal(a["method"]) for a in arms]
    figure = Figure(figsize=(14 if summary is not None else 11, 4.2), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, 4 if summary is not None else 3)
    time_ax, memory_ax, ppl_ax = axes[:3]
    x = np.arange(len(methods))
    for ax, column, title in ((time_ax, "step_seconds", "time per step (s)"), (memory_ax, "peak_memory_mib", "peak memory (MiB)")):
        values, errors = np.array([a[column][0] for a in arms]), np.array([a[column][1] for a in arms])
        bars = ax.bar(x, np.nan_to_num(values), color="#4c72b0", yerr=_errors(errors), capsize=3)
        for bar, value, arm in zip(bars, values, arms, strict=True):
            factor = arm["ratios"][column]
            text = "n/a" if math.isnan(value) else (f"×{factor:.2f}" if not math.isnan(factor) else "")
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_title(title, fontsize=11)
        ax.margins(y=0.15)
    width = 0.38
    for offset, (column, base, label, color) in enumerate(PERPLEXITIES):
        values, errors = np.array([a[column][0] for a in arms]), np.array([a[column][1] for a in arms])
        positions = x + (offset - 0.5) * width
        ppl_ax.bar(positions, np.nan_to_num(values), width, label=f"{label} (trained)", color=color, yerr=_errors(errors), capsize=2)
        for position in positions[np.isnan(values)]:
            ppl_ax.annotate("n/a", (position, 0), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        bases = [b for r in rows if not math.isnan(b := _float(r.get(base)))]
        if bases:
            ppl_ax.axhline(bases[0], color=color, linestyle="--", linewidth=1.2, label=f"{label} (base model)")
    ppl_ax.set_title("perplexity (lower is better)" + (", mean ± sd" if summary is not None else ""), fontsize=11)
    figure.legend(*ppl_ax.get_legend_handles_labels(), loc="outside lower right", ncols=4, fontsize=9, frameon=False)
    ppl_ax.margins(y=0.1)
    for ax in (time_ax, memory_ax, ppl_ax):
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    if summary is not None:
        _paired_intervals(axes[3], summary)
    return _png(figure)


PERPLEXITIES = (
    ("heldout_perplexity", "heldout_perplexity_base", "held-out", "#55a868"),
    ("general_perplexity", "general_perplexity_base", "general", "#c44e52"),
)


def _paired_intervals(ax, summary: Sequence[dict]) -> None:
    """Each arm's perplexity − the baseline's, paired by seed: the mean and its 95% interval (a filled marker: excludes 0)."""
    compared = [entry for entry in summary if entry.get("differences") is not None]
    y = np.arange(len(compared))
    for offset, (column, _, label, color) in enumerate(PERPLEXITIES):
        for position, entry in zip(y + (offset - 0.5) * 0.3, compared, strict=True):
            interval = entry["differences"].get(column)
            if interval is None:
                continue
            low, high = interval["mean"] - interval["low"], interval["high"] - interval["mean"]
            ax.errorbar(
                interval["mean"],
                position,
                xerr=[[low], [high]],
                fmt="o",
                color=color,
                markerfacecolor=color if interval["excludes_zero"] else "white",
                capsize=3,
                label=label,
            )
    ax.axvline(0, color="#555555", linewidth=1)
    ax.set_yticks(y, [literal(entry["method"]) for entry in compared], fontsize=9)
    ax.invert_yaxis()
    baseline = next((entry["method"] for entry in summary if entry.get("differences") is None), "baseline")
    ax.set_title(f"perplexity − {literal(baseline)}\n95% interval, paired by seed", fontsize=11)
    ax.set_xlabel("filled marker: the interval excludes 0", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if not compared:
        ax.text(0.5, 0.5, "no arm to pair with", ha="center", va="center", transform=ax.transAxes, fontsize=9)


CHARTED = ("step_seconds", "peak_memory_mib", *(p[0] for p in PERPLEXITIES))


def _one_seed(row: dict) -> dict:
    """A row as (value, no error) per charted metric, and its ratios to full fine-tuning."""
    ratios = {"step_seconds": _float(row.get("time_ratio")), "peak_memory_mib": _float(row.get("memory_ratio"))}
    return {"method": row.get("method"), "ratios": ratios, **{c: (_float(row.get(c)), math.nan) for c in CHARTED}}


def _seed_means(summary: Sequence[dict]) -> list[dict]:
    """Each arm of a summary as (mean, sd) per charted metric, and the ratios of its means to full fine-tuning's."""
    arms = []
    for entry in summary:
        spreads = {c: entry["metrics"].get(c) or {} for c in CHARTED}
        arms.append({"method": entry["method"], **{c: (_float(s.get("mean")), _float(s.get("sd"))) for c, s in spreads.items()}})
    full = next((a for a in arms if a["method"] == "full"), None)
    for arm in arms:
        arm["ratios"] = {c: arm[c][0] / full[c][0] if full is not None and full[c][0] else math.nan for c in CHARTED[:2]}
    return arms


def _errors(errors: np.ndarray) -> np.ndarray | None:
    return None if np.isnan(errors).all() else np.nan_to_num(errors)


@_no_latex
def drift_scatter(panels: Sequence[DriftPanel]) -> bytes:
    """SNR before vs after training per tensor: changed tensors in orange, frozen in grey (on the diagonal)."""
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    side = 4.6 if columns == 1 else 3.7
    figure = Figure(figsize=(min(11, 0.8 + side * columns), side * lines + 0.3), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(figure.subplots(lines, columns, squeeze=False).ravel())
    for ax, panel in zip(axes, panels, strict=False):
        before, after, changed = np.array(panel.before, float), np.array(panel.after, float), np.array(panel.changed, bool)
        values = np.concatenate([before, after])
        values = values[np.isfinite(values)]
        low, high = _span(values)
        logarithmic = values.size > 0 and low > 0 and high / low >= 50  # SNRs over decades: log axes, the diagonal stays straight
        if logarithmic:
            ax.set_xscale("log")
            ax.set_yscale("log")
            low, high = low / 1.3, high * 1.3
        else:
            pad = (high - low) * 0.05 or 1.0
            low, high = low - pad, high + pad
        ax.plot([low, high], [low, high], color="#bbbbbb", linewidth=1, zorder=1, label="no change")
        ax.scatter(before[~changed], after[~changed], s=22, c=FROZEN, label=f"frozen ({int((~changed).sum())})", zorder=2)
        ax.scatter(
            before[changed],
            after[changed],
            s=26,
            c=CHANGED,
            edgecolors="black",
            linewidths=0.4,
            label=f"changed ({int(changed.sum())})",
            zorder=3,
        )
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_xlabel("SNR before training")
        ax.set_ylabel("SNR after training")
        ax.set_title(literal(panel.label), fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", framealpha=0.85, edgecolor="none")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#eeeeee")


def _span(values: np.ndarray) -> tuple[float, float]:
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _dot_size(rows: int) -> float:
    return max(8.0, min(60.0, 1400.0 / max(rows, 1)))


def _float(value) -> float:
    return float(value) if value is not None else math.nan


def _nan(values: Sequence[float | None]) -> list[float]:
    return [_float(v) for v in values]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def grid_axes(ax, types: Sequence[str], rows: Sequence[int | None], title: str) -> None:
    """The axes of a layers x module-types grid: type labels, at most 40 layer labels, white cell borders, the title."""
    ax.set_xticks(range(len(types)), [literal(t) for t in types], rotation=35, ha="right", fontsize=9)
    step = max(1, math.ceil(len(rows) / 40))
    ticks = [i for i in range(len(rows)) if i % step == 0 or rows[i] is None]
    ax.set_yticks(ticks, [NO_LAYER if rows[i] is None else f"layer {rows[i]}" for i in ticks], fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(types)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(literal(title), fontsize=11, loc="left")
