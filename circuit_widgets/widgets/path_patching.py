"""PathPatchingWidget: run path patching inline; an attribution preview first, exact values as they arrive."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import traitlets
from ipywidgets import widget_serialization

from circuit_widgets.core.checks import check_args
from circuit_widgets.types import Circuit, Head, Receiver, ReceiverInput
from circuit_widgets.widgets._base import BaseWidget, Job, read_bundle
from circuit_widgets.widgets._model_lock import using
from circuit_widgets.widgets.attention import AttentionWidget
from circuit_widgets.widgets.head_grid import GridView, HeadGridWidget

# What the grid shows during a run: exact values where done, the preview elsewhere.
GridState = GridView


NO_PREVIEW = "no preview for receiver heads: exact values only"
ZERO_AT_LOGITS = (
    "senders patched at {position} reach the logits (read at END) only through later heads, "
    "which path patching to the logits freezes: expect 0 everywhere; choose END or 'all', or "
    "receiver heads"
)


def _empty_state(n_layers: int, n_heads: int, metric_name: str) -> GridState:
    nan = np.full((n_layers, n_heads), np.nan, np.float32)
    # complete: nothing was asked for yet, so the grid does not call itself "partial"
    return GridState(
        nan,
        None,
        None,
        list(range(n_layers)),
        [str(h) for h in range(n_heads)],
        kind="not run yet: choose receivers and position, then Run",
        component="z",
        metric_name=metric_name,
        complete=True,
    )


class PathPatchingWidget(BaseWidget):
    """Path patching of every sender head into the logits or into chosen receiver heads.

    Pick receivers ("logits", or the heads selected on the grid, through their q, k or v), a
    position and whether MLPs are frozen, then Run. For the logits a first-order estimate of
    the same path effect (``path_attribution``, same position and MLP freezing) fills the grid
    at once, and exact path-patching values replace it layer by layer (Cancel keeps what is
    done); receiver heads get exact values only. Clicking heads selects them
    (``widget.circuit``) and shows their attention patterns. A saved notebook keeps the static
    image drawn when the widget was displayed: ``IPython.display.Image(widget.to_image())``
    shows the grid after a run.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/path_patching.js)."""
    grid = traitlets.Instance(HeadGridWidget).tag(sync=True, **widget_serialization)
    """The head grid of results; its selection is this widget's circuit."""
    attention = traitlets.Instance(AttentionWidget).tag(sync=True, **widget_serialization)
    """Attention patterns of the selected heads."""
    receivers = traitlets.Enum(("logits", "selected"), default_value="logits").tag(sync=True)
    """'logits', or 'selected': the heads selected on the grid, through ``receiver_input``."""
    receiver_input = traitlets.Enum(("q", "k", "v"), default_value="q").tag(sync=True)
    """Which input of the receiver heads the path ends in."""
    position = traitlets.Unicode("all").tag(sync=True)
    """Where senders' corrupt outputs are taken: a task position name or 'all'."""
    position_options = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """The task's position names, then 'all'."""
    freeze_mlps = traitlets.Bool(False).tag(sync=True)
    """Freeze MLP outputs to their clean values too (direct paths only)."""
    preview = traitlets.Bool(True).tag(sync=True)
    """Receivers 'logits': show a first-order estimate of the path effect at once, before the exact values."""
    run_receivers = traitlets.Unicode("").tag(sync=True)
    """The receivers of the grid shown ("" before the first run)."""
    phase = traitlets.Unicode("").tag(sync=True)
    """What the grid shows now: '', 'preview', 'exact' (partial while running)."""

    _run_action: ClassVar[str | None] = "run"
    _trait_kwargs: ClassVar[tuple[str, ...]] = (
        "layout",
        "receivers",
        "receiver_input",
        "position",
        "freeze_mlps",
        "preview",
    )

    def __init__(
        self,
        model: Any,
        task: Any,
        *,
        title: str | None = None,
        layers_per_step: int = 1,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        check_args("PathPatchingWidget", model=model, task=task)
        from circuit_widgets.models import model_shape

        shape = model_shape(model)
        if (
            not isinstance(layers_per_step, int)
            or isinstance(layers_per_step, bool)
            or layers_per_step < 1
        ):
            raise ValueError(f"layers_per_step must be an int >= 1, got {layers_per_step!r}")
        self._model, self._task, self._shape = model, task, shape
        self._layers_per_step = layers_per_step
        options = [*task.position_names, "all"]
        position = kwargs.pop("position", "END" if "END" in options else "all")
        if position not in options:
            raise ValueError(f"position must be one of {options}, got {position!r}")
        self._state = _empty_state(shape.n_layers, shape.n_heads, task.metric_name)
        grid = HeadGridWidget(self._state, title=title or f"path patching · {task.name}")
        grid._use_model_groups(shape.n_heads, shape.n_kv_heads)
        attention = AttentionWidget(model, task, [], title="Attention of the selected heads")
        super().__init__(
            {
                "grid": grid,
                "attention": attention,
                "position_options": options,
                "position": position,
                "_esm": read_bundle("path_patching"),
            },
            **kwargs,
        )
        grid.observe(self._on_select, names="selected")
        # a refused Run's message goes once any setting it could have been about changes
        grid.observe(self._inputs_changed, names="selected")
        self.observe(
            self._inputs_changed, names=["receivers", "receiver_input", "position", "freeze_mlps"]
        )

    # ------------------------------------------------------------------ selection

    @property
    def circuit(self) -> Circuit:
        """The heads selected on the grid."""
        return self.grid.circuit

    @circuit.setter
    def circuit(self, circuit: Any) -> None:
        self.grid.circuit = circuit

    def _on_select(self, change: dict) -> None:
        heads = [Head(layer, head) for layer, head in self.grid.selected][:32]
        self.attention.heads = [[h.layer, h.head] for h in heads]

    @traitlets.validate("position")
    def _valid_position(self, proposal: dict) -> str:
        value = proposal["value"]
        if self.position_options and value not in self.position_options:
            raise traitlets.TraitError(
                f"position must be one of {self.position_options}, got {value!r}"
            )
        return value

    # ------------------------------------------------------------------ running

    def _receiver_list(self) -> str | list[Receiver]:
        if self.receivers == "logits":
            return "logits"
        heads = sorted(self.grid.circuit.heads)
        if not heads:
            raise ValueError(
                "receivers='selected' but no heads are selected: click receiver heads on the grid "
                "(shift-click adds), or choose 'logits'"
            )
        if min(h.layer for h in heads) == 0:
            raise ValueError(
                "receiver heads in layer 0 have no earlier heads to send to them; select heads in "
                f"layers 1-{self._shape.n_layers - 1}"
            )
        inp = ReceiverInput.coerce(self.receiver_input)
        return [Receiver(h.layer, h.head, inp) for h in heads]

    def run(self) -> Job:
        """Start a run with the current settings (off the main thread); returns its Job.

        Raises ValueError at once for settings that cannot run (e.g. no receiver heads selected).
        """
        receivers = self._receiver_list()
        args = (receivers, self.position, self.freeze_mlps, self.preview)
        job = self._submit(self._sweep, *args)
        if receivers == "logits" and self.position not in ("END", "all"):
            self.message = ZERO_AT_LOGITS.format(position=self.position)
        elif self.preview and receivers != "logits":
            self.message = NO_PREVIEW
        return job

    def _senders_by_step(self, receivers: str | list[Receiver]) -> list[list[int]]:
        top = (
            self._shape.n_layers if isinstance(receivers, str) else min(r.layer for r in receivers)
        )
        layers = list(range(top))
        k = self._layers_per_step
        return [layers[i : i + k] for i in range(0, len(layers), k)]

    def _sweep(
        self, job: Job, receivers: str | list[Receiver], position: str, freeze: bool, preview: bool
    ) -> GridState:
        from circuit_widgets.core import path_patch
        from circuit_widgets.core.attribution import path_attribution

        shape, task = self._shape, self._task
        described = "logits" if receivers == "logits" else ", ".join(map(str, receivers))
        steps = self._senders_by_step(receivers)
        # the estimate is of the path into the logits: for receiver heads it would be another quantity
        preview = preview and receivers == "logits"
        total = len(steps) + (1 if preview else 0)
        state = _empty_state(shape.n_layers, shape.n_heads, task.metric_name)
        state.kind, state.complete = f"path patching → {described}", False
        state.position, state.n_cells = position, sum(map(len, steps)) * shape.n_heads
        state.pending = np.zeros_like(state.values)
        job.set(phase="", run_receivers=described)
        if preview:
            with using(self._model) as hold:
                est = path_attribution(
                    self._model,
                    task,
                    position=position,
                    freeze_mlps=freeze,
                    should_stop=job.stopper(hold),
                )
            job.check()
            state.values = est.values.float().cpu().numpy().astype(np.float32)
            state.normalized = est.normalized.float().cpu().numpy().astype(np.float32)
            state.pending = np.isfinite(state.values).astype(np.float32)
            state.metric_name = est.metric_name
            state.kind = f"path attribution preview, then path patching → {described}"
            job.set(phase="preview")
            job.report(progress=1 / total, partial=_copy(state))
        for i, layers in enumerate(steps):
            job.check()
            senders = [Head(layer, h) for layer in layers for h in range(shape.n_heads)]
            with using(
                self._model
            ) as hold:  # per layer chunk: an attention view waits one batch at most
                res = path_patch(
                    self._model,
                    task,
                    receivers=receivers,
                    senders=senders,
                    position=position,
                    freeze_mlps=freeze,
                    should_stop=job.stopper(hold),
                )
            vals = res.values.float().cpu().numpy()
            norm = res.normalized.float().cpu().numpy()
            done = res.done.cpu().numpy()
            if state.normalized is None:
                state.normalized = np.full_like(state.values, np.nan)
            state.values[done] = vals[done]
            state.normalized[done] = norm[done]
            state.pending[done] = 0.0
            state.metric_name = res.metric_name
            state.notes = list(res.notes)
            job.set(phase="exact")
            if not res.complete:
                break  # stopped inside the chunk: the finished cells are shown as the cancelled result
            job.report(progress=(i + 1 + (1 if preview else 0)) / total, partial=_copy(state))
        state.complete = not job.cancelled
        if state.complete:
            state.kind = f"path patching → {described}"
        return state

    def _on_partial(self, partial: GridState) -> None:
        self._state = partial
        self.grid.set_result(partial)

    def _on_result(self, result: GridState) -> None:
        self._state = result
        self.grid.set_result(result)

    # ------------------------------------------------------------------ static image

    def figure(self):
        """The grid (exact values and any preview still shown) as a matplotlib Figure."""
        return self.grid.figure()

    def to_image(self, format: str = "png", dpi: int = 100) -> bytes:
        return self.grid.to_image(format, dpi)

    def _png(self) -> bytes:
        return self.grid._png()

    def __repr__(self) -> str:
        finite = int(np.isfinite(self.grid.values).sum())
        pending = int(np.nansum(self.grid.pending)) if self.grid.pending is not None else 0
        peak = float(np.nanmax(np.abs(self.grid.values))) if finite else math.nan
        return (
            f"PathPatchingWidget({self._shape.n_layers} x {self._shape.n_heads}, receivers "
            f"{self.run_receivers or self.receivers}, {finite - pending} exact, {pending} preview, "
            f"max |value| {peak:.3g}, status {self.status})"
        )


def _copy(state: GridState) -> GridState:
    return GridState(
        state.values.copy(),
        None if state.normalized is None else state.normalized.copy(),
        None if state.pending is None else state.pending.copy(),
        list(state.layers),
        list(state.heads),
        state.kind,
        state.component,
        state.metric_name,
        state.complete,
        list(state.notes),
        state.position,
        state.n_cells,
    )
