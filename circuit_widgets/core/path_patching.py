"""Path patching (Wang et al. 2022): a sender head's effect through a chosen path only.

Sender z comes from the corrupt run at ``position``; every other head's z is frozen to its
clean value, MLPs recompute (or are frozen too). With every head frozen, attention moves
nothing between positions, so the first pass is position-wise: only the positions the sender
changed are recomputed, through the MLPs alone. Effect at the logits is read from that pass
(at END); for receivers, their q/k/v inputs from that pass are patched into a clean run that
recomputes everything from the lowest receiver layer, at positions from the sender's on.
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
    check_callbacks,
    check_head,
    check_position_name,
    chunk_notes,
    run_sweep,
)
from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import Trace, gather_window, run_window, window_positions
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.models import model_shape
from circuit_widgets.types import Component, Head, ModelLike, ModelShape, Receiver, ReceiverInput

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task


def path_patch(
    model: ModelLike,
    task: Task,
    *,
    receivers: str | Sequence[Receiver] = "logits",
    senders: Sequence[Head | str | tuple[int, int]] | None = None,
    position: str = "all",
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
) -> HeadGrid:
    """Effect of each sender head's corrupt output reaching ``receivers`` (Wang et al.).

    receivers: 'logits' (the effect read straight at the output), or a list of
    ``Receiver(layer, head, input='q'|'k'|'v')`` patched together: their inputs are taken from
    the frozen run and patched into a fresh clean run where everything else recomputes. On
    grouped-query models a k/v receiver on query head h patches key/value head
    h // group_size, which feeds the whole group (said in ``notes`` and ``receivers``).
    senders: heads to test; None = every head in layers below the lowest receiver (every head
    for 'logits'). position: 'all' or a position name such as 'END' (each example's own
    index): where the sender's z is taken from the corrupt run. freeze_mlps: freeze MLP outputs
    to clean too (then the effect at the logits is the direct effect through W_O and the
    final norm). Values: mean over examples of (metric patched - metric clean); normalized by
    mean(metric corrupt - metric clean). Non-sender cells are NaN. max_memory: budget for
    the cached runs; examples are split into chunks that fit (see activation_patch).
    """
    check_args("path_patch", model=model, task=task)
    shape = model_shape(model)
    check_callbacks(on_progress, should_stop, batch_size)
    to_logits, recv = _check_receivers(receivers, shape)
    if not isinstance(position, str):
        raise ValueError(  # noqa: TRY004 - the brief: every input mistake is a ValueError
            f"position must be 'all' or a position name, got {position!r}"
        )
    if position != "all":
        check_position_name(task, position)
    if senders is not None:
        sender_list = [Head.parse(h) for h in senders]
        for h in sender_list:
            check_head(h, shape, "sender")
        if not to_logits:
            low = min(r.layer for r in recv)
            bad = [h for h in sender_list if h.layer >= low]
            if bad:
                raise ValueError(
                    f"sender {bad[0]} is at or above receiver layer {low}: a sender can only "
                    f"reach receivers in later layers (senders must be in layers < {low})"
                )
    elif to_logits:
        sender_list = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    else:
        low = min(r.layer for r in recv)
        if low == 0:
            raise ValueError("receivers in layer 0 have no earlier heads to send to them")
        sender_list = [Head(l, h) for l in range(low) for h in range(shape.n_heads)]
    sender_list = sorted(set(sender_list))

    b_ = len(task)
    s = task.clean_tokens.shape[1]
    mask = (
        torch.ones(b_, s, dtype=torch.bool)
        if position == "all"
        else torch.arange(s)[None] == task.positions[position].cpu()[:, None]
    )
    by_layer: dict[int, list[int]] = {}
    for h in sender_list:
        by_layer.setdefault(h.layer, []).append(h.head)

    backend = backends.backend_for(model)
    spec = backends.PathSpec(shape, mask, by_layer, recv, to_logits, freeze_mlps, batch_size)
    rows = backend.chunk_rows(task, max_memory)
    notes = [
        (
            f"senders: z from the corrupt run at position {position!r}; every other head's z "
            f"frozen to its clean value; MLPs {'frozen to clean' if freeze_mlps else 'recompute'}"
        ),
    ]
    if not to_logits:
        notes.append(
            "receivers' q/k/v from that run patched into a fresh clean run where "
            "everything else recomputes"
        )
    notes += _gqa_notes(recv, shape)

    def grid(out: SweepOut, extra: list[str]) -> HeadGrid:
        note = backend.note("path_patch")  # after the sweep: nnsight counts requests
        return build_grid(
            out.per_example,
            out.done,
            out.metric_a,
            out.metric_b,
            shape=shape,
            component=Component.Z,
            direction="noise",
            kind="path",
            metric_name=task.metric_name,
            positions=None,
            position=position,
            complete=out.complete,
            receivers=_describe(recv, shape),
            notes=[*([] if note is None else [note]), *notes, *chunk_notes(out, rows), *extra],
        )

    out = run_sweep(
        task,
        rows,
        lambda chunk: backend.path_work(spec, chunk),
        (shape.n_layers, shape.n_heads),
        on_progress,
        should_stop,
        on_error=lambda kept, err: grid(kept, [str(err)]),
    )
    return grid(out, [])


# ---------------------------------------------------------------------- validation, labels


def _check_receivers(receivers: Any, shape: ModelShape) -> tuple[bool, list[Receiver]]:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(
                f"receivers must be 'logits' or a list of Receiver(layer, head, "
                f"input), got {receivers!r}"
            )
        return True, []
    if isinstance(receivers, Receiver):
        receivers = [receivers]
    if not isinstance(receivers, (list, tuple)) or not receivers:
        raise ValueError(
            "receivers must be 'logits' or a non-empty list of Receiver(layer, head, input)"
        )
    out = []
    for r in receivers:
        if isinstance(r, tuple):
            r = Receiver(*r)
        if not isinstance(r, Receiver):
            raise ValueError(  # noqa: TRY004 - every input mistake is a ValueError
                f"cannot read a receiver from {r!r}; use Receiver(layer, head, 'q'|'k'|'v')"
            )
        check_head(r.as_head, shape, "receiver")
        out.append(r)
    return False, sorted(set(out))


def _describe(recv: list[Receiver], shape: ModelShape) -> str:
    if not recv:
        return "logits"
    parts = []
    for r in recv:
        text = str(r)
        if r.input != ReceiverInput.Q and shape.group_size > 1:
            g = shape.kv_head_of(r.head)
            qs = shape.query_heads_of(g)
            text += f" (kv head {g}, shared by q{qs[0]}-{qs[-1]})"
        parts.append(text)
    return ", ".join(parts)


def _gqa_notes(recv: list[Receiver], shape: ModelShape) -> list[str]:
    if shape.group_size == 1:
        return []
    notes = []
    for r in recv:
        if r.input != ReceiverInput.Q:
            g = shape.kv_head_of(r.head)
            notes.append(
                f"receiver {r}: {r.input.value} is computed per key/value head; kv head {g} is "
                f"patched, which feeds query heads {shape.query_heads_of(g)} (grouped-query "
                f"attention)"
            )
    return notes


def receiver_slots(recv: list[Receiver], group: int) -> dict[tuple[int, str], list[int]]:
    """(layer, 'q'|'k'|'v') -> the head columns to patch (kv heads for k/v)."""
    out: dict[tuple[int, str], list[int]] = {}
    for r in recv:
        col = r.head if r.input == ReceiverInput.Q else r.head // group
        cols = out.setdefault((r.layer, r.input.value), [])
        if col not in cols:
            cols.append(col)
    return out


# ---------------------------------------------------------------------- fast path


def fast_senders(
    eng: FastModel,
    clean: Trace,
    corrupt: Trace,
    layer: int,
    cols: list[int],
    win: Window,
    recv: list[Receiver],
    freeze: bool,
    reader: MetricReader,
) -> Tensor:
    """Metric change [V, B] for ``cols`` senders of one layer, against row 0 of the same
    pass, the unpatched clean run (so a sender that changes nothing gives exactly 0)."""
    dev = eng.device
    starts, w = win.starts.to(dev), win.w
    pm = win.patch.to(dev)
    pos = window_positions(starts, w)
    g = lambda t: gather_window(t, pos)
    V = len(cols) + 1
    onehot = torch.zeros(V, eng.n_heads, dtype=torch.bool, device=dev)
    onehot[torch.arange(1, V), torch.tensor(cols)] = True
    sel = pm[None, :, :, None] & onehot[:, None, None, :]
    z = torch.where(sel[..., None], g(corrupt.z[layer])[None], g(clean.z[layer])[None])
    attn_new = eng.o_proj(layer, z)
    ar = torch.arange(len(starts), device=dev)
    end = win.end_index.to(dev)
    slots = receiver_slots(recv, eng.group)

    if not recv and freeze:
        # every other contribution is clean: the final residual moves by this one change
        final = g(clean.resid_pre[-1])[None] + (attn_new - g(clean.attn_out[layer])[None])
        return _relative(reader(eng.logits(final[:, ar, end], reader.cols)))

    stop = eng.n_layers if not recv else max(r.layer for r in recv)
    captured: dict[tuple[int, str], Tensor] = {}
    mid = g(clean.resid_pre[layer])[None] + attn_new
    x = mid + (g(clean.mlp_out[layer])[None] if freeze else eng.mlp(layer, mid))
    for l in range(layer + 1, stop + 1):
        if any(key[0] == l for key in slots):
            q, k, v = eng.qkv(l, eng.layers[l].ln1(x))
            for (rl, inp), heads in slots.items():
                if rl == l:
                    captured[(rl, inp)] = {"q": q, "k": k, "v": v}[inp][..., heads, :]
        if l == stop:
            break
        mid = x + g(clean.attn_out[l])[None]
        x = mid + (g(clean.mlp_out[l])[None] if freeze else eng.mlp(l, mid))
    if not recv:
        return _relative(reader(eng.logits(x[:, ar, end], reader.cols)))

    edits = {}
    for key, heads in slots.items():
        edits[key] = _replace_heads(heads, captured[key], pm)
    low = min(r.layer for r in recv)
    final = run_window(eng, clean, starts, w, V, low, "attn", edits=edits, end_index=end)
    return _relative(reader(eng.logits(final, reader.cols)))


def _relative(metric: Tensor) -> Tensor:
    return metric[1:] - metric[:1]


def _replace_heads(heads: list[int], new: Tensor, pm: Tensor):
    idx = torch.tensor(heads, device=new.device)

    def edit(t: Tensor) -> Tensor:
        out = t.clone()
        keep = t.index_select(-2, idx)
        out[..., heads, :] = torch.where(pm[None, :, :, None, None], new, keep)
        return out

    return edit


# ---------------------------------------------------------------------- generic path


def hooked_sender(
    model: ModelLike,
    task: Task,
    shape: ModelShape,
    c_cache: dict,
    x_cache: dict,
    layer: int,
    head: int,
    mask: Tensor,
    recv: list[Receiver],
    freeze: bool,
) -> Tensor:
    """Metric [B] for one sender, with two bridge forwards (the reference semantics)."""
    dev = model.cfg.device
    tokens = task.clean_tokens.to(dev)

    def freeze_z(l: int):
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            out = c_cache[hooks.hook_name(Component.Z, l)].clone()
            if l == layer:
                m = mask.to(act.device)[:, :, None]
                src = x_cache[hooks.hook_name(Component.Z, l)]
                out[:, :, head] = torch.where(m, src[:, :, head], out[:, :, head])
            return out

        return fn

    fwd = [(hooks.hook_name(Component.Z, l), freeze_z(l)) for l in range(shape.n_layers)]
    if freeze:
        fwd += [
            (
                hooks.hook_name(Component.MLP_OUT, l),
                lambda act, hook=None, l=l: c_cache[hooks.hook_name(Component.MLP_OUT, l)].clone(),
            )
            for l in range(shape.n_layers)
        ]
    slots = receiver_slots(recv, shape.group_size)
    captured: dict[tuple[int, str], Tensor] = {}
    for rl, inp in slots:
        comp = Component.coerce(inp)

        def grab(act: Tensor, hook: Any = None, key=(rl, inp)) -> Tensor:
            captured[key] = act.clone()
            return act

        fwd.append((hooks.hook_name(comp, rl), grab))
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    if not recv:
        return task.metric(logits)

    fwd2 = []
    for (rl, inp), heads in slots.items():
        comp = Component.coerce(inp)

        def put(act: Tensor, hook: Any = None, key=(rl, inp), heads=heads) -> Tensor:
            out = act.clone()
            out[:, :, heads] = captured[key][:, :, heads]
            return out

        fwd2.append((hooks.hook_name(comp, rl), put))
    return task.metric(model.run_with_hooks(tokens, fwd_hooks=fwd2))
