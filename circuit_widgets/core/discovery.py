"""Circuit discovery: the multi-stage path-patching pipeline that finds a circuit backwards
from the logits (``circuit_pipeline``, ``default_stages``), with banded path patching for stages
that receive into earlier stages' heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.core import nnsight_backend
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    Progress,
    Stop,
    build_grid,
    check_callbacks,
)
from circuit_widgets.core.path_patching import path_patch
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.models import model_shape
from circuit_widgets.types import (
    Circuit,
    CircuitGroup,
    Component,
    Head,
    ModelLike,
    Receiver,
    ReceiverInput,
    Stage,
)

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

RANK_BY = ("normalized", "relative", "value")

# ====================================================================== pipeline


def default_stages(task: Task) -> list[Stage]:
    """The stages a task carries (``task.stages``, set by its generator: see ``tasks.ioi``,
    ``tasks.colored_objects``, ``tasks.entity_tracking``); for a task without its own, movers
    -> logits at END and inhibition -> movers' queries at END."""
    own = tuple(getattr(task, "stages", ()) or ())
    if own:
        return list(own)
    return [Stage("movers", "END"), Stage("inhibition", "END", "movers", "q")]


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """The circuit found stage by stage (one group per stage, at the stage's position) and
    each stage's path-patching grid. ``complete`` is False when stopped early."""

    circuit: Circuit
    grids: dict[str, HeadGrid]
    stages: tuple[Stage, ...]
    sign: str
    complete: bool
    notes: list[str] = field(default_factory=list)
    rank_by: str = "normalized"
    """What each stage ranked its heads by: "normalized", "relative" or "value"."""

    def effect(self, stage: str, head: Any) -> float:
        """Normalized path-patching effect of ``head`` in ``stage``'s grid."""
        h = Head.parse(head)
        return float(self.grids[stage].normalized[h.layer, h.head])

    def negative_heads(self, stage: str) -> list[Head]:
        """Heads picked in ``stage`` whose corruption *helps* the task (normalized effect < 0),
        e.g. negative name movers."""
        g = self.circuit.group(stage)
        return sorted(h for h in g.heads if self.effect(stage, h) < 0)

    def to_dataframe(self):
        """One row per (stage, picked head): layer, head, value, normalized, relative, and the
        rank in its stage by the score the stage ranked with (``rank_by``, ``sign``)."""
        import pandas as pd

        rows = []
        for st in self.stages:
            if st.name not in self.grids:
                continue
            grid = self.grids[st.name]
            score, _ = _ranking(grid, self.rank_by)
            keyed = {"abs": score.abs(), "positive": score, "negative": -score}[self.sign]
            heads = sorted(
                self.circuit.group(st.name).heads, key=lambda h: -float(keyed[h.layer, h.head])
            )
            relative = grid.relative
            for rank, h in enumerate(heads):
                rows.append(
                    {
                        "stage": st.name,
                        "position": st.position,
                        "layer": h.layer,
                        "head": h.head,
                        "head_label": str(h),
                        "rank": rank,
                        "value": float(grid.values[h.layer, h.head]),
                        "normalized": float(grid.normalized[h.layer, h.head]),
                        "relative": float(relative[h.layer, h.head]),
                    }
                )
        return pd.DataFrame(rows)


def circuit_pipeline(
    model: ModelLike,
    task: Task,
    *,
    stages: Sequence[Stage] | None = None,
    top_frac: float = 0.02,
    top_k: int | None = None,
    sign: str = "abs",
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    rank_by: str = "normalized",
) -> PipelineResult:
    """Multi-stage path patching backwards from the logits (Wang et al.; Merullo et al.).

    Stage 1 patches every head's z at its position and reads the effect at the logits; each
    later stage patches heads into the chosen inputs of the previous (named) stage's heads, all
    receivers at once. Each stage keeps its ``top_k`` heads, else the top ``top_frac`` of all
    the model's heads (Merullo et al. take 2% per stage), ranked by ``rank_by``: "normalized"
    (default; the grid's ``normalized``, (ld_patched - ld_clean) / (ld_corrupt - ld_clean) as
    Wang et al. and Merullo et al. score), "relative" (the grid's ``relative``, mean of
    (p_patched - p_clean) / p_clean, Prakash et al.'s score when the metric is "prob") or
    "value" (the raw mean change). ``sign="abs"`` ranks by |score| (default, so negative
    movers, whose corruption raises the metric, are caught), "positive" only heads that help
    the task (the patch moves the metric toward the corrupt run), "negative" only those that
    hurt it; "relative" and "value" are oriented by the sign of mean(corrupt - clean) so that
    positive means the same for every ``rank_by``. A stage's own ``top_k``/``top_frac``
    override the call's. Default stages:
    ``default_stages(task)``. Progress counts path-patching passes; once stopped the stages
    done so far come back with complete=False.
    """
    check_args("circuit_pipeline", model=model, task=task)
    requests_before = getattr(model, "requests", 0) if nnsight_backend.is_nnsight(model) else None
    shape = model_shape(model)
    check_callbacks(on_progress, should_stop, batch_size)
    if sign not in ("abs", "positive", "negative"):
        raise ValueError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if top_k is None and not (isinstance(top_frac, (int, float)) and 0 < top_frac <= 1):
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    stages = list(default_stages(task) if stages is None else stages)
    _check_stages(stages, task)

    found: dict[str, frozenset[Head]] = {}
    grids: dict[str, HeadGrid] = {}
    groups: list[CircuitGroup] = []
    notes: list[str] = []
    complete = True
    n_stages = len(stages)
    for i, st in enumerate(stages):
        if should_stop is not None and should_stop():
            complete = False
            break

        def inner(done: int, total: int, i: int = i) -> None:
            if on_progress is not None:
                on_progress(i * 1000 + (1000 * done) // max(total, 1), n_stages * 1000)

        grid: HeadGrid | None
        if st.receivers == "logits":
            grid = path_patch(
                model,
                task,
                receivers="logits",
                position=st.position,
                freeze_mlps=freeze_mlps,
                batch_size=batch_size,
                on_progress=inner,
                should_stop=should_stop,
            )
        else:
            recv = [
                Receiver(h.layer, h.head, ReceiverInput.coerce(inp))
                for h in sorted(found[st.receivers])
                for inp in dict.fromkeys(st.inputs)
            ]
            grid = _banded_path_patch(
                model, task, shape, recv, st.position, freeze_mlps, batch_size, inner, should_stop
            )
            if grid is None and not found[st.receivers]:
                notes.append(
                    f"stage {st.name!r}: stage {st.receivers!r} picked no heads, so "
                    f"there is nothing to receive into and it is empty"
                )
            elif grid is None:
                notes.append(
                    f"stage {st.name!r}: stage {st.receivers!r} has no heads above "
                    f"layer 0 to receive, so it is empty"
                )
        if grid is not None and not grid.complete:
            complete = False
            grids[st.name] = grid
            break
        heads: frozenset[Head] = frozenset()
        if grid is not None:
            grids[st.name] = grid
            score, why = _ranking(grid, rank_by)
            if why:
                notes.append(f"stage {st.name!r}: {why}")
            k = st.top_k if st.top_k is not None else (None if st.top_frac is not None else top_k)
            frac = None if k is not None else (st.top_frac if st.top_frac is not None else top_frac)
            picked = Circuit.from_grid(score, top_k=k, top_frac=frac, sign=sign)
            heads = picked.heads
        found[st.name] = heads
        groups.append(CircuitGroup(st.name, heads, st.position))
        if on_progress is not None:
            on_progress((i + 1) * 1000, n_stages * 1000)
    if requests_before is not None:
        made = getattr(model, "requests", 0) - requests_before
        notes.append(
            f"nnsight ({nnsight_backend.where(model)}): {made} request(s) for {len(grids)} stage(s)"
        )
    name = f"{getattr(task, 'name', 'task')} circuit"
    return PipelineResult(
        circuit=Circuit(tuple(groups), name),
        grids=grids,
        stages=tuple(stages),
        sign=sign,
        complete=complete,
        notes=notes,
        rank_by=rank_by,
    )


def _ranking(grid: HeadGrid, rank_by: str) -> tuple[Tensor, str | None]:
    """The [layer, head] score a stage ranks by, positive = the patch moves the metric toward
    the corrupt run, and a note when it had to fall back to the raw value."""
    if rank_by == "normalized":
        if bool(torch.isnan(grid.normalized).all()) and bool(grid.done.any()):
            return (
                grid.values,
                "clean and corrupt metrics agree on average, so heads are ranked by the raw value",
            )
        return grid.normalized, None
    gap = float((grid.metric_corrupt.float() - grid.metric_clean.float()).mean())
    raw = grid.relative if rank_by == "relative" else grid.values
    # Oriented like ``normalized`` (which divides by this gap), so sign= means the same for all.
    return (-raw if gap < 0 else raw), None


def _check_stages(stages: list[Stage], task: Task) -> None:
    if not stages:
        raise ValueError("stages must hold at least one Stage")
    seen: list[str] = []
    for st in stages:
        if not isinstance(st, Stage):
            raise ValueError(f"stages must be Stage objects, got {type(st).__name__}")  # noqa: TRY004 - every input mistake is a ValueError
        if st.name in seen:
            raise ValueError(f"stage names must be unique; {st.name!r} repeats")
        if st.position not in task.positions:
            raise ValueError(
                f"stage {st.name!r} acts at position {st.position!r}, which task "
                f"{task.name!r} lacks; it has {sorted(task.positions)}"
            )
        if st.receivers != "logits" and st.receivers not in seen:
            raise ValueError(
                f"stage {st.name!r} receives into {st.receivers!r}, which is not an "
                f"earlier stage; use 'logits' or one of {seen}"
            )
        seen.append(st.name)


def _banded_path_patch(
    model, task, shape, recv, position, freeze_mlps, batch_size, on_progress, should_stop
) -> HeadGrid | None:
    """Path patching of every head below the top receiver into ``recv``.

    A sender in layer l cannot change a receiver in layer <= l (its input is still clean in
    the frozen run), so senders are patched band by band, each band against the receivers
    above it: the same numbers as one pass with all receivers, without path_patch's rule that
    every sender sit below the lowest receiver.
    """
    layers = sorted({r.layer for r in recv})
    bands = []
    lo = 0
    for hi in layers:
        if hi > lo:
            senders = [Head(l, h) for l in range(lo, hi) for h in range(shape.n_heads)]
            bands.append((senders, [r for r in recv if r.layer >= hi]))
        lo = hi
    if not bands:
        return None
    total = sum(len(s) for s, _ in bands)
    per_example = None
    done = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.bool)
    notes: list[str] = []
    complete = True
    offset = 0
    grid = None
    for senders, rs in bands:

        def inner(d: int, t: int, offset: int = offset, n: int = len(senders)) -> None:
            if on_progress is not None:
                on_progress(offset + (n * d) // max(t, 1), total)

        grid = path_patch(
            model,
            task,
            receivers=rs,
            senders=senders,
            position=position,
            freeze_mlps=freeze_mlps,
            batch_size=batch_size,
            on_progress=inner,
            should_stop=should_stop,
        )
        if per_example is None:
            per_example = grid.per_example.clone()
        per_example = torch.where(grid.done[None], grid.per_example, per_example)
        done |= grid.done
        notes += [n for n in grid.notes if n not in notes]
        offset += len(senders)
        if not grid.complete:
            complete = False
            break
    assert grid is not None and per_example is not None  # bands is not empty
    desc = ", ".join(str(r) for r in recv)
    return build_grid(
        per_example,
        done,
        grid.metric_clean,
        grid.metric_corrupt,
        shape=shape,
        component=Component.Z,
        direction="noise",
        kind="path",
        metric_name=task.metric_name,
        positions=None,
        position=position,
        complete=complete,
        receivers=desc,
        notes=notes,
    )
