"""attribution_patch: gradients honoured, and the estimate is the first-order term of a patch."""

from __future__ import annotations

import pytest
import torch
from test_core_helpers import caches, random_task, run_metric

from circuit_widgets.core import activation_patch, attribution_patch
from circuit_widgets.core.cache import force_hooked


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize(
    "comp", ["z", "q", "k", "v", "pattern", "attn_out", "mlp_out", "resid_pre"]
)
def test_fast_matches_hooked_gradients(model, comp):
    task = random_task(model)
    fast = attribution_patch(model, task, comp)
    with force_hooked():
        slow = attribution_patch(model, task, comp)
    assert fast.kind == "attribution" and fast.shape == slow.shape
    torch.testing.assert_close(fast.per_example, slow.per_example, atol=1e-6, rtol=1e-4)


def test_estimate_is_the_directional_derivative(tiny_llama):
    """(corrupt - clean) . grad equals d/dt metric(clean + t (corrupt - clean)) at t = 0,
    measured with bridge hooks (so the hooks' gradients are honoured)."""
    model = tiny_llama
    task = random_task(model)
    grid = attribution_patch(model, task, "z")
    c, x = caches(model, task)
    name = "blocks.0.attn.hook_z"
    eps = 1e-2
    for h in range(4):
        up, down = (
            run_metric(
                model,
                task,
                task.clean_tokens,
                [(name, lambda a, hook=None, h=h, t=t: _shift(a, c[name], x[name], h, t))],
            )
            for t in (eps, -eps)
        )
        fd = (up - down) / (2 * eps)
        torch.testing.assert_close(grid.per_example[:, 0, h], fd, atol=2e-4, rtol=2e-3)


def _shift(act, clean, corrupt, h, t):
    out = act.clone()
    out[:, :, h] = clean[:, :, h] + t * (corrupt[:, :, h] - clean[:, :, h])
    return out


def test_positions_and_denoise(tiny_gpt2):
    task = random_task(tiny_gpt2)
    each = attribution_patch(tiny_gpt2, task, "z", positions="each")
    total = attribution_patch(tiny_gpt2, task, "z")
    torch.testing.assert_close(each.values.sum(1), total.values, atol=1e-6, rtol=1e-5)
    den = attribution_patch(tiny_gpt2, task, "v", "denoise", positions="END")
    exact = activation_patch(tiny_gpt2, task, component="v", positions="END", direction="denoise")
    assert den.direction == "denoise" and den.shape == exact.shape
    # denoise values carry the corrupt - clean gap, as activation patching's do
    gap = (den.metric_corrupt - den.metric_clean).mean()
    assert ((den.values - gap).abs() < 0.5 * gap.abs() + 1).all()
