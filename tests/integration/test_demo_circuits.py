"""The circuit-reuse study end to end on the demo model (SmolLM2-135M, 30 x 9 heads, 3 KV heads).

Asserts structure, not the paper's numbers: whatever the demo model gives is the result. The
numbers of this run are printed (pytest -s) so they can be recorded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuit_widgets.core.circuits import head_overlap
from circuit_widgets.studies.reuse import ReuseResult, circuit_reuse
from circuit_widgets.types import Circuit, Head

pytestmark = pytest.mark.integration

N = 8  # prompts per task: small, so the whole study stays within CI's budget on 2 cores


@pytest.fixture(scope="module")
def study(demo_model):
    seen = []
    res = circuit_reuse(
        demo_model,
        n=N,
        top_frac=0.02,
        seed=0,
        n_random=2,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    return res, seen


def test_study_structure(study, demo_model):
    res, seen = study
    assert isinstance(res, ReuseResult) and res.complete
    assert seen and seen[-1][0] == seen[-1][1]
    per_stage = max(1, round(0.02 * 30 * 9))  # top 2% of 270 heads = 5 per stage
    for pipe, n_stages in ((res.ioi, 4), (res.colored, 4)):
        assert len(pipe.circuit.groups) == n_stages
        for g in pipe.circuit.groups:
            assert len(g.heads) == per_stage
            grid = pipe.grids[g.name]
            ranked = sorted(grid.normalized[grid.done].abs().tolist(), reverse=True)
            picked = sorted((abs(pipe.effect(g.name, h)) for h in g.heads), reverse=True)
            assert picked == pytest.approx(ranked[:per_stage])  # exactly the top |effect| heads
        pipe.circuit.validate(30, 9)
    o = res.overlap
    again = head_overlap(res.ioi.circuit, res.colored.circuit)
    assert o.n_shared == again.n_shared == len(res.ioi.circuit.heads & res.colored.circuit.heads)
    assert o.frac_a == pytest.approx(o.n_shared / len(res.ioi.circuit))
    assert set(res.negative_movers) <= res.ioi.circuit.heads | res.colored.circuit.heads
    for h in res.negative_movers:
        stage_effects = [
            p.effect("movers", h)
            for p in (res.ioi, res.colored)
            if h in p.circuit.group("movers").heads
        ]
        assert min(stage_effects) < 0
    for h in res.inhibition_heads:
        assert (
            h in res.ioi.circuit.group("inhibition").heads and res.ioi.effect("inhibition", h) > 0
        )
    assert set(res.intervention_heads) == set(res.inhibition_heads) | set(
        res.ioi.negative_heads("movers")
    )
    for x in (
        res.accuracy_before,
        res.accuracy_after,
        res.candidate_accuracy_before,
        res.candidate_accuracy_after,
    ):
        assert 0.0 <= x <= 1.0
    assert all(0.0 <= v <= 1.0 for v in res.mover_attention_before.values())
    d = res.to_dict()
    json.dumps(d)  # plain numbers and strings only
    assert Circuit.from_dict(d["ioi_circuit"]) == res.ioi.circuit
    from circuit_widgets import tasks

    for f, task in (
        (res.ioi_faithfulness, tasks.ioi(demo_model, n=N, seed=0)),
        (res.colored_faithfulness, tasks.colored_objects(demo_model, n=N, seed=0)),
    ):
        # means="auto": one mean per position only when every prompt has the same length.
        assert f.means == ("position" if len(set(task.lengths.tolist())) == 1 else "class")
        assert len(f.random_metric) == 2
    assert "Overlap" in res.summary() and "means per" in res.summary()
    print("\n" + res.summary())
    print(json.dumps({k: v for k, v in d.items() if not isinstance(v, dict)}, default=str))


def test_intervention_hits_the_wrong_colours(study, demo_model):
    """Inside the intervention the chosen heads put all their END attention on the wrong colours."""
    from circuit_widgets import tasks
    from circuit_widgets.core.interventions import head_attention, intervene

    res, _ = study
    if not res.intervention_heads:
        pytest.skip("the study found no heads to intervene on")
    co = tasks.colored_objects(demo_model, n=N, seed=0)
    with intervene(demo_model, co, heads=res.intervention_heads, attend_to="wrong_colors"):
        att = head_attention(demo_model, co, res.intervention_heads, to="wrong_colors")
    torch.testing.assert_close(att.per_example, torch.ones_like(att.per_example))
    assert not math.isnan(res.logit_diff_after)
    assert all(isinstance(h, Head) for h in res.intervention_heads)
