"""run_with_edits on the real demo model (Llama, grouped-query): fast engine == bridge hooks."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets.core import cache
from circuit_widgets.core.edits import run_with_edits

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("grad", [False, True])
def test_head_edits_agree_with_bridge_hooks(demo_model, grad):
    tokens = demo_model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    at = torch.tensor([tokens.shape[1] - 1])

    def edits():
        scale = torch.ones(9, requires_grad=grad)

        def z(a):
            return (
                a
                * scale[None, None, :, None]
                * torch.tensor([1.0] * 8 + [0.0])[None, None, :, None]
            )

        def pattern(p):
            out = p.clone()
            out[:, 4] = 0.0
            out[:, 4, :, 0] = 1.0  # head 4 reads the first token only
            return out

        return scale, {(20, "z"): z, (14, "pattern"): pattern}

    runs = []
    for hooked in (False, True):
        scale, e = edits()
        with cache.force_hooked(hooked):
            run = run_with_edits(demo_model, tokens, e, at=at, grad=grad)
        if grad:
            run.logits[0, 0].backward()
            runs.append((run.logits.detach(), scale.grad.clone()))
        else:
            runs.append((run.logits, None))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        plain = demo_model(tokens)[0, -1]
    assert (runs[0][0][0] - plain).abs().max() > 1e-2
    if grad:
        torch.testing.assert_close(runs[0][1], runs[1][1], atol=2e-3, rtol=2e-2)
