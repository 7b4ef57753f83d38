"""DCM, desiderata-based component masking (Davies et al. 2023, as Prakash et al. 2024 use it).

One mask value m in [0, 1] per head; at the group's position each head outputs
``m * z_base + (1 - m) * z_source`` (z: per query head, before W_O). The mask is trained with
Adam on ``-mean(target logit) + lam * sum(1 - m)``, clamped to [0, 1] after each step; the
best rounded mask on the validation split is kept. Heads whose rounded mask is 0 are selected:
swapping in their source output alone moves the prediction to the desideratum's target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuit_widgets.core import cache, nnsight_backend
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    Progress,
    Stop,
    check_callbacks,
    check_head,
    free_memory,
    parse_memory,
)
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.forward import (
    Trace,
    gather_window,
    run_window,
    trace_forward,
    window_positions,
)
from circuit_widgets.models import model_shape
from circuit_widgets.tasks.desiderata import Desideratum
from circuit_widgets.types import Circuit, Head, ModelLike, ModelShape

DEFAULT_LAMS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
# Base prompts' cached keys/values (what lets each step recompute only position..END).
KV_BUDGET_BYTES = 3 * 1024**3


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class TrainingCurve:
    """Per optimiser step: loss, mean target logit, soft size sum(1 - m) and heads selected;
    per validation check (``val_step``): accuracy and loss of the rounded mask."""

    step: Int[Tensor, " steps"]
    epoch: Int[Tensor, " steps"]
    loss: Float[Tensor, " steps"]
    target_logit: Float[Tensor, " steps"]
    mask_size: Float[Tensor, " steps"]
    n_selected: Int[Tensor, " steps"]
    val_step: Int[Tensor, " checks"]
    val_accuracy: Float[Tensor, " checks"]
    val_loss: Float[Tensor, " checks"]

    def __len__(self) -> int:
        return len(self.step)

    def to_dataframe(self):
        """One row per step; val_accuracy / val_loss are NaN at steps without a check."""
        import pandas as pd

        val = {
            int(s): (float(a), float(l))
            for s, a, l in zip(self.val_step, self.val_accuracy, self.val_loss)
        }
        return pd.DataFrame(
            [
                {
                    "step": int(s),
                    "epoch": int(e),
                    "loss": float(lo),
                    "target_logit": float(t),
                    "mask_size": float(ms),
                    "n_selected": int(n),
                    "val_accuracy": val.get(int(s), (math.nan, math.nan))[0],
                    "val_loss": val.get(int(s), (math.nan, math.nan))[1],
                }
                for s, e, lo, t, ms, n in zip(
                    self.step,
                    self.epoch,
                    self.loss,
                    self.target_logit,
                    self.mask_size,
                    self.n_selected,
                )
            ]
        )


@dataclass(frozen=True, eq=False)
class MaskResult:
    """A learned DCM mask over heads and how well its rounded form produces the target.

    ``mask`` is the continuous mask at the kept (best-validation) step and ``final_mask`` at
    the last step, both [n_layers, n_heads] and NaN at heads not trained. ``selected`` lists
    the heads whose rounded mask is 0. Accuracies are argmax over the full vocabulary ==
    target at the base prompt's END, under the rounded mask; ``baseline_accuracy`` (mask all
    ones: no patch) and ``full_patch_accuracy`` (mask all zeros: every trained head patched)
    are on the test split, for reading the others honestly. A run stopped early has
    ``complete=False`` and NaN for what it did not measure.
    """

    mask: Float[Tensor, "layer head"]
    final_mask: Float[Tensor, "layer head"]
    heads: list[Head]
    selected: list[Head]
    position: str
    desideratum: str
    lam: float
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    baseline_accuracy: float
    full_patch_accuracy: float
    curve: TrainingCurve
    best_step: int
    n_examples: tuple[int, ...]  # train, val, test
    complete: bool
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def rounded(self) -> Float[Tensor, "layer head"]:
        """1 = keeps its base output, 0 = selected (takes the source output), NaN = not trained."""
        return torch.where(self.mask.isnan(), self.mask, (self.mask >= 0.5).float())

    def circuit(self, group: str = "dcm", name: str = "") -> Circuit:
        """The selected heads as a one-group Circuit acting at this result's position."""
        return Circuit.from_heads(
            self.selected, position=self.position, name=name or self.desideratum, group=group
        )

    def to_dataframe(self):
        """One row per trained head: layer, head, mask, final_mask, selected."""
        import pandas as pd

        chosen = set(self.selected)
        return pd.DataFrame(
            [
                {
                    "layer": h.layer,
                    "head": h.head,
                    "mask": float(self.mask[h.layer, h.head]),
                    "final_mask": float(self.final_mask[h.layer, h.head]),
                    "selected": h in chosen,
                }
                for h in self.heads
            ]
        )

    def __repr__(self) -> str:
        state = "complete" if self.complete else "stopped early"
        heads = ", ".join(str(h) for h in self.selected[:12])
        more = f", ... (+{self.n_selected - 12})" if self.n_selected > 12 else ""
        return (
            f"MaskResult({self.desideratum}@{self.position}, lam={self.lam:g}: "
            f"{self.n_selected}/{len(self.heads)} heads [{heads}{more}]; accuracy "
            f"train {self.train_accuracy:.2f} val {self.val_accuracy:.2f} test "
            f"{self.test_accuracy:.2f} (no patch {self.baseline_accuracy:.2f}, all patched "
            f"{self.full_patch_accuracy:.2f}); {state})"
        )


@dataclass(frozen=True, eq=False)
class SweepResult:
    """One MaskResult per lambda (those finished, in order; ``complete`` is False if stopped)."""

    lams: list[float]
    results: list[MaskResult]
    baseline_accuracy: float
    full_patch_accuracy: float
    complete: bool

    @property
    def selected(self) -> list[list[Head]]:
        return [r.selected for r in self.results]

    @property
    def n_selected(self) -> Int[Tensor, " lams"]:
        return torch.tensor([r.n_selected for r in self.results], dtype=torch.long)

    @property
    def val_accuracy(self) -> Float[Tensor, " lams"]:
        return torch.tensor([r.val_accuracy for r in self.results])

    @property
    def test_accuracy(self) -> Float[Tensor, " lams"]:
        return torch.tensor([r.test_accuracy for r in self.results])

    def at(self, lam: float) -> MaskResult:
        """The finished result whose lambda is nearest to ``lam`` (on a log scale)."""
        if not self.results:
            raise ValueError("the sweep was stopped before any lambda finished")
        key = lambda r: abs(math.log10(max(r.lam, 1e-12)) - math.log10(max(lam, 1e-12)))
        return min(self.results, key=key)

    def to_dataframe(self):
        """One row per finished lambda: n_selected, selected heads, train/val/test accuracy."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "lam": r.lam,
                    "n_selected": r.n_selected,
                    "selected": " ".join(str(h) for h in r.selected),
                    "train_accuracy": r.train_accuracy,
                    "val_accuracy": r.val_accuracy,
                    "test_accuracy": r.test_accuracy,
                    "complete": r.complete,
                }
                for r in self.results
            ]
        )

    def __repr__(self) -> str:
        rows = "; ".join(
            f"lam={r.lam:g}: {r.n_selected} heads, test {r.test_accuracy:.2f}" for r in self.results
        )
        state = "complete" if self.complete else f"stopped ({len(self.results)}/{len(self.lams)})"
        return f"SweepResult({rows}; {state})"


# ---------------------------------------------------------------------- public functions


def dcm(
    model: ModelLike,
    desideratum: Desideratum | Sequence[Desideratum],
    *,
    heads: Sequence[Head | str | tuple[int, int]] | None = None,
    position: str = "END",
    lam: float = 0.01,
    lr: float = 0.1,
    epochs: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    eval_every: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
    max_memory: int | str | None = None,
) -> MaskResult:
    """Learn which ``heads`` carry ``desideratum``'s property at ``position``.

    desideratum: a Desideratum (split into train/val/test by ``split`` with ``seed``) or an
    already split (train, val, test) triple. heads: Head / "l.h" / (l, h) items, None = every
    head. position: a position name both base and source prompts have ('END', 'query_label',
    ...), read per example. Each step takes ``batch_size`` training examples (shuffled by
    ``seed``); the rounded mask is checked on the validation split every ``eval_every`` steps
    (default: once per epoch) and at the last step, and the best check is kept (ties: lower
    validation loss). The model's weights are never changed. on_progress(done, total) and
    should_stop() are called between batches; a stopped run returns ``complete=False``.
    max_memory (bytes or '2GB'): what the base prompts' cached keys/values may take; over it,
    each step runs a full forward instead (same results, no cache). None = 3 GB or half the
    free memory, whichever is less. On an nnsight model the mask trains server-side in 2
    requests (core/nnsight_masking.py); progress and stopping then act between requests.
    """
    check_args("dcm", model=model, desideratum=desideratum)
    _check_numbers(lam=lam, lr=lr, epochs=epochs, seed=seed, eval_every=eval_every)
    check_callbacks(on_progress, should_stop, batch_size)
    plan = _Plan.build(model, desideratum, heads, position, split, seed, batch_size, max_memory)
    if nnsight_backend.is_nnsight(model):  # the mask trains server-side: 2 requests
        run = nnsight_backend.dispatch(model, "dcm")
        return run(model, plan, lam, (epochs, lr, seed, eval_every), on_progress, should_stop)
    ticker = _Ticker(
        on_progress,
        should_stop,
        plan.prep_units() + plan.run_units(epochs, eval_every) + plan.reference_units(),
    )
    with _frozen(model):
        if not plan.prepare(ticker):
            return plan.unfinished(lam, epochs, lr, seed, eval_every)
        result = plan.train(lam, lr, epochs, seed, eval_every, ticker)
        base, full = plan.reference_accuracies(ticker)
    return replace(
        result,
        baseline_accuracy=base,
        full_patch_accuracy=full,
        complete=result.complete and not ticker.stopped,
    )


def dcm_sweep(
    model: ModelLike,
    desideratum: Desideratum | Sequence[Desideratum],
    *,
    heads: Sequence[Head | str | tuple[int, int]] | None = None,
    position: str = "END",
    lams: Sequence[float] = DEFAULT_LAMS,
    on_progress: Progress = None,
    should_stop: Stop = None,
    lr: float = 0.1,
    epochs: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    eval_every: int | None = None,
    max_memory: int | str | None = None,
    on_result: Callable[[MaskResult], None] | None = None,
    lam: None = None,
) -> SweepResult:
    """``dcm`` once per lambda in ``lams`` on the same split and source activations (computed
    once), for a lambda slider. ``lr``, ``epochs``, ``batch_size``, ``seed``, ``split`` and
    ``eval_every`` and ``max_memory`` are ``dcm``'s (same defaults). Progress and stopping cover the whole sweep; a stopped sweep keeps the
    lambdas it finished (and the one it was in, flagged incomplete). The baseline and
    full-patch test accuracies are measured before training, so ``on_result`` receives each
    lambda's finished result, reference accuracies included, as soon as it is trained. On an
    nnsight model: 1 + len(lams) requests, progress and stopping per request (per lambda)."""
    check_args("dcm_sweep", model=model, desideratum=desideratum)
    if lam is not None:  # dcm's own argument, the likeliest slip here
        raise TypeError(
            "dcm_sweep got unexpected keyword argument(s) ['lam'] (the sweep's lambdas go in "
            "lams=[...])"
        )
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Sequence) or len(lams) == 0:
        raise ValueError(f"lams must be a non-empty list of numbers >= 0, got {lams!r}")
    lams = [float(_number("lams item", x, low=0.0)) for x in lams]
    _check_numbers(lam=0.0, lr=lr, epochs=epochs, seed=seed, eval_every=eval_every)
    check_callbacks(on_progress, should_stop, batch_size)
    plan = _Plan.build(model, desideratum, heads, position, split, seed, batch_size, max_memory)
    if on_result is not None and not callable(on_result):
        raise TypeError(f"on_result must be a callable taking a MaskResult, got {on_result!r}")
    if nnsight_backend.is_nnsight(model):  # 1 + len(lams) requests
        run = nnsight_backend.dispatch(model, "dcm_sweep")
        settings = (epochs, lr, seed, eval_every)
        return run(model, plan, lams, settings, on_progress, should_stop, on_result)
    per_run = plan.run_units(epochs, eval_every)
    ticker = _Ticker(
        on_progress, should_stop, plan.prep_units() + len(lams) * per_run + plan.reference_units()
    )
    results: list[MaskResult] = []
    base = full = math.nan
    with _frozen(model):
        if plan.prepare(ticker):
            base, full = plan.reference_accuracies(ticker)
            for each in lams:
                if ticker.stopped or ticker.stop_requested():
                    break
                r = plan.train(each, lr, epochs, seed, eval_every, ticker)
                results.append(replace(r, baseline_accuracy=base, full_patch_accuracy=full))
                if on_result is not None:
                    on_result(results[-1])
    complete = len(results) == len(lams) and all(r.complete for r in results) and not ticker.stopped
    return SweepResult(lams, results, base, full, complete)


# ---------------------------------------------------------------------- internals


class _Ticker:
    """Counts finished batches for on_progress and remembers a stop request."""

    def __init__(self, on_progress: Progress, should_stop: Stop, total: int) -> None:
        self.on_progress, self.should_stop = on_progress, should_stop
        self.done, self.total, self.stopped = 0, total, False

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.on_progress is not None:
            self.on_progress(min(self.done, self.total), self.total)

    def stop_requested(self) -> bool:
        """Asked between batches; once True it stays True."""
        if not self.stopped and self.should_stop is not None and self.should_stop():
            self.stopped = True
        return self.stopped


class _frozen:
    """Model weights need no gradient while the mask trains; restored afterwards. Every
    in-place write to a parameter bumps its ``_version``, so exiting checks none was written."""

    def __init__(self, model: ModelLike) -> None:
        self.named = list(model.named_parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for _, p in self.named]
        self.versions = [p._version for _, p in self.named]
        for _, p in self.named:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for (_, p), flag in zip(self.named, self.flags):
            p.requires_grad_(flag)
        changed = [name for (name, p), v in zip(self.named, self.versions) if p._version != v]
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise RuntimeError(
                f"the model's weights were changed in place during DCM ({', '.join(changed[:5])}"
                f"{more}); DCM trains only its mask, so its results no longer describe this "
                f"model: reload it, and do not edit weights from on_progress or another thread"
            )


def _number(label: str, value: Any, *, low: float, strict: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
        or (strict and value == low)
    ):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{label} must be a finite number {bound}, got {value!r}")
    return float(value)


def _int(label: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    return value


def _check_numbers(*, lam: Any, lr: Any, epochs: Any, seed: Any, eval_every: Any) -> None:
    _number("lam", lam, low=0.0)
    _number("lr", lr, low=0.0, strict=True)
    _int("epochs", epochs, 1)
    _int("seed", seed, 0)
    if eval_every is not None:
        _int("eval_every", eval_every, 1)


def _check_heads(heads: Sequence[Any] | None, shape: ModelShape) -> list[Head]:
    if heads is None:
        return [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    if isinstance(heads, (str, Head)) or not isinstance(heads, (Sequence, set, frozenset)):
        raise TypeError(
            f"heads must be a list of Head / 'l.h' / (l, h) items or None, got {heads!r}"
        )
    out = sorted({Head.parse(h) for h in heads})
    if not out:
        raise ValueError("heads is empty; give at least one head (or None for every head)")
    for h in out:
        check_head(h, shape)
    return out


def _check_parts(desideratum: Any, split: Sequence[float], seed: int) -> tuple[Desideratum, ...]:
    if isinstance(desideratum, Desideratum):
        return desideratum.split(tuple(split), seed=seed)
    if (
        isinstance(desideratum, (tuple, list))
        and len(desideratum) == 3
        and all(isinstance(d, Desideratum) for d in desideratum)
    ):
        return tuple(desideratum)
    raise TypeError(
        f"desideratum must be a Desideratum (see tasks.desiderata or "
        f"Desideratum.from_examples) or a (train, val, test) triple of them, got "
        f"{type(desideratum).__name__}"
    )


def _check_structure(parts: tuple[Desideratum, ...], position: str, shape: ModelShape) -> None:
    """Base and source must pair up example by example and name the same positions."""
    for label, d in zip(("train", "validation", "test"), parts):
        what = f"desideratum {d.name!r} ({label} part)"
        nb, ns = d.base_tokens.shape[0], d.source_tokens.shape[0]
        if nb != ns or d.targets.shape[:1] != (nb,):
            raise ValueError(
                f"{what}: base and source differ in structure: {nb} base prompts, "
                f"{ns} source prompts, {d.targets.shape[0]} targets"
            )
        if set(d.base_positions) != set(d.source_positions):
            raise ValueError(
                f"{what}: base and source differ in structure: base positions "
                f"{sorted(d.base_positions)}, source positions {sorted(d.source_positions)}"
            )
        if position not in d.base_positions:
            raise ValueError(
                f"{what} has no position {position!r}; valid positions are "
                f"{sorted(d.base_positions)}"
            )
        for side, pos in (("base", d.base_positions), ("source", d.source_positions)):
            if tuple(pos[position].shape) != (nb,):
                raise ValueError(
                    f"{what}: {side} position {position!r} must hold one index per "
                    f"example ({nb}), got shape {tuple(pos[position].shape)}"
                )
        if d.targets.dim() != 1:
            raise ValueError(
                f"{what}: DCM scores one target token per example, but targets has shape "
                f"{tuple(d.targets.shape)} (a multi-token target?); give single-token targets"
            )
        bad = (d.targets < 0) | (d.targets >= shape.d_vocab)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{what}: target {int(d.targets[i])} of example {i} is not a token "
                f"id of this model (0..{shape.d_vocab - 1})"
            )
        if nb == 0:
            raise ValueError(f"{what} is empty")


@dataclass
class _Part:
    d: Desideratum
    src: dict[int, Tensor] = field(default_factory=dict)  # layer -> source z [n, k_l, dh]
    kv: tuple[list[Tensor], list[Tensor]] | None = None  # base k_rot, v per layer [n, s, K, dh]


class _Plan:
    """The split, the trained heads and the source z at the position: shared by a sweep."""

    def __init__(
        self,
        model: ModelLike,
        parts: tuple[Desideratum, ...],
        heads: list[Head],
        position: str,
        batch_size: int,
        shape: ModelShape,
        max_memory: int | str | None = None,
    ) -> None:
        self.model, self.heads, self.position, self.bs, self.shape = (
            model,
            heads,
            position,
            batch_size,
            shape,
        )
        self.device = torch.device(getattr(model.cfg, "device", None) or "cpu")
        given = parse_memory(max_memory)
        self.kv_budget = (
            given if given is not None else min(KV_BUDGET_BYTES, free_memory(self.device) // 2)
        )
        self.parts = [_Part(d.to(self.device)) for d in parts]
        self.name = parts[0].name
        self.eng = self._window_engine()
        self.layers = sorted({h.layer for h in heads})
        # per layer: query-head indices and their slots in the flat mask vector
        self.cols = {
            l: torch.tensor([h.head for h in heads if h.layer == l], device=self.device)
            for l in self.layers
        }
        self.slots = {
            l: torch.tensor([i for i, h in enumerate(heads) if h.layer == l], device=self.device)
            for l in self.layers
        }

    @classmethod
    def build(
        cls,
        model: ModelLike,
        desideratum: Any,
        heads: Any,
        position: Any,
        split: Sequence[float],
        seed: int,
        batch_size: int,
        max_memory: int | str | None = None,
    ) -> _Plan:
        shape = model_shape(model)
        if not isinstance(position, str):
            raise TypeError(f"position must be a position name such as 'END', got {position!r}")
        chosen = _check_heads(heads, shape)
        parts = _check_parts(desideratum, split, seed)
        _check_structure(parts, position, shape)
        parse_memory(max_memory)
        return cls(model, parts, chosen, position, batch_size, shape, max_memory)

    # ---- work units (batches) for progress

    def _batches(self, n: int) -> int:
        return max(1, math.ceil(n / self.bs))

    def steps_per_epoch(self) -> int:
        return self._batches(len(self.parts[0].d))

    def eval_steps(self, epochs: int, eval_every: int | None) -> list[int]:
        total, k = epochs * self.steps_per_epoch(), eval_every or self.steps_per_epoch()
        return sorted({s for s in range(k, total + 1, k)} | {total})

    def prep_units(self) -> int:
        per_pass = sum(self._batches(len(p.d)) for p in self.parts)
        return per_pass * (2 if self.eng is not None else 1)  # source z, then base keys/values

    def run_units(self, epochs: int, eval_every: int | None) -> int:
        train, val, test = (self._batches(len(p.d)) for p in self.parts)
        return epochs * train + len(self.eval_steps(epochs, eval_every)) * val + train + test

    def reference_units(self) -> int:
        return 2 * self._batches(len(self.parts[2].d))

    # ---- source activations

    def prepare(self, ticker: _Ticker) -> bool:
        """Source z at the position, per trained head: one no-grad run per batch. False if stopped."""
        capture = [(l, "z") for l in self.layers]
        for part in self.parts:
            d = part.d
            chunks: dict[int, list[Tensor]] = {l: [] for l in self.layers}
            for rows in self._ranges(len(d)):
                if ticker.stop_requested():
                    return False
                sub = d.subset(rows)
                pos = sub.source_positions[self.position]
                run = run_with_edits(
                    self.model, sub.source_tokens, capture=capture, at=sub.source_positions["END"]
                )
                ar = torch.arange(len(sub), device=pos.device)
                for l in self.layers:
                    z = run.captured[(l, "z")]
                    chunks[l].append(z[ar[:, None], pos[:, None], self.cols[l][None]].detach())
                ticker.tick()
            part.src = {l: torch.cat(c) for l, c in chunks.items()}
        return self._prepare_windows(ticker)

    def _window_engine(self) -> Any:
        """The fast engine, when it runs this model, the position never comes after END and the
        base prompts' keys/values fit the budget: every step then recomputes only the positions
        from the mixed one to END (earlier ones cannot change). Else None: full forwards."""
        eng = cache.engine_for(self.model)
        if eng is None:
            return None
        need = (
            sum(p.d.base_tokens.numel() for p in self.parts)
            * eng.n_layers
            * 2
            * eng.n_kv
            * eng.d_head
        )
        late = any(
            bool((p.d.base_positions[self.position] > p.d.base_positions["END"]).any())
            for p in self.parts
        )
        return None if late or need * eng.dtype.itemsize > self.kv_budget else eng

    def _prepare_windows(self, ticker: _Ticker) -> bool:
        """Cache the base prompts' keys/values for windowed steps. False if stopped."""
        eng = self.eng
        if eng is None:
            return True
        for part in self.parts:
            ks: list[list[Tensor]] = [[] for _ in range(eng.n_layers)]
            vs: list[list[Tensor]] = [[] for _ in range(eng.n_layers)]
            for rows in self._ranges(len(part.d)):
                if ticker.stop_requested():
                    return False
                with torch.no_grad():
                    tr = trace_forward(eng, part.d.base_tokens[rows.to(self.device)])
                for l in range(eng.n_layers):
                    ks[l].append(tr.k_rot[l])
                    vs[l].append(tr.v[l])
                ticker.tick()
            part.kv = ([torch.cat(k) for k in ks], [torch.cat(v) for v in vs])
        return True

    def _ranges(self, n: int) -> list[Tensor]:
        return [torch.arange(a, min(a + self.bs, n)) for a in range(0, n, self.bs)]

    # ---- the masked forward

    def _edits(self, mask: Tensor, part: _Part, rows: Tensor, sub: Desideratum) -> dict:
        pos = sub.base_positions[self.position]
        ar = torch.arange(len(rows), device=pos.device)
        rows = rows.to(self.device)

        def edit_for(layer: int) -> Callable[[Tensor], Tensor]:
            cols, src = self.cols[layer], part.src[layer][rows]
            m = mask[self.slots[layer]]

            def fn(z: Tensor) -> Tensor:
                idx = (ar[:, None], pos[:, None], cols[None])
                mz = m.to(z.dtype)[None, :, None]
                return z.index_put(idx, mz * z[idx] + (1 - mz) * src.to(z.dtype))

            return fn

        return {(l, "z"): edit_for(l) for l in self.layers}

    def _target_logits(self, mask: Tensor | None, part: _Part, rows: Tensor, grad: bool):
        """(target logits [b], whole-vocab argmax == target [b]) of the base prompts ``rows``."""
        sub = part.d.subset(rows)
        if self.eng is not None and part.kv is not None:
            logits = self._window_logits(mask, part, part.kv, rows, sub, grad)
            ar = torch.arange(len(sub), device=logits.device)
            target = sub.targets.to(logits.device)
            return logits[ar, target].float(), logits.argmax(-1) == target
        edits = None if mask is None else self._edits(mask, part, rows, sub)
        logits = run_with_edits(
            self.model, sub.base_tokens, edits, at=sub.base_positions["END"], grad=grad
        ).logits
        ar = torch.arange(len(sub), device=logits.device)
        target = sub.targets.to(logits.device)
        return logits[ar, target].float(), logits.argmax(-1) == target

    def _window_logits(
        self,
        mask: Tensor | None,
        part: _Part,
        kv: tuple[list[Tensor], list[Tensor]],
        rows: Tensor,
        sub: Desideratum,
        grad: bool,
    ) -> Tensor:
        """Final logits at END [b, vocab], recomputing only positions from the mixed one on."""
        eng, dev = self.eng, self.device
        idx = rows.to(dev)
        starts = sub.base_positions[self.position].to(dev)
        end = sub.base_positions["END"].to(dev) - starts  # END in window coordinates
        w = int(end.max()) + 1
        tokens = part.d.base_tokens.to(dev)[
            idx
        ]  # the cached keys' width (a subset may trim padding)
        base = Trace(tokens, [], [], [], [], [], [k[idx] for k in kv[0]], [v[idx] for v in kv[1]])
        edits = {}
        if mask is not None:
            ar = torch.arange(len(rows), device=dev)
            at_end = (end == 0)[:, None, None]

            def edit_for(layer: int) -> Callable[[Tensor], Tensor]:
                cols, src = self.cols[layer], part.src[layer][idx]
                m = mask[self.slots[layer]]

                def fn(z: Tensor) -> Tensor:  # [1, b, wq, H, dh]; the mixed position is row 0
                    mz = m.to(z.dtype)[None, :, None]
                    old = z[0, ar[:, None], 0, cols[None]]
                    new = mz * old + (1 - mz) * src.to(z.dtype)
                    if z.shape[2] == 1:  # only END computed: mixed only where END is the position
                        new = torch.where(at_end, new, old)
                    zero = torch.zeros_like(ar)[:, None]
                    return z.index_put((zero, ar[:, None], zero, cols[None]), new)

                return fn

            edits = {(l, "z"): edit_for(l) for l in self.layers}
        with torch.enable_grad() if grad else torch.no_grad():
            init = gather_window(eng.embed(tokens), window_positions(starts, w))[None]
            x = run_window(
                eng, base, starts, w, 1, 0, "resid_pre", init=init, edits=edits, end_index=end
            )
            return eng.logits(x[0])

    def _evaluate(self, mask: Tensor | None, part: _Part, ticker: _Ticker) -> tuple[float, float]:
        """(accuracy, mean target logit) on a whole part, or NaNs if stopped."""
        hits, total = 0, 0.0
        for rows in self._ranges(len(part.d)):
            if ticker.stop_requested():
                return math.nan, math.nan
            logit, hit = self._target_logits(mask, part, rows, grad=False)
            hits += int(hit.sum())
            total += float(logit.sum())
            ticker.tick()
        n = len(part.d)
        return hits / n, total / n

    # ---- training

    def train(
        self, lam: float, lr: float, epochs: int, seed: int, eval_every: int | None, ticker: _Ticker
    ) -> MaskResult:
        train, val, test = self.parts
        n_train = len(train.d)
        gen = torch.Generator().manual_seed(seed)
        mask = torch.ones(len(self.heads), device=self.device, requires_grad=True)
        opt = torch.optim.Adam([mask], lr=lr)
        checks = set(self.eval_steps(epochs, eval_every))
        curve: dict[str, list[float]] = {
            k: [] for k in ("step", "epoch", "loss", "target_logit", "mask_size", "n_selected")
        }
        vals: dict[str, list[float]] = {k: [] for k in ("val_step", "val_accuracy", "val_loss")}
        best: tuple | None = None  # (accuracy, -loss, step, mask)
        step, complete = 0, True
        for epoch in range(epochs):
            order = torch.randperm(n_train, generator=gen)
            for a in range(0, n_train, self.bs):
                if ticker.stop_requested():
                    complete = False
                    break
                rows = order[a : a + self.bs]
                logit, _ = self._target_logits(mask, train, rows, grad=True)
                loss = -logit.mean() + lam * (1 - mask).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0.0, 1.0)
                step += 1
                ticker.tick()
                soft = mask.detach()
                for k, v in (
                    ("step", step),
                    ("epoch", epoch),
                    ("loss", float(loss.detach())),
                    ("target_logit", float(logit.detach().mean())),
                    ("mask_size", float((1 - soft).sum())),
                    ("n_selected", int((soft < 0.5).sum())),
                ):
                    curve[k].append(v)
                if step in checks:
                    rounded = (soft >= 0.5).float()
                    acc, mean_logit = self._evaluate(rounded, val, ticker)
                    if math.isnan(acc):
                        complete = False
                        break
                    val_loss = -mean_logit + lam * float((1 - rounded).sum())
                    vals["val_step"].append(step)
                    vals["val_accuracy"].append(acc)
                    vals["val_loss"].append(val_loss)
                    if best is None or (acc, -val_loss) > best[:2]:
                        best = (acc, -val_loss, step, soft.clone())
            if not complete:
                break

        final = mask.detach().clone()
        kept = best[3] if best is not None else final
        rounded = (kept >= 0.5).float()
        if complete:
            train_acc, _ = self._evaluate(rounded, train, ticker)
            test_acc, _ = self._evaluate(rounded, test, ticker)
            complete = not ticker.stopped
        else:
            train_acc = test_acc = math.nan
        notes = []
        if best is None:
            notes.append(
                "stopped before the first validation check: the mask shown is the last "
                "step's, never validated"
            )
        return MaskResult(
            mask=self._grid(kept),
            final_mask=self._grid(final),
            heads=list(self.heads),
            selected=[h for h, r in zip(self.heads, rounded.tolist()) if r == 0.0],
            position=self.position,
            desideratum=self.name,
            lam=lam,
            train_accuracy=train_acc,
            val_accuracy=best[0] if best is not None else math.nan,
            test_accuracy=test_acc,
            baseline_accuracy=math.nan,
            full_patch_accuracy=math.nan,
            curve=TrainingCurve(
                step=torch.tensor(curve["step"], dtype=torch.long),
                epoch=torch.tensor(curve["epoch"], dtype=torch.long),
                loss=torch.tensor(curve["loss"]),
                target_logit=torch.tensor(curve["target_logit"]),
                mask_size=torch.tensor(curve["mask_size"]),
                n_selected=torch.tensor(curve["n_selected"], dtype=torch.long),
                val_step=torch.tensor(vals["val_step"], dtype=torch.long),
                val_accuracy=torch.tensor(vals["val_accuracy"]),
                val_loss=torch.tensor(vals["val_loss"]),
            ),
            best_step=best[2] if best is not None else step,
            n_examples=tuple(len(p.d) for p in self.parts),
            complete=complete,
            settings=self.settings(lr, epochs, seed, eval_every),
            notes=notes,
        )

    def settings(self, lr: float, epochs: int, seed: int, eval_every: int | None) -> dict:
        """A result's record of how its mask was trained."""
        return {
            "lr": lr,
            "epochs": epochs,
            "batch_size": self.bs,
            "seed": seed,
            "eval_every": eval_every,
        }

    def reference_accuracies(self, ticker: _Ticker) -> tuple[float, float]:
        """Test accuracy with no head patched and with every trained head patched."""
        test = self.parts[2]
        base, _ = self._evaluate(None, test, ticker)
        full, _ = self._evaluate(torch.zeros(len(self.heads), device=self.device), test, ticker)
        return base, full

    def unfinished(
        self, lam: float, epochs: int, lr: float, seed: int, eval_every: int | None
    ) -> MaskResult:
        """What a run stopped while reading the source prompts returns."""
        ones = torch.ones(len(self.heads), device=self.device)
        empty = torch.zeros(0)
        nan = math.nan
        return MaskResult(
            mask=self._grid(ones),
            final_mask=self._grid(ones),
            heads=list(self.heads),
            selected=[],
            position=self.position,
            desideratum=self.name,
            lam=lam,
            train_accuracy=nan,
            val_accuracy=nan,
            test_accuracy=nan,
            baseline_accuracy=nan,
            full_patch_accuracy=nan,
            curve=TrainingCurve(
                empty.long(),
                empty.long(),
                empty,
                empty,
                empty,
                empty.long(),
                empty.long(),
                empty,
                empty,
            ),
            best_step=0,
            n_examples=tuple(len(p.d) for p in self.parts),
            complete=False,
            settings=self.settings(lr, epochs, seed, eval_every),
            notes=["stopped before training began"],
        )

    def _grid(self, values: Tensor) -> Float[Tensor, "layer head"]:
        grid = torch.full((self.shape.n_layers, self.shape.n_heads), math.nan)
        for h, v in zip(self.heads, values.detach().cpu().tolist()):
            grid[h.layer, h.head] = v
        return grid
