"""The IOI study (Wang et al. 2022, as Merullo et al. run it): the model's accuracy and logit
diff, activation patching at END, the four-stage path-patching circuit and its head classes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline, default_stages
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.interventions import head_attention
from circuit_widgets.core.patching import activation_patch
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.models import model_shape
from circuit_widgets.tasks.ioi import STAGES as IOI_STAGES
from circuit_widgets.types import Head

POSITIONS = ("IO", "S1", "S1+1", "S2", "END")

# Defaults, shared with the reuse study so that the report can hand IOI the reuse study's pipeline.
DEFAULT_N = 32
DEFAULT_TOP_FRAC = 0.02

# Attention scores over every head: name -> (query position, key positions).
SCORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "END->IO": ("END", ("IO",)),
    "END->S": ("END", ("S1", "S2")),
    "END->S2": ("END", ("S2",)),
    "S2->S1+1": ("S2", ("S1+1",)),
    "S2->S1": ("S2", ("S1",)),
    "S1+1->S1": ("S1+1", ("S1",)),
}

CLASSES = (
    "name_mover",
    "negative_mover",
    "s_inhibition",
    "induction",
    "duplicate_token",
    "previous_token",
    "unclassified",
)

# Wang et al. 2022, GPT-2 small (12 x 12 heads); a different model, so for orientation only.
PAPER: dict[str, Any] = {
    "model": "GPT-2 small (Wang et al. 2022)",
    "logit_diff": 3.56,
    "circuit_heads": 26,
    "n_classes": 7,
    "examples": {
        "name_mover": ["9.9", "9.6", "10.0"],
        "negative_mover": ["10.7", "11.10"],
        "s_inhibition": ["7.3", "7.9", "8.6", "8.10"],
        "induction": ["5.5", "6.9"],
        "duplicate_token": ["0.1", "3.0"],
        "previous_token": ["2.2", "4.11"],
    },
}


@dataclass(frozen=True)
class HeadClass:
    """One circuit head: the stage that found it, its normalized path-patching effect there,
    its attention scores (SCORES) and the class they give it."""

    head: Head
    stage: str
    effect: float
    label: str
    attention: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "head": str(self.head),
            "stage": self.stage,
            "effect": self.effect,
            "class": self.label,
            **{f"att {k}": v for k, v in self.attention.items()},
        }


@dataclass(frozen=True, eq=False)
class IOIResult:
    """Everything the study measures; ``summary()`` for people, ``to_dict()`` for reports,
    ``figures()`` for pages. Means are over the ``n`` prompts."""

    accuracy: float
    candidate_accuracy: float
    logit_diff: float
    logit_diff_std: float
    corrupt_logit_diff: float
    per_example_logit_diff: Tensor
    activation: HeadGrid | None
    pipeline: PipelineResult | None
    attention: dict[str, Tensor]
    head_classes: list[HeadClass]
    examples: list[dict[str, Any]]
    example_patterns: Tensor | None
    example_tokens: list[str]
    example_heads: list[Head]
    model_name: str
    n_layers: int
    n_heads: int
    task_name: str
    n: int
    seed: int
    top_frac: float
    min_attention: float
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)

    @property
    def circuit(self):
        return None if self.pipeline is None else self.pipeline.circuit

    def heads_of(self, label: str) -> list[Head]:
        """The circuit heads of one class (see CLASSES)."""
        if label not in CLASSES:
            raise ValueError(f"unknown head class {label!r}; classes are {CLASSES}")
        return sorted(c.head for c in self.head_classes if c.label == label)

    def to_dataframe(self):
        """One row per circuit head: stage, effect, class, attention scores."""
        import pandas as pd

        return pd.DataFrame([c.to_dict() for c in self.head_classes])

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (JSON-ready; NaN where not measured)."""
        top = lambda grid, k=10: (
            [{"head": str(h), "normalized": _norm(grid, h)} for h, _ in grid.top(k)]
            if grid is not None
            else []
        )
        stages = {}
        if self.pipeline is not None:
            for st in self.pipeline.stages:
                if st.name not in self.pipeline.grids:
                    continue
                g = self.pipeline.circuit.group(st.name)
                grid = self.pipeline.grids[st.name]
                stages[st.name] = {
                    "position": st.position,
                    "receivers": st.receivers,
                    "inputs": st.inputs,
                    "heads": [
                        {"head": str(h), "normalized": _norm(grid, h)}
                        for h in sorted(g.heads, key=lambda h: -abs(_norm(grid, h)))
                    ],
                }
        return {
            "model": self.model_name,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "task": self.task_name,
            "n": self.n,
            "seed": self.seed,
            "top_frac": self.top_frac,
            "min_attention": self.min_attention,
            "seconds": self.seconds,
            "complete": self.complete,
            "accuracy": self.accuracy,
            "candidate_accuracy": self.candidate_accuracy,
            "logit_diff": self.logit_diff,
            "logit_diff_std": self.logit_diff_std,
            "corrupt_logit_diff": self.corrupt_logit_diff,
            "activation_patching_top": top(self.activation),
            "circuit": None if self.circuit is None else self.circuit.to_dict(),
            "n_circuit_heads": 0 if self.circuit is None else len(self.circuit.heads),
            "stages": stages,
            "head_classes": {c: [str(h) for h in self.heads_of(c)] for c in CLASSES},
            "heads": [c.to_dict() for c in self.head_classes],
            "attention_top": {k: _top_cells(v, 5) for k, v in self.attention.items()},
            "examples": [dict(e) for e in self.examples],
            "paper": PAPER,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines of text: performance, the circuit by stage, the head classes."""
        lines = [
            (
                f"IOI on {self.model_name} (n={self.n} prompts, seed {self.seed}, top {self.top_frac:.1%} "
                f"heads per stage; {self.seconds:.0f} s{'' if self.complete else '; STOPPED EARLY'})"
            ),
            (
                f"Accuracy (argmax over the vocabulary = IO) {_pct(self.accuracy)}; IO > S "
                f"{_pct(self.candidate_accuracy)}; logit diff {self.logit_diff:.3f} ± "
                f"{self.logit_diff_std:.3f} (corrupt prompts {self.corrupt_logit_diff:.3f})"
            ),
        ]
        if self.activation is not None:
            lines.append(
                "Activation patching (z at END), top heads by |normalized effect|: "
                + ", ".join(
                    f"{h} {_norm(self.activation, h):+.2f}" for h, _ in self.activation.top(5)
                )
            )
        if self.pipeline is not None:
            for g in self.pipeline.circuit.groups:
                lines.append(
                    f"Stage {g.name}@{g.position}: "
                    + (", ".join(str(h) for h in sorted(g.heads)) or "-")
                )
        for c in CLASSES[:-1]:
            hs = self.heads_of(c)
            if hs:
                lines.append(f"{c.replace('_', ' ')}: {', '.join(str(h) for h in hs)}")
        lines.append(
            f"Wang et al., {PAPER['model'].split(' (')[0]}, for comparison: logit diff "
            f"{PAPER['logit_diff']}; a circuit of {PAPER['circuit_heads']} heads in "
            f"{PAPER['n_classes']} classes."
        )
        lines += [f"note: {x}" for x in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def figures(self) -> dict[str, Any]:
        """Matplotlib Figures by name: activation patching, the stages' path-patching grids,
        the attention scores of every head, the circuit heads' scores, one example's patterns."""
        from circuit_widgets import plots

        figs: dict[str, Any] = {}
        circ = self.circuit
        if self.activation is not None:
            figs["ioi_activation_patching"] = plots.plot_head_grid(
                self.activation.normalized,
                metric_name="normalized effect",
                title="Activation patching: z at END (1 = as bad as the corrupt prompt)",
                selected=circ,
            )
        if self.pipeline is not None and self.pipeline.grids:
            figs["ioi_path_patching"] = self._stages_figure()
        if self.attention:
            figs["ioi_attention_scores"] = self._attention_figure()
        if self.head_classes:
            figs["ioi_head_classes"] = self._classes_figure()
        if self.example_patterns is not None and len(self.example_heads):
            figs["ioi_attention_example"] = plots.plot_attention(
                self.example_patterns,
                self.example_tokens,
                [str(h) for h in self.example_heads],
                title="Attention of the circuit's stage-1 heads, example 0",
            )
        return figs

    def _stages_figure(self):
        from matplotlib.figure import Figure

        from circuit_widgets import plots

        stages = [st for st in self.pipeline.stages if st.name in self.pipeline.grids]
        fig = Figure(
            figsize=(
                min(24.0, len(stages) * (2.6 + 0.42 * self.n_heads)),
                min(16.0, 1.8 + 0.24 * self.n_layers),
            ),
            dpi=100,
            layout="constrained",
        )
        axes = fig.subplots(1, len(stages), squeeze=False)[0]
        for ax, st in zip(axes, stages):
            into = "logits" if st.receivers == "logits" else f"{st.receivers} ({st.inputs})"
            plots.plot_head_grid(
                self.pipeline.grids[st.name].normalized,
                metric_name="normalized effect",
                title=f"{st.name} @ {st.position} -> {into}",
                ax=ax,
                selected=self.pipeline.circuit.group(st.name).heads,
            )
        fig.suptitle(
            "Path patching stage by stage (picked heads outlined; 1 = as bad as the corrupt "
            "prompt)",
            x=0.01,
            ha="left",
            fontsize=11,
        )
        return fig

    def _attention_figure(self):
        from matplotlib.figure import Figure

        from circuit_widgets import plots

        names = list(self.attention)
        cols = 3
        rows = math.ceil(len(names) / cols)
        fig = Figure(
            figsize=(
                min(18.0, 3.0 + 1.3 * self.n_heads) * 1.0,
                1.2 + rows * (1.0 + 0.16 * self.n_layers),
            ),
            dpi=100,
            layout="constrained",
        )
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax, name in zip(axes, names):
            plots.plot_head_grid(
                self.attention[name],
                metric_name="attention",
                title=name,
                ax=ax,
                selected=self.circuit,
            )
        for ax in axes[len(names) :]:
            ax.axis("off")
        fig.suptitle(
            "Mean attention of every head (query -> key); circuit heads outlined",
            x=0.01,
            ha="left",
            fontsize=11,
        )
        return fig

    def _classes_figure(self):
        from matplotlib.figure import Figure

        relevant = {
            "movers": ("END->IO", "END->S"),
            "inhibition": ("END->S2", "END->IO"),
            "induction": ("S2->S1+1", "S2->S1"),
            "previous_token": ("S1+1->S1",),
        }
        stages = [s for s in dict.fromkeys(c.stage for c in self.head_classes)]
        fig = Figure(figsize=(3.2 * max(1, len(stages)) + 1.0, 3.4), dpi=100, layout="constrained")
        axes = fig.subplots(1, max(1, len(stages)), squeeze=False)[0]
        colors = ["#2166ac", "#b2182b", "#4d9221"]
        for ax, stage in zip(axes, stages):
            rows = [c for c in self.head_classes if c.stage == stage]
            keys = relevant.get(stage, tuple(SCORES))
            width = 0.8 / len(keys)
            for j, k in enumerate(keys):
                xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
                ax.bar(
                    xs,
                    [c.attention.get(k, math.nan) for c in rows],
                    width=width * 0.9,
                    label=k,
                    color=colors[j % len(colors)],
                )
            ax.set_xticks(
                range(len(rows)), [f"{c.head}\n{_short(c.label)}" for c in rows], fontsize=7
            )
            ax.set_ylim(0, 1)
            ax.set_title(f"stage {stage}", loc="left", fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
            ax.legend(fontsize=7, frameon=False)
        axes[0].set_ylabel("mean attention")
        fig.suptitle(
            "Circuit heads: the attention that classifies them", x=0.01, ha="left", fontsize=11
        )
        return fig


def _short(label: str) -> str:
    return {
        "name_mover": "mover",
        "negative_mover": "neg. mover",
        "s_inhibition": "S-inhib.",
        "induction": "induction",
        "duplicate_token": "duplicate",
        "previous_token": "prev. token",
        "unclassified": "-",
    }[label]


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1%}"


def _norm(grid: HeadGrid, h: Head) -> float:
    return float(grid.normalized[h.layer, h.head])


def _top_cells(values: Tensor, k: int) -> list[dict[str, Any]]:
    flat = values.flatten().nan_to_num(-1.0)
    order = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
    n_heads = values.shape[1]
    return [
        {"head": str(Head(i // n_heads, i % n_heads)), "attention": float(flat[i])} for i in order
    ]


def _check_task(task: Any) -> None:
    missing = [p for p in POSITIONS if p not in getattr(task, "positions", {})]
    if missing:
        raise ValueError(
            f"ioi_study needs a task with positions {list(POSITIONS)}; "
            f"{getattr(task, 'name', 'the task')!r} lacks {missing}"
        )


def _classify(stage: str, effect: float, att: dict[str, float], floor: float) -> str:
    """A circuit head's class from the stage that found it and where it attends."""
    if stage == "movers":
        if att["END->IO"] > att["END->S"]:
            return (
                "name_mover" if effect > 0 else "negative_mover" if effect < 0 else "unclassified"
            )
        return "unclassified"
    if stage == "inhibition":
        return "s_inhibition" if att["END->S2"] > att["END->IO"] else "unclassified"
    if stage == "induction":
        ind, dup = att["S2->S1+1"], att["S2->S1"]
        if max(ind, dup) < floor:
            return "unclassified"
        return "induction" if ind >= dup else "duplicate_token"
    if stage == "previous_token":
        return "previous_token" if att["S1+1->S1"] >= floor else "unclassified"
    return "unclassified"


def _decode(model: Any, ids: list[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def ioi_study(
    model: Any,
    *,
    n: int = DEFAULT_N,
    seed: int = 0,
    top_frac: float = DEFAULT_TOP_FRAC,
    task: Any = None,
    pipeline: PipelineResult | None = None,
    min_attention: float = 0.3,
    n_examples: int = 5,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> IOIResult:
    """Run the IOI study on ``model``.

    1. ``n`` IOI prompts (ABC corruption, ``seed``), or your own ``task`` with positions IO, S1,
       S1+1, S2 and END: accuracy (argmax over the vocabulary is IO), IO > S, and the logit diff
       logit(IO) - logit(S) at END, on clean and corrupt prompts.
    2. Activation patching of every head's z at END (noise direction, normalized).
    3. ``circuit_pipeline`` with ``default_stages``: movers -> logits, inhibition -> movers'
       queries, induction/duplicate at S2 -> inhibition keys/values, previous-token at S1+1 ->
       induction keys; the top ``top_frac`` of heads by |normalized effect| per stage.
    4. Head classes from ``head_attention`` (mean attention over the prompts): a stage-1 head
       attending END->IO more than END->S (S1 and S2 together) is a name mover (effect > 0) or
       a negative mover (effect < 0); a stage-2 head attending END->S2 more than END->IO is
       S-inhibition; a stage-3 head is induction (S2->S1+1) or duplicate-token (S2->S1),
       whichever is larger, if it reaches ``min_attention``; a stage-4 head attending
       S1+1->S1 at least ``min_attention`` is previous-token; anything else is unclassified.
    ``pipeline``: a complete ``circuit_pipeline`` result already computed on this very task
    with its default stages (e.g. ``circuit_reuse(...).ioi`` for the same n, seed and
    top_frac), used instead of running the pipeline again.
    Progress runs over patching, the pipeline and the readout; once stopped, what was done
    comes back with complete=False.
    """
    from circuit_widgets import tasks

    check_callbacks(on_progress, should_stop, None)
    if (
        isinstance(top_frac, bool)
        or not isinstance(top_frac, (int, float))
        or not 0 < top_frac <= 1
    ):
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac!r}")
    if (
        isinstance(min_attention, bool)
        or not isinstance(min_attention, (int, float))
        or not 0 <= min_attention <= 1
    ):
        raise ValueError(f"min_attention must be in [0, 1], got {min_attention!r}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 0:
        raise ValueError(f"n_examples must be an int >= 0, got {n_examples!r}")
    if pipeline is not None and (not isinstance(pipeline, PipelineResult) or not pipeline.complete):
        raise ValueError("pipeline must be a complete PipelineResult (from circuit_pipeline)")
    t0 = time.perf_counter()
    shape = model_shape(model)
    if task is None:
        task = tasks.ioi(model, n=n, seed=seed)
    else:
        _check_task(task)
        n = len(task)
    # A task of IOI's shape built by hand (Task.from_pairs) may carry no stages: use IOI's.
    stages = default_stages(task) if getattr(task, "stages", ()) else list(IOI_STAGES)
    if pipeline is not None:
        want, got = [s.name for s in stages], [s.name for s in pipeline.stages]
        sizes = {len(g.metric_clean) for g in pipeline.grids.values()}
        if got != want or sizes - {len(task)}:
            raise ValueError(
                f"pipeline (stages {got}, {sorted(sizes)} prompts) was not run on this "
                f"task (default stages {want}, {len(task)} prompts)"
            )
    stopped = lambda: should_stop is not None and bool(should_stop())
    total = 6000

    def part(offset: int, width: int):
        def cb(done: int, tot: int) -> None:
            if on_progress is not None:
                on_progress(offset + (width * done) // max(tot, 1), total)

        return cb

    notes: list[str] = []
    end = task.positions["END"]
    clean = run_with_edits(model, task.clean_tokens, at=end).logits.float()
    corrupt = run_with_edits(model, task.corrupt_tokens, at=end).logits.float()
    ld = task.logit_diff(clean).cpu()
    acc = float(task.accuracy(clean).mean())
    cand = float(task.candidate_accuracy(clean).mean())
    top_ids = clean.argmax(-1).cpu().tolist()

    complete = True
    act = activation_patch(
        model,
        task,
        component="z",
        positions="END",
        on_progress=part(0, 1000),
        should_stop=should_stop,
    )
    pipe = None
    if not act.complete:
        complete = False
    elif pipeline is not None:
        pipe = pipeline
        notes.append(
            "pipeline: given (computed earlier on the same prompts; its time is not in this study's)"
        )
    else:
        pipe = circuit_pipeline(
            model,
            task,
            stages=stages,
            top_frac=top_frac,
            on_progress=part(1000, 4000),
            should_stop=should_stop,
        )
        complete = pipe.complete
        notes += [f"pipeline: {x}" for x in pipe.notes]

    attention: dict[str, Tensor] = {}
    classes: list[HeadClass] = []
    patterns, ex_tokens, ex_heads = None, [], []
    if complete and pipe is not None and not stopped():  # pipe is None only when incomplete
        every = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
        for name, (at, to) in SCORES.items():
            res = head_attention(model, task, every, to=list(to), at=at)
            attention[name] = res.mean.reshape(shape.n_layers, shape.n_heads).float()
        for st in pipe.stages:
            if st.name not in pipe.grids:
                continue
            for h in sorted(pipe.circuit.group(st.name).heads):
                att = {k: float(v[h.layer, h.head]) for k, v in attention.items()}
                eff = pipe.effect(st.name, h)
                classes.append(
                    HeadClass(h, st.name, eff, _classify(st.name, eff, att, min_attention), att)
                )
        ex_heads = sorted(pipe.circuit.group(pipe.stages[0].name).heads)[:8]
        if ex_heads:
            length = int(task.lengths[0])
            run = run_with_edits(
                model,
                task.clean_tokens[:1, :length],
                capture=[(l, "pattern") for l in sorted({h.layer for h in ex_heads})],
            )
            patterns = torch.stack(
                [
                    run.captured[(h.layer, "pattern")][0, h.head].detach().float().cpu()
                    for h in ex_heads
                ]
            )
            ex_tokens = _decode(model, task.clean_tokens[0, :length].tolist())
    elif complete:
        complete = False
    if complete and on_progress is not None:
        on_progress(total, total)

    examples = []
    for i in range(min(n_examples, len(task))):
        meta = task.meta[i] if i < len(task.meta) else {}
        examples.append(
            {
                "prompt": task.clean_prompts[i] if i < len(task.clean_prompts) else "",
                "corrupt_prompt": task.corrupt_prompts[i] if i < len(task.corrupt_prompts) else "",
                "answer": _decode(model, [int(task.answers[i].reshape(-1)[0])])[0],
                "wrong": _decode(model, [int(task.wrong_answers[i].reshape(-1)[0])])[0],
                "prediction": _decode(model, [top_ids[i]])[0],
                "logit_diff": float(ld[i]),
                **({"IO": meta["IO"], "S": meta["S"]} if "IO" in meta and "S" in meta else {}),
            }
        )
    cfg = getattr(model, "cfg", None)
    name = str(getattr(cfg, "model_name", None) or type(model).__name__)
    name = name.rstrip("/").rsplit("/", 1)[-1]  # a cached checkpoint's folder, not its full path
    return IOIResult(
        accuracy=acc,
        candidate_accuracy=cand,
        logit_diff=float(ld.mean()),
        logit_diff_std=float(ld.std(unbiased=False)),
        corrupt_logit_diff=float(task.logit_diff(corrupt).mean()),
        per_example_logit_diff=ld,
        activation=act,
        pipeline=pipe,
        attention=attention,
        head_classes=classes,
        examples=examples,
        example_patterns=patterns,
        example_tokens=ex_tokens,
        example_heads=ex_heads,
        model_name=name,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        task_name=task.name,
        n=n,
        seed=seed,
        top_frac=float(top_frac),
        min_attention=float(min_attention),
        seconds=time.perf_counter() - t0,
        complete=complete,
        notes=notes,
    )
