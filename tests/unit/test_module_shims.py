"""Modules that moved keep their old import paths: the old module re-exports the very same
objects, so code (and pickles) written against the old layout keeps working."""

from __future__ import annotations

import importlib

import pytest

SHIMS = [
    ("circuit_widgets.core.circuits", "circuit_widgets.core.evaluation"),
    ("circuit_widgets.core.circuits", "circuit_widgets.core.discovery"),
]


@pytest.mark.parametrize(("old", "new"), SHIMS)
def test_old_module_re_exports_the_moved_names(old, new):
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    moved = [
        n for n in old_mod.__all__ if getattr(getattr(new_mod, n, None), "__module__", None) == new
    ]
    assert moved, f"{old} re-exports nothing from {new}"
    for name in moved:
        assert getattr(old_mod, name) is getattr(new_mod, name)


def test_widget_base_re_exports_the_model_lock():
    from circuit_widgets.widgets import _base, _model_lock

    for name in ("using", "ModelHold", "_MODEL_LOCKS"):
        assert getattr(_base, name) is getattr(_model_lock, name)


def test_models_package_keeps_every_public_name():
    from circuit_widgets import models
    from circuit_widgets.types import ModelShape

    assert models.ModelShape is ModelShape
    for name in models.__all__:
        assert getattr(models, name) is not None
    # The shipped adapters are found from the package's data folder, not from models/.
    assert (models.DEMO_ARITH_ADAPTER / "adapter_config.json").is_file()
    assert (models.DEMO_BOXES_ADAPTER / "adapter_config.json").is_file()
