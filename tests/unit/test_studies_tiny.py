"""The fine-tuning study on tiny models: a copy with one layer changed stands in for the fine-tune."""

from __future__ import annotations

import math

import pytest
import torch
from micro_models import cache_of, copy_slice, hook_name, run_metric

from circuit_widgets import Circuit, model_shape, tiny_model
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


def ref_cmap_z(base, tuned, task) -> torch.Tensor:
    """[layer, head] mean over examples of (base metric with that one head's z at END taken
    from the fine-tuned run) - (base metric), one plain hooked forward per head."""
    shape = model_shape(base)
    names = [hook_name("z", layer) for layer in range(shape.n_layers)]
    tuned_z = cache_of(tuned, task.clean_tokens, names)
    unpatched = run_metric(base, task.clean_tokens, task)
    end = task.positions["END"]
    out = torch.zeros(shape.n_layers, shape.n_heads)
    for layer, name in enumerate(names):
        for head in range(shape.n_heads):

            def hook(act, hook, name=name, head=head):
                return copy_slice(act, tuned_z[name], "z", head, end)

            patched = run_metric(base, task.clean_tokens, task, [(name, hook)])
            out[layer, head] = (patched - unpatched).mean()
    return out


def test_grid_n_limits_the_per_head_grid_to_the_first_prompts(pair):
    base, tuned = pair
    res = finetuning_study(
        base, tuned, n=N, n_boxes=BOXES, arithmetic_n=4, circuit=CIRCUIT, grid_n=2
    )
    assert (
        res.complete and res.grid_n == 2 and res.to_dict()["grid_n"] == 2 and "n=2" in res.summary()
    )
    et = entity_tracking(base, n=N, seed=0, n_boxes=BOXES)
    expected = ref_cmap_z(base, tuned, et.subset(slice(0, 2)))
    torch.testing.assert_close(res.grid.values, expected, atol=1e-6, rtol=1e-4)
    assert res.grid.values[0].abs().max() < 1e-6 < res.grid.values[1].abs().max()
    full = finetuning_study(base, tuned, n=N, n_boxes=BOXES, arithmetic_n=4, circuit=CIRCUIT)
    assert full.grid_n == N
    torch.testing.assert_close(full.grid.values, ref_cmap_z(base, tuned, et), atol=1e-6, rtol=1e-4)


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


# --------------------------------------------------------------------------- entity tracking


@pytest.fixture(scope="module")
def pruned_study(pair):
    from circuit_widgets.studies import entity_tracking_study

    base, _ = pair
    kw = {
        "n": N,
        "n_boxes": BOXES,
        "seed": 0,
        "split": "test",
        "top_k": 3,
        "n_random": 1,
        "dcm_examples": 0,
    }
    return base, entity_tracking_study(base, prune=0.02, **kw), entity_tracking_study(base, **kw)


def test_entity_study_prunes_candidates_by_minimality(pruned_study):
    from circuit_widgets.core.evaluation import minimality
    from circuit_widgets.tasks.entity_tracking import split_words
    from circuit_widgets.tasks.words import BOX_OBJECTS

    base, res, plain = pruned_study
    assert res.complete and res.split == "test" and res.prune == 0.02
    # Candidates are the top-k of each stage; without prune= they are the circuit itself.
    assert plain.minimality is None and plain.circuit == plain.candidates
    sizes = [len(g.heads) for g in res.candidates.groups]
    assert sizes[0] == 3 and max(sizes) == 3  # later stages of 2 layers may have fewer senders
    # The kept heads are exactly the candidates whose minimality score reaches the threshold,
    # computed as core.evaluation.minimality computes it on the same prompts and means.
    et = entity_tracking(base, n=N, seed=0, n_boxes=BOXES, split="test")
    ref = entity_tracking(base, n=N, seed=1, n_boxes=BOXES, split="test")
    mini = minimality(base, et, res.candidates, reference_task=ref, reference="clean")
    rel = dict(zip(mini.heads, mini.relative))
    for cand, kept in zip(res.candidates.groups, res.circuit.groups):
        assert (kept.name, kept.position) == (cand.name, cand.position)
        assert kept.heads == {h for h in cand.heads if rel[h] >= 0.02}
    table = res.minimality_table()
    assert set(table["head"]) == {str(h) for h in res.candidates.heads}
    assert res.faithfulness.circuit == res.circuit  # faithfulness of the pruned circuit
    d = res.to_dict()
    assert (
        d["split"] == "test" and d["prune"] == 0.02 and d["candidates"] == res.candidates.to_dict()
    )
    assert "pruned by minimality" in res.summary()
    test_objects = set(split_words(BOX_OBJECTS, "test"))
    assert all(m["answer"] in test_objects for m in et.meta)


def test_entity_study_rejects_a_bad_prune(pair):
    from circuit_widgets.studies import entity_tracking_study

    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="prune"):
            entity_tracking_study(pair[0], n=2, n_boxes=BOXES, prune=bad, dcm_examples=0)


def test_summary_says_a_given_circuit_was_given_not_found(pair):
    res = finetuning_study(*pair, n=N, n_boxes=BOXES, arithmetic_n=4, circuit=CIRCUIT, grid_n=1)
    text = res.summary()
    n_heads = len(res.circuit.heads)
    assert res.pipeline is None
    assert f"a given circuit of {n_heads} heads" in text and "Circuit (given): " in text
    assert "top " not in text.split("\n")[0] and "Base circuit" not in text
