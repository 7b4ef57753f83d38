"""activation_patch: the fast engine against plain run_with_hooks, on tiny GPT-2 and GQA Llama."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_core_helpers import caches, random_task, run_metric

from circuit_widgets.core import HeadGrid, activation_patch, clear_cache
from circuit_widgets.core import cache as core_cache
from circuit_widgets.core.cache import force_hooked
from circuit_widgets.core.hooks import hook_name
from circuit_widgets.types import Component, Head

TOL = 1e-5


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def reference(model, task, comp, layer, col, mask, direction="noise"):
    """Per-example metric patched - clean from one bridge forward with one hook."""
    comp = Component.coerce(comp)
    c, x = caches(model, task)
    src = x if direction == "noise" else c
    base = task.clean_tokens if direction == "noise" else task.corrupt_tokens
    name = hook_name(comp, layer)

    def hook(act, hook=None):
        out = act.clone()
        if comp == Component.PATTERN:
            sel = mask[:, None, :, None].expand(-1, 1, -1, act.shape[-1])
            out[:, col : col + 1] = torch.where(
                sel, src[name][:, col : col + 1], act[:, col : col + 1]
            )
        elif comp.per_head:
            out[:, :, col] = torch.where(mask[:, :, None], src[name][:, :, col], act[:, :, col])
        else:
            out = torch.where(mask[:, :, None], src[name], act)
        return out

    return run_metric(model, task, base, [(name, hook)]) - run_metric(
        model, task, task.clean_tokens
    )


@pytest.mark.parametrize(
    "comp", ["z", "q", "k", "v", "pattern", "attn_out", "mlp_out", "resid_pre"]
)
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_every_component_matches_run_with_hooks(model, comp, direction):
    task = random_task(model)
    grid = activation_patch(model, task, component=comp, positions="all", direction=direction)
    n_cols = grid.shape[1]
    all_pos = torch.ones_like(task.attention_mask, dtype=torch.bool)
    for layer in range(2):
        for col in range(n_cols):
            ref = reference(model, task, comp, layer, col, all_pos, direction)
            torch.testing.assert_close(grid.per_example[:, layer, col], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("positions", ["END", "X", ["Y", "END"], "each"])
def test_positions_match_run_with_hooks(model, positions):
    task = random_task(model, seed=3)
    grid = activation_patch(model, task, component="z", positions=positions)
    s = task.seq_len
    ar = torch.arange(s)[None]
    if positions == "each":
        masks = [(ar == p) & (p < task.lengths[:, None]) for p in range(s)]
        assert grid.shape == (2, s, 4) and grid.positions == [str(p) for p in range(s)]
    elif isinstance(positions, list):
        masks = [ar == task.positions[n][:, None] for n in positions]
        assert grid.shape == (2, 2, 4) and grid.positions == positions
    else:
        masks = [ar == task.positions[positions][:, None]]
        assert grid.shape == (2, 4) and grid.positions is None
    for layer in range(2):
        for h in range(4):
            for p, mask in enumerate(masks):
                got = (
                    grid.per_example[:, layer, p, h]
                    if grid.values.dim() == 3
                    else grid.per_example[:, layer, h]
                )
                torch.testing.assert_close(
                    got, reference(model, task, "z", layer, h, mask), atol=TOL, rtol=0
                )


def test_patches_have_an_effect(tiny_llama):
    """Guards the equality tests: the patches really move the metric."""
    grid = activation_patch(tiny_llama, random_task(tiny_llama), component="v")
    assert grid.per_example.abs().max() > 1e-4


def test_gqa_kv_columns(tiny_llama):
    task = random_task(tiny_llama)
    for comp in ("k", "v"):
        grid = activation_patch(tiny_llama, task, component=comp)
        assert grid.shape == (2, 2)
        assert grid.heads == ["kv0 (q0-1)", "kv1 (q2-3)"]
        assert grid.kv_groups == [[0, 1], [2, 3]]
        assert any("kv_groups" in n for n in grid.notes)
    assert activation_patch(tiny_llama, task, component="q").shape == (2, 4)
    assert activation_patch(tiny_llama, task, component="mlp_out").heads == ["mlp_out"]


def test_generic_path_matches_fast_path(model):
    task = random_task(model, seed=5)
    for kw in (
        {"component": "z"},
        {"component": "k", "positions": "END", "direction": "denoise"},
        {"component": "attn_out", "positions": ["X", "END"]},
    ):
        fast = activation_patch(model, task, **kw)
        with force_hooked():
            slow = activation_patch(model, task, **kw)
        assert any("generic path" in n for n in slow.notes)
        torch.testing.assert_close(fast.per_example, slow.per_example, atol=TOL, rtol=0)


def test_value_conventions(tiny_llama):
    task = random_task(tiny_llama)
    grid = activation_patch(tiny_llama, task, direction="denoise")
    gap = (grid.metric_corrupt - grid.metric_clean).mean()
    torch.testing.assert_close(grid.values, grid.per_example.mean(0))
    torch.testing.assert_close(grid.normalized, grid.values / gap)
    torch.testing.assert_close(grid.recovered, 1 - grid.normalized)
    # the fully corrupted residual stream at layer 0 reproduces the corrupt run (denoise: clean)
    full = activation_patch(tiny_llama, task, component="resid_pre", direction="noise")
    torch.testing.assert_close(full.normalized[0, 0], torch.tensor(1.0), atol=1e-4, rtol=0)


def test_heads_subset_progress_and_stop(tiny_gpt2):
    task = random_task(tiny_gpt2)
    grid = activation_patch(tiny_gpt2, task, heads=[Head(1, 2), "0.1"])
    assert grid.done.sum() == 2 and grid.values.isnan().sum() == 6
    calls = []
    grid = activation_patch(
        tiny_gpt2,
        task,
        positions="each",
        batch_size=len(task),
        on_progress=lambda d, t: calls.append((d, t)),
        should_stop=lambda: len(calls) >= 3,
    )
    assert not grid.complete and calls[-1][0] == 3 and calls[-1][1] > 3
    assert 0 < int(grid.done.sum()) < grid.done.numel()
    assert grid.values[grid.done].isfinite().all() and grid.values[~grid.done].isnan().all()


def test_validation_errors(tiny_llama):
    task = random_task(tiny_llama)
    with pytest.raises(ValueError, match="valid positions"):
        activation_patch(tiny_llama, task, positions="IO")
    with pytest.raises(ValueError, match="0..3"):
        activation_patch(tiny_llama, task, heads=[Head(0, 4)])
    with pytest.raises(ValueError, match="key/value heads 0..1"):
        activation_patch(tiny_llama, task, component="k", heads=[Head(0, 2)])
    with pytest.raises(ValueError, match="valid layers are 0..1"):
        activation_patch(tiny_llama, task, heads=[Head(2, 0)])
    with pytest.raises(ValueError, match="not a valid Component"):
        activation_patch(tiny_llama, task, component="resid_post")
    with pytest.raises(ValueError, match="not a valid Direction"):
        activation_patch(tiny_llama, task, direction="sideways")


def test_cache_is_reused_and_weak(tiny_llama):
    clear_cache()
    task = random_task(tiny_llama, seed=9)
    activation_patch(tiny_llama, task, heads=[Head(0, 0)])
    entry = core_cache._entry(tiny_llama, task)
    clean = entry["clean"]
    activation_patch(tiny_llama, task, component="v")
    assert core_cache._entry(tiny_llama, task)["clean"] is clean
    ref = weakref.ref(task)
    del task, entry, clean
    gc.collect()
    assert ref() is None  # the cache does not keep tasks alive
    clear_cache()
    assert len(core_cache._RUNS) == 0


def test_headgrid_api(tiny_gpt2):
    grid = activation_patch(tiny_gpt2, random_task(tiny_gpt2), positions=["X", "END"])
    assert isinstance(grid, HeadGrid) and grid.shape == (2, 2, 4) and grid.kind == "activation"
    top = grid.top(3)
    assert len(top) == 3 and all(isinstance(h, Head) for h, _ in top)
    assert [abs(v) for _, v in top] == sorted((abs(v) for _, v in top), reverse=True)
    df = grid.to_dataframe()
    assert len(df) == 16 and set(df.columns) >= {"layer", "head", "position", "value", "normalized"}
    flat = activation_patch(tiny_gpt2, random_task(tiny_gpt2), heads=[Head(1, 1)])
    assert [h for h, _ in flat.top(5)] == [Head(1, 1)]  # NaN cells are skipped


def test_hooks_left_on_the_model_are_honoured(tiny_llama):
    """A permanent hook changes the bridge's forward; the engine then takes the hook path."""
    task = random_task(tiny_llama, seed=8)
    plain = activation_patch(tiny_llama, task, component="z", positions="END")
    tiny_llama.add_hook("blocks.1.attn.hook_z", lambda z, hook: z * 0.5)
    try:
        hooked = activation_patch(tiny_llama, task, component="z", positions="END")
        clean = run_metric(tiny_llama, task, task.clean_tokens)
    finally:
        tiny_llama.reset_hooks()
    assert any("generic path" in n for n in hooked.notes)
    torch.testing.assert_close(hooked.metric_clean, clean, atol=TOL, rtol=0)
    assert not torch.allclose(hooked.metric_clean, plain.metric_clean)
