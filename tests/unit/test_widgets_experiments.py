"""AttentionWidget, PathPatchingWidget, DCMWidget, CMAPWidget, CircuitExplorer without a browser:
results against plain references, partial results and cancel, validation, static images."""

from __future__ import annotations

import ast
import base64
import importlib
import inspect
import threading

import numpy as np
import pytest
import torch
from test_dcm import CARRIERS, planted_dcm_model, planted_desideratum
from test_widgets import PNG_MAGIC, wire_roundtrip

import circuit_widgets as cw
from circuit_widgets.core import attribution_patch, path_patch
from circuit_widgets.core.attribution import path_attribution
from circuit_widgets.types import Circuit, Head, Receiver
from circuit_widgets.widgets import (
    AttentionWidget,
    CircuitExplorer,
    CMAPWidget,
    DCMWidget,
    PathPatchingWidget,
)
from circuit_widgets.widgets.attention import circuitsvis_source


@pytest.fixture(scope="module")
def ioi_llama(tiny_llama):
    return cw.tasks.ioi(tiny_llama, n=6, seed=0)


@pytest.fixture(scope="module")
def ioi_gpt2(tiny_gpt2):
    return cw.tasks.ioi(tiny_gpt2, n=6, seed=0)


def reference_pattern(model, tokens, layer, head):
    """The bridge's own hook_pattern of one head, read with run_with_cache."""
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None], names_filter=lambda n: n.endswith("hook_pattern")
        )
    return cache[f"blocks.{layer}.attn.hook_pattern"][0, head]


# ---------------------------------------------------------------------------- attention


def test_attention_patterns_match_the_bridge_and_label_gqa(tiny_llama, ioi_llama):
    w = AttentionWidget(tiny_llama, ioi_llama, ["1.2", Head(0, 1)], example=2)
    w.wait(10)  # the first patterns are computed off the main thread too
    assert w.status == "done"
    n = int(ioi_llama.lengths[2])
    toks = ioi_llama.clean_tokens[2, :n]
    assert w.shown == [[0, 1], [1, 2]] and w.patterns.shape == (2, n, n)
    for i, (layer, head) in enumerate(w.shown):
        np.testing.assert_allclose(
            w.patterns[i], reference_pattern(tiny_llama, toks, layer, head).numpy(), atol=1e-6
        )
    assert np.allclose(w.patterns.sum(-1), 1, atol=1e-5) and np.all(np.triu(w.patterns, 1) == 0)
    assert w.head_labels == ["L0H1 (kv 0, shared by q0-1)", "L1H2 (kv 1, shared by q2-3)"]
    assert w.tokens == [tiny_llama.tokenizer.decode([int(t)]) for t in toks]
    msg = wire_roundtrip(w, "patterns")
    assert msg["dtype"] == "float32" and msg["shape"] == [2, n, n]


def test_attention_static_image_shows_the_heads_passed_and_its_whole_title(
    tiny_llama, ioi_llama, monkeypatch
):
    """The static image is made when the widget is displayed, before its first patterns landed:
    it waits for them (not "no heads selected"), and a long title on one narrow head wraps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import circuit_widgets.widgets.attention as att_module
    from circuit_widgets.widgets._base import Job

    go = threading.Event()  # the patterns are computed only once the image asked for them
    real_patterns, real_wait = att_module.attention_patterns, Job.wait
    monkeypatch.setattr(
        att_module, "attention_patterns", lambda *a: (go.wait(10), real_patterns(*a))[1]
    )
    monkeypatch.setattr(
        Job, "wait", lambda self, timeout=None: (go.set(), real_wait(self, timeout))[1]
    )
    title = "Attention of the selected heads on the first example of the task (clean prompt)"
    w = AttentionWidget(tiny_llama, ioi_llama, ["1.2"], title=title)
    fig = w.figure()
    go.set()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no heads selected" not in texts
    assert [ax.get_title() for ax in fig.axes] == ["L1H2 (kv 1, shared by q2-3)"]
    FigureCanvasAgg(fig).draw()
    box, page = fig._suptitle.get_window_extent(), fig.bbox
    assert fig._suptitle.get_text().replace("\n", " ") == title
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1


def test_attention_recomputes_off_the_main_thread(tiny_gpt2, ioi_gpt2):
    w = AttentionWidget(tiny_gpt2, ioi_gpt2, ["1.3"])
    threads: list[int] = []
    w.observe(lambda c: threads.append(threading.get_ident()), names="patterns")
    w.example = 4
    w.prompt = "corrupt"
    w.wait(10)
    n = int(ioi_gpt2.lengths[4])
    ref = reference_pattern(tiny_gpt2, ioi_gpt2.corrupt_tokens[4, :n], 1, 3)
    assert w.status == "done" and w.shown_example == 4
    np.testing.assert_allclose(w.patterns[0], ref.numpy(), atol=1e-6)
    assert threads and threading.get_ident() not in threads
    w.circuit = Circuit.from_heads(["0.0", "0.2"])
    w.wait(10)
    assert w.shown == [[0, 0], [0, 2]] and w.head_labels == ["L0H0", "L0H2"]  # no GQA: plain labels


def test_attention_validation(tiny_gpt2, ioi_gpt2):
    with pytest.raises(
        ValueError, match=r"example must be an int in 0-5 \(the task has 6 examples\)"
    ):
        AttentionWidget(tiny_gpt2, ioi_gpt2, ["0.0"], example=6)
    with pytest.raises(
        ValueError, match=r"head 2\.0 is outside the model \(layers 0-1, heads 0-3\)"
    ):
        AttentionWidget(tiny_gpt2, ioi_gpt2, ["2.0"])
    with pytest.raises(TypeError, match=r"'exampel' \(did you mean 'example'\?\)"):
        AttentionWidget(tiny_gpt2, ioi_gpt2, exampel=1)
    w = AttentionWidget(tiny_gpt2, ioi_gpt2)
    assert w.patterns.shape[0] == 0 and w.shown == []
    with pytest.raises(Exception, match="example must be in 0-5"):
        w.example = 9


def test_circuitsvis_renderer_is_sent_once_on_request(tiny_gpt2, ioi_gpt2):
    w = AttentionWidget(tiny_gpt2, ioi_gpt2, ["0.0"])
    sent = []
    w.send = lambda content, buffers=None: sent.append((content, buffers))
    w._on_front_end_msg(w, {"type": "something else"}, [])
    assert sent == []
    w._on_front_end_msg(w, {"type": "circuitsvis"}, [])
    ((content, buffers),) = sent
    version, data = circuitsvis_source()
    assert (
        content
        == {"type": "circuitsvis", "version": version}
        == {"type": "circuitsvis", "version": w.circuitsvis_version}
    )
    assert bytes(buffers[0]) == data and data.startswith(b'"use strict";var CircuitsVis=')
    assert b"sourceMappingURL" not in data[-200:]  # nothing for the page to fetch
    assert "iife" not in w._esm and len(w._esm) < 100_000  # the bundle does not carry it per widget


def test_attention_static_image(tiny_gpt2, ioi_gpt2):
    w = AttentionWidget(tiny_gpt2, ioi_gpt2, ["0.0", "1.1"], title="<b>x</b>")
    w.wait(10)
    data, _ = w._repr_mimebundle_()
    assert base64.b64decode(data["image/png"]).startswith(PNG_MAGIC)
    assert data["text/plain"].startswith("AttentionWidget(example 0 of 6")
    from circuit_widgets.plots import plot_attention

    with pytest.raises(ValueError, match=r"\[n_heads, s, s\]"):
        plot_attention(np.zeros((2, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 tokens for patterns over 3 positions"):
        plot_attention(np.zeros((1, 3, 3)), ["a", "b"])


# ---------------------------------------------------------------------------- path patching


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_path_patching_grid_equals_one_full_path_patch(request, name):
    model = request.getfixturevalue(name)
    task = cw.tasks.ioi(model, n=6, seed=1)
    w = PathPatchingWidget(model, task, position="S2", freeze_mlps=True)
    partials = []
    w.grid.observe(
        lambda c: partials.append(
            (w.grid.values.copy(), None if w.grid.pending is None else w.grid.pending.copy())
        ),
        names="values",
    )
    w.run()
    w.wait(60)
    ref = path_patch(model, task, position="S2", freeze_mlps=True)
    assert w.status == "done" and w.grid.complete and w.grid.pending is None
    np.testing.assert_allclose(w.grid.values, ref.values.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w.grid.normalized, ref.normalized.numpy(), rtol=1e-5, atol=1e-7)
    # the first thing on screen was the path-attribution preview (same position, MLPs frozen), every cell pending
    preview = path_attribution(model, task, position="S2", freeze_mlps=True)
    first_values, first_pending = partials[0]
    np.testing.assert_allclose(first_values, preview.values.numpy(), rtol=1e-5, atol=1e-7)
    assert first_pending is not None and first_pending.all()
    # then exact rows replaced preview rows one layer at a time
    assert len(partials) >= 1 + model.cfg.n_layers
    assert partials[1][1][0].sum() == 0 and partials[1][1][1:].all()


def test_path_patching_to_selected_receivers(tiny_llama, ioi_llama):
    w = PathPatchingWidget(tiny_llama, ioi_llama, preview=False)
    w.grid.selected = [[1, 3]]
    w.receivers, w.receiver_input = "selected", "k"
    w.run()
    w.wait(60)
    ref = path_patch(tiny_llama, ioi_llama, receivers=[Receiver(1, 3, "k")], position="END")
    np.testing.assert_allclose(w.grid.values, ref.values.numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(w.grid.values[1]).all() and w.run_receivers == "1.3.k"
    assert w.grid.selected == [[1, 3]] and w.circuit == Circuit.from_heads(["1.3"])


def test_path_patching_cancel_keeps_finished_layers(tiny_model_4layers):
    model, task = tiny_model_4layers
    w = PathPatchingWidget(model, task, preview=False)

    def stop_after_first_layer(change):
        if np.isfinite(w.grid.values[0]).all():
            w.cancel()  # runs on the worker between two layers: the next check stops it

    w.grid.observe(stop_after_first_layer, names="values")
    w.run()
    w.wait(60)
    ref = path_patch(model, task, senders=[Head(0, h) for h in range(4)], position="END")
    assert w.status == "cancelled" and not w.grid.complete
    np.testing.assert_allclose(w.grid.values[0], ref.values[0].numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(w.grid.values[1:]).all()  # stopped within one batch (one layer)


@pytest.fixture(scope="module")
def tiny_model_4layers():
    model = cw.tiny_model("gpt2", n_layers=4, n_heads=4, d_model=32, seed=2)
    return model, cw.tasks.ioi(model, n=6, seed=0)


def test_path_patching_errors_show_in_the_widget(tiny_gpt2, ioi_gpt2):
    w = PathPatchingWidget(tiny_gpt2, ioi_gpt2)
    w.receivers = "selected"
    with pytest.raises(ValueError, match="no heads are selected"):
        w.run()
    w._on_front_end_msg(w, {"type": "run"}, [])  # the Run button
    assert w.status == "error" and "no heads are selected" in w.error
    w.position = (
        "S2"  # an unrelated setting... still a change: the refusal no longer describes them
    )
    assert w.status == "idle" and w.error == ""
    w._on_front_end_msg(w, {"type": "run"}, [])
    assert w.status == "error"
    w.grid.selected = [[0, 2]]  # what the refusal asked for: its message goes
    assert w.status == "idle" and w.error == ""
    with pytest.raises(ValueError, match="layer 0 have no earlier heads"):
        w.run()
    with pytest.raises(
        ValueError,
        match=r"position must be one of \['IO', 'S1', 'S1\+1', 'S2', 'and', 'END', 'all'\]",
    ):
        PathPatchingWidget(tiny_gpt2, ioi_gpt2, position="S3")
    with pytest.raises(TypeError, match=r"'freeze_mlp' \(did you mean 'freeze_mlps'\?\)"):
        PathPatchingWidget(tiny_gpt2, ioi_gpt2, freeze_mlp=True)


def test_clicking_heads_shows_their_attention(tiny_gpt2, ioi_gpt2):
    w = PathPatchingWidget(tiny_gpt2, ioi_gpt2)
    w.grid.set_state({"selected": [[1, 0], [0, 3]]})  # what a click in the view sends
    w.attention.wait(10)
    assert w.attention.shown == [[0, 3], [1, 0]]
    n = int(ioi_gpt2.lengths[0])
    ref = reference_pattern(tiny_gpt2, ioi_gpt2.clean_tokens[0, :n], 1, 0)
    np.testing.assert_allclose(w.attention.patterns[1], ref.numpy(), atol=1e-6)
    data, _ = w._repr_mimebundle_()
    assert base64.b64decode(data["image/png"]).startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------- DCM


@pytest.fixture(scope="module")
def planted():
    return planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})


def test_dcm_widget_finds_the_planted_carriers(planted):
    d = planted_desideratum(n=24)
    w = DCMWidget(planted, d, None, "END", lams=[0.01, 1000.0], lr=0.2, batch_size=8)
    seen = []
    w.observe(lambda c: seen.append(c["new"]), names="n_done")
    w.train()
    w.wait(120)
    assert w.status == "done" and seen == [1, 2] and len(w.results) == 2
    assert w.lam_index == 0  # the best validation accuracy
    assert w.circuit == Circuit.from_heads(CARRIERS)
    mask = w.results[0].mask.numpy()
    np.testing.assert_array_equal(w.grid.values, (1 - mask).astype(np.float32))
    assert w.summary["test_accuracy"] == 1.0 and w.summary["n_selected"] == 3
    assert len(w.loss) == len(w.results[0].curve.loss) and w.val_accuracy.shape[1] == 2
    w.lam_index = 1  # a huge lambda keeps every head's own output
    assert w.grid.selected == [] and w.summary["lam"] == 1000.0
    with pytest.raises(Exception, match="lam_index must be in 0-1"):
        w.lam_index = 2
    assert base64.b64decode(w._repr_mimebundle_()[0]["image/png"]).startswith(PNG_MAGIC)


def test_dcm_cancel_keeps_finished_lambdas(planted):
    d = planted_desideratum(n=16)
    w = DCMWidget(planted, d, ["0.1", "1.0"], "END", lams=[0.01, 0.1, 1.0], batch_size=8)
    w.observe(lambda c: w.cancel() if c["new"] == 1 else None, names="n_done")
    w.train()
    w.wait(120)
    assert w.status == "cancelled" and w.n_done == 1 and w.summary["lam"] == 0.01


def test_dcm_cancel_before_the_first_lambda_leaves_an_empty_result_said_so(planted):
    d = planted_desideratum(n=24)
    w = DCMWidget(planted, d, None, "END", lams=[0.01], lr=0.2, batch_size=8)
    w.train()
    w.wait(120)
    assert w.status == "done" and w.n_done == 1 and w.circuit.heads
    # a second run, cancelled at its first progress report (before any lambda finished)
    w.observe(lambda c: w.cancel() if w.status == "running" else None, names="progress")
    w.train()
    w.wait(120)
    assert w.status == "cancelled" and w.error == ""
    assert w.n_done == 0 and w.results == [] and w.result is None and w.lam_index == 0
    assert np.isnan(w.grid.values).all() and "cancelled before the first λ" in w.grid.kind
    assert len(w.loss) == 0 and w.summary == {} and w.circuit.heads == frozenset()


def test_dcm_cancel_inside_a_lambda_shows_the_finished_ones_only(planted):
    d = planted_desideratum(n=16)
    w = DCMWidget(planted, d, None, "END", lams=[0.01, 0.1, 1.0], batch_size=8)
    # cancel while the second lambda trains (its progress reports come after the first landed)
    w.observe(lambda c: w.cancel() if w.n_done == 1 else None, names="progress")
    w.train()
    w.wait(120)
    assert w.status == "cancelled" and w.error == ""
    assert w.n_done == 1 and len(w.results) == 1 and w.results[0].complete
    assert w.lam_index == 0 and w.summary["lam"] == 0.01 and w.summary["complete"] is True
    mask = w.results[0].mask.numpy()
    np.testing.assert_array_equal(w.grid.values, (1 - mask).astype(np.float32))
    assert len(w.loss) == len(w.results[0].curve.loss) > 0


def test_dcm_validation(planted):
    d = planted_desideratum(n=8)
    with pytest.raises(ValueError, match="lams must be a non-empty list"):
        DCMWidget(planted, d, lams=[])
    with pytest.raises(
        ValueError, match=r"position 'S2' is not one of the desideratum's positions \['END'\]"
    ):
        DCMWidget(planted, d, position="S2")
    with pytest.raises(ValueError, match="head 5.0 is outside the model"):
        DCMWidget(planted, d, ["5.0"])
    with pytest.raises(TypeError, match="'lam'"):
        DCMWidget(planted, d, lam=0.1)


# ---------------------------------------------------------------------------- CMAP


@pytest.fixture(scope="module")
def pair():
    base = cw.tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    ft = cw.tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=5)
    return base, ft, cw.tasks.ioi(base, n=6, seed=0)


def test_cmap_widget_matches_cmap_and_cmap_grid(pair):
    from circuit_widgets.core.cross_model import cmap, cmap_grid

    base, ft, task = pair
    circuit = Circuit.from_groups(
        {"A": ["1.0", "1.1"], "B": ["0.2"]}, positions={"A": "END", "B": "S2"}
    )
    w = CMAPWidget(base, ft, task, circuit)
    assert [g["name"] for g in w.groups] == ["A", "B"] and w.enabled == ["A", "B"]
    assert w.grid.selected == [[0, 2], [1, 0], [1, 1]]
    w.run()
    w.wait(60)
    ref = cmap(base, ft, task, circuit=circuit)
    assert w.status == "done" and w.bar_labels == ["A", "B", "circuit"]
    for i, name in enumerate(ref.groups):
        g = ref.group(name)
        np.testing.assert_allclose(
            w.bars[i], [g["base_accuracy"], g["patched_accuracy"], g["finetuned_accuracy"]]
        )
    grid = cmap_grid(base, ft, task, position="END")
    np.testing.assert_allclose(w.grid.values, grid.values.numpy(), rtol=1e-5, atol=1e-7)
    assert w.grid.selected == [[0, 2], [1, 0], [1, 1]]  # the circuit stays outlined

    w.enabled = ["B"]
    assert w.circuit == Circuit.from_groups({"B": ["0.2"]}, positions={"B": "S2"})
    w.sweep_grid = False
    w.run()
    w.wait(60)
    assert w.bar_labels == ["B"]
    with pytest.raises(Exception, match=r"no group 'C'; the circuit has \['A', 'B'\]"):
        w.enabled = ["C"]
    w.enabled = []
    with pytest.raises(ValueError, match="no circuit group is enabled"):
        w.run()
    w._on_front_end_msg(w, {"type": "run"}, [])  # the Run button: the message shows in the widget
    assert w.status == "error" and "no circuit group is enabled" in w.error
    w.enabled = ["B"]  # ticking a group answers it
    assert w.status == "idle" and w.error == ""
    assert base64.b64decode(w._repr_mimebundle_()[0]["image/png"]).startswith(PNG_MAGIC)


def test_cmap_validation(pair, tiny_gpt2):
    base, ft, task = pair
    with pytest.raises(ValueError, match="head 3.0 of group 'heads' is outside the model"):
        CMAPWidget(base, ft, task, ["3.0"])
    with pytest.raises(ValueError, match="grid_position must be 'all' or one of"):
        CMAPWidget(base, ft, task, None, grid_position="nowhere")
    with pytest.raises(ValueError):
        CMAPWidget(base, tiny_gpt2, task)  # another architecture


# ---------------------------------------------------------------------------- explorer


def test_explorer_shares_one_circuit(pair):
    base, ft, task = pair
    from circuit_widgets.tasks import desiderata

    d = desiderata(base, 10, seed=0, n_boxes=3)["positional"]
    ex = CircuitExplorer(
        base, task, desideratum=d, dcm_position="query_label", finetuned=ft, circuit=["1.1"]
    )
    assert ex.tab_names == ["Path patching", "Attention", "DCM", "CMAP"]
    assert ex.path_patching.grid.selected == ex.dcm.grid.selected == [[1, 1]]
    ex.path_patching.grid.set_state({"selected": [[0, 3], [1, 2]]})  # a click on one tab
    want = Circuit.from_heads(["0.3", "1.2"])
    assert (
        ex.circuit == want and ex.dcm.grid.circuit == want and ex.cmap.circuit.heads == want.heads
    )
    ex.attention.wait(10)
    assert ex.attention.shown == [[0, 3], [1, 2]]
    ex.cmap.grid.set_state({"selected": [[0, 0]]})  # ... or on another
    assert ex.selected == [[0, 0]] and ex.path_patching.grid.selected == [[0, 0]]
    with pytest.raises(ValueError, match="outside the model"):
        ex.circuit = ["7.0"]
    assert CircuitExplorer(base, task).tab_names == ["Path patching", "Attention"]
    with pytest.raises(TypeError, match="'fine_tuned'"):
        CircuitExplorer(base, task, fine_tuned=ft)


# ---------------------------------------------------------------------------- conventions


@pytest.mark.parametrize(
    "module, cls",
    [
        ("attention", "AttentionWidget"),
        ("path_patching", "PathPatchingWidget"),
        ("dcm", "DCMWidget"),
        ("cmap", "CMAPWidget"),
        ("explorer", "CircuitExplorer"),
    ],
)
def test_traits_have_docstrings_and_bundles_exist(module, cls):

    from circuit_widgets.widgets._base import read_bundle

    mod = importlib.import_module(f"circuit_widgets.widgets.{module}")
    tree = ast.parse(inspect.getsource(mod))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    for i, node in enumerate(body):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and "tag" in ast.dump(node.value.func)
        ):
            nxt = body[i + 1] if i + 1 < len(body) else None
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                f"{cls}.{node.targets[0].id}"
            )
    assert "export" in read_bundle(module)


def test_two_widgets_never_run_one_model_at_once():
    from circuit_widgets.widgets._model_lock import using

    a, b = object(), object()
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def first():
        with using(a, b):
            order.append("first in")
            inside.set()
            release.wait(5)
            order.append("first out")

    def second():
        with using(b):  # shares model b: must wait for the first job's batch
            order.append("second in")

    t1 = threading.Thread(target=first)
    t1.start()
    inside.wait(5)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.2)
    assert t2.is_alive() and order == ["first in"]
    release.set()
    t1.join(5)
    t2.join(5)
    assert order == ["first in", "first out", "second in"]


# ---------------------------------------------------------------------------- audit fixes


def test_a_failing_observer_of_the_finished_grid_is_shown_as_an_error(tiny_gpt2, ioi_gpt2):
    w = PathPatchingWidget(tiny_gpt2, ioi_gpt2)

    def observer(change):  # a user's observer that fails only on the finished grid
        if w.grid.complete and w.status == "running":
            raise RuntimeError("user observer bug")

    w.grid.observe(observer, names="values")
    job = w.run()
    w.wait(60)
    assert job.done and w.status == "error" and w.error == "RuntimeError: user observer bug"
    assert w.cancel() is False
    w.grid.unobserve(observer, names="values")
    w.run()  # Run works again
    w.wait(60)
    assert w.status == "done"


def test_a_run_does_not_touch_the_selection(tiny_model_4layers):
    model, task = tiny_model_4layers
    w = PathPatchingWidget(model, task)
    w.grid.selected = [[2, 1]]
    w.attention.wait(10)
    changes, recomputes = [], []
    w.grid.observe(changes.append, names="selected")
    w.attention.observe(recomputes.append, names="status")
    w.run()
    w.wait(60)
    assert w.status == "done" and changes == [] and recomputes == []
    assert w.grid.selected == [[2, 1]] and w.attention.shown == [[2, 1]]


def test_path_patching_cancel_inside_a_chunk_shows_its_finished_cells(
    tiny_model_4layers, monkeypatch
):
    from circuit_widgets import core

    model, task = tiny_model_4layers
    w = PathPatchingWidget(model, task, preview=False, layers_per_step=2)
    real = core.path_patch

    def cancel_inside_the_second_chunk(*args, should_stop=None, senders=None, **kwargs):
        calls = []

        def stop():
            calls.append(1)
            if min(h.layer for h in senders) == 2 and len(calls) == 2:
                w.cancel()  # after its first batch (sender layer 2), before layer 3
            return should_stop()

        return real(*args, senders=senders, should_stop=stop, **kwargs)

    monkeypatch.setattr(core, "path_patch", cancel_inside_the_second_chunk)
    w.run()
    w.wait(60)
    ref = real(model, task, position="END")
    assert w.status == "cancelled" and not w.grid.complete
    np.testing.assert_allclose(w.grid.values[:3], ref.values[:3].numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(w.grid.values[3]).all()


def test_cmap_cancel_during_the_grid_shows_its_finished_cells(pair, monkeypatch):
    import circuit_widgets.core.cross_model as cmod

    base, ft, task = pair
    w = CMAPWidget(base, ft, task, ["1.1"])
    real = cmod.cmap_grid

    def slow_grid(*args, on_progress=None, **kwargs):
        def progress(done, total):
            on_progress(done, total)
            if done == 2:
                w.cancel()

        return real(*args, on_progress=progress, **{**kwargs, "batch_size": 6})

    monkeypatch.setattr(cmod, "cmap_grid", slow_grid)
    job = w.run()
    w.wait(60)
    finished = int(np.isfinite(job.partial["grid"].values.numpy()).sum())
    assert w.status == "cancelled" and 0 < finished < 8
    assert int(np.isfinite(w.grid.values).sum()) == finished  # on screen, not only in job.partial
    assert w.bar_labels == ["heads"] and w.grid.selected == [[1, 1]]


def test_closing_a_composite_closes_its_children(pair, tiny_model_4layers):
    model, task = tiny_model_4layers
    w = PathPatchingWidget(model, task, preview=False)
    w.run()
    w.close()  # mid-run
    assert w.comm is None and w.grid.comm is None and w.attention.comm is None
    w._job.wait(30)
    assert w._job.done and w.status == "cancelled"
    base, ft, ptask = pair
    from circuit_widgets.tasks import desiderata

    d = desiderata(base, 10, seed=0, n_boxes=3)["positional"]
    ex = CircuitExplorer(base, ptask, desideratum=d, dcm_position="query_label", finetuned=ft)
    children = [
        ex.path_patching,
        ex.path_patching.grid,
        ex.path_patching.attention,
        ex.attention,
        ex.dcm,
        ex.dcm.grid,
        ex.cmap,
        ex.cmap.grid,
    ]
    assert all(c.comm is not None for c in children)
    ex.close()
    assert ex.comm is None and all(c.comm is None for c in children)


def test_explorer_keeps_groups_positions_and_toggles(pair):
    base, ft, task = pair
    ex = CircuitExplorer(base, task, finetuned=ft)
    grouped = Circuit.from_groups({"A": ["1.1"], "B": ["0.2"]}, positions={"A": "END"})
    ex.circuit = grouped
    assert ex.circuit == grouped and ex.selected == [[0, 2], [1, 1]]
    assert [g["name"] for g in ex.cmap.groups] == ["A", "B"] and ex.groups[0]["position"] == "END"
    assert ex.path_patching.grid.groups == ex.groups
    ex.cmap.enabled = ["B"]
    ex.path_patching.run()  # partial results must not reset the circuit
    ex.path_patching.wait(60)
    assert (
        ex.circuit == grouped and ex.cmap.enabled == ["B"] and ex.cmap.circuit.heads == {Head(0, 2)}
    )
    ex.path_patching.grid.set_state({"selected": [[0, 2], [1, 1], [1, 3]]})  # shift-click adds 1.3
    want = Circuit.from_groups(
        {"A": ["1.1"], "B": ["0.2"], "heads": ["1.3"]}, positions={"A": "END"}
    )
    assert ex.circuit == want and ex.cmap._circuit == want
    assert ex.cmap.enabled == ["B", "heads"]  # A stays off, the new group is on
    ex.path_patching.grid.set_state(
        {"selected": [[0, 2], [1, 3]]}
    )  # shift-click removes 1.1: A goes
    assert ex.circuit == Circuit.from_groups({"B": ["0.2"], "heads": ["1.3"]})
    assert ex.cmap.enabled == ["B", "heads"]
    # a grouped circuit set on the CMAP tab becomes the shared one
    ex.cmap.circuit = Circuit.from_groups({"X": ["1.0"]}, positions={"X": "S2"})
    assert ex.circuit == Circuit.from_groups({"X": ["1.0"]}, positions={"X": "S2"})
    assert ex.path_patching.grid.selected == [[1, 0]] and ex.groups[0]["name"] == "X"


def test_explorer_sync_is_safe_across_threads(pair):
    base, ft, task = pair
    ex = CircuitExplorer(base, task, finetuned=ft)
    inside, gate = threading.Event(), threading.Event()

    def slow_observer(change):  # the CMAP grid is updated last: hold the first sync there
        if change["new"] == [[0, 0]]:
            inside.set()
            gate.wait(5)

    ex.cmap.grid.observe(slow_observer, names="selected")
    first = threading.Thread(target=lambda: setattr(ex, "circuit", ["0.0"]))
    first.start()
    inside.wait(5)
    # meanwhile a click arrives on another thread: it must not be lost as the first sync's "echo"
    second = threading.Thread(
        target=lambda: ex.path_patching.grid.set_state({"selected": [[1, 2]]})
    )
    second.start()
    second.join(0.2)
    gate.set()
    first.join(5)
    second.join(5)
    assert ex.selected == [[1, 2]]
    assert ex.path_patching.grid.selected == ex.cmap.grid.selected == [[1, 2]]
    assert ex.circuit == Circuit.from_heads(["1.2"])


def test_widgets_on_a_busy_model_do_not_block_the_main_thread(tiny_gpt2, ioi_gpt2):
    from circuit_widgets.widgets._model_lock import using

    hold, release, gave_up = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with using(tiny_gpt2):
            hold.set()
            if not release.wait(30):
                gave_up.set()  # nobody released it: construction waited for the model

    threading.Thread(target=holder).start()
    hold.wait(5)
    try:
        att = AttentionWidget(tiny_gpt2, ioi_gpt2, ["1.1"])
        pp = PathPatchingWidget(tiny_gpt2, ioi_gpt2)
        ex = CircuitExplorer(tiny_gpt2, ioi_gpt2, circuit=["1.1"])
        assert not gave_up.is_set(), "constructing waited for the model another widget held"
        assert att.status == "running" and att.shown == [] and att.tokens  # "loading", tokens shown
    finally:
        release.set()
    att.wait(10)
    ex.attention.wait(10)
    assert att.shown == [[1, 1]] and att.patterns.shape[0] == 1 and ex.attention.shown == [[1, 1]]
    pp.close()


def _gets_the_model_mid_run(widget, model, start) -> float:
    """While ``widget`` runs, take ``model`` from another thread; returns the run's progress then
    (1.0: only after the whole run). The run is held at its first progress report until this
    thread is queued for the model, so the answer does not depend on how fast either thread is."""
    import time

    from circuit_widgets.widgets._model_lock import _MODEL_LOCKS, using

    running = threading.Event()

    def hold_at_first_report(change):  # on the worker thread, which holds the model
        if change["new"] > 0 and not running.is_set():
            running.set()
            lock = _MODEL_LOCKS[id(model)]
            deadline = time.monotonic() + 30
            while not lock.waiting and time.monotonic() < deadline:
                time.sleep(0.001)  # until the main thread waits for the model (no timing read)

    widget.observe(hold_at_first_report, names="progress")
    job = start()
    assert running.wait(30) or job.done
    with using(model):
        progress = widget.progress
    widget.unobserve(hold_at_first_report, names="progress")
    widget.cancel()
    widget.wait(60)
    return progress


def test_dcm_and_cmap_take_the_model_per_batch(planted, pair, monkeypatch):
    d = planted_desideratum(n=24)
    w = DCMWidget(planted, d, None, "END", lams=[0.01, 0.1, 1.0, 10.0], epochs=3, batch_size=4)
    assert _gets_the_model_mid_run(w, planted, w.train) < 0.5

    import circuit_widgets.core.cross_model as cmod

    base, ft, task = pair
    real = cmod.cmap_grid

    def small_batches(*args, **kwargs):  # several batches, so there is a "between two batches"
        return real(*args, **{**kwargs, "batch_size": 6})

    monkeypatch.setattr(cmod, "cmap_grid", small_batches)
    c = CMAPWidget(base, ft, task, ["1.1"])
    assert _gets_the_model_mid_run(c, ft, c.run) < 0.9


def test_path_patching_preview_is_the_path_attribution_of_the_run(tiny_llama, ioi_llama):
    w = PathPatchingWidget(tiny_llama, ioi_llama, position="END")
    first = []
    w.grid.observe(
        lambda c: first.append(w.grid.values.copy()) if not first else None, names="values"
    )
    w.run()
    w.wait(60)
    est = path_attribution(tiny_llama, ioi_llama, position="END", freeze_mlps=False)
    np.testing.assert_allclose(first[0], est.values.numpy(), rtol=1e-5, atol=1e-7)
    total = attribution_patch(tiny_llama, ioi_llama, "z", positions="END")
    assert not np.allclose(
        first[0], total.values.numpy(), atol=1e-6
    )  # not the total-effect estimate
    assert w.message == ""


def test_receiver_heads_get_no_preview_and_the_status_line_says_so(tiny_llama, ioi_llama):
    w = PathPatchingWidget(tiny_llama, ioi_llama, preview=True)
    w.grid.selected = [[1, 3]]
    w.receivers = "selected"
    phases = []
    w.observe(lambda c: phases.append(c["new"]), names="phase")
    pending = []
    w.grid.observe(
        lambda c: pending.append(None if w.grid.pending is None else float(w.grid.pending.sum())),
        names="values",
    )
    w.run()
    assert w.message == "no preview for receiver heads: exact values only"
    w.wait(60)
    assert w.status == "done" and "preview" not in phases
    assert all(p in (None, 0.0) for p in pending)
    ref = path_patch(tiny_llama, ioi_llama, receivers=[Receiver(1, 3, "q")], position="END")
    np.testing.assert_allclose(w.grid.values, ref.values.numpy(), rtol=1e-5, atol=1e-7)
    assert w.message == "no preview for receiver heads: exact values only"
    w.receivers = "logits"
    w.run()
    assert w.message == ""
    w.wait(60)


def test_grids_of_grouped_query_models_know_the_kv_groups(tiny_llama, ioi_llama):
    w = PathPatchingWidget(tiny_llama, ioi_llama, preview=False)
    assert w.grid.kv_groups == [[0, 1], [2, 3]] and not w.grid.kv_columns
    w.run()
    w.wait(60)
    assert w.grid.kv_groups == [[0, 1], [2, 3]]


def test_circuitsvis_renderer_is_read_once(tiny_gpt2, ioi_gpt2, monkeypatch):
    from pathlib import Path

    reads = []
    real = Path.read_bytes

    def counting(self):
        if self.name == "iife.js":
            reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    circuitsvis_source.cache_clear()
    AttentionWidget(tiny_gpt2, ioi_gpt2)
    AttentionWidget(tiny_gpt2, ioi_gpt2)
    assert len(reads) == 1


def test_dcm_and_cmap_traits_are_validated_when_set(planted, pair):
    import traitlets

    d = planted_desideratum(n=8)
    w = DCMWidget(planted, d, lams=[0.1])
    with pytest.raises(
        traitlets.TraitError,
        match=r"position 'S2' is not one of the desideratum's positions \['END'\]",
    ):
        w.position = "S2"
    for bad in ([], [-1.0], [float("nan")], [float("inf")]):
        with pytest.raises(
            traitlets.TraitError, match="lams must be a non-empty list of finite numbers >= 0"
        ):
            w.lams = bad
    w.lams = [0, 1]
    assert w.lams == [0.0, 1.0] and w.position == "END"
    base, ft, task = pair
    c = CMAPWidget(base, ft, task, None)
    with pytest.raises(traitlets.TraitError, match="grid_position must be 'all' or one of"):
        c.grid_position = "nowhere"
    c.grid_position = "S2"
    c.grid_position = "all"
    assert c.grid_position == "all"
