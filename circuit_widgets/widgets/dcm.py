"""DCMWidget: train DCM masks over a lambda sweep, pick lambda on a slider, see the mask and loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import traitlets
from ipywidgets import widget_serialization

from circuit_widgets.core.checks import check_args
from circuit_widgets.types import Circuit, Head
from circuit_widgets.widgets._base import BaseWidget, Job, read_bundle
from circuit_widgets.widgets._model_lock import using
from circuit_widgets.widgets._traits import Float32Array
from circuit_widgets.widgets.head_grid import GridView, HeadGridWidget


def _check_lams(lams: Any) -> list[float]:
    items = list(lams) if isinstance(lams, (list, tuple)) else None
    if not items or any(
        not isinstance(x, (int, float)) or isinstance(x, bool) or not 0 <= x < math.inf
        for x in items
    ):
        raise ValueError(f"lams must be a non-empty list of finite numbers >= 0, got {lams!r}")
    return [float(x) for x in items]


def _check_position(desideratum: Any, position: Any) -> None:
    names = getattr(desideratum, "base_positions", None)
    if not isinstance(position, str):
        raise ValueError(f"position must be a position name such as 'END', got {position!r}")  # noqa: TRY004 - input mistakes are ValueErrors
    if names is not None and position not in names:
        raise ValueError(
            f"position {position!r} is not one of the desideratum's positions {sorted(names)}"
        )


_NOT_TRAINED = "not trained yet: press Train"
_NO_RESULT = "no result: cancelled before the first λ finished"


def _mask_grid(
    values: np.ndarray, metric_name: str, complete: bool, kind: str, position: str
) -> GridView:
    """The head grid's view of one MaskResult: 1 - mask (1 = the head takes the source output)."""
    return GridView(
        values,
        layers=list(range(values.shape[0])),
        heads=[str(h) for h in range(values.shape[1])],
        kind=kind,
        component="z",
        metric_name=metric_name,
        complete=complete,
        position=position,
        scale="sequential",  # 1 - mask lies in [0, 1]: a diverging scale would waste its blue half
    )


class DCMWidget(BaseWidget):
    """Desiderata-based component masking (DCM) over a sweep of sparsity weights lambda.

    Train runs one ``dcm_sweep`` over all lambdas off the main thread (source activations
    computed once; each finished lambda appears at once; Cancel keeps them). The lambda
    slider picks which result is shown: its learned mask on the head grid (as 1 - m; the selected heads, rounded mask 0, outlined),
    its training loss curve and its accuracies. ``widget.circuit`` is the grid's selection: the
    shown result's selected heads (``select_result=False`` leaves the selection to the user).
    A saved notebook keeps the static image drawn when the widget was displayed:
    ``IPython.display.Image(widget.to_image())`` shows the trained mask and loss.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/dcm.js)."""
    grid = traitlets.Instance(HeadGridWidget).tag(sync=True, **widget_serialization)
    """The mask of the shown lambda, as a head grid (selection = the heads DCM selected)."""
    lams = traitlets.List(traitlets.Float()).tag(sync=True)
    """The lambdas to train, in order."""
    n_done = traitlets.Int(0).tag(sync=True)
    """How many lambdas have a result (the slider's range)."""
    lam_index = traitlets.Int(0, min=0).tag(sync=True)
    """Index into ``lams`` of the result shown."""
    loss = Float32Array(ndim=1).tag(sync=True)
    """Training loss per step of the shown lambda, float32."""
    val_accuracy = Float32Array(ndim=2).tag(sync=True)
    """[n_checks, 2]: (step, validation accuracy of the rounded mask) of the shown lambda."""
    summary = traitlets.Dict().tag(sync=True)
    """Numbers of the shown result: lam, n_selected, train/val/test/baseline/full-patch accuracy, best_step."""
    desideratum = traitlets.Unicode("").tag(sync=True)
    """Name of the desideratum trained on."""
    position = traitlets.Unicode("END").tag(sync=True)
    """Position of the head group whose outputs are masked."""

    _run_action: ClassVar[str | None] = "train"
    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout",)

    def __init__(
        self,
        model: Any,
        desideratum: Any,
        heads: Any = None,
        position: str = "END",
        *,
        lams: Sequence[float] | None = None,
        epochs: int = 2,
        lr: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
        select_result: bool = True,
        title: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        check_args("DCMWidget", model=model, desideratum=desideratum)
        from circuit_widgets.core.masking import DEFAULT_LAMS
        from circuit_widgets.models import model_shape

        shape = model_shape(model)
        self._model, self._desideratum, self._shape = model, desideratum, shape
        lam_list = _check_lams(DEFAULT_LAMS if lams is None else lams)
        _check_position(desideratum, position)
        self._heads = (
            None
            if heads is None
            else [
                Head.parse(tuple(h) if isinstance(h, list) else h)
                for h in (heads.heads if isinstance(heads, Circuit) else heads)
            ]
        )
        for h in self._heads or []:
            shape.check_head(h)
        self._select_result = bool(select_result)
        self._train_kwargs: dict[str, Any] = {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
        }
        self._results: list[Any] = []
        nan = np.full((shape.n_layers, shape.n_heads), np.nan, np.float32)
        grid = HeadGridWidget(
            _mask_grid(nan, "1 - mask", True, _NOT_TRAINED, position),
            title=title or f"DCM · {getattr(desideratum, 'name', 'desideratum')} @ {position}",
        )
        grid._use_model_groups(shape.n_heads, shape.n_kv_heads)
        super().__init__(
            {
                "_esm": read_bundle("dcm"),
                "grid": grid,
                "lams": [float(x) for x in lam_list],
                "desideratum": str(getattr(desideratum, "name", "")),
                "position": position,
            },
            **kwargs,
        )
        self.observe(self._show, names="lam_index")

    # ------------------------------------------------------------------ results

    @property
    def results(self) -> list[Any]:
        """The MaskResults finished so far, one per lambda in ``lams`` order."""
        return list(self._results)

    @property
    def result(self) -> Any:
        """The MaskResult shown (None before training)."""
        return self._results[self.lam_index] if self.lam_index < len(self._results) else None

    @property
    def circuit(self) -> Circuit:
        """The heads selected on the grid (DCM's selection for the shown lambda unless edited)."""
        return self.grid.circuit

    @traitlets.validate("lams")
    def _valid_lams(self, proposal: dict) -> list[float]:
        try:
            return _check_lams(proposal["value"])
        except ValueError as exc:
            raise traitlets.TraitError(str(exc)) from None

    @traitlets.validate("position")
    def _valid_position(self, proposal: dict) -> str:
        try:
            _check_position(self._desideratum, proposal["value"])
        except ValueError as exc:
            raise traitlets.TraitError(str(exc)) from None
        return proposal["value"]

    @traitlets.validate("lam_index")
    def _valid_index(self, proposal: dict) -> int:
        value, n = proposal["value"], max(1, len(self._results))
        if not 0 <= value < n:
            raise traitlets.TraitError(
                f"lam_index must be in 0-{n - 1} ({len(self._results)} lambdas trained)"
            )
        return value

    def _show(self, change: dict | None = None) -> None:
        r = self.result
        if r is None:
            return
        mask = r.mask.float().cpu().numpy()
        kind = f"DCM mask, λ = {r.lam:g}: {r.n_selected} of {len(r.heads)} heads selected"
        grid = _mask_grid(
            (1.0 - mask).astype(np.float32), "1 - mask", bool(r.complete), kind, self.position
        )
        curve = r.curve
        checks = (
            np.stack(
                [curve.val_step.float().cpu().numpy(), curve.val_accuracy.float().cpu().numpy()], 1
            )
            if len(curve.val_step)
            else np.zeros((0, 2), np.float32)
        )
        num = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
        with self.hold_sync():
            self.grid.set_result(grid)
            if (
                self._select_result
            ):  # else the grid keeps the user's (e.g. an explorer's shared) circuit
                self.grid.selected = [[h.layer, h.head] for h in r.selected]
            self.loss = curve.loss.float().cpu().numpy()
            self.val_accuracy = checks
            self.summary = {
                "lam": float(r.lam),
                "n_selected": int(r.n_selected),
                "n_heads": len(r.heads),
                "train_accuracy": num(r.train_accuracy),
                "val_accuracy": num(r.val_accuracy),
                "test_accuracy": num(r.test_accuracy),
                "baseline_accuracy": num(r.baseline_accuracy),
                "full_patch_accuracy": num(r.full_patch_accuracy),
                "best_step": int(r.best_step),
                "complete": bool(r.complete),
            }

    # ------------------------------------------------------------------ training

    def train(self) -> Job:
        """Train every lambda in ``lams`` (off the main thread); returns the Job."""
        return self._submit(self._sweep, list(self.lams), self.position)

    def _sweep(self, job: Job, lams: list[float], position: str) -> list[Any]:
        from circuit_widgets.core.masking import dcm_sweep

        results: list[Any] = []

        def landed(result: Any) -> None:  # each finished lambda reaches the screen as it lands
            results.append(result)
            job.report(partial=list(results))

        # One sweep: the source activations and reference accuracies are computed once; the
        # model is handed to any waiting widget between two batches (job.stopper).
        with using(self._model) as hold:
            sweep = dcm_sweep(
                self._model,
                self._desideratum,
                heads=self._heads,
                position=position,
                lams=lams,
                should_stop=job.stopper(hold),
                on_result=landed,
                on_progress=lambda d, t: job.report(progress=d / max(t, 1)),
                **self._train_kwargs,
            )
        return list(sweep.results)

    def _on_partial(self, partial: list[Any]) -> None:
        # A lambda stopped mid-training is no result to choose: only finished lambdas are shown.
        self._results = [r for r in partial if r.complete]
        with self.hold_sync():
            self.n_done = len(self._results)
            if not self._results:
                self._show_empty()
            elif self.lam_index != len(self._results) - 1:
                self.lam_index = len(self._results) - 1  # follow the newest lambda
            else:
                self._show()

    def _show_empty(self) -> None:
        """No finished lambda (a run cancelled before its first one ended): an empty grid, said so."""
        shape = self._shape
        nan = np.full((shape.n_layers, shape.n_heads), np.nan, np.float32)
        with self.hold_sync():
            self.grid.set_result(_mask_grid(nan, "1 - mask", True, _NO_RESULT, self.position))
            if self._select_result:
                self.grid.selected = []
            self.loss = np.zeros(0, np.float32)
            self.val_accuracy = np.zeros((0, 2), np.float32)
            self.summary = {}
            if self.lam_index != 0:
                self.lam_index = 0

    def _on_result(self, result: list[Any]) -> None:
        self._on_partial(result)
        # Rest on the lambda with the best validation accuracy (ties: the sparser mask).
        if self._results:
            best = max(
                range(len(self._results)),
                key=lambda i: (np.nan_to_num(self._results[i].val_accuracy, nan=-1.0), i),
            )
            self.lam_index = best

    # ------------------------------------------------------------------ static image

    def figure(self):
        """Mask grid and loss curve side by side, as a matplotlib Figure."""
        from matplotlib.figure import Figure

        from circuit_widgets.plots import plot_head_grid

        fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[1.3, 1], gridspec_kw={"wspace": 0.08})
        row = {layer: r for r, layer in enumerate(self.grid.layer_numbers)}
        plot_head_grid(
            self.grid.values,
            heads=self.grid.heads,
            layers=self.grid.layers,
            metric_name="1 - mask",
            selected=[(row[l], h) for l, h in self.grid.selected],
            ax=left,
            title=self.grid.kind or "DCM mask",
            sequential=True,
        )
        if len(self.loss):
            right.plot(np.arange(len(self.loss)), self.loss, color="#2166ac", linewidth=1.5)
        right.set_xlabel("step")
        right.set_ylabel("loss")
        right.spines[["top", "right"]].set_visible(False)
        s = self.summary
        right.set_title(
            f"λ = {s['lam']:g}: test accuracy {s['test_accuracy'] if s.get('test_accuracy') is not None else float('nan'):.2f}"
            if s
            else "not trained yet",
            loc="left",
            fontsize=10,
        )
        return fig

    def __repr__(self) -> str:
        return (
            f"DCMWidget({self.desideratum}@{self.position}, {self.n_done}/{len(self.lams)} lambdas trained, "
            f"shown {self.summary.get('lam', '-')}, selected {len(self.grid.selected)}, status {self.status})"
        )
