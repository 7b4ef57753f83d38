"""Wrong kinds of arguments to the public entry points: a message saying what was expected and
what came (issue 15, item 6), never a Python internals message."""

from __future__ import annotations

import pytest

import circuit_widgets as cw
from circuit_widgets.core.checks import check_model
from circuit_widgets.widgets import (
    AttentionWidget,
    CircuitExplorer,
    CMAPWidget,
    DCMWidget,
    HeadGridWidget,
    PathPatchingWidget,
)

LOAD_HINT = 'cw.load_model("demo")'


@pytest.fixture(scope="module")
def task(tiny_llama):
    return cw.tasks.ioi(tiny_llama, n=4, seed=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: cw.activation_patch("demo", t),
        lambda t: cw.path_patch("demo", t),
        lambda t: cw.attribution_patch("demo", t),
        lambda t: cw.path_attribution("demo", t),
        lambda t: cw.mean_ablate("demo", t, cw.Circuit()),
        lambda t: cw.circuit_pipeline("demo", t),
        lambda t: cw.head_attention("demo", t, ["0.0"], to="IO"),
        lambda t: PathPatchingWidget("demo", t),
        lambda t: AttentionWidget("demo", t, ["0.0"]),
        lambda t: CircuitExplorer("demo", t),
    ],
)
def test_a_model_name_instead_of_a_model_suggests_load_model(task, call):
    with pytest.raises(TypeError, match="model must be a loaded model, got the string 'demo'") as e:
        call(task)
    assert LOAD_HINT in str(e.value)


def test_cmap_and_dcm_name_the_argument(tiny_llama, task):
    with pytest.raises(TypeError, match=r"cmap: finetuned must be a loaded model.*'demo-arith'"):
        cw.cmap(tiny_llama, "demo-arith", task, circuit=["0.0"])
    with pytest.raises(TypeError, match=r"CMAPWidget: base must be a loaded model"):
        CMAPWidget("demo", tiny_llama, task, ["0.0"])
    with pytest.raises(TypeError, match=r"dcm: model must be a loaded model"):
        cw.dcm("demo", object())


def test_a_task_name_instead_of_a_task_says_how_to_make_one(tiny_llama):
    msg = r"AttentionWidget: task must be a Task \(make it first: task = cw.tasks.ioi\(model, n=32\)\), got the str 'ioi'"
    with pytest.raises(TypeError, match=msg):
        AttentionWidget(tiny_llama, "ioi")
    with pytest.raises(TypeError, match=r"activation_patch: task must be a Task .*got the int 3"):
        cw.activation_patch(tiny_llama, 3)


def test_desideratum_checks(tiny_llama, task):
    des = cw.tasks.desiderata(tiny_llama, 8, seed=0, n_boxes=3)
    with pytest.raises(
        TypeError, match=r"DCMWidget: desideratum must be a Desideratum \(pick one entry"
    ):
        DCMWidget(tiny_llama, des)
    with pytest.raises(
        TypeError, match=r"DCMWidget: desideratum must be a Desideratum .*got a Task"
    ):
        DCMWidget(tiny_llama, task)
    with pytest.raises(TypeError, match=r"a Desideratum is for cw.dcm / DCMWidget"):
        cw.activation_patch(tiny_llama, des["positional"])


def test_head_grid_of_a_string_says_what_it_takes():
    with pytest.raises(
        TypeError,
        match=r"HeadGridWidget: result must be a HeadGrid \(e.g. cw.activation_patch\(model, task\)\) or a "
        r"\[n_layers, n_heads\] tensor or array, got the str 'not a grid'",
    ):
        HeadGridWidget("not a grid")
    HeadGridWidget([[1.0, 2.0], [3.0, 4.0]])  # nested lists still work


def test_check_model_is_duck_typed():
    """Any object with the model protocol passes (e.g. another backend's model): a cfg with the
    sizes and a tokenizer."""

    class Cfg:
        n_layers, n_heads = 2, 4

    class Other:
        cfg, tokenizer = Cfg(), object()

    check_model(Other(), "f")
    with pytest.raises(TypeError, match=r"f: model must be a loaded model .*got the int 3"):
        check_model(3, "f")
