"""The fine-tuning study (Prakash et al. 2024): base vs fine-tuned accuracy on arithmetic and
entity tracking, the base model's entity-tracking circuit, and cross-model activation patching
(CMAP) of the fine-tuned model's heads into the base, per group, for the circuit and per head."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from circuit_widgets.core.common import Progress, Stop, check_callbacks
from circuit_widgets.core.cross_model import CMAPResult, check_compatible, cmap, cmap_grid
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.types import Circuit

PAPER = (
    "Prakash et al., LLaMA-7B base / Goat-7B (arithmetic LoRA), 7 boxes: entity tracking "
    "0.66 -> 0.82; CMAP of Goat's heads into LLaMA: whole circuit 0.82, A 0.82, B 0.78, "
    "C 0.62, D 0.65 (FLoat: 0.82 / 0.82 / 0.74 / 0.56 / 0.65)."
)


@dataclass(frozen=True, eq=False)
class FinetuningResult:
    """Everything the study measures; ``summary()`` for people, ``to_dict()`` for reports.

    Accuracies are argmax over the whole vocabulary at END (arithmetic: the answer's first
    digit). ``pipeline`` is None when a circuit was given; ``cmap`` patches the fine-tuned
    model's z (before W_O) into the base at each group's heads and position, and ``grid`` every
    head alone at ``grid_position``.
    """

    arithmetic_base: float
    arithmetic_finetuned: float
    entity_base: float
    entity_finetuned: float
    circuit: Circuit
    pipeline: PipelineResult | None
    cmap: CMAPResult | None
    grid: HeadGrid | None
    n: int
    arithmetic_n: int
    n_boxes: int
    seed: int
    top_k: int
    grid_position: str
    grid_n: int
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)
    split: str = "all"

    def cmap_table(self):
        """One row per group (and "circuit"): heads, position, base / fine-tuned / patched."""
        return None if self.cmap is None else self.cmap.to_dataframe()

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (JSON-ready; NaN stays a float NaN)."""
        cm = None
        if self.cmap is not None:
            cm = {
                g: {
                    **self.cmap.group(g),
                    "heads": [str(h) for h in self.cmap.heads[g]],
                    "position": self.cmap.positions.get(g),
                }
                for g in self.cmap.groups
            }
        top = None
        if self.grid is not None:
            top = [{"head": str(h), "value": v} for h, v in self.grid.top(10)]
        return {
            "n": self.n,
            "arithmetic_n": self.arithmetic_n,
            "n_boxes": self.n_boxes,
            "split": self.split,
            "seed": self.seed,
            "top_k": self.top_k,
            "grid_position": self.grid_position,
            "grid_n": self.grid_n,
            "seconds": self.seconds,
            "complete": self.complete,
            "arithmetic_accuracy": {
                "base": self.arithmetic_base,
                "finetuned": self.arithmetic_finetuned,
            },
            "entity_tracking_accuracy": {
                "base": self.entity_base,
                "finetuned": self.entity_finetuned,
            },
            "circuit": self.circuit.to_dict(),
            "cmap": cm,
            "cmap_grid_top": top,
            "notes": list(self.notes),
        }

    @property
    def _found(self) -> str:
        """How the circuit came about: the base model's path patching, or passed in."""
        if self.pipeline is not None:
            return f"top {self.top_k} heads per group"
        return f"a given circuit of {len(self.circuit.heads)} heads"

    @property
    def _circuit_label(self) -> str:
        return "Base circuit" if self.pipeline is not None else "Circuit (given)"

    def summary(self) -> str:
        """A few lines of text: both accuracies, the circuit, CMAP per group and per head."""
        state = "" if self.complete else "; STOPPED EARLY"
        lines = [
            (
                f"Fine-tuning study (n={self.n} prompts per task, {self.n_boxes} boxes, {self._found}, "
                f"seed {self.seed}; {self.seconds:.0f} s{state})"
            ),
            (
                f"Arithmetic accuracy (first answer digit, n={self.arithmetic_n}): base {_pct(self.arithmetic_base)}, fine-tuned "
                f"{_pct(self.arithmetic_finetuned)}"
            ),
            (
                f"Entity-tracking accuracy: base {_pct(self.entity_base)}, fine-tuned "
                f"{_pct(self.entity_finetuned)} (chance among the boxes {_pct(1 / self.n_boxes)})"
            ),
            f"{self._circuit_label}: {_groups(self.circuit)}",
        ]
        if self.cmap is not None:
            parts = []
            for g in self.cmap.groups:
                d = self.cmap.group(g)
                parts.append(f"{g} {_pct(d['patched_accuracy'])} (p {d['patched_metric']:.4f})")
            d0 = self.cmap.group(self.cmap.groups[0])
            lines.append(
                f"CMAP, fine-tuned heads into the base: accuracy base {_pct(d0['base_accuracy'])}, "
                f"fine-tuned {_pct(d0['finetuned_accuracy'])}; patched " + ", ".join(parts)
            )
        if self.grid is not None:
            top = ", ".join(f"{h} {v:+.4f}" for h, v in self.grid.top(5))
            lines.append(
                f"CMAP per head at {self.grid_position} (p(answer) change, n={self.grid_n}), "
                f"largest: {top}"
            )
        lines.append(PAPER)
        lines += [f"note: {x}" for x in self.notes]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """Matplotlib Figures: accuracies base vs fine-tuned, CMAP per group, CMAP per head."""
        from circuit_widgets import plots

        figs: dict[str, Any] = {
            "accuracy": plots.plot_bars(
                {
                    "arithmetic": {
                        "base": self.arithmetic_base,
                        "fine-tuned": self.arithmetic_finetuned,
                    },
                    "entity tracking": {
                        "base": self.entity_base,
                        "fine-tuned": self.entity_finetuned,
                    },
                },
                title="Accuracy, base vs fine-tuned",
            ),
        }
        if self.cmap is not None:
            bars = {}
            for g in self.cmap.groups:
                d = self.cmap.group(g)
                bars[g] = {
                    "base": d["base_accuracy"],
                    "fine-tuned": d["finetuned_accuracy"],
                    "patched": d["patched_accuracy"],
                }
            figs["cmap"] = plots.plot_bars(bars, title="CMAP: entity-tracking accuracy per group")
        if self.grid is not None:
            figs["cmap_grid"] = plots.plot_head_grid(
                self.grid,
                selected=self.circuit,
                title=f"CMAP per head at {self.grid_position}: p(answer) change (circuit outlined)",
            )
        return figs

    def __repr__(self) -> str:
        return self.summary()


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _groups(c: Circuit) -> str:
    return (
        "; ".join(
            f"{g.name}@{g.position}: {', '.join(str(h) for h in sorted(g.heads)) or '-'}"
            for g in c.groups
        )
        or "(empty)"
    )


@torch.no_grad()
def _accuracy(model: Any, task: Any) -> float:
    logits = run_with_edits(model, task.clean_tokens, at=task.positions["END"]).logits
    return float(task.accuracy(logits.float()).mean())


def finetuning_study(
    base: Any,
    finetuned: Any,
    *,
    n: int = 16,
    n_boxes: int = 7,
    seed: int = 0,
    split: str = "all",
    top_k: int = 4,
    arithmetic_digits: int = 2,
    arithmetic_n: int | None = None,
    circuit: Circuit | None = None,
    grid_position: str = "END",
    grid_n: int | None = None,
    on_progress: Progress = None,
    should_stop: Stop = None,
) -> FinetuningResult:
    """Run the fine-tuning study on a base model and its fine-tune (same architecture).

    1. Accuracy of both models on ``arithmetic_n`` (default ``n``) held-out arithmetic problems ("37+48=", the answer's
       first digit; ``arithmetic_digits``-digit addition) and ``n`` entity-tracking prompts
       with ``n_boxes`` boxes.
    2. The base model's entity-tracking circuit: ``circuit_pipeline`` with its default stages,
       ``top_k`` heads per group ranked by (p_patched - p_clean) / p_clean, on the same prompts
       (or the ``circuit`` given, e.g. from ``entity_tracking_study``).
    3. CMAP: the fine-tuned model's head outputs written into the base at each group's heads
       and position, each group alone and the whole circuit at once.
    4. CMAP per head: every head alone at ``grid_position``, on the first ``grid_n`` (default
       all ``n``) prompts: one base forward per head, so this is the slow step.
    ``split`` picks the entity-tracking prompts' objects and labels (``tasks.entity_tracking``):
    "test" for a fine-tune trained on the "train" split (demo-boxes).
    Progress covers all steps; once stopped the result keeps what was done (complete=False).
    """
    from circuit_widgets import tasks
    from circuit_widgets.tasks._tokenize import Vocab
    from circuit_widgets.tasks.arithmetic import check_args as check_arithmetic_args
    from circuit_widgets.tasks.arithmetic import digit_ids

    check_callbacks(on_progress, should_stop, None)
    check_compatible(base, finetuned)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if arithmetic_n is not None and (
        isinstance(arithmetic_n, bool) or not isinstance(arithmetic_n, int) or arithmetic_n < 1
    ):
        raise ValueError(f"arithmetic_n must be an int >= 1 or None, got {arithmetic_n!r}")
    if grid_n is not None and (
        isinstance(grid_n, bool) or not isinstance(grid_n, int) or not 1 <= grid_n <= n
    ):
        raise ValueError(f"grid_n must be an int in 1..n ({n}) or None, got {grid_n!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if circuit is not None and not isinstance(circuit, Circuit):
        circuit = getattr(circuit, "circuit", None)
        if not isinstance(circuit, Circuit):
            raise ValueError("circuit must be a Circuit (or a result holding one), or None")
    t0 = time.perf_counter()
    notes: list[str] = []
    check_arithmetic_args(
        arithmetic_digits, ("+",), "test", "arithmetic"
    )  # bad arguments always raise
    try:
        digit_ids(Vocab.of(base), "arithmetic")
    except (
        ValueError
    ) as exc:  # only a tokenizer that cannot write the task (GPT-2's) skips the step
        arith = None
        notes.append(f"arithmetic skipped: {exc}")
    else:
        arith = tasks.arithmetic(base, n=arithmetic_n or n, seed=seed, digits=arithmetic_digits)
    et = tasks.entity_tracking(base, n=n, seed=seed, n_boxes=n_boxes, split=split)
    if grid_position != "all" and grid_position not in et.positions:
        raise ValueError(
            f"grid_position must be 'all' or one of {sorted(et.positions)}, got {grid_position!r}"
        )
    a_base, a_ft = (
        (_accuracy(base, arith), _accuracy(finetuned, arith))
        if arith is not None
        else (math.nan, math.nan)
    )
    e_base, e_ft = _accuracy(base, et), _accuracy(finetuned, et)
    total = 1000
    stopped = lambda: should_stop is not None and should_stop()

    def part(lo: int, hi: int):
        def cb(done: int, tot: int) -> None:
            if on_progress is not None:
                on_progress(lo + ((hi - lo) * done) // max(tot, 1), total)

        return cb

    pipe = None
    complete = True
    if circuit is None:
        pipe = circuit_pipeline(
            base,
            et,
            top_k=top_k,
            on_progress=part(0, 700),
            should_stop=should_stop,
            rank_by="relative",
        )  # Prakash et al.'s (p_patched - p_clean) / p_clean
        circuit = pipe.circuit
        complete = pipe.complete
        notes += [f"pipeline: {x}" for x in pipe.notes]
    else:
        circuit.validate(*_shape(base), list(et.positions))
    res = grid = None
    groups = Circuit(tuple(g for g in circuit.groups if g.heads), circuit.name)
    if complete and not stopped() and groups.groups:
        res = cmap(
            base, finetuned, et, circuit=groups, on_progress=part(700, 750), should_stop=should_stop
        )
        complete = res.complete
        notes += [f"cmap: {x}" for x in res.notes]
    elif complete and not groups.groups:
        notes.append("the circuit has no heads: CMAP per group skipped")
    if complete and not stopped():
        grid_task = et if grid_n is None else et.subset(slice(0, grid_n))
        grid = cmap_grid(
            base,
            finetuned,
            grid_task,
            component="z",
            position=grid_position,
            on_progress=part(750, 1000),
            should_stop=should_stop,
        )
        complete = grid.complete
    elif complete:
        complete = False
    if complete and on_progress is not None:
        on_progress(total, total)
    if e_base < 1.0 / n_boxes and e_ft < 1.0 / n_boxes:
        notes.append(
            "both models are below chance on entity tracking here, so CMAP has no gain "
            "to explain; read it as a check of the machinery"
        )
    return FinetuningResult(
        arithmetic_base=a_base,
        arithmetic_finetuned=a_ft,
        entity_base=e_base,
        entity_finetuned=e_ft,
        circuit=circuit,
        pipeline=pipe,
        cmap=res,
        grid=grid,
        n=n,
        arithmetic_n=arithmetic_n or n,
        n_boxes=n_boxes,
        seed=seed,
        top_k=top_k,
        grid_position=grid_position,
        grid_n=grid_n or n,
        seconds=time.perf_counter() - t0,
        complete=complete,
        notes=notes,
        split=split,
    )


def _shape(model: Any) -> tuple[int, int]:
    from circuit_widgets.models import model_shape

    s = model_shape(model)
    return s.n_layers, s.n_heads
