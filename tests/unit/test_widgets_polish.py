"""Issue 15, item 8 (Python side): what the grids say about themselves."""

from __future__ import annotations

import numpy as np
import pytest
from test_dcm import CARRIERS, planted_dcm_model, planted_desideratum

import circuit_widgets as cw
from circuit_widgets.types import Circuit
from circuit_widgets.widgets import CircuitExplorer, DCMWidget, HeadGridWidget, PathPatchingWidget
from circuit_widgets.widgets.path_patching import ZERO_AT_LOGITS


@pytest.fixture(scope="module")
def task(tiny_llama):
    return cw.tasks.ioi(tiny_llama, n=4, seed=0)


def test_activation_grid_has_a_title_and_names_its_position(tiny_llama, task):
    grid = cw.activation_patch(tiny_llama, task, component="z", positions="END")
    w = HeadGridWidget(grid)
    assert w.title == f"Activation patching · {grid.metric_name}"
    assert w.position == "END" and w.scale == "diverging" and w.n_cells == 0
    assert HeadGridWidget(grid, title="mine").title == "mine"
    assert HeadGridWidget(np.zeros((2, 2))).title == ""


def test_path_patching_counts_the_possible_senders_and_names_the_position(tiny_llama, task):
    pp = PathPatchingWidget(tiny_llama, task, position="END")
    pp.grid.selected = [[1, 2]]
    pp.receivers = "selected"
    pp.run()
    pp.wait(60)
    assert pp.status == "done"
    n_heads = tiny_llama.cfg.n_heads
    assert pp.grid.n_cells == 1 * n_heads  # senders: layer 0 only, not every head
    assert pp.grid.position == "END"


def test_path_patching_to_the_logits_away_from_end_says_why_it_is_zero(tiny_llama, task):
    pp = PathPatchingWidget(tiny_llama, task, position="S2", preview=False)
    pp.run()
    pp.wait(60)
    assert pp.message == ZERO_AT_LOGITS.format(position="S2")
    assert np.nanmax(np.abs(pp.grid.values)) < 1e-5  # what the message explains
    pp.position = "END"
    pp.run()
    pp.wait(60)
    assert pp.message == ""


def test_dcm_mask_uses_a_sequential_scale_and_names_its_position():
    model = planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})
    w = DCMWidget(model, planted_desideratum(n=8), position="END", lams=[0.1])
    assert w.grid.scale == "sequential" and w.grid.position == "END"


def test_an_empty_circuit_prints_one_way(tiny_llama, task):
    assert str(Circuit()) == str(Circuit.from_heads([])) == "Circuit(empty)"
    assert str(Circuit.from_heads([], name="mine")) == "Circuit(mine; empty)"
    assert str(Circuit.from_heads(["1.2"])) == "Circuit(heads@all: 1.2)"
    assert "circuit Circuit(empty)" in repr(CircuitExplorer(tiny_llama, task))


def test_front_end_messages_are_dispatched_once_by_the_base(tiny_llama, task):
    """Issue 16 §3: one handler per widget; Run calls the widget's own action through
    _run_from_front_end (a refused Run shows in the widget), Cancel cancels."""
    model = planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})
    widgets = [
        PathPatchingWidget(tiny_llama, task),
        DCMWidget(model, planted_desideratum(n=8), position="END", lams=[0.1]),
        HeadGridWidget(np.zeros((2, 2))),
    ]
    for w in widgets:
        assert w._msg_callbacks.callbacks == [w._on_front_end_msg]
    pp, dcm, _ = widgets
    pp.receivers = "selected"  # nothing selected: refused, shown in the widget
    pp._on_front_end_msg(pp, {"type": "run"}, [])
    assert pp.status == "error" and "no heads are selected" in pp.error
    dcm._on_front_end_msg(dcm, {"type": "run"}, [])
    dcm.wait(120)
    assert dcm.status == "done" and dcm.n_done == 1


def test_core_attention_patterns_match_the_bridge(tiny_llama, task):
    """Issue 16 §3: the attention view's computation is a core function returning a result."""
    import torch

    from circuit_widgets.core.attention import PatternResult, attention_patterns
    from circuit_widgets.types import Head

    toks = task.clean_tokens[1, : int(task.lengths[1])]
    heads = [Head(0, 1), Head(1, 3)]
    res = attention_patterns(tiny_llama, toks, heads)
    assert isinstance(res, PatternResult) and res.heads == heads
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(
            toks[None], names_filter=lambda n: n.endswith("hook_pattern")
        )
    for i, h in enumerate(heads):
        torch.testing.assert_close(
            res.patterns[i], cache[f"blocks.{h.layer}.attn.hook_pattern"][0, h.head]
        )
    assert attention_patterns(tiny_llama, toks, []).patterns.shape == (0, len(toks), len(toks))
