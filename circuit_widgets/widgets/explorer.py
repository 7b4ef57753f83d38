"""CircuitExplorer: path patching, attention, DCM and CMAP in tabs around one shared circuit."""

from __future__ import annotations

from typing import Any, ClassVar

import traitlets
from ipywidgets import widget_serialization

from circuit_widgets.types import Circuit, Head
from circuit_widgets.widgets._base import BaseWidget, read_bundle
from circuit_widgets.widgets.attention import MAX_HEADS, AttentionWidget
from circuit_widgets.widgets.path_patching import PathPatchingWidget


class CircuitExplorer(BaseWidget):
    """One circuit, several views of it, in tabs: path patching (with attention of the selected
    heads), attention, and, when given their inputs, DCM (``desideratum=``) and CMAP
    (``finetuned=``). Selecting heads on any grid selects them everywhere: ``explorer.circuit``.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/explorer.js)."""
    path_patching = traitlets.Instance(PathPatchingWidget).tag(sync=True, **widget_serialization)
    """The path-patching tab."""
    attention = traitlets.Instance(AttentionWidget).tag(sync=True, **widget_serialization)
    """The attention tab (patterns of the circuit's heads)."""
    dcm = traitlets.Any(None).tag(sync=True, **widget_serialization)
    """The DCM tab (a DCMWidget), or None without a desideratum."""
    cmap = traitlets.Any(None).tag(sync=True, **widget_serialization)
    """The CMAP tab (a CMAPWidget), or None without a fine-tuned model."""
    tab_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Tab titles, in order."""
    tab_traits = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Which child trait each tab shows."""
    tab = traitlets.Int(0, min=0).tag(sync=True)
    """Index of the tab shown."""
    selected = traitlets.List(traitlets.List(traitlets.Int(), minlen=2, maxlen=2)).tag(sync=True)
    """The shared circuit's heads as sorted [layer, head] pairs."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "tab")

    def __init__(self, model: Any, task: Any, *, circuit: Any = None, desideratum: Any = None,
                 dcm_heads: Any = None, dcm_position: str = "END", dcm_lams: Any = None,
                 finetuned: Any = None, title: str | None = None, **kwargs: Any) -> None:
        self._check_kwargs(kwargs)
        pp = PathPatchingWidget(model, task, title=title)
        att = AttentionWidget(model, task, [], title="Attention of the circuit's heads")
        names, traits = ["Path patching", "Attention"], ["path_patching", "attention"]
        state: dict[str, Any] = {"path_patching": pp, "attention": att}
        if desideratum is not None:
            from circuit_widgets.widgets.dcm import DCMWidget

            state["dcm"] = DCMWidget(model, desideratum, dcm_heads, dcm_position, lams=dcm_lams,
                                     select_result=False)  # a trained mask must not overwrite the shared circuit
            names.append("DCM")
            traits.append("dcm")
        if finetuned is not None:
            from circuit_widgets.widgets.cmap import CMAPWidget

            state["cmap"] = CMAPWidget(model, finetuned, task, None)
            names.append("CMAP")
            traits.append("cmap")
        state.update(_esm=read_bundle("explorer"), tab_names=names, tab_traits=traits)
        self._n_layers, self._n_heads = pp.grid.values.shape
        self._syncing = False
        super().__init__(state, **kwargs)
        for grid in self._grids():
            grid.observe(self._from_grid, names="selected")
        self.observe(self._to_children, names="selected")
        if circuit is not None:
            self.circuit = circuit

    def _grids(self) -> list[Any]:
        grids = [self.path_patching.grid]
        grids += [w.grid for w in (self.dcm, self.cmap) if w is not None]
        return grids

    # ------------------------------------------------------------------ the shared circuit

    @property
    def circuit(self) -> Circuit:
        """The shared circuit (the heads selected on any tab's grid)."""
        return Circuit.from_heads([Head(layer, head) for layer, head in self.selected])

    @circuit.setter
    def circuit(self, circuit: Any) -> None:
        heads = circuit.heads if isinstance(circuit, Circuit) else circuit
        pairs = sorted({Head.parse(tuple(h) if isinstance(h, list) else h) for h in heads})
        for h in pairs:
            if h.layer >= self._n_layers or h.head >= self._n_heads:
                raise ValueError(f"head {h} is outside the model (layers 0-{self._n_layers - 1}, "
                                 f"heads 0-{self._n_heads - 1})")
        self.selected = [[h.layer, h.head] for h in pairs]

    def _from_grid(self, change: dict) -> None:
        if not self._syncing:
            self.selected = [list(p) for p in change["new"]]

    def _to_children(self, change: dict) -> None:
        self._syncing = True  # the grids' observers would echo the change back
        try:
            for grid in self._grids():
                if grid.selected != self.selected:
                    grid.selected = self.selected
            self.attention.heads = self.selected[:MAX_HEADS]
            if self.cmap is not None:
                self.cmap.circuit = self.circuit
        finally:
            self._syncing = False

    def cancel(self) -> bool:
        """Cancel whatever any tab is running."""
        # _trait_values, not the traits: close() also runs on a half-built explorer (from __del__)
        children = [self._trait_values.get(n) for n in ("path_patching", "attention", "dcm", "cmap")]
        return any([w.cancel() for w in children if w is not None])  # noqa: C419 - a list: cancel every one, no short cut

    # ------------------------------------------------------------------ static image

    def figure(self):
        return self.path_patching.figure()

    def to_image(self, format: str = "png", dpi: int = 100) -> bytes:
        return self.path_patching.to_image(format, dpi)

    def _png(self) -> bytes:
        return self.path_patching._png()

    def __repr__(self) -> str:
        return f"CircuitExplorer(tabs {', '.join(self.tab_names)}; circuit {self.circuit})"
