"""Circuits: mean ablation against a plain hooked reference, faithfulness, completeness,
minimality, overlap arithmetic, the planted-circuit pipeline, JSON, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from micro_models import PLANTED_HEADS, one_thread, planted_micro_model, planted_task, random_task  # noqa: F401

from circuit_widgets.core.circuits import (
    Stage,
    circuit_pipeline,
    completeness,
    default_stages,
    faithfulness,
    head_overlap,
    mean_ablate,
    minimality,
)
from circuit_widgets.models import model_shape
from circuit_widgets.types import Circuit, CircuitGroup, Head


@pytest.fixture(scope="module")
def planted():
    model = planted_micro_model()
    return model, planted_task(model)


# --------------------------------------------------------------------------- a plain reference


@torch.no_grad()
def ref_mean_ablate(model, task, keep_cells):
    """Metric per example with every z cell outside ``keep_cells`` [(layer, head, pos name|None)]
    replaced by its mean over the corrupt prompts' real tokens of the same class (each named
    position, position 0, the rest pooled), by explicit loops and the bridge's own hooks."""
    shape = model_shape(model)
    names = [f"blocks.{l}.attn.hook_z" for l in range(shape.n_layers)]
    _, cache = model.run_with_cache(task.corrupt_tokens, names_filter=lambda n: n in names)

    def cls_of(t, b, p):
        label = "<start>" if p == 0 else "<other>"
        for name, pos in t.positions.items():
            if int(pos[b]) == p:
                label = name
        return label

    sums, counts = {}, {}
    for b in range(len(task)):
        for p in range(int(task.lengths[b])):
            c = cls_of(task, b, p)
            counts[c] = counts.get(c, 0) + 1
            for l in range(shape.n_layers):
                z = cache[names[l]][b, p].double()
                sums[(l, c)] = sums.get((l, c), 0) + z
    means = {k: (v / counts[k[1]]).float() for k, v in sums.items()}

    def hook_for(l):
        def hook(act, hook):
            out = act.clone()
            for b in range(act.shape[0]):
                for p in range(act.shape[1]):
                    c = cls_of(task, b, p) if p < int(task.lengths[b]) else "<other>"
                    for h in range(shape.n_heads):
                        kept = any(kl == l and kh == h and (kp is None or int(task.positions[kp][b]) == p)
                                   for kl, kh, kp in keep_cells)
                        if not kept:
                            out[b, p, h] = means[(l, c)][h]
            return out
        return hook

    logits = model.run_with_hooks(task.clean_tokens,
                                  fwd_hooks=[(names[l], hook_for(l)) for l in range(shape.n_layers)])
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
        abs(mean_ablate(tiny_llama, task, circ).metric - res.full_metric),
        abs=1e-4)
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
    res = circuit_pipeline(model, task, stages=[Stage("s1", "END"), Stage("s2", "S", "s1", "v")], top_k=1)
    back = Circuit.from_json(res.circuit.to_json())
    assert back == res.circuit
    assert [(g.name, g.position) for g in back.groups] == [("s1", "END"), ("s2", "S")]


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_finds_exactly_the_planted_heads(planted):
    model, task = planted
    stages = [Stage("movers", "END"), Stage("feeders", "S", "movers", "v")]
    seen = []
    res = circuit_pipeline(model, task, stages=stages, top_frac=1 / 8, on_progress=lambda d, t: seen.append((d, t)))
    assert res.complete
    assert res.circuit.group("movers").heads == {Head(1, 2)}
    assert res.circuit.group("feeders").heads == {Head(0, 1)}
    assert {(h.layer, h.head) for h in res.circuit.heads} == PLANTED_HEADS
    # Other heads write nothing (zero W_O); 0.1 alone reaches the logits only through the norm.
    grid = res.grids["movers"]
    others = [(l, h) for l in range(2) for h in range(4) if (l, h) != (1, 2)]
    assert all(abs(float(grid.values[l, h])) < 0.01 * abs(float(grid.values[1, 2])) for l, h in others)
    assert res.grids["feeders"].done[0].all() and not res.grids["feeders"].done[1].any()
    assert seen[-1][0] == seen[-1][1]
    df = res.to_dataframe()
    assert list(df["head_label"]) == ["1.2", "0.1"]


def test_pipeline_receivers_in_several_layers_match_one_joint_path_patch(tiny_llama):
    """The banded senders give the numbers one joint path-patching call gives where valid."""
    from circuit_widgets.core.path_patching import path_patch
    from circuit_widgets.types import Receiver

    task = random_task(tiny_llama)
    stages = [Stage("one", "END"), Stage("two", "END", "one", "q")]
    res = circuit_pipeline(tiny_llama, task, stages=stages, top_k=3)
    recv = [Receiver(h.layer, h.head, "q") for h in res.circuit.group("one").heads]
    low = min(r.layer for r in recv)
    if low > 0:
        joint = path_patch(tiny_llama, task, receivers=recv, position="END")
        cells = joint.done
        torch.testing.assert_close(res.grids["two"].values[cells], joint.values[cells], atol=1e-5, rtol=1e-4)


def test_pipeline_stop_returns_partial(planted):
    model, task = planted
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    res = circuit_pipeline(model, task, stages=[Stage("a", "END"), Stage("b", "S", "a", "v")], top_k=1,
                           should_stop=stop)
    assert not res.complete


def test_default_stages_per_task():
    from types import SimpleNamespace

    ioi = default_stages(SimpleNamespace(name="ioi-ABC"))
    assert [(s.name, s.position, s.receivers, s.inputs) for s in ioi] == [
        ("movers", "END", "logits", "q"), ("inhibition", "END", "movers", "q"),
        ("induction", "S2", "inhibition", "kv"), ("previous_token", "S1+1", "induction", "k")]
    et = default_stages(SimpleNamespace(name="entity_tracking"))
    assert [(s.name, s.position) for s in et] == [
        ("A", "END"), ("B", "END"), ("C", "query_label"), ("D", "query_label_ctx")]
    assert [s.inputs for s in et] == ["q", "q", "v", "v"]


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
