"""Experiments built from others run on an nnsight model through the same code as on a local
one: completeness and minimality (every circuit they need scored in one batch of requests) and
the circuit-discovery pipeline (path patching stage by stage) give the fast engine's numbers."""

from __future__ import annotations

import pytest
import torch
from nnsight_strict import assert_no_module_of_ours, record_requests

import circuit_widgets as cw
from circuit_widgets.types import Circuit, CircuitGroup, Head

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CIRCUIT = Circuit(
    (
        CircuitGroup("a", frozenset({Head(0, 1)}), "S2"),
        CircuitGroup("b", frozenset({Head(1, 2), Head(0, 3)}), None),
    )
)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def model_task(request, tiny_gpt2, tiny_llama, tiny_gemma3):
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3}[request.param]
    return base, cw.tasks.ioi(base, 6)


def _close(a, b):
    """Within 1e-4 and within 1% of the reference's scale (random tiny models' effects are
    small, so 1e-4 alone could not tell a missing ablation from a right one)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0, equal_nan=True)
    scale = float(b.nan_to_num().abs().max())
    assert float((a - b).nan_to_num().abs().max()) <= 0.01 * scale + 1e-7


def test_completeness_equals_fast_engine_in_two_requests(model_task):
    base, task = model_task
    ref = cw.completeness(base, task, CIRCUIT, n_random=5, seed=2)
    nm = cw.load_model(base, backend="nnsight", remote="local")
    got = cw.completeness(nm, task, CIRCUIT, n_random=5, seed=2)
    assert got.labels == ref.labels and got.subsets == ref.subsets
    for name in ("f_circuit", "f_model", "scores"):
        _close(getattr(got, name), getattr(ref, name))
    _close(got.full_metric, ref.full_metric)
    # the knock-outs change something (a test that cannot tell a missing ablation apart)
    assert max(abs(a - b) for a, b in zip(ref.f_circuit, ref.f_model)) > 1e-3
    # one request for the means, one scoring every circuit (<= 17 circuits x 6 rows <= 512)
    assert nm.requests == 2
    assert got.notes[0].endswith("2 request(s): 1 for the means, 1 scoring")


def test_minimality_equals_fast_engine_in_two_requests(model_task):
    base, task = model_task
    ref = cw.minimality(base, task, CIRCUIT)
    nm = cw.load_model(base, backend="nnsight", remote="local")
    got = cw.minimality(nm, task, CIRCUIT)
    assert got.heads == ref.heads and got.best_k == ref.best_k
    _close(got.scores, ref.scores)
    _close(got.circuit_metric, ref.circuit_metric)
    _close(got.full_metric, ref.full_metric)
    for g, r in zip(got.all_scores, ref.all_scores):
        assert list(g) == list(r)
        _close(list(g.values()), list(r.values()))
    assert max(ref.scores) > 5e-4
    assert nm.requests == 2 and "1 for the means, 1 scoring" in got.notes[0]


def test_minimality_in_process_and_batched_requests(tiny_llama):
    task = cw.tasks.ioi(tiny_llama, 6)
    ref = cw.minimality(tiny_llama, task, CIRCUIT, k_sets="empty")
    nm = cw.load_model(tiny_llama, backend="nnsight", remote=False)
    got = cw.minimality(nm, task, CIRCUIT, k_sets="empty", batch_size=4)
    _close(got.scores, ref.scores)
    # chunks of 4 and 2 examples: a means request and a scoring request each
    assert nm.requests == 4 and "2 for the means, 2 scoring" in got.notes[0]


def test_circuit_pipeline_equals_fast_engine_and_counts_requests(model_task):
    base, task = model_task
    ref = cw.circuit_pipeline(base, task, top_k=2)
    nm = cw.load_model(base, backend="nnsight", remote="local")
    seen = []
    got = cw.circuit_pipeline(nm, task, top_k=2, on_progress=lambda d, t: seen.append((d, t)))
    assert got.complete and got.circuit.groups == ref.circuit.groups
    assert list(got.grids) == list(ref.grids)
    for name, grid in ref.grids.items():
        _close(got.grids[name].values, grid.values)
    assert seen[-1][0] == seen[-1][1]
    note = got.notes[-1]
    assert note == f"nnsight (NDIF local simulation): {nm.requests} request(s) for 2 stage(s)"
    # each stage's grid is at most one request per sender layer (2 layers)
    assert 2 <= nm.requests <= 4


def test_circuit_pipeline_stop_on_nnsight_keeps_the_finished_stage(tiny_gpt2):
    task = cw.tasks.ioi(tiny_gpt2, 6)
    nm = cw.load_model(tiny_gpt2, backend="nnsight", remote="local")
    first_done = []  # progress reaches 1000 of 3000 once the first stage is picked

    got = cw.circuit_pipeline(
        nm,
        task,
        top_k=2,
        on_progress=lambda d, t: first_done.append(d >= 1000),
        should_stop=lambda: any(first_done),
    )
    assert not got.complete and list(got.grids) == ["movers"] and got.grids["movers"].complete
    assert [g.name for g in got.circuit.groups] == ["movers"]
    assert len(got.circuit.groups[0].heads) == 2


# ---------------------------------------------------------------------- intervene's edits

INTERVENTIONS = [
    {"heads": ["1.1", "1.3"], "attend_to": "S1"},
    {"heads": ["0.2"], "scale": 0.0},
    {"heads": ["0.1", "1.2"], "replace_with": "corrupt"},
    {"heads": ["1.0"], "attend_to": ["S1", "IO"], "scale": {"1.0": 2.0}},
]


@pytest.mark.parametrize("remote", [False, "local"])
@pytest.mark.parametrize("args", INTERVENTIONS, ids=["attend", "scale", "replace", "both"])
def test_intervention_edits_run_in_one_request(model_task, args, remote):
    """Intervene's edits travel as tensors: the edited logits and the captured z and pattern
    (the edited rows included) equal the local model's."""
    from circuit_widgets.core.edits import run_with_edits

    base, task = model_task
    nm = cw.load_model(base, backend="nnsight", remote=remote)
    local, served = cw.intervene(base, task, **args), cw.intervene(nm, task, **args)
    nm.requests = 0  # replace_with captured the corrupt run's z already
    keys = [(1, "pattern"), (0, "z"), (1, "z"), (1, "v")]
    end = task.positions["END"]
    ref = run_with_edits(base, task.clean_tokens, local.edits(), capture=keys, at=end)
    got = run_with_edits(nm, task.clean_tokens, served.edits(), capture=keys, at=end)
    plain = run_with_edits(base, task.clean_tokens, at=end)
    assert float((plain.logits - ref.logits).abs().max()) > 1e-3  # the edit does something
    _close(got.logits, ref.logits)
    for key in keys:
        _close(got.captured[key], ref.captured[key])
    assert nm.requests == 1
    # a subset of the prompts, in another order, gets each example's own edit
    rows = torch.tensor([3, 0, 2])
    with local:  # the with-block matches rows to examples; edits() alone takes the whole task
        sub_ref = run_with_edits(base, task.clean_tokens[rows], at=end[rows])
    sub = run_with_edits(nm, task.clean_tokens[rows], served.edits(), at=end[rows])
    _close(sub.logits, sub_ref.logits)


def test_edits_as_python_functions_are_refused_on_nnsight(tiny_llama):
    from circuit_widgets.core.edits import run_with_edits

    task = cw.tasks.ioi(tiny_llama, 2)
    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    with pytest.raises(NotImplementedError, match="written as Python functions"):
        run_with_edits(nm, task.clean_tokens, {(0, "z"): lambda z: z * 0})
    assert nm.requests == 0


# ---------------------------------------------------------------------- the studies


def test_studies_on_nnsight_equal_the_local_model(tiny_llama):
    """Every study runs on an nnsight model and reports what the local model gives."""
    from circuit_widgets.studies import circuit_reuse, entity_tracking_study, ioi_study

    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    kw = {"n": 6, "n_eval": 6, "n_controls": 2, "n_random": 1}
    ref, got = circuit_reuse(tiny_llama, **kw), circuit_reuse(nm, **kw)
    assert got.ioi.circuit == ref.ioi.circuit and got.colored.circuit == ref.colored.circuit
    iv_ref, iv_got = ref.intervention, got.intervention
    assert iv_got.heads == iv_ref.heads
    _close(
        [iv_got.accuracy_after, iv_got.logit_diff_after, *iv_got.random_after],
        [iv_ref.accuracy_after, iv_ref.logit_diff_after, *iv_ref.random_after],
    )
    ref_i, got_i = ioi_study(tiny_llama, n=6), ioi_study(nm, n=6)
    assert got_i.pipeline is not None and ref_i.pipeline is not None
    assert got_i.pipeline.circuit == ref_i.pipeline.circuit
    _close(got_i.per_example_logit_diff, ref_i.per_example_logit_diff)
    et = {"n": 4, "n_boxes": 2, "top_k": 2, "n_random": 1, "dcm_examples": 6, "dcm_epochs": 1}
    ref_e, got_e = entity_tracking_study(tiny_llama, **et), entity_tracking_study(nm, **et)
    assert got_e.pipeline.circuit == ref_e.pipeline.circuit
    assert list(got_e.dcm) == list(ref_e.dcm) and got_e.dcm
    for group, per in ref_e.dcm.items():
        for kind, mask in per.items():
            _close(got_e.dcm[group][kind].final_mask, mask.final_mask)
    assert got_e.faithfulness is not None and ref_e.faithfulness is not None
    _close(got_e.faithfulness.circuit_metric, ref_e.faithfulness.circuit_metric)


def test_new_requests_never_reference_circuit_widgets(tiny_llama, monkeypatch):
    """What the server would receive for an edited run and a completeness test names only the
    nnsight_* modules' source files (for line numbers), never a module NDIF would import."""
    from circuit_widgets.core.edits import run_with_edits

    task = cw.tasks.ioi(tiny_llama, 4)
    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    blobs = record_requests(monkeypatch, nm)
    iv = cw.intervene(nm, task, heads=["1.1"], attend_to="S1", replace_with="corrupt")
    run_with_edits(nm, task.clean_tokens, iv.edits(), capture=[(1, "pattern")])
    cw.completeness(nm, task, CIRCUIT, n_random=1)
    assert len(blobs) == 4  # replace_with's capture, the edited run, means, scoring
    assert_no_module_of_ours(blobs)


# ---------------------------------------------------------------------- widgets


def test_explorer_runs_every_tab_on_nnsight_models(tiny_llama):
    """The explorer's path-patching, attention, DCM and CMAP tabs on nnsight models show what
    they show on the local ones."""
    from circuit_widgets.tasks import desiderata
    from circuit_widgets.widgets import CircuitExplorer

    tuned = cw.tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=1)
    task = cw.tasks.ioi(tiny_llama, 4)
    des = desiderata(tiny_llama, 6, seed=0, n_boxes=2)["positional"]
    nb = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    nt = cw.load_model(tuned, backend="nnsight", remote="local")
    kw = {"circuit": ["1.1", "0.2"], "desideratum": des, "dcm_lams": [0.01]}
    got = CircuitExplorer(nb, task, finetuned=nt, **kw)
    ref = CircuitExplorer(tiny_llama, task, finetuned=tuned, **kw)
    assert got.tab_names == ref.tab_names == ["Path patching", "Attention", "DCM", "CMAP"]
    for ex in (got, ref):
        for tab in (ex.path_patching, ex.dcm, ex.cmap):
            tab.run() if hasattr(tab, "run") else tab.train()
            tab.wait(120)
            assert tab.status == "done", (tab, tab.status)
    _close(torch.tensor(got.path_patching.grid.values), torch.tensor(ref.path_patching.grid.values))
    _close(torch.tensor(got.dcm.grid.values), torch.tensor(ref.dcm.grid.values))
    for tab in (got.path_patching, got.dcm, got.cmap):  # every cell computed, none NaN
        assert torch.isfinite(torch.tensor(tab.grid.values)).all(), tab
    _close(torch.tensor(got.cmap.grid.values), torch.tensor(ref.cmap.grid.values))
    assert got.circuit == ref.circuit and got.attention.heads == ref.attention.heads
    assert nb.requests > 0 and nt.requests > 0


def test_local_simulation_does_not_break_imports_in_other_threads(tiny_llama, monkeypatch):
    """NDIF's local simulation hides this package from sys.modules while it reads a request
    back; an import in another thread (a widget's worker, the next cell) then waits for the
    window to close instead of failing with ModuleNotFoundError."""
    import sys
    import threading

    from nnsight.schema.request import RequestModel

    task = cw.tasks.ioi(tiny_llama, 2)
    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    hidden, trying = threading.Event(), threading.Event()
    outcome = []
    real = RequestModel.deserialize

    def slow_deserialize(*args, **kwargs):
        hidden.set()  # the package is out of sys.modules now
        trying.wait(10)
        threading.Event().wait(0.3)  # time for the other thread's import to reach the lock
        return real(*args, **kwargs)

    def importer():
        hidden.wait(10)
        was_hidden = "circuit_widgets.studies.reuse" not in sys.modules
        trying.set()
        try:
            from circuit_widgets.studies import reuse

            outcome.append((was_hidden, reuse.__name__))
        except ImportError as exc:
            outcome.append((was_hidden, repr(exc)))

    monkeypatch.setattr(RequestModel, "deserialize", staticmethod(slow_deserialize))
    thread = threading.Thread(target=importer)
    thread.start()
    cw.head_attention(nm, task, ["1.1"], "S1")
    thread.join(20)
    assert outcome == [(True, "circuit_widgets.studies.reuse")]


def test_path_patch_with_no_senders_on_nnsight(tiny_llama):
    """An empty sender list gives what the local engines give: an empty, complete grid with
    the two plain runs' metrics (one request), not an IndexError."""
    from circuit_widgets.types import Receiver

    task = cw.tasks.ioi(tiny_llama, 4)
    for receivers in ("logits", [Receiver(1, 2, "q")]):
        ref = cw.path_patch(tiny_llama, task, senders=[], receivers=receivers)
        nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
        got = cw.path_patch(nm, task, senders=[], receivers=receivers)
        assert got.complete and ref.complete and not got.done.any()
        _close(got.metric_clean, ref.metric_clean)
        _close(got.metric_corrupt, ref.metric_corrupt)
        assert nm.requests == 1


def test_nnsight_dcm_freezes_the_weights_while_it_trains(tiny_llama):
    """As on a local model: no weight keeps requires_grad during the requests (autograd would
    otherwise keep every layer's input for gradients nobody asks for); restored after."""
    from circuit_widgets.tasks import desiderata

    des = desiderata(tiny_llama, 6, seed=0, n_boxes=2)["positional"]
    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    params = list(nm.lm._module.parameters())
    before = [p.requires_grad for p in params]  # a shared fixture: put back as found
    for p in params:
        p.requires_grad_(True)
    seen = []
    cw.dcm(
        nm,
        des,
        epochs=1,
        on_progress=lambda d, t: seen.append(any(p.requires_grad for p in params)),
    )
    assert seen == [False, False]
    assert all(p.requires_grad for p in params)
    for p, flag in zip(params, before):
        p.requires_grad_(flag)
