"""HeadGridWidget: a layer x head heatmap of a result; click heads to build a Circuit."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import traitlets

from circuit_widgets.core.checks import check_args
from circuit_widgets.core.results import GridLike
from circuit_widgets.types import Circuit, CircuitGroup, Head
from circuit_widgets.widgets._base import BaseWidget, read_bundle
from circuit_widgets.widgets._traits import Float32Array, as_float32


def _labels(given: Any, n: int, axis: str) -> list[str]:
    if given is None or len(given) == 0:
        return [str(i) for i in range(n)]
    labels = [str(x) for x in given]
    if len(labels) != n:
        raise ValueError(f"{axis} labels: expected {n}, got {len(labels)}")
    return labels


@dataclass
class GridView:
    """A grid a widget builds itself (a run in progress, a DCM mask, a bare array); a
    ``GridLike``, as a HeadGrid is."""

    values: Any  # [n_layers, n_heads] array, tensor or nested list
    normalized: Any = None  # same shape, or None
    pending: np.ndarray | None = None  # 1 where the value is still a preview estimate
    layers: list[int] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    kind: str = ""
    component: str = ""
    metric_name: str = ""
    complete: bool | None = False  # None: complete when every value is finite
    notes: list[str] = field(default_factory=list)
    position: str = ""
    n_cells: int = 0  # the cells that can hold a value (e.g. the senders); 0 = every cell
    kv_groups: list[list[int]] | None = None
    scale: str = "diverging"


_VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(GridView))


def _as_grid(result: Any) -> GridLike:
    """A GridLike as it is; a bare tensor, array or nested list as values alone; another
    library's result object (one with a ``values`` array) through the GridLike fields it has."""
    if isinstance(result, GridLike):
        return result
    values = getattr(result, "values", None)
    if values is None or callable(values):  # torch.Tensor.values is a method
        return GridView(values=result, complete=None)
    given = {name: getattr(result, name) for name in _VIEW_FIELDS if hasattr(result, name)}
    if callable(given.get("normalized")):
        given["normalized"] = given["normalized"]()
    return GridView(**{"complete": None, **given})


def _text(value: Any) -> str:
    return "" if value is None else str(value.value if isinstance(value, enum.Enum) else value)


def _read_result(result: Any) -> dict[str, Any]:
    """Trait values from a GridLike (a HeadGrid, a GridView), a 2-D tensor or an array."""
    grid = _as_grid(result)
    arr = as_float32(grid.values)
    if arr.ndim == 3:
        raise ValueError(
            f"HeadGridWidget shows [n_layers, n_heads] values; this result is per position "
            f"{tuple(arr.shape)}: pass one position's slice, e.g. result.values[:, p]"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"HeadGridWidget needs [n_layers, n_heads] values, got shape {tuple(arr.shape)}"
        )
    n_layers, n_heads = arr.shape
    layers = grid.layers
    layer_labels = _labels(layers, n_layers, "layer")
    # Rows may be a subset of the model's layers: selection speaks model layer numbers.
    try:
        layer_numbers = [int(x) for x in layers] if layers else list(range(n_layers))
    except (TypeError, ValueError):
        layer_numbers = list(range(n_layers))
    if len(set(layer_numbers)) != n_layers or min(layer_numbers) < 0:
        layer_numbers = list(range(n_layers))
    kv_groups = grid.kv_groups

    normalized = grid.normalized
    if normalized is not None:
        normalized = as_float32(normalized)
        if normalized.shape != arr.shape:
            raise ValueError(f"normalized values have shape {normalized.shape}, values {arr.shape}")

    pending = grid.pending
    if pending is not None:
        pending = as_float32(pending)
        if pending.shape != arr.shape:
            raise ValueError(f"pending mask has shape {pending.shape}, values {arr.shape}")
        if not pending.any():
            pending = None

    complete, n_cells, scale = grid.complete, grid.n_cells, grid.scale
    return {
        "values": arr,
        "normalized": normalized,
        "pending": pending,
        "heads": _labels(grid.heads, n_heads, "head"),
        "layers": layer_labels,
        "layer_numbers": layer_numbers,
        "kv_groups": [list(map(int, g)) for g in kv_groups] if kv_groups else None,
        "kind": _text(grid.kind),
        "component": _text(grid.component),
        "metric_name": _text(grid.metric_name),
        "position": _text(grid.position),
        "n_cells": int(n_cells) if n_cells else 0,
        "scale": scale if scale in ("diverging", "sequential") else "diverging",
        "complete": bool(np.isfinite(arr).all()) if complete is None else bool(complete),
    }


_KIND_TITLES = {
    "activation": "Activation patching",
    "path": "Path patching",
    "attribution": "Attribution patching (estimate)",
    "cmap": "CMAP",
}


def _default_title(result: Any) -> str:
    """A result's own name for the title, e.g. "Activation patching · logit_diff" ("" if none)."""
    kind, metric = getattr(result, "kind", None), getattr(result, "metric_name", None)
    if not isinstance(kind, str) or not kind:
        return ""
    title = _KIND_TITLES.get(kind, kind[:1].upper() + kind[1:])
    receivers = getattr(result, "receivers", None)
    if kind == "path" and isinstance(receivers, str) and receivers:
        title += f" → {receivers}"
    return f"{title} · {metric}" if isinstance(metric, str) and metric else title


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


def named_groups(circuit: Any, pairs: list[list[int]]) -> list[dict]:
    """A grouped Circuit's groups as trait values; [] for plain heads (one unnamed "heads" group)."""
    if not isinstance(circuit, Circuit):
        return []
    groups = circuit.groups
    if len(groups) == 1 and groups[0].name == "heads" and groups[0].position is None:
        return []
    out = [
        {
            "name": g.name,
            "position": g.position or "all",
            "heads": [[h.layer, h.head] for h in sorted(g.heads)],
        }
        for g in groups
    ]
    return _prune(out, {(layer, head) for layer, head in pairs})


def _prune(groups: list[dict], selected: set[tuple[int, int]]) -> list[dict]:
    out = []
    for g in groups:
        heads = [list(p) for p in g["heads"] if tuple(p) in selected]
        if heads:
            out.append({**g, "heads": heads})
    return out


def _grouped_circuit(selected: list[list[int]], groups: list[dict]) -> Circuit:
    """The selected heads in their named groups; heads in none go to the group "heads"."""
    if not groups:
        return Circuit.from_heads([Head(layer, head) for layer, head in selected])
    named = Circuit(
        tuple(
            CircuitGroup(
                g["name"],
                frozenset(Head(*p) for p in g["heads"]),
                None if g.get("position") in (None, "all") else g["position"],
            )
            for g in groups
        )
    )
    return with_heads(named, selected)


def with_heads(circuit: Circuit, pairs: list[list[int]]) -> Circuit:
    """``circuit`` with exactly these heads: removed heads leave their groups (emptied groups go),
    new heads join the group "heads" (created at all positions if the circuit has none)."""
    want = {Head(int(layer), int(head)) for layer, head in pairs}
    added = want - circuit.heads
    groups = [CircuitGroup(g.name, g.heads & want, g.position) for g in circuit.groups]
    if added:
        names = [g.name for g in groups]
        if "heads" in names:
            i = names.index("heads")
            groups[i] = CircuitGroup("heads", groups[i].heads | added, groups[i].position)
        else:
            groups.append(CircuitGroup("heads", frozenset(added)))
    return Circuit(tuple(g for g in groups if g.heads), circuit.name)


def _span(numbers: list[int]) -> str:
    if numbers == list(range(len(numbers))):
        return f"0-{len(numbers) - 1}"
    return ", ".join(map(str, numbers))


class HeadGridWidget(BaseWidget):
    """Layer x head heatmap of a result (layers are rows, heads columns).

    Hover a cell for its value (and, on grouped-query models, the key/value head it shares; for
    a grouped circuit, its group); click to select a head, shift-click to add or remove one;
    the selection is ``widget.selected`` (``[[layer, head], ...]``, observable) and
    ``widget.circuit`` (a Circuit). The threshold and top-k sliders only dim the display. A
    saved notebook keeps the static image drawn when the widget was displayed: after
    ``set_result``, ``IPython.display.Image(widget.to_image())`` shows the current grid.
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
    position = traitlets.Unicode("").tag(sync=True)
    """Position the values were measured at (e.g. "END"; "all"), shown under the title ("" = unknown)."""
    n_cells = traitlets.Int(0, min=0).tag(sync=True)
    """How many cells can hold a value (e.g. only the senders before the receivers); 0 = all."""
    scale = traitlets.Enum(("diverging", "sequential"), default_value="diverging").tag(sync=True)
    """Colour scale: blue-white-red around 0, or white-red from 0 for values that are never negative."""
    complete = traitlets.Bool(True).tag(sync=True)
    """False while some cells are still to be computed."""
    selected = traitlets.List(traitlets.List(traitlets.Int(), minlen=2, maxlen=2)).tag(sync=True)
    """Selected heads as sorted [layer, head] pairs."""
    threshold = traitlets.Float(0.0, min=0.0).tag(sync=True)
    """Display filter: cells with |value| below this are dimmed (0 = off)."""
    top_k = traitlets.Int(0, min=0).tag(sync=True)
    """Display filter: only the k cells with the largest |value| stay bright (0 = off)."""
    kv_groups = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)
    """Grouped-query models: kv_groups[g] = the query heads sharing key/value head g ([] = none)."""
    kv_columns = traitlets.Bool(False).tag(sync=True)
    """True when the columns are key/value heads (k or v of a grouped-query model), not query heads."""
    groups = traitlets.List(traitlets.Dict()).tag(sync=True)
    """Named groups of the selected circuit, [{name, position, heads: [[layer, head], ...]}]; shown on hover."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "threshold", "top_k")

    def __init__(
        self, result: Any, *, title: str | None = None, selection: Any = None, **kwargs: Any
    ) -> None:
        self._check_kwargs(kwargs)  # before the (slower) reading of the result
        check_args("HeadGridWidget", result=result)
        state = _read_result(result)
        kvg = state.pop("kv_groups")
        state["kv_groups"], state["kv_columns"] = (kvg, True) if kvg else ([], False)
        state["selected"] = _selection_pairs(
            selection, state["layer_numbers"], state["values"].shape[1]
        )
        state["groups"] = named_groups(selection, state["selected"])
        state["title"] = _default_title(result) if title is None else str(title)
        state["_esm"] = read_bundle("head_grid")
        super().__init__(state, **kwargs)
        self.observe(self._prune_groups, names="selected")

    # ------------------------------------------------------------------ data

    def set_result(self, result: Any) -> None:
        """Show a new (e.g. more complete) result; selected heads outside the new grid are dropped.

        ``selected`` is assigned at most once, and only if a head had to go: its observers (an
        attention view, an explorer) see no change, and a click arriving meanwhile is kept.
        """
        state = _read_result(result)
        kvg = state.pop("kv_groups")
        if kvg:
            state["kv_groups"], state["kv_columns"] = kvg, True
        else:  # query-head columns keep a grouping their owner gave (e.g. from the model) if it fits
            keep_groups = (
                not self.kv_columns and sum(map(len, self.kv_groups)) == state["values"].shape[1]
            )
            state["kv_groups"], state["kv_columns"] = (
                (list(self.kv_groups) if keep_groups else []),
                False,
            )
        rows, n_heads = set(state["layer_numbers"]), state["values"].shape[1]
        current = list(self.selected)
        keep = [p for p in current if p[0] in rows and p[1] < n_heads]
        with self.hold_sync():
            if keep != current:  # valid on the old grid and the new one
                self.selected = keep
            values = state.pop("values")
            for name, value in state.items():
                if (
                    name in ("layer_numbers", "heads", "layers", "kv_groups")
                    and getattr(self, name) == value
                ):
                    continue  # unchanged lists fire no change event
                setattr(self, name, value)
            self.values = values  # last: a `values` observer sees the matching labels and masks
            # a click validated against the old grid may have landed meanwhile
            late = [p for p in self.selected if p[0] in rows and p[1] < n_heads]
            if late != self.selected:
                self.selected = late

    def _on_partial(self, partial: Any) -> None:
        self.set_result(partial)  # a background sweep's partial HeadGrid (NaN = not yet computed)

    def _on_result(self, result: Any) -> None:
        if result is not None:
            self.set_result(result)

    @traitlets.validate("selected")
    def _valid_selected(self, proposal: dict) -> list[list[int]]:
        return _selection_pairs(proposal["value"], self.layer_numbers, self.values.shape[1])

    def _prune_groups(self, change: dict) -> None:
        # group names describe selected heads only: a deselected head leaves its group
        if not self.groups:
            return
        pruned = _prune(self.groups, {tuple(p) for p in change["new"]})
        if pruned != self.groups:
            self.groups = pruned

    def _use_model_groups(self, n_heads: int, n_kv_heads: int) -> None:
        """Query-head columns of a grouped-query model: say on hover which key/value head each shares."""
        if self.kv_columns or n_kv_heads >= n_heads or n_kv_heads < 1:
            return
        g = n_heads // n_kv_heads
        self.kv_groups = [list(range(k * g, (k + 1) * g)) for k in range(n_kv_heads)]

    # ------------------------------------------------------------------ selection

    @property
    def circuit(self) -> Circuit:
        """The selected heads as a Circuit (in their named groups, if ``groups`` has them).

        On a grid of key/value heads (k or v of a grouped-query model, ``result.kv_groups``)
        a selected column stands for every query head of its group.
        """
        if self.kv_columns:
            heads: list[Head] = []
            for layer, col in self.selected:
                group = self.kv_groups[col] if col < len(self.kv_groups) else [col]
                heads.extend(Head(layer, h) for h in group)
            return Circuit.from_heads(heads)
        return _grouped_circuit(self.selected, self.groups)

    @circuit.setter
    def circuit(self, circuit: Circuit | Iterable[Any]) -> None:
        pairs = _selection_pairs(circuit, self.layer_numbers, self.values.shape[1])
        with self.hold_sync():
            self.groups = named_groups(circuit, pairs)
            self.selected = pairs

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
        return plot_head_grid(
            self.values,
            heads=self.heads,
            layers=self.layers,
            title=self.title or None,
            metric_name=self.metric_name or None,
            selected=[(row[layer], head) for layer, head in self.selected],
            sequential=self.scale == "sequential",
        )

    def _png_key(self) -> Any:
        return (
            self.values.tobytes(),
            tuple(self.heads),
            tuple(self.layers),
            self.title,
            self.metric_name,
            self.scale,
            tuple(map(tuple, self.selected)),
        )

    def __repr__(self) -> str:
        n_layers, n_heads = self.values.shape
        finite = int(np.isfinite(self.values).sum())
        peak = float(np.nanmax(np.abs(self.values))) if finite else math.nan
        return (
            f"HeadGridWidget({n_layers} layers x {n_heads} heads, {finite} computed, "
            f"max |value| {peak:.3g}, selected {len(self.selected)})"
        )
