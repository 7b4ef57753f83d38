"""CMAPWidget: patch a fine-tuned model's head outputs into the base model at a circuit's groups."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import traitlets
from ipywidgets import widget_serialization

from circuit_widgets.core.checks import check_args
from circuit_widgets.core.results import GridLike
from circuit_widgets.types import Circuit
from circuit_widgets.widgets._base import BaseWidget, Job, read_bundle
from circuit_widgets.widgets._model_lock import using
from circuit_widgets.widgets._traits import Float32Array
from circuit_widgets.widgets.head_grid import GridView, HeadGridWidget

SERIES = ("base", "patched", "fine-tuned")


def _check_grid_position(task: Any, position: Any) -> None:
    if position != "all" and (not isinstance(position, str) or position not in task.positions):
        raise ValueError(
            f"grid_position must be 'all' or one of {sorted(task.positions)}, got {position!r}"
        )


def _relabelled(grid: GridLike, kind: str) -> GridView:
    """A HeadGrid shown with another subtitle (what is running, or that it stopped)."""
    return GridView(
        values=grid.values,
        normalized=grid.normalized,
        layers=list(grid.layers),
        heads=list(grid.heads),
        kv_groups=None if grid.kv_groups is None else [list(g) for g in grid.kv_groups],
        kind=kind,
        component=grid.component,
        metric_name=grid.metric_name,
        complete=grid.complete,
    )


class CMAPWidget(BaseWidget):
    """Cross-model activation patching (CMAP): fine-tuned per-head outputs written into the base model.

    Toggle the circuit's groups; Run patches each enabled group alone (at its own position)
    and all of them together, and draws base / patched / fine-tuned accuracy per group; then
    it sweeps every head alone (``cmap_grid``) into the head grid, where the circuit's heads
    are outlined. Cancel keeps what is done. A saved notebook keeps the static image drawn
    when the widget was displayed: ``IPython.display.Image(widget.to_image())`` shows the
    current bars and grid.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/cmap.js)."""
    grid = traitlets.Instance(HeadGridWidget).tag(sync=True, **widget_serialization)
    """Per-head CMAP values (each head patched alone), with the circuit's heads selected."""
    groups = traitlets.List(traitlets.Dict()).tag(sync=True)
    """The circuit's groups: [{name, position, heads: ["l.h", ...]}]."""
    enabled = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Names of the groups patched."""
    bar_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Row labels of ``bars``: each enabled group, then "circuit" (all enabled groups at once)."""
    bars = Float32Array(ndim=2).tag(sync=True)
    """[n_rows, 3] accuracy: base, patched, fine-tuned, float32 (NaN = not run)."""
    recovered = Float32Array(ndim=1).tag(sync=True)
    """Per row of ``bars``: (patched - base) / (fine-tuned - base) of the task metric."""
    grid_position = traitlets.Unicode("END").tag(sync=True)
    """Position at which the per-head grid patches each head ('all' or a task position)."""
    sweep_grid = traitlets.Bool(True).tag(sync=True)
    """Also compute the per-head grid when running."""

    _run_action: ClassVar[str | None] = "run"
    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "grid_position", "sweep_grid")

    def __init__(
        self,
        base: Any,
        finetuned: Any,
        task: Any,
        circuit: Any = None,
        *,
        component: str = "z",
        title: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        check_args("CMAPWidget", base=base, finetuned=finetuned, task=task)
        from circuit_widgets.core.cross_model import check_compatible
        from circuit_widgets.models import model_shape

        check_compatible(base, finetuned)
        shape = model_shape(base)
        self._base, self._finetuned, self._task, self._shape = base, finetuned, task, shape
        self._component = component
        self._result: Any = None
        grid_position = kwargs.pop("grid_position", "END")
        _check_grid_position(task, grid_position)
        nan = np.full((shape.n_layers, shape.n_heads), np.nan, np.float32)
        placeholder = type(
            "Placeholder",
            (),
            {
                "values": nan,
                "complete": True,
                "kind": "not run yet: press Run",
                "metric_name": task.metric_name,
            },
        )()
        grid = HeadGridWidget(
            placeholder, title=title or f"CMAP: each head patched alone · {task.name}"
        )
        grid._use_model_groups(shape.n_heads, shape.n_kv_heads)
        super().__init__(
            {
                "_esm": read_bundle("cmap"),
                "grid": grid,
                "grid_position": grid_position,
                "bars": np.zeros((0, 3), np.float32),
                "recovered": np.zeros(0, np.float32),
            },
            **kwargs,
        )
        self.circuit = circuit
        # a refused Run's message goes once the groups it was about change
        self.observe(self._inputs_changed, names=["groups", "enabled", "grid_position"])

    # ------------------------------------------------------------------ circuit

    @property
    def circuit(self) -> Circuit:
        """The circuit's enabled groups."""
        keep = set(self.enabled)
        return Circuit(tuple(g for g in self._circuit.groups if g.name in keep), self._circuit.name)

    @circuit.setter
    def circuit(self, circuit: Any) -> None:
        self._set_circuit(circuit, keep_toggles=False)

    def _set_circuit(self, circuit: Any, keep_toggles: bool) -> None:
        """Show a circuit; ``keep_toggles``: groups it had before keep their on/off state (new ones are on)."""
        c = Circuit.parse(circuit)
        c.validate(self._shape.n_layers, self._shape.n_heads, self._task.position_names)
        before = {g["name"] for g in self.groups}
        was_on = set(self.enabled)
        self._circuit = c
        with self.hold_sync():
            self.groups = [
                {
                    "name": g.name,
                    "position": g.position or "all",
                    "heads": [str(h) for h in sorted(g.heads)],
                }
                for g in c.groups
            ]
            self.enabled = [
                g.name
                for g in c.groups
                if not keep_toggles or g.name in was_on or g.name not in before
            ]
            self.grid.circuit = c  # its heads outlined, their group names on hover

    @traitlets.validate("enabled")
    def _valid_enabled(self, proposal: dict) -> list[str]:
        names = [g["name"] for g in self.groups]
        bad = [n for n in proposal["value"] if n not in names]
        if bad:
            raise traitlets.TraitError(f"no group {bad[0]!r}; the circuit has {names}")
        return [n for n in names if n in proposal["value"]]  # circuit order

    @traitlets.validate("grid_position")
    def _valid_grid_position(self, proposal: dict) -> str:
        try:
            _check_grid_position(self._task, proposal["value"])
        except ValueError as exc:
            raise traitlets.TraitError(str(exc)) from None
        return proposal["value"]

    @property
    def result(self) -> Any:
        """The last CMAPResult (None before a run)."""
        return self._result

    # ------------------------------------------------------------------ running

    def run(self) -> Job:
        """Patch the enabled groups, then (``sweep_grid``) every head alone; off the main thread."""
        circuit = self.circuit
        if not circuit.groups:
            raise ValueError("no circuit group is enabled: tick at least one group")
        return self._submit(self._work, circuit, self.grid_position, self.sweep_grid)

    def _work(self, job: Job, circuit: Circuit, grid_position: str, sweep_grid: bool) -> dict:
        from circuit_widgets.core.cross_model import cmap, cmap_grid

        share = 0.3 if sweep_grid else 1.0
        groups = ", ".join(g.name for g in circuit.groups)
        # the subtitle says what runs now; the grid keeps its earlier values until new ones come
        if sweep_grid:
            job.report(partial={"grid": self._status_grid(f"running: patching groups {groups}")})
        # job.stopper(hold): between two batches the models go to any widget waiting for them
        with using(self._base, self._finetuned) as hold:
            res = cmap(
                self._base,
                self._finetuned,
                self._task,
                circuit=circuit,
                component=self._component,
                on_progress=lambda d, t: job.report(progress=share * d / max(t, 1)),
                should_stop=job.stopper(hold),
            )
        out: dict = {"cmap": res}
        if not res.complete:
            if sweep_grid:
                out["grid"] = self._status_grid("stopped before the per-head grid")
            return out  # stopped: shown as the cancelled job's result
        job.report(partial=dict(out))
        if sweep_grid:
            job.check()
            running = f"running: each head patched alone at {grid_position}"
            job.report(partial={"cmap": res, "grid": self._status_grid(running)})
            with using(self._base, self._finetuned) as hold:
                out["grid"] = cmap_grid(
                    self._base,
                    self._finetuned,
                    self._task,
                    component=self._component,
                    position=grid_position,
                    on_progress=lambda d, t: job.report(
                        progress=share + (1 - share) * d / max(t, 1)
                    ),
                    should_stop=job.stopper(hold),
                    # cells appear as each pass finishes (as path patching's layers do)
                    on_partial=lambda g: job.report(
                        partial={"cmap": res, "grid": _relabelled(g, running)}
                    ),
                )
            if not out["grid"].complete:
                out["grid"] = _relabelled(out["grid"], "stopped: each head patched alone")
        return out

    def _status_grid(self, kind: str) -> GridView:
        """The grid as shown now (values kept), with ``kind`` as its subtitle, not complete."""
        g = self.grid
        return GridView(
            values=np.array(g.values, np.float32),
            normalized=None if g.normalized is None else np.array(g.normalized, np.float32),
            layers=list(g.layer_numbers),
            heads=list(g.heads),
            kv_groups=list(g.kv_groups) if g.kv_columns else None,
            kind=kind,
            component=self._component,
            metric_name=g.metric_name,
            complete=False,
        )

    def _on_partial(self, partial: dict) -> None:
        res = partial.get("cmap")
        if res is not None:
            self._result = res
            rows, recovered = [], []
            for name in res.groups:
                g = res.group(name)
                rows.append([g["base_accuracy"], g["patched_accuracy"], g["finetuned_accuracy"]])
                recovered.append(g["recovered"])
            with self.hold_sync():
                self.bar_labels = list(res.groups)
                self.bars = np.asarray(rows, np.float32).reshape(-1, 3)
                self.recovered = np.asarray(recovered, np.float32)
        if partial.get("grid") is not None:
            self.grid.set_result(partial["grid"])  # keeps the circuit's heads selected

    def _on_result(self, result: dict) -> None:
        self._on_partial(result)

    # ------------------------------------------------------------------ static image

    def figure(self):
        """Bar chart of accuracies and the per-head grid, as a matplotlib Figure."""
        from matplotlib.figure import Figure

        from circuit_widgets.plots import plot_head_grid

        fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
        labels = list(self.bar_labels)
        width = 0.27
        colors = ("#9e9e9e", "#b2182b", "#2166ac")
        for j, (name, color) in enumerate(zip(SERIES, colors)):
            ys = self.bars[:, j] if len(self.bars) else np.zeros(0)
            xs = np.arange(len(labels)) + (j - 1) * width
            bars = left.bar(xs, ys, width=width * 0.92, label=name, color=color)
            left.bar_label(
                bars, labels=[f"{y:.2f}" if np.isfinite(y) else "" for y in ys], fontsize=7
            )
        left.set_xticks(range(len(labels)), labels)
        left.set_ylim(0, 1.1)
        left.set_ylabel("accuracy")
        left.spines[["top", "right"]].set_visible(False)
        left.legend(fontsize=8, frameon=False, ncols=3, loc="upper left")
        left.set_title(
            "CMAP: accuracy per group" if labels else "CMAP (not run yet)", loc="left", fontsize=10
        )
        row = {layer: r for r, layer in enumerate(self.grid.layer_numbers)}
        plot_head_grid(
            self.grid.values,
            heads=self.grid.heads,
            layers=self.grid.layers,
            ax=right,
            metric_name=self.grid.metric_name or "value",
            title=self.grid.title or None,
            selected=[(row[l], h) for l, h in self.grid.selected],
        )
        return fig

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: {b[1]:.2f}" for n, b in zip(self.bar_labels, self.bars))
        return (
            f"CMAPWidget(groups {', '.join(self.enabled) or '(none)'}; patched accuracy "
            f"{rows or '-'}; status {self.status})"
        )
