"""nnsight backend: in-process and NDIF's local simulation give the fast engine's numbers, in a
bounded number of requests, with progress, stop, failures and the remote path's errors."""

from __future__ import annotations

import pytest
import torch

import circuit_widgets as cw
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.nnsight_model import NNsightModel, RemoteError
from circuit_widgets.types import Receiver

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def pair(request, tiny_gpt2, tiny_llama, tiny_gemma3):
    bridge = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3}[request.param]
    task = cw.tasks.ioi(bridge, 4)
    return bridge, task


def _nn(bridge, remote):
    return cw.load_model(bridge, backend="nnsight", remote=remote)


CASES = [
    ("z", "END", "noise", False),
    ("q", "all", "noise", "local"),
    ("k", ["S2", "END"], "denoise", "local"),
    ("v", "END", "noise", False),
]


@pytest.mark.parametrize("component,positions,direction,remote", CASES)
def test_activation_patch_equals_fast_engine(pair, remote, component, positions, direction):
    bridge, task = pair
    ref = cw.activation_patch(
        bridge, task, component=component, positions=positions, direction=direction
    )
    nm = _nn(bridge, remote)
    got = cw.activation_patch(
        nm, task, component=component, positions=positions, direction=direction
    )
    assert got.complete and got.shape == ref.shape and got.heads == ref.heads
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.metric_clean, ref.metric_clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.metric_corrupt, ref.metric_corrupt, atol=1e-4, rtol=0)
    # a whole grid of 2 layers fits the default row budget: one request
    assert (
        nm.requests == 1 and got.notes[0].startswith("nnsight (") and "1 request(s)" in got.notes[0]
    )


PATH_CASES = [
    ("logits", False, "all", "local"),
    ("logits", True, "END", False),
    ([Receiver(1, 1, "q")], False, "END", "local"),
    ([Receiver(1, 3, "k"), Receiver(1, 0, "v")], True, "all", False),
]


@pytest.mark.parametrize("receivers,freeze,position,remote", PATH_CASES)
def test_path_patch_equals_fast_engine(pair, receivers, freeze, position, remote):
    bridge, task = pair
    kw = {"receivers": receivers, "freeze_mlps": freeze, "position": position}
    ref = cw.path_patch(bridge, task, **kw)
    nm = _nn(bridge, remote)
    got = cw.path_patch(nm, task, **kw)
    assert got.complete and torch.equal(got.done, ref.done) and got.receivers == ref.receivers
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0, equal_nan=True)
    assert nm.requests == 1


def test_path_patch_requests_per_layer_and_partial_on_failure(tiny_llama):
    task = cw.tasks.ioi(tiny_llama, 4)
    ref = cw.path_patch(tiny_llama, task)
    nm = _nn(tiny_llama, "local")
    seen = []
    got = cw.path_patch(nm, task, batch_size=4, on_progress=lambda d, t: seen.append((d, t)))
    assert nm.requests == 2 and seen == [(1, 2), (2, 2)]
    torch.testing.assert_close(got.values, ref.values, atol=1e-4, rtol=0)
    nm._fail = lambda n: (
        (_ for _ in ()).throw(TimeoutError("server did not answer")) if n == 4 else None
    )
    with pytest.raises(RemoteError, match="TimeoutError: server did not answer") as info:
        cw.path_patch(nm, task, batch_size=4)
    torch.testing.assert_close(info.value.partial.values[0], ref.values[0], atol=1e-4, rtol=0)
    assert not info.value.partial.done[1].any()


@pytest.mark.parametrize("to,which", [("S1", "clean"), (["IO", "S2"], "corrupt")])
def test_head_attention_equals_fast_engine(pair, to, which):
    bridge, task = pair
    heads = [(0, 1), (1, 3), (1, 0)]
    ref = cw.head_attention(bridge, task, heads, to, which=which)
    nm = _nn(bridge, "local")
    got = cw.head_attention(nm, task, heads, to, which=which)
    assert got.heads == ref.heads and nm.requests == 1
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-4, rtol=0)


def test_captures_equal_fast_engine(pair):
    bridge, task = pair
    keys = [(layer, s) for layer in range(2) for s in ("resid_pre", "q", "k", "v", "pattern", "z")]
    end = task.positions["END"]
    ref = run_with_edits(bridge, task.clean_tokens, capture=keys, at=end)
    nm = _nn(bridge, "local")
    got = run_with_edits(nm, task.clean_tokens, capture=keys, at=end)
    assert nm.requests == 1
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)
    for key in keys:
        torch.testing.assert_close(got.captured[key], ref.captured[key], atol=1e-4, rtol=0)


def test_widgets_run_on_an_nnsight_model(tiny_llama):
    from circuit_widgets.widgets import AttentionWidget, PathPatchingWidget

    task = cw.tasks.ioi(tiny_llama, 4)
    nm = _nn(tiny_llama, "local")
    att = AttentionWidget(nm, task, ["1.2", "0.1"], example=1)
    att.wait(60)
    ref = AttentionWidget(tiny_llama, task, ["1.2", "0.1"], example=1)
    ref.wait(60)
    assert att.status == "done" and att.head_labels == ref.head_labels
    torch.testing.assert_close(
        torch.tensor(att.patterns), torch.tensor(ref.patterns), atol=1e-5, rtol=0
    )
    w = PathPatchingWidget(nm, task, preview=False)
    w.run()
    w.wait(60)
    grid = cw.path_patch(tiny_llama, task, position=w.position)
    assert w.status == "done"
    torch.testing.assert_close(torch.tensor(w.grid.values), grid.values, atol=1e-4, rtol=0)


def test_requests_at_most_one_per_layer_and_progress_per_request(tiny_llama):
    task = cw.tasks.ioi(tiny_llama, 4)
    nm = _nn(tiny_llama, "local")
    seen = []
    # batch_size = one copy of the batch per cell: the smallest request is still a whole layer
    got = cw.activation_patch(
        nm, task, positions="END", batch_size=4, on_progress=lambda d, t: seen.append((d, t))
    )
    assert nm.requests == 2 == tiny_llama.cfg.n_layers
    assert seen == [(1, 2), (2, 2)]
    assert got.done.all()


def test_stop_between_requests_keeps_finished_layers(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, 4)
    ref = cw.activation_patch(tiny_gpt2, task, positions="END")
    nm = _nn(tiny_gpt2, False)
    calls = []
    got = cw.activation_patch(
        nm,
        task,
        positions="END",
        batch_size=4,
        should_stop=lambda: calls.append(1) or len(calls) >= 1,
    )
    assert not got.complete and nm.requests == 1
    assert got.done[0].all() and not got.done[1].any()
    torch.testing.assert_close(got.values[0], ref.values[0], atol=1e-4, rtol=0)
    assert torch.isnan(got.values[1]).all()


def test_failed_request_is_one_sentence_and_keeps_the_partial_grid(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, 4)
    ref = cw.activation_patch(tiny_gpt2, task, positions="END")
    nm = _nn(tiny_gpt2, "local")

    def fail(n):
        if n == 2:
            raise ConnectionError("connection reset by peer\nlong server traceback ...")

    nm._fail = fail
    with pytest.raises(RemoteError) as info:
        cw.activation_patch(nm, task, positions="END", batch_size=4)
    msg = str(info.value)
    assert "\n" not in msg and "ConnectionError: connection reset by peer" in msg
    partial = info.value.partial
    assert partial is not None and not partial.complete
    torch.testing.assert_close(partial.values[0], ref.values[0], atol=1e-4, rtol=0)
    assert not partial.done[1].any()


def test_request_never_references_circuit_widgets(tiny_llama, monkeypatch):
    """The local simulation hides our package while it deserialises; besides, nothing in the
    payload names one of our modules (the block's file name is the only mention)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.schema.request import RequestModel

    task = cw.tasks.ioi(tiny_llama, 4)
    nm = _nn(tiny_llama, "local")
    blobs = []

    class Recording(LocalSimulationBackend):
        def __call__(self, tracer):
            blobs.append(RequestModel.serialize(tracer, compress=False))
            return super().__call__(tracer)

    monkeypatch.setattr(nm, "backend", lambda: Recording(nm.lm))
    cw.activation_patch(nm, task, component="k", positions="all")
    assert len(blobs) == 1
    path = b"circuit_widgets/core/nnsight_backend.py"
    assert blobs[0].count(b"circuit_widgets") == blobs[0].count(path) >= 1
    assert b"circuit_widgets.core" not in blobs[0] and b"circuit_widgets.tasks" not in blobs[0]


def test_nnsight_model_serves_tasks_with_the_same_tokens(tiny_gemma3):
    nm = _nn(tiny_gemma3, False)
    assert isinstance(nm, NNsightModel)
    shape = cw.models.model_shape(nm)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head) == (2, 4, 1, 8)
    a, b = cw.tasks.ioi(nm, 6), cw.tasks.ioi(tiny_gemma3, 6)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.answers, b.answers)
    assert torch.equal(nm.to_tokens("Hello there"), tiny_gemma3.to_tokens("Hello there").cpu())


def test_remote_argument_checks(tiny_gpt2):
    with pytest.raises(ValueError, match="remote must be False, 'local' or True"):
        cw.load_model(tiny_gpt2, backend="nnsight", remote="yes")
    with pytest.raises(ValueError, match="NDIF does not serve it"):
        cw.load_model("demo", backend="nnsight", remote=True)
    with pytest.raises(ValueError, match="weights stay on NDIF"):
        cw.load_model(tiny_gpt2, backend="nnsight", remote=True)
    with pytest.raises(ValueError, match="backend must be"):
        cw.load_model("tiny-gpt2", backend="vllm")


def test_remote_true_builds_a_meta_model_and_needs_an_api_key(tiny_llama, tmp_path, monkeypatch):
    from nnsight import CONFIG
    from nnsight.intervention.backends.remote import RemoteBackend

    # a checkpoint folder stands in for a hub name: only its config and tokenizer are read
    tiny_llama.original_model.config.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    nm = cw.load_model(str(tmp_path), backend="nnsight", remote=True)
    assert nm.remote is True and nm.cfg.n_key_value_heads == 2
    assert all(p.is_meta for p in nm.lm._module.parameters())  # no weights here
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteError, match="needs an NDIF API key") as info:
        nm.backend()
    assert "\n" not in str(info.value)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(RemoteError, match="request failed"):  # offline: no hub revision
        nm.backend()
    key = '{"repo_id": "meta-llama/Llama-3.1-70B", "revision": "main"}'
    monkeypatch.setattr(type(nm.lm), "_remoteable_model_key", lambda self: key)
    backend = nm.backend()
    assert isinstance(backend, RemoteBackend)
    assert backend.model_key == f"nnsight.modeling.transformers.TransformersModel:{key}"


def test_remote_true_offline_hub_is_one_sentence():
    with pytest.raises(RemoteError, match="needs hub access") as info:
        cw.load_model("no-such-org/no-such-model-xyz", backend="nnsight", remote=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: run_with_edits(m, t.clean_tokens, {(0, "z"): lambda z: z * 0}),
        lambda m, t: run_with_edits(m, t.clean_tokens, grad=True),
        lambda m, t: cw.intervene(m, t, heads=["0.1"], scale=0.0).__enter__(),
    ],
)
def test_experiments_not_on_nnsight_say_so(tiny_gpt2, call):
    task = cw.tasks.ioi(tiny_gpt2, 2)
    nm = _nn(tiny_gpt2, False)
    with pytest.raises(NotImplementedError, match="not available on the nnsight backend"):
        call(nm, task)


def test_intervene_refusal_names_the_reason(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, 2)
    nm = _nn(tiny_gpt2, "local")
    iv = cw.intervene(nm, task, heads=["0.1"], scale=0.0)  # its edits() run in a request
    with pytest.raises(NotImplementedError, match="local-only.*NDIF keeps no state") as info:
        iv.__enter__()
    assert "\n" not in str(info.value) and "intervention.edits()" in str(info.value)
    assert nm.requests == 0
