"""Tasks from tokenised clean/corrupt rows: the generators' common tail and user prompt pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int

from circuit_widgets.tasks._tokenize import (
    PositionSpec,
    Vocab,
    pad_rows,
    resolve_positions,
    single_token_ids,
    stack_positions,
    token_kind,
)
from circuit_widgets.tasks.base import Task


def assemble_task(
    name: str,
    vocab: Vocab,
    clean_rows: Sequence[list[int]],
    corrupt_rows: Sequence[list[int]],
    positions: Sequence[Mapping[str, int]],
    answers: Int[torch.Tensor, " batch *k"],
    wrong_answers: Int[torch.Tensor, " batch *k"],
    *,
    metric: str,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    meta: Sequence[dict[str, Any]] | None = None,
    position_sets: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> Task:
    """Right-pad the rows and build the Task; clean and corrupt rows must pair up in length."""
    for i, (c, k) in enumerate(zip(clean_rows, corrupt_rows, strict=True)):
        if len(c) != len(k):
            raise ValueError(
                f"{name}: example {i}: clean and corrupt prompts tokenise to different lengths "
                f"({len(c)} vs {len(k)}), so their key positions do not line up.\n"
                f"  clean:   {vocab.str_tokens(c)}\n  corrupt: {vocab.str_tokens(k)}"
            )
    clean, mask = pad_rows(clean_rows, vocab.pad_id)
    corrupt, _ = pad_rows(corrupt_rows, vocab.pad_id)
    sets = {
        k: torch.tensor([list(r) for r in v], dtype=torch.long)
        for k, v in (position_sets or {}).items()
    }
    return Task(
        name=name,
        clean_tokens=clean,
        corrupt_tokens=corrupt,
        attention_mask=mask,
        answers=answers,
        wrong_answers=wrong_answers,
        positions=stack_positions(positions),
        metric_name=metric,
        clean_prompts=list(clean_prompts),
        corrupt_prompts=list(corrupt_prompts),
        meta=list(meta) if meta is not None else [{} for _ in clean_rows],
        position_sets=sets,
    )


def task_from_pairs(
    model: Any,
    clean: Sequence[str],
    corrupt: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    wrong_answers: Sequence[str | Sequence[str]],
    *,
    positions: PositionSpec | None = None,
    metric: str = "logit_diff",
    name: str = "custom",
) -> Task:
    """See ``Task.from_pairs``."""
    what = f"Task.from_pairs({name!r})"
    for label, seq in (
        ("clean", clean),
        ("corrupt", corrupt),
        ("answers", answers),
        ("wrong_answers", wrong_answers),
    ):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{what}: {label} must be a list with one entry per example, got {seq!r}"
            )
    n = len(clean)
    if n == 0:
        raise ValueError(f"{what}: no examples given")
    lengths = {
        "corrupt": len(corrupt),
        "answers": len(answers),
        "wrong_answers": len(wrong_answers),
    }
    if any(v != n for v in lengths.values()):
        raise ValueError(f"{what}: {n} clean prompts but {lengths}; give one of each per example")
    vocab = Vocab.of(model)
    enc_clean = [vocab.encode(p) for p in clean]
    enc_corrupt = [vocab.encode(p) for p in corrupt]
    rows_clean = [ids for ids, _ in enc_clean]
    rows_corrupt = [ids for ids, _ in enc_corrupt]
    pos = resolve_positions(vocab, clean, enc_clean, positions, what)
    for i, (c, k) in enumerate(zip(rows_clean, rows_corrupt)):
        if len(c) != len(k):
            break  # assemble_task reports it with both token lists
        for pname, p in pos[i].items():
            a, b = vocab.str_tokens([c[p], k[p]])
            if token_kind(a) != token_kind(b):
                raise ValueError(
                    f"{what}: example {i}: position {pname!r} ({p}) holds {a!r} in the clean "
                    f"prompt but {b!r} in the corrupt one, so the key positions do not line up.\n"
                    f"  clean:   {vocab.str_tokens(c)}\n  corrupt: {vocab.str_tokens(k)}"
                )
    return assemble_task(
        name,
        vocab,
        rows_clean,
        rows_corrupt,
        pos,
        single_token_ids(vocab, answers, "answer", what),
        single_token_ids(vocab, wrong_answers, "wrong answer", what),
        metric=metric,
        clean_prompts=clean,
        corrupt_prompts=corrupt,
        meta=[{"answer": a, "wrong_answer": w} for a, w in zip(answers, wrong_answers)],
    )
