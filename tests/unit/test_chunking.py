"""Example chunking under a memory budget: every sweep gives the unchunked numbers, keeps only
one chunk's runs alive, reports progress over all chunks and stops between jobs."""

from __future__ import annotations

import pytest
import torch

from circuit_widgets import tiny_model
from circuit_widgets.core import activation_patch, cache, path_patch
from circuit_widgets.core.common import (
    example_chunks,
    memory_budget,
    parse_memory,
    trace_bytes_per_token,
)
from circuit_widgets.tasks import ioi
from circuit_widgets.types import Receiver

TINY = 1  # one byte: every chunk holds a single example


@pytest.fixture(scope="module")
def llama(one_thread):
    return tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=0)


@pytest.fixture(scope="module")
def task(llama):
    return ioi(llama, n=5, seed=0)


def test_parse_memory_reads_sizes_and_refuses_nonsense():
    assert parse_memory(None) is None
    assert parse_memory(1234) == 1234
    assert parse_memory("2GB") == 2_000_000_000
    assert parse_memory("512 MiB") == 512 * 1024**2
    assert parse_memory("1.5g") == 1_500_000_000
    assert parse_memory("300k") == 300_000
    for bad in ("lots", "-1GB", 0, -5, True, "2XB", "MiB", [1]):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)
    assert memory_budget("1MB") == 1_000_000
    free = memory_budget(None)
    assert 0 < free <= 1 << 30  # a quarter of free RAM, capped at 1 GB on CPU


def test_chunks_follow_the_budget(llama, task):
    assert example_chunks(llama, task, TINY) == [slice(i, i + 1) for i in range(5)]
    assert example_chunks(llama, task, "1GB") == [slice(0, 5)]
    # two runs (clean, corrupt) of every token of an example, per layer and stream
    one = 2 * task.clean_tokens.shape[1] * trace_bytes_per_token(llama)
    assert example_chunks(llama, task, 2 * one + 1) == [slice(0, 2), slice(2, 4), slice(4, 5)]


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize(
    ("component", "positions", "direction"),
    [("z", "END", "noise"), ("v", "each", "denoise"), ("mlp_out", ["S2", "END"], "noise")],
)
def test_activation_patch_chunked_equals_unchunked(
    llama, task, hooked, component, positions, direction
):
    kw = {"component": component, "positions": positions, "direction": direction}
    with cache.force_hooked(hooked):
        whole = activation_patch(llama, task, **kw)
        ticks = []
        chunked = activation_patch(
            llama, task, **kw, max_memory=TINY, on_progress=lambda d, t: ticks.append((d, t))
        )
    assert whole.complete and chunked.complete
    torch.testing.assert_close(chunked.per_example, whole.per_example, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.values, whole.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.metric_clean, whole.metric_clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.metric_corrupt, whole.metric_corrupt, atol=1e-5, rtol=1e-5)
    assert bool(chunked.done.all())
    assert any("5 chunks" in n for n in chunked.notes)
    # progress counts every chunk's jobs, once each, up to the total
    total = ticks[-1][1]
    assert [d for d, _ in ticks] == list(range(1, total + 1)) and {t for _, t in ticks} == {total}


def test_a_stop_in_a_later_chunk_keeps_the_finished_chunks(llama, task):
    whole = activation_patch(llama, task, component="z", positions="END")
    per_chunk = []
    activation_patch(
        llama,
        task,
        component="z",
        positions="END",
        max_memory=TINY,
        on_progress=lambda d, t: per_chunk.append(t),
    )
    jobs_per_chunk = per_chunk[-1] // 5
    calls = []

    def stop() -> bool:
        calls.append(1)
        # a later chunk checks before its metrics and before each job: chunks 0 and 1 take
        # 2 J + 1 calls, chunk 2's check and first job 2 more: stop before its second job
        return len(calls) > 2 * jobs_per_chunk + 3

    part = activation_patch(
        llama, task, component="z", positions="END", max_memory=TINY, should_stop=stop
    )
    assert not part.complete and bool(part.done.all())
    assert part.per_example.shape[0] == 2  # the two finished chunks' examples
    torch.testing.assert_close(part.per_example, whole.per_example[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.metric_clean, whole.metric_clean[:2], atol=1e-5, rtol=1e-5)
    assert any("2 of 5 examples" in n for n in part.notes)
    # stopped inside the first chunk: its finished cells on its examples
    calls.clear()
    first = activation_patch(
        llama,
        task,
        component="z",
        positions="END",
        max_memory=TINY,
        should_stop=lambda: len(calls.append(1) or calls) > 1,
    )
    assert first.per_example.shape[0] == 1 and 0 < int(first.done.sum()) < first.done.numel()
    d = first.done
    torch.testing.assert_close(
        first.per_example[0][d], whole.per_example[0][d], atol=1e-5, rtol=1e-5
    )


def test_chunked_runs_are_not_cached(llama, task):
    """Only an unchunked run keeps its task's runs; chunks' runs go with their chunk."""
    cache.clear_cache()
    activation_patch(llama, task, component="z", positions="END", max_memory=TINY)
    assert (
        llama not in cache._RUNS or task not in cache._RUNS[llama] or not cache._RUNS[llama][task]
    )
    activation_patch(llama, task, component="z", positions="END")
    assert {"clean", "corrupt"} <= set(cache._RUNS[llama][task])


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {"position": "END"},
        {"position": "all", "freeze_mlps": True},
        {"position": "S2", "receivers": [Receiver(1, 2, "v")]},
    ],
)
def test_path_patch_chunked_equals_unchunked(llama, task, hooked, kw):
    with cache.force_hooked(hooked):
        whole = path_patch(llama, task, **kw)
        chunked = path_patch(llama, task, **kw, max_memory=TINY)
    assert chunked.complete and any("5 chunks" in n for n in chunked.notes)
    torch.testing.assert_close(
        chunked.per_example, whole.per_example, atol=1e-5, rtol=1e-5, equal_nan=True
    )
    torch.testing.assert_close(chunked.metric_corrupt, whole.metric_corrupt, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.done, whole.done)


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("fn", ["attribution_patch", "path_attribution"])
def test_attribution_chunked_equals_unchunked(llama, task, hooked, fn):
    from circuit_widgets import core

    call = getattr(core, fn)
    kw = {"direction": "denoise", "positions": "each"} if fn == "attribution_patch" else {}
    with cache.force_hooked(hooked):
        cache.clear_cache()
        whole = call(llama, task, **kw)
        ticks = []
        chunked = call(llama, task, **kw, max_memory=TINY, on_progress=lambda d, t: ticks.append(t))
    assert chunked.complete and ticks == [5] * 5
    assert any("5 chunks" in n for n in chunked.notes)
    torch.testing.assert_close(chunked.per_example, whole.per_example, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.metric_clean, whole.metric_clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.metric_corrupt, whole.metric_corrupt, atol=1e-5, rtol=1e-5)


def test_mean_ablation_and_faithfulness_chunked_equal_unchunked(llama, task):
    from circuit_widgets import Circuit
    from circuit_widgets.core.evaluation import faithfulness, mean_ablate

    circ = Circuit.from_groups({"a": ["1.0", "1.2"], "b": ["0.1"]}, positions={"b": "S2"})
    whole = mean_ablate(llama, task, circ)
    chunked = mean_ablate(llama, task, circ, max_memory=TINY)
    torch.testing.assert_close(chunked.per_example, whole.per_example, atol=1e-5, rtol=1e-5)
    assert chunked.accuracy == whole.accuracy
    f_whole = faithfulness(llama, task, circ, n_random=2)
    f_chunked = faithfulness(llama, task, circ, n_random=2, max_memory="1")
    assert f_chunked.ratio == pytest.approx(f_whole.ratio, abs=1e-5)
    assert f_chunked.random_metric == pytest.approx(f_whole.random_metric, abs=1e-5)
    with pytest.raises(ValueError, match="max_memory"):
        mean_ablate(llama, task, circ, max_memory="a lot")


def test_ablation_forwards_follow_the_budget(llama, task, monkeypatch):
    """Each forward holds at most the examples the budget allows."""
    from circuit_widgets.core import evaluation as circuits

    sizes = []
    real = circuits.run_with_edits

    def spy(model, tokens, *args, **kwargs):
        sizes.append(tokens.shape[0])
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(circuits, "run_with_edits", spy)
    circuits.mean_ablate(llama, task, ["1.0"], max_memory=TINY)
    assert sizes and set(sizes) == {1}
    sizes.clear()
    circuits.mean_ablate(llama, task, ["1.0"])
    assert set(sizes) == {len(task)}


def test_dcm_max_memory_decides_the_key_value_cache(llama):
    import circuit_widgets.core.masking as dcm_module
    from circuit_widgets.tasks import desiderata

    d = desiderata(llama, n=15, seed=3, n_boxes=3)["object_value"]
    kw = {"lam": 0.01, "lr": 0.3, "batch_size": 4, "epochs": 1}
    windowed = dcm_module.dcm(llama, d, **kw)
    plan = dcm_module._Plan.build(llama, d, None, "END", (0.6, 0.2, 0.2), 0, 4, TINY)
    assert plan.eng is None  # over budget: full forwards, no cached keys/values
    full = dcm_module.dcm(llama, d, **kw, max_memory=TINY)
    torch.testing.assert_close(windowed.curve.loss, full.curve.loss, atol=1e-5, rtol=1e-5)
    assert windowed.test_accuracy == full.test_accuracy
    sweep = dcm_module.dcm_sweep(
        llama, d, lams=[0.01], max_memory=TINY, lr=0.3, batch_size=4, epochs=1
    )
    torch.testing.assert_close(sweep.results[0].curve.loss, full.curve.loss, atol=1e-5, rtol=1e-5)
