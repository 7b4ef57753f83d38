"""The circuit-reuse study (Merullo et al.): IOI and Colored Objects circuits found by one
pipeline, their overlap, head roles measured from what the heads do, and the attention
intervention on Colored Objects scored on held-out prompts against random controls."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.evaluation import (
    FaithfulnessResult,
    OverlapResult,
    faithfulness,
    head_overlap,
)
from circuit_widgets.core.interventions import Intervention, copy_scores, head_attention
from circuit_widgets.models import model_shape
from circuit_widgets.studies.ioi import DEFAULT_N, DEFAULT_TOP_FRAC
from circuit_widgets.types import Head

ROLES = ("S-inhibition-like", "negative mover", "mover", "given", "other")


@dataclass(frozen=True)
class HeadRole:
    """A head's role, named from what it does, and the numbers that name it.

    evidence keys (those measured for the head): ``ioi_inhibition_effect`` (normalized
    path-patching effect in IOI's inhibition stage), ``att_END_S2`` / ``att_END_IO`` (IOI, mean
    attention from END), ``ioi_mover_effect`` / ``co_mover_effect`` (direct effect in a movers
    stage; < 0 works against the answer), ``att_END_S`` (S1 + S2), ``att_END_correct`` /
    ``att_END_wrong`` (Colored Objects, the answer colour and the two wrong colours together),
    ``copy_score`` (``copy_scores`` forced onto the wrong colours: > 0 copies, < 0 suppresses),
    ``forced_candidate_accuracy`` (accuracy among the colours with that head alone forced),
    ``in_colored_circuit`` (1 or 0)."""

    head: Head
    role: str
    why: str
    evidence: dict[str, float]

    def to_dict(self) -> dict:
        return {"head": str(self.head), "role": self.role, "why": self.why, **self.evidence}


@dataclass(frozen=True, eq=False)
class InterventionResult:
    """The attention intervention on held-out Colored Objects prompts: ``heads`` attend from END
    uniformly to the two wrong colours. Accuracies are among the three colours unless named
    ``vocab_`` (argmax over the vocabulary). ``random_after``: one per control set (as many
    random heads from the same layers); ``all_colors_after``: the same heads forced onto all
    three colours."""

    heads: list[Head]
    roles: dict[Head, HeadRole]
    chosen_by: str
    accuracy_before: float
    accuracy_after: float
    vocab_accuracy_before: float
    vocab_accuracy_after: float
    logit_diff_before: float
    logit_diff_after: float
    random_sets: list[list[Head]]
    random_after: list[float]
    random_vocab_after: list[float]
    all_colors_after: float
    all_colors_vocab_after: float
    mover_attention_before: dict[str, float]
    mover_attention_after: dict[str, float]
    n_eval: int
    eval_seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def random_mean(self) -> float:
        return _mean(self.random_after)

    @property
    def random_std(self) -> float:
        xs = [x for x in self.random_after if not math.isnan(x)]
        return float(torch.tensor(xs).std(unbiased=False)) if len(xs) > 1 else math.nan

    def to_dict(self) -> dict:
        return {
            "heads": [str(h) for h in self.heads],
            "roles": {str(h): r.to_dict() for h, r in sorted(self.roles.items())},
            "chosen_by": self.chosen_by,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "vocab_accuracy_before": self.vocab_accuracy_before,
            "vocab_accuracy_after": self.vocab_accuracy_after,
            "logit_diff_before": self.logit_diff_before,
            "logit_diff_after": self.logit_diff_after,
            "random_sets": [[str(h) for h in s] for s in self.random_sets],
            "random_after": list(self.random_after),
            "random_vocab_after": list(self.random_vocab_after),
            "random_mean": self.random_mean,
            "random_std": self.random_std,
            "all_colors_after": self.all_colors_after,
            "all_colors_vocab_after": self.all_colors_vocab_after,
            "mover_attention_to_wrong_before": dict(self.mover_attention_before),
            "mover_attention_to_wrong_after": dict(self.mover_attention_after),
            "mover_attention_to_wrong_before_mean": _mean(self.mover_attention_before.values()),
            "mover_attention_to_wrong_after_mean": _mean(self.mover_attention_after.values()),
            "n_eval": self.n_eval,
            "eval_seed": self.eval_seed,
            "notes": list(self.notes),
        }


@dataclass(frozen=True, eq=False)
class ReuseResult:
    """Everything the study measures; ``summary()`` for people, ``to_dict()`` for reports.

    ``candidates``: every head whose role was measured (IOI's inhibition stage, both movers
    stages, and any heads given), with its role and evidence; ``intervention``: the held-out
    evaluation (see ``InterventionResult``)."""

    ioi: PipelineResult
    colored: PipelineResult
    overlap: OverlapResult
    candidates: dict[Head, HeadRole]
    intervention: InterventionResult
    ioi_accuracy: float
    colored_accuracy: float
    ioi_faithfulness: FaithfulnessResult | None
    colored_faithfulness: FaithfulnessResult | None
    n: int
    top_frac: float
    seed: int
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)

    @property
    def inhibition_heads(self) -> list[Head]:
        """S-inhibition-like heads (IOI inhibition stage, END attends S2 more than IO)."""
        return sorted(h for h, r in self.candidates.items() if r.role == "S-inhibition-like")

    @property
    def negative_movers(self) -> list[Head]:
        """Movers-stage heads with a negative direct effect that attend to the answer."""
        return sorted(h for h, r in self.candidates.items() if r.role == "negative mover")

    @property
    def intervention_heads(self) -> list[Head]:
        return list(self.intervention.heads)

    @property
    def n_eval(self) -> int:
        """Held-out prompts the intervention was scored on."""
        return self.intervention.n_eval

    def roles_dataframe(self):
        """One row per measured head: role, why, evidence."""
        import pandas as pd

        rows = [r.to_dict() for _, r in sorted(self.candidates.items())]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (JSON-ready)."""
        hs = lambda xs: [str(h) for h in sorted(xs)]
        return {
            "n": self.n,
            "top_frac": self.top_frac,
            "seed": self.seed,
            "seconds": self.seconds,
            "complete": self.complete,
            "ioi_accuracy": self.ioi_accuracy,
            "colored_accuracy": self.colored_accuracy,
            "ioi_circuit": self.ioi.circuit.to_dict(),
            "colored_circuit": self.colored.circuit.to_dict(),
            "overlap": self.overlap.to_dict(),
            "inhibition_heads": hs(self.inhibition_heads),
            "negative_movers": hs(self.negative_movers),
            "intervention_heads": hs(self.intervention.heads),
            "candidates": {str(h): r.to_dict() for h, r in sorted(self.candidates.items())},
            "intervention": self.intervention.to_dict(),
            "ioi_faithfulness": None
            if self.ioi_faithfulness is None
            else self.ioi_faithfulness.to_dict(),
            "colored_faithfulness": (
                None if self.colored_faithfulness is None else self.colored_faithfulness.to_dict()
            ),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines of text: the circuits, their overlap, the roles, the intervention."""
        o, iv = self.overlap, self.intervention
        d = self.to_dict()
        lines = [
            (
                f"Circuit reuse (circuits on n={self.n} prompts per task, seed {self.seed}, top "
                f"{self.top_frac:.1%} heads per stage; intervention on {iv.n_eval} held-out prompts, "
                f"seed {iv.eval_seed}; {self.seconds:.0f} s{'' if self.complete else '; STOPPED EARLY'})"
            ),
            (
                f"Accuracy (argmax over the vocabulary) on the circuit prompts: IOI "
                f"{_pct(self.ioi_accuracy)}, Colored Objects {_pct(self.colored_accuracy)}"
            ),
            f"IOI circuit ({o.n_a} heads): {_groups(self.ioi)}",
            f"Colored Objects circuit ({o.n_b} heads): {_groups(self.colored)}",
            (
                f"Overlap: {o.n_shared} shared = {_pct(o.frac_a)} of the IOI circuit, {_pct(o.frac_b)} of "
                f"the Colored Objects circuit (Jaccard {o.jaccard:.2f}); shared: "
                f"{', '.join(d['overlap']['intersection']) or 'none'}"
            ),
            "Head roles (from what the heads do):",
        ]
        for h, r in sorted(self.candidates.items()):
            ev = ", ".join(
                f"{k} {v:+.2f}" if "effect" in k or k == "copy_score" else f"{k} {v:.2f}"
                for k, v in r.evidence.items()
                if not (isinstance(v, float) and math.isnan(v)) and k != "in_colored_circuit"
            )
            inco = " [in CO circuit]" if r.evidence.get("in_colored_circuit") else ""
            lines.append(f"  {h}: {r.role}{inco} ({ev})")
        heads = ", ".join(str(h) for h in iv.heads) or "no heads"
        lines += [
            (
                f"Intervention ({iv.chosen_by}) on {heads}, END attention forced onto the wrong "
                f"colours, {iv.n_eval} held-out prompts: accuracy among the colours "
                f"{_pct(iv.accuracy_before)} -> {_pct(iv.accuracy_after)}; over the vocabulary "
                f"{_pct(iv.vocab_accuracy_before)} -> {_pct(iv.vocab_accuracy_after)}; logit diff "
                f"{iv.logit_diff_before:.3f} -> {iv.logit_diff_after:.3f}"
            ),
            (
                f"Controls: {len(iv.random_after)} random sets of {len(iv.heads)} heads from the "
                f"same layers -> {_pct(iv.random_mean)} ± {_pct(iv.random_std)} among the colours "
                f"(min {_pct(min(iv.random_after, default=math.nan))}, max "
                f"{_pct(max(iv.random_after, default=math.nan))}); the same heads forced onto all "
                f"three colours -> {_pct(iv.all_colors_after)}"
            ),
            (
                f"Colored Objects movers' attention to the wrong colours: "
                f"{_mean(iv.mover_attention_before.values()):.3f} -> "
                f"{_mean(iv.mover_attention_after.values()):.3f}"
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
            "3 S-inhibition heads + negative mover 19.1 forced onto the wrong colours: "
            "49.6% -> 93.7%."
        )
        lines += [f"note: {n}" for n in self.notes + iv.notes]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """Matplotlib Figures: each pipeline stage's grid (picked heads outlined), the overlap,
        the intervention against its controls, the movers' attention to the wrong colours."""
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
        o, iv = self.overlap, self.intervention
        figs["overlap"] = plots.plot_bars(
            {"IOI circuit": {"shared": o.frac_a}, "Colored Objects circuit": {"shared": o.frac_b}},
            title=f"Heads shared by the two circuits ({o.n_shared})",
            ylabel="share of the circuit",
        )
        figs["intervention"] = plots.plot_bars(
            {
                "among the 3 colours": {
                    "before": iv.accuracy_before,
                    "chosen heads": iv.accuracy_after,
                    "random heads (mean)": iv.random_mean,
                    "onto all 3 colours": iv.all_colors_after,
                },
                "over the vocabulary": {
                    "before": iv.vocab_accuracy_before,
                    "chosen heads": iv.vocab_accuracy_after,
                    "random heads (mean)": _mean(iv.random_vocab_after),
                    "onto all 3 colours": iv.all_colors_vocab_after,
                },
            },
            title=f"Colored Objects, {iv.n_eval} held-out prompts: attention intervention",
            ylabel="accuracy",
        )
        if iv.mover_attention_before:
            figs["mover_attention"] = plots.plot_bars(
                {
                    h: {"before": v, "after": iv.mover_attention_after.get(h, math.nan)}
                    for h, v in iv.mover_attention_before.items()
                },
                title="Movers' attention to the wrong colours",
                ylabel="attention",
            )
        return figs

    def __repr__(self) -> str:
        return self.summary()


def _mean(xs: Iterable[float]) -> float:
    v = [float(x) for x in xs if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _groups(p: PipelineResult) -> str:
    return "; ".join(
        f"{g.name}@{g.position}: {', '.join(str(h) for h in sorted(g.heads)) or '-'}"
        for g in p.circuit.groups
    )


def head_role(ev: dict[str, float]) -> tuple[str, str]:
    """(role, why) from a head's evidence (see ``HeadRole``): what the numbers show, no more.

    S-inhibition-like: in IOI's inhibition stage and END attends S2 more than IO ("-like":
    Wang et al. also show the head moves the movers' attention, which is not measured here).
    Negative mover: a movers-stage head whose direct effect is negative and that attends to the
    answer (IO more than S1 + S2, or the answer colour more than each wrong colour). Mover: the
    same with a positive effect. Anything else: other."""
    nan = math.nan
    if not math.isnan(ev.get("ioi_inhibition_effect", nan)):
        s2, io = ev.get("att_END_S2", nan), ev.get("att_END_IO", nan)
        if s2 > io:
            return (
                "S-inhibition-like",
                f"IOI inhibition stage; END attends S2 {s2:.2f} > IO {io:.2f}",
            )
    for task, eff_key, ans, wrong, div, wname in (
        ("IOI", "ioi_mover_effect", "att_END_IO", "att_END_S", 1.0, "S1+S2"),
        (
            "Colored Objects",
            "co_mover_effect",
            "att_END_correct",
            "att_END_wrong",
            2.0,
            "each wrong colour",
        ),
    ):
        eff = ev.get(eff_key, nan)
        if math.isnan(eff):
            continue
        a, w = ev.get(ans, nan), ev.get(wrong, nan) / div
        if a > w:
            what = f"{task} movers stage, direct effect {eff:+.2f}; END attends the answer {a:.2f} > {wname} {w:.2f}"
            if eff < 0:
                return "negative mover", what
            if eff > 0:
                return "mover", what
    return "other", "no role's evidence holds"


def circuit_reuse(
    model: Any,
    *,
    n: int = DEFAULT_N,
    top_frac: float = DEFAULT_TOP_FRAC,
    seed: int = 0,
    n_eval: int = 200,
    eval_seed: int | None = None,
    n_controls: int = 10,
    intervention_heads: Iterable[Any] | None = None,
    n_random: int = 3,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> ReuseResult:
    """Run the circuit-reuse study on ``model``.

    1. IOI (ABC corruption) and Colored Objects tasks of ``n`` prompts (``seed``); each circuit
       from ``circuit_pipeline`` with its default stages, the top ``top_frac`` of heads by
       |normalized effect| per stage; their overlap.
    2. Roles from what heads do (``head_role``), measured on those prompts for IOI's
       inhibition-stage heads and both movers stages: attention masses from END, the direct
       effect, and ``copy_scores`` on Colored Objects (each head alone forced onto the wrong
       colours: does it promote or suppress them?).
    3. Intervention heads: the S-inhibition-like heads that are also in the Colored Objects
       circuit, plus the negative movers (Merullo et al.: 3 S-inhibition heads and negative mover
       19.1 in GPT-2 medium); ``intervention_heads`` overrides.
    4. Scored on ``n_eval`` held-out Colored Objects prompts (``eval_seed``, default seed + 1;
       any prompt also among the circuit prompts is dropped): accuracy among the colours and
       over the vocabulary before and after; controls: ``n_controls`` random sets of as many
       heads from the same layers, and the same heads forced onto all three colours; the
       Colored Objects movers' (positive movers-stage heads not intervened on) attention to
       the wrong colours before and after.
    5. Faithfulness of each circuit (mean ablation, ``n_random`` random circuits) on the
       circuit prompts; ``n_random=-1`` skips it.
    Once stopped (``should_stop``) the result holds what was done (complete=False), the rest NaN.
    """
    from circuit_widgets import tasks

    check_callbacks(on_progress, should_stop, None)
    for name, v, lo in (("n", n, 2), ("n_eval", n_eval, 1), ("n_controls", n_controls, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < -1:
        raise ValueError(f"n_random must be an int >= -1 (-1 skips faithfulness), got {n_random!r}")
    if (
        isinstance(top_frac, bool)
        or not isinstance(top_frac, (int, float))
        or not 0 < top_frac <= 1
    ):
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac!r}")
    eval_seed = seed + 1 if eval_seed is None else eval_seed
    if eval_seed == seed:
        raise ValueError(f"eval_seed must differ from seed ({seed}): the evaluation is held out")
    given = None if intervention_heads is None else sorted(set(Head.parse_many(intervention_heads)))
    shape = model_shape(model)
    t0 = time.perf_counter()
    notes: list[str] = []
    stopped = lambda: should_stop is not None and bool(should_stop())
    total = 3000

    def part(offset: int, width: int):
        def cb(done: int, tot: int) -> None:
            if on_progress is not None:
                on_progress(offset + (width * done) // max(tot, 1), total)

        return cb

    ioi = tasks.ioi(model, n=n, seed=seed)
    co = tasks.colored_objects(model, n=n, seed=seed)
    ioi_acc, _ = _scores(model, ioi)[:2]
    co_acc, _ = _scores(model, co)[:2]

    p_ioi = circuit_pipeline(
        model, ioi, top_frac=top_frac, on_progress=part(0, 1000), should_stop=should_stop
    )
    p_co = (
        circuit_pipeline(
            model, co, top_frac=top_frac, on_progress=part(1000, 1000), should_stop=should_stop
        )
        if p_ioi.complete
        else _empty_pipeline(co)
    )
    overlap = head_overlap(p_ioi.circuit, p_co.circuit)
    complete = p_ioi.complete and p_co.complete

    candidates: dict[Head, HeadRole] = {}
    chosen: list[Head] = []
    if complete and not stopped():
        candidates = _roles(model, ioi, co, p_ioi, p_co, given or [], part(2000, 300), should_stop)
        if given is not None:
            chosen, chosen_by = given, "given"
        else:
            chosen_by = "roles"
            chosen = sorted(
                h
                for h, r in candidates.items()
                if r.role == "negative mover"
                or (r.role == "S-inhibition-like" and h in p_co.circuit.heads)
            )
            if not chosen:
                notes.append(
                    "no S-inhibition-like head in the Colored Objects circuit and no "
                    "negative mover: nothing to intervene on"
                )
    else:
        complete, chosen_by = False, "given" if given is not None else "roles"
    iv = _empty_intervention(chosen, candidates, chosen_by, eval_seed)
    if complete and not stopped():
        co_eval = tasks.colored_objects(model, n=n_eval, seed=eval_seed)
        seen = set(co.clean_prompts)
        keep = [i for i, p in enumerate(co_eval.clean_prompts) if p not in seen]
        if len(keep) < len(co_eval):
            notes.append(
                f"{len(co_eval) - len(keep)} evaluation prompts were also circuit prompts: dropped"
            )
            co_eval = co_eval.subset(keep)
        iv = _evaluate(
            model,
            co_eval,
            p_co,
            chosen,
            candidates,
            chosen_by,
            eval_seed,
            n_controls,
            seed,
            shape.n_heads,
            part(2300, 500),
            should_stop,
        )
        complete = not stopped()
    else:
        complete = False
    f_ioi = f_co = None
    if complete and n_random >= 0 and not stopped():
        f_ioi = faithfulness(model, ioi, p_ioi.circuit, n_random=n_random, seed=seed)
        f_co = faithfulness(model, co, p_co.circuit, n_random=n_random, seed=seed)
    if complete and on_progress is not None:
        on_progress(total, total)
    notes += [f"IOI pipeline: {x}" for x in p_ioi.notes] + [
        f"Colored Objects pipeline: {x}" for x in p_co.notes
    ]
    return ReuseResult(
        ioi=p_ioi,
        colored=p_co,
        overlap=overlap,
        candidates=candidates,
        intervention=iv,
        ioi_accuracy=ioi_acc,
        colored_accuracy=co_acc,
        ioi_faithfulness=f_ioi,
        colored_faithfulness=f_co,
        n=n,
        top_frac=float(top_frac),
        seed=seed,
        seconds=time.perf_counter() - t0,
        complete=complete,
        notes=notes,
    )


def _roles(
    model: Any,
    ioi: Any,
    co: Any,
    p_ioi: PipelineResult,
    p_co: PipelineResult,
    extra: list[Head],
    on_progress: Progress,
    should_stop: Stop,
) -> dict[Head, HeadRole]:
    """Evidence and role of IOI's inhibition-stage heads, both movers stages' heads and
    ``extra`` heads (measured on the circuit prompts)."""
    ev: dict[Head, dict[str, float]] = {}
    inh = sorted(p_ioi.circuit.group("inhibition").heads) if _has(p_ioi, "inhibition") else []
    m_ioi = sorted(p_ioi.circuit.group("movers").heads) if _has(p_ioi, "movers") else []
    m_co = sorted(p_co.circuit.group("movers").heads) if _has(p_co, "movers") else []
    every = sorted(set(inh) | set(m_ioi) | set(m_co) | set(extra))
    if not every:
        return {}
    for h in every:
        ev[h] = {}
    att = {
        k: head_attention(model, task, every, to=to).as_dict()
        for k, task, to in (
            ("att_END_IO", ioi, "IO"),
            ("att_END_S2", ioi, "S2"),
            ("att_END_S", ioi, ["S1", "S2"]),
            ("att_END_correct", co, "correct_color"),
            ("att_END_wrong", co, "wrong_colors"),
        )
    }
    for h in inh:
        ev[h]["ioi_inhibition_effect"] = p_ioi.effect("inhibition", h)
    for h in m_ioi:
        ev[h]["ioi_mover_effect"] = p_ioi.effect("movers", h)
    for h in m_co:
        ev[h]["co_mover_effect"] = p_co.effect("movers", h)
    for h in every:
        for k in ("att_END_IO", "att_END_S2", "att_END_S"):
            ev[h][k] = att[k][str(h)]
        for k in ("att_END_correct", "att_END_wrong"):
            ev[h][k] = att[k][str(h)]
    cs = copy_scores(
        model, co, every, to="wrong_colors", on_progress=on_progress, should_stop=should_stop
    )
    for h, s, a in zip(cs.heads, cs.score.tolist(), cs.candidate_accuracy.tolist()):
        ev[h]["copy_score"] = s
        ev[h]["forced_candidate_accuracy"] = a
    out = {}
    for h in every:
        ev[h]["in_colored_circuit"] = float(h in p_co.circuit.heads)
        role, why = head_role(ev[h])
        if role == "other" and h in extra:
            role, why = "given", "named by intervention_heads"
        out[h] = HeadRole(h, role, why, ev[h])
    return out


def _random_sets(chosen: list[Head], n_heads: int, k: int, seed: int) -> list[list[Head]]:
    """``k`` sets of random heads, one from each chosen head's layer, none of them chosen."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    taken = set(chosen)
    out = []
    for _ in range(k):
        pick: list[Head] = []
        for h in chosen:
            pool = [
                Head(h.layer, j)
                for j in range(n_heads)
                if Head(h.layer, j) not in taken and Head(h.layer, j) not in pick
            ]
            if not pool:
                raise ValueError(f"layer {h.layer} has no head left for a random control set")
            pick.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
        out.append(sorted(pick))
    return out


def _evaluate(
    model: Any,
    task: Any,
    p_co: PipelineResult,
    chosen: list[Head],
    roles: dict[Head, HeadRole],
    chosen_by: str,
    eval_seed: int,
    n_controls: int,
    seed: int,
    n_heads: int,
    on_progress: Progress,
    should_stop: Stop,
) -> InterventionResult:
    movers = [
        h
        for h in (sorted(p_co.circuit.group("movers").heads) if _has(p_co, "movers") else [])
        if p_co.effect("movers", h) > 0 and h not in chosen
    ]
    sets = _random_sets(chosen, n_heads, n_controls, seed) if chosen else []
    steps = 3 + len(sets)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], steps)

    before = _run(model, task, None, movers)
    tick()
    iv = _empty_intervention(
        chosen, {h: roles[h] for h in chosen if h in roles}, chosen_by, eval_seed
    )
    res = {
        "accuracy_before": before["cand"],
        "vocab_accuracy_before": before["vocab"],
        "logit_diff_before": before["ld"],
        "mover_attention_before": before["att"],
    }
    notes = []
    if not chosen:
        notes.append("no heads to intervene on")
        return _replace(iv, n_eval=len(task), notes=notes, **res)
    after = _run(
        model, task, Intervention(model, task, heads=chosen, attend_to="wrong_colors"), movers
    )
    tick()
    res.update(
        accuracy_after=after["cand"],
        vocab_accuracy_after=after["vocab"],
        logit_diff_after=after["ld"],
        mover_attention_after=after["att"],
    )
    rand: list[float] = []
    rand_v: list[float] = []
    for s in sets:
        if should_stop is not None and should_stop():
            notes.append("stopped: some random control sets were not run")
            return _replace(
                iv,
                n_eval=len(task),
                notes=notes,
                random_after=rand,
                random_vocab_after=rand_v,
                random_sets=sets[: len(rand)],
                **res,
            )
        r = _run(model, task, Intervention(model, task, heads=s, attend_to="wrong_colors"), [])
        rand.append(r["cand"])
        rand_v.append(r["vocab"])
        tick()
    three = _run(
        model,
        task,
        Intervention(model, task, heads=chosen, attend_to=["correct_color", "wrong_colors"]),
        [],
    )
    tick()
    return _replace(
        iv,
        n_eval=len(task),
        notes=notes,
        random_sets=sets,
        random_after=rand,
        random_vocab_after=rand_v,
        all_colors_after=three["cand"],
        all_colors_vocab_after=three["vocab"],
        **res,
    )


def _replace(iv: InterventionResult, **kw: Any) -> InterventionResult:
    from dataclasses import replace

    return replace(iv, **kw)


def _run(model: Any, task: Any, iv: Intervention | None, movers: list[Head]) -> dict[str, Any]:
    """One forward on the task's clean prompts (with ``iv``'s edits): accuracies, logit diff and
    the movers' attention from END to the wrong colours."""
    layers = sorted({h.layer for h in movers})
    run = run_with_edits(
        model,
        task.clean_tokens,
        None if iv is None else iv.edits(),
        capture=[(l, "pattern") for l in layers],
        at=task.positions["END"],
    )
    logits = run.logits.float()
    att = {}
    if movers:
        b = len(task)
        ar = torch.arange(b)
        end = task.positions["END"].cpu()
        wrong = task.position_sets["wrong_colors"].cpu()
        for h in movers:
            rows = run.captured[(h.layer, "pattern")].detach().float().cpu()[ar, h.head, end]
            att[str(h)] = float(rows.gather(1, wrong).sum(1).mean())
    return {
        "vocab": float(task.accuracy(logits).mean()),
        "cand": float(task.candidate_accuracy(logits).mean()),
        "ld": float(task.logit_diff(logits).mean()),
        "att": att,
    }


def _empty_intervention(
    chosen: list[Head], roles: dict[Head, HeadRole], chosen_by: str, eval_seed: int
) -> InterventionResult:
    nan = math.nan
    return InterventionResult(
        heads=list(chosen),
        roles={h: roles[h] for h in chosen if h in roles},
        chosen_by=chosen_by,
        accuracy_before=nan,
        accuracy_after=nan,
        vocab_accuracy_before=nan,
        vocab_accuracy_after=nan,
        logit_diff_before=nan,
        logit_diff_after=nan,
        random_sets=[],
        random_after=[],
        random_vocab_after=[],
        all_colors_after=nan,
        all_colors_vocab_after=nan,
        mover_attention_before={},
        mover_attention_after={},
        n_eval=0,
        eval_seed=eval_seed,
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
