"""DCM on nnsight models: in-process and under NDIF's local simulation the mask, its selection,
the curve and every accuracy equal the fast engine's, in 2 requests a run (1 + len(lams) a
sweep), with progress per request, stops between requests and failures in one sentence."""

from __future__ import annotations

import math

import pytest
import torch
from nnsight_strict import assert_no_module_of_ours, record_requests
from test_dcm import (
    CARRIERS,
    planted_dcm_model,
    planted_desideratum,
    random_desideratum,
    sensitive_tiny_model,
)

import circuit_widgets as cw
from circuit_widgets.core.masking import MaskResult, SweepResult, dcm, dcm_sweep
from circuit_widgets.nnsight_model import RemoteError
from circuit_widgets.types import Head

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ACCURACIES = (
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "baseline_accuracy",
    "full_patch_accuracy",
)


def _nn(bridge, remote):
    return cw.load_model(bridge, backend="nnsight", remote=remote)


def assert_same(got: MaskResult, ref: MaskResult) -> None:
    """Masks and curve within 1e-4; selection, steps and accuracies exactly the fast engine's."""
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=0, equal_nan=True)
    close(got.mask, ref.mask)
    close(got.final_mask, ref.final_mask)
    close(got.curve.loss, ref.curve.loss)
    close(got.curve.target_logit, ref.curve.target_logit)
    close(got.curve.mask_size, ref.curve.mask_size)
    close(got.curve.val_loss, ref.curve.val_loss)
    assert torch.equal(got.curve.n_selected, ref.curve.n_selected)
    assert torch.equal(got.curve.step, ref.curve.step)
    assert torch.equal(got.curve.epoch, ref.curve.epoch)
    assert torch.equal(got.curve.val_step, ref.curve.val_step)
    assert got.curve.val_accuracy.tolist() == ref.curve.val_accuracy.tolist()
    assert got.selected == ref.selected and got.heads == ref.heads
    assert got.best_step == ref.best_step and got.n_examples == ref.n_examples
    for name in ACCURACIES:
        assert getattr(got, name) == getattr(ref, name), name
    assert got.complete == ref.complete and got.settings == ref.settings
    assert (got.lam, got.position, got.desideratum) == (ref.lam, ref.position, ref.desideratum)


@pytest.fixture(scope="module")
def planted():
    return planted_dcm_model({(h.layer, h.head): w for h, w in CARRIERS.items()})


# ---------------------------------------------------------------------- equal to the fast engine


@pytest.mark.parametrize(
    "arch,remote,position,seed",
    [
        ("llama", "local", "mid", 2),
        ("gpt2", "local", "END", 3),
        ("gemma3", "local", "mid", 2),
        ("llama", False, "END", 3),
    ],
)
def test_dcm_equals_fast_engine(arch, remote, position, seed):
    """Every head, per-example positions that differ between base and source, a short last
    batch, Adam steps, clamping and checks every 2 steps: the same numbers, in 2 requests."""
    model = sensitive_tiny_model(arch)
    d = random_desideratum(model, n=25, seed=seed)
    kw = {
        "position": position,
        "lam": 0.0,
        "lr": 0.25,
        "epochs": 2,
        "batch_size": 7,
        "eval_every": 2,
        "seed": 3,
    }
    ref = dcm(model, d, **kw)
    nm = _nn(model, remote)
    before = [p.detach().clone() for p in model.parameters()]
    got = dcm(nm, d, **kw)
    assert_same(got, ref)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the test means something: the mask moved, and (these seeds) heads are selected
    assert float((1 - ref.final_mask).nan_to_num().abs().max()) > 0.05
    assert ref.curve.val_step.tolist() == [2, 4, 6]
    assert bool(ref.selected) == (remote == "local")
    assert nm.requests == 2 and got.notes[0].startswith(
        f"nnsight ({'NDIF local simulation' if remote else 'in-process'}): 2 request(s)"
    )


def test_planted_carriers_are_selected_on_nnsight(planted):
    d = planted_desideratum(n=20, seed=7)
    ref = dcm(planted, d, lam=0.1, lr=0.2, batch_size=4)
    nm = _nn(planted, "local")
    got = dcm(nm, d, lam=0.1, lr=0.2, batch_size=4)
    assert_same(got, ref)
    assert set(got.selected) == set(CARRIERS) and got.test_accuracy == 1.0
    assert got.baseline_accuracy == 0.0 and got.full_patch_accuracy == 1.0


# ---------------------------------------------------------------------- requests, progress, stop


def test_sweep_requests_progress_and_stop(planted):
    d = planted_desideratum(n=20, seed=8)
    kw = {"lams": [0.01, 0.1, 10.0], "lr": 0.2, "batch_size": 4, "epochs": 1}
    ref = dcm_sweep(planted, d, **kw)
    nm = _nn(planted, "local")
    seen, got_results = [], []
    got = dcm_sweep(
        nm, d, on_progress=lambda a, b: seen.append((a, b)), on_result=got_results.append, **kw
    )
    assert isinstance(got, SweepResult) and got.complete
    for g, r in zip(got.results, ref.results, strict=True):
        assert_same(g, r)
    assert got.results == got_results  # each lambda reached on_result as it finished
    assert (got.baseline_accuracy, got.full_patch_accuracy) == (
        ref.baseline_accuracy,
        ref.full_patch_accuracy,
    )
    assert got.selected[-1] == [] and set(got.selected[0]) == set(CARRIERS)
    # one request for the source activations, then one per lambda; progress per request
    assert nm.requests == 4 and seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    # stopped after the first lambda's request: that lambda is kept, nothing else is sent
    nm.requests, seen = 0, []
    stopped = dcm_sweep(
        nm, d, on_progress=lambda a, b: seen.append(a), should_stop=lambda: len(seen) >= 2, **kw
    )
    assert not stopped.complete and nm.requests == 2 and len(stopped.results) == 1
    assert_same(stopped.results[0], ref.results[0])
    assert stopped.baseline_accuracy == ref.baseline_accuracy


def test_dcm_stop_between_requests_keeps_what_finished(planted):
    d = planted_desideratum(n=20, seed=7)
    nm = _nn(planted, "local")
    never = dcm(nm, d, should_stop=lambda: True)
    assert not never.complete and nm.requests == 0 and len(never.curve) == 0
    assert math.isnan(never.baseline_accuracy) and torch.all(never.mask == 1)
    seen = []
    half = dcm(nm, d, on_progress=lambda a, b: seen.append((a, b)), should_stop=lambda: bool(seen))
    assert seen == [(1, 2)] and nm.requests == 1 and not half.complete
    assert "stopped before training began" in half.notes and half.selected == []
    # the first request's reference accuracies are kept
    assert half.baseline_accuracy == 0.0 and half.full_patch_accuracy == 1.0


# ---------------------------------------------------------------------- failures


def _fail_on(nm, k, exc):
    def fail(n):
        if n == k:
            raise exc

    nm._fail = fail


def test_failed_request_is_one_sentence_with_the_work_so_far(planted):
    d = planted_desideratum(n=20, seed=8)
    nm = _nn(planted, "local")
    _fail_on(nm, 2, ConnectionError("connection reset by peer\nlong server traceback ..."))
    with pytest.raises(RemoteError) as info:
        dcm(nm, d, lr=0.2, batch_size=4)
    msg = str(info.value)
    assert "\n" not in msg and "ConnectionError: connection reset by peer" in msg
    partial = info.value.partial
    assert isinstance(partial, MaskResult) and not partial.complete
    assert partial.baseline_accuracy == 0.0 and msg in partial.notes

    nm = _nn(planted, "local")
    _fail_on(nm, 3, TimeoutError("no answer"))
    with pytest.raises(RemoteError, match="TimeoutError: no answer") as info:
        dcm_sweep(nm, d, lams=[0.01, 0.1, 1.0], lr=0.2, batch_size=4, epochs=1)
    partial = info.value.partial
    assert isinstance(partial, SweepResult) and not partial.complete
    assert [r.lam for r in partial.results] == [0.01] and partial.results[0].complete

    nm = _nn(planted, "local")
    _fail_on(nm, 1, OSError("server unreachable"))
    with pytest.raises(RemoteError, match="OSError: server unreachable"):
        dcm(nm, d)


def test_bad_input_is_refused_before_any_request(planted):
    d = planted_desideratum(n=20, seed=8)
    nm = _nn(planted, "local")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        dcm(nm, d, lam=-1.0)
    with pytest.raises(ValueError, match="has no position 'nowhere'"):
        dcm(nm, d, position="nowhere")
    with pytest.raises(TypeError, match="lams=\\[...\\]"):
        dcm_sweep(nm, d, lam=0.1)
    with pytest.raises(ValueError, match="head 9.0"):
        dcm(nm, d, heads=[Head(9, 0)])
    assert nm.requests == 0


def test_requests_never_reference_circuit_widgets(planted, monkeypatch):
    """What travels (the session blocks and their values) names no module of this package:
    NDIF could not import it."""
    nm = _nn(planted, "local")
    blobs = record_requests(monkeypatch, nm)
    r = dcm(nm, planted_desideratum(n=10, seed=1), lr=0.2, batch_size=4, epochs=1)
    assert r.complete and len(blobs) == 2
    assert_no_module_of_ours(blobs)


# ---------------------------------------------------------------------- widget


def test_dcm_widget_trains_on_an_nnsight_model(planted):
    from circuit_widgets.widgets import DCMWidget

    d = planted_desideratum(n=20, seed=7)
    kw = {"lams": [0.01, 0.1], "epochs": 1, "lr": 0.2, "batch_size": 4}
    nm = _nn(planted, "local")
    got, ref = DCMWidget(nm, d, **kw), DCMWidget(planted, d, **kw)
    for w in (got, ref):
        w.train()
        w.wait(60)
    assert got.status == ref.status == "done" and got.n_done == ref.n_done == 2
    assert got.summary == ref.summary and got.grid.selected == ref.grid.selected
    assert {Head(*h) for h in got.grid.selected} == set(CARRIERS)
    torch.testing.assert_close(torch.tensor(got.loss), torch.tensor(ref.loss), atol=1e-4, rtol=0)
    assert nm.requests == 3  # 1 + one per lambda


def test_session_blocks_keep_their_line_numbers_when_unparsed():
    """A session travels as ast.unparse'd source, and the local simulation finds each nested
    trace by its line in the original file: a comment, blank line or wrapped statement inside
    a session block would shift every later trace off its `with` (WithBlockNotFoundError)."""
    import ast
    import inspect

    from circuit_widgets.core import nnsight_masking

    tree = ast.parse(inspect.getsource(nnsight_masking))
    blocks = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.With)
        and any("session" in ast.unparse(item.context_expr) for item in node.items)
    ]
    assert len(blocks) == 2  # the prepare and the training requests
    for block in blocks:
        offset = "\n" * (block.body[0].lineno - 1)  # as nnsight's reduce_block pads it
        shipped = ast.parse(offset + ast.unparse(ast.Module(body=block.body, type_ignores=[])))
        want = [n.lineno for n in ast.walk(ast.Module(body=block.body, type_ignores=[]))
                if isinstance(n, ast.stmt)]  # fmt: skip
        got = [n.lineno for n in ast.walk(shipped) if isinstance(n, ast.stmt)]
        assert got == want, f"the session block at line {block.lineno} moves when unparsed"
