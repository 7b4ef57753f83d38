"""The circuit-reuse study end to end on the demo model (SmolLM2-135M, 30 x 9 heads, 3 KV heads).

Asserts structure and the rules that name roles, not the paper's numbers: whatever the demo
model gives is the result. Small sizes (CI); the numbers of this run are printed (pytest -s).
"""

from __future__ import annotations

import json

import pytest
import torch

from circuit_widgets import tasks
from circuit_widgets.core.evaluation import head_overlap
from circuit_widgets.core.interventions import head_attention, intervene
from circuit_widgets.studies.reuse import ReuseResult, circuit_reuse, head_role
from circuit_widgets.types import Circuit

pytestmark = pytest.mark.integration

N, N_EVAL = 4, 16  # small, so the whole study stays within CI's budget on 2 cores


@pytest.fixture(scope="module")
def study(demo_model):
    seen = []
    res = circuit_reuse(
        demo_model,
        n=N,
        n_eval=N_EVAL,
        n_controls=10,
        n_random=1,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    return res, seen


def test_study_structure(study):
    res, seen = study
    assert isinstance(res, ReuseResult) and res.complete
    assert seen and seen[-1][0] == seen[-1][1]
    per_stage = max(1, round(0.02 * 30 * 9))  # top 2% of 270 heads = 5 per stage
    for pipe in (res.ioi, res.colored):
        assert [len(g.heads) for g in pipe.circuit.groups] == [per_stage] * 4
        pipe.circuit.validate(30, 9)
    o = res.overlap
    again = head_overlap(res.ioi.circuit, res.colored.circuit)
    assert o.n_shared == again.n_shared == len(res.ioi.circuit.heads & res.colored.circuit.heads)
    # Every candidate of the inhibition and movers stages was measured, and its role follows
    # from its own evidence.
    stages = (
        res.ioi.circuit.group("inhibition").heads
        | res.ioi.circuit.group("movers").heads
        | res.colored.circuit.group("movers").heads
    )
    assert set(res.candidates) == set(stages)
    for h, r in res.candidates.items():
        assert head_role(r.evidence)[0] == r.role
        assert r.evidence["in_colored_circuit"] == float(h in res.colored.circuit.heads)
        assert -1e3 < r.evidence["copy_score"] < 1e3
    iv = res.intervention
    assert iv.heads == sorted(
        h
        for h, r in res.candidates.items()
        if r.role == "negative mover"
        or (r.role == "S-inhibition-like" and h in res.colored.circuit.heads)
    )
    assert iv.n_eval == N_EVAL and iv.eval_seed == 1
    if iv.heads:
        assert len(iv.random_after) == 10
    d = res.to_dict()
    json.dumps(d)  # plain numbers and strings only
    assert Circuit.from_dict(d["ioi_circuit"]) == res.ioi.circuit
    assert "held-out" in res.summary() and "random sets" in res.summary()
    print("\n" + res.summary())


def test_intervention_numbers_recompute(study, demo_model):
    """The reported accuracies equal a plain forward of the held-out prompts with the heads forced,
    and inside the intervention the heads put all their END attention on the wrong colours."""
    res, _ = study
    iv = res.intervention
    heads = iv.heads
    ev = tasks.colored_objects(demo_model, n=N_EVAL, seed=1)
    ar = torch.arange(N_EVAL)
    with torch.no_grad():
        before = demo_model(ev.clean_tokens)[ar, ev.positions["END"]]
    assert iv.accuracy_before == pytest.approx(float(ev.candidate_accuracy(before).mean()))
    if not iv.heads:
        return
    with intervene(demo_model, ev, heads=heads, attend_to="wrong_colors"):
        att = head_attention(demo_model, ev, heads, to="wrong_colors")
        with torch.no_grad():
            after = demo_model(ev.clean_tokens)[ar, ev.positions["END"]]
    torch.testing.assert_close(att.per_example, torch.ones_like(att.per_example))
    assert iv.accuracy_after == pytest.approx(float(ev.candidate_accuracy(after).mean()))
