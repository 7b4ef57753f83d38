"""Shared helpers for the core tests (no tests here): a random right-padded task, references."""

from __future__ import annotations

import torch

from circuit_widgets.tasks.base import Task


def random_task(
    model,
    n: int = 5,
    seed: int = 0,
    min_len: int = 7,
    max_len: int = 11,
    metric: str = "logit_diff",
) -> Task:
    """Random prompts of mixed lengths (right-padded); corrupt differs from position 2 on."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(int(model.cfg.d_vocab), 400)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    s = int(lengths.max())
    clean = torch.randint(3, vocab, (n, s), generator=g)
    corrupt = clean.clone()
    for b in range(n):
        L = int(lengths[b])
        flip = torch.rand(L, generator=g) < 0.4
        flip[:2] = False
        flip[2 + int(torch.randint(0, L - 3, (1,), generator=g))] = True
        corrupt[b, :L] = torch.where(flip, torch.randint(3, vocab, (L,), generator=g), clean[b, :L])
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    clean[mask == 0] = 0
    corrupt[mask == 0] = 0
    end = lengths - 1
    answers = torch.randint(3, vocab, (n,), generator=g)
    wrong = torch.randint(3, vocab, (n, 2), generator=g)
    positions = {"END": end, "X": end - 3, "Y": torch.full((n,), 1)}
    return Task("random", clean, corrupt, mask, answers, wrong, positions, metric_name=metric)


def run_metric(model, task, tokens, hooks=()) -> torch.Tensor:
    with torch.no_grad():
        return task.metric(model.run_with_hooks(tokens, fwd_hooks=list(hooks)))


_CACHES: dict = {}


def caches(model, task):
    """(clean, corrupt) run_with_cache of a task, memoised for the task's lifetime."""
    key = (id(model), id(task))
    if key not in _CACHES or _CACHES[key][0] is not task:
        with torch.no_grad():
            _, c = model.run_with_cache(task.clean_tokens)
            _, x = model.run_with_cache(task.corrupt_tokens)
        _CACHES.clear()
        _CACHES[key] = (task, c, x)
    return _CACHES[key][1], _CACHES[key][2]
