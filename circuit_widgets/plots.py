"""Static matplotlib figures of results, for papers, nbconvert and notebook previews.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): nothing touches the
global pyplot state, and it works under any backend.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "figure_bytes",
    "grid_values",
    "plot_attention",
    "plot_bars",
    "plot_curve",
    "plot_head_grid",
]


def grid_values(result: Any) -> np.ndarray:
    """The [n_layers, n_heads] values of a HeadGrid-like result, a tensor or an array, as float32."""
    values = getattr(result, "values", result)
    if callable(values):  # a pandas object or similar: its .values is a method
        values = result
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().float().numpy()
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(
            f"a head grid needs [n_layers, n_heads] values, got shape {tuple(arr.shape)}"
        )
    return arr


def plot_head_grid(
    values: Any,
    *,
    heads: Sequence[Any] | None = None,
    layers: Sequence[Any] | None = None,
    title: str | None = None,
    metric_name: str | None = None,
    selected: Iterable[Any] | None = None,
    ax: Any = None,
    sequential: bool = False,
):
    """Layer x head heatmap (layers as rows, top to bottom), blue-white-red centred at 0
    (``sequential=True``: white-red from 0, for values that are never negative).

    ``values`` is a HeadGrid-like result (its labels and metric name are used unless given),
    a 2-D tensor or an array. NaN cells (not computed) are hatched grey; ``selected`` heads
    (``Head``s, ``(layer, head)`` pairs or a ``Circuit``) are outlined. Returns the Figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    arr = grid_values(values)
    n_layers, n_heads = arr.shape
    heads = list(heads if heads is not None else getattr(values, "heads", None) or range(n_heads))
    layers = list(
        layers if layers is not None else getattr(values, "layers", None) or range(n_layers)
    )
    metric_name = metric_name or getattr(values, "metric_name", None) or "value"

    if ax is None:
        width = min(16.0, 2.6 + 0.42 * n_heads)
        height = min(16.0, 1.4 + 0.24 * n_layers)
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure

    finite = np.isfinite(arr)
    scale = float(np.abs(arr[finite]).max()) if finite.any() else 0.0
    scale = scale if scale > 0 else 1.0
    # NaN cells show the hatched background through the masked (transparent) image.
    ax.add_patch(
        Rectangle(
            (-0.5, -0.5),
            n_heads,
            n_layers,
            facecolor="#c8c8c8",
            edgecolor="#8a8a8a",
            hatch="///",
            linewidth=0,
            zorder=0,
        )
    )
    image = ax.imshow(
        np.ma.masked_invalid(arr),
        cmap="Reds" if sequential else "RdBu_r",
        vmin=0.0 if sequential else -scale,
        vmax=scale,
        aspect="auto",
        interpolation="nearest",
        zorder=1,
    )
    cbar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02, shrink=0.8 if n_layers > 8 else 1.0)
    cbar.set_label(str(metric_name))

    ax.set_xticks(
        range(n_heads),
        [str(h) for h in heads],
        rotation=90 if max((len(str(h)) for h in heads), default=0) > 3 else 0,
    )
    ax.set_yticks(range(n_layers), [str(l) for l in layers])
    ax.tick_params(labelsize=7 if n_layers > 20 or n_heads > 20 else 9, length=2)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(str(title), loc="left", fontsize=11)

    for layer, head in _pairs(selected):
        if 0 <= layer < n_layers and 0 <= head < n_heads:
            ax.add_patch(
                Rectangle(
                    (head - 0.5, layer - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="black",
                    linewidth=2,
                    zorder=3,
                )
            )
    if not finite.all():
        ax.legend(
            handles=[
                Patch(facecolor="#c8c8c8", edgecolor="#8a8a8a", hatch="///", label="not computed")
            ],
            loc="upper left",
            bbox_to_anchor=(0.0, 0.0),
            fontsize=8,
            frameon=False,
            handlelength=1.2,
        )
    return fig


def plot_attention(
    patterns: Any,
    tokens: Sequence[str],
    head_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    max_heads: int = 8,
):
    """Attention patterns [n_heads, query, key] as small heatmaps side by side (white = 0,
    dark = 1), tokens on both axes. Shows the first ``max_heads`` heads. Returns the Figure."""
    from matplotlib.figure import Figure

    arr = np.asarray(
        patterns.detach().cpu() if hasattr(patterns, "detach") else patterns, dtype=np.float32
    )
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"patterns must be [n_heads, s, s], got shape {tuple(arr.shape)}")
    n, s = arr.shape[0], arr.shape[1]
    if len(tokens) != s:
        raise ValueError(f"{len(tokens)} tokens for patterns over {s} positions")
    labels = list(head_labels) if head_labels is not None else [f"head {i}" for i in range(n)]
    shown = min(n, max_heads)
    side = min(4.5, 1.2 + 0.16 * s)
    fig = Figure(
        figsize=(max(3.0, side * max(shown, 1)), side + 1.8), dpi=100, layout="constrained"
    )  # room for rotated tokens
    if title:  # wrapped to the figure's width: one narrow head must not cut its title off
        width_chars = max(20, int(fig.get_figwidth() * 72 / (11 * 0.6)) - 2)
        fig.suptitle(textwrap.fill(str(title), width_chars), x=0.01, ha="left", fontsize=11)
    if shown == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no heads selected", ha="center", va="center", color="#666")
        return fig
    ticks = [repr(t)[1:-1] if t.strip() != t or not t else t for t in tokens]  # show edge spaces
    size = 7 if s <= 24 else 5
    axes = fig.subplots(1, shown, squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.imshow(arr[i], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_title(str(labels[i]), fontsize=9)
        ax.set_xticks(range(s), ticks if s <= 40 else [""] * s, rotation=90, fontsize=size)
        ax.set_yticks(range(s), ticks if (s <= 40 and i == 0) else [""] * s, fontsize=size)
        ax.tick_params(length=1)
        ax.set_xlabel("key", fontsize=8)
        if i == 0:
            ax.set_ylabel("query", fontsize=8)
    if n > shown:
        fig.text(0.99, 0.01, f"+{n - shown} more heads", ha="right", fontsize=8, color="#666")
    return fig


def plot_bars(
    values: dict[str, dict[str, float]],
    *,
    title: str | None = None,
    ylabel: str = "accuracy",
    ylim: tuple[float, float] | None = (0.0, 1.0),
):
    """Grouped bars: ``{group: {series: value}}`` (e.g. {"A": {"base": .66, "patched": .8}}). NaN
    bars are left out. Returns the Figure."""
    from matplotlib.figure import Figure

    groups = list(values)
    series: list[str] = []
    for g in groups:
        series += [k for k in values[g] if k not in series]
    fig = Figure(
        figsize=(max(3.5, 1.0 + 0.45 * len(groups) * max(1, len(series))), 3.0),
        dpi=100,
        layout="constrained",
    )
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    colors = ["#9e9e9e", "#2166ac", "#b2182b", "#4d9221", "#7b3294"]
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [float(values[g].get(name, np.nan)) for g in groups]
        bars = ax.bar(xs, ys, width=width * 0.92, label=name, color=colors[j % len(colors)])
        ax.bar_label(
            bars, labels=["" if np.isnan(y) else f"{y:.2f}" for y in ys], fontsize=7, padding=1
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(
        fontsize=8,
        frameon=False,
        ncols=max(1, len(series)),
        loc="upper left",
        bbox_to_anchor=(0, 1.15),
    )
    if title:
        ax.set_title(str(title), loc="left", fontsize=11, pad=22)
    return fig


def plot_curve(
    curves: dict[str, Sequence[float]],
    *,
    title: str | None = None,
    xlabel: str = "step",
    ylabel: str = "loss",
):
    """Line plot of one or more curves (e.g. a training loss). Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 2.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ys = np.asarray(curve, dtype=np.float32).reshape(-1)
        ax.plot(np.arange(len(ys)), ys, label=str(name), linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    if len(curves) > 1:
        ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(str(title), loc="left", fontsize=11)
    return fig


def figure_bytes(fig, fmt: str = "png", dpi: int = 100) -> bytes:
    """Render a Figure to PNG or SVG bytes without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not hasattr(fig.canvas, "print_figure"):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
    return buf.getvalue()


def _pairs(selected: Iterable[Any] | None) -> list[tuple[int, int]]:
    if selected is None:
        return []
    heads = getattr(selected, "heads", selected)  # a Circuit's heads
    out = []
    for item in heads:
        if hasattr(item, "layer") and hasattr(item, "head"):
            out.append((int(item.layer), int(item.head)))
        else:
            layer, head = item
            out.append((int(layer), int(head)))
    return sorted(out)
