"""The fine-tuning study on tiny models: a copy with one layer changed stands in for the fine-tune."""

from __future__ import annotations

import math

import pytest
import torch

from circuit_widgets import Circuit, cmap_grid, tiny_model
from circuit_widgets.studies import finetuning_study
from circuit_widgets.tasks import entity_tracking

N, BOXES = 4, 2
CIRCUIT = Circuit.from_groups(
    {"A": [(1, 0)], "B": [(1, 2)], "C": [(0, 1)], "D": [(0, 3)]},
    positions={"A": "END", "B": "END", "C": "query_label", "D": "query_label_ctx"},
)


@pytest.fixture(scope="module")
def pair():
    base = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    tuned = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # only layer 1's attention changes, as an adapter on the last layer would
        for name, p in tuned.original_model.named_parameters():
            if "layers.1." in name and "self_attn" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return base, tuned


def test_grid_n_limits_the_per_head_grid_to_the_first_prompts(pair):
    base, tuned = pair
    res = finetuning_study(
        base, tuned, n=N, n_boxes=BOXES, arithmetic_n=4, circuit=CIRCUIT, grid_n=2
    )
    assert (
        res.complete and res.grid_n == 2 and res.to_dict()["grid_n"] == 2 and "n=2" in res.summary()
    )
    et = entity_tracking(base, n=N, seed=0, n_boxes=BOXES)
    expected = cmap_grid(base, tuned, et.subset(slice(0, 2)), component="z", position="END")
    torch.testing.assert_close(res.grid.values, expected.values)
    assert res.grid.values[0].abs().max() < 1e-6 < res.grid.values[1].abs().max()
    full = finetuning_study(base, tuned, n=N, n_boxes=BOXES, arithmetic_n=4, circuit=CIRCUIT)
    assert full.grid_n == N
    torch.testing.assert_close(
        full.grid.values, cmap_grid(base, tuned, et, component="z", position="END").values
    )


@pytest.mark.parametrize("grid_n", [0, N + 1, 1.5, True])
def test_bad_grid_n_is_named(pair, grid_n):
    with pytest.raises(ValueError, match="grid_n"):
        finetuning_study(*pair, n=N, n_boxes=BOXES, circuit=CIRCUIT, grid_n=grid_n)


def test_a_real_error_in_the_arithmetic_step_is_raised_not_skipped(pair):
    with pytest.raises(ValueError, match="digits must be between 1 and 6"):
        finetuning_study(*pair, n=N, n_boxes=BOXES, circuit=CIRCUIT, arithmetic_digits=7)


def test_a_tokenizer_that_cannot_write_the_task_skips_only_the_arithmetic_step(pair):
    # The tiny word-level tokenizer has no token for "37": it cannot express the problems.
    res = finetuning_study(*pair, n=N, n_boxes=BOXES, circuit=CIRCUIT, grid_n=1)
    assert any(
        n.startswith("arithmetic skipped:") and "each digit as its own token" in n
        for n in res.notes
    )
    assert math.isnan(res.arithmetic_base) and math.isnan(res.arithmetic_finetuned)
    assert res.complete and res.cmap is not None and res.grid is not None
