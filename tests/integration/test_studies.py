"""The entity-tracking and fine-tuning studies end to end on the demo model, at small sizes.

Asserts structure and invariants checked against plain forwards written here, not the
paper's numbers: the demo model cannot track entities, whatever the study says about it.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from matplotlib.figure import Figure

from circuit_widgets import Circuit, load_model
from circuit_widgets.studies import (
    EntityTrackingResult,
    FinetuningResult,
    entity_tracking_study,
    finetuning_study,
)
from circuit_widgets.tasks import entity_tracking

pytestmark = pytest.mark.integration

N, BOXES, TOP_K = 4, 2, 2


@pytest.fixture(scope="module")
def study(demo_model):
    seen = []
    res = entity_tracking_study(
        demo_model,
        n=N,
        n_boxes=BOXES,
        seed=0,
        top_k=TOP_K,
        n_random=1,
        dcm_examples=5,
        dcm_epochs=1,
        dcm_batch_size=1,
        desiderata=("positional",),
        on_progress=lambda d, t: seen.append((d, t)),
    )
    return res, seen


@pytest.fixture(scope="module")
def arith():
    model = load_model("demo-arith")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_entity_study_structure(study, demo_model):
    res, seen = study
    assert isinstance(res, EntityTrackingResult) and res.complete
    assert seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert [(g.name, g.position, len(g.heads)) for g in res.circuit.groups] == [
        ("A", "END", TOP_K),
        ("B", "END", TOP_K),
        ("C", "query_label", TOP_K),
        ("D", "query_label_ctx", TOP_K),
    ]
    # Every group's heads are the top |relative effect| heads of its own grid, the score of
    # Prakash et al.: the mean over examples of (p_patched - p_clean) / p_clean.
    assert res.pipeline.rank_by == "relative" and any("Prakash" in n for n in res.notes)
    for g in res.circuit.groups:
        grid = res.pipeline.grids[g.name]
        clean = grid.metric_clean.reshape(-1, 1, 1)
        relative = (grid.per_example / clean).mean(0)  # p(answer) is never 0: no example left out
        ranked = sorted(relative[grid.done].abs().tolist(), reverse=True)
        assert sorted(
            (abs(float(relative[h.layer, h.head])) for h in g.heads), reverse=True
        ) == pytest.approx(ranked[:TOP_K])
    assert len(res.picked_box) == len(res.query_box) == BOXES
    assert sum(res.picked_box) == pytest.approx(1.0) and sum(res.query_box) == pytest.approx(1.0)


def test_entity_study_matches_plain_forwards(study, demo_model):
    res, _ = study
    task = entity_tracking(demo_model, n=N, seed=0, n_boxes=BOXES)
    with torch.no_grad():
        logits = demo_model(task.clean_tokens)
    final = logits[torch.arange(N), task.positions["END"]]
    assert res.accuracy == pytest.approx(float((final.argmax(-1) == task.answers).float().mean()))
    probs = final.softmax(-1)
    p_answer = probs[torch.arange(N), task.answers]
    assert res.answer_prob == pytest.approx(float(p_answer.mean()), abs=1e-4)
    # The box the model ranks first, from the objects as written in each prompt.
    ids = [
        [demo_model.tokenizer.encode(" " + o, add_special_tokens=False)[0] for o in m["objects"]]
        for m in task.meta
    ]
    first = probs.gather(1, torch.tensor(ids)).argmax(1)
    assert res.picked_box == pytest.approx((torch.bincount(first, minlength=BOXES) / N).tolist())
    f = res.faithfulness
    ref = entity_tracking(demo_model, n=N, seed=1, n_boxes=BOXES)  # the study's reference set
    one_length = len(set(task.lengths.tolist()) | set(ref.lengths.tolist())) == 1
    assert f.means == ("position" if one_length else "class")  # means="auto"
    assert f.full_metric == pytest.approx(float(p_answer.mean()), abs=1e-4)  # nothing ablated
    assert len(f.random_metric) == 1 and f.ratio == pytest.approx(f.circuit_metric / f.full_metric)


def test_entity_study_dcm_and_outputs(study):
    res, _ = study
    assert set(res.dcm) == {"A", "B", "C", "D"}
    for g, per in res.dcm.items():
        assert list(per) == ["positional"]
        r = per["positional"]
        group = res.circuit.group(g)
        assert set(r.heads) == group.heads and set(r.selected) <= group.heads
        assert r.position == group.position and tuple(r.n_examples) == (3, 1, 1)
        m = r.mask[~r.mask.isnan()]
        assert len(m) == TOP_K and bool(((m >= 0) & (m <= 1)).all())
    assert len(res.dcm_table()) == 4
    d = json.loads(json.dumps(res.to_dict()))
    assert Circuit.from_dict(d["circuit"]) == res.circuit
    assert d["group_sizes"] == {"A": TOP_K, "B": TOP_K, "C": TOP_K, "D": TOP_K}
    figs = res.figures()
    assert {"grid_A", "grid_B", "grid_C", "grid_D", "accuracy", "picked_box", "dcm"} <= set(figs)
    assert all(isinstance(fig, Figure) for fig in figs.values())
    assert "Group A" in res.summary() and "Prakash" in res.summary()


def test_entity_study_stops_and_checks_input(demo_model):
    res = entity_tracking_study(demo_model, n=2, n_boxes=BOXES, top_k=1, should_stop=lambda: True)
    assert not res.complete and res.dcm == {} and res.faithfulness is None
    with pytest.raises(ValueError, match="desiderata"):
        entity_tracking_study(demo_model, n=2, desiderata=("colour",))
    with pytest.raises(ValueError, match="dcm_examples"):
        entity_tracking_study(demo_model, n=2, dcm_examples=2)
    with pytest.raises(ValueError, match="n must be"):
        entity_tracking_study(demo_model, n=0)


def test_finetuning_study(study, demo_model, arith):
    circuit = study[0].circuit
    res = finetuning_study(
        demo_model, arith, n=N, n_boxes=BOXES, arithmetic_n=16, circuit=circuit, grid_n=2
    )
    assert isinstance(res, FinetuningResult) and res.complete and res.pipeline is None
    assert res.cmap.groups == ["A", "B", "C", "D", "circuit"]
    et = entity_tracking(demo_model, n=N, seed=0, n_boxes=BOXES)
    with torch.no_grad():
        for model, got in ((demo_model, res.entity_base), (arith, res.entity_finetuned)):
            final = model(et.clean_tokens)[torch.arange(N), et.positions["END"]]
            assert got == pytest.approx(float((final.argmax(-1) == et.answers).float().mean()))
    assert res.cmap.group("A")["base_accuracy"] == pytest.approx(res.entity_base)
    assert res.cmap.group("A")["finetuned_accuracy"] == pytest.approx(res.entity_finetuned)
    # The adapter starts at layer 15: no head below it can carry a difference.
    assert res.grid.shape == (30, 9) and res.grid.values[:15].abs().max() < 1e-6
    assert 0.0 <= res.arithmetic_base <= 1.0 and 0.0 <= res.arithmetic_finetuned <= 1.0
    d = json.loads(json.dumps(res.to_dict()))
    assert (
        set(d["cmap"]) == {"A", "B", "C", "D", "circuit"}
        and d["arithmetic_n"] == 16
        and d["grid_n"] == 2
    )
    assert {"accuracy", "cmap", "cmap_grid"} <= set(res.figures())
    bad = Circuit.from_groups({"A": [(40, 0)]}, positions={"A": "END"})
    with pytest.raises(ValueError, match="outside the model"):
        finetuning_study(demo_model, arith, n=2, n_boxes=BOXES, circuit=bad)
