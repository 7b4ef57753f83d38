"""One job loop, several engines: backend_for picks the fast engine, bridge hooks or nnsight,
each satisfies the Backend protocol, and a sweep gives the same grid through every one."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets import tiny_model
from circuit_widgets.core import (
    attribution,
    backends,
    cache,
    cross_model,
    patching,
    path_patching,
)
from circuit_widgets.core.backends import (
    Backend,
    FastBackend,
    HookBackend,
    NNsightBackend,
    backend_for,
)
from circuit_widgets.core.common import ChunkWork, run_sweep
from circuit_widgets.types import Receiver

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROTOCOL = (
    "note",
    "chunk_rows",
    "activation_work",
    "path_work",
    "attribution_work",
    "cmap_work",
    "row_budget",
    "cmap_groups_work",
)


@pytest.fixture(scope="module")
def llama(one_thread):
    return tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)


@pytest.fixture(scope="module")
def task(llama):
    return cw.tasks.ioi(llama, 4)


@pytest.fixture(scope="module")
def nnsight_llama(llama):
    return cw.load_model(llama, backend="nnsight", remote=False)


def test_backend_for_picks_fast_hooks_and_nnsight(llama, nnsight_llama):
    fast = backend_for(llama)
    assert isinstance(fast, FastBackend) and fast.name == "fast"
    assert fast.eng is cache.engine_for(llama)
    with cache.force_hooked():
        hooked = backend_for(llama)
    assert isinstance(hooked, HookBackend) and hooked.name == "hooks"
    assert "force_hooked" in str(hooked.note("activation_patch"))
    nn = backend_for(nnsight_llama)
    assert isinstance(nn, NNsightBackend) and nn.name == "nnsight"


def test_a_hook_left_on_the_model_picks_bridge_hooks(llama):
    llama.add_hook("blocks.0.hook_resid_pre", lambda act, hook: act)
    try:
        assert isinstance(backend_for(llama), HookBackend)
    finally:
        llama.reset_hooks()
    assert isinstance(backend_for(llama), FastBackend)


def test_every_backend_satisfies_the_protocol(llama, nnsight_llama):
    with cache.force_hooked():
        hooked = backend_for(llama)
    for b in (backend_for(llama), hooked, backend_for(nnsight_llama)):
        assert isinstance(b, Backend)
        assert isinstance(b.name, str)
        for member in PROTOCOL:
            mine = inspect.signature(getattr(type(b), member))
            spec = inspect.signature(getattr(Backend, member))
            assert list(mine.parameters) == list(spec.parameters), (type(b).__name__, member)
    assert not isinstance(object(), Backend)


def _three_ways(model, nm, task, fn, **kwargs):
    fast = fn(model, task, **kwargs)
    with cache.force_hooked():
        hooked = fn(model, task, **kwargs)
    return fast, hooked, fn(nm, task, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"component": "z", "positions": "END"},
        {"component": "v", "positions": ["S2", "END"], "direction": "denoise"},
    ],
)
def test_activation_patch_is_the_same_through_every_backend(llama, nnsight_llama, task, kwargs):
    fast, hooked, nn = _three_ways(llama, nnsight_llama, task, cw.activation_patch, **kwargs)
    assert not any("generic path" in n or "nnsight" in n for n in fast.notes)
    assert any(n.startswith("generic path, one bridge forward per cell") for n in hooked.notes)
    assert nn.notes[0].startswith("nnsight (in-process): 1 request(s)")
    for other in (hooked, nn):
        assert other.complete and other.done.all() and other.shape == fast.shape
        torch.testing.assert_close(other.per_example, fast.per_example, atol=1e-4, rtol=0)
        torch.testing.assert_close(other.metric_clean, fast.metric_clean, atol=1e-4, rtol=0)
        torch.testing.assert_close(other.metric_corrupt, fast.metric_corrupt, atol=1e-4, rtol=0)


def test_path_patch_is_the_same_through_every_backend(llama, nnsight_llama, task):
    fast, hooked, nn = _three_ways(
        llama, nnsight_llama, task, cw.path_patch, receivers=[Receiver(1, 1, "q")], position="END"
    )
    assert any(n.startswith("generic path, two bridge forwards per sender") for n in hooked.notes)
    assert nn.notes[0].startswith("nnsight (in-process): 1 request(s)")
    for other in (hooked, nn):
        torch.testing.assert_close(
            other.per_example, fast.per_example, atol=1e-4, rtol=0, equal_nan=True
        )
        assert torch.equal(other.done, fast.done) and fast.done[0].all()


def test_attribution_is_the_same_through_fast_engine_and_hooks(llama, task):
    fast = cw.attribution_patch(llama, task, "z")
    with cache.force_hooked():
        hooked = cw.attribution_patch(llama, task, "z")
    assert any(n.startswith("generic path, gradients through bridge hooks") for n in hooked.notes)
    torch.testing.assert_close(hooked.per_example, fast.per_example, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def finetuned(one_thread):
    """The same architecture with every attention and MLP weight moved a little."""
    ft = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.original_model.model.layers.parameters():
            p += 0.3 * torch.randn(p.shape, generator=g)
    return ft


@pytest.mark.parametrize("component,position", [("z", "END"), ("v", "all"), ("q", "all")])
def test_cmap_grid_is_the_same_through_every_backend(
    llama, nnsight_llama, finetuned, task, component, position
):
    kw = {"component": component, "position": position}
    fast = cross_model.cmap_grid(llama, finetuned, task, **kw)
    with cache.force_hooked():
        hooked = cross_model.cmap_grid(llama, finetuned, task, **kw)
    nm_ft = cw.load_model(finetuned, backend="nnsight", remote=False)
    nn = cross_model.cmap_grid(nnsight_llama, nm_ft, task, **kw)
    assert not any("generic path" in n or "nnsight" in n for n in fast.notes)
    assert any(n.startswith("generic path: full forwards per batch of heads") for n in hooked.notes)
    assert any(n.startswith("nnsight (in-process)") for n in nn.notes)
    assert float(fast.values.abs().max()) > 1e-3  # the fine-tune moved something
    for other in (hooked, nn):
        assert other.complete and other.done.all() and other.shape == fast.shape
        torch.testing.assert_close(other.per_example, fast.per_example, atol=1e-4, rtol=0)
        torch.testing.assert_close(other.metric_clean, fast.metric_clean, atol=1e-4, rtol=0)
        torch.testing.assert_close(other.metric_corrupt, fast.metric_corrupt, atol=1e-4, rtol=0)


def test_cmap_grid_picks_hooks_for_both_models_when_one_lacks_the_engine(llama, finetuned, task):
    fast = cross_model.cmap_grid(llama, finetuned, task, component="z")
    finetuned.add_hook("blocks.0.hook_resid_pre", lambda act, hook: act)
    try:
        mixed = cross_model.cmap_grid(llama, finetuned, task, component="z")
    finally:
        finetuned.reset_hooks()
    assert any("(fine-tuned model: hooks are left on the model" in n for n in mixed.notes)
    torch.testing.assert_close(mixed.per_example, fast.per_example, atol=1e-4, rtol=0)


def test_cmap_groups_are_the_same_through_every_backend(llama, nnsight_llama, finetuned, task):
    """cmap (a circuit's groups, each alone, then all) through the one sweep on each backend;
    two batches of examples, so two jobs of the job loop. Locally both backends run
    run_with_edits, on the fast engine or (force_hooked) on bridge hooks; nnsight sends
    requests; a hand-written edit is the reference."""
    circuit = cw.Circuit.from_groups({"a": ["0.1", "1.2"], "b": ["1.0"]}, positions={"a": "S2"})
    kw = {"circuit": circuit, "component": ["z", "v"], "batch_size": 3}
    seen: list = []
    fast = cross_model.cmap(
        llama, finetuned, task, on_progress=lambda d, t: seen.append((d, t)), **kw
    )
    with cache.force_hooked():
        hooked = cross_model.cmap(llama, finetuned, task, **kw)
    nm_ft = cw.load_model(finetuned, backend="nnsight", remote=False)
    nnsight_llama.requests = 0
    nn = cross_model.cmap(nnsight_llama, nm_ft, task, **kw)
    assert seen == [(1, 2), (2, 2)] and fast.groups == ["a", "b", "circuit"]
    assert nn.notes[0] == "nnsight (in-process): 4 request(s), 2 per batch of examples"
    assert (nnsight_llama.requests, nm_ft.requests) == (2, 2)
    assert float((fast.patched_metric - fast.base_metric).abs().max()) > 1e-3
    for other in (hooked, nn):
        assert other.complete and other.done.all() and other.groups == fast.groups
        for name in ("base_metric", "finetuned_metric", "patched_metric", "patched_accuracy"):
            torch.testing.assert_close(getattr(other, name), getattr(fast, name), atol=1e-4, rtol=0)
    # a plain reference: the fine-tuned z and v of group b's head written in by hand
    ft_run = cw.run_with_edits(finetuned, task.clean_tokens, capture=[(1, "z"), (1, "v")])

    def put(key, cols):
        src = ft_run.captured[key]

        def edit(act):
            act = act.clone()
            act[:, :, cols] = src[:, :, cols].to(act.dtype)
            return act

        return edit

    kv = llama.cfg.n_heads // llama.cfg.n_key_value_heads
    logits = cw.run_with_edits(
        llama, task.clean_tokens, {(1, "z"): put((1, "z"), [0]), (1, "v"): put((1, "v"), [0 // kv])}
    ).logits
    by_hand = task.metric(logits[torch.arange(len(task)), task.positions["END"]])
    torch.testing.assert_close(fast.patched_metric[1], by_hand.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("module", [patching, path_patching, attribution, cross_model])
def test_experiments_no_longer_branch_on_the_engine(module):
    src = Path(module.__file__).read_text()
    assert not re.search(r"\beng is (not )?None\b", src), module.__name__
    assert "engine_for" not in src and "backend" in src, module.__name__


def test_backends_module_names_every_implementation():
    assert {FastBackend, HookBackend, NNsightBackend} <= {
        v for v in vars(backends).values() if isinstance(v, type)
    }


# ---------------------------------------------------------------------- the job loop


def _fake_work(n_jobs: int, prepaid: int, log: list) -> ChunkWork:
    """Jobs of a 2 x 3 grid; job j fills its cells with j + 1 for every example."""
    keys = [(([0, 1],), [0, 2]), (([1],), [1]), (([0],), [1])][:n_jobs]

    def run(key, cols):
        j = keys.index((key, cols))
        log.append(("run", j))
        return torch.full((len(cols), 2), float(j + 1))

    def metrics():
        log.append("metrics")
        return torch.zeros(2), torch.ones(2)

    return ChunkWork(keys, run, metrics, prepaid=prepaid)


def _one_chunk_task(n: int = 2):
    class T:
        def __len__(self):
            return n

        def subset(self, idx):
            return _one_chunk_task(len(idx))

    return T()


def test_a_job_may_hold_cells_of_several_layers_and_prepaid_jobs_are_not_stoppable():
    log: list = []
    stops: list = []
    out = run_sweep(
        _one_chunk_task(),
        [slice(0, 2)],
        lambda chunk: _fake_work(3, 1, log),
        (2, 3),
        None,
        lambda: stops.append(1) or True,  # stop at the first chance
    )
    # job 0 came with metrics(): it is kept, and the first stop check is before job 1
    assert log == ["metrics", ("run", 0)] and len(stops) == 1 and not out.complete
    expect = torch.full((2, 3), math.nan)
    expect[0, 0], expect[1, 2] = 1.0, 1.0
    assert torch.equal(out.per_example[0].nan_to_num(-9), expect.nan_to_num(-9))
    assert out.done.tolist() == [[True, False, False], [False, False, True]]


def test_without_prepaid_jobs_a_stop_comes_before_the_first_job():
    log: list = []
    out = run_sweep(
        _one_chunk_task(),
        [slice(0, 2)],
        lambda chunk: _fake_work(3, 0, log),
        (2, 3),
        None,
        lambda: True,
    )
    assert log == ["metrics"] and not out.done.any() and not out.complete


def test_setup_steps_of_metrics_count_in_progress():
    log: list = []
    seen: list = []

    def prepare(chunk):
        work = _fake_work(2, 1, log)
        work.setup = 1  # metrics() sends a request of its own (cmap's fine-tuned capture)
        return work

    out = run_sweep(
        _one_chunk_task(),
        [slice(0, 2)],
        prepare,
        (2, 3),
        lambda d, t: seen.append((d, t, len(log))),
        None,
    )
    assert out.complete and seen == [(1, 3, 1), (2, 3, 2), (3, 3, 3)]


class _RequestFailed(RuntimeError):
    partial = None


def _partial_of(prepare, rows: list[slice]):
    """run_sweep's error's partial: (what finished, the message), as on_error built it."""
    with pytest.raises(_RequestFailed) as info:
        run_sweep(
            _one_chunk_task(rows[-1].stop),
            rows,
            prepare,
            (2, 3),
            None,
            None,
            on_error=lambda kept, err: (kept, str(err)),
        )
    return info.value.partial


def test_an_error_with_a_partial_leaves_with_what_finished():
    def prepare(chunk):
        work = _fake_work(3, 1, [])
        inner = work.run

        def run(key, cols):
            if cols == [1]:
                raise _RequestFailed("request 2 failed")
            return inner(key, cols)

        work.run = run
        return work

    kept, msg = _partial_of(prepare, [slice(0, 2)])
    assert msg == "request 2 failed" and not kept.complete
    assert kept.done.tolist() == [[True, False, False], [False, False, True]]
    assert torch.equal(kept.metric_b, torch.ones(2))


def test_other_errors_pass_through_run_sweep_untouched():
    calls: list = []

    def prepare(chunk):
        work = _fake_work(1, 0, [])

        def run(key, cols):
            raise ValueError("a bug, not a failed request")

        work.run = run
        return work

    with pytest.raises(ValueError, match="a bug"):
        run_sweep(_one_chunk_task(), [slice(0, 2)], prepare, (2, 3), None, None, calls.append)
    assert calls == []  # no on_partial either: nothing finished


def test_a_stop_comes_before_a_later_chunks_metrics():
    """A later chunk's metrics() runs its base models: a stop requested during chunk 0 keeps
    chunk 0 and never computes them."""
    log: list = []
    out = run_sweep(
        _one_chunk_task(4),
        [slice(0, 2), slice(2, 4)],
        lambda chunk: _fake_work(1, 1, log),
        (2, 3),
        None,
        lambda: True,
    )
    assert log == ["metrics", ("run", 0)] and not out.complete
    assert out.per_example.shape[0] == 2 and torch.equal(out.metric_b, torch.ones(2))


def test_a_failed_metrics_request_leaves_with_the_finished_chunks():
    calls = {"n": 0}

    def prepare(chunk):
        work = _fake_work(1, 1, [])
        inner = work.metrics

        def metrics():
            calls["n"] += 1
            if calls["n"] == 2:
                raise _RequestFailed("chunk 2's base request failed")
            return inner()

        work.metrics = metrics
        return work

    kept, msg = _partial_of(prepare, [slice(0, 2), slice(2, 4)])
    assert msg == "chunk 2's base request failed" and not kept.complete
    assert kept.per_example.shape[0] == 2 and not kept.per_example[:, 0, 0].isnan().any()


def test_chunk_notes_count_only_the_examples_that_ran():
    from circuit_widgets.core.common import SweepOut, chunk_notes

    rows = [slice(0, 2), slice(2, 4)]
    nan2 = torch.full((2,), math.nan)
    failed_first = SweepOut(torch.full((2, 3), math.nan), torch.zeros(3, dtype=torch.bool),
                            nan2, nan2, False, 2)  # fmt: skip
    assert "stopped: 0 of 4 examples kept" in chunk_notes(failed_first, rows)
    one = SweepOut(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool), torch.zeros(2),
                   torch.ones(2), False, 2)  # fmt: skip
    assert "stopped: 2 of 4 examples kept" in chunk_notes(one, rows)
