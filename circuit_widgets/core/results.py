"""Result dataclasses: tensors plus the axis labels a widget or a plot needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuit_widgets.types import Component, ComponentName, DirectionName, GridKind, Head


@runtime_checkable
class GridLike(Protocol):
    """What a head-grid view reads from a result: a HeadGrid, or a grid a widget builds itself
    (``widgets.head_grid.GridView``: a run in progress, a DCM mask). Read-only, so a frozen
    result satisfies it."""

    @property
    def values(self) -> Any:
        """[n_layers, n_heads] tensor or array; NaN = not computed."""

    @property
    def normalized(self) -> Any:
        """Same shape as ``values``, or None."""

    @property
    def pending(self) -> Any:
        """Same shape, 1 where a value is still a preview estimate; or None."""

    @property
    def layers(self) -> Sequence[int]:
        """The model layer of each row ([] = 0..n-1)."""

    @property
    def heads(self) -> Sequence[str]:
        """Column labels ([] = 0..n-1)."""

    @property
    def kv_groups(self) -> Sequence[Sequence[int]] | None:
        """Columns are key/value heads: the query heads of each (None = query-head columns)."""

    @property
    def kind(self) -> str: ...

    @property
    def component(self) -> str: ...

    @property
    def metric_name(self) -> str: ...

    @property
    def position(self) -> str | None: ...

    @property
    def complete(self) -> bool | None:
        """None: complete when every value is finite."""

    @property
    def n_cells(self) -> int:
        """How many cells can hold a value; 0 = all."""

    @property
    def scale(self) -> str:
        """ "diverging" (around 0) or "sequential" (values never negative)."""


@dataclass(frozen=True, eq=False)
class HeadGrid:
    """One number per (layer, head) — or per (layer, position, head) — of a patching sweep.

    ``values`` is the mean over examples of (metric patched - metric clean), whatever the
    direction; ``normalized`` divides it by mean(metric corrupt - metric clean), so 1 means
    "as much change as corrupting everything" and 0 "no change". Cells not computed (a
    ``heads`` subset, a stopped sweep, non-sender heads) are NaN and ``done`` is False there.
    For k/v on grouped-query models the columns are key/value heads and ``kv_groups[g]``
    lists the query heads that share key/value head g.
    """

    values: Float[Tensor, "layer *pos head"]
    normalized: Float[Tensor, "layer *pos head"]
    per_example: Float[Tensor, "batch layer *pos head"]
    metric_clean: Float[Tensor, " batch"]
    metric_corrupt: Float[Tensor, " batch"]
    done: Bool[Tensor, "layer *pos head"]
    complete: bool
    layers: list[int]
    heads: list[str]
    positions: list[str] | None
    component: ComponentName | Component
    direction: DirectionName
    kind: GridKind
    metric_name: str
    receivers: str | None = None
    kv_groups: list[list[int]] | None = None
    position: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def pending(self) -> None:
        """No preview cells: every value is exact (``GridLike``)."""
        return None

    @property
    def n_cells(self) -> int:
        """Every cell can hold a value (``GridLike``)."""
        return 0

    @property
    def scale(self) -> str:
        """Effects of either sign: a diverging colour scale (``GridLike``)."""
        return "diverging"

    @property
    def recovered(self) -> Float[Tensor, "layer *pos head"]:
        """The share of the gap a patch closes: 1 - normalized for 'denoise' patching; for CMAP
        grids ``normalized`` already is (patched - base) / (fine-tuned - base), so it is returned as is."""
        if self.kind == "cmap":
            return self.normalized
        return 1.0 - self.normalized

    @property
    def relative(self) -> Float[Tensor, "layer *pos head"]:
        """Mean over examples of (metric patched - metric clean) / metric clean.

        With the task's metric "prob" this is Prakash et al.'s path-patching score for entity
        tracking, (p_patched - p_clean) / p_clean per example. Examples whose clean metric is 0
        or not finite are left out of the mean; a cell with no example left (or not computed)
        is NaN.
        """
        lead = [1] * (self.per_example.dim() - 1)
        clean = self.metric_clean.float().to(self.per_example.device).reshape(-1, *lead)
        ok = torch.isfinite(clean) & (clean != 0)
        ratio = self.per_example.float() / torch.where(ok, clean, torch.ones_like(clean))
        ratio = torch.where(ok & torch.isfinite(ratio), ratio, torch.full_like(ratio, math.nan))
        return ratio.nanmean(0)

    def top(self, k: int = 10) -> list[tuple[Head, float]]:
        """The k cells of largest |value| as (Head, value), NaN skipped. By-position grids
        rank each head by its largest-|value| position (each head listed once)."""
        vals = self.values
        if vals.dim() == 3:
            idx = vals.nan_to_num(0.0).abs().argmax(1, keepdim=True)
            best = vals.gather(1, idx).squeeze(1)
            any_done = self.done.any(1)
            vals = torch.where(any_done, best, torch.full_like(best, math.nan))
        flat = vals.flatten()
        order = torch.argsort(flat.abs().nan_to_num(nan=-1.0), descending=True, stable=True)
        n_cols = vals.shape[-1]
        out: list[tuple[Head, float]] = []
        for i in order.tolist():
            v = float(flat[i])
            if math.isnan(v) or len(out) >= k:
                break
            out.append((Head(self.layers[i // n_cols], i % n_cols), v))
        return out

    def to_dataframe(self):
        """One row per cell: layer, head, head_label, [position], value, normalized, done."""
        import pandas as pd

        rows = []
        by_pos = self.values.dim() == 3
        n_pos = self.values.shape[1] if by_pos else 1
        for li, layer in enumerate(self.layers):
            for p in range(n_pos):
                for h, label in enumerate(self.heads):
                    ix = (li, p, h) if by_pos else (li, h)
                    row = {"layer": layer, "head": h, "head_label": label}
                    if by_pos:
                        row["position"] = self.positions[p] if self.positions else p
                    row["value"] = float(self.values[ix])
                    row["normalized"] = float(self.normalized[ix])
                    row["done"] = bool(self.done[ix])
                    rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial ({int(self.done.sum())} cells)"
        return (
            f"HeadGrid({self.kind} patching of {self.component}, {self.direction}, "
            f"shape={self.shape}, metric={self.metric_name}, {state})"
        )


def rank_heads(
    grid: Any,
    *,
    top_k: int | None = None,
    top_frac: float | None = None,
    threshold: float | None = None,
    sign: str = "abs",
) -> list[Head]:
    """The heads of a [n_layers, n_heads] grid in ``Circuit.from_grid``'s ranking (see there).

    ``grid`` is a HeadGrid (or any result with ``values`` and ``normalized``) or a tensor.
    """
    if sum(x is not None for x in (top_k, top_frac, threshold)) != 1:
        raise ValueError("give exactly one of top_k, top_frac or threshold")
    if isinstance(grid, torch.Tensor):
        values = grid
    else:
        values = getattr(grid, "values", grid)
        normalized = getattr(grid, "normalized", None)
        if normalized is not None and not bool(torch.isnan(torch.as_tensor(normalized)).all()):
            values = normalized
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.dim() != 2:
        raise ValueError(
            f"from_grid needs a [n_layers, n_heads] grid, got shape {tuple(values.shape)}"
        )
    score = {"abs": values.abs(), "positive": values, "negative": -values}.get(sign)
    if score is None:
        raise ValueError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
    score = torch.nan_to_num(score, nan=float("-inf"))
    flat = score.flatten()
    finite = int(torch.isfinite(flat).sum())
    if threshold is not None:
        keep = (flat >= threshold).nonzero().flatten().tolist()
    else:
        if top_frac is not None:
            if not 0 < top_frac <= 1:
                raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
            # Fraction of all heads, as Merullo et al. take the top 2% per stage.
            top_k = max(1, round(top_frac * flat.numel()))
        assert top_k is not None  # exactly one of the three was given
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        keep = flat.argsort(descending=True, stable=True)[: min(top_k, finite)].tolist()
    n_heads = values.shape[1]
    return [Head(i // n_heads, i % n_heads) for i in keep]
