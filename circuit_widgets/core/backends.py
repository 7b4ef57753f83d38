"""What runs a sweep's cells: one ``Backend`` per way of running the model.

Every sweep is the same job loop, ``common.run_sweep``: it asks the backend for a chunk's jobs,
runs them, fills the grid, reports progress and stops between jobs. Activation and path
patching ask for cells; attribution for gradient steps (one job per batch of examples, every
cell at once); cross-model patching as below. The backend decides how a job runs:

- ``FastBackend``: the exact fast engine (``fast_model``), resuming patched runs from cached
  clean/corrupt Traces; many cells per pass. The default where ``cache.engine_for`` gives one.
- ``HookBackend``: TransformerLens bridge hooks, one bridge forward per cell (the reference
  semantics); any architecture, and every run under ``cache.force_hooked``.
- ``NNsightBackend``: an nnsight-served model, where a job is one request holding many cells
  as extra batch rows (progress per request, Cancel between requests); attribution takes
  its gradient inside each request.

Cross-model patching runs on the base model's backend, with the fine-tuned model's backend
of the same kind (``pair_backends``) as the source: ``cmap_work`` for a grid (``cmap_grid``),
``cmap_groups_work`` for a circuit's groups (``cmap``), a job per batch of examples. DCM keeps
its own loop (a training loop, not cells).

``backend_for(model)`` picks one. Experiment code never branches on the engine itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from circuit_widgets.core import cache, nnsight_backend
from circuit_widgets.core.common import (
    DEFAULT_ROW_BUDGET,
    Chunk,
    ChunkWork,
    MetricReader,
    Metrics,
    Slot,
    chunks,
    example_chunks,
    first_diff,
    prepaid_work,
    split_window,
    variants_per_pass,
    window_for,
)
from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import trace_forward
from circuit_widgets.models import model_shape
from circuit_widgets.types import Component, Head, ModelLike, ModelShape, Receiver

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

# The engines' cell functions live with their experiments (patching.fast_cells, ...), which
# import this module: the backends import them inside their methods.


# ---------------------------------------------------------------------- what a sweep asks for


@dataclass(frozen=True)
class ActivationSpec:
    """Activation patching's cells: ``wanted[layer, slot, column]``, patched from the source
    run (corrupt for noise, clean for denoise) into the base run at each slot's mask."""

    comp: Component
    slots: list[Slot]
    wanted: Tensor
    noise: bool
    batch_size: int | None


@dataclass(frozen=True)
class PathSpec:
    """Path patching's senders (layer -> heads), their patch mask and the receivers."""

    shape: ModelShape
    mask: Tensor
    by_layer: dict[int, list[int]]
    recv: list[Receiver]
    to_logits: bool
    freeze_mlps: bool
    batch_size: int | None


@dataclass(frozen=True)
class AttributionSpec:
    """Attribution patching: ``comp`` at every layer; ``frozen``: path patching's paths only."""

    comp: Component
    noise: bool
    n_layers: int
    frozen: bool
    freeze_mlps: bool


@dataclass(frozen=True)
class CMAPSpec:
    """Cross-model patching's cells: every (layer, column) of ``comp``, the source (fine-tuned)
    model's activation written into the base run at ``posmask`` [n, s] (the task's rows)."""

    comp: Component
    n_layers: int
    n_cols: int
    posmask: Tensor
    position: str | None  # the position's name (None: every position)
    batch_size: int | None


@dataclass(frozen=True)
class CMAPGroupsSpec:
    """Cross-model patching of a circuit's groups (``cross_model._Patch``es: columns per
    (layer, site) at a position): each group alone, then, with ``union``, all at once. A job
    runs the unpatched base, the fine-tuned model and every variant on a batch of examples;
    ``cross_model.group_values`` says how its values are laid out."""

    patches: list
    union: bool
    shape: ModelShape

    @property
    def blocks(self) -> int:
        """Row blocks of a batch's base forward: the unpatched base, then every variant."""
        return 1 + len(self.patches) + int(self.union)

    @property
    def sites(self) -> list[tuple[int, str]]:
        """(layer, site) pairs some group patches: what the fine-tuned run must capture."""
        return sorted({k for p in self.patches for k in p.columns})


@dataclass
class AttributionWork:
    """step(examples) -> per-position first-order effects [b, L, s, cols]; each step fills
    ``m_base`` / ``m_src`` (the metric of the run differentiated / patched from) for its
    examples; finish(complete) runs once the loop ends."""

    step: Callable[[slice], Tensor]
    m_base: Tensor
    m_src: Tensor
    finish: Callable[[bool], None] = field(default=lambda complete: None)


@runtime_checkable
class Backend(Protocol):
    """What a sweep needs from whatever runs the model: how to split the examples, a chunk's
    jobs for each per-cell sweep (ChunkWork for ``common.run_sweep``) and, where supported,
    gradient steps for attribution."""

    name: str  # "fast" | "hooks" | "nnsight"

    def note(self, experiment: str) -> str | None:
        """What a result should say about how ``experiment`` ran here (None: nothing)."""
        ...

    def chunk_rows(
        self, task: Task, max_memory: Any, *, runs: int = 2, batch_size: int | None = None
    ) -> list[slice]:
        """Example ranges whose ``runs`` cached runs fit ``max_memory`` (one per chunk)."""
        ...

    def activation_work(self, spec: ActivationSpec, chunk: Chunk) -> ChunkWork:
        """Jobs (layer, slot) x columns (or per-cell layer and slot lists: one request of many
        layers); run() gives metric patched - clean [V, b]."""
        ...

    def path_work(self, spec: PathSpec, chunk: Chunk) -> ChunkWork:
        """Jobs (sender layer,) x heads (or a per-sender layer list); run() gives metric
        patched - clean [V, b]."""
        ...

    def attribution_work(self, spec: AttributionSpec, task: Task, whole: bool) -> AttributionWork:
        """Gradient steps over ``task``; ``whole``: the task's runs fit and are cached."""
        ...

    def cmap_work(self, spec: CMAPSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        """Cross-model jobs (layer,) x columns (or per-cell layer lists) on this, the base
        model, with ``source`` (the fine-tuned model, same kind of backend) giving the patched
        activations; run() gives metric patched - base [V, b], metrics() (base, fine-tuned)."""
        ...

    def row_budget(self, task: Task) -> int:
        """Batch rows (examples x variants) one forward or request should hold."""
        ...

    def cmap_groups_work(self, spec: CMAPGroupsSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        """One prepaid job for the chunk (a batch of examples): ``cross_model.group_values``
        of the unpatched base, the fine-tuned ``source`` and every variant of ``spec``;
        metrics() (base, fine-tuned)."""
        ...


def backend_for(model: Any) -> Backend:
    """nnsight for an nnsight-served model, the fast engine where it reproduces the bridge
    (not under ``cache.force_hooked``, nor with hooks left on the model), else bridge hooks."""
    if nnsight_backend.is_nnsight(model):
        return NNsightBackend(model)
    eng = cache.engine_for(model)
    if eng is not None:
        return FastBackend(model, eng)
    return HookBackend(model)


def pair_backends(base: Any, finetuned: Any) -> tuple[Backend, Backend]:
    """Backends of one kind for a model pair (cross-model patching): the fast engine only
    where both models run on it, else bridge hooks for both (the reason names the model)."""
    b, f = backend_for(base), backend_for(finetuned)
    if isinstance(b, FastBackend) and isinstance(f, FastBackend):
        return b, f
    if isinstance(b, NNsightBackend) or isinstance(f, NNsightBackend):
        return b, f
    hb, hf = HookBackend(base), HookBackend(finetuned)
    for label, m in (("base", base), ("fine-tuned", finetuned)):
        if cache.engine_for(m) is None:
            hb.reason = hf.reason = f"{label} model: {cache.generic_reason(m)}"
            break
    return hb, hf


def _base_gap(metrics: tuple[Tensor, Tensor], noise: bool) -> Tensor:
    """Per example, (unpatched base - clean): a job measured against the base run reads
    patched - clean once this is added."""
    m_clean, m_corrupt = metrics
    return (m_clean if noise else m_corrupt).float().cpu() - m_clean.float().cpu()


def _local_groups_work(
    base: ModelLike, finetuned: ModelLike, spec: CMAPGroupsSpec, chunk: Chunk
) -> ChunkWork:
    """cmap_groups_work for in-process models: one fine-tuned forward capturing the patched
    sites, one base forward holding the unpatched base as row block 0 and a block per variant
    (same forward shape: a patch writing identical values gives bit-identical logits)."""
    from circuit_widgets.core.cross_model import _edits_from, group_job, group_values, variant_masks
    from circuit_widgets.core.edits import run_with_edits

    sub, n_var = chunk.task, spec.blocks
    tokens, end = sub.clean_tokens, sub.positions["END"]
    b = tokens.shape[0]

    def values() -> Tensor:  # masks made here: only the running batch's are alive
        masks = variant_masks(spec, sub)
        ft = run_with_edits(finetuned, tokens, capture=spec.sites, at=end)
        logits = run_with_edits(
            base, tokens.repeat(n_var, 1), _edits_from(ft.captured, masks, n_var),
            at=end.repeat(n_var),
        ).logits.view(n_var, b, -1)  # fmt: skip
        m = torch.stack([sub.metric(x).float().cpu() for x in logits])
        a = torch.stack([sub.accuracy(x).float().cpu() for x in logits])
        return group_values(m, a, sub.metric(ft.logits), sub.accuracy(ft.logits))

    return group_job(values, n_var)


# ---------------------------------------------------------------------- the fast engine


class FastBackend:
    """The exact fast engine: patched runs resume from cached Traces, many cells per pass."""

    name = "fast"

    def __init__(self, model: ModelLike, eng: FastModel) -> None:
        self.model, self.eng = model, eng

    def note(self, experiment: str) -> str | None:
        return None

    def chunk_rows(
        self, task: Task, max_memory: Any, *, runs: int = 2, batch_size: int | None = None
    ) -> list[slice]:
        return example_chunks(self.model, task, max_memory, runs=runs, batch_size=batch_size)

    def _metrics(self, chunk: Chunk, reader: MetricReader) -> Callable[[], tuple[Tensor, Tensor]]:
        model, eng = self.model, self.eng
        return lambda: (
            cache.chunk_metric(model, chunk, eng, reader, "clean"),
            cache.chunk_metric(model, chunk, eng, reader, "corrupt"),
        )

    def activation_work(self, spec: ActivationSpec, chunk: Chunk) -> ChunkWork:
        from circuit_widgets.core.patching import fast_cells, grouped_cells

        model, eng, comp, noise = self.model, self.eng, spec.comp, spec.noise
        L, P = spec.wanted.shape[:2]
        sub, B = chunk.task, len(chunk.task)
        reader = MetricReader(sub, eng.device)
        fd, end = first_diff(sub), sub.positions["END"].cpu()
        s = sub.clean_tokens.shape[1]
        windows = [window_for(slot.mask[chunk.rows, :s], fd, end) for slot in spec.slots]
        jobs = []
        for layer in range(L):
            for p in range(P):
                cols = spec.wanted[layer, p].nonzero().flatten().tolist()
                per_pass = variants_per_pass(spec.batch_size, B, windows[p].w)
                jobs += [((layer, p), c) for c in chunks(cols, per_pass) if c]
        groups = [split_window(win) for win in windows]
        metrics = self._metrics(chunk, reader)

        def run(key: tuple, cols: list[int]) -> Tensor:
            layer, p = key
            clean = cache.chunk_run(model, chunk, eng, "clean")
            corrupt = cache.chunk_run(model, chunk, eng, "corrupt")
            base, src = (clean, corrupt) if noise else (corrupt, clean)
            metric = grouped_cells(
                groups[p],
                len(cols),
                B,
                lambda ex, win: fast_cells(eng, comp, base, src, layer, cols, win, reader, ex),
            )  # [V, B]: patched - unpatched base
            return metric.float().cpu() + _base_gap(metrics(), noise)[None]

        return ChunkWork(jobs, run, metrics)

    def path_work(self, spec: PathSpec, chunk: Chunk) -> ChunkWork:
        from circuit_widgets.core.path_patching import fast_senders

        model, eng = self.model, self.eng
        sub, B = chunk.task, len(chunk.task)
        reader = MetricReader(sub, eng.device)
        s = sub.clean_tokens.shape[1]
        win = window_for(
            spec.mask[chunk.rows, :s],
            first_diff(sub),
            sub.positions["END"].cpu(),
            only_end=spec.to_logits,
        )
        per_pass = variants_per_pass(spec.batch_size, B, win.w)
        jobs = [
            ((layer,), c)
            for layer, cols in sorted(spec.by_layer.items())
            for c in chunks(cols, per_pass)
        ]

        def run(key: tuple, cols: list[int]) -> Tensor:
            clean = cache.chunk_run(model, chunk, eng, "clean")
            corrupt = cache.chunk_run(model, chunk, eng, "corrupt")
            return fast_senders(
                eng, clean, corrupt, key[0], cols, win, spec.recv, spec.freeze_mlps, reader
            ).float()  # already patched - clean

        return ChunkWork(jobs, run, self._metrics(chunk, reader))

    def attribution_work(self, spec: AttributionSpec, task: Task, whole: bool) -> AttributionWork:
        from circuit_widgets.core.attribution import fast_contrib

        model, eng, noise = self.model, self.eng, spec.noise
        B = len(task)
        src_name, base_name = ("corrupt", "clean") if noise else ("clean", "corrupt")
        m_src, m_base = torch.full((B,), float("nan")), torch.full((B,), float("nan"))
        reader = MetricReader(task, eng.device)
        # only the source run is cached; the base run is the forward we differentiate
        src_tokens = task.clean_tokens if not noise else task.corrupt_tokens
        base_tokens = task.clean_tokens if noise else task.corrupt_tokens
        if whole:
            src = cache.fast_run(model, task, eng, src_name)
            m_src = cache.fast_metric(model, task, eng, reader, src_name).float()

        def step(sl: slice) -> Tensor:
            if whole:
                src_sl = src.subset(sl)
            else:  # this chunk's source run only, full width like the base tokens
                with torch.no_grad():
                    src_sl = trace_forward(eng, src_tokens[sl])
                    end = task.positions["END"][sl].to(eng.device)
                    ar = torch.arange(len(end), device=eng.device)
                    final = src_sl.resid_pre[-1][ar, end]
                    m_src[sl] = reader(eng.logits(final, reader.cols), sl).float().cpu()
            contrib, metric = fast_contrib(
                eng,
                spec.comp,
                base_tokens[sl],
                src_sl,
                task.positions["END"][sl],
                reader,
                sl,
                spec.frozen,
                spec.freeze_mlps,
            )
            m_base[sl] = metric.float().cpu()
            return contrib

        def finish(complete: bool) -> None:
            if complete and whole:  # the differentiated forward's metric, for later sweeps
                cache.set_metric(model, task, base_name, m_base)

        return AttributionWork(step, m_base, m_src, finish)

    def cmap_work(self, spec: CMAPSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        from circuit_widgets.core.patching import fast_cells, grouped_cells

        assert isinstance(source, FastBackend), "cmap_work pairs backends of one kind"
        base, eng_b, finetuned, eng_f = self.model, self.eng, source.model, source.eng
        comp = spec.comp
        sub, B = chunk.task, len(chunk.task)
        reader = MetricReader(sub, eng_b.device)
        s = sub.clean_tokens.shape[1]
        # the models differ from the first token on: a patch at p changes positions p.. END
        win = window_for(
            spec.posmask[chunk.rows, :s],
            torch.zeros(B, dtype=torch.long),
            sub.positions["END"].cpu(),
        )
        per_pass = variants_per_pass(spec.batch_size, B, win.w)
        jobs = [
            ((layer,), c)
            for layer in range(spec.n_layers)
            for c in chunks(list(range(spec.n_cols)), per_pass)
        ]
        groups = split_window(win)
        metrics = lambda: (
            cache.chunk_metric(base, chunk, eng_b, reader, "clean"),
            cache.chunk_metric(finetuned, chunk, eng_f, reader, "clean"),
        )

        def run(key: tuple, cols: list[int]) -> Tensor:
            (layer,) = key
            b_run = cache.chunk_run(base, chunk, eng_b, "clean")
            f_run = cache.chunk_run(finetuned, chunk, eng_f, "clean")
            return grouped_cells(
                groups,
                len(cols),
                B,
                lambda ex, w: fast_cells(
                    eng_b, comp, b_run, f_run, layer, cols, w, reader, ex, src_eng=eng_f
                ),
            ).float()

        return ChunkWork(jobs, run, metrics)

    def row_budget(self, task: Task) -> int:
        return DEFAULT_ROW_BUDGET // max(task.seq_len, 1)

    def cmap_groups_work(self, spec: CMAPGroupsSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        # bridge forwards with edits (run_with_edits), as on hooks: a handful of variants
        return _local_groups_work(self.model, _local(source), spec, chunk)


def _local(source: Backend) -> ModelLike:
    assert isinstance(source, (FastBackend, HookBackend)), "cmap pairs backends of one kind"
    return source.model


# ---------------------------------------------------------------------- bridge hooks


_HOOK_NOTES = {
    "activation_patch": "generic path, one bridge forward per cell",
    "path_patch": "generic path, two bridge forwards per sender",
    "attribution": "generic path, gradients through bridge hooks",
}


class HookBackend:
    """TransformerLens bridge hooks: one bridge forward per cell, any architecture."""

    name = "hooks"

    def __init__(self, model: ModelLike) -> None:
        self.model = model
        self.reason = cache.generic_reason(model)  # why not the fast engine, when picked

    def note(self, experiment: str) -> str | None:
        if experiment == "cmap":  # bridge forwards whatever the engine, as on the fast one
            return None
        if experiment == "cmap_grid":
            return f"generic path: full forwards per batch of heads ({self.reason})"
        return f"{_HOOK_NOTES[experiment]}: {self.reason}"

    def chunk_rows(
        self, task: Task, max_memory: Any, *, runs: int = 2, batch_size: int | None = None
    ) -> list[slice]:
        # bridge caches keep q and every attention pattern too
        return example_chunks(
            self.model, task, max_memory, runs=runs, hooked=True, batch_size=batch_size
        )

    def activation_work(self, spec: ActivationSpec, chunk: Chunk) -> ChunkWork:
        from circuit_widgets.core.patching import hooked_cell

        model, noise = self.model, spec.noise
        L, P = spec.wanted.shape[:2]
        sub = chunk.task
        s = sub.clean_tokens.shape[1]
        masks = [slot.mask[chunk.rows, :s] for slot in spec.slots]
        jobs = [
            ((layer, p), [c])
            for layer in range(L)
            for p in range(P)
            for c in spec.wanted[layer, p].nonzero().flatten().tolist()
        ]
        metrics = lambda: cache.chunk_hooked_runs(model, chunk)[2:]

        def run(key: tuple, cols: list[int]) -> Tensor:
            layer, p = key
            c_cache, x_cache, m_clean, m_corrupt = cache.chunk_hooked_runs(model, chunk)
            base_tokens = sub.clean_tokens if noise else sub.corrupt_tokens
            src_cache = x_cache if noise else c_cache
            m_base = (m_clean if noise else m_corrupt).to(model.cfg.device)
            cell = hooked_cell(
                model, sub, spec.comp, base_tokens, src_cache, layer, cols[0], masks[p]
            )
            metric = (cell - m_base)[None]
            return metric.float().cpu() + _base_gap((m_clean, m_corrupt), noise)[None]

        return ChunkWork(jobs, run, metrics)

    def path_work(self, spec: PathSpec, chunk: Chunk) -> ChunkWork:
        from circuit_widgets.core.path_patching import hooked_sender

        model = self.model
        sub = chunk.task
        sub_mask = spec.mask[chunk.rows, : sub.clean_tokens.shape[1]]
        jobs = [((layer,), [c]) for layer, cols in sorted(spec.by_layer.items()) for c in cols]
        metrics = lambda: cache.chunk_hooked_runs(model, chunk)[2:]

        def run(key: tuple, cols: list[int]) -> Tensor:
            c_cache, x_cache, m_clean, _ = cache.chunk_hooked_runs(model, chunk)
            metric = hooked_sender(
                model,
                sub,
                spec.shape,
                c_cache,
                x_cache,
                key[0],
                cols[0],
                sub_mask,
                spec.recv,
                spec.freeze_mlps,
            )
            return (metric - m_clean.to(metric.device))[None].float()

        return ChunkWork(jobs, run, metrics)

    def attribution_work(self, spec: AttributionSpec, task: Task, whole: bool) -> AttributionWork:
        from circuit_widgets.core.attribution import hooked_contrib

        model, noise, L = self.model, spec.noise, spec.n_layers
        B = len(task)
        work = AttributionWork(
            lambda sl: torch.empty(0),
            torch.full((B,), float("nan")),
            torch.full((B,), float("nan")),
        )
        if whole:
            c_cache, x_cache, m_clean, m_corrupt = cache.hooked_runs(model, task)
            work.m_base, work.m_src = (m_clean, m_corrupt) if noise else (m_corrupt, m_clean)

        def step(sl: slice) -> Tensor:
            if whole:
                src_cache = x_cache if noise else c_cache
                base_tokens = task.clean_tokens if noise else task.corrupt_tokens
                return hooked_contrib(
                    model,
                    task,
                    spec.comp,
                    base_tokens,
                    src_cache,
                    sl,
                    L,
                    spec.frozen,
                    spec.freeze_mlps,
                )
            sub = task.subset(torch.arange(B)[sl])
            c_sub, x_sub, mc, mx = cache.hooked_compute(model, sub)
            work.m_base[sl], work.m_src[sl] = (mc, mx) if noise else (mx, mc)
            return hooked_contrib(
                model,
                sub,
                spec.comp,
                sub.clean_tokens if noise else sub.corrupt_tokens,
                x_sub if noise else c_sub,
                slice(None),
                L,
                spec.frozen,
                spec.freeze_mlps,
            )

        work.step = step
        return work

    def cmap_work(self, spec: CMAPSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        """Batches of the chunk's examples (a row budget per forward); a job is a run of cells
        in layer-major order, each forward holding the unpatched base as row block 0 and one
        block per cell, its cells measured against that block. The first job is run for
        metrics() (its block 0 is the base metric), so it is prepaid."""
        from circuit_widgets.core.cross_model import ROW_BUDGET, _edits_from
        from circuit_widgets.core.edits import run_with_edits

        assert isinstance(source, HookBackend), "cmap_work pairs backends of one kind"
        base, finetuned = self.model, source.model
        sub, B = chunk.task, len(chunk.task)
        n_cols, site = spec.n_cols, spec.comp.value
        cells = [(layer, c) for layer in range(spec.n_layers) for c in range(n_cols)]
        s = sub.clean_tokens.shape[1]
        rows = spec.batch_size or max(1, ROW_BUDGET // max(s, 1))
        ex_per = max(1, min(B, rows // 2))
        var_per = max(1, rows // ex_per - 1)
        batches = [slice(i, min(i + ex_per, B)) for i in range(0, B, ex_per)]
        groups = [cells[i : i + var_per] for i in range(0, len(cells), var_per)]
        jobs = [(([c[0] for c in g],), [c[1] for c in g]) for g in groups]
        end = sub.positions["END"]
        keys = [(layer, site) for layer in range(spec.n_layers)]
        posmask = spec.posmask[chunk.rows, :s]

        def part(i: int) -> Task:
            return sub.subset(torch.arange(B)[batches[i]]) if B > 1 else sub

        def captured() -> list:  # the fine-tuned run of each batch: logits and activations
            return chunk.get(
                f"cmap_ft_{id(finetuned)}",
                lambda: [
                    run_with_edits(finetuned, sub.clean_tokens[sl], capture=keys, at=end[sl])
                    for sl in batches
                ],
            )

        def forward(group: list) -> tuple[Tensor, Tensor]:
            """[V, B] patched - base, and the base metric [B], batch by batch."""
            out, base_m = torch.empty(len(group), B), torch.empty(B)
            for i, sl in enumerate(batches):
                tokens, part_i = sub.clean_tokens[sl], part(i)
                b, n_var = tokens.shape[0], len(group) + 1
                masks: dict[tuple[int, str], Tensor] = {}
                for v, (layer, c) in enumerate(group, start=1):
                    m = masks.setdefault(
                        (layer, site), torch.zeros(n_var * b, s, n_cols, dtype=torch.bool)
                    )
                    m[v * b : (v + 1) * b, :, c] = posmask[sl]
                logits = run_with_edits(
                    base,
                    tokens.repeat(n_var, 1),
                    _edits_from(captured()[i].captured, masks, n_var),
                    at=end[sl].repeat(n_var),
                ).logits.view(n_var, b, -1)
                bm = part_i.metric(logits[0]).float().cpu()
                base_m[sl] = bm
                for v in range(1, n_var):
                    out[v - 1, sl] = part_i.metric(logits[v]).float().cpu() - bm
            return out, base_m

        def first() -> tuple[Metrics, Tensor | None]:
            vals, base_m = forward(groups[0]) if groups else (None, None)
            ft_m = torch.cat(
                [part(i).metric(r.logits).float().cpu() for i, r in enumerate(captured())]
            )
            return (base_m if base_m is not None else torch.empty(0), ft_m), vals

        return prepaid_work(jobs, first, lambda i, m: forward(groups[i])[0])

    def row_budget(self, task: Task) -> int:
        return DEFAULT_ROW_BUDGET // max(task.seq_len, 1)

    def cmap_groups_work(self, spec: CMAPGroupsSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        return _local_groups_work(self.model, _local(source), spec, chunk)


# ---------------------------------------------------------------------- nnsight


class NNsightBackend:
    """An nnsight-served model: a job is one request packing many cells as batch rows, so
    run_sweep reports progress per request and stops between requests. Request failures
    raise RemoteError (one sentence); the caller attaches the partial grid."""

    name = "nnsight"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.requests = 0  # requests sent so far, for the result's notes
        self.per_request = 0  # cells (or senders) per request
        self.source: NNsightBackend | None = None  # cmap_work's fine-tuned model

    def note(self, experiment: str) -> str | None:
        if experiment == "cmap_grid":
            n = self.requests + (self.source.requests if self.source is not None else 0)
            return (
                f"nnsight ({nnsight_backend.where(self.model)}): {n} request(s): 1 capturing "
                f"the fine-tuned model, then up to {self.per_request} cells each"
            )
        if experiment == "cmap":
            n = self.requests + (self.source.requests if self.source is not None else 0)
            return (
                f"nnsight ({nnsight_backend.where(self.model)}): {n} request(s), 2 per batch "
                "of examples"
            )
        if experiment == "attribution":
            return (
                f"nnsight ({nnsight_backend.where(self.model)}): {self.requests} request(s), "
                f"{self.per_request} examples each"
            )
        what = "senders" if experiment == "path_patch" else "cells"
        return (
            f"nnsight ({nnsight_backend.where(self.model)}): {self.requests} request(s), "
            f"up to {self.per_request} {what} each"
        )

    def chunk_rows(
        self, task: Task, max_memory: Any, *, runs: int = 2, batch_size: int | None = None
    ) -> list[slice]:
        return [slice(0, len(task))]  # nothing is cached here: requests are sized by rows

    def _request(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            out = fn(self.model, *args)
        except Exception as exc:
            from circuit_widgets.nnsight_model import RemoteError, request_error

            err = exc if isinstance(exc, RemoteError) else request_error(exc)
            raise err from exc
        self.requests += 1
        return out

    def activation_work(self, spec: ActivationSpec, chunk: Chunk) -> ChunkWork:
        nnsight_backend.check_component(spec.comp)
        task, noise = chunk.task, spec.noise
        B = len(task)
        _, P, n_cols = spec.wanted.shape
        cells = [tuple(c) for c in spec.wanted.nonzero().tolist()]  # layer-major
        per_request = max(
            P * n_cols, (spec.batch_size or nnsight_backend.DEFAULT_ROWS) // max(B, 1), 1
        )
        self.per_request = per_request
        groups = [cells[i : i + per_request] for i in range(0, len(cells), per_request)]
        # one job per request; its key lists each cell's layer and slot, cols its column
        jobs = [(([c[0] for c in g], [c[1] for c in g]), [c[2] for c in g]) for g in groups]
        reader = MetricReader(task, "cpu")
        base_tokens, src_tokens = (
            (task.clean_tokens, task.corrupt_tokens)
            if noise
            else (task.corrupt_tokens, task.clean_tokens)
        )
        masks = [slot.mask[chunk.rows] for slot in spec.slots]
        end = task.positions["END"].cpu()
        dh = model_shape(self.model).d_head

        def request(group: list, first: bool) -> Tensor:
            by_layer: dict[int, list] = {}
            for k, (layer, p, col) in enumerate(group):
                by_layer.setdefault(layer, []).append((k, p, col))
            out = self._request(
                nnsight_backend.patch_request,
                spec.comp,
                src_tokens,
                base_tokens,
                first,
                by_layer,
                masks,
                end,
                dh,
                reader.cols,
            )
            return reader(out.float().cpu().view(-1, B, out.shape[-1]))  # [rows / B, B]

        def first() -> tuple[Metrics, Tensor]:
            # the first request also runs the base: its rows give both metrics
            metric = request(groups[0] if groups else [], True)
            m_src, m_base = metric[0], metric[1]
            m = (m_base, m_src) if noise else (m_src, m_base)
            return m, metric[2:] - m[0][None]

        later = lambda i, m: request(groups[i], False)[1:] - m[0][None]
        return prepaid_work(jobs, first, later)

    def path_work(self, spec: PathSpec, chunk: Chunk) -> ChunkWork:
        from circuit_widgets.core.path_patching import receiver_slots

        task, shape = chunk.task, spec.shape
        B = len(task)
        senders = [Head(layer, h) for layer, hs in sorted(spec.by_layer.items()) for h in hs]
        per_cell = 1 if spec.to_logits else 2  # batch copies per sender
        rows = spec.batch_size or nnsight_backend.DEFAULT_ROWS
        per_request = max(shape.n_heads, rows // max(B * per_cell, 1), 1)
        self.per_request = per_request
        groups = [senders[i : i + per_request] for i in range(0, len(senders), per_request)]
        jobs = [(([h.layer for h in g],), [h.head for h in g]) for g in groups]
        reader = MetricReader(task, "cpu")
        mask, end = spec.mask[chunk.rows], task.positions["END"].cpu()
        slots = receiver_slots(spec.recv, shape.group_size)

        def request(group: list[Head]) -> Tensor:
            out = self._request(
                nnsight_backend.path_request,
                task,
                group,
                mask,
                end,
                slots,
                spec.to_logits,
                spec.freeze_mlps,
                reader.cols,
            )
            return reader(out.float().cpu().view(-1, B, out.shape[-1]))  # [corrupt, clean, ...]

        def values(metric: Tensor) -> Tensor:
            return metric[2:] - metric[1][None]  # against its own request's clean run

        def first() -> tuple[Metrics, Tensor]:
            # every request runs corrupt and clean too: the first one's give both metrics
            metric = request(groups[0] if groups else [])
            return (metric[1], metric[0]), values(metric)

        return prepaid_work(jobs, first, lambda i, m: values(request(groups[i])))

    def attribution_work(self, spec: AttributionSpec, task: Task, whole: bool) -> AttributionWork:
        """One request per step: source and base rows in one forward, the metric's gradient
        taken inside it (only torch and nnsight run there)."""
        from circuit_widgets.core import nnsight_experiments as nx

        nnsight_backend.check_component(spec.comp)
        if task.metric_name not in nx.GRAD_METRICS:
            where = "path_attribution" if spec.frozen else "attribution_patch"
            raise ValueError(
                f"{where} differentiates the metric, and {task.metric_name!r} is a step "
                f"function with no gradient; use a task with metric in {nx.GRAD_METRICS} "
                "(task.with_metric('logit_diff'))"
            )
        model, noise, B = self.model, spec.noise, len(task)
        shape = model_shape(model)
        n_cols = shape.n_heads if spec.comp in (Component.Z, Component.Q) else shape.n_kv_heads
        base_tokens, src_tokens = (
            (task.clean_tokens, task.corrupt_tokens)
            if noise
            else (task.corrupt_tokens, task.clean_tokens)
        )
        readout = nx.Readout(task)
        end = task.positions["END"].cpu()
        sites = [nnsight_backend.site(model, spec.comp, layer) for layer in range(spec.n_layers)]
        mlps = (
            [model.layer(layer).mlp for layer in range(spec.n_layers)] if spec.freeze_mlps else []
        )
        m_src, m_base = torch.full((B,), float("nan")), torch.full((B,), float("nan"))
        self.per_request = 0

        def step(sl: slice) -> Tensor:
            idx = torch.arange(B)[sl]
            self.per_request = max(self.per_request, len(idx))
            out, contribs = self._request(
                nx.grad_request, src_tokens[sl], base_tokens[sl], end[sl], sites, mlps,
                spec.frozen, readout.cols, readout.ans[idx], readout.wrong[idx],
                task.metric_name, n_cols, shape.d_head,
            )  # fmt: skip
            metric = readout.scores(out, idx.repeat(2))[0].view(2, -1)
            m_src[sl], m_base[sl] = metric[0], metric[1]
            return torch.stack([c.detach().float().cpu() for c in contribs], 1)

        return AttributionWork(step, m_base, m_src)

    def cmap_work(self, spec: CMAPSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        """One request captures the fine-tuned model's activations at every layer (metrics()'s
        setup step), then requests of patched base rows, one cell per copy of the batch; the
        first also runs the unpatched base (its metric), so it is prepaid."""
        from circuit_widgets.core import nnsight_experiments as nx

        assert isinstance(source, NNsightBackend), "cmap_work pairs backends of one kind"
        self.source = source
        task, base, B = chunk.task, self.model, len(chunk.task)
        site, n_cols, dh = spec.comp.value, spec.n_cols, model_shape(self.model).d_head
        cells = [(layer, c) for layer in range(spec.n_layers) for c in range(n_cols)]
        per_request = max(n_cols, (spec.batch_size or nnsight_backend.DEFAULT_ROWS) // max(B, 1), 1)
        self.per_request = per_request
        groups = [cells[i : i + per_request] for i in range(0, len(cells), per_request)]
        jobs = [(([c[0] for c in g],), [c[1] for c in g]) for g in groups]
        posmask = spec.posmask[chunk.rows][:, :, None]  # [B, s, 1]
        readout = nx.Readout(task)
        end = task.positions["END"].cpu()
        at = None if spec.position is None else task.positions[spec.position].cpu()
        ex = torch.arange(B)
        acts: list = []  # the fine-tuned capture, every layer: the first request's

        def request(group: list, acts: list, first: bool) -> Tensor:
            lead = 1 if first else 0  # the first request also runs the unpatched base
            n_rows = (lead + len(group)) * B
            plan: list = []
            for k, (layer, c) in enumerate(group):
                env, as_input, off = nx.envoy(base, layer, site)
                r0 = (lead + k) * B
                src = acts[layer][..., c * dh : (c + 1) * dh]
                span = (r0, r0 + B, off + c * dh, off + (c + 1) * dh, src, posmask, at)
                if plan and plan[-1][0] is env:
                    plan[-1][2].append(span)
                else:
                    plan.append((env, as_input, [span]))
            out = self._request(
                nx.cross_request,
                task.clean_tokens.repeat(n_rows // B, 1),
                end.repeat(n_rows // B),
                plan,
                readout.cols,
                dh,
            )
            return readout.scores(out, ex.repeat(n_rows // B))[0].view(-1, B)

        def first() -> tuple[Metrics, Tensor]:
            ft_logits, captured = source._request(
                nx.capture_layers, task.clean_tokens, site, end, at
            )
            acts[:] = captured
            metric = request(groups[0], acts, True)
            return (metric[0], task.metric(ft_logits).float()), metric[1:] - metric[0][None]

        later = lambda i, m: request(groups[i], acts, False) - m[0][None]
        return prepaid_work(jobs, first, later, setup=1)

    def row_budget(self, task: Task) -> int:
        return nnsight_backend.DEFAULT_ROWS

    def cmap_groups_work(self, spec: CMAPGroupsSpec, chunk: Chunk, source: Backend) -> ChunkWork:
        """Two requests for the batch: the fine-tuned model's END logits and activations at the
        patched sites, then the base model with the unpatched base and every variant as row
        blocks, read out compactly (a request never returns [rows, vocab])."""
        from circuit_widgets.core import nnsight_experiments as nx
        from circuit_widgets.core.cross_model import group_job, group_values, variant_masks

        assert isinstance(source, NNsightBackend), "cmap pairs backends of one kind"
        self.source = source
        base, sub, n_var = self.model, chunk.task, spec.blocks
        tokens, end = sub.clean_tokens, sub.positions["END"].cpu()
        keys, b, dh = spec.sites, tokens.shape[0], spec.shape.d_head

        def values() -> Tensor:  # masks made here: only the running batch's are alive
            masks, readout = variant_masks(spec, sub), nx.Readout(sub)
            ft_logits, acts = source._request(nx.capture_ft, tokens, keys, end)
            plan: list = []
            for key in nx.forward_order(keys):
                env, as_input, off = nx.envoy(base, *key)
                src = acts[key].repeat(n_var, 1, 1)
                span = (0, n_var * b, off, off + nx.width(base, key[1]), src, masks[key], None)
                if plan and plan[-1][0] is env:  # GPT-2: q, k and v share c_attn
                    plan[-1][2].append(span)
                else:
                    plan.append((env, as_input, [span]))
            out = self._request(
                nx.cross_request, tokens.repeat(n_var, 1), end.repeat(n_var), plan, readout.cols, dh
            )
            m, a, _ = readout.scores(out, torch.arange(b).repeat(n_var))
            return group_values(
                m.view(n_var, b), a.view(n_var, b), sub.metric(ft_logits), sub.accuracy(ft_logits)
            )

        return group_job(values, n_var)
