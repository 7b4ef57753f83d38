"""Head-level interventions bound to one task's prompts: force attention onto named keys,
scale a head's output, or replace it by its output on other prompts (Merullo et al.'s repair).

An ``Intervention`` is a set of edits; ``with intervene(...)`` puts them on the model as bridge
hooks, so every experiment run inside the block (patching, ablation, widgets) sees them: the
patching engine notices hooks left on a model and takes its hooked path. Inside the block each
forward's rows are matched to the task's examples by their tokens, so batches of any subset
of the task's clean or corrupt prompts, in any order and trimmed of padding, get each
example's own edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from circuit_widgets.core import hooks as hook_names
from circuit_widgets.core import nnsight_backend
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.models import model_shape
from circuit_widgets.types import Component, Head

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

    from circuit_widgets.tasks.base import Task
from circuit_widgets.types import ModelLike

_TOKEN_HOOK = "embed.hook_in"


class Intervention:
    """Edits to chosen heads, for the prompts of one task (see ``intervene``).

    ``edits()`` gives them as ``run_with_edits`` edits; entering the object as a context
    manager registers them as hooks on the model and removes exactly those on exit.
    """

    def __init__(
        self,
        model: ModelLike,
        task: Task,
        *,
        heads: Iterable[Any],
        attend_to: str | Sequence[str] | Tensor | None = None,
        scale: float | dict | None = None,
        replace_with: Any = None,
        at: str = "END",
    ) -> None:
        self.model, self.task = model, task
        self.shape = model_shape(model)
        self.heads = sorted(set(Head.parse_many(heads)))
        if not self.heads:
            raise ValueError("intervene needs at least one head")
        for h in self.heads:
            self.shape.check_head(h)
        if attend_to is None and scale is None and replace_with is None:
            raise ValueError("intervene needs attend_to, scale or replace_with")
        if at != "all" and at not in task.positions:
            raise ValueError(
                f"at must be 'all' or a position of task {task.name!r}: "
                f"{sorted(task.positions)}; got {at!r}"
            )
        self.at = at
        self.targets = None if attend_to is None else self._targets(attend_to)
        self.scales = None if scale is None else self._scales(scale)
        self.source_z = None if replace_with is None else self._source(replace_with)
        self._handles: list[tuple[Any, Any]] = []
        # The example index of each row of the forward now running (set by the token guard).
        self._rows: Tensor | None = None
        self._prompts = (task.clean_tokens.cpu(), task.corrupt_tokens.cpu())
        real = task.attention_mask.cpu().bool()
        pads = {int(x) for t in self._prompts for x in t[~real].unique()}
        pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        if pad_id is not None:
            pads.add(int(pad_id))
        self._pads = torch.tensor(sorted(pads), dtype=torch.long)

    # ------------------------------------------------------------------ checking the inputs

    def _targets(self, attend_to: Any) -> Tensor:
        """[b, k] key positions per example."""
        task = self.task
        if self.at == "all":
            raise ValueError(
                "attention can only be forced at a named query position (at='END', ...), "
                "not at='all'"
            )
        if isinstance(attend_to, Tensor):
            t = attend_to.long().cpu()
            t = t[:, None] if t.dim() == 1 else t
            if t.dim() != 2 or t.shape[0] != len(task):
                raise ValueError(
                    f"attend_to as a tensor must be [batch] or [batch, k] with batch "
                    f"{len(task)}, got {tuple(attend_to.shape)}"
                )
        else:
            names = [attend_to] if isinstance(attend_to, str) else list(attend_to)
            parts = []
            for name in names:
                if name in task.positions:
                    parts.append(task.positions[name].cpu()[:, None])
                elif name in task.position_sets:
                    parts.append(task.position_sets[name].cpu().long())
                else:
                    raise ValueError(
                        f"task {task.name!r} has no position or position set {name!r}; positions: "
                        f"{sorted(task.positions)}, sets: {sorted(task.position_sets)}"
                    )
            if not parts:
                raise ValueError("attend_to names no positions")
            t = torch.cat(parts, 1)
        query = task.positions[self.at].cpu()
        if (t < 0).any() or (t > query[:, None]).any():
            b = int(((t < 0) | (t > query[:, None])).any(1).nonzero()[0, 0])
            raise ValueError(
                f"attend_to positions {t[b].tolist()} of example {b} must lie in "
                f"0..{int(query[b])} (at or before its {self.at!r} query position)"
            )
        return t

    def _scales(self, scale: Any) -> dict[Head, float]:
        if isinstance(scale, dict):
            out = {Head.parse(h): float(s) for h, s in scale.items()}
            extra = sorted(set(out) - set(self.heads))
            if extra:
                raise ValueError(
                    f"scale names heads {[str(h) for h in extra]} that are not in heads"
                )
            return out
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"scale must be a number or a dict {{head: number}}, got {scale!r}")  # noqa: TRY004 - every input mistake is a ValueError
        return {h: float(scale) for h in self.heads}

    def _source(self, replace_with: Any) -> dict[int, Tensor]:
        """layer -> z [b, s, H, dh] of the source prompts, aligned to this task's positions."""
        task = self.task
        if isinstance(replace_with, str):
            if replace_with != "corrupt":
                raise ValueError(f"replace_with must be a Task or 'corrupt', got {replace_with!r}")
            src_task, tokens = task, task.corrupt_tokens
        elif hasattr(replace_with, "clean_tokens") and hasattr(replace_with, "positions"):
            src_task, tokens = replace_with, replace_with.clean_tokens
        else:
            raise ValueError(
                f"replace_with must be a Task or 'corrupt', got {type(replace_with).__name__}"
            )
        if len(src_task) != len(task):
            raise ValueError(
                f"replace_with has {len(src_task)} examples; the task has {len(task)}: "
                f"one source prompt per example is needed"
            )
        if self.at == "all":
            if tokens.shape != task.clean_tokens.shape or not torch.equal(
                src_task.lengths.cpu(), task.lengths.cpu()
            ):
                raise ValueError(
                    "replace_with at='all' needs source prompts of the same lengths as "
                    "the task's; use a named position (at='END') otherwise"
                )
        elif self.at not in src_task.positions:
            raise ValueError(f"replace_with task {src_task.name!r} has no position {self.at!r}")
        layers = sorted({h.layer for h in self.heads})
        run = run_with_edits(self.model, tokens, capture=[(l, "z") for l in layers])
        out = {}
        for l in layers:
            z = run.captured[(l, "z")].detach()
            if self.at != "all":
                ar = torch.arange(len(task))
                src_pos, dst_pos = src_task.positions[self.at].cpu(), task.positions[self.at].cpu()
                aligned = torch.zeros(len(task), task.seq_len, *z.shape[2:], dtype=z.dtype)
                aligned[ar, dst_pos] = z.cpu()[ar, src_pos]
                z = aligned
            out[l] = z.cpu()
        return out

    # ------------------------------------------------------------------ the edits

    def _rows_of(self, tokens: Tensor) -> Tensor:
        """[b] example index of each row of ``tokens``: the task prompt (clean or corrupt) whose
        real tokens the row starts with, every later token being padding."""
        tok = tokens.detach().cpu().long()
        t = self.task
        n, S = len(t), t.seq_len
        b, s = tok.shape
        if (b, s) == (n, S) and any(torch.equal(tok, p) for p in self._prompts):
            return torch.arange(n)  # the task's own batch, in order (duplicates stay themselves)
        lengths = t.lengths.cpu().long()
        w = min(s, S)
        # tail[r, p]: every token of row r from p on is padding (p = s: nothing left).
        pad = torch.isin(tok, self._pads).long()
        tail = torch.ones(b, s + 1, dtype=torch.bool)
        tail[:, :s] = pad.flip(1).cummin(1).values.flip(1).bool()
        fits = (lengths <= s)[None] & tail[:, lengths.clamp(max=s)]  # [b, n]
        beyond = torch.arange(w)[None] >= lengths[:, None]  # [n, w]: not a real token of example i
        match = torch.zeros(b, n, dtype=torch.bool)
        for p in self._prompts:
            match |= ((tok[:, None, :w] == p[None, :, :w]) | beyond[None]).all(-1)
        match &= fits
        rows = match.long().argmax(1)
        for r in range(b):
            cand = match[r].nonzero().flatten().tolist()
            if not cand:
                raise ValueError(
                    f"this intervention is bound to the prompts of task {t.name!r} ({n} prompts of "
                    f"up to {S} tokens, clean or corrupt, any subset in any order) but row {r} of a "
                    f"forward's batch ({b} x {s} tokens) is none of them; run other prompts outside "
                    f"the with-block, or make an intervention for them"
                )
            other = next((j for j in cand[1:] if not self._same_edit(cand[0], j, s)), None)
            if other is not None:
                raise ValueError(
                    f"row {r} of a forward's batch is both prompt {cand[0]} and prompt {other} of "
                    f"task {t.name!r} (the same tokens), whose edits differ, so the intervention "
                    f"cannot tell which to apply; drop the duplicate prompts from the task or run "
                    f"them outside the with-block"
                )
        return rows

    def _same_edit(self, i: int, j: int, s: int) -> bool:
        """Whether examples i and j get the same edit on a batch of width s."""
        if self.at != "all" and int(self.task.positions[self.at][i]) != int(
            self.task.positions[self.at][j]
        ):
            return False
        if self.targets is not None and not torch.equal(self.targets[i], self.targets[j]):
            return False
        return self.source_z is None or all(
            torch.equal(z[i, :s], z[j, :s]) for z in self.source_z.values()
        )

    def _batch_rows(self, b: int, s: int) -> Tensor:
        """The example index of each row of the activation now being edited."""
        if self._rows is not None and self.active:
            if len(self._rows) != b:
                raise ValueError(
                    f"a forward's activations have {b} rows but its tokens had "
                    f"{len(self._rows)}; the intervention cannot match them to examples"
                )
            return self._rows
        # No token guard ran (edits() used directly): only the task's own full batch is known.
        if b != len(self.task) or s != self.task.seq_len:
            raise ValueError(
                f"this intervention is bound to task {self.task.name!r} ({len(self.task)} prompts "
                f"of {self.task.seq_len} tokens) but a forward ran on a batch of {b} x {s}; edits() "
                f"apply to the task's full batch only; use the with-block for subsets of its prompts"
            )
        return torch.arange(b)

    def _pattern_fn(self, layer: int, targets: Tensor) -> DeclaredEdit:
        cols = [h.head for h in self.heads if h.layer == layer]
        queries = self.task.positions[self.at].cpu()

        def spec(tokens: Tensor) -> dict[str, Any]:
            rows = self._rows_of(tokens)
            t = targets[rows]
            row = torch.zeros(len(rows), tokens.shape[1])
            row.scatter_add_(1, t, torch.full(t.shape, 1.0 / t.shape[1]))
            return {"kind": "pattern", "cols": cols, "query": queries[rows], "row": row}

        def fn(act: Tensor) -> Tensor:  # [b, H, q, k]
            rows = self._batch_rows(act.shape[0], act.shape[2])
            t, query = targets[rows], queries[rows]
            b, dev = len(rows), act.device
            row = torch.zeros(b, act.shape[-1], dtype=act.dtype, device=dev)
            # Uniform over the targets (a position listed twice gets twice the weight).
            row.scatter_add_(
                1, t.to(dev), torch.full(t.shape, 1.0 / t.shape[1], dtype=act.dtype, device=dev)
            )
            out = act.clone()
            ar = torch.arange(b, device=dev)
            for c in cols:
                out[ar, c, query.to(dev)] = row
            return out

        return DeclaredEdit(fn, spec)

    def _z_fn(self, layer: int) -> DeclaredEdit:
        cols = [h.head for h in self.heads if h.layer == layer]
        at = None if self.at == "all" else self.task.positions[self.at].cpu()
        source = None if self.source_z is None else self.source_z[layer]
        scales = self.scales

        def where_and_source(rows: Tensor, b: int, s: int) -> tuple[Tensor, Tensor | None]:
            where = (
                torch.ones(b, s, dtype=torch.bool)
                if at is None
                else torch.arange(s)[None] == at[rows][:, None]
            )
            src = None
            if source is not None:
                src = source[rows, :s]
                if src.shape[1] < s:  # a batch wider than the task: its extra columns are padding
                    src = torch.cat([src, src.new_zeros(b, s - src.shape[1], *src.shape[2:])], 1)
            return where, src

        def spec(tokens: Tensor) -> dict[str, Any]:
            rows = self._rows_of(tokens)
            where, src = where_and_source(rows, *tokens.shape)
            scale = None
            if scales is not None:
                scale = torch.tensor([scales.get(Head(layer, c), 1.0) for c in cols])
            return {"kind": "z", "cols": cols, "where": where, "source": src, "scale": scale}

        def fn(act: Tensor) -> Tensor:  # [b, s, H, dh]
            rows = self._batch_rows(act.shape[0], act.shape[1])
            b, s = act.shape[:2]
            dev = act.device
            where, src = where_and_source(rows, b, s)
            out = act.clone()
            w = where.to(dev)[:, :, None]
            for c in cols:
                new = out[:, :, c]
                if src is not None:
                    new = torch.where(w, src[:, :, c].to(dev, act.dtype), new)
                if scales is not None and Head(layer, c) in scales:
                    new = torch.where(w, new * scales[Head(layer, c)], new)
                out[:, :, c] = new
            return out

        return DeclaredEdit(fn, spec)

    def edits(self) -> dict[tuple[int, str], Any]:
        """The intervention as ``run_with_edits`` edits for this task's prompts."""
        out = {}
        for layer in sorted({h.layer for h in self.heads}):
            if self.targets is not None:
                out[(layer, "pattern")] = self._pattern_fn(layer, self.targets)
            if self.source_z is not None or self.scales is not None:
                out[(layer, "z")] = self._z_fn(layer)
        return out

    def hooks(self) -> list[tuple[str, Any]]:
        """The intervention as (hook name, fn) pairs for ``model.run_with_hooks``."""
        site = {"pattern": Component.PATTERN, "z": Component.Z}
        out = [
            (hook_names.hook_name(site[s], l), _as_hook(fn)) for (l, s), fn in self.edits().items()
        ]
        if _TOKEN_HOOK in (getattr(self.model, "hook_dict", None) or {}):
            out.insert(0, (_TOKEN_HOOK, self._token_guard))
        return out

    def _token_guard(self, tokens: Tensor, hook: Any = None) -> None:
        """Match each row of a forward to its example; refuse prompts other than this task's."""
        self._rows = None
        if tokens.dim() != 2:
            return
        self._rows = self._rows_of(tokens)
        return

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Self:
        if nnsight_backend.is_nnsight(self.model):
            raise NotImplementedError(
                "intervene's with-block is not available on the nnsight backend: "
                f"{nnsight_backend.WHY_NOT['intervene']}; run the edits in one request instead: "
                "run_with_edits(model, tokens, intervention.edits())"
            )
        if self._handles:
            raise ValueError("this intervention is already active")
        try:
            for name, fn in self.hooks():
                if name not in self.model.hook_dict:
                    raise ValueError(f"the model has no hook point {name!r}")
                hp = self.model.hook_dict[name]
                self._handles.append((hp, hp.add_hook(fn)))
        except Exception:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        self._rows = None
        for hp, handle in reversed(self._handles):
            handle.hook.remove()
            lst = getattr(hp, "fwd_hooks", None)
            if isinstance(lst, list) and handle in lst:
                lst.remove(handle)
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __repr__(self) -> str:
        what = []
        if self.targets is not None:
            what.append(f"attention at {self.at} forced onto {self.targets.shape[1]} keys")
        if self.scales is not None:
            what.append("z scaled")
        if self.source_z is not None:
            what.append("z replaced")
        heads = ", ".join(str(h) for h in self.heads)
        return f"Intervention({heads}: {'; '.join(what)}{'; active' if self.active else ''})"


class DeclaredEdit:
    """An edit ``run_with_edits`` runs on any backend: called on the activation here, or, on an
    nnsight model (whose requests cannot carry Python functions), sent as the plain tensors of
    ``spec(tokens)``, the same edit for the examples those token rows are."""

    def __init__(
        self, fn: Callable[[Tensor], Tensor], spec: Callable[[Tensor], dict[str, Any]]
    ) -> None:
        self._fn, self.spec = fn, spec

    def __call__(self, act: Tensor) -> Tensor:
        return self._fn(act)


def _as_hook(fn):
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        return fn(act)

    return hook


def intervene(
    model: ModelLike,
    task: Task,
    *,
    heads: Iterable[Any],
    attend_to: str | Sequence[str] | Tensor | None = None,
    scale: float | dict | None = None,
    replace_with: Any = None,
    at: str = "END",
) -> Intervention:
    """Edit chosen heads on ``task``'s prompts; use as ``with intervene(...):``.

    attend_to: each head's attention row at query position ``at`` (default END, each example's
    own) becomes uniform over these keys: a position name, a position-set name
    (``task.position_sets``, e.g. Colored Objects' "wrong_colors"), a list of them, or a
    LongTensor [batch] / [batch, k]; the edited pattern is used as is (values are not
    renormalised). On grouped-query models this edits the query head's own pattern; the shared
    key/value head is untouched. scale: multiply the heads' z (before W_O) at ``at`` (or
    at='all' positions) by a number (0 zeroes the head) or per head {head: number}.
    replace_with: another Task with one prompt per example (its z at its own ``at`` position)
    or "corrupt" (this task's corrupt prompts); its z is computed now. Inside the block each
    forward's rows are matched to the task's examples by their tokens (real tokens equal, the
    rest padding), so a batch of any of the task's clean or corrupt prompts, in any order or
    subset and trimmed of padding, gets each example's own edit; a forward on any other
    prompts raises ValueError. Heads: one head (Head, "l.h", (l, h)) or a list or tuple of them.
    On an nnsight model the with-block is refused (NDIF keeps no hooks between requests);
    ``run_with_edits(model, tokens, intervention.edits())`` sends the same edits as tensors.
    """
    check_args("intervene", model=model, task=task)
    return Intervention(
        model, task, heads=heads, attend_to=attend_to, scale=scale, replace_with=replace_with, at=at
    )


# ====================================================================== attention readout


@dataclass(frozen=True, eq=False)
class AttentionResult:
    """Attention from query position ``at`` to the keys ``to``: per example [batch, n_heads]
    (the attention mass summed over those keys), and its mean over examples per head."""

    per_example: Float[Tensor, "batch head"]
    heads: list[Head]
    to: str
    at: str
    which: str
    notes: list[str] = field(default_factory=list)

    @property
    def mean(self) -> Float[Tensor, " head"]:
        return self.per_example.mean(0)

    def as_dict(self) -> dict[str, float]:
        """{'layer.head': mean attention}."""
        return {str(h): float(v) for h, v in zip(self.heads, self.mean)}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "head": [str(h) for h in self.heads],
                "layer": [h.layer for h in self.heads],
                "head_index": [h.head for h in self.heads],
                "mean": self.mean.tolist(),
                "std": self.per_example.std(0, unbiased=False).tolist(),
            }
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v:.3f}" for k, v in self.as_dict().items())
        return f"AttentionResult({self.at} -> {self.to}; {body})"


def head_attention(
    model: ModelLike,
    task: Task,
    heads: Iterable[Any],
    to: str | Sequence[str] | Tensor,
    *,
    at: str = "END",
    which: str = "clean",
) -> AttentionResult:
    """How much each head attends from ``at`` (default END) to the keys ``to`` (a position
    name, a position-set name, a list of them, or a LongTensor [batch] / [batch, k]), on the
    task's clean (or ``which="corrupt"``) prompts. Inside ``intervene`` it reads the edited
    patterns (the forward runs through the model's hooks)."""
    check_args("head_attention", model=model, task=task)
    if nnsight_backend.is_nnsight(model):
        return nnsight_backend.dispatch(model, "head_attention")(**locals())
    if which not in ("clean", "corrupt"):
        raise ValueError(f"which must be 'clean' or 'corrupt', got {which!r}")
    if at == "all":
        raise ValueError(
            "head_attention reads each head's attention row at one query position "
            "per example: at must be a position name (at='END', ...), not 'all'"
        )
    heads = Head.parse_many(heads)
    order = list(dict.fromkeys(heads))  # the caller's order, once each
    # An Intervention object checks heads, positions and targets for us.
    spec = Intervention(model, task, heads=heads, attend_to=to, scale=1.0, at=at)
    tokens = task.clean_tokens if which == "clean" else task.corrupt_tokens
    layers = sorted({h.layer for h in spec.heads})
    run = run_with_edits(
        model, tokens, capture=[(l, "pattern") for l in layers], at=task.positions["END"]
    )
    b = len(task)
    ar = torch.arange(b)
    query = task.positions[at].cpu()
    t = spec.targets
    assert t is not None  # attend_to= was given, so the Intervention has targets
    out = torch.zeros(b, len(order))
    for i, h in enumerate(order):
        rows = (
            run.captured[(h.layer, "pattern")].detach().float().cpu()[ar, h.head, query]
        )  # [b, k]
        # Each distinct key once, so a repeated target is not counted twice.
        hit = torch.zeros_like(rows, dtype=torch.bool)
        hit[ar[:, None].expand_as(t), t] = True
        out[:, i] = (rows * hit).sum(1)
    label = to if isinstance(to, str) else ("tensor" if isinstance(to, Tensor) else "+".join(to))
    return AttentionResult(per_example=out, heads=order, to=label, at=at, which=which)


# ====================================================================== copy / suppress


@dataclass(frozen=True, eq=False)
class CopyScores:
    """What each head does to the tokens it attends to, when forced onto them on its own.

    ``per_example`` [batch, n_heads]: the change in the attended tokens' logits at END (their
    mean) minus the change in the mean logit over the vocabulary, so a shift of every logit
    counts as nothing. > 0: the head copies what it attends to (promotes it); < 0: it
    suppresses it. ``candidate_accuracy`` [n_heads]: the task's accuracy among its candidates
    with that head forced (``candidate_accuracy_before`` without)."""

    per_example: Float[Tensor, "batch head"]
    heads: list[Head]
    candidate_accuracy: Float[Tensor, " head"]
    candidate_accuracy_before: float
    to: str
    at: str

    @property
    def score(self) -> Float[Tensor, " head"]:
        return self.per_example.mean(0)

    def as_dict(self) -> dict[str, float]:
        """{'layer.head': mean copy score}."""
        return {str(h): float(v) for h, v in zip(self.heads, self.score)}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v:+.3f}" for k, v in self.as_dict().items())
        return f"CopyScores({self.at} -> {self.to}; {body})"


def copy_scores(
    model: ModelLike,
    task: Task,
    heads: Iterable[Any],
    to: str | Sequence[str] | Tensor,
    *,
    at: str = "END",
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> CopyScores:
    """For each head alone: force its attention at ``at`` (default END) uniformly onto the keys
    ``to`` (as ``intervene``'s ``attend_to``) on the task's clean prompts, and measure the change
    in the logits, at END, of the tokens at those keys relative to the whole vocabulary's (see
    ``CopyScores``). One forward per head plus one without edits. A copying head (a name mover)
    scores > 0; a suppressing one (a negative mover; an S-inhibition head on GPT-2, through the
    movers) < 0. Stopped early (``should_stop``), the heads not measured are NaN."""
    check_callbacks(on_progress, should_stop, None)
    order = list(dict.fromkeys(Head.parse_many(heads)))
    if not order:
        raise ValueError("copy_scores needs at least one head")
    probe = Intervention(model, task, heads=order, attend_to=to, at=at)  # checks heads and keys
    tokens = task.clean_tokens
    end = task.positions["END"]
    b = len(task)
    ar = torch.arange(b)
    ids = tokens.cpu()[ar[:, None], probe.targets]  # [b, k] the attended tokens
    before = run_with_edits(model, tokens, at=end).logits.float().cpu()
    cand_before = float(task.candidate_accuracy(before).mean())
    per = torch.full((b, len(order)), float("nan"))
    cand = torch.full((len(order),), float("nan"))
    for i, h in enumerate(order):
        if should_stop is not None and should_stop():
            break
        iv = Intervention(model, task, heads=[h], attend_to=probe.targets, at=at)
        after = run_with_edits(model, tokens, iv.edits(), at=end).logits.float().cpu()
        delta = after - before
        per[:, i] = delta.gather(1, ids).mean(1) - delta.mean(1)
        cand[i] = float(task.candidate_accuracy(after).mean())
        if on_progress is not None:
            on_progress(i + 1, len(order))
    label = to if isinstance(to, str) else ("tensor" if isinstance(to, Tensor) else "+".join(to))
    return CopyScores(
        per_example=per,
        heads=order,
        candidate_accuracy=cand,
        candidate_accuracy_before=cand_before,
        to=label,
        at=at,
    )
