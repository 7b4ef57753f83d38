"""cmap_grid on the fast engine (resume at the patched layer and position, source from the
fine-tuned run) against plain TransformerLens hooks and against bridge-hook full forwards:
grouped-query k/v, Gemma 3, every component, chunks of examples, streamed partial grids."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets import tiny_model
from circuit_widgets.core import cache, hooks
from circuit_widgets.core.cross_model import cmap_grid
from circuit_widgets.tasks import ioi
from circuit_widgets.types import Component


def _raw(m):
    return getattr(m, "original_component", None) or m


def _finetune(model, seed):
    """Perturb every attention projection and MLP gate of every layer in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.original_model.model.layers:
            attn, mlp = _raw(layer.self_attn), _raw(layer.mlp)
            for lin in [*(_raw(getattr(attn, f"{n}_proj")) for n in "qkvo"), _raw(mlp.gate_proj)]:
                lin.weight += 0.3 * torch.randn(lin.weight.shape, generator=g)
    return model


PAIRS = {
    "llama_gqa": lambda seed: tiny_model(
        "llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=seed
    ),
    "gemma3": lambda seed: tiny_model("gemma3", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def setup(request, one_thread):
    make = PAIRS[request.param]
    base, ft = make(0), _finetune(make(0), seed=7)
    task = ioi(base, n=5, seed=1)
    assert cache.engine_for(base) is not None and cache.engine_for(ft) is not None
    return request.param, base, ft, task


def _reference(base, ft, task, comp: Component, layer: int, col: int, position: str | None):
    """Plain hooks: cache the fine-tuned activation, write one column of it into the base."""
    name = hooks.hook_name(comp, layer)
    with torch.no_grad():
        _, ft_cache = ft.run_with_cache(task.clean_tokens, names_filter=[name])
        src = ft_cache[name]
        b, s = task.clean_tokens.shape
        pos = (
            torch.ones(b, s, dtype=torch.bool)
            if position is None
            else torch.arange(s)[None] == task.positions[position][:, None]
        )

        def hook(act, hook=None):
            out = act.clone()
            if act.dim() == 4:  # [b, s, heads, dh]
                out[:, :, col] = torch.where(pos[:, :, None], src[:, :, col], act[:, :, col])
            else:
                out = torch.where(pos[:, :, None], src, act)
            return out

        patched = base.run_with_hooks(task.clean_tokens, fwd_hooks=[(name, hook)])
        plain = base(task.clean_tokens)
    return task.metric(patched) - task.metric(plain)


@pytest.mark.parametrize("component", ["z", "q", "k", "v", "attn_out", "mlp_out"])
def test_fast_grid_matches_plain_hooks_and_full_forwards(setup, component):
    _, base, ft, task = setup
    comp = Component.coerce(component)
    grid = cmap_grid(base, ft, task, component=component, position="END")
    assert not any("generic path" in n for n in grid.notes)  # it ran on the fast engine
    with cache.force_hooked():
        full = cmap_grid(base, ft, task, component=component, position="END")
    assert any("generic path" in n for n in full.notes)
    torch.testing.assert_close(grid.per_example, full.per_example, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid.metric_clean, full.metric_clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid.metric_corrupt, full.metric_corrupt, atol=1e-5, rtol=1e-5)
    n_cols = grid.values.shape[1]
    assert n_cols == (2 if comp.per_kv_head else 4 if comp.per_head else 1)
    assert grid.values.abs().max() > 1e-5  # the pair really differs at END (k: barely)
    for layer, col in ((0, n_cols - 1), (1, 0)):
        ref = _reference(base, ft, task, comp, layer, col, "END")
        torch.testing.assert_close(grid.per_example[:, layer, col], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("component", "position"), [("v", "all"), ("z", "S2")])
def test_other_positions_match_plain_hooks(setup, component, position):
    _, base, ft, task = setup
    comp = Component.coerce(component)
    grid = cmap_grid(base, ft, task, component=component, position=position)
    pos = None if position == "all" else position
    for layer, col in ((0, 0), (1, 1)):
        ref = _reference(base, ft, task, comp, layer, col, pos)
        torch.testing.assert_close(grid.per_example[:, layer, col], ref, atol=1e-5, rtol=1e-5)


def test_chunks_stream_and_stop(setup):
    _, base, ft, task = setup
    whole = cmap_grid(base, ft, task, component="z")
    seen, ticks = [], []
    chunked = cmap_grid(
        base,
        ft,
        task,
        component="z",
        max_memory=1,
        batch_size=1,  # one head per pass
        on_progress=lambda d, t: ticks.append((d, t)),
        on_partial=seen.append,
    )
    torch.testing.assert_close(chunked.per_example, whole.per_example, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.values, whole.values, atol=1e-5, rtol=1e-5)
    assert any("5 chunks" in n for n in chunked.notes)
    assert ticks[-1][0] == ticks[-1][1] == len(ticks)
    # the first chunk fills the grid cell by cell, then each chunk adds its examples
    filled = [int(g.done.sum()) for g in seen]
    assert filled[0] < filled[-1] == whole.values.numel() and filled == sorted(filled)
    assert all(not g.complete for g in seen)
    assert [g.per_example.shape[0] for g in seen][-4:] == [1, 2, 3, 4]
    n = []
    part = cmap_grid(
        base, ft, task, component="z", max_memory=1, should_stop=lambda: len(n.append(1) or n) > 5
    )
    # two passes (one per layer) per one-example chunk, and a check before each later chunk's
    # runs: the sixth call comes before the third chunk, which is then never run
    assert not part.complete and part.per_example.shape[0] == 2
    k = 2
    torch.testing.assert_close(part.values, whole.per_example[:k].mean(0), atol=1e-5, rtol=1e-5)


def test_the_generic_path_streams_partial_grids_too(setup):
    _, base, ft, task = setup
    seen = []
    with cache.force_hooked():
        grid = cmap_grid(
            base, ft, task, component="z", batch_size=len(task) * 2, on_partial=seen.append
        )
    filled = [int(g.done.sum()) for g in seen]
    assert filled[0] < filled[-1] == grid.values.numel() and filled == sorted(filled)
    torch.testing.assert_close(seen[-1].values, grid.values, atol=1e-6, rtol=1e-6)
