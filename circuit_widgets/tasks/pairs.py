"""The rows a task generator collects, one entry per example, and the Task they make.

``assemble_task`` lives in ``tasks.base`` (``Task.from_pairs`` ends in it); it is re-exported
here for the generators that import it from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from circuit_widgets.tasks._tokenize import Vocab
from circuit_widgets.tasks.base import Task, assemble_task
from circuit_widgets.types import Stage

__all__ = ["PairRows", "assemble_task"]


@dataclass
class PairRows:
    """A generator's clean/corrupt examples as it tokenises them, one entry per example."""

    clean: list[list[int]] = field(default_factory=list)
    corrupt: list[list[int]] = field(default_factory=list)
    positions: list[dict[str, int]] = field(default_factory=list)
    clean_prompts: list[str] = field(default_factory=list)
    corrupt_prompts: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int | list[int]] = field(default_factory=list)
    wrong_answers: list[int | list[int]] = field(default_factory=list)

    def add(
        self,
        clean: list[int],
        corrupt: list[int],
        positions: dict[str, int],
        clean_prompt: str,
        corrupt_prompt: str,
        *,
        answer: int | list[int],
        wrong_answer: int | list[int],
        meta: dict[str, Any],
    ) -> None:
        self.clean.append(clean)
        self.corrupt.append(corrupt)
        self.positions.append(positions)
        self.clean_prompts.append(clean_prompt)
        self.corrupt_prompts.append(corrupt_prompt)
        self.answers.append(answer)
        self.wrong_answers.append(wrong_answer)
        self.meta.append(meta)

    def task(
        self,
        name: str,
        vocab: Vocab,
        *,
        metric: str,
        position_sets: dict[str, Sequence[Sequence[int]]] | None = None,
        stages: Sequence[Stage] = (),
    ) -> Task:
        """Right-pad the rows into a Task (clean and corrupt rows must pair up in length)."""
        return assemble_task(
            name,
            vocab,
            self.clean,
            self.corrupt,
            self.positions,
            torch.tensor(self.answers, dtype=torch.long),
            torch.tensor(self.wrong_answers, dtype=torch.long),
            metric=metric,
            clean_prompts=self.clean_prompts,
            corrupt_prompts=self.corrupt_prompts,
            meta=self.meta,
            position_sets=position_sets,
            stages=stages,
        )
