"""The circuit-reuse study's role measures and its held-out intervention.

Copy/suppress scores are checked on a planted micro model whose heads are known to copy (+I)
or suppress (-c I) what they attend to, and against a plain hooked reference; the study's
intervention numbers are recomputed independently from its reported head sets."""

from __future__ import annotations

import math

import pytest
import torch
from test_interventions import INHIBITOR, MOVER, inhibition_micro_model, inhibition_task, ref_force

from circuit_widgets import tasks
from circuit_widgets.core.interventions import copy_scores, intervene
from circuit_widgets.studies.reuse import ROLES, circuit_reuse, head_role
from circuit_widgets.types import Head

pytestmark = pytest.mark.usefixtures("one_thread")

SILENT = Head(1, 2)  # W_O = 0 in the planted model: it writes nothing


def test_copy_scores_on_a_planted_copier_and_suppressor():
    c = 0.5
    model = inhibition_micro_model(c=c)
    task = inhibition_task(model)
    cs = copy_scores(model, task, [MOVER, INHIBITOR, SILENT], to="distractors")
    s = cs.as_dict()
    assert s[str(MOVER)] > 0.5  # copies: the attended distractor's logit rises
    assert s[str(INHIBITOR)] < -0.25  # suppresses it
    assert abs(s[str(SILENT)]) < 1e-4  # a head that writes nothing does nothing
    # Same values (shared KV head), outputs +I and -c I, a near-linear model: ratio -c.
    assert s[str(INHIBITOR)] / s[str(MOVER)] == pytest.approx(-c, rel=0.02)
    # Forcing the suppressor onto the distractors flips every prompt to the answer.
    assert cs.candidate_accuracy_before == 0.0
    assert cs.candidate_accuracy.tolist() == [0.0, 1.0, 0.0]


def test_copy_scores_match_a_plain_hooked_reference():
    model = inhibition_micro_model()
    task = inhibition_task(model)
    cs = copy_scores(model, task, [INHIBITOR], to="distractors")
    targets = task.position_sets["distractors"]
    b = torch.arange(len(task))
    end = task.positions["END"]
    with torch.no_grad():
        before = model(task.clean_tokens)[b, end]
        after = ref_force(model, task, [INHIBITOR], targets)[b, end]
    delta = (after - before).float()
    ids = task.clean_tokens[b[:, None], targets]
    expect = delta.gather(1, ids).mean(1) - delta.mean(1)
    torch.testing.assert_close(cs.per_example[:, 0], expect, atol=1e-4, rtol=1e-4)


def test_copy_scores_bad_input_is_named():
    model = inhibition_micro_model()
    task = inhibition_task(model)
    with pytest.raises(ValueError, match="at least one head"):
        copy_scores(model, task, [], to="distractors")
    with pytest.raises(ValueError, match="no position or position set 'nope'"):
        copy_scores(model, task, [MOVER], to="nope")


def test_head_role_names_only_what_the_evidence_shows():
    nan = math.nan
    inh = {"ioi_inhibition_effect": 0.3, "att_END_S2": 0.4, "att_END_IO": 0.1}
    assert head_role(inh)[0] == "S-inhibition-like"
    assert head_role({**inh, "att_END_S2": 0.05})[0] == "other"  # attends IO: not S-inhibition
    neg = {"ioi_mover_effect": -0.2, "att_END_IO": 0.5, "att_END_S": 0.2}
    assert head_role(neg)[0] == "negative mover"
    assert head_role({**neg, "ioi_mover_effect": 0.2})[0] == "mover"
    assert head_role({**neg, "att_END_S": 0.6})[0] == "other"  # does not attend to the answer
    # Colored Objects: the answer colour against each of the two wrong colours.
    co = {"co_mover_effect": -0.1, "att_END_correct": 0.3, "att_END_wrong": 0.5}
    assert head_role(co)[0] == "negative mover"  # 0.3 > 0.5 / 2
    assert head_role({**co, "att_END_wrong": 0.7})[0] == "other"
    assert head_role({"ioi_mover_effect": nan})[0] == "other"
    assert {head_role(x)[0] for x in (inh, neg, co)} <= set(ROLES)


def test_study_fields_on_a_tiny_model(tiny_gpt2):
    model = tiny_gpt2
    res = circuit_reuse(model, n=4, n_eval=6, n_controls=10, n_random=-1, seed=0)
    iv = res.intervention
    assert res.complete and iv.chosen_by == "roles"
    # Every measured head carries its evidence; the chosen set follows the roles.
    for r in res.candidates.values():
        assert r.role in ROLES and "copy_score" in r.evidence and "att_END_S2" in r.evidence
    want = sorted(
        h
        for h, r in res.candidates.items()
        if r.role == "negative mover"
        or (r.role == "S-inhibition-like" and h in res.colored.circuit.heads)
    )
    assert iv.heads == want
    assert set(iv.roles) == set(iv.heads)
    d = res.to_dict()["intervention"]
    assert set(d) >= {
        "heads",
        "roles",
        "accuracy_before",
        "accuracy_after",
        "random_after",
        "n_eval",
    }


def test_intervention_is_held_out_and_its_controls_recompute(tiny_gpt2):
    model = tiny_gpt2
    heads = [Head(1, 0), Head(1, 3)]
    res = circuit_reuse(
        model, n=4, n_eval=6, n_controls=10, n_random=-1, seed=0, intervention_heads=heads
    )
    iv = res.intervention
    assert iv.heads == heads and iv.chosen_by == "given" and iv.n_eval == 6 and iv.eval_seed == 1
    assert len(iv.random_after) == len(iv.random_sets) == 10
    for s in iv.random_sets:  # same size, same layers, never the chosen heads
        assert sorted(h.layer for h in s) == sorted(h.layer for h in heads)
        assert not set(s) & set(heads) and len(set(s)) == len(s)
    find = tasks.colored_objects(model, n=4, seed=0)
    ev = tasks.colored_objects(model, n=6, seed=1)
    assert not set(find.clean_prompts) & set(ev.clean_prompts)  # held out

    def among_colours(hs, to="wrong_colors"):
        with intervene(model, ev, heads=hs, attend_to=to), torch.no_grad():
            logits = model(ev.clean_tokens)
        return float(ev.candidate_accuracy(logits[torch.arange(6), ev.positions["END"]]).mean())

    with torch.no_grad():
        logits = model(ev.clean_tokens)[torch.arange(6), ev.positions["END"]]
    assert iv.accuracy_before == pytest.approx(float(ev.candidate_accuracy(logits).mean()))
    assert iv.vocab_accuracy_before == pytest.approx(float(ev.accuracy(logits).mean()))
    assert iv.accuracy_after == pytest.approx(among_colours(heads))
    assert iv.random_after[3] == pytest.approx(among_colours(iv.random_sets[3]))
    assert iv.all_colors_after == pytest.approx(
        among_colours(heads, ["correct_color", "wrong_colors"])
    )
    assert iv.random_mean == pytest.approx(sum(iv.random_after) / 10)


def test_eval_seed_must_differ(tiny_gpt2):
    with pytest.raises(ValueError, match="eval_seed must differ"):
        circuit_reuse(tiny_gpt2, n=4, seed=3, eval_seed=3)
