"""The CMAP widget fills its grid pass by pass, says in the subtitle what runs, and a Cancel
acts at the next pass (the grid keeps the finished heads)."""

from __future__ import annotations

import numpy as np
import pytest

import circuit_widgets as cw
from circuit_widgets.widgets.cmap import CMAPWidget


@pytest.fixture(scope="module")
def pair():
    kw = {"n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_model": 32}
    base, ft = cw.tiny_model("llama", seed=0, **kw), cw.tiny_model("llama", seed=5, **kw)
    return base, ft, cw.tasks.ioi(base, n=6, seed=0)


def _one_head_per_pass(monkeypatch, after=None):
    import circuit_widgets.core.cross_model as cmod

    real = cmod.cmap_grid

    def grid(*args, on_progress=None, **kwargs):
        def progress(done, total):
            on_progress(done, total)
            if after is not None:
                after(done)

        return real(*args, on_progress=progress, **{**kwargs, "batch_size": 1})

    monkeypatch.setattr(cmod, "cmap_grid", grid)
    return real


def test_grid_fills_progressively_with_a_running_subtitle(pair, monkeypatch):
    base, ft, task = pair
    real = _one_head_per_pass(monkeypatch)
    w = CMAPWidget(base, ft, task, ["2.1"])
    shown = []
    w.grid.observe(
        lambda c: shown.append((int(np.isfinite(c["new"]).sum()), w.grid.kind, w.grid.complete)),
        names="values",
    )
    kinds = []
    w.grid.observe(lambda c: kinds.append(c["new"]), names="kind")
    w.run()
    w.wait(60)
    assert w.status == "done" and w.grid.complete and w.grid.kind == "cmap"
    filled = [n for n, kind, complete in shown if kind.startswith("running: each head")]
    # the subtitle changes first (nothing computed yet), then 3 layers x 4 heads appear one by
    # one, one head per pass, never all at once
    assert filled == list(range(13))
    assert any(k.startswith("running: patching groups") for k in kinds)
    want = real(base, ft, task, position="END")
    np.testing.assert_allclose(w.grid.values, want.values.numpy(), rtol=1e-5, atol=1e-7)


def test_cancel_acts_within_one_pass(pair, monkeypatch):
    base, ft, task = pair
    w = CMAPWidget(base, ft, task, ["2.1"])
    _one_head_per_pass(monkeypatch, after=lambda done: done == 5 and w.cancel())
    job = w.run()
    w.wait(60)
    assert w.status == "cancelled" and not w.grid.complete
    # the cancel came after pass 5: the stop check before pass 6 acted
    assert int(np.isfinite(w.grid.values).sum()) == 5
    assert w.grid.kind.startswith("stopped") and job.partial["grid"].complete is False
