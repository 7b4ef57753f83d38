"""The fast engine on the real demo model (SmolLM2, grouped-query attention), a few heads."""

from __future__ import annotations

import pytest
import torch
from test_core_helpers import caches, random_task, run_metric

from circuit_widgets.core import activation_patch, attribution_patch, path_patch
from circuit_widgets.core.cache import force_hooked
from circuit_widgets.types import Head, Receiver

pytestmark = pytest.mark.integration

# The bridge itself moves demo logits by up to ~7e-5 between two mathematically identical runs
# (same prompt, batch trimmed), so float32 agreement is judged at 1e-4 on metrics of size ~5.
TOL = 1e-4
HEADS = [Head(0, 3), Head(13, 4), Head(21, 8), Head(29, 1)]


@pytest.fixture(scope="module")
def task(demo_model):
    return random_task(demo_model, n=4, seed=0, min_len=9, max_len=13)


def test_z_all_and_end_match_run_with_hooks(demo_model, task):
    _, x = caches(demo_model, task)
    clean = run_metric(demo_model, task, task.clean_tokens)
    for positions in ("all", "END"):
        grid = activation_patch(demo_model, task, positions=positions, heads=HEADS)
        for h in HEADS:
            name = f"blocks.{h.layer}.attn.hook_z"
            mask = (
                torch.ones_like(task.attention_mask, dtype=torch.bool)
                if positions == "all"
                else torch.arange(task.seq_len)[None] == task.positions["END"][:, None]
            )

            def hook(act, hook=None, name=name, h=h, mask=mask):
                out = act.clone()
                out[:, :, h.head] = torch.where(
                    mask[:, :, None], x[name][:, :, h.head], act[:, :, h.head]
                )
                return out

            ref = run_metric(demo_model, task, task.clean_tokens, [(name, hook)]) - clean
            torch.testing.assert_close(grid.per_example[:, h.layer, h.head], ref, atol=TOL, rtol=0)
        assert grid.per_example[:, 29, 1].abs().max() > 1e-3  # the patches do something


def test_gqa_k_and_path_patching_match_generic_path(demo_model, task):
    runs = [
        lambda: activation_patch(
            demo_model, task, component="k", positions="X", heads=[Head(5, 1), Head(20, 2)]
        ),
        lambda: path_patch(demo_model, task, senders=HEADS),
        lambda: path_patch(
            demo_model,
            task,
            senders=HEADS[:2],
            receivers=[Receiver(20, 4, "q"), Receiver(20, 7, "v")],
            position="X",
        ),
        lambda: attribution_patch(demo_model, task, "v"),
    ]
    for run in runs:
        fast = run()
        with force_hooked():
            slow = run()
        torch.testing.assert_close(
            fast.per_example, slow.per_example, atol=TOL, rtol=0, equal_nan=True
        )
