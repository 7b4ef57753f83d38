"""path_patch against a plain two-pass reference (Wang et al.), hand-computed direct effects,
activation patching where the two must agree, and the planted micro model.

Receivers are tested on 3-layer models, so that a sender in layer 0 reaches a layer-2 receiver
past frozen layer-1 heads and a recomputed (or frozen) MLP.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from micro_models import (
    PLANTED_HEADS,
    late_diff_task,
    planted_micro_model,
    planted_task,
    random_task,
    ref_activation_patch,
    ref_direct_effect,
    ref_path_patch,
    run_metric,
    sharp_tiny_model,
)

from circuit_widgets.types import Head, Receiver

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
ARCHS = ("gpt2", "llama", "gemma3")


@pytest.fixture(scope="module")
def two():
    """2-layer models (as in conftest, attention sharpened) with their tasks."""
    out = {}
    for arch in ARCHS:
        model = sharp_tiny_model(arch)
        out[arch] = (model, random_task(model, seed=3))
    return out


@pytest.fixture(scope="module")
def three():
    """3-layer models (llama: 4 query heads on 2 KV heads) with their tasks."""
    out = {}
    for arch in ARCHS:
        model = sharp_tiny_model(arch, n_layers=3, seed=1)
        out[arch] = (model, random_task(model, seed=4))
    return out


@pytest.fixture(scope="module")
def planted():
    model = planted_micro_model()
    return model, planted_task(model)


def receivers_of(specs):
    return [Receiver(layer, head, inp) for layer, head, inp in specs]


def assert_grid_matches(grid, ref, model, task, atol=ATOL):
    """values [L, H] (NaN outside the senders), per_example [batch, L, H], metrics."""
    mc = run_metric(model, task.clean_tokens, task)
    mk = run_metric(model, task.corrupt_tokens, task)
    torch.testing.assert_close(grid.metric_clean.detach().cpu().float(), mc, atol=atol, rtol=0)
    torch.testing.assert_close(grid.metric_corrupt.detach().cpu().float(), mk, atol=atol, rtol=0)
    values = grid.values.detach().cpu().float()
    assert tuple(values.shape) == tuple(ref.shape[1:])
    assert torch.equal(torch.isnan(values), torch.isnan(ref[0])), "NaN exactly outside senders"
    torch.testing.assert_close(values, ref.mean(0), atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(
        grid.per_example.detach().cpu().float(), ref, atol=atol, rtol=0, equal_nan=True
    )
    denom = (grid.metric_corrupt - grid.metric_clean).mean()
    torch.testing.assert_close(
        grid.normalized.detach().cpu().float(),
        (grid.values / denom).detach().cpu().float(),
        atol=1e-6,
        rtol=1e-5,
        equal_nan=True,
    )


def notes_text(grid) -> str:
    notes = getattr(grid, "notes", "")
    return notes if isinstance(notes, str) else " ".join(map(str, notes))


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("position", ("all", "END"))
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_laws(two, arch, position):
    """Two derivations that must agree before the reference can judge anything:
    frozen MLPs -> the hand-computed direct effect; last-layer senders -> activation patching."""
    model, task = two[arch]
    frozen = ref_path_patch(model, task, "logits", position=position, freeze_mlps=True)
    for layer in range(2):
        for head in range(4):
            direct = ref_direct_effect(model, task, layer, head, position)
            torch.testing.assert_close(frozen[:, layer, head], direct, atol=1e-6, rtol=0)
    free = ref_path_patch(model, task, "logits", position=position)
    act = ref_activation_patch(model, task, "z", position, "noise")
    torch.testing.assert_close(free[:, 1], act[:, 1], atol=1e-6, rtol=0)


def test_reference_on_the_planted_circuit(planted):
    """0.1 -> 1.2's value is the only path (~ the whole corrupt effect); q and k are 0."""
    model, task = planted
    mc = run_metric(model, task.clean_tokens, task)
    mk = run_metric(model, task.corrupt_tokens, task)
    full = (mk - mc).mean()
    v = ref_path_patch(model, task, [(1, 2, "v")]).mean(0)
    assert abs(float(v[0, 1] / full) - 1) < 0.02
    assert (v[0, [0, 2, 3]] == 0).all() and torch.isnan(v[1]).all()
    for inp in "qk":
        assert (ref_path_patch(model, task, [(1, 2, inp)]).mean(0)[0] == 0).all()


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("freeze_mlps", (False, True))
@pytest.mark.parametrize("position", ("all", "END"))
@pytest.mark.parametrize("arch", ARCHS)
def test_to_logits_matches_reference(core, two, arch, position, freeze_mlps):
    model, task = two[arch]
    grid = core.path_patch(
        model, task, receivers="logits", position=position, freeze_mlps=freeze_mlps
    )
    ref = ref_path_patch(model, task, "logits", position=position, freeze_mlps=freeze_mlps)
    assert_grid_matches(grid, ref, model, task)
    assert grid.complete


@pytest.mark.parametrize("position", ("all", "END"))
@pytest.mark.parametrize("inp", ("q", "k", "v"))
@pytest.mark.parametrize("arch", ARCHS)
def test_to_receiver_matches_reference(core, three, arch, inp, position):
    model, task = three[arch]
    spec = [(2, 3, inp)]
    grid = core.path_patch(model, task, receivers=receivers_of(spec), position=position)
    ref = ref_path_patch(model, task, spec, position=position)
    assert torch.isnan(ref[0, 2]).all()  # senders=None: every head below layer 2
    assert_grid_matches(grid, ref, model, task)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_receiver_with_frozen_mlps(core, three, arch):
    model, task = three[arch]
    spec = [(2, 1, "v")]
    grid = core.path_patch(
        model, task, receivers=receivers_of(spec), position="END", freeze_mlps=True
    )
    assert_grid_matches(
        grid, ref_path_patch(model, task, spec, position="END", freeze_mlps=True), model, task
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_two_receivers_at_once(core, three, arch):
    model, task = three[arch]
    same_layer = [(2, 0, "q"), (2, 3, "v")]
    grid = core.path_patch(model, task, receivers=receivers_of(same_layer))
    assert_grid_matches(grid, ref_path_patch(model, task, same_layer), model, task)
    # Across layers: senders default to the layers below the lowest receiver.
    across = [(1, 2, "k"), (2, 1, "q")]
    grid = core.path_patch(model, task, receivers=receivers_of(across), position="END")
    ref = ref_path_patch(model, task, across, position="END")
    assert torch.isnan(ref[0, 1:]).all()
    assert_grid_matches(grid, ref, model, task)


def test_gqa_k_receiver_patches_the_whole_group(core, three):
    """On GQA a k receiver's kv head serves query heads 0 and 1 alike: the same patch."""
    model, task = three["llama"]
    g0 = core.path_patch(model, task, receivers=[Receiver(2, 0, "k")])
    g1 = core.path_patch(model, task, receivers=[Receiver(2, 1, "k")])
    assert_grid_matches(g0, ref_path_patch(model, task, [(2, 0, "k")]), model, task)
    torch.testing.assert_close(g0.values, g1.values, atol=1e-7, rtol=0, equal_nan=True)
    text = notes_text(g0).lower()
    assert "group" in text or "share" in text, f"notes do not mention the shared KV group: {text!r}"
    assert "2.0" in text and "2.1" in text or "0, 1" in text or "[0, 1]" in text, text
    # q receivers are per query head and differ.
    q0 = core.path_patch(model, task, receivers=[Receiver(2, 0, "q")])
    q1 = core.path_patch(model, task, receivers=[Receiver(2, 1, "q")])
    assert (q0.values[:2] - q1.values[:2]).abs().max() > 1e-4


def test_multi_query_attention(core):
    """One KV head for all 4 query heads: a k or v receiver patches every head's k/v."""
    model = sharp_tiny_model("llama", n_layers=3, seed=2, n_kv_heads=1)
    task = random_task(model, seed=6)
    for spec in ([(2, 3, "k")], [(2, 0, "v"), (2, 2, "q")]):
        grid = core.path_patch(model, task, receivers=receivers_of(spec), position="END")
        assert_grid_matches(grid, ref_path_patch(model, task, spec, position="END"), model, task)
    act = core.activation_patch(model, task, component="k")
    assert tuple(act.values.shape) == (3, 1) and [list(g) for g in act.kv_groups] == [[0, 1, 2, 3]]
    assert_grid_matches(act, ref_activation_patch(model, task, "k"), model, task)


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_senders(core, three, arch):
    model, task = three[arch]
    senders = [Head(0, 1), Head(1, 3)]
    spec = [(2, 2, "q")]
    grid = core.path_patch(model, task, receivers=receivers_of(spec), senders=senders)
    ref = ref_path_patch(model, task, spec, senders=[(0, 1), (1, 3)])
    assert_grid_matches(grid, ref, model, task)


@pytest.fixture
def generic_path(core):
    """The engine's generic path (bridge hooks only) instead of its fast re-implementation."""
    force = getattr(getattr(core, "cache", None), "force_hooked", None)
    if force is None:
        pytest.skip("the engine has no switch to its generic path")
    with force():
        yield


@pytest.mark.parametrize("arch", ARCHS)
def test_generic_path_matches_reference(core, two, three, generic_path, arch):
    model, task = two[arch]
    grid = core.path_patch(model, task, receivers="logits", position="END", freeze_mlps=True)
    ref = ref_path_patch(model, task, "logits", position="END", freeze_mlps=True)
    assert_grid_matches(grid, ref, model, task)
    model, task = three[arch]
    spec = [(2, 1, "k"), (2, 2, "v")]
    grid = core.path_patch(model, task, receivers=receivers_of(spec))
    assert_grid_matches(grid, ref_path_patch(model, task, spec), model, task)


@pytest.mark.parametrize("arch", ARCHS)
def test_late_single_token_difference(core, three, arch):
    """One differing token per example, late, at a different index each; k answers."""
    model, _ = three[arch]
    task = late_diff_task(model, seed=12, n_answers=2, n_wrong=2)
    for kwargs in (
        {"receivers": "logits", "position": "S"},
        {"receivers": "logits", "position": "all", "freeze_mlps": True},
        {"receivers": [(2, 1, "q"), (2, 3, "k")], "position": "S"},
        {"receivers": [(1, 0, "v")], "position": "all"},
    ):
        spec = kwargs.pop("receivers")
        recv = spec if spec == "logits" else receivers_of(spec)
        grid = core.path_patch(model, task, receivers=recv, **kwargs)
        assert_grid_matches(grid, ref_path_patch(model, task, spec, **kwargs), model, task)


@pytest.mark.parametrize("metric", ("prob", "candidate_accuracy"))
def test_other_metrics(core, three, metric):
    model, task = three["llama"]
    with torch.no_grad():
        top = task.final_logits(model(task.clean_tokens)).argmax(-1)
    task = replace(task, answers=top, metric_name=metric)
    for spec in ("logits", [(2, 0, "v")]):
        recv = spec if spec == "logits" else receivers_of(spec)
        grid = core.path_patch(model, task, receivers=recv, position="END")
        assert_grid_matches(grid, ref_path_patch(model, task, spec, position="END"), model, task)


@pytest.mark.parametrize("batch_size", (1, 3))
def test_batch_size_does_not_change_results(core, three, batch_size):
    model, task = three["gpt2"]
    spec = [(2, 2, "k")]
    grid = core.path_patch(model, task, receivers=receivers_of(spec), batch_size=batch_size)
    assert_grid_matches(grid, ref_path_patch(model, task, spec), model, task)
    grid = core.path_patch(model, task, receivers="logits", position="END", batch_size=batch_size)
    assert_grid_matches(grid, ref_path_patch(model, task, "logits", position="END"), model, task)


# --------------------------------------------------------------------------- laws


@pytest.mark.parametrize("position", ("all", "END"))
@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_to_logits_equals_activation_patching(core, two, arch, position):
    model, task = two[arch]
    path = core.path_patch(model, task, receivers="logits", position=position)
    act = core.activation_patch(model, task, component="z", positions=position, direction="noise")
    torch.testing.assert_close(path.values[-1].float(), act.values[-1].float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", ("all", "END"))
@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_mlps_to_logits_is_the_direct_effect(core, two, arch, position):
    """final_norm(resid_clean + (z_corrupt - z_clean)[h] @ W_O[h]) -> unembed, by hand."""
    model, task = two[arch]
    grid = core.path_patch(model, task, receivers="logits", position=position, freeze_mlps=True)
    for layer in range(2):
        for head in range(4):
            direct = ref_direct_effect(model, task, layer, head, position)
            assert abs(float(grid.values[layer, head]) - float(direct.mean())) <= ATOL, (
                layer,
                head,
                float(grid.values[layer, head]),
                float(direct.mean()),
            )


@pytest.mark.parametrize("arch", ARCHS)
def test_corrupt_equal_to_clean_gives_exact_zeros(core, three, arch):
    model, task = three[arch]
    task = replace(task, corrupt_tokens=task.clean_tokens.clone())
    for kwargs in (
        {"receivers": "logits"},
        {"receivers": "logits", "freeze_mlps": True},
        {"receivers": [Receiver(2, 1, "k")], "position": "END"},
    ):
        values = core.path_patch(model, task, **kwargs).values.detach().cpu()
        done = ~torch.isnan(values)
        assert done.any() and torch.equal(values[done], torch.zeros(int(done.sum()))), kwargs


def test_planted_circuit_ranks_first(core, planted):
    """By hand (see planted_micro_model): 1.2 carries the answer straight to the logits,
    0.1 reaches them only through 1.2's value; heads with W_O = 0 give exactly 0."""
    model, task = planted
    logits = core.path_patch(model, task, receivers="logits")
    values = logits.values.detach().cpu()
    zero = [(l, h) for l in range(2) for h in range(4) if (l, h) not in PLANTED_HEADS]
    assert all(values[l, h] == 0 for l, h in zero)
    assert abs(float(logits.normalized[1, 2]) - 1) < 0.02
    assert abs(float(values[0, 1])) < 1e-3 * abs(float(values[1, 2]))  # only via the final norm
    via_v = core.path_patch(model, task, receivers=[Receiver(1, 2, "v")]).values.detach().cpu()
    assert int(via_v[0].abs().argmax()) == 1
    assert via_v[0, 1] < 0 and (via_v[0, [0, 2, 3]] == 0).all()
    assert torch.isnan(via_v[1]).all()
    for inp in "qk":  # W_Q = W_K = 0: q and k are 0 whatever the sender does
        vals = core.path_patch(model, task, receivers=[Receiver(1, 2, inp)]).values
        assert (vals[0] == 0).all()


# --------------------------------------------------------------------------- progress, stop


def test_stop_after_first_batch_keeps_partial_results(core, three):
    model, task = three["llama"]
    receivers = [Receiver(2, 1, "v")]
    full = core.path_patch(model, task, receivers=receivers)
    calls: list[tuple[int, int]] = []
    part = core.path_patch(
        model,
        task,
        receivers=receivers,
        batch_size=2,
        on_progress=lambda d, t: calls.append((d, t)),
        should_stop=lambda: any(d > 0 for d, _ in calls),
    )
    assert part.complete is False
    done = torch.as_tensor(part.done).bool()
    assert 0 < int(done.sum()) < 8  # 8 senders in layers 0-1
    values, ref = part.values.detach().cpu(), full.values.detach().cpu()
    torch.testing.assert_close(values[done], ref[done], atol=1e-6, rtol=0)
    assert torch.isnan(values[~done]).all()
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len({t for _, t in calls}) == 1


def test_progress_reaches_the_total(core, two):
    model, task = two["gpt2"]
    calls: list[tuple[int, int]] = []
    grid = core.path_patch(model, task, batch_size=2, on_progress=lambda d, t: calls.append((d, t)))
    assert grid.complete and len(calls) >= 2
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"receivers": [Receiver(1, 0, "q")], "senders": [Head(1, 2)]}, "layer"),
        ({"receivers": [Receiver(1, 0, "k")], "senders": [Head(0, 1), Head(2, 0)]}, "layer"),
        ({"receivers": "logits", "senders": [Head(0, 4)]}, "4"),
        ({"receivers": "logits", "senders": [Head(3, 0)]}, "3"),
        ({"receivers": [Receiver(1, 4, "q")]}, "4"),
        ({"receivers": [Receiver(3, 0, "v")]}, "3"),
        ({"receivers": "logits", "position": "IO"}, "IO"),
    ],
)
def test_validation_errors(core, three, kwargs, match):
    model, task = three["llama"]
    calls = []
    with pytest.raises(ValueError, match=match):
        core.path_patch(model, task, on_progress=lambda d, t: calls.append(d), **kwargs)
    assert calls == [], "validation must happen before any computing"
