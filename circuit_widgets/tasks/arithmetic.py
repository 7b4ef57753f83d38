"""Goat-style arithmetic (Liu & Low 2023): "37+48=" -> "85", read as its first digit.

The demo tokenizer (SmolLM2) writes every digit as its own token, so the whole answer is
several tokens; the task's answer token is the answer's FIRST digit, read at "=" (END).
Accuracy = that digit is the argmax over the whole vocabulary. Fine-tuning
(``circuit_widgets.finetune``) trains on full answers; ``exact_match`` scores them greedily.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from circuit_widgets.tasks._tokenize import Prompt, Vocab, check_n
from circuit_widgets.tasks.base import Task
from circuit_widgets.tasks.pairs import PairRows

OPERATIONS = ("+", "-")
DIGITS = "0123456789"
HELD_OUT_MOD = 5


def held_out(a: int, op: str, b: int) -> bool:
    """True for the fifth of all problems kept out of fine-tuning (a fixed hash, not random)."""
    # Multiplicative hash so neighbouring problems land on both sides of the split.
    return (a * 7919 + b * 104729 + OPERATIONS.index(op) * 31) % HELD_OUT_MOD == 0


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def sample_problem(
    rng: random.Random, digits: int, ops: tuple[str, ...], split: str
) -> tuple[int, str, int]:
    """Operands with exactly ``digits`` digits (b <= a for '-', so answers stay >= 0)."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    while True:
        op = rng.choice(ops)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
        if split == "all" or (split == "test") == held_out(a, op, b):
            return a, op, b


def check_args(digits: int, ops: tuple[str, ...] | str, split: str, what: str) -> tuple[str, ...]:
    """The checked operations of an arithmetic task's arguments (ValueError naming ``what``)."""
    if isinstance(digits, bool) or not isinstance(digits, int):
        raise TypeError(f"{what}: digits must be an int, got {digits!r}")
    if not 1 <= digits <= 6:
        raise ValueError(f"{what}: digits must be between 1 and 6, got {digits}")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    if not ops or any(o not in OPERATIONS for o in ops):
        raise ValueError(f"{what}: ops must be a non-empty subset of {OPERATIONS}, got {ops!r}")
    if split not in ("test", "train", "all"):
        raise ValueError(f"{what}: split must be 'test', 'train' or 'all', got {split!r}")
    return ops


def digit_ids(vocab: Vocab, what: str) -> list[int]:
    """The token id of each digit 0-9; a tokenizer that merges digits cannot run this task."""
    ids = [vocab.single_token(d) for d in DIGITS]
    merged = vocab.ids("37+48=")
    if None in ids or len(merged) != 6:
        raise ValueError(
            f"{what} needs a tokenizer that writes each digit as its own token (like SmolLM2's); "
            f"{vocab.name!r} tokenises '37+48=' as {vocab.str_tokens(merged)}"
        )
    return [int(i) for i in ids if i is not None]


def arithmetic(
    model: Any,
    n: int,
    seed: int = 0,
    *,
    digits: int = 2,
    ops: tuple[str, ...] | str = ("+",),
    split: str = "test",
) -> Task:
    """``n`` problems "a<op>b=" with ``digits``-digit operands; answer = first digit of the result.

    ``split="test"`` draws only problems that fine-tuning never sees (``held_out``), "train"
    only the others, "all" both. Corrupt = another problem of the same shape whose answer
    starts with a different digit. Wrong answers [batch, 9]: the other nine digits.
    Positions: a_first, a_last, op, b_first, b_last, END (the "=" token). Metric: accuracy.
    """
    what = "arithmetic"
    check_n(n, what)
    ops = check_args(digits, ops, split, what)
    vocab = Vocab.of(model)
    dig = digit_ids(vocab, what)
    rng = random.Random(seed)
    out = PairRows()
    for _ in range(n):
        a, op, b = sample_problem(rng, digits, ops, split)
        first = str(solve(a, op, b))[0]
        for _ in range(1000):
            ca, cop, cb = sample_problem(rng, digits, ops, split)
            if str(solve(ca, cop, cb))[0] != first:
                break
        else:  # 1-digit subtraction can pin the first digit; say so instead of looping
            raise ValueError(
                f"{what}: cannot find a corrupt problem for {a}{op}{b}; use more digits"
            )
        rows = []
        for x, o, y in ((a, op, b), (ca, cop, cb)):
            prompt = Prompt().add(str(x), "a").add(o, "op").add(str(y), "b").add("=")
            ids, pos = vocab.encode_prompt(prompt)
            rows.append((ids, pos, prompt.text))
        (ids, pos, text), (cids, _, ctext) = rows
        named = {
            "a_first": pos["a"],
            "a_last": pos["a"] + digits - 1,
            "op": pos["op"],
            "b_first": pos["b"],
            "b_last": pos["b"] + digits - 1,
            "END": pos["END"],
        }
        out.add(
            ids,
            cids,
            named,
            text,
            ctext,
            answer=dig[int(first)],
            wrong_answer=[dig[d] for d in range(10) if d != int(first)],
            meta={
                "a": a,
                "op": op,
                "b": b,
                "answer": solve(a, op, b),
                "corrupt": f"{ca}{cop}{cb}",
                "corrupt_answer": solve(ca, cop, cb),
            },
        )
    return out.task("arithmetic", vocab, metric="accuracy")


@torch.no_grad()
def greedy_answers(
    model: Any, task: Task, *, max_digits: int | None = None, batch_size: int = 64
) -> list[str]:
    """The digits each example's prompt continues with, greedily, up to the first non-digit.

    ``model`` is a TransformerBridge. Each example's next token is written at its own END + 1,
    over the right padding, so prompts of different lengths decode in one batch.
    """
    if getattr(model, "cfg", None) is None:
        raise TypeError("greedy_answers needs a TransformerBridge (e.g. load_model('demo-arith'))")
    vocab = Vocab.of(model)
    dig = {i: d for d, i in enumerate(digit_ids(vocab, "greedy_answers"))}
    if max_digits is None:
        max_digits = max(len(str(m.get("answer", ""))) for m in task.meta) + 1 if task.meta else 8
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(task), batch_size):
        sub = task.subset(slice(start, start + batch_size))
        tokens, end = sub.clean_tokens.to(device), sub.positions["END"].to(device)
        tokens = torch.cat([tokens, tokens.new_full((len(sub), max_digits), vocab.pad_id)], 1)
        rows = torch.arange(len(sub), device=device)
        written, done = [""] * len(sub), [False] * len(sub)
        for _ in range(max_digits):
            nxt = model(tokens)[rows, end].argmax(-1)
            end = end + 1
            tokens[rows, end] = nxt
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t in dig:
                    written[i] += str(dig[t])
                else:
                    done[i] = True
            if all(done):
                break
        out += written
    return out


def exact_match(model: Any, task: Task, *, batch_size: int = 64) -> torch.Tensor:
    """1.0 per example whose greedy continuation is exactly its whole answer, then a non-digit."""
    got = greedy_answers(model, task, batch_size=batch_size)
    return torch.tensor([float(g == str(m["answer"])) for g, m in zip(got, task.meta)])
