"""Attribution patching: a first-order preview of activation patching, every cell at once.

Estimate of (metric patched - metric base) = (source act - base act) . d metric / d act at the
base run, from one forward and one backward. Same value convention as ``activation_patch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuit_widgets.core import backends, hooks
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    Chunk,
    ChunkWork,
    MetricReader,
    Progress,
    Stop,
    SweepOut,
    build_grid,
    plan_sweep,
    prepaid_work,
    run_sweep,
    stopped_note,
)
from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import Trace, attend, causal_masks
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.types import Component, Direction, Head, ModelLike

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task


def attribution_patch(
    model: ModelLike,
    task: Task,
    component: str | Component = "z",
    direction: str | Direction = "noise",
    *,
    positions: str | Sequence[str] = "all",
    heads: Sequence[Head | str | tuple[int, int]] | None = None,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
) -> HeadGrid:
    """First-order estimate of ``activation_patch`` for every cell, in one forward+backward.

    For 'noise': (corrupt act - clean act) . grad of the metric at the clean run; for
    'denoise': (clean - corrupt) . grad at the corrupt run, plus (corrupt - clean) so that
    values still read mean(metric patched - metric clean). Arguments as in activation_patch;
    batch_size here bounds the examples per backward pass; max_memory (bytes or '2GB', None =
    from free memory) too, with runs made per chunk instead of cached when the task's do not
    fit. It is an approximation: exact for a metric linear in the activation, off where the patch moves softmaxes or norms far.
    """
    check_args("attribution_patch", model=model, task=task)
    return _attribute(
        model,
        task,
        component,
        direction,
        positions,
        heads,
        batch_size,
        on_progress,
        should_stop,
        max_memory=max_memory,
    )


def path_attribution(
    model: ModelLike,
    task: Task,
    *,
    position: str = "all",
    freeze_mlps: bool = False,
    heads: Sequence[Head | str | tuple[int, int]] | None = None,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
) -> HeadGrid:
    """First-order estimate of ``path_patch(receivers="logits")`` for every sender head at once.

    The same product as ``attribution_patch`` on z (corrupt z - clean z, times the gradient at
    the clean run), but the gradient flows only along the paths path patching keeps: no later
    head reads the sender's change (every head is frozen), MLPs pass it on unless
    ``freeze_mlps`` (then it is the direct effect through W_O and the final norm). ``position``
    is where the sender's z is patched, as in path_patch, whose value convention it follows.
    Exact where the metric is linear along those paths; receiver heads are not covered.
    """
    check_args("path_attribution", model=model, task=task)
    return _attribute(
        model,
        task,
        "z",
        "noise",
        position,
        heads,
        batch_size,
        on_progress,
        should_stop,
        frozen=True,
        freeze_mlps=freeze_mlps,
        max_memory=max_memory,
    )


def _attribute(
    model: ModelLike,
    task: Task,
    component: Any,
    direction: Any,
    positions: Any,
    heads: Any,
    batch_size: int | None,
    on_progress: Progress,
    should_stop: Stop,
    *,
    frozen: bool = False,
    freeze_mlps: bool = False,
    max_memory: int | str | None = None,
) -> HeadGrid:
    """attribution_patch, or with ``frozen`` the paths of path patching to the logits only."""
    plan = plan_sweep(
        model, task, component, direction, heads, positions, on_progress, should_stop, batch_size
    )
    comp, dirn, shape, subset = plan.comp, plan.dirn, plan.shape, plan.subset
    slots, labels, single, n_cols = plan.slots, plan.labels, plan.single, plan.n_cols
    B, L, P = len(task), shape.n_layers, len(slots)
    masks = torch.stack([s.mask for s in slots], 1).float()  # [b, P, s]

    backend = backends.backend_for(model)
    notes = ["first-order (attribution) estimate, not an exact patch"]
    if frozen:
        notes.append(
            "paths of path patching to the logits: no head reads the sender's change; "
            f"MLPs {'frozen' if freeze_mlps else 'pass it on'}"
        )
    # whole: the task's runs fit the budget and are cached; else each step makes its own
    whole = len(backend.chunk_rows(task, max_memory, runs=3)) == 1
    size = batch_size or B
    if whole:
        steps = [slice(i, min(i + size, B)) for i in range(0, B, size)]
    else:
        steps = backend.chunk_rows(task, max_memory, runs=3, batch_size=batch_size)
        notes.append(f"ran in {len(steps)} chunks of at most {steps[0].stop} examples (max_memory)")
    noise = dirn == Direction.NOISE
    spec = backends.AttributionSpec(comp, noise, L, frozen, freeze_mlps)
    work = backend.attribution_work(spec, task, whole)
    # a step's values fill every cell: one job of (layer, slot, column) lists per chunk
    cells = torch.cartesian_prod(torch.arange(L), torch.arange(P), torch.arange(n_cols))
    job = ((cells[:, 0].tolist(), cells[:, 1].tolist()), cells[:, 2].tolist())

    def grid(out: SweepOut, extra: list[str] | None = None) -> HeadGrid:
        m_clean, m_corrupt, pe = out.metric_a, out.metric_b, out.per_example
        if dirn == Direction.DENOISE:
            pe = pe + (m_corrupt - m_clean).float()[:, None, None, None]
        done = out.done.clone()
        if subset is not None:
            keep = torch.zeros(L, P, n_cols, dtype=torch.bool)
            for h in subset:
                keep[h.layer, :, h.head] = True
            done &= keep
        if labels is None:
            pe, done = pe[:, :, 0], done[:, 0]
        if not out.complete:
            extra = [stopped_note(out, B), *(extra or [])]
        note = backend.note("attribution")  # after the loop: nnsight counts its requests
        return build_grid(
            pe,
            done,
            m_clean,
            m_corrupt,
            shape=shape,
            component=comp,
            direction=dirn.value,
            kind="attribution",
            metric_name=task.metric_name,
            positions=labels,
            position=single,
            complete=out.complete,
            notes=[*([note] if note is not None else []), *notes, *(extra or [])],
            receivers="logits" if frozen else None,
        )

    def prepare(chunk: Chunk) -> ChunkWork:
        sl = chunk.rows

        def first() -> tuple[tuple[Tensor, Tensor], Tensor]:
            with torch.enable_grad():  # the sweep runs jobs under no_grad
                contrib = work.step(sl).float().cpu()  # [b, L, s, cols]: per position
            m = masks[sl][:, :, : contrib.shape[2]]  # a chunk's own runs may be trimmed
            per = torch.einsum("bps,blsc->blpc", m, contrib)
            m_base, m_src = work.m_base[sl], work.m_src[sl]  # the step filled them
            metrics = (m_base, m_src) if noise else (m_src, m_base)
            return metrics, per.reshape(per.shape[0], -1).T

        return prepaid_work([job], first)

    on_error = lambda out, err: grid(out, [str(err)])
    out = run_sweep(task, steps, prepare, (L, P, n_cols), on_progress, should_stop, None, on_error)
    work.finish(out.complete)
    return grid(out)


def _per_position(comp: Component, delta: Tensor, grad: Tensor) -> Tensor:
    """delta . grad summed within a cell, kept per position: [b, s, cols]."""
    if comp == Component.PATTERN:  # [b, H, q, k]: the query row is the position
        return (delta * grad).sum(-1).transpose(1, 2)
    if comp.per_head:  # [b, s, heads, dh]
        return (delta * grad).sum(-1)
    return (delta * grad).sum(-1, keepdim=True)  # [b, s, d]


# ---------------------------------------------------------------------- fast path


def fast_contrib(
    eng: FastModel,
    comp: Component,
    tokens: Tensor,
    src: Trace,
    end: Tensor,
    reader: MetricReader,
    sl: slice,
    frozen: bool = False,
    freeze_mlps: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward with grad on the base tokens, keeping ``comp`` at every layer, then one backward."""
    with torch.enable_grad():
        acts, final = _grad_forward(eng, comp, tokens.to(eng.device), frozen, freeze_mlps)
        ar = torch.arange(tokens.shape[0], device=eng.device)
        logits = eng.logits(final[ar, end.to(eng.device)], reader.cols)
        metric = reader(logits, sl)
        grads = torch.autograd.grad(metric.sum(), acts)
    out = []
    with torch.no_grad():
        for layer, (act, grad) in enumerate(zip(acts, grads)):
            out.append(_per_position(comp, _source(eng, comp, src, layer) - act, grad))
    return torch.stack(out, 1), metric.detach()


def _source(eng: FastModel, comp: Component, src: Trace, layer: int) -> Tensor:
    if comp in (Component.Q, Component.K, Component.V):
        return src.qkv_raw(eng, layer)["qkv".index(comp.value)]
    if comp == Component.PATTERN:
        return src.pattern(eng, layer)
    name = {
        Component.Z: "z",
        Component.ATTN_OUT: "attn_out",
        Component.MLP_OUT: "mlp_out",
        Component.RESID_PRE: "resid_pre",
    }[comp]
    return getattr(src, name)[layer]


def _grad_forward(
    eng: FastModel, comp: Component, tokens: Tensor, frozen: bool = False, freeze_mlps: bool = False
) -> tuple[list[Tensor], Tensor]:
    """Full forward keeping ``comp`` per layer as graph nodes; returns (acts, final resid).

    ``frozen`` (z only): each z is a leaf, so it reaches the output only through the residual
    stream and the MLPs (not those with ``freeze_mlps``), never through a later head."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).expand(b, s)
    masks = causal_masks(eng, torch.zeros(b, dtype=torch.long, device=tokens.device), s, s)
    x = eng.embed(tokens).detach().requires_grad_(True)
    acts = []
    for layer in range(eng.n_layers):
        lay = eng.layers[layer]
        if comp == Component.RESID_PRE:
            acts.append(x)
        # frozen: z becomes a leaf below, so attention's inputs need no graph (time and memory)
        q, k, v = eng.qkv(layer, lay.ln1(x.detach() if frozen else x))
        if comp in (Component.Q, Component.K, Component.V):
            acts.append({"q": q, "k": k, "v": v}[comp.value])
        qr, kr = eng.rotate(layer, q[None], pos, "q"), eng.rotate(layer, k[None], pos, "k")
        if comp == Component.PATTERN:
            _, pattern = attend(eng, layer, qr, kr, v[None], None, masks, want_pattern=True)
            pattern = pattern[0]
            acts.append(pattern)
            vv = v.repeat_interleave(eng.group, dim=2)
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, vv)
        else:
            z = attend(eng, layer, qr, kr, v[None], None, masks)[0][0]
        if frozen:  # a leaf of its own: the gradient starts here, not upstream of the head
            z = z.detach().requires_grad_(True)
        if comp == Component.Z:
            acts.append(z)
        attn_out = eng.o_proj(layer, z)
        if comp == Component.ATTN_OUT:
            acts.append(attn_out)
        mid = x + attn_out
        mlp_out = eng.mlp(layer, mid.detach() if freeze_mlps else mid)
        if comp == Component.MLP_OUT:
            acts.append(mlp_out)
        x = mid + mlp_out
    return acts, x


# ---------------------------------------------------------------------- generic path


def hooked_contrib(
    model: ModelLike,
    task: Task,
    comp: Component,
    tokens: Tensor,
    src_cache: dict,
    sl: slice,
    n_layers: int,
    frozen: bool = False,
    freeze_mlps: bool = False,
) -> Tensor:
    names = [hooks.hook_name(comp, l) for l in range(n_layers)]
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            # a fresh graph node that the rest of the forward consumes (frozen: a leaf of its own)
            out = act.detach().requires_grad_(True) if frozen else act * 1.0
            acts[name] = out
            return out

        return fn

    def cut(act: Tensor, hook: Any = None) -> Tensor:
        return act.detach()

    # z leaves already stop the gradient inside attention; frozen MLPs pass nothing on either.
    cuts = (
        [(hooks.hook_name(Component.MLP_OUT, l), cut) for l in range(n_layers)]
        if freeze_mlps
        else []
    )

    with torch.enable_grad():
        x = tokens[sl].to(model.cfg.device)
        # a leaf that requires grad, so a graph exists even with frozen weights
        leaf = [("hook_embed", lambda act, hook=None: act.detach().requires_grad_(True))]
        logits = model.run_with_hooks(x, fwd_hooks=leaf + cuts + [(n, keep(n)) for n in names])
        total = task.subset(sl).metric(logits).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names])
    out = []
    with torch.no_grad():
        for n, grad in zip(names, grads):
            delta = src_cache[n][sl] - acts[n]
            out.append(_per_position(comp, delta, grad))
    return torch.stack(out, 1)
