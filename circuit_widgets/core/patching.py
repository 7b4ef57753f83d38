"""Activation patching: one component (per head, kv head or layer) at a time, every one exactly.

The fast path (GPT-2, Llama-family, Gemma 3) resumes each patched run at the patched layer,
and per example at the first position the patch can change (the patched position, or the
first token where clean and corrupt differ), reading the rest from the cached runs; it runs
many patched copies per pass. Other architectures run one bridge forward per cell, with hooks;
an nnsight model packs many cells into each request. Which one runs is the Backend's choice
(core/backends.py); this module holds the sweep and the engines' cell functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.core import backends, hooks
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    MetricReader,
    Progress,
    Stop,
    SweepOut,
    Window,
    build_grid,
    chunk_notes,
    plan_sweep,
    run_sweep,
)
from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import Trace, gather_window, run_window, window_positions
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.types import Component, Direction, Head, ModelLike

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task


def activation_patch(
    model: ModelLike,
    task: Task,
    *,
    component: str | Component = "z",
    positions: str | Sequence[str] = "all",
    direction: str | Direction = "noise",
    heads: Sequence[Head | str | tuple[int, int]] | None = None,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
) -> HeadGrid:
    """Patch each head (or kv head, or layer) of ``component`` and measure the task's metric.

    direction 'noise' (default): the clean run with this component's corrupt activation
    patched in ("effect of corrupting it", the convention path patching also uses);
    'denoise': the corrupt run with the clean activation patched in. Either way
    ``values`` = mean over examples of (metric patched - metric clean) and ``normalized`` =
    values / mean(metric corrupt - metric clean); for 'denoise', ``recovered`` = 1 - normalized
    is the share of the gap a patch closes.

    component: z | q | k | v | pattern (per head; k and v per key/value head, so on
    grouped-query models the columns are kv heads) | attn_out | mlp_out | resid_pre (per
    layer: one column). positions: 'all' (every position at once -> [L, H]), a position name
    such as 'END' (each example's own index -> [L, H]), a list of names (-> [L, names, H]) or
    'each' (every absolute position -> [L, seq_len, H]; an example shorter than p gets no
    patch at p). For 'pattern' a position is the query row. heads: a subset of cells to
    compute (head index = column, i.e. the kv head for k/v); the others stay NaN.
    batch_size: rows (patched copies x examples) per pass; None picks a memory budget.
    on_progress(done, total) and should_stop() are called between passes; once stopped, the
    partial grid comes back with complete=False.
    max_memory: bytes (or '2GB') the cached runs may take; the examples are split into chunks
    that fit (results identical), None = a budget from free memory (``memory_budget``). A stop
    in a later chunk keeps the examples of the chunks that finished.
    """
    check_args("activation_patch", model=model, task=task)
    plan = plan_sweep(
        model, task, component, direction, heads, positions, on_progress, should_stop, batch_size
    )
    comp, dirn, shape, subset = plan.comp, plan.dirn, plan.shape, plan.subset
    slots, labels, single, n_cols = plan.slots, plan.labels, plan.single, plan.n_cols
    L, P = shape.n_layers, len(slots)
    wanted = torch.zeros(L, P, n_cols, dtype=torch.bool)
    if subset is None:
        wanted[:] = True
    else:
        for h in subset:
            wanted[h.layer, :, h.head] = True

    backend = backends.backend_for(model)
    spec = backends.ActivationSpec(comp, slots, wanted, dirn == Direction.NOISE, batch_size)
    rows = backend.chunk_rows(task, max_memory)

    def grid(out: SweepOut, extra: list[str]) -> HeadGrid:
        note = backend.note("activation_patch")  # after the sweep: nnsight counts requests
        notes = ([] if note is None else [note]) + chunk_notes(out, rows) + extra
        per_example, done = out.per_example, out.done
        if labels is None:
            per_example, done = per_example[:, :, 0], done[:, 0]
        if dirn == Direction.DENOISE:
            notes.append(
                "denoise: corrupt run with clean activations patched in; values are still "
                "patched - clean, recovered = 1 - normalized"
            )
        return build_grid(
            per_example,
            done,
            out.metric_a,
            out.metric_b,
            shape=shape,
            component=comp,
            direction=dirn.value,
            kind="activation",
            metric_name=task.metric_name,
            positions=labels,
            position=single,
            complete=out.complete,
            notes=notes,
        )

    out = run_sweep(
        task,
        rows,
        lambda chunk: backend.activation_work(spec, chunk),
        (L, P, n_cols),
        on_progress,
        should_stop,
        on_error=lambda kept, err: grid(kept, [str(err)]),
    )
    return grid(out, [])


# ---------------------------------------------------------------------- fast path


def grouped_cells(groups: list, n_variants: int, n_examples: int, fn) -> Tensor:
    """fn(examples, window) -> [V, b] over each example group, assembled into [V, B]."""
    if len(groups) == 1 and groups[0][0] is None:
        return fn(None, groups[0][1])
    out = None
    for ex, win in groups:
        part = fn(ex, win)
        if out is None:
            out = part.new_zeros(n_variants, n_examples)
        out[:, ex.to(part.device)] = part
    assert out is not None  # groups is never empty
    return out


def fast_cells(
    eng: FastModel,
    comp: Component,
    base: Trace,
    src: Trace,
    layer: int,
    cols: list[int],
    win: Window,
    reader: MetricReader,
    ex: Tensor | None = None,
    src_eng: FastModel | None = None,
) -> Tensor:
    """Metric change [V, B] of ``len(cols)`` patched copies of every example, in one pass.

    Row 0 of the pass is the base run itself, unpatched: each variant's metric is taken
    relative to it, so a patch that changes nothing gives exactly 0 and the float noise of
    resuming mid-network cancels. ``src_eng``: the model ``src`` was run on, when another one
    (cross-model patching: its q/k/v are recomputed with its own weights).
    """
    dev = eng.device
    starts, w = win.starts.to(dev), win.w
    pm = win.patch.to(dev)  # [b, w]
    pos = window_positions(starts, w)
    ex_dev = None if ex is None else ex.to(dev)
    pick = (lambda t: t) if ex is None else (lambda t: t[ex_dev])
    g = lambda t: gather_window(pick(t), pos)
    V = len(cols) + 1
    n_cols = eng.n_kv if comp.per_kv_head else (eng.n_heads if comp.per_head else 1)
    onehot = torch.zeros(V, n_cols, dtype=torch.bool, device=dev)
    onehot[torch.arange(1, V), torch.tensor(cols)] = True
    # sel[v, b, w, col]: this variant patches this column at this window position
    sel = pm[None, :, :, None] & onehot[:, None, None, :]
    init, edits, stage = None, {}, None
    if comp in (Component.Z, Component.PATTERN):
        z_src = (
            g(src.z[layer])
            if comp == Component.Z
            else _pattern_z(eng, pick(base.v[layer]), pick(src.pattern(eng, layer)), pos)
        )
        init = torch.where(sel[..., None], z_src[None], g(base.z[layer])[None])
        stage = "z"
    elif comp in (Component.Q, Component.K, Component.V):
        i = "qkv".index(comp.value)
        new = g(src.qkv_raw(src_eng or eng, layer)[i])[None]
        edits[(layer, comp.value)] = lambda t: torch.where(sel[..., None], new, t)
        stage = "attn"
    else:
        name = {
            Component.ATTN_OUT: "attn_out",
            Component.MLP_OUT: "mlp_out",
            Component.RESID_PRE: "resid_pre",
        }[comp]
        s_act, b_act = getattr(src, name)[layer], getattr(base, name)[layer]
        patch = pm[None, :, :, None] & onehot[:, None, None, :]  # [V, b, w, 1]
        init = torch.where(patch, g(s_act)[None], g(b_act)[None])
        stage = name
    final = run_window(
        eng,
        base,
        starts,
        w,
        V,
        layer,
        stage,
        init,
        edits,
        examples=ex_dev,
        end_index=win.end_index.to(dev),
    )  # [V, b, d]
    metric = reader(eng.logits(final, reader.cols), ex)
    return metric[1:] - metric[:1]


def _pattern_z(eng: FastModel, base_v: Tensor, src_pattern: Tensor, pos: Tensor) -> Tensor:
    """z each head would give at the window's query rows with the source run's attention
    pattern [b, H, s, s] and the base run's values [b, s, K, dh] (what hook_pattern patching
    computes)."""
    b, H, s, _ = src_pattern.shape
    rows = torch.gather(src_pattern, 2, pos.clamp(max=s - 1)[:, None, :, None].expand(b, H, -1, s))
    v = base_v.repeat_interleave(eng.group, dim=2)  # [b, s, H, dh]
    return torch.einsum("bhws,bshd->bwhd", rows, v)


# ---------------------------------------------------------------------- generic path


def hooked_cell(
    model: ModelLike,
    task: Task,
    comp: Component,
    base_tokens: Tensor,
    src_cache: dict,
    layer: int,
    col: int,
    mask: Tensor,
) -> Tensor:
    """Metric [B] of one patched bridge forward (the reference semantics, through hooks)."""
    name = hooks.hook_name(comp, layer)
    src = src_cache[name]
    axis = hooks.head_axis(comp)

    def patch(act: Tensor, hook: Any = None) -> Tensor:
        out = act.clone()
        m = mask.to(act.device)
        if comp == Component.PATTERN:  # [b, H, q, k]: the query row at patched positions
            sel = m[:, None, :, None].expand(-1, 1, -1, act.shape[-1])
            out[:, col : col + 1] = torch.where(sel, src[:, col : col + 1], act[:, col : col + 1])
        elif axis is not None:  # [b, s, H, dh]
            sel = m[:, :, None]
            out[:, :, col] = torch.where(sel, src[:, :, col], act[:, :, col])
        else:  # [b, s, d]
            out = torch.where(m[:, :, None], src, act)
        return out

    logits = model.run_with_hooks(base_tokens.to(model.cfg.device), fwd_hooks=[(name, patch)])
    return task.metric(logits)
