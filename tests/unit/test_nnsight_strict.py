"""Every nnsight experiment under a stand-in for NDIF that, like the server, hands back only the
block's saved variables (tests/unit/nnsight_strict.py): the numbers equal the fast engine's, so
no request relies on mutating an object of the caller's (nnsight's ``remote="local"`` run does
not catch that; NDIF would return the list empty)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nnsight_strict import StrictSimulationBackend, patch_strict
from test_dcm import random_desideratum, sensitive_tiny_model

import circuit_widgets as cw
from circuit_widgets.core.edits import run_with_edits
from circuit_widgets.core.masking import dcm, dcm_sweep
from circuit_widgets.types import Circuit, CircuitGroup, Head, Receiver

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

CIRCUIT = Circuit(
    (
        CircuitGroup("a", frozenset({Head(0, 1)}), "S2"),
        CircuitGroup("b", frozenset({Head(1, 2), Head(0, 3)}), None),
    )
)
IV = {"heads": ["1.0"], "attend_to": ["S1", "IO"], "scale": {"1.0": 2.0}}


@pytest.fixture
def strict(monkeypatch):
    """remote="local" requests run under the strict backend; yields the list of what each
    request sent back (one dict of names per request)."""
    patch_strict(monkeypatch)
    StrictSimulationBackend.results.clear()
    yield StrictSimulationBackend.results
    StrictSimulationBackend.results.clear()


def _same(got, ref, path="result"):
    """Every number in ``got`` (tensors, floats, recursively through dataclasses, lists and
    dicts) within 1e-4 of ``ref``'s; notes and settings (which name the backend) are skipped."""
    if dataclasses.is_dataclass(got) and not isinstance(got, type):
        assert type(got) is type(ref), path
        for f in dataclasses.fields(got):
            if f.name not in ("notes", "settings"):
                _same(getattr(got, f.name), getattr(ref, f.name), f"{path}.{f.name}")
    elif isinstance(got, torch.Tensor):
        assert isinstance(ref, torch.Tensor) and got.shape == ref.shape, path
        if got.dtype == torch.bool or not got.is_floating_point():
            assert torch.equal(got, ref), path
        else:
            torch.testing.assert_close(
                got.float(), ref.float(), atol=1e-4, rtol=0, equal_nan=True, msg=path
            )
    elif isinstance(got, dict):
        assert set(got) == set(ref), path
        for k in got:
            _same(got[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(got, list | tuple):
        assert len(got) == len(ref), path
        for i, (g, r) in enumerate(zip(got, ref)):
            _same(g, r, f"{path}[{i}]")
    elif isinstance(got, float) and not isinstance(got, bool):
        assert got == pytest.approx(ref, abs=1e-4, nan_ok=True), path
    else:
        assert got == ref, path


def _captures(model, task, edits=False):
    keys = [(layer, s) for layer in range(2) for s in ("resid_pre", "q", "k", "v", "pattern", "z")]
    iv = cw.intervene(model, task, **IV).edits() if edits else ()
    return run_with_edits(model, task.clean_tokens, iv, capture=keys, at=task.positions["END"])


# (name, call(model, finetuned, task)): one representative call of every nnsight experiment
CASES = [
    ("activation_patch z", lambda m, f, t: cw.activation_patch(m, t, component="z")),
    (
        "activation_patch q",
        lambda m, f, t: cw.activation_patch(m, t, component="q", positions="all"),
    ),
    (
        "activation_patch k",
        lambda m, f, t: cw.activation_patch(m, t, component="k", positions=["S2"]),
    ),
    (
        "activation_patch v",
        lambda m, f, t: cw.activation_patch(m, t, component="v", direction="noise"),
    ),
    ("path_patch logits", lambda m, f, t: cw.path_patch(m, t, position="all")),
    ("path_patch q", lambda m, f, t: cw.path_patch(m, t, receivers=[Receiver(1, 1, "q")])),
    ("head_attention", lambda m, f, t: cw.head_attention(m, t, ["1.2", "0.1"], "S1")),
    ("run_with_edits capture", lambda m, f, t: _captures(m, t)),
    ("intervene edits", lambda m, f, t: _captures(m, t, edits=True)),
    ("mean_ablate", lambda m, f, t: cw.mean_ablate(m, t, CIRCUIT, means="class")),
    ("faithfulness", lambda m, f, t: cw.faithfulness(m, t, CIRCUIT, n_random=2, seed=3)),
    ("completeness", lambda m, f, t: cw.completeness(m, t, CIRCUIT, n_random=2, seed=2)),
    ("minimality", lambda m, f, t: cw.minimality(m, t, CIRCUIT)),
    ("circuit_pipeline", lambda m, f, t: cw.circuit_pipeline(m, t, top_k=2)),
    ("cmap", lambda m, f, t: cw.cmap(m, f, t, circuit=CIRCUIT, component=["q", "k"])),
    ("cmap_grid", lambda m, f, t: cw.cmap_grid(m, f, t, component="v", position="S2")),
    ("attribution_patch", lambda m, f, t: cw.attribution_patch(m, t, "z", positions="all")),
    ("path_attribution", lambda m, f, t: cw.path_attribution(m, t, freeze_mlps=True)),
]


@pytest.fixture(scope="module")
def llama_pair(tiny_llama):
    ft = cw.tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=1)
    return tiny_llama, ft, cw.tasks.ioi(tiny_llama, 6)


@pytest.mark.parametrize("name,call", CASES, ids=[c[0] for c in CASES])
def test_experiment_under_strict_backend_equals_fast_engine(strict, llama_pair, name, call):
    base, ft, task = llama_pair
    ref = call(base, ft, task)
    nb = cw.load_model(base, backend="nnsight", remote="local")
    nf = cw.load_model(ft, backend="nnsight", remote="local")
    got = call(nb, nf, task)
    _same(got, ref)
    # every request went through the strict backend and sent something back
    assert len(strict) == nb.requests + nf.requests >= 1
    assert all(strict), f"a request returned nothing: {strict}"


@pytest.mark.parametrize("sweep", [False, True], ids=["dcm", "dcm_sweep"])
def test_dcm_under_strict_backend_equals_fast_engine(strict, sweep):
    model = sensitive_tiny_model("llama")
    d = random_desideratum(model, n=12, seed=2)
    kw = {"position": "mid", "lr": 0.25, "epochs": 1, "batch_size": 6, "seed": 3}
    if sweep:
        ref, nm = dcm_sweep(model, d, lams=[0.0, 0.1], **kw), None
        nm = cw.load_model(model, backend="nnsight", remote="local")
        got = dcm_sweep(nm, d, lams=[0.0, 0.1], **kw)
    else:
        ref = dcm(model, d, lam=0.0, **kw)
        nm = cw.load_model(model, backend="nnsight", remote="local")
        got = dcm(nm, d, lam=0.0, **kw)
    _same(got, ref)
    assert len(strict) == nm.requests >= 2 and all(strict)


# ---------------------------------------------------------------------- the backend itself


def _collect(lm, backend, tokens):
    """A request in the shape the bug had: results appended to a list made before the block,
    one variable left unsaved, one saved."""
    out = []
    unsaved = None
    with torch.no_grad(), lm.trace(tokens, backend=backend):
        out.append(lm.model.layers[0].output.save())
        unsaved = lm.output.logits.sum()
        kept = lm.output.logits.save()
    return out, unsaved, kept


def test_strict_backend_returns_only_saved_variables(tiny_llama):
    """nnsight's local simulation fills a list made outside the block; the strict backend,
    like NDIF, returns only the saved variables, as copies."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    tokens = torch.tensor([[1, 5, 9, 3]])
    out, unsaved, kept = _collect(nm.lm, LocalSimulationBackend(nm.lm), tokens)
    assert len(out) == 1 and unsaved is None  # the simulation leaks the list's appends
    StrictSimulationBackend.results.clear()
    s_out, s_unsaved, s_kept = _collect(nm.lm, StrictSimulationBackend(nm.lm), tokens)
    assert s_out == [] and s_unsaved is None
    assert StrictSimulationBackend.results == [{"kept": s_kept}]
    torch.testing.assert_close(s_kept, kept)
    StrictSimulationBackend.results.clear()


def _imports_ours(lm):
    with torch.no_grad(), lm.trace(torch.tensor([[1, 2]]), backend=StrictSimulationBackend(lm)):
        import circuit_widgets.core.forward  # noqa: F401 - fails: NDIF has no such package

        kept = lm.output.logits.save()
    return kept


def test_strict_backend_runs_the_block_without_circuit_widgets(tiny_llama):
    """As on NDIF, where this package is not installed, a block that imports it fails."""
    nm = cw.load_model(tiny_llama, backend="nnsight", remote="local")
    with pytest.raises(ModuleNotFoundError, match="circuit_widgets"):
        _imports_ours(nm.lm)
    import circuit_widgets.core.forward  # noqa: F401 - importable again afterwards


# ---------------------------------------------------------------------- every request's shape

REQUEST_MODULES = ("nnsight_backend", "nnsight_experiments", "nnsight_masking")


def _request_blocks():
    """(function, with-node) of every request block (a with whose context passes a backend)."""
    import ast
    import importlib
    import inspect

    for name in REQUEST_MODULES:
        mod = importlib.import_module(f"circuit_widgets.core.{name}")
        tree = ast.parse(inspect.getsource(mod))
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.With) and any(
                        kw.arg == "backend"
                        for item in node.items
                        for call in ast.walk(item.context_expr)
                        if isinstance(call, ast.Call)
                        for kw in call.keywords
                    ):
                        yield f"{name}.{fn.name}", fn, node


def test_every_request_returns_only_variables_bound_to_saved_values():
    """Statically, for paths the tests above may not reach: no request block mutates an object
    made outside it (on NDIF that object is the server's copy), and every variable the block
    binds and the function reads afterwards is bound to ``save(...)`` or ``....save()``."""
    import ast

    mutators = {"append", "extend", "update", "setdefault", "insert", "pop", "add"}
    blocks = list(_request_blocks())
    assert len(blocks) >= 12  # every request function of the three modules
    for where, fn, block in blocks:
        stores = [n for n in ast.walk(block) if isinstance(n, ast.Name)]
        bound = {n.id for n in stores if isinstance(n.ctx, ast.Store)}
        for n in ast.walk(block):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                target = n.func.value
                if isinstance(target, ast.Name) and n.func.attr in mutators:
                    assert target.id in bound, f"{where} mutates {target.id!r} made outside it"
            if isinstance(n, ast.Assign | ast.AugAssign):
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                        assert t.value.id in bound, f"{where} writes into {t.value.id!r}"
        after = [
            n
            for n in ast.walk(fn)
            if isinstance(n, ast.Name) and n.lineno > (block.end_lineno or 0)
        ]
        rebound = {n.id for n in after if isinstance(n.ctx, ast.Store)}
        read_after = {n.id for n in after if isinstance(n.ctx, ast.Load)} - rebound
        for name in bound & read_after:
            values = [
                a.value
                for a in ast.walk(block)
                if isinstance(a, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == name for t in a.targets)
            ]
            assert values, f"{where}: {name!r} is bound in the block only by a loop or with"
            for v in values:
                saved = isinstance(v, ast.Call) and (
                    isinstance(v.func, ast.Name)
                    and v.func.id == "save"
                    or isinstance(v.func, ast.Attribute)
                    and v.func.attr == "save"
                )
                assert saved, f"{where}: {name!r} is read after the block but not saved"
