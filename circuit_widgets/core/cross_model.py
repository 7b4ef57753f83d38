"""Cross-model activation patching (CMAP): a fine-tuned model's activations written into its base.

Both models read the same prompts; the fine-tuned run's activations at chosen heads (or layers)
and positions replace the base run's, and the base model's own weights do the rest (for "z",
its own W_O). Both forwards go through ``run_with_edits``, i.e. through each model's real
modules: a live (unmerged) LoRA adapter is part of the fine-tuned forward, merged or not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuit_widgets.core import hooks, nnsight_backend
from circuit_widgets.core.backends import CMAPGroupsSpec, CMAPSpec, pair_backends
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    DEFAULT_ROW_BUDGET,
    ChunkWork,
    Progress,
    Stop,
    SweepOut,
    build_grid,
    check_callbacks,
    check_heads,
    chunk_notes,
    parse_memory,
    prepaid_work,
    run_sweep,
)
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.models import check_adapters, model_shape
from circuit_widgets.types import Circuit, Component, Head, ModelLike, ModelShape

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

COMPONENTS = (
    Component.Z,
    Component.Q,
    Component.K,
    Component.V,
    Component.ATTN_OUT,
    Component.MLP_OUT,
)
# Rows x positions of one forward; ~0.3 GB of activations on the demo model.
ROW_BUDGET = DEFAULT_ROW_BUDGET
WHOLE = "circuit"


# ---------------------------------------------------------------------- compatibility


def _bridge(model: Any, label: str) -> Any:
    """A TransformerBridge; a peft wrapper is unwrapped (its adapters stay live in the modules)."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if getattr(inner, "cfg", None) is None or not callable(getattr(inner, "run_with_hooks", None)):
        raise TypeError(
            f"{label} must be a TransformerBridge (load_model(...)); got {type(model).__name__}. "
            "Wrap a transformers/peft model with load_model(hf_model, tokenizer=tok)."
        )
    return inner


def _architecture(model: ModelLike) -> str:
    hf = getattr(model, "original_model", None)
    names = getattr(getattr(hf, "config", None), "architectures", None)
    return (names or [type(hf).__name__])[0] if hf is not None else type(model).__name__


def _vocab_fingerprint(tokenizer: Any) -> tuple[int, int]:
    vocab = tokenizer.get_vocab()
    return len(vocab), hash(tuple(sorted(vocab.items())))


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
# Parts of a fast tokenizer's backend that decide which ids a text becomes.
BACKEND_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "model.type", "model.merges")


def _backend(tokenizer: Any) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    return {
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "post_processor": spec.get("post_processor"),
        "model.type": model.get("type"),
        "model.merges": model.get("merges"),
    }


def _tokenizer_diffs(base: Any, finetuned: Any) -> list[str]:
    ta, tb = getattr(base, "tokenizer", None), getattr(finetuned, "tokenizer", None)
    if ta is None and tb is None:
        return []
    if ta is None or tb is None:
        return [
            "tokenizer: base "
            + ("has none" if ta is None else "has one")
            + ", finetuned "
            + ("has none" if tb is None else "has one")
        ]
    diffs = []
    fa, fb = _vocab_fingerprint(ta), _vocab_fingerprint(tb)
    if fa != fb:
        diffs.append(
            f"vocabulary: the tokenizers differ (base {fa[0]} tokens, finetuned {fb[0]} "
            "tokens, different token -> id maps)"
        )
    for name in SPECIAL_IDS:
        va, vb = getattr(ta, name, None), getattr(tb, name, None)
        if va != vb:
            diffs.append(
                f"tokenizer {name}: base {va} ({getattr(ta, name[:-3], None)!r}), "
                f"finetuned {vb} ({getattr(tb, name[:-3], None)!r})"
            )
    ba, bb = _backend(ta), _backend(tb)
    if ba is not None and bb is not None:
        parts = [k for k in BACKEND_PARTS if ba[k] != bb[k]]
        if parts:
            diffs.append(f"tokenizer backend: {', '.join(parts)} differ")
    return diffs


def check_compatible(base: Any, finetuned: Any) -> None:
    """Raise ValueError naming every difference that makes cross-model patching meaningless.

    Compared: architecture class, n_layers, n_heads, n_kv_heads, d_head, d_model, vocabulary
    size, the tokenizer's vocabulary (token -> id), its bos/eos/pad/unk ids, a fast tokenizer's
    normalizer, pre-tokenizer, post-processor and merges, and ``cfg.default_prepend_bos``.
    Either model's live peft LoRA adapters must be ones the bridge runs (``check_adapters``).
    """
    if nnsight_backend.is_nnsight(base) or nnsight_backend.is_nnsight(finetuned):
        from circuit_widgets.core.nnsight_experiments import check_pair

        check_pair("check_compatible", base, finetuned)
        return
    check_args("check_compatible", base=base, finetuned=finetuned)
    base, finetuned = _bridge(base, "base"), _bridge(finetuned, "finetuned")
    a, b = model_shape(base), model_shape(finetuned)
    diffs = []
    arch_a, arch_b = _architecture(base), _architecture(finetuned)
    if arch_a != arch_b:
        diffs.append(f"architecture: base {arch_a}, finetuned {arch_b}")
    for name, label in (
        ("n_layers", "layers"),
        ("n_heads", "heads"),
        ("n_kv_heads", "key/value heads"),
        ("d_head", "d_head"),
        ("d_model", "d_model"),
        ("d_vocab", "vocabulary size"),
    ):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            diffs.append(f"{label} ({name}): base {va}, finetuned {vb}")
    diffs += _tokenizer_diffs(base, finetuned)
    pa = getattr(base.cfg, "default_prepend_bos", None)
    pb = getattr(finetuned.cfg, "default_prepend_bos", None)
    if pa != pb:
        diffs.append(f"cfg.default_prepend_bos: base {pa}, finetuned {pb}")
    if diffs:
        raise ValueError(
            "base and finetuned models are not compatible for cross-model patching: "
            + "; ".join(diffs)
        )
    check_adapters(base, "base")  # a bridge built outside load_model was never checked
    check_adapters(finetuned, "finetuned")


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class CMAPResult:
    """Base, fine-tuned and patched metric/accuracy, per example, per group and for the circuit.

    Row g of ``patched_metric`` / ``patched_accuracy`` belongs to ``groups[g]``; with several
    groups a last row "circuit" patches every group at once, each at its own position. ``recovered`` =
    (patched - base) / (fine-tuned - base), from the means. Examples not run (a stopped run)
    are NaN and ``done`` is False there.
    """

    groups: list[str]
    heads: dict[str, list[Head]]
    positions: dict[str, str | None]
    base_metric: Float[Tensor, " batch"]
    finetuned_metric: Float[Tensor, " batch"]
    patched_metric: Float[Tensor, "group batch"]
    base_accuracy: Float[Tensor, " batch"]
    finetuned_accuracy: Float[Tensor, " batch"]
    patched_accuracy: Float[Tensor, "group batch"]
    done: Bool[Tensor, " batch"]
    complete: bool
    components: list[str]
    metric_name: str
    kv_groups: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _mean(x: Tensor) -> Tensor:
        return x.nanmean(-1)

    @property
    def recovered(self) -> Float[Tensor, " group"]:
        base, ft = self._mean(self.base_metric), self._mean(self.finetuned_metric)
        gap = ft - base
        if float(gap) == 0:
            return torch.full((len(self.groups),), math.nan)
        return (self._mean(self.patched_metric) - base) / gap

    def group(self, name: str) -> dict[str, float]:
        """Mean metric and accuracy of one group (or "circuit"): base, finetuned, patched."""
        if name not in self.groups:
            raise ValueError(f"no group {name!r}; this result has {self.groups}")
        g = self.groups.index(name)
        m = self._mean
        return {
            "base_metric": float(m(self.base_metric)),
            "finetuned_metric": float(m(self.finetuned_metric)),
            "patched_metric": float(m(self.patched_metric[g])),
            "base_accuracy": float(m(self.base_accuracy)),
            "finetuned_accuracy": float(m(self.finetuned_accuracy)),
            "patched_accuracy": float(m(self.patched_accuracy[g])),
            "recovered": float(self.recovered[g]),
        }

    def to_dataframe(self):
        """One row per group: heads, position, and the means of ``group(name)``."""
        import pandas as pd

        rows = []
        for name in self.groups:
            hs = self.heads[name]
            rows.append(
                {
                    "group": name,
                    "n_heads": len(hs),
                    "heads": " ".join(str(h) for h in hs),
                    "position": self.positions.get(name) or "all",
                    **self.group(name),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial ({int(self.done.sum())} examples)"
        parts = ", ".join(f"{g}: {self.group(g)['patched_accuracy']:.2f}" for g in self.groups)
        return (
            f"CMAPResult({'+'.join(self.components)}, {self.metric_name}; accuracy base "
            f"{self.group(self.groups[0])['base_accuracy']:.2f}, finetuned "
            f"{self.group(self.groups[0])['finetuned_accuracy']:.2f}, patched {parts}; {state})"
        )


# ---------------------------------------------------------------------- patch specs


@dataclass(frozen=True)
class _Patch:
    """One group's patch: columns per layer of each component, at one position (None = all)."""

    name: str
    columns: dict[
        tuple[int, str], list[int]
    ]  # (layer, site) -> head/kv-head columns ([] = whole layer)
    position: str | None
    heads: list[Head]


def _components(component: Any) -> list[Component]:
    items = [component] if isinstance(component, (str, Component)) else list(component)
    if not items:
        raise ValueError(
            f"component must be one of {[c.value for c in COMPONENTS]} or a list of them"
        )
    out = []
    for c in items:
        comp = Component.coerce(c)
        if comp not in COMPONENTS:
            raise ValueError(f"CMAP patches {[c.value for c in COMPONENTS]}; got {comp.value!r}")
        if comp not in out:
            out.append(comp)
    return out


def _column_kind(comp: Component) -> str:
    if not comp.per_head:
        return "layers (attn_out/mlp_out)"
    return "key/value heads (k/v)" if comp.per_kv_head else "query heads (z/q)"


def _check_position(task: Task, position: Any) -> str | None:
    if position is None or position == "all":
        return None
    if not isinstance(position, str) or position not in task.positions:
        raise ValueError(
            f"position {position!r} is not one of task {task.name!r}'s positions "
            f"{sorted(task.positions)} (or 'all')"
        )
    return position


def _group_patch(
    name: str,
    heads: list[Head],
    comps: list[Component],
    shape: ModelShape,
    position: str | None,
    query_heads: bool,
) -> _Patch:
    """Columns each component patches; query heads map to their key/value head for k/v."""
    cols: dict[tuple[int, str], set[int]] = {}
    for h in heads:
        for comp in comps:
            key = (h.layer, comp.value)
            if not comp.per_head:
                cols.setdefault(key, set())
            elif comp.per_kv_head and query_heads:
                cols.setdefault(key, set()).add(shape.kv_head_of(h.head))
            else:
                cols.setdefault(key, set()).add(h.head)
    return _Patch(name, {k: sorted(v) for k, v in cols.items()}, position, sorted(heads))


def _plan(
    base: Any,
    task: Task,
    circuit: Any,
    heads: Any,
    comps: list[Component],
    positions: Any,
    shape: ModelShape,
) -> tuple[list[_Patch], list[str]]:
    """The groups to patch (each alone, then all together as "circuit") and notes."""
    notes: list[str] = []
    if (circuit is None) == (heads is None):
        raise ValueError(
            "give exactly one of circuit= (a Circuit) or heads= (a list of heads, or 'all')"
        )
    if circuit is not None:
        if not isinstance(circuit, Circuit):
            raise TypeError(f"circuit must be a Circuit, got {type(circuit).__name__}")
        if not circuit.groups or not circuit.heads:
            raise ValueError("the circuit has no heads")
        circuit.validate(shape.n_layers, shape.n_heads, task.positions)
        names = [g.name for g in circuit.groups]
        if len(names) > 1 and WHOLE in names:
            raise ValueError(
                f"group name {WHOLE!r} is taken: cmap reports every group together under it; "
                f"rename that group (the circuit's groups are {names})"
            )
        if positions is not None and not isinstance(positions, (str, dict)):
            raise ValueError(
                "with a circuit, positions is None (each group's own), 'all', a position "
                f"name or a dict group -> position; got {positions!r}"
            )
        patches = []
        for g in circuit.groups:
            pos = (
                positions.get(g.name, g.position)
                if isinstance(positions, dict)
                else (g.position if positions is None else positions)
            )
            patches.append(
                _group_patch(
                    g.name,
                    sorted(g.heads),
                    comps,
                    shape,
                    _check_position(task, pos),
                    query_heads=True,
                )
            )
        if isinstance(positions, dict):
            unknown = set(positions) - {g.name for g in circuit.groups}
            if unknown:
                raise ValueError(
                    f"positions names groups {sorted(unknown)} the circuit lacks; it has "
                    f"{[g.name for g in circuit.groups]}"
                )
    else:
        pos = _check_position(task, "all" if positions is None else positions)
        if isinstance(heads, str) and heads == "all":
            parsed = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
        elif isinstance(heads, str):
            raise ValueError(
                f"heads must be a list of heads (Head, (layer, head), 'l.h') or 'all', got {heads!r}"
            )
        else:
            # Per-layer components take plain layer numbers too.
            items = [
                Head(h, 0) if isinstance(h, int) and not isinstance(h, bool) else h for h in heads
            ]
            if not items:
                raise ValueError("heads is empty; give at least one head")
            kinds = {_column_kind(c) for c in comps}
            if len(kinds) > 1:
                raise ValueError(
                    f"heads= indexes each component's own columns, and {[c.value for c in comps]} "
                    f"mix {' and '.join(sorted(kinds))}, so one list cannot mean the same heads for "
                    "all of them; give a circuit (Circuit.from_heads(...): query heads, mapped to "
                    "their key/value head for k/v), or one cmap call per kind"
                )
            comp = comps[0]
            parsed = check_heads(items, comp if comp.per_head else Component.ATTN_OUT, shape)
        # 'all' lists query heads, which cover every key/value head too.
        patches = [_group_patch("heads", parsed, comps, shape, pos, query_heads=heads == "all")]
    if any(c.per_kv_head for c in comps) and shape.group_size > 1:
        kv = [
            f"kv{g}: q{shape.query_heads_of(g)[0]}-{shape.query_heads_of(g)[-1]}"
            for g in range(shape.n_kv_heads)
        ]
        notes.append(
            f"k/v are patched per key/value head, shared by {shape.group_size} query heads "
            f"each ({', '.join(kv)}): patching one changes its whole group"
            + ("; circuit heads were mapped to their key/value head" if circuit is not None else "")
        )
    if len(patches) > 1:
        # Display only: its cells are the union of the groups' cells, each at its own position.
        whole = _Patch(WHOLE, {}, "per group", sorted({h for p in patches for h in p.heads}))
        patches.append(whole)
    return patches, notes


# ---------------------------------------------------------------------- edits


def _position_mask(task: Task, position: str | None, rows: slice) -> Tensor:
    b = task.clean_tokens[rows].shape[0]
    s = task.clean_tokens.shape[1]
    if position is None:
        return torch.ones(b, s, dtype=torch.bool)
    return torch.arange(s)[None] == task.positions[position][rows].cpu()[:, None]


def _cell_masks(
    patch_list: Sequence[_Patch], task: Task, rows: slice, shape: ModelShape
) -> dict[tuple[int, str], Tensor]:
    """(layer, site) -> bool mask [V*b, s, columns or 1] over all variants (patches) stacked."""
    b = task.clean_tokens[rows].shape[0]
    s = task.clean_tokens.shape[1]
    out: dict[tuple[int, str], Tensor] = {}
    for v, p in enumerate(patch_list):
        pos = _position_mask(task, p.position, rows)
        for key, cols in p.columns.items():
            comp = Component.coerce(key[1])
            n_cols = hooks.n_columns(comp, shape)
            if key not in out:
                out[key] = torch.zeros(len(patch_list) * b, s, n_cols, dtype=torch.bool)
            colmask = torch.zeros(n_cols, dtype=torch.bool)
            colmask[cols if comp.per_head else [0]] = True
            out[key][v * b : (v + 1) * b] |= pos[:, :, None] & colmask[None, None]
    return out


def _edits_from(captured: dict, masks: dict, n_variants: int) -> dict:
    """Edits that write the captured fine-tuned activations where the masks say."""
    edits = {}
    for key, mask in masks.items():
        src = captured[key]

        def fn(act: Tensor, src=src, mask=mask) -> Tensor:
            m = mask.to(act.device)
            full = src.repeat(n_variants, *([1] * (src.dim() - 1))).to(act.device, act.dtype)
            # z/q/k/v are [b,s,heads,dh]; attn_out/mlp_out [b,s,d] with one "column".
            m = m[..., None] if act.dim() == 4 else m[..., 0:1]
            return torch.where(m, full, act)

        edits[key] = fn
    return edits


def cmap_logits(
    base: Any,
    finetuned: Any,
    tokens: Tensor,
    patches: dict[tuple[int, str], Tensor],
    *,
    at: Tensor | None = None,
) -> Tensor:
    """The base model's logits with the fine-tuned model's activations written in.

    ``patches[(layer, site)]`` is a bool mask [b, s, columns] (columns: heads for z/q, key/value
    heads for k/v, 1 for attn_out/mlp_out) of where the fine-tuned activation replaces the base's.
    """
    nnsight_backend.check("cmap_logits", base, finetuned)
    base, finetuned = _bridge(base, "base"), _bridge(finetuned, "finetuned")
    check_compatible(base, finetuned)
    captured = run_with_edits(finetuned, tokens, capture=list(patches)).captured
    return run_with_edits(base, tokens, _edits_from(captured, patches, 1), at=at).logits


# ---------------------------------------------------------------------- cmap


def _checked_pair(where: str, base: Any, finetuned: Any, task: Task) -> tuple[Any, Any, bool]:
    """(base, finetuned, served): both nnsight-served and alike by their configs, or both
    bridges (adapters resolved) of one architecture and tokenizer; ``task`` checked too."""
    if nnsight_backend.is_nnsight(base) or nnsight_backend.is_nnsight(finetuned):
        from circuit_widgets.core import nnsight_experiments

        nnsight_experiments.check_pair(where, base, finetuned)
        check_args(where, task=task)
        return base, finetuned, True
    check_args(where, base=base, finetuned=finetuned, task=task)
    base, finetuned = _bridge(base, "base"), _bridge(finetuned, "finetuned")
    check_compatible(base, finetuned)
    return base, finetuned, False


def _check_served_components(comps: list[Component]) -> None:
    """nnsight patches z, q, k and v only (see nnsight_experiments.check_components)."""
    from circuit_widgets.core import nnsight_experiments

    nnsight_experiments.check_components(comps)


def variant_masks(spec: CMAPGroupsSpec, task: Task) -> dict[tuple[int, str], Tensor]:
    """The masks of a batch's base forward (``_cell_masks``), ``spec.blocks`` row blocks: the
    unpatched base (block 0), each group, then with ``spec.union`` every group's cells."""
    singles = list(spec.patches)
    masks = _cell_masks([_Patch("base", {}, None, [])] + singles, task, slice(None), spec.shape)
    b = len(task)
    if spec.union:  # "circuit" = the union of every group's cells
        for key, m in list(masks.items()):
            union = m.view(len(singles) + 1, b, *m.shape[1:]).any(0)
            masks[key] = torch.cat([m, union])
    return masks


def group_values(
    metric: Tensor, accuracy: Tensor, ft_metric: Tensor, ft_accuracy: Tensor
) -> Tensor:
    """A cmap job's values [2 K, b] from the base forward's row blocks ([n_var, b]: the base,
    then each variant) and the fine-tuned run ([b]): the metric, then the accuracy, each of
    K = n_var + 1 columns: every variant, the base, the fine-tuned model."""
    row = lambda x, ft: torch.cat([x[1:], x[:1], ft.float().cpu()[None]])
    return torch.cat(
        [row(metric.float().cpu(), ft_metric), row(accuracy.float().cpu(), ft_accuracy)]
    )


def group_job(values: Callable[[], Tensor], n_var: int) -> ChunkWork:
    """A chunk's one job over the grid (2, K) of ``group_values``, computed once: metrics()
    reads the base and fine-tuned metric columns off it, so the job is prepaid."""
    k = n_var + 1

    def first() -> tuple[tuple[Tensor, Tensor], Tensor]:
        v = values()
        return (v[k - 2], v[k - 1]), v

    return prepaid_work([(([0] * k + [1] * k,), list(range(k)) * 2)], first)


def cmap(
    base: Any,
    finetuned: Any,
    task: Task,
    *,
    circuit: Circuit | None = None,
    heads: Sequence[Any] | str | None = None,
    component: str | Component | Sequence[str | Component] = "z",
    positions: str | dict | None = None,
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> CMAPResult:
    """Patch the fine-tuned model's ``component`` into the base model at a circuit's heads.

    circuit: each group patched alone at its own position (``positions`` may override: a name,
    'all', or {group: position}), then all groups together ("circuit"). Its heads are query
    heads; for k/v each maps to its key/value head (shared with its group, see notes).
    heads: one group at ``positions`` (a name or 'all', the default); columns as in the
    grids (key/value heads for k/v, layer numbers for attn_out/mlp_out), or 'all'. A list
    needs components of one column kind (z/q, k/v, or attn_out/mlp_out); mixing kinds is an
    error, since (1, 1) would be query head 1 for z but key/value head 1 for v.
    component: z, q, k, v (per head), attn_out, mlp_out (per layer), or a list of them.
    batch_size: examples per batch (default: as many as the backend's row budget holds with
    every variant). Each batch is a job of the common sweep: two forwards (nnsight: two
    requests), progress once per batch; stopping, between batches, keeps the finished examples
    (complete=False); a failed nnsight request's RemoteError carries them as ``partial``.
    """
    base, finetuned, served = _checked_pair("cmap", base, finetuned, task)
    check_callbacks(on_progress, should_stop, batch_size)
    comps = _components(component)
    if served:
        _check_served_components(comps)
    shape = model_shape(base)
    patches, notes = _plan(base, task, circuit, heads, comps, positions, shape)
    union = len(patches) > 1  # _plan's last: the whole circuit, every group's own cells at once
    spec = CMAPGroupsSpec(patches[:-1] if union else patches, union, shape)
    b_back, f_back = pair_backends(base, finetuned)
    n, G = len(task), len(patches)
    size = batch_size or max(1, b_back.row_budget(task) // (G + 1))
    rows = [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def result(out: SweepOut, extra: list[str] | None = None) -> CMAPResult:
        k = len(out.metric_a)
        vals = torch.full((n, 2, G + 2), math.nan)
        vals[:k] = out.per_example
        done = ~vals[:, 1, G].isnan()  # the base's accuracy: set for every example run
        if not out.complete:
            extra = [f"stopped after {int(done.sum())} of {n} examples", *(extra or [])]
        note = b_back.note("cmap")  # after the sweep: it counts requests
        return cmap_result(
            patches, comps, shape, task,
            (vals[:, 0, G], vals[:, 0, G + 1], vals[:, 0, :G].T),
            (vals[:, 1, G], vals[:, 1, G + 1], vals[:, 1, :G].T),
            done, out.complete, ([note] if note else []) + notes + (extra or []),
        )  # fmt: skip

    prepare = lambda chunk: b_back.cmap_groups_work(spec, chunk, f_back)
    on_error = lambda out, err: result(out, [str(err)])
    out = run_sweep(task, rows, prepare, (2, G + 2), on_progress, should_stop, None, on_error)
    return result(out)


def cmap_result(
    patches: Sequence[_Patch],
    comps: list[Component],
    shape: ModelShape,
    task: Task,
    metrics: tuple[Tensor, Tensor, Tensor],
    accuracies: tuple[Tensor, Tensor, Tensor],
    done: Tensor,
    complete: bool,
    notes: list[str],
) -> CMAPResult:
    """``cmap``'s result from its per-example (base, fine-tuned, patched) metrics and
    accuracies, whatever ran them."""
    kvg = hooks.kv_groups(shape) if any(c.per_kv_head for c in comps) else None
    return CMAPResult(
        groups=[p.name for p in patches],
        heads={p.name: p.heads for p in patches},
        positions={p.name: p.position for p in patches},
        base_metric=metrics[0],
        finetuned_metric=metrics[1],
        patched_metric=metrics[2],
        base_accuracy=accuracies[0],
        finetuned_accuracy=accuracies[1],
        patched_accuracy=accuracies[2],
        done=done,
        complete=complete,
        components=[c.value for c in comps],
        metric_name=task.metric_name,
        kv_groups=kvg,
        notes=notes,
    )


# ---------------------------------------------------------------------- cmap_grid


def cmap_grid(
    base: Any,
    finetuned: Any,
    task: Task,
    *,
    component: str | Component = "z",
    position: str = "END",
    batch_size: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
    on_partial: Callable[[HeadGrid], None] | None = None,
) -> HeadGrid:
    """Every head (or layer, for attn_out/mlp_out) patched alone from the fine-tuned model.

    values = mean(patched - base metric); normalized = values / mean(finetuned - base), so 1
    means "this head alone carries the fine-tuned model's whole gain". Where both models run on
    the fast engine, each model's run is captured once (per chunk of examples) and each patched
    run resumes at the patched layer and position, several heads per pass: activation
    patching's engine with the source taken from the other model. Elsewhere, bridge forwards
    with every head of a chunk stacked as variants. batch_size = rows (heads x examples) per
    pass. max_memory: budget for the cached runs (chunks of examples; see activation_patch).
    on_partial(grid) receives the partial grid after each pass of the first chunk and after
    each later chunk (a widget draws it).
    """
    # nnsight: requests are sized by rows, not max_memory
    base, finetuned, served = _checked_pair("cmap_grid", base, finetuned, task)
    check_callbacks(on_progress, should_stop, batch_size)
    if not served:
        parse_memory(max_memory)
    comps = _components(component)
    if len(comps) != 1:
        raise ValueError("cmap_grid takes one component; use cmap for several at once")
    if served:
        _check_served_components(comps)
    comp = comps[0]
    if not isinstance(position, str):
        raise TypeError(f"position must be a task position name or 'all', got {position!r}")
    pos = _check_position(task, position)
    return grid_sweep(
        base,
        finetuned,
        task,
        comp,
        position,
        pos,
        batch_size,
        max_memory,
        on_progress,
        should_stop,
        on_partial,
    )


def grid_sweep(
    base: Any,
    finetuned: Any,
    task: Task,
    comp: Component,
    position: str,
    pos: str | None,
    batch_size: int | None,
    max_memory: int | str | None,
    on_progress: Progress,
    should_stop: Stop,
    on_partial: Callable[[HeadGrid], None] | None,
) -> HeadGrid:
    """cmap_grid once its arguments are checked: the base model's backend runs the cells with
    the fine-tuned model's (same kind) as source, through the common job loop. A failed
    request's RemoteError carries the grid so far as ``partial``."""
    shape = model_shape(base)
    b_back, f_back = pair_backends(base, finetuned)
    n_cols = hooks.n_columns(comp, shape)
    L = shape.n_layers
    posmask = _position_mask(task, pos, slice(None))
    spec = CMAPSpec(comp, L, n_cols, posmask, pos, batch_size)
    rows = b_back.chunk_rows(task, max_memory)

    def grid(out: SweepOut, extra: list[str] | None = None) -> HeadGrid:
        note = b_back.note("cmap_grid")  # after the sweep: it may count requests
        return _cmap_headgrid(
            out.per_example,
            out.done,
            out.metric_a,
            out.metric_b,
            task,
            comp,
            position,
            shape,
            out.complete,
            chunk_notes(out, rows) + ([note] if note else []) + (extra or []),
        )

    partial = None if on_partial is None else (lambda out: on_partial(grid(out)))
    prepare = lambda chunk: b_back.cmap_work(spec, chunk, f_back)
    on_error = lambda out, err: grid(out, [str(err)])
    out = run_sweep(task, rows, prepare, (L, n_cols), on_progress, should_stop, partial, on_error)
    return grid(out)


def _cmap_headgrid(
    per_example: Tensor,
    done: Tensor,
    base_m: Tensor,
    ft_m: Tensor,
    task: Task,
    comp: Component,
    position: str,
    shape: ModelShape,
    complete: bool,
    extra: list[str] | None = None,
) -> HeadGrid:
    notes = [
        f"cross-model patching: the fine-tuned model's {comp.value} at {position} written into the "
        "base model, one "
        + ("head" if comp.per_head else "layer")
        + " at a time; values = patched - base "
        "metric, normalized by (fine-tuned - base)",
        f"base {task.metric_name} {float(base_m.nanmean()):.4g}, fine-tuned {float(ft_m.nanmean()):.4g}",
        *(extra or []),
    ]
    return build_grid(
        per_example,
        done,
        base_m,
        ft_m,
        shape=shape,
        component=comp,
        direction="denoise",
        kind="cmap",
        metric_name=task.metric_name,
        positions=None,
        position=position,
        complete=complete,
        notes=notes,
    )
