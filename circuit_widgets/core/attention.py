"""Attention patterns of chosen heads on one prompt: what the attention view draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.types import Head, ModelLike


@dataclass(frozen=True, eq=False)
class PatternResult:
    """Attention probabilities (query x key) of ``heads`` on one prompt ``tokens``."""

    patterns: Float[Tensor, "head query key"]
    heads: list[Head]
    tokens: Int[Tensor, " pos"]


def attention_patterns(
    model: ModelLike, tokens: Int[Tensor, " pos"], heads: list[Head]
) -> PatternResult:
    """One forward through the bridge's per-query-head pattern hooks (on grouped-query models
    each query head has its own pattern, computed from its shared key/value head)."""
    toks = tokens.reshape(-1)
    n = int(toks.shape[0])
    if not heads:
        return PatternResult(torch.zeros(0, n, n), [], toks)
    layers = sorted({h.layer for h in heads})
    run = run_with_edits(
        model,
        toks.reshape(1, -1).to(model.cfg.device),
        None,
        capture=[(layer, "pattern") for layer in layers],
    )
    out = torch.stack([run.captured[(h.layer, "pattern")][0, h.head] for h in heads])
    return PatternResult(out.float().cpu(), list(heads), toks)
