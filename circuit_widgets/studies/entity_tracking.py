"""The entity-tracking study (Prakash et al. 2024): the circuit's head groups A-D by path
patching, its faithfulness under mean ablation, and DCM per group for three desiderata."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.evaluation import (
    FaithfulnessResult,
    MinimalityResult,
    faithfulness,
    minimality,
)
from circuit_widgets.core.masking import MaskResult, dcm
from circuit_widgets.tasks.desiderata import KINDS
from circuit_widgets.types import Circuit, CircuitGroup

GROUP_ROLES = {
    "A": "value fetchers",
    "B": "position transmitters",
    "C": "position detectors",
    "D": "structure readers",
}
PAPER = (
    "Prakash et al., LLaMA-7B, 7 boxes: accuracy 0.66; circuit A 40, B 7, C 20, D 5 heads; "
    "faithfulness 1.00 (circuit 0.66 / full 0.66); random circuits ~0.00; DCM: the groups "
    "carry the correct box's position, not the object or the label."
)


@dataclass(frozen=True, eq=False)
class EntityTrackingResult:
    """Everything the study measures; ``summary()`` for people, ``to_dict()`` for reports.

    ``picked_box[i]`` is the share of prompts whose most likely in-context object is box i's
    (box order as written); ``query_box[i]`` the share of prompts that ask about box i. A model
    that tracks entities has picked_box close to query_box; one that always names the first
    object has picked_box[0] close to 1.
    """

    accuracy: float
    candidate_accuracy: float
    answer_prob: float
    chance: float
    picked_box: list[float]
    query_box: list[float]
    pipeline: PipelineResult
    faithfulness: FaithfulnessResult | None
    dcm: dict[str, dict[str, MaskResult]]
    n: int
    n_boxes: int
    seed: int
    top_k: int
    dcm_examples: int
    dcm_settings: dict[str, Any]
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)
    split: str = "all"
    prune: float | None = None
    """Minimality threshold (fraction of the full model's p(answer)); None: no pruning."""
    minimality: MinimalityResult | None = None
    """Each top-k candidate's minimality score (None when not pruned)."""
    pruned: Circuit | None = None
    """The circuit after minimality pruning (None when not pruned)."""

    @property
    def candidates(self) -> Circuit:
        """The path-patching top-k heads of each group, before pruning."""
        return self.pipeline.circuit

    @property
    def circuit(self) -> Circuit:
        """The circuit the study evaluates: pruned by minimality when ``prune`` was given."""
        return self.pruned if self.pruned is not None else self.pipeline.circuit

    def minimality_table(self):
        """One row per candidate head: group, minimality score (absolute, relative), kept."""
        import pandas as pd

        m = self.minimality
        if m is None:
            return pd.DataFrame()
        kept = self.circuit.heads
        group_of = {h: g.name for g in self.candidates.groups for h in g.heads}
        return pd.DataFrame(
            {
                "group": [group_of.get(h, "?") for h in m.heads],
                "head": [str(h) for h in m.heads],
                "score": m.scores,
                "relative": m.relative,
                "kept": [h in kept for h in m.heads],
            }
        ).sort_values(["group", "relative"], ascending=[True, False])

    def dcm_table(self):
        """One row per (group, desideratum): position, heads, selected heads, accuracies."""
        import pandas as pd

        rows = []
        for g, per in self.dcm.items():
            for kind, r in per.items():
                rows.append(
                    {
                        "group": g,
                        "desideratum": kind,
                        "position": r.position,
                        "n_heads": len(r.heads),
                        "n_selected": r.n_selected,
                        "selected": " ".join(str(h) for h in r.selected),
                        "test_accuracy": r.test_accuracy,
                        "no_patch_accuracy": r.baseline_accuracy,
                        "all_patched_accuracy": r.full_patch_accuracy,
                        "complete": r.complete,
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (JSON-ready; NaN stays a float NaN)."""
        f = self.faithfulness
        return {
            "n": self.n,
            "n_boxes": self.n_boxes,
            "seed": self.seed,
            "split": self.split,
            "top_k": self.top_k,
            "prune": self.prune,
            "candidates": self.candidates.to_dict(),
            "dcm_examples": self.dcm_examples,
            "dcm_settings": dict(self.dcm_settings),
            "seconds": self.seconds,
            "complete": self.complete,
            "accuracy": self.accuracy,
            "candidate_accuracy": self.candidate_accuracy,
            "answer_prob": self.answer_prob,
            "chance": self.chance,
            "picked_box": list(self.picked_box),
            "query_box": list(self.query_box),
            "circuit": self.circuit.to_dict(),
            "group_sizes": {g.name: len(g.heads) for g in self.circuit.groups},
            "faithfulness": None if f is None else f.to_dict(),
            "dcm": {g: {k: _mask_dict(r) for k, r in per.items()} for g, per in self.dcm.items()},
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines of text: accuracy, the circuit, faithfulness, DCM per group."""
        state = "" if self.complete else "; STOPPED EARLY"
        lines = [
            (
                f"Entity tracking (n={self.n} prompts, {self.n_boxes} boxes, split {self.split!r}, "
                f"top {self.top_k} heads per group"
                + (f" pruned by minimality < {self.prune:g}" if self.prune is not None else "")
                + f", seed {self.seed}; {self.seconds:.0f} s{state})"
            ),
            (
                f"Accuracy {_pct(self.accuracy)} (argmax over the vocabulary; chance among the boxes "
                f"{_pct(self.chance)}), among the {self.n_boxes} objects {_pct(self.candidate_accuracy)}; "
                f"mean p(answer) {self.answer_prob:.3f}"
            ),
            (
                f"Box of the most likely object: {_dist(self.picked_box)}; box asked about: "
                f"{_dist(self.query_box)}"
            ),
        ]
        for g in self.circuit.groups:
            heads = ", ".join(str(h) for h in sorted(g.heads)) or "-"
            lines.append(
                f"Group {g.name} ({GROUP_ROLES.get(g.name, g.name)}) @ {g.position}: {heads}"
            )
        f = self.faithfulness
        if f is not None:
            lines.append(
                f"Faithfulness (mean ablation): p(answer) {f.circuit_metric:.4f} / {f.full_metric:.4f} = "
                f"{f.ratio:.2f}; accuracy {_pct(f.circuit_accuracy)} / {_pct(f.full_accuracy)}; random "
                f"circuits p {f.random_metric_mean:.4f} ± {f.random_metric_std:.4f}, accuracy "
                f"{_pct(f.random_accuracy_mean)}; means per {f.means}"
            )
        for name, per in self.dcm.items():
            parts = [
                f"{k} {r.n_selected}/{len(r.heads)} (test {_pct(r.test_accuracy)}, no patch "
                f"{_pct(r.baseline_accuracy)}, all patched {_pct(r.full_patch_accuracy)})"
                for k, r in per.items()
            ]
            lines.append(f"DCM group {name}: " + "; ".join(parts))
        lines.append(PAPER)
        lines += [f"note: {x}" for x in self.notes]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """Matplotlib Figures: each stage's path-patching grid, accuracy and faithfulness,
        the box the model picks, and the share of each group's heads DCM selects."""
        from circuit_widgets import plots

        figs: dict[str, Any] = {}
        for g in self.circuit.groups:
            if g.name in self.pipeline.grids:
                figs[f"grid_{g.name}"] = plots.plot_head_grid(
                    self.pipeline.grids[g.name],
                    selected=g.heads,
                    title=f"group {g.name} ({GROUP_ROLES.get(g.name, g.name)}) @ {g.position}: "
                    f"path patching, p(answer) change",
                )
        bars = {
            "full model": {
                "accuracy": self.accuracy,
                "among the objects": self.candidate_accuracy,
                "chance": self.chance,
            }
        }
        f = self.faithfulness
        if f is not None:
            bars["circuit only"] = {"accuracy": f.circuit_accuracy}
            bars["random circuits"] = {"accuracy": f.random_accuracy_mean}
        figs["accuracy"] = plots.plot_bars(bars, title="Entity tracking accuracy")
        figs["picked_box"] = plots.plot_bars(
            {
                f"box {i + 1}": {"asked": q, "picked": p}
                for i, (q, p) in enumerate(zip(self.query_box, self.picked_box))
            },
            title="Which box's object the model ranks first",
            ylabel="share of prompts",
        )
        if self.dcm:
            figs["dcm"] = plots.plot_bars(
                {
                    g: {
                        k: (r.n_selected / len(r.heads) if r.heads else math.nan)
                        for k, r in per.items()
                    }
                    for g, per in self.dcm.items()
                },
                title="DCM: share of each group's heads selected",
                ylabel="share of heads",
            )
        return figs

    def __repr__(self) -> str:
        return self.summary()


def _mask_dict(r: MaskResult) -> dict:
    return {
        "position": r.position,
        "heads": [str(h) for h in r.heads],
        "selected": [str(h) for h in r.selected],
        "n_selected": r.n_selected,
        "train_accuracy": r.train_accuracy,
        "val_accuracy": r.val_accuracy,
        "test_accuracy": r.test_accuracy,
        "no_patch_accuracy": r.baseline_accuracy,
        "all_patched_accuracy": r.full_patch_accuracy,
        "lam": r.lam,
        "complete": r.complete,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _dist(xs: Sequence[float]) -> str:
    return " ".join(f"{i + 1}:{x:.0%}" for i, x in enumerate(xs))


def _int_arg(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@torch.no_grad()
def box_scores(model: Any, task: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at END [b, vocab], in-context object ids in box order [b, n_boxes], query box [b])."""
    logits = run_with_edits(model, task.clean_tokens, at=task.positions["END"]).logits.float().cpu()
    q = torch.tensor([m["query_index"] for m in task.meta], dtype=torch.long)
    wrong = task.wrong_answers.cpu()
    # The answer sits at its box's index; the wrong answers are the other boxes in order.
    objects = torch.cat([wrong, wrong[:, :1]], 1)
    for i in range(len(task)):
        j = int(q[i])
        objects[i] = torch.cat([wrong[i, :j], task.answers[i : i + 1].cpu(), wrong[i, j:]])
    return logits, objects, q


def entity_tracking_study(
    model: Any,
    *,
    n: int = 16,
    n_boxes: int = 7,
    seed: int = 0,
    split: str = "all",
    top_k: int = 4,
    prune: float | None = None,
    n_random: int = 3,
    dcm_examples: int = 24,
    dcm_epochs: int = 2,
    dcm_batch_size: int = 4,
    dcm_lam: float = 0.01,
    dcm_lr: float = 0.1,
    desiderata: Sequence[str] = KINDS,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> EntityTrackingResult:
    """Run the entity-tracking study on ``model``.

    ``split`` ("all", "train", "test") picks the objects and box labels of every prompt and
    desideratum (``tasks.entity_tracking``); use "test" for a model fine-tuned on "train".

    1. ``n`` boxes prompts with ``n_boxes`` boxes (``seed``): accuracy (argmax over the
       vocabulary), accuracy among the in-context objects, and which box's object the model
       ranks first versus which box was asked about.
    2. The circuit: ``circuit_pipeline`` with ``default_stages`` (A -> logits at END, B -> A's
       queries at END, C -> B's values at query_label, D -> C's values at query_label_ctx),
       ``top_k`` heads per group by |relative effect|: the mean of (p_patched - p_clean) /
       p_clean per example, Prakash et al.'s score (``rank_by="relative"``). With ``prune``
       the ``top_k`` heads are candidates, pruned as Prakash et al. do with Wang et al.'s
       minimality test (``core.evaluation.minimality``, K = {} or the rest of the head's
       group, means as in step 3): a head stays if removing it changes p(answer) by at
       least ``prune`` times the full model's p(answer) for some K.
    3. Faithfulness: every head outside the circuit (per group position) mean-ablated over
       the clean prompts of a separate reference set (seed + 1), as Prakash et al. do;
       ``n_random`` random circuits of the same group sizes (``n_random=-1`` skips it).
    4. DCM per group and desideratum (``tasks.desiderata``, ``dcm_examples`` pairs split
       60/20/20): a mask over the group's heads at the group's position, trained for
       ``dcm_epochs`` epochs of ``dcm_batch_size`` (Adam ``dcm_lr``, sparsity ``dcm_lam``).
       Small batches give the mask enough steps to move: each Adam step moves it by about lr.
    Progress covers all steps; once stopped the result keeps what was done (complete=False).
    """
    from circuit_widgets import tasks

    check_callbacks(on_progress, should_stop, None)
    _int_arg("n", n, 1)
    _int_arg("top_k", top_k, 1)
    if prune is not None and (isinstance(prune, bool) or not 0 <= prune < 1):
        raise ValueError(f"prune must be None or a fraction in [0, 1), got {prune!r}")
    _int_arg("dcm_examples", dcm_examples, 0)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < -1:
        raise ValueError(f"n_random must be an int >= -1 (-1 skips faithfulness), got {n_random!r}")
    if 0 < dcm_examples < 3:
        raise ValueError(
            f"dcm_examples must be 0 (no DCM) or >= 3 (train/val/test), got {dcm_examples}"
        )
    kinds = [desiderata] if isinstance(desiderata, str) else list(desiderata)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown desiderata {bad}; choose from {list(KINDS)}")

    t0 = time.perf_counter()
    notes: list[str] = []
    task = tasks.entity_tracking(model, n=n, seed=seed, n_boxes=n_boxes, split=split)
    logits, objects, q = box_scores(model, task)
    picked = logits.gather(1, objects).argmax(1)
    acc = float(task.accuracy(logits).mean())
    cand = float(task.candidate_accuracy(logits).mean())
    prob = float(task.prob(logits).mean())
    picked_box = (torch.bincount(picked, minlength=n_boxes).float() / n).tolist()
    query_box = (torch.bincount(q, minlength=n_boxes).float() / n).tolist()

    n_dcm = len(kinds) * 4 if dcm_examples else 0
    total = 1000

    def part(lo: int, hi: int):
        def cb(done: int, tot: int) -> None:
            if on_progress is not None:
                on_progress(lo + ((hi - lo) * done) // max(tot, 1), total)

        return cb

    pipe_end = 700 if n_dcm else 950
    pipe = circuit_pipeline(
        model,
        task,
        top_k=top_k,
        on_progress=part(0, pipe_end),
        should_stop=should_stop,
        rank_by="relative",
    )
    complete = pipe.complete
    notes.append(
        "pipeline: heads ranked by |mean over examples of (p_patched - p_clean) / "
        "p_clean| (Prakash et al.'s score), not by the normalized effect"
    )
    notes += [f"pipeline: {x}" for x in pipe.notes]
    stopped = lambda: should_stop is not None and should_stop()

    ref = None
    mini = pruned = None
    if complete and prune is not None and not stopped():
        ref = tasks.entity_tracking(model, n=n, seed=seed + 1, n_boxes=n_boxes, split=split)
        mini = minimality(model, task, pipe.circuit, reference_task=ref, reference="clean")
        rel = dict(zip(mini.heads, mini.relative))
        pruned = Circuit(
            tuple(
                CircuitGroup(g.name, frozenset(h for h in g.heads if rel[h] >= prune), g.position)
                for g in pipe.circuit.groups
            ),
            pipe.circuit.name,
        )
        notes.append(
            f"minimality pruning: kept {len(pruned.heads)} of {len(pipe.circuit.heads)} "
            f"candidate heads (score >= {prune:g} x full p(answer) {mini.full_metric:.3f})"
        )
    circuit = pruned if pruned is not None else pipe.circuit
    faith = None
    if complete and n_random >= 0 and not stopped():
        if ref is None:
            ref = tasks.entity_tracking(model, n=n, seed=seed + 1, n_boxes=n_boxes, split=split)
        faith = faithfulness(
            model,
            task,
            circuit,
            n_random=n_random,
            seed=seed,
            reference_task=ref,
            reference="clean",
        )
        notes += [f"faithfulness: {x}" for x in faith.notes]
    if on_progress is not None and complete:
        on_progress(pipe_end + (0 if n_dcm else 50), total)

    masks: dict[str, dict[str, MaskResult]] = {}
    settings = {
        "epochs": dcm_epochs,
        "batch_size": dcm_batch_size,
        "lam": dcm_lam,
        "lr": dcm_lr,
        "split": [0.6, 0.2, 0.2],
    }
    if complete and n_dcm and not stopped():
        des = tasks.desiderata(model, n=dcm_examples, seed=seed, n_boxes=n_boxes, split=split)
        groups = [g for g in circuit.groups if g.heads]
        empty = [g.name for g in circuit.groups if not g.heads]
        if empty:
            notes.append(f"DCM skipped groups with no heads: {empty}")
        runs = [(g, k) for g in groups for k in kinds]
        step = (total - pipe_end) / max(len(runs), 1)
        for i, (g, kind) in enumerate(runs):
            if stopped():
                complete = False
                break
            lo = pipe_end + round(i * step)
            assert g.position is not None  # a pipeline group sits at its stage's position
            r = dcm(
                model,
                des[kind],
                heads=sorted(g.heads),
                position=g.position,
                lam=dcm_lam,
                lr=dcm_lr,
                epochs=dcm_epochs,
                batch_size=dcm_batch_size,
                seed=seed,
                on_progress=part(lo, pipe_end + round((i + 1) * step)),
                should_stop=should_stop,
            )
            masks.setdefault(g.name, {})[kind] = r
            if not r.complete:
                complete = False
                break
    elif complete and n_dcm:
        complete = False
    if complete and on_progress is not None:
        on_progress(total, total)
    if acc < 1.0 / n_boxes:
        notes.append(
            f"accuracy {acc:.1%} is below chance among the boxes ({1 / n_boxes:.1%}): the "
            f"model does not track entities here, so the circuit and DCM describe what it "
            f"does instead"
        )
    return EntityTrackingResult(
        accuracy=acc,
        candidate_accuracy=cand,
        answer_prob=prob,
        chance=1.0 / n_boxes,
        picked_box=picked_box,
        query_box=query_box,
        pipeline=pipe,
        faithfulness=faith,
        dcm=masks,
        n=n,
        n_boxes=n_boxes,
        seed=seed,
        top_k=top_k,
        dcm_examples=dcm_examples,
        dcm_settings=settings,
        seconds=time.perf_counter() - t0,
        complete=complete,
        notes=notes,
        split=split,
        prune=prune,
        minimality=mini,
        pruned=pruned,
    )
