"""HeadGridWidget and BaseWidget without a browser: traits, serialisation, selection, images, jobs."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from ipywidgets.widgets.widget import _put_buffers, _remove_buffers

from circuit_widgets.types import Circuit, Head
from circuit_widgets.widgets import BaseWidget, BundleMissingError, HeadGridWidget, JobCancelled
from circuit_widgets.widgets._base import read_bundle
from circuit_widgets.widgets._traits import array_from_json, array_to_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class FakeHeadGrid:
    """The fields of the engine's HeadGrid that the widget reads."""

    values: torch.Tensor
    heads: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    kind: str = "activation patching"
    component: str = "z"
    metric_name: str = "logit diff"
    complete: bool = True


def grid(n_layers=4, n_heads=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_layers, n_heads, generator=g)


def wire_roundtrip(widget, name):
    """What the browser receives for trait `name`, decoded back as the kernel would."""
    state = widget.get_state(name)
    stripped, paths, buffers = _remove_buffers(state)
    assert buffers, "the array must travel as a binary buffer, not as JSON"
    assert all(isinstance(b, memoryview) for b in buffers)
    _put_buffers(stripped, paths, [bytes(b) for b in buffers])  # as they arrive on the other side
    return stripped[name]


# ---------------------------------------------------------------------------- traits, codec


def test_values_travel_as_float32_buffer_and_round_trip():
    values = grid(5, 4).double()
    values[2, 1] = float("nan")
    w = HeadGridWidget(values)
    msg = wire_roundtrip(w, "values")
    assert msg["dtype"] == "float32" and msg["shape"] == [5, 4]
    assert len(msg["view"]) == 5 * 4 * 4
    back = array_from_json(msg)
    np.testing.assert_array_equal(back, values.float().numpy())  # NaN == NaN here
    assert back.dtype == np.float32


def test_codec_handles_empty_and_none():
    assert array_to_json(None) is None and array_from_json(None) is None
    empty = np.zeros((0, 3), np.float32)
    assert array_from_json(array_to_json(empty)).shape == (0, 3)


def test_accepts_headgrid_like_tensor_and_array():
    values = grid(3, 2)
    result = FakeHeadGrid(values, heads=["H0", "H1"], layers=[10, 11, 12], complete=False)
    w = HeadGridWidget(result, title="IOI name movers")
    assert w.heads == ["H0", "H1"] and w.layers == ["10", "11", "12"]
    assert (w.kind, w.component, w.metric_name, w.complete) == (
        "activation patching",
        "z",
        "logit diff",
        False,
    )
    assert w.title == "IOI name movers"
    np.testing.assert_array_equal(w.values, values.numpy())

    from_np = HeadGridWidget(values.numpy())
    assert from_np.heads == ["0", "1"] and from_np.layers == ["0", "1", "2"] and from_np.complete
    with_nan = values.clone()
    with_nan[0, 0] = float("nan")
    assert HeadGridWidget(with_nan).complete is False


def test_engine_headgrid():
    from circuit_widgets.core import results

    values = grid(3, 2)
    values[2, 1] = float("nan")
    fields = {
        "values": values,
        "normalized": values / 2,
        "per_example": values[None],
        "metric_clean": torch.zeros(1),
        "metric_corrupt": torch.ones(1),
        "done": ~values.isnan(),
        "complete": False,
        "layers": [0, 1, 2],
        "heads": ["0", "1"],
        "positions": None,
        "component": "z",
        "direction": "denoise",
        "kind": "activation",
        "metric_name": "logit_diff",
    }
    w = HeadGridWidget(results.HeadGrid(**fields), selection=["2.0"])
    assert w.values.shape == (3, 2) and not w.complete
    assert (w.kind, w.component, w.metric_name) == ("activation", "z", "logit_diff")
    np.testing.assert_array_equal(w.normalized, (values / 2).numpy())
    assert w.circuit == Circuit.from_heads(["2.0"])


def test_results_and_widget_grids_are_grid_like():
    """HeadGrid and the grids widgets build satisfy GridLike; a partial look-alike is read
    through the fields it has, a bare tensor as values alone."""
    from circuit_widgets.core import results
    from circuit_widgets.widgets.dcm import _mask_grid
    from circuit_widgets.widgets.path_patching import _empty_state

    values = grid(3, 2)
    hg = results.HeadGrid(
        values=values,
        normalized=values / 2,
        per_example=values[None],
        metric_clean=torch.zeros(1),
        metric_corrupt=torch.ones(1),
        done=torch.ones(3, 2, dtype=torch.bool),
        complete=True,
        layers=[0, 1, 2],
        heads=["0", "1"],
        positions=None,
        component="z",
        direction="noise",
        kind="activation",
        metric_name="logit_diff",
        position="END",
    )
    mask = _mask_grid(np.full((3, 2), 0.5, np.float32), "1 - mask", True, "DCM", "END")
    for g in (hg, mask, _empty_state(3, 2, "logit_diff")):
        assert isinstance(g, results.GridLike)
    assert not isinstance(FakeHeadGrid(values), results.GridLike)
    assert not isinstance(values, results.GridLike)

    w = HeadGridWidget(hg)
    assert (w.position, w.scale, w.n_cells, w.pending) == ("END", "diverging", 0, None)
    w.set_result(mask)
    assert (w.scale, w.kind, w.component, w.position) == ("sequential", "DCM", "z", "END")
    w.set_result(FakeHeadGrid(values, layers=[0, 1, 2], complete=False, metric_name="prob"))
    assert (w.complete, w.metric_name, w.component, w.position) == (False, "prob", "z", "")
    w.set_result(values)
    assert (w.kind, w.component, w.metric_name, w.complete) == ("", "", "", True)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[n_layers, n_heads\].*\(2, 3, 4, 5\)"):
        HeadGridWidget(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="head labels: expected 3, got 2"):
        HeadGridWidget(FakeHeadGrid(grid(2, 3), heads=["a", "b"]))
    with pytest.raises(ValueError, match="outside the grid"):
        HeadGridWidget(grid(2, 3), selection=[(5, 0)])
    with pytest.raises(ValueError, match=r"per position.*values\[:, p\]"):
        HeadGridWidget(torch.zeros(2, 5, 3))


def test_unknown_kwarg_is_a_type_error_listing_valid_ones():
    with pytest.raises(TypeError) as err:
        HeadGridWidget(grid(), titel="x", colour="red")
    text = str(err.value)
    assert "'titel' (did you mean 'title'?)" in text and "'colour'" in text
    assert "valid keyword arguments are: layout, result, selection, threshold, title, top_k" in text
    # traits the user may not set through the constructor are refused too
    with pytest.raises(TypeError, match="'status'"):
        HeadGridWidget(grid(), status="done")
    w = HeadGridWidget(grid(), threshold=0.5, top_k=3)
    assert (w.threshold, w.top_k) == (0.5, 3)


def test_traits_have_docstrings():
    import ast
    import inspect

    import circuit_widgets.widgets._base as base
    import circuit_widgets.widgets.head_grid as hg

    for module, cls in ((hg, "HeadGridWidget"), (base, "BaseWidget")):
        tree = ast.parse(inspect.getsource(module))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
        for i, node in enumerate(body):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and "tag" in ast.dump(node.value.func)
            ):
                nxt = body[i + 1] if i + 1 < len(body) else None
                name = node.targets[0].id
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                    f"{cls}.{name}"
                )


# ---------------------------------------------------------------------------- selection


def test_selection_is_a_circuit_both_ways():
    w = HeadGridWidget(grid(4, 3), selection=Circuit.from_heads(["2.1", Head(0, 2)]))
    assert w.selected == [[0, 2], [2, 1]]
    assert w.circuit == Circuit.from_heads([Head(0, 2), Head(2, 1)])
    w.selected = [[3, 0], [1, 1], [3, 0]]
    assert w.selected == [[1, 1], [3, 0]]  # sorted, unique
    w.circuit = ["0.0"]
    assert w.selected == [[0, 0]]
    with pytest.raises(ValueError, match="outside the grid"):
        w.selected = [[4, 0]]


def test_selection_from_the_front_end_reaches_observers():
    w = HeadGridWidget(grid(4, 3))
    seen: list[Circuit] = []
    w.on_select(seen.append)
    changes = []
    w.observe(changes.append, names="selected")
    w.set_state({"selected": [[1, 2], [0, 1]]})  # what a comm message from the view does
    assert seen == [Circuit.from_heads(["0.1", "1.2"])]
    assert changes[-1]["new"] == [[0, 1], [1, 2]]


def test_rows_may_be_a_subset_of_layers():
    w = HeadGridWidget(FakeHeadGrid(grid(3, 2), layers=[0, 5, 9]), selection=["5.1"])
    assert w.layer_numbers == [0, 5, 9] and w.layers == ["0", "5", "9"]
    assert w.circuit == Circuit.from_heads(["5.1"])
    with pytest.raises(ValueError, match=r"layers 0, 5, 9, heads 0-1"):
        w.selected = [[1, 0]]
    assert w.to_image().startswith(PNG_MAGIC)


def test_kv_head_columns_select_their_query_heads():
    result = FakeHeadGrid(grid(2, 2), heads=["kv0", "kv1"], component="k")
    result.kv_groups = [[0, 1, 2], [3, 4, 5]]
    w = HeadGridWidget(result, selection=[(1, 1)])
    assert w.selected == [[1, 1]]
    assert w.circuit == Circuit.from_heads(["1.3", "1.4", "1.5"])


def test_set_result_updates_and_prunes_selection():
    w = HeadGridWidget(grid(4, 3), selection=["3.2", "0.0"])
    w.set_result(FakeHeadGrid(grid(2, 2, seed=1), metric_name="prob"))
    assert w.values.shape == (2, 2) and w.metric_name == "prob"
    assert w.selected == [[0, 0]]


def test_partial_results_of_a_background_sweep_are_shown_and_kept():
    full = grid(3, 2)
    gate = threading.Event()

    def sweep(job):
        values = torch.full_like(full, float("nan"))
        for layer in range(3):
            if layer == 2:
                gate.wait(5)
            job.check()  # cancelled while waiting: stops before computing layer 2
            values[layer] = full[layer]
            job.report(
                progress=(layer + 1) / 3,
                partial=FakeHeadGrid(values.clone(), complete=False, metric_name="logit diff"),
            )
        return FakeHeadGrid(values, complete=True)

    w = HeadGridWidget(torch.full((3, 2), float("nan")), selection=["0.1"])
    job = w._submit(sweep)
    wait_for(lambda: w.progress >= 2 / 3)
    w.cancel()
    gate.set()
    job.wait(5)
    assert w.status == "cancelled" and not w.complete and w.metric_name == "logit diff"
    np.testing.assert_array_equal(w.values[:2], full[:2].numpy())
    assert np.isnan(w.values[2]).all() and w.selected == [[0, 1]]
    w._submit(sweep)
    w.wait(5)
    assert w.status == "done" and w.complete
    np.testing.assert_array_equal(w.values, full.numpy())


# ---------------------------------------------------------------------------- static image


def test_static_png_and_mimebundle():
    values = grid(30, 9)
    values[5, :3] = float("nan")
    w = HeadGridWidget(FakeHeadGrid(values), title="<b>not html</b>", selection=["1.1"])
    png = w.to_image()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    svg = w.to_image("svg")
    assert b"<svg" in svg[:500] and b"&lt;b&gt;not html&lt;/b&gt;" in svg
    data, _ = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    assert base64.b64decode(data["image/png"]).startswith(PNG_MAGIC)
    assert data["text/plain"].startswith("HeadGridWidget(30 layers x 9 heads, 267 computed")


def test_plot_head_grid_function():
    from matplotlib.figure import Figure

    from circuit_widgets.plots import figure_bytes, plot_head_grid

    fig = plot_head_grid(grid(3, 4), selected=[Head(1, 1)], title="t", metric_name="m")
    assert isinstance(fig, Figure)
    assert figure_bytes(fig).startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="shape"):
        plot_head_grid(np.zeros(3))


# ---------------------------------------------------------------------------- bundle


def test_esm_is_the_built_bundle():
    w = HeadGridWidget(grid())
    assert w._esm == read_bundle("head_grid")
    assert "export" in w._esm and "cw-hg" in w._esm


def test_missing_bundle_error_says_how_to_build():
    with pytest.raises(
        BundleMissingError, match=r"bash scripts/dev setup.*npm ci && npm run build"
    ):
        read_bundle("no_such_widget")


# ---------------------------------------------------------------------------- background jobs


class JobWidget(BaseWidget):
    _esm = "export default { render() {} };"

    def __init__(self, **kwargs):
        self.partials: list = []
        self.results: list = []
        super().__init__(**kwargs)

    def _on_partial(self, partial):
        self.partials.append(list(partial))

    def _on_result(self, result):
        self.results.append(result)


def squares(
    job,
    n,
    delay=0.0,
    gate: threading.Event | None = None,
    threads: list | None = None,
    at_gate: threading.Event | None = None,
):
    """A long job: one 'batch' per number, checking the cancel flag between batches; with a
    ``gate`` it waits before its fourth batch (past the cancel check), setting ``at_gate``."""
    if threads is not None:
        threads.append(threading.get_ident())
    out = []
    for i in range(n):
        job.check()
        if gate is not None and i == 3:
            if at_gate is not None:
                at_gate.set()
            gate.wait(5)
        out.append(i * i)
        job.report(progress=(i + 1) / n, partial=out)
        time.sleep(delay)
    return out


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_job_runs_off_the_main_thread_and_reports_progress():
    w = JobWidget()
    assert (w.status, w.progress, w.error) == ("idle", 0.0, "")
    progress: list[float] = []
    w.observe(lambda c: progress.append(c["new"]), names="progress")
    threads: list[int] = []
    job = w._submit(squares, 5, threads=threads)
    assert w.wait(5) == [0, 1, 4, 9, 16]
    assert threads and threads[0] != threading.get_ident()
    assert w.status == "done" and w.progress == 1.0 and w.results == [[0, 1, 4, 9, 16]]
    assert progress[-1] == 1.0 and progress == sorted(progress)
    assert job.result == [0, 1, 4, 9, 16]


def test_cancel_stops_the_job_and_keeps_partial_results():
    w = JobWidget()
    gate, at_gate = threading.Event(), threading.Event()
    job = w._submit(squares, 100, gate=gate, at_gate=at_gate)
    assert at_gate.wait(5)  # 3 batches done, the 4th past its cancel check, blocked on the gate
    assert w.status == "running"
    assert w.cancel() is True
    gate.set()
    assert job.wait(5) == [0, 1, 4, 9]  # the batch in flight finishes, then it stops
    assert w.status == "cancelled" and job.cancelled
    assert job.partial == [0, 1, 4, 9] and w.results == []
    assert 0 < w.progress < 1
    assert w.cancel() is False  # nothing running any more


def test_exceptions_land_in_error():
    def boom(job):
        job.report(progress=0.5, partial=[1])
        raise ValueError("metric is NaN for every example")

    w = JobWidget()
    job = w._submit(boom)
    w.wait(5)
    assert w.status == "error"
    assert w.error == "ValueError: metric is NaN for every example"
    assert isinstance(job.exception, ValueError) and "boom" in job.traceback
    assert job.partial == [1]
    # the next job clears the error
    w._submit(squares, 2)
    w.wait(5)
    assert (w.status, w.error) == ("done", "")


def test_a_new_job_supersedes_the_running_one():
    w = JobWidget()
    gate = threading.Event()
    first = w._submit(squares, 100, gate=gate)
    wait_for(lambda: len(w.partials) >= 3)
    second = w._submit(squares, 3)
    assert first.cancelled
    gate.set()
    assert second.wait(5) == [0, 1, 4]
    assert first.done and first.result is None
    assert w.status == "done" and w.results == [[0, 1, 4]]


def test_job_cancelled_exception_and_close():
    def stop_early(job):
        raise JobCancelled()

    w = JobWidget()
    w._submit(stop_early)
    w.wait(5)
    assert w.status == "cancelled"
    w.close()  # shuts the worker down; closing twice is harmless
    w.close()


# ---------------------------------------------------------------------------- audit fixes


def test_a_failure_while_showing_the_result_lands_in_error():
    class Fragile(JobWidget):
        def _on_result(self, result):
            raise RuntimeError("an observer of the finished grid failed")

    w = Fragile()
    job = w._submit(squares, 3)
    w.wait(5)
    assert job.done and w.status == "error"  # not stuck at "running"
    assert w.error == "RuntimeError: an observer of the finished grid failed"
    assert isinstance(job.exception, RuntimeError) and w.cancel() is False


def test_a_cancelled_job_shows_the_partial_result_it_returns():
    def stops_mid_batch(job):
        job.report(partial=[0])
        job.cancel()  # as if Cancel came while the next batch ran: it returns what it finished
        return [0, 1]

    w = JobWidget()
    job = w._submit(stops_mid_batch)
    w.wait(5)
    assert w.status == "cancelled" and job.partial == [0, 1]
    assert w.partials == [[0], [0, 1]] and w.results == []
    # a partial already on screen is not shown twice
    w2 = JobWidget()
    gate, at_gate = threading.Event(), threading.Event()
    w2._submit(squares, 100, gate=gate, at_gate=at_gate)
    assert at_gate.wait(5)
    w2.cancel()
    gate.set()
    w2.wait(5)
    assert w2.partials[-1] == [0, 1, 4, 9] and len(w2.partials) == 4


def test_set_result_leaves_an_unchanged_selection_alone():
    w = HeadGridWidget(grid(3, 2), selection=["2.1"])
    changes = []
    w.observe(changes.append, names="selected")
    w.set_result(grid(3, 2, seed=1))
    assert changes == [] and w.selected == [[2, 1]]  # no blank-then-restore flap
    w.set_result(grid(2, 2, seed=2))  # row 2 is gone: one change, straight to the pruned list
    assert [c["new"] for c in changes] == [[]]


def test_a_click_during_set_result_is_kept():
    w = HeadGridWidget(torch.randn(3, 2), selection=["2.1"])
    fired = []

    def click_arrives(change):  # the main thread applying a click while a worker shows a partial
        if not fired:
            fired.append(1)
            w.set_state({"selected": [[0, 0]]})

    w.observe(click_arrives, names="values")
    w.set_result(torch.randn(3, 2))
    assert w.selected == [[0, 0]]


def test_an_old_jobs_report_cannot_land_on_a_new_run():
    applying, release = threading.Event(), threading.Event()
    events: list[str] = []

    class Slow(JobWidget):
        def _on_partial(self, partial):
            if partial == ["old"]:
                applying.set()
                release.wait(5)  # the old partial is being applied when a new Run comes
                events.append("old partial applied")
            super()._on_partial(partial)

    submitted = threading.Event()

    def old(job):
        job.report(progress=0.9, partial=["old"])
        submitted.wait(5)  # still running when the new Run comes: its result must not land either
        return ["old"]

    hold = threading.Event()

    def new(job):
        hold.wait(5)
        return ["new"]

    w = Slow()
    w._submit(old)
    applying.wait(5)
    submitter = threading.Thread(
        target=lambda: (w._submit(new), events.append("new run submitted"), submitted.set())
    )
    submitter.start()
    submitter.join(0.3)
    release.set()
    submitter.join(5)
    # the swap waited for the old update: it never lands on the new run's traits
    assert events == ["old partial applied", "new run submitted"]
    assert w.status == "running" and w.progress == 0.0
    hold.set()
    w.wait(5)
    assert w.status == "done" and w.results == [["new"]]


def test_kv_groups_travel_to_the_view():
    result = FakeHeadGrid(grid(2, 2), heads=["kv0", "kv1"], component="k")
    result.kv_groups = [[0, 1, 2], [3, 4, 5]]
    w = HeadGridWidget(result)
    assert w.kv_groups == [[0, 1, 2], [3, 4, 5]] and w.kv_columns
    q = HeadGridWidget(grid(2, 6))
    assert q.kv_groups == [] and not q.kv_columns
    q._use_model_groups(6, 2)  # query heads of a grouped-query model: which kv head each shares
    assert q.kv_groups == [[0, 1, 2], [3, 4, 5]] and not q.kv_columns
    q.set_result(grid(2, 6, seed=3))
    assert q.kv_groups == [[0, 1, 2], [3, 4, 5]]  # kept: the model did not change
    q.set_result(result)
    assert q.kv_columns and q.kv_groups == [[0, 1, 2], [3, 4, 5]]
    assert q.get_state("kv_groups")["kv_groups"] == [[0, 1, 2], [3, 4, 5]]


def test_a_grouped_circuit_names_its_groups_on_the_grid():
    w = HeadGridWidget(grid(4, 3))
    c = Circuit.from_groups(
        {"movers": ["3.1", "2.0"], "inhibit": ["1.2"]}, positions={"movers": "END"}
    )
    w.circuit = c
    assert w.selected == [[1, 2], [2, 0], [3, 1]]
    assert w.groups == [
        {"name": "movers", "position": "END", "heads": [[2, 0], [3, 1]]},
        {"name": "inhibit", "position": "all", "heads": [[1, 2]]},
    ]
    assert w.circuit == c
    w.set_state({"selected": [[2, 0], [1, 2], [0, 0]]})  # shift-clicks: 3.1 off, 0.0 on
    assert w.groups == [
        {"name": "movers", "position": "END", "heads": [[2, 0]]},
        {"name": "inhibit", "position": "all", "heads": [[1, 2]]},
    ]
    assert w.circuit == Circuit.from_groups(
        {"movers": ["2.0"], "inhibit": ["1.2"], "heads": ["0.0"]}, positions={"movers": "END"}
    )
    w.circuit = ["1.1"]  # plain heads: no group names
    assert w.groups == [] and w.circuit == Circuit.from_heads(["1.1"])


def test_a_long_holder_hands_the_model_over_between_batches():
    from circuit_widgets.widgets._model_lock import using

    model = object()
    order: list[str] = []
    started, other_in = threading.Event(), threading.Event()

    def long_job():
        with using(model) as hold:
            started.set()
            for i in range(50):
                order.append(f"batch {i}")
                time.sleep(0.01)
                hold.handover()  # between two batches
                if other_in.is_set():
                    order.append("after the other")
                    return

    t = threading.Thread(target=long_job)
    t.start()
    started.wait(5)
    with using(model):  # waits one batch, not the whole job
        order.append("other")
        other_in.set()
    t.join(5)
    assert "other" in order and order.index("other") < 10
    assert order[-1] == "after the other"
    # nested holds by one thread still hand over entirely
    with using(model), using(model) as hold:
        hold.handover()
