"""The circuit-reuse study (Merullo et al.): IOI and Colored Objects circuits found by one
pipeline, their overlap, and the attention intervention that repairs Colored Objects."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.evaluation import (
    FaithfulnessResult,
    OverlapResult,
    faithfulness,
    head_overlap,
)
from circuit_widgets.core.interventions import head_attention, intervene
from circuit_widgets.types import Head


@dataclass(frozen=True, eq=False)
class ReuseResult:
    """Everything the study measures; ``summary()`` for people, ``to_dict()`` for reports."""

    ioi: PipelineResult
    colored: PipelineResult
    overlap: OverlapResult
    inhibition_heads: list[Head]
    negative_movers: list[Head]
    intervention_heads: list[Head]
    accuracy_before: float
    accuracy_after: float
    candidate_accuracy_before: float
    candidate_accuracy_after: float
    logit_diff_before: float
    logit_diff_after: float
    mover_attention_before: dict[str, float]
    mover_attention_after: dict[str, float]
    ioi_faithfulness: FaithfulnessResult | None
    colored_faithfulness: FaithfulnessResult | None
    n: int
    top_frac: float
    seed: int
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (JSON-ready)."""
        hs = lambda xs: [str(h) for h in sorted(xs)]
        mean = lambda d: (sum(d.values()) / len(d)) if d else math.nan
        return {
            "n": self.n,
            "top_frac": self.top_frac,
            "seed": self.seed,
            "seconds": self.seconds,
            "complete": self.complete,
            "ioi_circuit": self.ioi.circuit.to_dict(),
            "colored_circuit": self.colored.circuit.to_dict(),
            "overlap": self.overlap.to_dict(),
            "inhibition_heads": hs(self.inhibition_heads),
            "negative_movers": hs(self.negative_movers),
            "intervention_heads": hs(self.intervention_heads),
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "candidate_accuracy_before": self.candidate_accuracy_before,
            "candidate_accuracy_after": self.candidate_accuracy_after,
            "logit_diff_before": self.logit_diff_before,
            "logit_diff_after": self.logit_diff_after,
            "mover_attention_to_wrong_before": dict(self.mover_attention_before),
            "mover_attention_to_wrong_after": dict(self.mover_attention_after),
            "mover_attention_to_wrong_before_mean": mean(self.mover_attention_before),
            "mover_attention_to_wrong_after_mean": mean(self.mover_attention_after),
            "ioi_faithfulness": None
            if self.ioi_faithfulness is None
            else self.ioi_faithfulness.to_dict(),
            "colored_faithfulness": (
                None if self.colored_faithfulness is None else self.colored_faithfulness.to_dict()
            ),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines of text: the circuits, their overlap, the intervention's effect."""
        d = self.to_dict()
        o = self.overlap
        lines = [
            (
                f"Circuit reuse (n={self.n} prompts per task, top {self.top_frac:.1%} heads per stage, "
                f"seed {self.seed}; {self.seconds:.0f} s{'' if self.complete else '; STOPPED EARLY'})"
            ),
            f"IOI circuit ({o.n_a} heads): {_groups(self.ioi)}",
            f"Colored Objects circuit ({o.n_b} heads): {_groups(self.colored)}",
            (
                f"Overlap: {o.n_shared} shared = {_pct(o.frac_a)} of the IOI circuit, {_pct(o.frac_b)} of "
                f"the Colored Objects circuit (Jaccard {o.jaccard:.2f}); shared: "
                f"{', '.join(d['overlap']['intersection']) or 'none'}"
            ),
            (
                f"Inhibition-like heads (IOI stage 2): {', '.join(d['inhibition_heads']) or 'none'}; "
                f"negative movers: {', '.join(d['negative_movers']) or 'none'}"
            ),
            (
                f"Intervention on {', '.join(d['intervention_heads']) or 'no heads'} (attention at END forced "
                f"onto the wrong colours): accuracy {_pct(self.accuracy_before)} -> {_pct(self.accuracy_after)}"
                f" (among the 3 colours {_pct(self.candidate_accuracy_before)} -> "
                f"{_pct(self.candidate_accuracy_after)}); logit diff {self.logit_diff_before:.3f} -> "
                f"{self.logit_diff_after:.3f}"
            ),
            (
                f"Movers' attention to the wrong colours: "
                f"{d['mover_attention_to_wrong_before_mean']:.3f} -> {d['mover_attention_to_wrong_after_mean']:.3f}"
            ),
        ]
        for label, f in (
            ("IOI", self.ioi_faithfulness),
            ("Colored Objects", self.colored_faithfulness),
        ):
            if f is not None:
                lines.append(
                    f"{label} faithfulness: {f.metric_name} {f.circuit_metric:.3f} / "
                    f"{f.full_metric:.3f} = {f.ratio:.2f}; accuracy {_pct(f.circuit_accuracy)} / "
                    f"{_pct(f.full_accuracy)}; random circuits {f.random_metric_mean:.3f} "
                    f"± {f.random_metric_std:.3f}; means per {f.means}"
                )
        lines.append(
            "Merullo et al., GPT-2 medium, for comparison: 78% of the IOI circuit reused; "
            "intervention 49.6% -> 93.7%."
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """Matplotlib Figures: each pipeline stage's grid (picked heads outlined), the overlap,
        accuracy before/after the intervention and the movers' attention to the wrong colours."""
        from circuit_widgets import plots

        figs: dict[str, Any] = {}
        for label, pipe in (("ioi", self.ioi), ("colored", self.colored)):
            for g in pipe.circuit.groups:
                if g.name in pipe.grids:
                    figs[f"{label}_{g.name}"] = plots.plot_head_grid(
                        pipe.grids[g.name],
                        selected=g.heads,
                        title=f"{'IOI' if label == 'ioi' else 'Colored Objects'}: stage {g.name} @ {g.position}",
                    )
        o = self.overlap
        figs["overlap"] = plots.plot_bars(
            {"IOI circuit": {"shared": o.frac_a}, "Colored Objects circuit": {"shared": o.frac_b}},
            title=f"Heads shared by the two circuits ({o.n_shared})",
            ylabel="share of the circuit",
        )
        figs["intervention"] = plots.plot_bars(
            {
                "accuracy": {"before": self.accuracy_before, "after": self.accuracy_after},
                "among the 3 colours": {
                    "before": self.candidate_accuracy_before,
                    "after": self.candidate_accuracy_after,
                },
            },
            title="Colored Objects: attention intervention",
        )
        if self.mover_attention_before:
            figs["mover_attention"] = plots.plot_bars(
                {
                    h: {"before": v, "after": self.mover_attention_after.get(h, math.nan)}
                    for h, v in self.mover_attention_before.items()
                },
                title="Movers' attention to the wrong colours",
                ylabel="attention",
            )
        return figs

    def __repr__(self) -> str:
        return self.summary()


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _groups(p: PipelineResult) -> str:
    return "; ".join(
        f"{g.name}@{g.position}: {', '.join(str(h) for h in sorted(g.heads)) or '-'}"
        for g in p.circuit.groups
    )


def circuit_reuse(
    model: Any,
    *,
    n: int = 32,
    top_frac: float = 0.02,
    seed: int = 0,
    intervention_heads: Iterable[Any] | None = None,
    n_random: int = 3,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> ReuseResult:
    """Run the circuit-reuse study on ``model``.

    1. IOI (ABC corruption) and Colored Objects tasks of ``n`` prompts (``seed``); each
       circuit from ``circuit_pipeline`` with its default stages, keeping the top
       ``top_frac`` of heads by |normalized effect| per stage.
    2. Their head overlap.
    3. Inhibition-like heads: the IOI circuit's stage-2 heads (into the movers' queries) that
       help the task and are not stage-1 movers themselves; negative movers: stage-1 heads of
       either circuit whose corruption raises the metric.
    4. The intervention: those heads (or ``intervention_heads``) attend from END uniformly to
       the two wrong colour tokens on Colored Objects (the IOI negative movers with the
       inhibition-like heads, as Merullo et al. chose S-inhibition heads plus 19.1); accuracy (argmax over the vocabulary),
       accuracy among the three colours and logit diff before and after, and the Colored
       Objects movers' (positive stage-1 heads not intervened on) attention to the wrong colours.
    5. Faithfulness of each circuit (mean ablation over corrupt prompts, ``n_random`` random
       circuits); ``n_random=-1`` skips it.
    Progress runs over both pipelines and the evaluation; once stopped, the result holds what
    was done (complete=False) and the later steps are left at NaN.
    """
    from circuit_widgets import tasks

    check_callbacks(on_progress, should_stop, None)
    t0 = time.perf_counter()
    notes: list[str] = []
    ioi = tasks.ioi(model, n=n, seed=seed)
    co = tasks.colored_objects(model, n=n, seed=seed)

    def part(offset: int):
        def cb(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(offset + (1000 * done) // max(total, 1), 3000)

        return cb

    p_ioi = circuit_pipeline(
        model, ioi, top_frac=top_frac, on_progress=part(0), should_stop=should_stop
    )
    p_co = (
        circuit_pipeline(
            model, co, top_frac=top_frac, on_progress=part(1000), should_stop=should_stop
        )
        if p_ioi.complete
        else _empty_pipeline(co)
    )
    overlap = head_overlap(p_ioi.circuit, p_co.circuit)
    complete = p_ioi.complete and p_co.complete
    movers_ioi = set(p_ioi.circuit.group("movers").heads) if _has(p_ioi, "movers") else set()
    # Inhibition-like: stage-2 heads that help the task and are not movers themselves.
    inhibition = (
        sorted(
            h
            for h in p_ioi.circuit.group("inhibition").heads
            if h not in movers_ioi and p_ioi.effect("inhibition", h) > 0
        )
        if _has(p_ioi, "inhibition")
        else []
    )
    negative = sorted(
        set(p_ioi.negative_heads("movers") if _has(p_ioi, "movers") else [])
        | set(p_co.negative_heads("movers") if _has(p_co, "movers") else [])
    )
    if intervention_heads is None:
        chosen = sorted(
            set(inhibition) | set(p_ioi.negative_heads("movers") if _has(p_ioi, "movers") else [])
        )
    else:
        chosen = sorted(set(Head.parse_many(intervention_heads)))
    movers = [
        h
        for h in (sorted(p_co.circuit.group("movers").heads) if _has(p_co, "movers") else [])
        if h not in negative and h not in chosen
    ]

    nan = math.nan
    acc_b = acc_a = cand_b = cand_a = ld_b = ld_a = nan
    att_b: dict[str, float] = {}
    att_a: dict[str, float] = {}
    f_ioi = f_co = None
    stopped = should_stop is not None and should_stop()
    if complete and not stopped:
        acc_b, cand_b, ld_b = _scores(model, co)
        if movers:
            att_b = head_attention(model, co, movers, to="wrong_colors").as_dict()
        if chosen:
            with intervene(model, co, heads=chosen, attend_to="wrong_colors"):
                acc_a, cand_a, ld_a = _scores(model, co)
                if movers:
                    att_a = head_attention(model, co, movers, to="wrong_colors").as_dict()
        else:
            notes.append("no inhibition-like heads or negative movers found: no intervention")
        if on_progress is not None:
            on_progress(2500, 3000)
        if n_random >= 0 and not (should_stop is not None and should_stop()):
            f_ioi = faithfulness(model, ioi, p_ioi.circuit, n_random=n_random, seed=seed)
            f_co = faithfulness(model, co, p_co.circuit, n_random=n_random, seed=seed)
    else:
        complete = False
    if on_progress is not None and complete:
        on_progress(3000, 3000)
    notes += [f"IOI pipeline: {x}" for x in p_ioi.notes] + [
        f"Colored Objects pipeline: {x}" for x in p_co.notes
    ]
    return ReuseResult(
        ioi=p_ioi,
        colored=p_co,
        overlap=overlap,
        inhibition_heads=inhibition,
        negative_movers=negative,
        intervention_heads=chosen,
        accuracy_before=acc_b,
        accuracy_after=acc_a,
        candidate_accuracy_before=cand_b,
        candidate_accuracy_after=cand_a,
        logit_diff_before=ld_b,
        logit_diff_after=ld_a,
        mover_attention_before=att_b,
        mover_attention_after=att_a,
        ioi_faithfulness=f_ioi,
        colored_faithfulness=f_co,
        n=n,
        top_frac=top_frac,
        seed=seed,
        seconds=time.perf_counter() - t0,
        complete=complete,
        notes=notes,
    )


def _has(p: PipelineResult, group: str) -> bool:
    return any(g.name == group for g in p.circuit.groups) and group in p.grids


def _empty_pipeline(task: Any) -> PipelineResult:
    from circuit_widgets.types import Circuit

    return PipelineResult(
        circuit=Circuit((), f"{task.name} circuit"),
        grids={},
        stages=(),
        sign="abs",
        complete=False,
        notes=["not run: stopped earlier"],
    )


def _scores(model: Any, task: Any) -> tuple[float, float, float]:
    """(accuracy over the vocabulary, accuracy among the candidates, logit diff), means."""
    logits = run_with_edits(model, task.clean_tokens, at=task.positions["END"]).logits.float()
    return (
        float(task.accuracy(logits).mean()),
        float(task.candidate_accuracy(logits).mean()),
        float(task.logit_diff(logits).mean()),
    )
