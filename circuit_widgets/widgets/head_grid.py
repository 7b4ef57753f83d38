"""HeadGridWidget: a layer x head heatmap of a result; click heads to build a Circuit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import traitlets

from circuit_widgets.types import Circuit, Head
from circuit_widgets.widgets._base import BaseWidget, read_bundle
from circuit_widgets.widgets._traits import Float32Array, as_float32


def _labels(given: Any, n: int, axis: str) -> list[str]:
    if given is None or len(given) == 0:
        return [str(i) for i in range(n)]
    labels = [str(x) for x in given]
    if len(labels) != n:
        raise ValueError(f"{axis} labels: expected {n}, got {len(labels)}")
    return labels


def _read_result(result: Any) -> dict[str, Any]:
    """Trait values from a HeadGrid-like object, a 2-D tensor or an array."""
    values = getattr(result, "values", None)
    if values is None or callable(values):  # a bare tensor/array (torch.Tensor.values is a method)
        values, result = result, None
    arr = as_float32(values)
    if arr.ndim == 3:
        raise ValueError(
            f"HeadGridWidget shows [n_layers, n_heads] values; this result is per position "
            f"{tuple(arr.shape)}: pass one position's slice, e.g. result.values[:, p]"
        )
    if arr.ndim != 2:
        raise ValueError(f"HeadGridWidget needs [n_layers, n_heads] values, got shape {tuple(arr.shape)}")
    n_layers, n_heads = arr.shape
    layers = getattr(result, "layers", None)
    layer_labels = _labels(layers, n_layers, "layer")
    # Rows may be a subset of the model's layers: selection speaks model layer numbers.
    try:
        layer_numbers = [int(x) for x in layers] if layers else list(range(n_layers))
    except (TypeError, ValueError):
        layer_numbers = list(range(n_layers))
    if len(set(layer_numbers)) != n_layers or min(layer_numbers) < 0:
        layer_numbers = list(range(n_layers))
    kv_groups = getattr(result, "kv_groups", None)

    normalized = getattr(result, "normalized", None)
    if callable(normalized):
        normalized = normalized()
    if normalized is not None:
        normalized = as_float32(normalized)
        if normalized.shape != arr.shape:
            raise ValueError(f"normalized values have shape {normalized.shape}, values {arr.shape}")

    pending = getattr(result, "pending", None)
    if pending is not None:
        pending = as_float32(pending)
        if pending.shape != arr.shape:
            raise ValueError(f"pending mask has shape {pending.shape}, values {arr.shape}")
        if not pending.any():
            pending = None

    def text(name: str) -> str:
        value = getattr(result, name, None)
        return "" if value is None else str(getattr(value, "value", value))  # enums -> their value

    complete = getattr(result, "complete", None)
    return {
        "values": arr,
        "normalized": normalized,
        "pending": pending,
        "heads": _labels(getattr(result, "heads", None), n_heads, "head"),
        "layers": layer_labels,
        "layer_numbers": layer_numbers,
        "kv_groups": [list(map(int, g)) for g in kv_groups] if kv_groups else None,
        "kind": text("kind"),
        "component": text("component"),
        "metric_name": text("metric_name"),
        "complete": bool(np.isfinite(arr).all()) if complete is None else bool(complete),
    }


def _selection_pairs(selection: Any, layer_numbers: list[int], n_heads: int) -> list[list[int]]:
    if selection is None:
        return []
    items: Iterable[Any] = selection.heads if isinstance(selection, Circuit) else selection
    heads = sorted({Head.parse(tuple(h) if isinstance(h, list) else h) for h in items})
    rows = set(layer_numbers)
    for h in heads:
        if h.layer not in rows or h.head >= n_heads:
            raise ValueError(
                f"head {h} is outside the grid (layers {_span(layer_numbers)}, heads 0-{n_heads - 1})"
            )
    return [[h.layer, h.head] for h in heads]


def _span(numbers: list[int]) -> str:
    if numbers == list(range(len(numbers))):
        return f"0-{len(numbers) - 1}"
    return ", ".join(map(str, numbers))


class HeadGridWidget(BaseWidget):
    """Layer x head heatmap of a result (layers are rows, heads columns).

    Hover a cell for its value, click to select a head, shift-click to add or remove one;
    the selection is ``widget.selected`` (``[[layer, head], ...]``, observable) and
    ``widget.circuit`` (a Circuit). The threshold and top-k sliders only dim the display.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/head_grid.js)."""

    values = Float32Array(ndim=2).tag(sync=True)
    """[n_layers, n_heads] values, float32; NaN = not computed."""
    normalized = Float32Array(ndim=2, allow_none=True).tag(sync=True)
    """Optional normalised values of the same shape, shown on hover."""
    pending = Float32Array(ndim=2, allow_none=True).tag(sync=True)
    """Optional mask of the same shape: 1 where the value is a preview estimate, not yet exact."""
    heads = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Column labels, one per head."""
    layers = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Row labels, one per layer."""
    layer_numbers = traitlets.List(traitlets.Int()).tag(sync=True)
    """Model layer of each row (rows may be a subset of layers); selection uses these numbers."""
    title = traitlets.Unicode("").tag(sync=True)
    """Title drawn above the grid."""
    kind = traitlets.Unicode("").tag(sync=True)
    """What the values are (e.g. "activation patching"), shown under the title."""
    component = traitlets.Unicode("").tag(sync=True)
    """Which component was measured (e.g. "z"), shown under the title."""
    metric_name = traitlets.Unicode("").tag(sync=True)
    """Name of the metric, used as the legend's title."""
    complete = traitlets.Bool(True).tag(sync=True)
    """False while some cells are still to be computed."""
    selected = traitlets.List(traitlets.List(traitlets.Int(), minlen=2, maxlen=2)).tag(sync=True)
    """Selected heads as sorted [layer, head] pairs."""
    threshold = traitlets.Float(0.0, min=0.0).tag(sync=True)
    """Display filter: cells with |value| below this are dimmed (0 = off)."""
    top_k = traitlets.Int(0, min=0).tag(sync=True)
    """Display filter: only the k cells with the largest |value| stay bright (0 = off)."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "threshold", "top_k")

    def __init__(self, result: Any, *, title: str | None = None, selection: Any = None, **kwargs: Any) -> None:
        self._check_kwargs(kwargs)  # before the (slower) reading of the result
        state = _read_result(result)
        self._kv_groups: list[list[int]] | None = state.pop("kv_groups")
        state["selected"] = _selection_pairs(selection, state["layer_numbers"], state["values"].shape[1])
        state["title"] = "" if title is None else str(title)
        state["_esm"] = read_bundle("head_grid")
        super().__init__(state, **kwargs)

    # ------------------------------------------------------------------ data

    def set_result(self, result: Any) -> None:
        """Show a new (e.g. more complete) result; selected heads outside the new grid are dropped."""
        state = _read_result(result)
        self._kv_groups = state.pop("kv_groups")
        rows, n_heads = set(state["layer_numbers"]), state["values"].shape[1]
        keep = [p for p in self.selected if p[0] in rows and p[1] < n_heads]
        with self.hold_sync():
            self.selected = []  # valid for any grid; the kept heads are set back below
            values = state.pop("values")
            for name, value in state.items():
                setattr(self, name, value)
            self.values = values  # last: a `values` observer sees the matching labels and masks
            self.selected = keep

    def _on_partial(self, partial: Any) -> None:
        self.set_result(partial)  # a background sweep's partial HeadGrid (NaN = not yet computed)

    def _on_result(self, result: Any) -> None:
        if result is not None:
            self.set_result(result)

    @traitlets.validate("selected")
    def _valid_selected(self, proposal: dict) -> list[list[int]]:
        return _selection_pairs(proposal["value"], self.layer_numbers, self.values.shape[1])

    # ------------------------------------------------------------------ selection

    @property
    def circuit(self) -> Circuit:
        """The selected heads as a Circuit.

        On a grid of key/value heads (k or v of a grouped-query model, ``result.kv_groups``)
        a selected column stands for every query head of its group.
        """
        heads = []
        for layer, col in self.selected:
            group = self._kv_groups[col] if self._kv_groups and col < len(self._kv_groups) else [col]
            heads.extend(Head(layer, h) for h in group)
        return Circuit.from_heads(heads)

    @circuit.setter
    def circuit(self, circuit: Circuit | Iterable[Any]) -> None:
        self.selected = _selection_pairs(circuit, self.layer_numbers, self.values.shape[1])

    def on_select(self, callback: Callable[[Circuit], Any]) -> Callable[[dict], None]:
        """Call ``callback(circuit)`` whenever the selection changes; returns the observer."""

        def observer(change: dict) -> None:
            callback(self.circuit)

        self.observe(observer, names="selected")
        return observer

    # ------------------------------------------------------------------ static image

    def figure(self):
        """The grid as a matplotlib Figure (see circuit_widgets.plots.plot_head_grid)."""
        from circuit_widgets.plots import plot_head_grid

        row = {layer: r for r, layer in enumerate(self.layer_numbers)}
        return plot_head_grid(self.values, heads=self.heads, layers=self.layers, title=self.title or None,
                              metric_name=self.metric_name or None,
                              selected=[(row[layer], head) for layer, head in self.selected])

    def _png_key(self) -> Any:
        return (self.values.tobytes(), tuple(self.heads), tuple(self.layers), self.title,
                self.metric_name, tuple(map(tuple, self.selected)))

    def __repr__(self) -> str:
        n_layers, n_heads = self.values.shape
        finite = int(np.isfinite(self.values).sum())
        peak = float(np.nanmax(np.abs(self.values))) if finite else math.nan
        return (f"HeadGridWidget({n_layers} layers x {n_heads} heads, {finite} computed, "
                f"max |value| {peak:.3g}, selected {len(self.selected)})")
