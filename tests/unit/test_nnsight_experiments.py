"""nnsight backend, circuit evaluation and cross-model patching: in-process and NDIF's local
simulation give the fast engine's numbers in the documented number of requests, with progress,
stop and failures kept to one sentence with the partial result."""

from __future__ import annotations

import pytest
import torch
from nnsight_strict import assert_no_module_of_ours, record_requests

import circuit_widgets as cw
from circuit_widgets.nnsight_model import RemoteError
from circuit_widgets.types import Circuit, CircuitGroup, Head

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ARCHS = {"gpt2": {}, "llama": {"n_kv_heads": 2}, "gemma3": {"n_kv_heads": 1}}
CIRCUIT = Circuit(
    (
        CircuitGroup("a", frozenset({Head(0, 1)}), "S2"),
        CircuitGroup("b", frozenset({Head(1, 2), Head(0, 3)}), None),
    )
)


def _tiny(arch, seed):
    return cw.tiny_model(arch, n_layers=2, n_heads=4, d_model=32, seed=seed, **ARCHS[arch])


@pytest.fixture(scope="module", params=list(ARCHS))
def models(request, tiny_gpt2, tiny_llama, tiny_gemma3):
    """(base bridge, a 'fine-tuned' bridge of the same shape and other weights, task)."""
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3}[request.param]
    return base, _tiny(request.param, 1), cw.tasks.ioi(base, 6)


def _nn(bridge, remote):
    return cw.load_model(bridge, backend="nnsight", remote=remote)


def _close(a, b):
    """Within 1e-4, and within 1% of the reference's own scale (random tiny models give small
    effects, so 1e-4 alone could not tell a missing patch from a right one)."""
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0, equal_nan=True)
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    scale = float(b.nan_to_num().abs().max())
    assert float((a - b).nan_to_num().abs().max()) <= 0.01 * scale + 1e-7


# ---------------------------------------------------------------------- mean ablation


@pytest.mark.parametrize("means,remote", [("class", "local"), ("auto", False)])
def test_mean_ablate_equals_fast_engine(models, means, remote):
    base, _, task = models
    ref = cw.mean_ablate(base, task, CIRCUIT, means=means)
    nm = _nn(base, remote)
    got = cw.mean_ablate(nm, task, CIRCUIT, means=means)
    _close(got.per_example, ref.per_example)
    _close(got.per_example_accuracy, ref.per_example_accuracy)
    assert got.means == ref.means and got.candidate_accuracy == ref.candidate_accuracy
    # the ablation does something: the unablated model scores otherwise
    full = cw.mean_ablate(base, task, [Head(l, h) for l in range(2) for h in range(4)])
    assert float((full.per_example - got.per_example).abs().max()) > 1e-3
    # one request captures every layer's z for the means, one scores the circuit
    assert nm.requests == 2 and got.notes[0].endswith("2 request(s): 1 for the means, 1 scoring")


def test_faithfulness_equals_fast_engine_with_every_circuit_in_one_request(models):
    base, _, task = models
    ref = cw.faithfulness(base, task, CIRCUIT, n_random=4, seed=3)
    nm = _nn(base, "local")
    got = cw.faithfulness(nm, task, CIRCUIT, n_random=4, seed=3)
    for name in ("full_metric", "circuit_metric", "ratio", "full_accuracy", "accuracy_ratio"):
        _close(torch.tensor(getattr(got, name)), torch.tensor(getattr(ref, name)))
    _close(torch.tensor(got.random_metric), torch.tensor(ref.random_metric))
    assert got.random_accuracy == ref.random_accuracy and got.random_seeds == ref.random_seeds
    # full model, circuit and 4 random circuits: 6 x 6 rows, one scoring request
    assert nm.requests == 2 and "1 for the means, 1 scoring" in got.notes[0]


def test_faithfulness_requests_follow_rows_and_chunks(tiny_llama):
    task = cw.tasks.ioi(tiny_llama, 6)
    ref = cw.faithfulness(tiny_llama, task, CIRCUIT, n_random=3)  # the same first 3 seeds
    nm = _nn(tiny_llama, "local")
    got = cw.faithfulness(nm, task, CIRCUIT, n_random=90, batch_size=4)
    _close(torch.tensor(got.random_metric[:3]), torch.tensor(ref.random_metric))
    # chunks of 4 and 2 examples: 2 means requests; 92 circuits x 4 rows fit 512 (chunk 1), and
    # x 2 rows too (chunk 2): 2 scoring requests
    assert nm.requests == 4 and "2 for the means, 2 scoring" in got.notes[0]
    nm.requests = 0
    cw.faithfulness(nm, task, CIRCUIT, n_random=90)  # 92 circuits x 6 rows > 512: two requests
    assert nm.requests == 3


def test_mean_ablate_failure_is_one_sentence(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, 4)
    nm = _nn(tiny_gpt2, "local")

    def fail(n):
        if n == 2:
            raise ConnectionError("connection reset by peer\nlong server traceback ...")

    nm._fail = fail
    with pytest.raises(RemoteError) as info:
        cw.mean_ablate(nm, task, ["0.1"])
    assert "\n" not in str(info.value) and "ConnectionError: connection reset" in str(info.value)


# ---------------------------------------------------------------------- cmap_grid


GRID_CASES = [
    ("z", "END", "local"),
    ("q", "all", False),
    ("k", "END", "local"),
    ("v", "S2", "local"),
]


@pytest.mark.parametrize("component,position,remote", GRID_CASES)
def test_cmap_grid_equals_fast_engine(models, component, position, remote):
    base, ft, task = models
    ref = cw.cmap_grid(base, ft, task, component=component, position=position)
    nb, nf = _nn(base, remote), _nn(ft, remote)
    got = cw.cmap_grid(nb, nf, task, component=component, position=position)
    assert got.complete and got.shape == ref.shape and got.done.all()
    _close(got.per_example, ref.per_example)
    _close(got.metric_clean, ref.metric_clean)  # the base model's metric
    _close(got.metric_corrupt, ref.metric_corrupt)  # the fine-tuned model's
    assert float(ref.values.abs().max()) > 1e-6  # the patches change something
    # one request captures the fine-tuned model, one runs the whole base grid (2 layers fit)
    assert (nb.requests, nf.requests) == (1, 1) and any("2 request(s)" in n for n in got.notes)


def test_cmap_grid_one_request_per_layer_progress_stop_and_failure(tiny_llama):
    ft = _tiny("llama", 1)
    task = cw.tasks.ioi(tiny_llama, 4)
    ref = cw.cmap_grid(tiny_llama, ft, task)
    nb, nf = _nn(tiny_llama, "local"), _nn(ft, "local")
    seen, partials = [], []
    got = cw.cmap_grid(
        nb,
        nf,
        task,
        batch_size=4,
        on_progress=lambda d, t: seen.append((d, t)),
        on_partial=partials.append,
    )
    assert (nb.requests, nf.requests) == (2, 1) and seen == [(1, 3), (2, 3), (3, 3)]
    _close(got.values, ref.values)
    assert [int(p.done.sum()) for p in partials] == [4, 8]
    # stop after the first base request: layer 0 kept, layer 1 not run
    got = cw.cmap_grid(nb, nf, task, batch_size=4, should_stop=lambda: True)
    assert not got.complete and got.done[0].all() and not got.done[1].any()
    _close(got.values[0], ref.values[0])
    # the third request fails: one sentence, the finished layer survives as .partial
    nb._fail = lambda n: (_ for _ in ()).throw(TimeoutError("no answer")) if n >= 2 else None
    nb.requests = 0
    with pytest.raises(RemoteError, match="TimeoutError: no answer") as info:
        cw.cmap_grid(nb, nf, task, batch_size=4)
    part = info.value.partial
    assert part.done[0].all() and not part.done[1].any()
    _close(part.values[0], ref.values[0])


# ---------------------------------------------------------------------- cmap


@pytest.mark.parametrize("component", ["z", ["q", "k"], "v"])
def test_cmap_equals_fast_engine(models, component):
    base, ft, task = models
    ref = cw.cmap(base, ft, task, circuit=CIRCUIT, component=component)
    nb, nf = _nn(base, "local"), _nn(ft, "local")
    got = cw.cmap(nb, nf, task, circuit=CIRCUIT, component=component)
    assert got.groups == ref.groups and got.complete and got.done.all()
    for name in (
        "base_metric",
        "finetuned_metric",
        "patched_metric",
        "base_accuracy",
        "finetuned_accuracy",
        "patched_accuracy",
    ):
        _close(getattr(got, name), getattr(ref, name))
    assert (nb.requests, nf.requests) == (1, 1) and "2 request(s)" in got.notes[0]


def test_cmap_batches_progress_and_stop(tiny_gpt2):
    ft = _tiny("gpt2", 1)
    task = cw.tasks.ioi(tiny_gpt2, 6)
    ref = cw.cmap(tiny_gpt2, ft, task, heads=["0.1", "1.3"], positions="END")
    nb, nf = _nn(tiny_gpt2, False), _nn(ft, False)
    seen = []
    got = cw.cmap(
        nb,
        nf,
        task,
        heads=["0.1", "1.3"],
        positions="END",
        batch_size=4,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    _close(got.patched_metric, ref.patched_metric)
    assert (nb.requests, nf.requests) == (2, 2) and seen == [(1, 2), (2, 2)]
    # stop is checked between batches (the common sweep's chunks): the first batch is kept
    nb.requests = nf.requests = 0
    got = cw.cmap(nb, nf, task, heads=["0.1"], batch_size=4, should_stop=lambda: True)
    assert not got.complete and got.done.tolist() == [True] * 4 + [False] * 2
    assert (nb.requests, nf.requests) == (1, 1) and "stopped after 4 of 6 examples" in got.notes
    ref_one = cw.cmap(tiny_gpt2, ft, task, heads=["0.1"])
    _close(got.patched_metric[:, :4], ref_one.patched_metric[:, :4])
    assert got.patched_metric[:, 4:].isnan().all()
    # the second batch's base request fails: one sentence, the first batch survives as .partial
    nb._fail = lambda n: (_ for _ in ()).throw(ConnectionError("reset")) if n >= 2 else None
    nb.requests = 0
    with pytest.raises(RemoteError, match="ConnectionError: reset") as info:
        cw.cmap(nb, nf, task, heads=["0.1"], batch_size=4)
    part = info.value.partial
    assert not part.complete and part.done.tolist() == [True] * 4 + [False] * 2
    assert "reset" in part.notes[-1] and part.notes[0].startswith(
        "nnsight (in-process): 3 request(s)"
    )
    _close(part.base_metric[:4], got.base_metric[:4])
    nb._fail = None


def test_cmap_needs_two_alike_nnsight_models(tiny_gpt2, tiny_llama):
    task = cw.tasks.ioi(tiny_gpt2, 2)
    nm = _nn(tiny_gpt2, False)
    with pytest.raises(ValueError, match="needs both models served through nnsight"):
        cw.cmap_grid(nm, tiny_gpt2, task)
    with pytest.raises(ValueError, match="base is TransformerBridge|finetuned is nnsight"):
        cw.cmap(tiny_gpt2, nm, task, heads="all")
    with pytest.raises(ValueError, match="not compatible.*n_key_value_heads: base 4, finetuned 2"):
        cw.cmap_grid(nm, _nn(tiny_llama, False), task)
    with pytest.raises(NotImplementedError, match="mlp_out.*not available on the nnsight"):
        cw.cmap_grid(nm, nm, task, component="mlp_out")


def test_requests_never_reference_circuit_widgets(tiny_llama, monkeypatch):
    task = cw.tasks.ioi(tiny_llama, 4)
    nb, nf = _nn(tiny_llama, "local"), _nn(_tiny("llama", 1), "local")
    blobs = record_requests(monkeypatch, nb, nf)
    cw.faithfulness(nb, task, CIRCUIT, n_random=2)
    cw.cmap_grid(nb, nf, task, component="k")
    assert len(blobs) == 4
    assert_no_module_of_ours(blobs)


# ---------------------------------------------------------------------- attribution


ATTR_CASES = [
    ("z", "all", "noise", "local", "logit_diff"),
    ("q", "END", "denoise", False, "logit_diff"),
    ("k", ["S2", "END"], "noise", "local", "prob"),
    ("v", "all", "denoise", "local", "logit_diff"),
]


@pytest.mark.parametrize("component,positions,direction,remote,metric", ATTR_CASES)
def test_attribution_patch_equals_fast_engine(
    models, component, positions, direction, remote, metric
):
    base, _, task = models
    task = task.with_metric(metric)
    kw = {"positions": positions}
    ref = cw.attribution_patch(base, task, component, direction, **kw)
    nm = _nn(base, remote)
    got = cw.attribution_patch(nm, task, component, direction, **kw)
    assert got.complete and got.shape == ref.shape and torch.equal(got.done, ref.done)
    _close(got.per_example, ref.per_example)
    _close(got.metric_clean, ref.metric_clean)
    _close(got.metric_corrupt, ref.metric_corrupt)
    # one request: source and base rows, the metric's gradient taken inside the trace
    assert nm.requests == 1 and "1 request(s)" in got.notes[0]


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_path_attribution_equals_fast_engine(models, freeze_mlps):
    base, _, task = models
    ref = cw.path_attribution(base, task, freeze_mlps=freeze_mlps, position="END")
    nm = _nn(base, "local")
    got = cw.path_attribution(nm, task, freeze_mlps=freeze_mlps, position="END")
    _close(got.per_example, ref.per_example)
    assert got.receivers == ref.receivers and nm.requests == 1


def test_attribution_requests_per_batch_stop_and_errors(tiny_llama):
    task = cw.tasks.ioi(tiny_llama, 6)
    ref = cw.attribution_patch(tiny_llama, task)
    nm = _nn(tiny_llama, "local")
    seen = []
    got = cw.attribution_patch(nm, task, batch_size=4, on_progress=lambda d, t: seen.append((d, t)))
    assert nm.requests == 2 and seen == [(1, 2), (2, 2)]
    _close(got.per_example, ref.per_example)
    got = cw.attribution_patch(nm, task, batch_size=4, should_stop=lambda: True)
    # as every sweep (one job loop): the first batch runs, a stop comes between requests and
    # keeps the finished examples
    assert not got.complete and got.done.all() and nm.requests == 3
    assert got.per_example.shape[0] == 4 and "stopped: 4 of 6 examples kept" in got.notes
    _close(got.per_example, ref.per_example[:4])
    assert got.notes[0].startswith("nnsight (NDIF local simulation): 1 request(s), 4 examples")

    def fail(n):
        if n == 5:
            raise ConnectionError("connection reset by peer")

    nm._fail = fail
    with pytest.raises(RemoteError, match="connection reset") as info:
        cw.attribution_patch(nm, task, batch_size=4)
    partial = info.value.partial  # the second request failed: the first batch's grid survives
    assert partial is not None and not partial.complete and partial.done.all()
    assert "connection reset" in partial.notes[-1] and "1 request(s)" in partial.notes[0]
    _close(partial.per_example, ref.per_example[:4])
    assert "stopped: 4 of 6 examples kept" in partial.notes
    nm._fail = lambda n: (_ for _ in ()).throw(ConnectionError("refused"))  # the first fails
    with pytest.raises(RemoteError, match="refused") as info:
        cw.attribution_patch(nm, task, batch_size=4)
    first = info.value.partial  # a grid saying nothing finished, not a claim of kept prompts
    assert not first.done.any() and "stopped: 0 of 6 examples kept" in first.notes
    nm._fail = None
    with pytest.raises(ValueError, match="'accuracy' is a step function with no gradient"):
        cw.attribution_patch(nm, task.with_metric("accuracy"))
    with pytest.raises(NotImplementedError, match="'pattern' is not available on the nnsight"):
        cw.attribution_patch(nm, task, "pattern")


def test_cmap_widget_runs_on_two_nnsight_models(tiny_llama):
    from circuit_widgets.widgets import CMAPWidget

    ft = _tiny("llama", 1)
    task = cw.tasks.ioi(tiny_llama, 4)
    nb, nf = _nn(tiny_llama, "local"), _nn(ft, "local")
    got = CMAPWidget(nb, nf, task, CIRCUIT)
    got.run()
    got.wait(60)
    ref = CMAPWidget(tiny_llama, ft, task, CIRCUIT)
    ref.run()
    ref.wait(60)
    assert got.status == ref.status == "done"
    _close(torch.tensor(got.bars), torch.tensor(ref.bars))
    _close(torch.tensor(got.grid.values), torch.tensor(ref.grid.values))
    assert (nb.requests, nf.requests) == (2, 2)  # cmap: 1 + 1, the grid: 1 + 1


def test_path_patching_widget_preview_runs_on_nnsight(tiny_llama):
    """The widget's preview is path_attribution, now an nnsight request too."""
    from circuit_widgets.widgets import PathPatchingWidget

    task = cw.tasks.ioi(tiny_llama, 4)
    nm = _nn(tiny_llama, "local")
    got = PathPatchingWidget(nm, task)
    got.run()
    got.wait(60)
    # the preview (1 request), then the exact grid (at most one request per layer)
    assert got.status == "done" and 2 <= nm.requests <= 1 + tiny_llama.cfg.n_layers
    ref = cw.path_patch(tiny_llama, task, position=got.position)
    _close(torch.tensor(got.grid.values), ref.values)
