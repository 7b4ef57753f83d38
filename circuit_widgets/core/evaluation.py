"""Circuit evaluation: mean ablation, faithfulness, completeness, minimality, random
same-size baselines and head overlap.

Every forward with head-level edits goes through ``run_with_edits`` (core/edits.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from circuit_widgets.core import nnsight_backend
from circuit_widgets.core.checks import check_args
from circuit_widgets.core.common import (
    check_callbacks,
    example_chunks,
    parse_memory,
)
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.models import model_shape
from circuit_widgets.types import (
    Circuit,
    CircuitGroup,
    Head,
    ModelLike,
    ModelShape,
)

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

REFERENCES = ("corrupt", "clean")
MEANS = ("auto", "position", "class")
START, OTHER = "<start>", "<other>"


# ====================================================================== mean ablation


@dataclass(frozen=True, eq=False)
class AblationResult:
    """The task's score with every head outside ``circuit`` mean-ablated.

    ``metric`` is the mean of the task's metric; ``accuracy`` the share of examples whose
    argmax over the whole vocabulary is an answer; ``candidate_accuracy`` the share where an
    answer beats every wrong answer.
    """

    metric: float
    accuracy: float
    candidate_accuracy: float
    per_example: Float[Tensor, " batch"]
    per_example_accuracy: Float[Tensor, " batch"]
    n_heads_kept: int
    n_heads_total: int
    metric_name: str
    reference: str
    circuit: Circuit
    notes: list[str] = field(default_factory=list)
    means: str = "class"
    """How the means were taken: "position" (one per absolute token position) or "class"."""

    def to_dataframe(self):
        """One row per example: metric, accuracy."""
        import pandas as pd

        return pd.DataFrame(
            {
                "example": range(len(self.per_example)),
                self.metric_name: self.per_example.tolist(),
                "accuracy": self.per_example_accuracy.tolist(),
            }
        )

    def __repr__(self) -> str:
        return (
            f"AblationResult({self.metric_name}={self.metric:.4g}, accuracy={self.accuracy:.3f}, "
            f"{self.n_heads_kept}/{self.n_heads_total} heads kept)"
        )


def mean_ablate(
    model: ModelLike,
    task: Task,
    circuit: Circuit | Iterable[Any] | None = None,
    *,
    reference_task: Task | None = None,
    batch_size: int | None = None,
    reference: str = "corrupt",
    means: str = "auto",
    max_memory: int | str | None = None,
) -> AblationResult:
    """Score ``task`` with every head outside ``circuit`` replaced by its mean output.

    A head's output is its ``z`` (before W_O). Means are taken over the reference set: the
    *corrupt* prompts of ``reference_task`` (default: ``task`` itself), because Wang et al.
    mean-ablate over the ABC distribution, which is what IOI's default corruption is; pass
    ``reference="clean"`` to average clean prompts instead (a separate ``reference_task`` of
    the same generator is then the held-out reference set of Prakash et al.).

    ``means="position"``: one mean per absolute token position, as Prakash et al. take them
    (every prompt of the task and of the reference set must have the same length).
    ``means="class"``: one mean per position class, never reading padding: each named position
    of the task (IO, S2, END, query_label, ...) is its own class; position 0, where attention
    has only itself to read, is class "<start>" unless named; every other real token is pooled
    into one class "<other>", because right-padded prompts of different templates do not align
    position by position. Where two names fall on one token the name listed later wins; a
    class the reference set has no token of (a position it lacks) takes the mean over all its
    real tokens. ``means="auto"`` (default): "position" when every prompt of the task and the
    reference set has the same length, else "class"; the result's ``means`` says which.

    A circuit group with a position keeps its heads at that named position only (mean
    elsewhere); a group without one keeps them at every position. ``circuit=None`` or an
    empty circuit ablates every head. A plain list of heads keeps them everywhere.

    batch_size: examples per forward; max_memory (bytes or '2GB', None = from free memory)
    bounds it too, so a long task runs in chunks with the same scores.
    """
    check_args("mean_ablate", model=model, task=task)
    abl = _ablator(model, task, reference_task, reference, batch_size, means, max_memory)
    res = abl.run(circuit)
    requests = abl.request_notes()
    return replace(res, notes=[*requests, *res.notes]) if requests else res


class _Ablator:
    """Mean z per (layer, position or position class, head), computed once and reused for many circuits."""

    def __init__(
        self,
        model: ModelLike,
        task: Task,
        reference_task: Task | None,
        reference: str,
        batch_size: int | None,
        means: str = "auto",
        max_memory: int | str | None = None,
    ) -> None:
        check_callbacks(None, None, batch_size)
        parse_memory(max_memory)
        self.max_memory = max_memory
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if means not in MEANS:
            raise ValueError(f"means must be one of {MEANS}, got {means!r}")
        self.model, self.task, self.batch_size = model, task, batch_size
        self.shape: ModelShape = model_shape(model)
        ref = task if reference_task is None else reference_task
        self.notes: list[str] = []
        lengths = sorted({int(n) for n in torch.cat([task.lengths.cpu(), ref.lengths.cpu()])})
        if means == "position" and len(lengths) > 1:
            raise ValueError(
                f"means='position' takes one mean per absolute token position, so every prompt of "
                f"the task and the reference set must have the same length; their lengths are "
                f"{lengths}; use means='class' (or 'auto') for prompts of different lengths"
            )
        self.mode = (
            "position"
            if means == "position" or (means == "auto" and len(lengths) == 1)
            else "class"
        )
        self.missing: list[str] = []
        if self.mode == "position":
            self.classes = [str(p) for p in range(lengths[0])]
        else:
            # Class 0 = <start>, 1 = <other>, 2.. = the task's named positions.
            self.classes = [START, OTHER, *task.positions]
            self.missing = [p for p in task.positions if p not in ref.positions]
            if self.missing:
                self.notes.append(
                    f"reference task lacks positions {self.missing}: those classes "
                    f"use the mean over all its real tokens"
                )
        tokens = ref.corrupt_tokens if reference == "corrupt" else ref.clean_tokens
        self.reference = (
            f"{reference} prompts of {'the task' if reference_task is None else repr(ref.name)}"
        )
        self.means = self._means(ref, tokens)
        self._full: tuple[Tensor, Tensor, Tensor] | None = None

    def _class_map(self, task: Task, for_reference: bool) -> Tensor:
        """[b, s] class index of each token; -1 on padding."""
        b, s = task.clean_tokens.shape
        if self.mode == "position":
            cls = torch.arange(s).repeat(b, 1)
            return torch.where(task.attention_mask.cpu().bool(), cls, torch.full_like(cls, -1))
        cls = torch.full((b, s), 1, dtype=torch.long)
        cls[:, 0] = 0
        ar = torch.arange(b)
        for i, name in enumerate(self.classes[2:], start=2):
            if name in task.positions:
                cls[ar, task.positions[name].cpu()] = i
        return torch.where(task.attention_mask.cpu().bool(), cls, torch.full_like(cls, -1))

    def _chunks(self, task: Task) -> list[slice]:
        """Examples per forward: batch_size, and what one forward's activations fit the budget."""
        return example_chunks(self.model, task, self.max_memory, runs=1, batch_size=self.batch_size)

    def _means(self, ref: Any, tokens: Tensor) -> list[Tensor]:
        L, H, dh = self.shape.n_layers, self.shape.n_heads, self.shape.d_head
        C = len(self.classes)
        sums = torch.zeros(L, C, H, dh, dtype=torch.float64)
        counts = torch.zeros(C, dtype=torch.float64)
        cls_all = self._class_map(ref, True)
        for sl in self._chunks(ref):
            lengths = ref.attention_mask[sl].sum(-1)
            keep = int(lengths.max())
            toks = tokens[sl, :keep]
            run = run_with_edits(
                self.model,
                toks,
                capture=[(l, "z") for l in range(L)],
                at=(lengths - 1).to(torch.long),
            )
            cls = cls_all[sl, :keep].reshape(-1)
            real = cls >= 0
            counts += torch.bincount(cls[real], minlength=C).double()
            for l in range(L):
                z = run.captured[(l, "z")].detach().reshape(-1, H, dh).cpu().double()
                sums[l].index_add_(0, cls[real], z[real])
        overall = sums.sum(1) / counts.sum()
        means = sums / counts.clamp(min=1)[None, :, None, None]
        empty = (counts == 0).nonzero().flatten().tolist()
        for c in empty:
            means[:, c] = overall
        # Classes of positions the reference lacks already have their note.
        names = [self.classes[c] for c in empty if self.classes[c] not in (START, *self.missing)]
        if names:
            self.notes.append(
                f"no reference tokens in classes {names}: they use the mean over all real tokens"
            )
        return [m.float() for m in means]

    def _keep(self, circuit: Circuit, task: Task, sl: slice, s: int) -> dict[int, Tensor]:
        """layer -> [b, s, H] bool: where a head keeps its own output; layers all kept are left out."""
        b = len(range(*sl.indices(len(task))))
        H = self.shape.n_heads
        keep: dict[int, Tensor] = {}
        everywhere: set[Head] = set()
        for g in circuit.groups:
            if g.position is None:
                everywhere |= set(g.heads)
        for g in circuit.groups:
            for h in g.heads:
                k = keep.setdefault(h.layer, torch.zeros(b, s, H, dtype=torch.bool))
                if h in everywhere:
                    k[:, :, h.head] = True
                else:
                    assert g.position is not None  # position-less groups' heads are everywhere
                    pos = task.positions[g.position][sl].cpu()
                    k[torch.arange(b), pos, h.head] = True
        out = {}
        for l in range(self.shape.n_layers):
            layer_keep = keep.get(l)
            if layer_keep is None:
                out[l] = torch.zeros(b, s, H, dtype=torch.bool)
            elif not bool(layer_keep.all()):
                out[l] = layer_keep
        return out

    def scores(self, circuit: Circuit | None) -> tuple[Tensor, Tensor, Tensor]:
        """(metric, accuracy, candidate accuracy) per example; None = the unablated model."""
        if circuit is None and self._full is not None:
            return self._full
        task = self.task
        cls_all = self._class_map(task, False)
        outs: list[list[Tensor]] = [[], [], []]
        for sl in self._chunks(task):
            sub = task.subset(torch.arange(len(task))[sl])
            s = sub.seq_len
            edits = {}
            if circuit is not None:
                cls = cls_all[sl, :s]
                cls = torch.where(
                    cls < 0, torch.ones_like(cls), cls
                )  # padding: <other>, never read
                for l, keep in self._keep(circuit, task, sl, s).items():
                    edits[(l, "z")] = _ablate_fn(keep, self.means[l], cls)
            run = run_with_edits(self.model, sub.clean_tokens, edits, at=sub.positions["END"])
            logits = run.logits.float()
            outs[0].append(sub.metric(logits).float().cpu())
            outs[1].append(sub.accuracy(logits).float().cpu())
            outs[2].append(sub.candidate_accuracy(logits).float().cpu())
        result = (torch.cat(outs[0]), torch.cat(outs[1]), torch.cat(outs[2]))
        if circuit is None:
            self._full = result
        return result

    def target(self, circ: Circuit) -> Circuit | None:
        """What ``scores`` is asked for ``circ``: None (the plain model) when it keeps every
        head everywhere."""
        n_total = self.shape.n_layers * self.shape.n_heads
        everything = len(circ) == n_total and all(g.position is None for g in circ.groups)
        return None if everything else circ

    def prefetch(self, circuits: list[Circuit | None]) -> None:
        """Score these (``target``s) together where the backend batches them (nnsight: several
        circuits a request); here each is scored when ``run`` asks for it."""

    def request_notes(self) -> list[str]:
        """What a result says about requests made (nnsight only)."""
        return []

    def run(self, circuit: Circuit | Iterable[Any] | None) -> AblationResult:
        circ = _as_circuit(circuit, self.shape, self.task)
        n_total = self.shape.n_layers * self.shape.n_heads
        everything = self.target(circ) is None
        # Keeping every head everywhere edits nothing: skip the edit so the score is exactly the model's.
        metric, acc, cand = self.scores(None if everything else circ)
        notes = list(self.notes)
        if everything:
            notes.append("every head kept everywhere: nothing ablated")
        return AblationResult(
            metric=float(metric.mean()),
            accuracy=float(acc.mean()),
            candidate_accuracy=float(cand.mean()),
            per_example=metric,
            per_example_accuracy=acc,
            n_heads_kept=len(circ),
            n_heads_total=n_total,
            metric_name=self.task.metric_name,
            reference=self.reference,
            circuit=circ,
            notes=notes,
            means=self.mode,
        )


def _ablator(
    model: ModelLike,
    task: Task,
    reference_task: Task | None,
    reference: str,
    batch_size: int | None,
    means: str,
    max_memory: int | str | None,
) -> _Ablator:
    """The ablator for ``model``'s backend: nnsight's scores many circuits per request."""
    if nnsight_backend.is_nnsight(model):
        from circuit_widgets.core import nnsight_experiments

        return nnsight_experiments.make_ablator(
            model, task, reference_task, reference, batch_size, means, max_memory
        )
    return _Ablator(model, task, reference_task, reference, batch_size, means, max_memory)


def _ablate_fn(keep: Tensor, means: Tensor, cls: Tensor):
    """z edit: a head's own output where kept, its class mean elsewhere."""

    def fn(act: Tensor) -> Tensor:
        mean = means.to(act.device, act.dtype)[cls.to(act.device)]  # [b, s, H, dh]
        return torch.where(keep.to(act.device)[..., None], act, mean)

    return fn


def _as_circuit(circuit: Any, shape: ModelShape, task: Task) -> Circuit:
    """A Circuit checked against the model and the task (a plain head list keeps heads everywhere)."""
    if circuit is None:
        circ = Circuit()
    elif isinstance(circuit, Circuit):
        circ = circuit
    elif hasattr(circuit, "circuit") and isinstance(circuit.circuit, Circuit):
        circ = circuit.circuit
    elif isinstance(circuit, (str, bytes)):
        raise ValueError(f"circuit must be a Circuit or a list of heads, got {circuit!r}")
    else:
        try:
            circ = Circuit.from_heads(list(circuit))
        except TypeError:
            raise ValueError(
                f"circuit must be a Circuit or a list of heads, got {type(circuit).__name__}"
            ) from None
    circ.validate(shape.n_layers, shape.n_heads, list(task.positions))
    return circ


def _all_heads(shape: ModelShape) -> list[Head]:
    return [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    t = torch.tensor(list(xs), dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


# ====================================================================== faithfulness


@dataclass(frozen=True, eq=False)
class FaithfulnessResult:
    """Circuit score / full-model score, for the task's metric and for accuracy, with the
    scores of random circuits of the same group sizes (one per seed) as a baseline."""

    full_metric: float
    circuit_metric: float
    ratio: float
    full_accuracy: float
    circuit_accuracy: float
    accuracy_ratio: float
    random_metric: list[float]
    random_accuracy: list[float]
    random_seeds: list[int]
    n_heads: int
    metric_name: str
    circuit: Circuit
    notes: list[str] = field(default_factory=list)
    means: str = "class"
    """How the ablation means were taken: "position" or "class" (see ``mean_ablate``)."""

    @property
    def random_metric_mean(self) -> float:
        return _mean_std(self.random_metric)[0]

    @property
    def random_metric_std(self) -> float:
        return _mean_std(self.random_metric)[1]

    @property
    def random_accuracy_mean(self) -> float:
        return _mean_std(self.random_accuracy)[0]

    @property
    def random_accuracy_std(self) -> float:
        return _mean_std(self.random_accuracy)[1]

    @property
    def random_ratio_mean(self) -> float:
        return _ratio(self.random_metric_mean, self.full_metric)

    def to_dict(self) -> dict:
        """Plain numbers (and the circuit as its dict)."""
        return {
            "metric_name": self.metric_name,
            "n_heads": self.n_heads,
            "full_metric": self.full_metric,
            "circuit_metric": self.circuit_metric,
            "ratio": self.ratio,
            "full_accuracy": self.full_accuracy,
            "circuit_accuracy": self.circuit_accuracy,
            "accuracy_ratio": self.accuracy_ratio,
            "random_metric": list(self.random_metric),
            "random_accuracy": list(self.random_accuracy),
            "random_seeds": list(self.random_seeds),
            "random_metric_mean": self.random_metric_mean,
            "random_metric_std": self.random_metric_std,
            "random_accuracy_mean": self.random_accuracy_mean,
            "random_accuracy_std": self.random_accuracy_std,
            "means": self.means,
            "circuit": self.circuit.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"FaithfulnessResult({self.metric_name}: circuit {self.circuit_metric:.4g} / full "
            f"{self.full_metric:.4g} = {self.ratio:.3f}; accuracy {self.circuit_accuracy:.3f} / "
            f"{self.full_accuracy:.3f}; random {self.random_metric_mean:.4g} ± "
            f"{self.random_metric_std:.3g} over {len(self.random_seeds)} seeds)"
        )


def random_circuit_like(circuit: Circuit, shape: ModelShape, seed: int) -> Circuit:
    """Same groups, positions, group sizes and number of distinct heads as ``circuit``.

    Its distinct heads are mapped one to one onto heads drawn uniformly without replacement,
    so groups drawn apart cannot collide (which would shrink the random circuit) and a head
    two groups share stays shared.
    """
    rng = random.Random(seed)
    own = sorted(circuit.heads)
    relabel = dict(zip(own, rng.sample(_all_heads(shape), len(own))))
    groups = tuple(
        CircuitGroup(g.name, frozenset(relabel[h] for h in g.heads), g.position)
        for g in circuit.groups
    )
    return Circuit(groups, f"random-{seed}")


def faithfulness(
    model: ModelLike,
    task: Task,
    circuit: Circuit | Iterable[Any],
    *,
    n_random: int = 5,
    seed: int = 0,
    reference_task: Task | None = None,
    reference: str = "corrupt",
    batch_size: int | None = None,
    means: str = "auto",
    max_memory: int | str | None = None,
) -> FaithfulnessResult:
    """How much of the full model's performance the circuit alone keeps (Prakash et al.).

    ratio = F(circuit) / F(model) for the task's metric, accuracy_ratio the same for accuracy,
    where F(circuit) is ``mean_ablate(model, task, circuit)`` (every other head mean-ablated,
    see there for the reference set and ``means``). Random baseline: ``n_random`` circuits
    with the same groups, positions, group sizes and number of distinct heads
    (``random_circuit_like``), drawn with seeds ``seed, seed + 1, ...``. A ratio whose full
    score is 0 is NaN.
    """
    check_args("faithfulness", model=model, task=task)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an int >= 0, got {n_random!r}")
    abl = _ablator(model, task, reference_task, reference, batch_size, means, max_memory)
    circ = _as_circuit(circuit, abl.shape, task)
    seeds = [seed + i for i in range(n_random)]
    rands = [random_circuit_like(circ, abl.shape, s) for s in seeds]
    abl.prefetch([None, *(abl.target(c) for c in [circ, *rands])])
    full_m, full_a, _ = abl.scores(None)
    res = abl.run(circ)
    rand = [abl.run(c) for c in rands]
    fm, fa = float(full_m.mean()), float(full_a.mean())
    return FaithfulnessResult(
        full_metric=fm,
        circuit_metric=res.metric,
        ratio=_ratio(res.metric, fm),
        full_accuracy=fa,
        circuit_accuracy=res.accuracy,
        accuracy_ratio=_ratio(res.accuracy, fa),
        random_metric=[r.metric for r in rand],
        random_accuracy=[r.accuracy for r in rand],
        random_seeds=seeds,
        n_heads=len(circ),
        metric_name=task.metric_name,
        circuit=circ,
        notes=[*abl.request_notes(), *res.notes],
        means=abl.mode,
    )


# ====================================================================== completeness, minimality


@dataclass(frozen=True, eq=False)
class CompletenessResult:
    """One row per removed subset K: F(C \\ K), F(M \\ K) and the score |F(C \\ K) - F(M \\ K)|."""

    labels: list[str]
    subsets: list[frozenset[Head]]
    f_circuit: list[float]
    f_model: list[float]
    scores: list[float]
    full_metric: float
    circuit_metric: float
    metric_name: str
    notes: list[str] = field(default_factory=list)
    means: str = "class"
    """How the ablation means were taken: "position" or "class" (see ``mean_ablate``)."""

    @property
    def max_score(self) -> float:
        return max(self.scores) if self.scores else math.nan

    @property
    def worst(self) -> str:
        """The label of the subset with the largest incompleteness score."""
        return self.labels[max(range(len(self.scores)), key=self.scores.__getitem__)]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "subset": self.labels,
                "heads": [", ".join(str(h) for h in sorted(k)) for k in self.subsets],
                "f_circuit_minus_k": self.f_circuit,
                "f_model_minus_k": self.f_model,
                "score": self.scores,
                "relative": [_ratio(s, abs(self.full_metric)) for s in self.scores],
            }
        )


def completeness(
    model: ModelLike,
    task: Task,
    circuit: Circuit | Iterable[Any],
    *,
    subsets: str | Sequence[Iterable[Any]] = "groups+random",
    n_random: int = 5,
    seed: int = 0,
    reference_task: Task | None = None,
    reference: str = "corrupt",
    batch_size: int | None = None,
    means: str = "auto",
    max_memory: int | str | None = None,
) -> CompletenessResult:
    """Wang et al.'s completeness test: a circuit C is complete if, for every subset K of C,
    knocking K out of the circuit hurts as much as knocking it out of the whole model M.

    Incompleteness score of K = |F(C \\ K) - F(M \\ K)|, F = the task's mean metric with every
    head not in the given set mean-ablated (``mean_ablate``, with its ``reference_task``,
    ``reference`` and ``means``). F(C \\ K) keeps C's groups and
    positions without K; F(M \\ K) keeps every head everywhere except K (ablated at every
    position). Subsets: K = {} always (the faithfulness gap |F(C) - F(M)|); "groups": each
    circuit group as K (Wang et al.'s head classes); "random": ``n_random`` subsets with each
    head of C in K with probability 1/2 (Wang et al.'s random sampling; seeded); or a list of
    head collections. Wang et al.'s greedy search for the worst K is not done here.
    """
    check_args("completeness", model=model, task=task)
    abl = _ablator(model, task, reference_task, reference, batch_size, means, max_memory)
    circ = _as_circuit(circuit, abl.shape, task)
    ks: list[tuple[str, frozenset[Head]]] = [("empty", frozenset())]
    if isinstance(subsets, str):
        parts = set(subsets.split("+"))
        if not parts <= {"groups", "random"}:
            raise ValueError(
                f"subsets must be 'groups', 'random', 'groups+random' or a list of "
                f"head collections, got {subsets!r}"
            )
        if "groups" in parts:
            ks += [(f"group {g.name}", frozenset(g.heads)) for g in circ.groups]
        if "random" in parts:
            if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
                raise ValueError(f"n_random must be an int >= 0, got {n_random!r}")
            rng = random.Random(seed)
            heads = sorted(circ.heads)
            for i in range(n_random):
                ks.append((f"random {i}", frozenset(h for h in heads if rng.random() < 0.5)))
    else:
        for i, k in enumerate(subsets):
            members = frozenset(Head.parse(h) for h in k)
            outside = sorted(members - circ.heads)
            if outside:
                raise ValueError(
                    f"subset {i} holds heads {[str(h) for h in outside]} that are not "
                    f"in the circuit; K must be a subset of the circuit"
                )
            ks.append((f"subset {i}", members))
    everything = Circuit.from_heads(_all_heads(abl.shape), group="model")
    knocks = [Circuit.from_heads(k) for _, k in ks]
    c_minus = [circ - kn for kn in knocks]
    m_minus = [everything - kn if k else None for (_, k), kn in zip(ks, knocks)]
    asked = [everything, *c_minus, *(m for m in m_minus if m is not None)]
    abl.prefetch([abl.target(c) for c in asked])
    full = abl.run(everything).metric
    f_c = [abl.run(c).metric for c in c_minus]
    f_m = [full if m is None else abl.run(m).metric for m in m_minus]
    return CompletenessResult(
        labels=[lab for lab, _ in ks],
        subsets=[k for _, k in ks],
        f_circuit=f_c,
        f_model=f_m,
        scores=[abs(a - b) for a, b in zip(f_c, f_m)],
        full_metric=full,
        circuit_metric=f_c[0],
        metric_name=task.metric_name,
        notes=[*abl.request_notes(), *abl.notes],
        means=abl.mode,
    )


@dataclass(frozen=True, eq=False)
class MinimalityResult:
    """Per circuit head v: the best K found and |F(C \\ (K + v)) - F(C \\ K)|."""

    heads: list[Head]
    scores: list[float]
    best_k: list[frozenset[Head]]
    all_scores: list[dict[str, float]]
    full_metric: float
    circuit_metric: float
    metric_name: str
    notes: list[str] = field(default_factory=list)
    means: str = "class"
    """How the ablation means were taken: "position" or "class" (see ``mean_ablate``)."""

    @property
    def relative(self) -> list[float]:
        """Scores as a fraction of |F(M)|."""
        return [_ratio(s, abs(self.full_metric)) for s in self.scores]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "head": [str(h) for h in self.heads],
                "layer": [h.layer for h in self.heads],
                "head_index": [h.head for h in self.heads],
                "score": self.scores,
                "relative": self.relative,
                "best_k": [", ".join(str(x) for x in sorted(k)) for k in self.best_k],
            }
        )


def minimality(
    model: ModelLike,
    task: Task,
    circuit: Circuit | Iterable[Any],
    *,
    k_sets: str | dict = "group",
    reference_task: Task | None = None,
    reference: str = "corrupt",
    batch_size: int | None = None,
    means: str = "auto",
    max_memory: int | str | None = None,
) -> MinimalityResult:
    """Wang et al.'s minimality test: every head v of C should matter given some K.

    For each v in C, score(v, K) = |F(C \\ (K + {v})) - F(C \\ K)| for K a subset of C \\ {v}
    (F as in ``completeness``); the head's score is the largest over the K tried, so a head
    that is redundant with others (name movers backing each other up) still shows up once
    those others are out. K tried: always {} (plain knock-out of v); with
    ``k_sets="group"`` also the rest of each of v's groups; with ``k_sets="empty"`` only {};
    or a dict {head: [K, ...]} naming the K to try for each head (Wang et al. chose them by
    hand per head class). ``relative`` divides by |F(M)|.
    """
    check_args("minimality", model=model, task=task)
    abl = _ablator(model, task, reference_task, reference, batch_size, means, max_memory)
    circ = _as_circuit(circuit, abl.shape, task)
    if isinstance(k_sets, str) and k_sets not in ("group", "empty"):
        raise ValueError(
            f"k_sets must be 'group', 'empty' or a dict {{head: [K, ...]}}, got {k_sets!r}"
        )
    if not isinstance(k_sets, (str, dict)):
        # Every input mistake here is a ValueError, as the callers document.
        raise ValueError(  # noqa: TRY004
            f"k_sets must be 'group', 'empty' or a dict {{head: [K, ...]}}, got "
            f"{type(k_sets).__name__}"
        )
    custom: dict[Head, list[frozenset[Head]]] = {}
    if isinstance(k_sets, dict):
        for h, options in k_sets.items():
            head = Head.parse(h)
            if head not in circ.heads:
                raise ValueError(f"k_sets names head {head}, which is not in the circuit")
            custom[head] = [frozenset(Head.parse(x) for x in k) - {head} for k in options]
            for k in custom[head]:
                if not k <= circ.heads:
                    raise ValueError(
                        f"a K for head {head} holds heads outside the circuit: "
                        f"{[str(x) for x in sorted(k - circ.heads)]}"
                    )
    per_head: dict[Head, list[frozenset[Head]]] = {}
    for v in sorted(circ.heads):
        options = [frozenset()]
        if k_sets == "group":
            options += [frozenset(g.heads) - {v} for g in circ.groups if v in g.heads]
        options += custom.get(v, [])
        per_head[v] = list(dict.fromkeys(k for k in options))
    # every circuit C \ removed the scores need, asked for together (one batch on nnsight)
    removals = [frozenset[Head]()]
    for v, options in per_head.items():
        for k in options:
            removals += [k, k | {v}]
    circuits = {r: circ - Circuit.from_heads(r) for r in dict.fromkeys(removals)}
    abl.prefetch([None, *(abl.target(c) for c in circuits.values())])
    full = float(abl.scores(None)[0].mean())
    memo: dict[frozenset[Head], float] = {}

    def f_without(removed: frozenset[Head]) -> float:
        if removed not in memo:
            memo[removed] = abl.run(circuits[removed]).metric
        return memo[removed]

    heads, scores, best, every = [], [], [], []
    for v, options in per_head.items():
        tried = {}
        for k in options:
            tried[", ".join(str(x) for x in sorted(k)) or "{}"] = abs(
                f_without(k | {v}) - f_without(k)
            )
        label, score = max(tried.items(), key=lambda kv: kv[1])
        heads.append(v)
        scores.append(score)
        best.append(options[list(tried).index(label)])
        every.append(tried)
    return MinimalityResult(
        heads=heads,
        scores=scores,
        best_k=best,
        all_scores=every,
        full_metric=full,
        circuit_metric=f_without(frozenset()),
        metric_name=task.metric_name,
        notes=[*abl.request_notes(), *abl.notes],
        means=abl.mode,
    )


# ====================================================================== overlap


@dataclass(frozen=True)
class OverlapResult:
    """Heads shared by two circuits. Fractions of an empty circuit are NaN."""

    intersection: frozenset[Head]
    only_a: frozenset[Head]
    only_b: frozenset[Head]
    n_shared: int
    n_a: int
    n_b: int
    frac_a: float
    frac_b: float
    jaccard: float
    name_a: str = "a"
    name_b: str = "b"

    def to_dict(self) -> dict:
        fmt = lambda hs: [str(h) for h in sorted(hs)]
        return {
            "name_a": self.name_a,
            "name_b": self.name_b,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n_shared": self.n_shared,
            "frac_a": self.frac_a,
            "frac_b": self.frac_b,
            "jaccard": self.jaccard,
            "intersection": fmt(self.intersection),
            "only_a": fmt(self.only_a),
            "only_b": fmt(self.only_b),
        }

    def __str__(self) -> str:
        return (
            f"{self.n_shared} shared heads: {self.frac_a:.0%} of {self.name_a} ({self.n_a}), "
            f"{self.frac_b:.0%} of {self.name_b} ({self.n_b}); Jaccard {self.jaccard:.2f}"
        )


def _head_set(x: Any) -> tuple[frozenset[Head], str]:
    circ = getattr(x, "circuit", x)
    if isinstance(circ, Circuit):
        return circ.heads, circ.name
    if isinstance(x, (str, bytes)):
        raise ValueError(f"head_overlap needs Circuits or lists of heads, got {x!r}")  # noqa: TRY004 - every input mistake is a ValueError
    try:
        return frozenset(Head.parse(h) for h in x), ""
    except TypeError:
        raise ValueError(
            f"head_overlap needs Circuits or lists of heads, got {type(x).__name__}"
        ) from None


def head_overlap(a: Any, b: Any) -> OverlapResult:
    """Intersection, each circuit's shared fraction and Jaccard of two circuits' head sets
    (a Circuit, a PipelineResult or a list of heads; groups and positions are ignored)."""
    ha, na = _head_set(a)
    hb, nb = _head_set(b)
    inter = ha & hb
    union = ha | hb
    nan = math.nan
    return OverlapResult(
        intersection=inter,
        only_a=ha - hb,
        only_b=hb - ha,
        n_shared=len(inter),
        n_a=len(ha),
        n_b=len(hb),
        frac_a=len(inter) / len(ha) if ha else nan,
        frac_b=len(inter) / len(hb) if hb else nan,
        jaccard=len(inter) / len(union) if union else nan,
        name_a=na or "a",
        name_b=nb or "b",
    )
