"""CircuitExplorer: path patching, attention, DCM and CMAP in tabs around one shared circuit."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import traitlets
from ipywidgets import widget_serialization

from circuit_widgets.core.checks import check_args
from circuit_widgets.types import Circuit
from circuit_widgets.widgets._base import BaseWidget, read_bundle
from circuit_widgets.widgets.attention import MAX_HEADS, AttentionWidget
from circuit_widgets.widgets.head_grid import named_groups, with_heads
from circuit_widgets.widgets.path_patching import PathPatchingWidget


class CircuitExplorer(BaseWidget):
    """One circuit, several views of it, in tabs: path patching (with attention of the selected
    heads), attention, and, when given their inputs, DCM (``desideratum=``) and CMAP
    (``finetuned=``). Selecting heads on any grid selects them everywhere: ``explorer.circuit``.

    The circuit keeps its groups and their positions (``explorer.circuit = Circuit.from_groups(...)``,
    or a circuit set on the CMAP tab): a click that removes a head takes it out of its group (an
    emptied group goes), heads added by clicks join the group "heads" (all positions). CMAP's
    group toggles stay as they are while its groups do. A saved notebook keeps the static image
    drawn when the explorer was displayed: ``IPython.display.Image(explorer.to_image())`` shows
    the path-patching grid after a run.
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
    groups = traitlets.List(traitlets.Dict()).tag(sync=True)
    """The shared circuit's named groups, [{name, position, heads: [[layer, head], ...]}] ([] for plain heads)."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "tab")

    def __init__(
        self,
        model: Any,
        task: Any,
        *,
        circuit: Any = None,
        desideratum: Any = None,
        dcm_heads: Any = None,
        dcm_position: str = "END",
        dcm_lams: Any = None,
        finetuned: Any = None,
        title: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        check_args("CircuitExplorer", model=model, task=task)
        pp = PathPatchingWidget(model, task, title=title)
        att = AttentionWidget(model, task, [], title="Attention of the circuit's heads")
        names, traits = ["Path patching", "Attention"], ["path_patching", "attention"]
        state: dict[str, Any] = {"path_patching": pp, "attention": att}
        if desideratum is not None:
            from circuit_widgets.widgets.dcm import DCMWidget

            state["dcm"] = DCMWidget(
                model, desideratum, dcm_heads, dcm_position, lams=dcm_lams, select_result=False
            )  # a trained mask must not overwrite the shared circuit
            names.append("DCM")
            traits.append("dcm")
        if finetuned is not None:
            from circuit_widgets.widgets.cmap import CMAPWidget

            state["cmap"] = CMAPWidget(model, finetuned, task, None)
            names.append("CMAP")
            traits.append("cmap")
        state.update(_esm=read_bundle("explorer"), tab_names=names, tab_traits=traits)
        self._n_layers, self._n_heads = pp.grid.values.shape
        self._positions = list(task.position_names)
        self._circuit = Circuit()
        # One sync at a time across threads (a click on the main thread, a grid pruned by a
        # worker); the flag is per thread, so only a sync's own echo is ignored.
        self._sync_lock = threading.RLock()
        self._local = threading.local()
        super().__init__(state, **kwargs)
        for grid in self._grids():
            grid.observe(self._from_grid, names="selected")
        self.observe(self._from_trait, names="selected")
        if self.cmap is not None:
            self.cmap.observe(self._from_cmap, names="groups")
        if circuit is not None:
            self.circuit = circuit

    def _grids(self) -> list[Any]:
        grids = [self.path_patching.grid]
        grids += [w.grid for w in (self.dcm, self.cmap) if w is not None]
        return grids

    # ------------------------------------------------------------------ the shared circuit

    @property
    def circuit(self) -> Circuit:
        """The shared circuit: its groups (and positions), with the heads selected on any tab's grid."""
        return self._circuit

    @circuit.setter
    def circuit(self, circuit: Any) -> None:
        c = Circuit.parse(circuit)
        c.validate(self._n_layers, self._n_heads, self._positions)
        self._sync(c)

    @property
    def _syncing(self) -> bool:
        """True on the thread that is pushing the circuit into the tabs (their echoes are ignored)."""
        return getattr(self._local, "syncing", False)

    def _from_grid(self, change: dict) -> None:
        if not self._syncing:
            self._sync(with_heads(self._circuit, change["new"]))

    def _from_trait(self, change: dict) -> None:
        if not self._syncing:  # `explorer.selected = [...]` set from Python
            self._sync(with_heads(self._circuit, change["new"]))

    def _from_cmap(self, change: dict) -> None:
        if not self._syncing:  # a grouped circuit set on the CMAP tab becomes the shared one
            self._sync(self.cmap._circuit)

    def _sync(self, circuit: Circuit) -> None:
        with self._sync_lock:
            self._local.syncing = True
            try:
                self._push(circuit)
            finally:
                self._local.syncing = False

    def _push(self, c: Circuit) -> None:

        pairs = [[h.layer, h.head] for h in sorted(c.heads)]
        self._circuit = c
        groups = named_groups(c, pairs)
        with self.hold_sync():
            if self.groups != groups:
                self.groups = groups
            if self.selected != pairs:
                self.selected = pairs
        for grid in self._grids():  # only what differs: no needless observer calls in the tabs
            with grid.hold_sync():
                if grid.groups != groups:
                    grid.groups = groups
                if grid.selected != pairs:
                    grid.selected = pairs
        if self.attention.heads != pairs[:MAX_HEADS]:
            self.attention.heads = pairs[:MAX_HEADS]
        if self.cmap is not None and self.cmap._circuit != c:  # its heads or groups really changed
            self.cmap._set_circuit(c, keep_toggles=True)

    def cancel(self) -> bool:
        """Cancel whatever any tab is running."""
        # _trait_values, not the traits: close() also runs on a half-built explorer (from __del__)
        children = [
            self._trait_values.get(n) for n in ("path_patching", "attention", "dcm", "cmap")
        ]
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
