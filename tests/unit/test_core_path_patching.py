"""path_patch: the fast engine against a two-pass run_with_hooks reference (Wang et al.)."""

from __future__ import annotations

import pytest
import torch
from test_core_helpers import caches, random_task, run_metric

from circuit_widgets.core import path_patch
from circuit_widgets.core.cache import force_hooked
from circuit_widgets.models import model_shape
from circuit_widgets.types import Head, Receiver

TOL = 1e-5


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def wang_reference(model, task, sender, receivers, position, freeze_mlps):
    """Run A: every z clean but the sender's (corrupt at `position`), MLPs recompute or frozen;
    logits: metric of A. Receivers: their hook_q/k/v from A written into a clean run B."""
    shape = model_shape(model)
    c, x = caches(model, task)
    s = task.seq_len
    mask = (
        torch.ones(len(task), s, dtype=torch.bool)
        if position == "all"
        else torch.arange(s)[None] == task.positions[position][:, None]
    )
    hooks_a = []
    for l in range(shape.n_layers):
        zname = f"blocks.{l}.attn.hook_z"

        def fz(act, hook=None, l=l, zname=zname):
            out = c[zname].clone()
            if l == sender.layer:
                out[:, :, sender.head] = torch.where(
                    mask[:, :, None], x[zname][:, :, sender.head], out[:, :, sender.head]
                )
            return out

        hooks_a.append((zname, fz))
        if freeze_mlps:
            mname = f"blocks.{l}.hook_mlp_out"
            hooks_a.append((mname, lambda act, hook=None, mname=mname: c[mname].clone()))
    grabbed = {}
    for r in receivers:
        name = f"blocks.{r.layer}.attn.hook_{r.input.value}"
        hooks_a.append(
            (name, lambda act, hook=None, name=name: grabbed.__setitem__(name, act.clone()))
        )
    metric_clean = run_metric(model, task, task.clean_tokens)
    metric_a = run_metric(model, task, task.clean_tokens, hooks_a)
    if not receivers:
        return metric_a - metric_clean
    hooks_b = []
    for r in receivers:
        name = f"blocks.{r.layer}.attn.hook_{r.input.value}"
        col = r.head if r.input.value == "q" else r.head // shape.group_size

        def put(act, hook=None, name=name, col=col):
            out = act.clone()
            out[:, :, col] = grabbed[name][:, :, col]
            return out

        hooks_b.append((name, put))
    return run_metric(model, task, task.clean_tokens, hooks_b) - metric_clean


@pytest.mark.parametrize("position", ["all", "END"])
@pytest.mark.parametrize("freeze", [False, True])
def test_to_logits_matches_reference(model, position, freeze):
    task = random_task(model)
    grid = path_patch(model, task, position=position, freeze_mlps=freeze)
    assert grid.kind == "path" and grid.receivers == "logits" and grid.shape == (2, 4)
    for layer in range(2):
        for h in range(4):
            ref = wang_reference(model, task, Head(layer, h), [], position, freeze)
            torch.testing.assert_close(grid.per_example[:, layer, h], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("inp", ["q", "k", "v"])
@pytest.mark.parametrize("position", ["all", "X"])
def test_to_receivers_matches_reference(model, inp, position):
    task = random_task(model, seed=2)
    receivers = [Receiver(1, 3, inp)]
    grid = path_patch(model, task, receivers=receivers, position=position)
    assert grid.values[1].isnan().all()  # senders: layer 0 only
    for h in range(4):
        ref = wang_reference(model, task, Head(0, h), receivers, position, False)
        torch.testing.assert_close(grid.per_example[:, 0, h], ref, atol=TOL, rtol=0)
        assert ref.abs().max() > 1e-6 or inp != "v"


def test_several_receivers_and_frozen_mlps(tiny_llama):
    model = tiny_llama
    task = random_task(model, seed=4)
    receivers = [Receiver(1, 0, "q"), Receiver(1, 1, "k"), Receiver(1, 3, "v")]
    grid = path_patch(model, task, receivers=receivers, position="X", freeze_mlps=True)
    for h in range(4):
        ref = wang_reference(model, task, Head(0, h), receivers, "X", True)
        torch.testing.assert_close(grid.per_example[:, 0, h], ref, atol=TOL, rtol=0)


def test_gqa_kv_receiver_is_described(tiny_llama):
    task = random_task(tiny_llama)
    grid = path_patch(tiny_llama, task, receivers=[Receiver(1, 3, "k")])
    assert "kv head 1, shared by q2-3" in grid.receivers
    assert any("feeds query heads [2, 3]" in n for n in grid.notes)
    # k of query head 2 is the same kv head: same patch, same numbers
    same = path_patch(tiny_llama, task, receivers=[Receiver(1, 2, "k")])
    torch.testing.assert_close(grid.values, same.values, atol=0, rtol=0, equal_nan=True)


def test_frozen_mlps_to_logits_is_the_direct_effect(tiny_llama):
    """With every head and MLP frozen, only W_O of the sender moves the final residual."""
    model = tiny_llama
    task = random_task(model)
    grid = path_patch(model, task, freeze_mlps=True)
    c, x = caches(model, task)
    ar = torch.arange(len(task))
    end = task.positions["END"]
    o_proj = model.original_model.model.layers[0].self_attn.o_proj
    final = c["blocks.1.hook_resid_post"][ar, end]
    for h in range(4):
        z = c["blocks.0.attn.hook_z"][ar, end].clone()
        z_new = z.clone()
        z_new[:, h] = x["blocks.0.attn.hook_z"][ar, end, h]
        with torch.no_grad():
            moved = final + o_proj(z_new.flatten(1)) - o_proj(z.flatten(1))
            logits = model.original_model.lm_head(model.original_model.model.norm(moved))
        ref = task.metric(logits) - task.metric(
            model.original_model.lm_head(model.original_model.model.norm(final))
        )
        torch.testing.assert_close(grid.per_example[:, 0, h], ref, atol=TOL, rtol=0)


def test_generic_path_matches_fast_path(model):
    task = random_task(model, seed=6)
    for kw in ({}, {"receivers": [Receiver(1, 1, "v")], "position": "END"}):
        fast = path_patch(model, task, **kw)
        with force_hooked():
            slow = path_patch(model, task, **kw)
        torch.testing.assert_close(
            fast.per_example, slow.per_example, atol=TOL, rtol=0, equal_nan=True
        )


def test_validation(tiny_llama):
    task = random_task(tiny_llama)
    with pytest.raises(ValueError, match="at or above receiver layer 1"):
        path_patch(tiny_llama, task, receivers=[Receiver(1, 0, "q")], senders=[Head(1, 2)])
    with pytest.raises(ValueError, match="valid heads are 0..3"):
        path_patch(tiny_llama, task, senders=[Head(0, 7)])
    with pytest.raises(ValueError, match="valid layers are 0..1"):
        path_patch(tiny_llama, task, receivers=[Receiver(5, 0, "q")])
    with pytest.raises(ValueError, match="valid positions"):
        path_patch(tiny_llama, task, position="S2")
    with pytest.raises(ValueError, match="no earlier heads"):
        path_patch(tiny_llama, task, receivers=[Receiver(0, 0, "q")])
    with pytest.raises(ValueError, match="receivers must be"):
        path_patch(tiny_llama, task, receivers="resid")


def test_stop_keeps_partial(tiny_gpt2):
    task = random_task(tiny_gpt2)
    seen = []
    grid = path_patch(
        tiny_gpt2,
        task,
        batch_size=len(task),
        on_progress=lambda d, t: seen.append(d),
        should_stop=lambda: len(seen) >= 2,
    )
    assert not grid.complete and grid.done.sum() == 2
    assert seen == [1, 2]
