"""Circuits: mean ablation against a plain hooked reference, faithfulness, completeness,
minimality, overlap arithmetic, the planted-circuit pipeline, JSON, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from micro_models import (
    PLANTED_HEADS,
    path_caches,
    planted_micro_model,
    planted_task,
    random_task,
    ref_path_patch_one,
    run_metric,
    sharp_tiny_model,
)

from circuit_widgets.core.discovery import circuit_pipeline, default_stages
from circuit_widgets.core.evaluation import (
    completeness,
    faithfulness,
    head_overlap,
    mean_ablate,
    minimality,
    random_circuit_like,
)
from circuit_widgets.core.path_patching import path_patch
from circuit_widgets.models import model_shape
from circuit_widgets.types import Circuit, CircuitGroup, Component, Head, Stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    model = planted_micro_model()
    return model, planted_task(model)


# --------------------------------------------------------------------------- a plain reference


@torch.no_grad()
def ref_mean_ablate(model, task, keep_cells, *, ref=None, which="corrupt", means="class"):
    """Metric per example with every z cell outside ``keep_cells`` [(layer, head, pos name|None)]
    replaced by its mean over the reference prompts' real tokens (``which`` prompts of ``ref``,
    default the task's corrupt ones) of the same class, by explicit loops and the bridge's own
    hooks. means="class": each of the task's named positions, position 0, the rest pooled; a
    class with no reference token takes the mean over all of them. means="position": one mean
    per absolute token position."""
    ref = task if ref is None else ref
    shape = model_shape(model)
    names = [f"blocks.{l}.attn.hook_z" for l in range(shape.n_layers)]
    tokens = ref.corrupt_tokens if which == "corrupt" else ref.clean_tokens
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)

    def cls_of(t, b, p):
        if means == "position":
            return p
        label = "<start>" if p == 0 else "<other>"
        for name in task.positions:  # the task's names, read on t's own positions
            if name in t.positions and int(t.positions[name][b]) == p:
                label = name
        return label

    sums, counts = {}, {}
    for b in range(len(ref)):
        for p in range(int(ref.lengths[b])):
            c = cls_of(ref, b, p)
            counts[c] = counts.get(c, 0) + 1
            for l in range(shape.n_layers):
                z = cache[names[l]][b, p].double()
                sums[(l, c)] = sums.get((l, c), 0) + z
                sums[(l, "all")] = sums.get((l, "all"), 0) + z
    n_all = sum(counts.values())

    def mean_of(l, c):
        return (
            (sums[(l, c)] / counts[c]).float()
            if c in counts
            else (sums[(l, "all")] / n_all).float()
        )

    def hook_for(l):
        def hook(act, hook):
            out = act.clone()
            for b in range(act.shape[0]):
                for p in range(act.shape[1]):
                    if p >= int(task.lengths[b]):
                        continue  # padding: never read by a real token
                    c = cls_of(task, b, p)
                    for h in range(shape.n_heads):
                        kept = any(
                            kl == l and kh == h and (kp is None or int(task.positions[kp][b]) == p)
                            for kl, kh, kp in keep_cells
                        )
                        if not kept:
                            out[b, p, h] = mean_of(l, c)[h]
            return out

        return hook

    logits = model.run_with_hooks(
        task.clean_tokens, fwd_hooks=[(names[l], hook_for(l)) for l in range(shape.n_layers)]
    )
    return task.metric(logits).float()


# --------------------------------------------------------------------------- mean ablation


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2", "tiny_gemma3"])
def test_empty_circuit_matches_plain_mean_ablation(arch, request):
    model = request.getfixturevalue(arch)
    task = random_task(model)
    got = mean_ablate(model, task, None)
    ref = ref_mean_ablate(model, task, [])
    torch.testing.assert_close(got.per_example, ref, atol=1e-4, rtol=1e-4)
    assert got.n_heads_kept == 0 and got.n_heads_total == 8
    assert got.metric == pytest.approx(float(ref.mean()), abs=1e-4)
    # An empty Circuit object is the same as None.
    assert mean_ablate(model, task, Circuit()).metric == pytest.approx(got.metric, abs=1e-6)


def test_positioned_and_global_groups_match_reference(tiny_llama):
    task = random_task(tiny_llama)
    circ = Circuit.from_groups({"a": [(1, 0), (0, 3)], "b": [(1, 2)]}, positions={"a": "S"})
    got = mean_ablate(tiny_llama, task, circ)
    ref = ref_mean_ablate(tiny_llama, task, [(1, 0, "S"), (0, 3, "S"), (1, 2, None)])
    torch.testing.assert_close(got.per_example, ref, atol=1e-4, rtol=1e-4)
    assert got.n_heads_kept == 3
    # Batches of 1 and 3 examples give the same numbers as one batch.
    chunked = mean_ablate(tiny_llama, task, circ, batch_size=3)
    torch.testing.assert_close(chunked.per_example, got.per_example, atol=1e-5, rtol=1e-5)


def test_ablating_nothing_gives_faithfulness_one(tiny_llama):
    task = random_task(tiny_llama)
    every = [(l, h) for l in range(2) for h in range(4)]
    res = faithfulness(tiny_llama, task, every, n_random=2)
    assert res.ratio == 1.0 and res.circuit_metric == res.full_metric
    with torch.no_grad():
        full = tiny_llama(task.clean_tokens)
    assert res.full_metric == pytest.approx(float(task.metric(full).mean()), abs=1e-4)
    # Random circuits of the full size are the full model too.
    assert res.random_metric == pytest.approx([res.full_metric] * 2, abs=1e-6)
    assert res.random_seeds == [0, 1]


def test_faithfulness_random_baseline_is_same_size_random_circuits(planted):
    model, task = planted
    circ = Circuit.from_heads(PLANTED_HEADS)
    res = faithfulness(model, task, circ, n_random=4, seed=3)
    assert res.ratio == pytest.approx(1.0, abs=1e-4)  # only the planted heads write anything
    assert len(res.random_metric) == 4 and res.random_seeds == [3, 4, 5, 6]
    ablated_all = mean_ablate(model, task).metric
    for m in res.random_metric:  # a random pair keeps at most the planted heads' effect
        assert min(ablated_all, res.circuit_metric) - 1e-4 <= m <= res.circuit_metric + 1e-4
    assert res.random_metric_std >= 0 and not math.isnan(res.random_metric_mean)
    assert res.to_dict()["ratio"] == res.ratio


def test_means_per_position_and_per_class_match_plain_references(tiny_llama):
    task = random_task(tiny_llama, seq_len=8, lengths=(7, 7, 7, 7))  # equal lengths, one pad column
    ref_task = random_task(tiny_llama, seed=3, lengths=(7, 7, 7, 7))
    circ = Circuit.from_groups({"a": [(1, 0), (0, 3)], "b": [(1, 2)]}, positions={"a": "S"})
    cells = [(1, 0, "S"), (0, 3, "S"), (1, 2, None)]
    kw = {"reference_task": ref_task, "reference": "clean"}
    auto = mean_ablate(tiny_llama, task, circ, **kw)
    pos = mean_ablate(tiny_llama, task, circ, means="position", **kw)
    cls = mean_ablate(tiny_llama, task, circ, means="class", **kw)
    assert (auto.means, pos.means, cls.means) == ("position", "position", "class")
    ref_pos = ref_mean_ablate(
        tiny_llama, task, cells, ref=ref_task, which="clean", means="position"
    )
    ref_cls = ref_mean_ablate(tiny_llama, task, cells, ref=ref_task, which="clean", means="class")
    assert (ref_pos - ref_cls).abs().max() > 1e-3  # the two kinds of mean really differ here
    torch.testing.assert_close(pos.per_example, ref_pos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(auto.per_example, ref_pos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cls.per_example, ref_cls, atol=1e-4, rtol=1e-4)
    chunked = mean_ablate(tiny_llama, task, circ, means="position", batch_size=3, **kw)
    torch.testing.assert_close(chunked.per_example, pos.per_example, atol=1e-5, rtol=1e-5)
    # The other evaluations take the same option and say which they used.
    f = faithfulness(tiny_llama, task, circ, n_random=1, means="position", **kw)
    assert f.means == "position" and f.circuit_metric == pytest.approx(pos.metric, abs=1e-6)
    assert f.to_dict()["means"] == "position"
    assert (
        completeness(tiny_llama, task, circ, subsets="groups", means="class", **kw).means == "class"
    )
    assert minimality(tiny_llama, task, circ, k_sets="empty", **kw).means == "position"


def test_means_auto_falls_back_to_classes_and_position_needs_equal_lengths(tiny_llama):
    task = random_task(tiny_llama)  # lengths 7, 5, 6, 4
    res = mean_ablate(tiny_llama, task, [(1, 0)])
    assert res.means == "class"
    torch.testing.assert_close(
        res.per_example, ref_mean_ablate(tiny_llama, task, [(1, 0, None)]), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(
        ValueError, match=r"means='position' .* same length; their lengths are \[4, 5, 6, 7\]"
    ):
        mean_ablate(tiny_llama, task, [(1, 0)], means="position")
    equal = random_task(tiny_llama, lengths=(7, 7, 7, 7))
    shorter = random_task(tiny_llama, seed=2, lengths=(6, 6, 6, 6))
    assert mean_ablate(tiny_llama, equal, [(1, 0)], reference_task=shorter).means == "class"
    with pytest.raises(ValueError, match=r"their lengths are \[6, 7\]"):
        faithfulness(tiny_llama, equal, [(1, 0)], reference_task=shorter, means="position")
    with pytest.raises(ValueError, match="means must be one of"):
        mean_ablate(tiny_llama, task, [(1, 0)], means="token")


def test_a_position_the_reference_lacks_gets_one_true_note(tiny_llama):
    task = random_task(tiny_llama)
    other = random_task(tiny_llama, seed=2, extra_position="T")  # no 'S'
    got = mean_ablate(tiny_llama, task, [(1, 0)], reference_task=other, reference="clean")
    ref = ref_mean_ablate(tiny_llama, task, [(1, 0, None)], ref=other, which="clean")
    torch.testing.assert_close(got.per_example, ref, atol=1e-4, rtol=1e-4)
    assert [n for n in got.notes if "'S'" in n] == [
        "reference task lacks positions ['S']: those classes use the mean over all its real tokens"
    ]


def test_keeping_every_head_through_the_edit_path_gives_the_unablated_score(tiny_llama):
    """One group per token position, each holding every head: every real token keeps its own
    output but the padding of the shorter prompts does not, so the ablation edit runs at every
    layer (not the shortcut that skips the edits when every head is kept everywhere). Prompts of
    one length leave no padding in a scored batch, so this needs class means."""
    task = random_task(tiny_llama)  # lengths 7, 5, 6, 4
    at = {
        f"P{p}": torch.clamp(torch.full((len(task),), p), max=task.lengths - 1)
        for p in range(task.seq_len)
    }
    task = dataclasses.replace(task, positions={**task.positions, **at})
    every = [(l, h) for l in range(2) for h in range(4)]
    circ = Circuit.from_groups({name: every for name in at}, positions={name: name for name in at})
    res = mean_ablate(tiny_llama, task, circ)
    assert res.means == "class" and not any("nothing ablated" in n for n in res.notes)
    with torch.no_grad():
        full = task.metric(tiny_llama(task.clean_tokens)).float()
    torch.testing.assert_close(res.per_example, full, atol=1e-4, rtol=1e-4)
    f = faithfulness(tiny_llama, task, circ, n_random=0)
    assert f.ratio == pytest.approx(1.0, abs=1e-4)


def test_random_circuits_keep_sizes_positions_and_distinct_heads():
    shape = model_shape(planted_micro_model())  # 2 x 4 = 8 heads
    disjoint = Circuit.from_groups(
        {"a": [(0, 0), (0, 1), (1, 0)], "b": [(1, 1), (1, 2), (0, 3)]}, positions={"a": "END"}
    )
    shared = Circuit.from_groups(
        {"a": [(0, 0), (0, 1), (1, 0)], "b": [(1, 0), (0, 1), (1, 3)]}, positions={"b": "S"}
    )
    for circ in (disjoint, shared):
        inter = len(circ.group("a").heads & circ.group("b").heads)
        draws = []
        for seed in range(20):
            r = random_circuit_like(circ, shape, seed)
            assert [(g.name, g.position, len(g.heads)) for g in r.groups] == [
                (g.name, g.position, len(g.heads)) for g in circ.groups
            ]
            assert len(r) == len(circ)  # as many distinct heads as the circuit
            assert len(r.group("a").heads & r.group("b").heads) == inter
            r.validate(shape.n_layers, shape.n_heads)
            draws.append(r.heads)
        assert len(set(draws)) > 1
        assert random_circuit_like(circ, shape, 7) == random_circuit_like(circ, shape, 7)


# --------------------------------------------------------------------------- completeness, minimality


def test_completeness_scores_follow_the_definition(tiny_llama):
    task = random_task(tiny_llama)
    circ = Circuit.from_groups({"a": [(1, 0), (1, 1)], "b": [(0, 2)]}, positions={"a": "END"})
    res = completeness(tiny_llama, task, circ, subsets="groups+random", n_random=2, seed=0)
    assert res.labels[:3] == ["empty", "group a", "group b"] and len(res.labels) == 5
    every = Circuit.from_heads([(l, h) for l in range(2) for h in range(4)])
    for k, fc, fm, score in zip(res.subsets, res.f_circuit, res.f_model, res.scores):
        knock = Circuit.from_heads(k)
        assert fc == pytest.approx(mean_ablate(tiny_llama, task, circ - knock).metric, abs=1e-5)
        assert fm == pytest.approx(mean_ablate(tiny_llama, task, every - knock).metric, abs=1e-5)
        assert score == pytest.approx(abs(fc - fm), abs=1e-9)
    assert res.scores[0] == pytest.approx(
        abs(mean_ablate(tiny_llama, task, circ).metric - res.full_metric), abs=1e-4
    )
    assert res.max_score == max(res.scores)
    explicit = completeness(tiny_llama, task, circ, subsets=[[(0, 2)]])
    assert explicit.f_circuit[1] == pytest.approx(res.f_circuit[2], abs=1e-6)


def test_minimality_scores_follow_the_definition(tiny_llama):
    task = random_task(tiny_llama)
    circ = Circuit.from_groups({"a": [(1, 0), (1, 1)], "b": [(0, 2)]})
    res = minimality(tiny_llama, task, circ, k_sets="group")
    assert [str(h) for h in res.heads] == ["0.2", "1.0", "1.1"]
    f = lambda removed: mean_ablate(tiny_llama, task, circ - Circuit.from_heads(removed)).metric
    for v, score, best in zip(res.heads, res.scores, res.best_k):
        group = next(g for g in circ.groups if v in g.heads)
        options = [frozenset(), frozenset(group.heads) - {v}]
        expect = max(abs(f(k | {v}) - f(k)) for k in options)
        assert score == pytest.approx(expect, abs=1e-5)
        assert best in options
    only_empty = minimality(tiny_llama, task, circ, k_sets="empty")
    for v, score in zip(only_empty.heads, only_empty.scores):
        assert score == pytest.approx(abs(f({v}) - f(set())), abs=1e-5)


# --------------------------------------------------------------------------- overlap, JSON


def test_overlap_arithmetic_on_hand_made_circuits():
    a = Circuit.from_groups({"x": ["1.1", "2.2", "3.3"], "y": ["4.4"]}, name="A")
    b = Circuit.from_heads(["2.2", "4.4", "5.5", "6.6", "7.7"], name="B")
    o = head_overlap(a, b)
    assert o.intersection == {Head(2, 2), Head(4, 4)}
    assert o.only_a == {Head(1, 1), Head(3, 3)} and o.only_b == {Head(5, 5), Head(6, 6), Head(7, 7)}
    assert (o.n_shared, o.n_a, o.n_b) == (2, 4, 5)
    assert o.frac_a == 0.5 and o.frac_b == 0.4 and o.jaccard == pytest.approx(2 / 7)
    assert (o.name_a, o.name_b) == ("A", "B")
    assert head_overlap(a, a).jaccard == 1.0
    same = head_overlap([(1, 1)], ["1.1"])
    assert same.n_shared == 1 and same.frac_a == 1.0
    empty = head_overlap(Circuit(), b)
    assert empty.n_shared == 0 and math.isnan(empty.frac_a) and empty.frac_b == 0.0
    assert o.to_dict()["intersection"] == ["2.2", "4.4"]


def test_pipeline_circuit_json_round_trip(planted):
    model, task = planted
    res = circuit_pipeline(
        model, task, stages=[Stage("s1", "END"), Stage("s2", "S", "s1", "v")], top_k=1
    )
    back = Circuit.from_json(res.circuit.to_json())
    assert back == res.circuit
    assert [(g.name, g.position) for g in back.groups] == [("s1", "END"), ("s2", "S")]


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_finds_exactly_the_planted_heads(planted):
    model, task = planted
    stages = [Stage("movers", "END"), Stage("feeders", "S", "movers", "v")]
    seen = []
    res = circuit_pipeline(
        model, task, stages=stages, top_frac=1 / 8, on_progress=lambda d, t: seen.append((d, t))
    )
    assert res.complete
    assert res.circuit.group("movers").heads == {Head(1, 2)}
    assert res.circuit.group("feeders").heads == {Head(0, 1)}
    assert {(h.layer, h.head) for h in res.circuit.heads} == PLANTED_HEADS
    # Other heads write nothing (zero W_O); 0.1 alone reaches the logits only through the norm.
    grid = res.grids["movers"]
    others = [(l, h) for l in range(2) for h in range(4) if (l, h) != (1, 2)]
    assert all(
        abs(float(grid.values[l, h])) < 0.01 * abs(float(grid.values[1, 2])) for l, h in others
    )
    assert res.grids["feeders"].done[0].all() and not res.grids["feeders"].done[1].any()
    assert seen[-1][0] == seen[-1][1]
    df = res.to_dataframe()
    assert list(df["head_label"]) == ["1.2", "0.1"]


def test_pipeline_receivers_in_two_layers_match_the_plain_joint_reference():
    """A stage whose receivers sit in two layers (senders between them) gives, for every
    sender below the top receiver, the plain one-sender path patch into all receivers at once."""
    model = sharp_tiny_model("llama", n_layers=4)  # 4 heads sharing 2 KV heads
    task = random_task(model)
    stages = [Stage("one", "END"), Stage("two", "END", "one", "qv")]
    res = circuit_pipeline(model, task, stages=stages, top_k=3)
    receivers = sorted(res.circuit.group("one").heads)
    assert {h.layer for h in receivers} == {1, 3}  # so senders in layers 1-2 lie between them
    grid = res.grids["two"]
    assert grid.done[:3].all() and not grid.done[3].any()
    recv = [(h.layer, h.head, inp) for h in receivers for inp in "qv"]
    caches = path_caches(model, task)
    ref = torch.stack(
        [
            torch.stack(
                [
                    ref_path_patch_one(model, task, (l, h), recv, "END", caches=caches)
                    for h in range(4)
                ],
                -1,
            )
            for l in range(3)
        ],
        1,
    )  # [batch, 3, 4]
    assert ref.abs().max() > 1e-3  # the paths carry real signal
    torch.testing.assert_close(grid.per_example[:, :3], ref, atol=1e-5, rtol=1e-4)


def test_pipeline_notes_say_why_a_stage_is_empty(planted):
    model, task = planted
    stages = [
        Stage("a", "END"),
        Stage("b", "S", "a", "v"),
        Stage("c", "S", "b", "v"),
        Stage("d", "S", "c", "v"),
    ]
    res = circuit_pipeline(model, task, stages=stages, top_k=1)
    assert res.circuit.group("a").heads == {Head(1, 2)} and res.circuit.group("b").heads == {
        Head(0, 1)
    }
    assert not res.circuit.group("c").heads and not res.circuit.group("d").heads
    assert "stage 'c': stage 'b' has no heads above layer 0 to receive, so it is empty" in res.notes
    assert (
        "stage 'd': stage 'c' picked no heads, so there is nothing to receive into and it is empty"
        in res.notes
    )
    assert not any(n.startswith("stage 'd'") and "layer 0" in n for n in res.notes)


def test_from_grid_on_a_path_patching_grid_picks_what_the_pipeline_picks(planted):
    """Noise patching lowers the metric, so the planted mover 1.2 has a negative value and a
    positive normalized effect: sign='positive' must pick it, at the grid's position."""
    model, task = planted
    grid = path_patch(model, task, position="END")
    assert float(grid.values[1, 2]) < 0 < float(grid.normalized[1, 2])
    picked = Circuit.from_grid(grid, top_k=1, sign="positive")
    assert picked.heads == {Head(1, 2)} and picked.groups[0].position == "END"
    pipe = circuit_pipeline(model, task, stages=[Stage("movers", "END")], top_k=1, sign="positive")
    assert pipe.circuit.group("movers").heads == picked.heads


def test_relative_is_the_mean_relative_change_per_example(planted):
    from circuit_widgets.core.common import build_grid

    model, task = planted
    prob = task.with_metric("prob")
    grid = path_patch(model, prob, position="END")
    caches = path_caches(model, prob)
    clean = run_metric(model, prob.clean_tokens, prob)
    for l, h in [(1, 2), (0, 1), (1, 0)]:
        delta = ref_path_patch_one(model, prob, (l, h), "logits", "END", caches=caches)
        hand = sum(float(delta[b]) / float(clean[b]) for b in range(len(prob))) / len(prob)
        assert float(grid.relative[l, h]) == pytest.approx(hand, rel=1e-4, abs=1e-7)
    assert abs(float(grid.relative[1, 2])) > 1e-3
    # An example whose clean metric is 0 is left out; a cell not computed stays NaN.
    per = torch.tensor([[[1.0, 2.0]], [[5.0, 5.0]], [[2.0, float("nan")]]])
    done = torch.tensor([[True, True]])
    g = build_grid(
        per,
        done,
        torch.tensor([2.0, 0.0, 4.0]),
        torch.zeros(3),
        shape=dataclasses.replace(model_shape(model), n_layers=1, n_heads=2),
        component=Component.Z,
        direction="noise",
        kind="path",
        metric_name="prob",
        positions=None,
        position="END",
        complete=True,
    )
    assert float(g.relative[0, 0]) == pytest.approx((1.0 / 2 + 2.0 / 4) / 2)
    assert float(g.relative[0, 1]) == pytest.approx(2.0 / 2)
    not_done = build_grid(
        per,
        ~done,
        torch.tensor([2.0, 0.0, 4.0]),
        torch.zeros(3),
        shape=dataclasses.replace(model_shape(model), n_layers=1, n_heads=2),
        component=Component.Z,
        direction="noise",
        kind="path",
        metric_name="prob",
        positions=None,
        position="END",
        complete=False,
    )
    assert bool(torch.isnan(not_done.relative).all())


def test_rank_by_changes_what_the_pipeline_ranks():
    """On prompts whose clean p(answer) differs 20-fold, the relative change weights examples
    differently from the normalized mean change, and picks other heads."""
    model = sharp_tiny_model("llama")
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(10.0)  # peaked outputs: p(answer) varies
    task = random_task(model)
    with torch.no_grad():
        top = model(task.clean_tokens)[torch.arange(len(task)), task.positions["END"]].argmax(-1)
    answers = task.answers.clone()
    answers[:2] = top[:2]  # two examples answer the model's favourite token, two a random one
    task = dataclasses.replace(task, answers=answers).with_metric("prob")
    grid = path_patch(model, task, position="END")
    gap = float((grid.metric_corrupt - grid.metric_clean).mean())

    def top_k(score, k=2):
        flat = score.flatten()
        return {Head(int(i) // 4, int(i) % 4) for i in flat.argsort(descending=True)[:k]}

    picked = {}
    for rank_by, score in (
        ("normalized", grid.normalized),
        ("relative", grid.relative),
        ("value", grid.values),
    ):
        for sign in ("abs", "positive"):
            res = circuit_pipeline(
                model, task, stages=[Stage("one", "END")], top_k=2, rank_by=rank_by, sign=sign
            )
            assert res.rank_by == rank_by
            oriented = score if rank_by == "normalized" else score * math.copysign(1.0, gap)
            expect = top_k(oriented.abs() if sign == "abs" else oriented)
            assert res.circuit.group("one").heads == expect
            picked[(rank_by, sign)] = expect
    assert picked[("relative", "abs")] != picked[("normalized", "abs")]
    assert (
        picked[("value", "positive")] == picked[("normalized", "positive")]
    )  # same sign convention
    with pytest.raises(ValueError, match="rank_by must be one of"):
        circuit_pipeline(model, task, rank_by="p")


def test_pipeline_stop_returns_partial(planted):
    model, task = planted
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    res = circuit_pipeline(
        model,
        task,
        stages=[Stage("a", "END"), Stage("b", "S", "a", "v")],
        top_k=1,
        should_stop=stop,
    )
    assert not res.complete


def test_default_stages_per_task():
    """Each generator's task carries its own stages; a task without any gets the default."""
    from circuit_widgets import tasks
    from circuit_widgets.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ioi = default_stages(tasks.ioi(tok, 2))
    assert [(s.name, s.position, s.receivers, s.inputs) for s in ioi] == [
        ("movers", "END", "logits", "q"),
        ("inhibition", "END", "movers", "q"),
        ("induction", "S2", "inhibition", "kv"),
        ("previous_token", "S1+1", "induction", "k"),
    ]
    assert default_stages(tasks.ioi(tok, 2, corruption="S2_IO")) == ioi
    co = default_stages(tasks.colored_objects(tok, 2))
    assert [(s.name, s.position, s.inputs) for s in co] == [
        ("movers", "END", "q"),
        ("inhibition", "END", "q"),
        ("object_readers", "query_object", "kv"),
        ("object_detectors", "query_object", "q"),
    ]
    et = default_stages(tasks.entity_tracking(tok, 2, n_boxes=3))
    assert [(s.name, s.position) for s in et] == [
        ("A", "END"),
        ("B", "END"),
        ("C", "query_label"),
        ("D", "query_label_ctx"),
    ]
    assert [s.inputs for s in et] == ["q", "q", "v", "v"]
    # The task's name plays no part: a hand-made IOI-named task without stages gets the default.
    bare = dataclasses.replace(tasks.ioi(tok, 2), name="ioi-mine", stages=())
    assert [s.name for s in default_stages(bare)] == ["movers", "inhibition"]
    # Stages survive the derived tasks the library makes.
    task = tasks.ioi(tok, 4)
    assert default_stages(task.subset([0, 1])) == default_stages(task.with_metric("prob")) == ioi


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(tiny_llama):
    task = random_task(tiny_llama)
    with pytest.raises(ValueError, match=r"head 2\.0 .*outside the model \(layers 0-1"):
        mean_ablate(tiny_llama, task, [(2, 0)])
    with pytest.raises(ValueError, match=r"head 1\.4 .*heads 0-3"):
        faithfulness(tiny_llama, task, [(1, 4)])
    bad_pos = Circuit((CircuitGroup("g", frozenset({Head(0, 0)}), "S2"),))
    with pytest.raises(ValueError, match=r"position 'S2'.*task lacks"):
        mean_ablate(tiny_llama, task, bad_pos)
    with pytest.raises(ValueError, match=r"position 'IO', which task"):
        circuit_pipeline(tiny_llama, task, stages=[Stage("a", "IO")])
    with pytest.raises(ValueError, match=r"not an earlier stage"):
        circuit_pipeline(tiny_llama, task, stages=[Stage("a", "END", "b")])
    with pytest.raises(ValueError, match=r"inputs must be letters"):
        Stage("a", "END", "b", "x")
    with pytest.raises(ValueError, match=r"top_frac must be in"):
        circuit_pipeline(tiny_llama, task, top_frac=0)
    with pytest.raises(ValueError, match=r"reference must be one of"):
        mean_ablate(tiny_llama, task, reference="mean")
    with pytest.raises(ValueError, match=r"not in the circuit"):
        completeness(tiny_llama, task, [(0, 0)], subsets=[[(1, 1)]])
    with pytest.raises(ValueError, match=r"Circuits or lists of heads"):
        head_overlap("0.1", [(0, 1)])
