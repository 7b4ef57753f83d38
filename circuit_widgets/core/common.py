"""What every sweep shares: validation, position plans, windows, metric reading, the grid."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, overload

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuit_widgets.core import hooks
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.models import model_shape
from circuit_widgets.types import (
    Component,
    Direction,
    DirectionName,
    GridKind,
    Head,
    ModelLike,
    ModelShape,
)

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

Progress = Callable[[int, int], None] | None
Stop = Callable[[], bool] | None

# Rows x window positions of one pass; ~0.3 GB of activations on the demo model.
DEFAULT_ROW_BUDGET = 6144


# ---------------------------------------------------------------------- validation


@overload
def check_heads(heads: None, component: Component, shape: ModelShape) -> None: ...
@overload
def check_heads(heads: Sequence[Any], component: Component, shape: ModelShape) -> list[Head]: ...
def check_heads(
    heads: Sequence[Any] | None, component: Component, shape: ModelShape
) -> list[Head] | None:
    """Parse a heads subset; head indices are grid columns (kv heads for k/v)."""
    if heads is None:
        return None
    n_cols = hooks.n_columns(component, shape)
    what = (
        "key/value heads"
        if component.per_kv_head
        else ("heads" if component.per_head else "columns")
    )
    out = []
    for h in heads:
        head = Head.parse(h)
        if head.layer >= shape.n_layers:
            raise ValueError(
                f"head {head}: layer {head.layer} is out of range; valid layers are "
                f"0..{shape.n_layers - 1}"
            )
        if head.head >= n_cols:
            raise ValueError(
                f"head {head}: index {head.head} is out of range; {component.value} "
                f"has {what} 0..{n_cols - 1}"
            )
        out.append(head)
    return out


def check_head(head: Head, shape: ModelShape, label: str = "head") -> None:
    if head.layer >= shape.n_layers:
        raise ValueError(
            f"{label} {head}: layer {head.layer} is out of range; valid layers are "
            f"0..{shape.n_layers - 1}"
        )
    if head.head >= shape.n_heads:
        raise ValueError(
            f"{label} {head}: head {head.head} is out of range; valid heads are "
            f"0..{shape.n_heads - 1}"
        )


def check_callbacks(on_progress: Progress, should_stop: Stop, batch_size: int | None) -> None:
    if on_progress is not None and not callable(on_progress):
        raise ValueError("on_progress must be a callable (done, total) or None")
    if should_stop is not None and not callable(should_stop):
        raise ValueError("should_stop must be a callable () -> bool or None")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


def check_position_name(task: Task, name: str) -> None:
    if name not in task.positions:
        raise ValueError(
            f"task {task.name!r} has no position {name!r}; valid positions are "
            f"{sorted(task.positions)} (or 'all')"
        )


@dataclass(frozen=True)
class SweepPlan:
    """The checked arguments every per-cell sweep (activation, attribution) starts from."""

    comp: Component
    dirn: Direction
    shape: ModelShape
    subset: list[Head] | None
    slots: list[Any]
    labels: list[str] | None
    single: str | None
    n_cols: int


def plan_sweep(
    model: ModelLike,
    task: Task,
    component: Any,
    direction: Any,
    heads: Any,
    positions: Any,
    on_progress: Progress,
    should_stop: Stop,
    batch_size: int | None,
) -> SweepPlan:
    """Validate a sweep's arguments once, in the same order for every sweep."""
    comp = Component.coerce(component)
    dirn = Direction.coerce(direction)
    shape = model_shape(model)
    subset = check_heads(heads, comp, shape)
    check_callbacks(on_progress, should_stop, batch_size)
    slots, labels, single = position_slots(task, positions)
    return SweepPlan(comp, dirn, shape, subset, slots, labels, single, hooks.n_columns(comp, shape))


# ---------------------------------------------------------------------- position plans


@dataclass(frozen=True)
class Slot:
    """One position setting of a sweep: which (example, position) cells get patched."""

    label: str | None
    mask: Bool[Tensor, "b s"]


def position_slots(
    task: Task, positions: Any, allow_each: bool = True
) -> tuple[list[Slot], list[str] | None, str | None]:
    """(slots, position labels or None for 2-D grids, single-position description)."""
    b, s = task.clean_tokens.shape
    ar = torch.arange(s)
    if isinstance(positions, str) and positions == "all":
        return [Slot(None, torch.ones(b, s, dtype=torch.bool))], None, "all"
    if isinstance(positions, str) and positions == "each":
        if not allow_each:
            raise ValueError("positions='each' is not supported here; use 'all' or a position name")
        lengths = task.lengths.cpu()
        slots = [Slot(str(p), (ar[None] == p) & (p < lengths[:, None])) for p in range(s)]
        return slots, [str(p) for p in range(s)], None
    if isinstance(positions, str):
        check_position_name(task, positions)
        return (
            [Slot(positions, ar[None] == task.positions[positions].cpu()[:, None])],
            None,
            positions,
        )
    if (
        isinstance(positions, (list, tuple))
        and positions
        and all(isinstance(p, str) for p in positions)
    ):
        for p in positions:
            check_position_name(task, p)
        slots = [Slot(p, ar[None] == task.positions[p].cpu()[:, None]) for p in positions]
        return slots, list(positions), None
    raise ValueError(
        f"positions must be 'all', 'each', a position name or a list of names; got "
        f"{positions!r} (task {task.name!r} has {sorted(task.positions)})"
    )


def first_diff(task: Task) -> Int[Tensor, " b"]:
    """Per example, the first position where clean and corrupt tokens differ (its length if
    none): every activation before it is identical in both runs, so patching there is a no-op."""
    differ = ((task.clean_tokens != task.corrupt_tokens) & task.attention_mask.bool()).cpu()
    s = differ.shape[1]
    idx = torch.where(differ, torch.arange(s)[None], torch.full_like(differ, s, dtype=torch.long))
    return torch.minimum(idx.min(1).values, task.lengths.cpu())


@dataclass(frozen=True)
class Window:
    """Per example, the positions a patch can change: [starts[b], starts[b] + w) ⊇ [.., END]."""

    starts: Int[Tensor, " b"]
    w: int
    patch: Bool[Tensor, "b w"]  # where the patch applies, in window coordinates
    end_index: Int[Tensor, " b"]  # END in window coordinates


def window_for(
    mask: Bool[Tensor, "b s"], fd: Tensor, end: Tensor, only_end: bool = False
) -> Window:
    """The smallest window per example that holds every effective patch cell and END."""
    s = mask.shape[1]
    ar = torch.arange(s)[None]
    eff = mask & (ar >= fd[:, None]) & (ar <= end[:, None])
    if only_end:
        starts = end.clone()
    else:
        first = torch.where(eff, ar, torch.full_like(eff, s, dtype=torch.long)).min(1).values
        starts = torch.minimum(first, end)
    w = int((end - starts).max()) + 1
    pos = (starts[:, None] + torch.arange(w)[None]).clamp(max=s - 1)
    inside = (starts[:, None] + torch.arange(w)[None]) < s
    patch = torch.gather(eff, 1, pos) & inside
    return Window(starts, w, patch, end - starts)


def split_window(win: Window, max_groups: int = 3) -> list[tuple[Tensor | None, Window]]:
    """Examples grouped by window length, each group with its own (shorter) window, so that
    short examples are not padded to the longest one. [(example indices or None, window)]."""
    need = win.end_index + 1  # positions each example really needs
    n = len(need)
    order = torch.argsort(need, descending=True, stable=True)
    lens = need[order].tolist()
    # best cut of the sorted lengths into <= max_groups runs: minimise sum(size x longest)
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(0, 0): (0, [])}
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            options = [
                (best[(i, k - 1)][0] + (j - i) * lens[i], [*best[(i, k - 1)][1], i])
                for i in range(j)
                if (i, k - 1) in best
            ]
            if options:
                best[(j, k)] = min(options)
    cost, cuts = min(best[(n, k)] for k in range(1, max_groups + 1) if (n, k) in best)
    if len(cuts) == 1 or cost > 0.9 * n * lens[0]:  # under 10% saved: one pass is cheaper
        return [(None, win)]
    out: list[tuple[Tensor | None, Window]] = []
    for a, b in zip(cuts, [*cuts[1:], n]):
        idx = order[a:b].sort().values
        w = lens[a]
        out.append((idx, Window(win.starts[idx], w, win.patch[idx, :w], win.end_index[idx])))
    return out


# ---------------------------------------------------------------------- metric reading


class MetricReader:
    """task.metric on [batch, vocab] logits; for metrics that read only the answer columns
    (logit_diff, candidate_accuracy) the unembedding is computed on those columns alone."""

    def __init__(self, task: Task, device: torch.device | str) -> None:
        self.task = task
        self.cols = None
        if task.metric_name in ("logit_diff", "candidate_accuracy"):
            ids = torch.cat([task.answers.reshape(-1), task.wrong_answers.reshape(-1)])
            cols = torch.unique(ids)
            remap = lambda t: torch.searchsorted(cols, t.contiguous())
            self.task = replace(
                task, answers=remap(task.answers), wrong_answers=remap(task.wrong_answers)
            )
            self.cols = cols.to(device)
        self._subsets: dict = {}

    def _subset(self, examples: slice | Tensor) -> Any:
        if isinstance(examples, slice):
            key = (examples.start, examples.stop)
        else:
            key = tuple(examples.tolist())
        if key not in self._subsets:
            self._subsets[key] = self.task.subset(examples)
        return self._subsets[key]

    def __call__(self, final_logits: Tensor, examples: slice | Tensor | None = None) -> Tensor:
        """Metric per row of [b, vocab] (or [V, b, vocab] -> [V, b]) final logits."""
        task = self.task if examples is None else self._subset(examples)
        if final_logits.dim() == 3:
            return torch.stack([task.metric(f) for f in final_logits])
        return task.metric(final_logits)


# ---------------------------------------------------------------------- chunking and grid


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def variants_per_pass(batch_size: int | None, n_examples: int, w: int) -> int:
    """Patched copies of the batch per pass: batch_size rows if given, else a row budget."""
    rows = batch_size if batch_size is not None else max(DEFAULT_ROW_BUDGET // max(w, 1), 1)
    return max(rows // max(n_examples, 1), 1)


def build_grid(
    per_example: Tensor,
    done: Tensor,
    metric_clean: Tensor,
    metric_corrupt: Tensor,
    *,
    shape: ModelShape,
    component: Component,
    direction: DirectionName,
    kind: GridKind,
    metric_name: str,
    positions: list[str] | None,
    position: str | None,
    complete: bool,
    receivers: str | None = None,
    notes: list[str] | None = None,
) -> HeadGrid:
    per_example = per_example.float()
    per_example = torch.where(done[None], per_example, torch.full_like(per_example, math.nan))
    values = per_example.mean(0)
    gap = float((metric_corrupt.float() - metric_clean.float()).mean())
    normalized = values / gap if gap != 0 else torch.full_like(values, math.nan)
    notes = list(notes or [])
    kvg = None
    if component.per_kv_head:
        kvg = hooks.kv_groups(shape)
        if shape.group_size > 1:
            notes.append(
                f"{component.value} lives on {shape.n_kv_heads} key/value heads shared by "
                f"{shape.group_size} query heads each: a column's patch affects its whole group "
                f"(kv_groups)."
            )
    if gap == 0:
        notes.append("metric corrupt - metric clean averages 0: normalized is undefined (NaN)")
    return HeadGrid(
        values=values,
        normalized=normalized,
        per_example=per_example,
        metric_clean=metric_clean,
        metric_corrupt=metric_corrupt,
        done=done,
        complete=complete,
        layers=list(range(shape.n_layers)),
        heads=hooks.column_labels(component, shape),
        positions=positions,
        component=component.value,
        direction=direction,
        kind=kind,
        metric_name=metric_name,
        receivers=receivers,
        kv_groups=kvg,
        position=position,
        notes=notes,
    )


# ---------------------------------------------------------------------- memory budget


DEFAULT_CPU_CAP = 1 << 30  # past ~1 GB of cached runs a larger chunk buys no speed on CPU
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BINARY = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(max_memory: Any) -> int | None:
    """Bytes from an int/float or a size string ('2GB', '512 MiB', '1.5g'); None stays None."""
    if max_memory is None:
        return None
    if isinstance(max_memory, (int, float)) and not isinstance(max_memory, bool):
        if max_memory > 0 and math.isfinite(max_memory):
            return int(max_memory)
    elif isinstance(max_memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", max_memory.lower())
        if m and float(m.group(1)) > 0 and not (m.group(3) and not m.group(2)):
            unit = m.group(2).upper()
            scale = _BINARY[unit] if m.group(3) else _UNITS[unit]
            return int(float(m.group(1)) * scale)
    raise ValueError(
        f"max_memory must be a positive number of bytes or a size such as '2GB' or '512MiB' "
        f"(or None for a budget from free memory), got {max_memory!r}"
    )


def free_memory(device: Any = "cpu") -> int:
    """Bytes free on ``device``: torch.cuda.mem_get_info on a GPU, MemAvailable on Linux."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # no /proc/meminfo (macOS, Windows): assume a laptop's share


def memory_budget(max_memory: Any, device: Any = "cpu") -> int:
    """The sweep's budget in bytes: ``max_memory``, else half the free GPU memory, or a quarter
    of the free RAM capped at 1 GB on CPU."""
    given = parse_memory(max_memory)
    if given is not None:
        return given
    free = free_memory(device)
    if torch.device(device).type == "cuda":
        return free // 2
    return int(min(free // 4, DEFAULT_CPU_CAP))


def trace_bytes_per_token(model: ModelLike, hooked: bool = False) -> int:
    """Bytes one cached run keeps per token: the fast engine's Trace, or the bridge caches the
    generic path keeps (q and the attention pattern on top; the pattern is per key)."""
    cfg = model.cfg
    L, d, H = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads)
    dh = int(cfg.d_head)
    K = int(getattr(cfg, "n_key_value_heads", None) or H)
    per_layer = 4 * d + H * dh + 2 * K * dh
    if hooked:
        per_layer += H * dh
    item = torch.tensor([], dtype=getattr(cfg, "dtype", torch.float32)).element_size()
    return (L * per_layer + d) * item


def example_chunks(
    model: ModelLike,
    task: Task,
    max_memory: Any,
    *,
    runs: int = 2,
    hooked: bool = False,
    batch_size: int | None = None,
) -> list[slice]:
    """Contiguous example ranges whose ``runs`` cached runs fit the memory budget."""
    n, s = len(task), int(task.clean_tokens.shape[1])
    device = getattr(model.cfg, "device", None) or "cpu"
    per_token = trace_bytes_per_token(model, hooked)
    per_example = runs * s * per_token
    if hooked:
        per_example += runs * int(model.cfg.n_layers) * int(model.cfg.n_heads) * s * s * 4
    size = max(1, memory_budget(max_memory, device) // max(per_example, 1))
    if batch_size is not None:
        size = min(size, batch_size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


# ---------------------------------------------------------------------- the job loop


@dataclass
class Chunk:
    """One range of examples; ``whole``: the only chunk, so cached whole-task runs serve it."""

    rows: slice
    task: Task
    whole: bool
    memo: dict = field(default_factory=dict)

    def get(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed once per chunk (its runs), dropped with the chunk."""
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]


@dataclass
class ChunkWork:
    """A chunk's jobs: (grid index before the columns, columns); run(key, cols) -> [V, b]
    values per column and example; metrics() -> the chunk's two reference metrics [b]. A key
    of index lists (one entry per column) lets one job hold cells of several layers.
    ``prepaid``: leading jobs whose values metrics() already computed (the same request), so
    no stop is checked before them: stopping there would save nothing. ``setup``: steps of
    metrics()'s own (a request that is no job), counted in progress once metrics() returns."""

    jobs: list[tuple[tuple, list[int]]]
    run: Callable[[tuple, list[int]], Tensor]
    metrics: Callable[[], tuple[Tensor, Tensor]]
    prepaid: int = 0
    setup: int = 0


Metrics = tuple[Tensor, Tensor]


def prepaid_work(
    jobs: list[tuple[tuple, list[int]]],
    first: Callable[[], tuple[Metrics, Any]],
    later: Callable[[int, Metrics], Tensor] | None = None,
    setup: int = 0,
) -> ChunkWork:
    """A chunk whose first run (one request or forward) gives both its metrics and job 0's
    values: metrics() makes it once, job 0 reads it (prepaid), job i > 0 runs
    ``later(i, metrics)``. Jobs run in order, as run_sweep runs them."""
    state: dict[str, Any] = {"next": 0}

    def metrics() -> Metrics:
        if "metrics" not in state:
            state["metrics"], state["first"] = first()
        return state["metrics"]

    def run(key: tuple, cols: list[int]) -> Tensor:
        i = state["next"]
        state["next"] += 1
        m = metrics()
        if i == 0:
            return state.pop("first")
        assert later is not None, "a chunk of several jobs needs later()"
        return later(i, m)

    return ChunkWork(jobs, run, metrics, prepaid=1 if jobs else 0, setup=setup)


@dataclass
class SweepOut:
    per_example: Tensor
    done: Tensor
    metric_a: Tensor
    metric_b: Tensor
    complete: bool
    n_chunks: int


def run_sweep(
    task: Task,
    chunk_rows: list[slice],
    prepare: Callable[[Chunk], ChunkWork],
    grid_shape: tuple[int, ...],
    on_progress: Progress,
    should_stop: Stop,
    on_partial: Callable[[SweepOut], None] | None = None,
    on_error: Callable[[SweepOut, Exception], Any] | None = None,
) -> SweepOut:
    """The skeleton every per-cell sweep shares: plan each chunk's jobs, run them chunk by
    chunk (only one chunk's runs alive at a time), fill the per-example grid, report progress,
    stop between jobs and before a later chunk's metrics(). A cell is done once chunk 0 has it
    (every chunk runs every cell). On a stop the finished chunks' examples are kept (chunk 0's
    if none finished). A job or metrics() that raises an error with a ``partial`` attribute (a
    failed nnsight request's RemoteError) leaves with ``partial = on_error(what finished, the
    error)``."""
    n = len(task)
    whole = len(chunk_rows) == 1
    chunks_ = [
        Chunk(sl, task if whole else task.subset(torch.arange(n)[sl]), whole) for sl in chunk_rows
    ]
    works: list[ChunkWork | None] = [prepare(c) for c in chunks_]
    total = sum(len(w.jobs) + w.setup for w in works if w is not None)
    per_example = torch.full((n, *grid_shape), math.nan)
    done = torch.zeros(grid_shape, dtype=torch.bool)
    m_a, m_b = torch.full((n,), math.nan), torch.full((n,), math.nan)
    step, finished, complete = 0, 0, True

    def failed(exc: Exception) -> None:
        if on_error is not None and hasattr(exc, "partial"):
            kept = _kept(per_example, done, m_a, m_b, chunk_rows, finished, False)
            exc.partial = on_error(kept, exc)

    for ci, sl in enumerate(chunk_rows):
        work = works[ci]
        works[ci] = None
        assert work is not None
        # a later chunk's metrics() is its base runs: stopping first saves them
        if ci > 0 and should_stop is not None and should_stop():
            complete = False
            break
        try:
            with torch.no_grad():
                a, b = work.metrics()
        except Exception as exc:
            failed(exc)
            raise
        m_a[sl], m_b[sl] = a.float().cpu(), b.float().cpu()
        if work.setup:
            step += work.setup
            if on_progress is not None:
                on_progress(step, total)
        for j, (key, cols) in enumerate(work.jobs):
            if j >= work.prepaid and should_stop is not None and should_stop():
                complete = False
                break
            try:
                with torch.no_grad():
                    vals = work.run(key, cols)  # [V, b]
            except Exception as exc:
                failed(exc)
                raise
            cells = (*key, cols)
            at = (sl, *cells)  # built apart: mypy reads x[(a, *b)] as the 3.11-only x[a, *b]
            per_example[at] = vals.T.float().cpu()
            if ci == 0:
                done[cells] = True
            step += 1
            if on_progress is not None:
                on_progress(step, total)
            if on_partial is not None and ci == 0:
                on_partial(_kept(per_example, done, m_a, m_b, chunk_rows, 0, False))
        chunks_[ci].memo.clear()  # this chunk's runs go before the next chunk's are made
        del work
        if not complete:
            break
        finished += 1
        if on_partial is not None and finished < len(chunk_rows):
            on_partial(_kept(per_example, done, m_a, m_b, chunk_rows, finished, False))
    return _kept(per_example, done, m_a, m_b, chunk_rows, finished, complete)


def _kept(per_example, done, m_a, m_b, chunk_rows, finished: int, complete: bool) -> SweepOut:
    if complete:
        rows = slice(0, len(m_a))
    else:
        rows = slice(0, chunk_rows[max(finished, 1) - 1].stop)
    if not complete:  # a partial result outlives the loop that keeps filling these tensors
        per_example, done, m_a, m_b = (t.clone() for t in (per_example, done, m_a, m_b))
    return SweepOut(per_example[rows], done, m_a[rows], m_b[rows], complete, len(chunk_rows))


def chunk_notes(out: SweepOut, rows: list[slice]) -> list[str]:
    """What a result should say about the chunks it ran in."""
    if out.n_chunks == 1:
        return []
    size = rows[0].stop - rows[0].start
    notes = [
        f"ran in {out.n_chunks} chunks of at most {size} examples (max_memory); "
        + "values are the same as in one pass"
    ]
    if not out.complete:
        notes.append(stopped_note(out, rows[-1].stop))
    return notes


def stopped_note(out: SweepOut, n: int) -> str:
    """How many of ``n`` examples a stopped sweep kept: those that ran (a failed first chunk
    leaves its rows, unfilled)."""
    return f"stopped: {int((~out.metric_a.isnan()).sum())} of {n} examples kept"
