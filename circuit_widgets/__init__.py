"""circuit_widgets: path patching, DCM and CMAP on TransformerLens models, inline in JupyterLab."""

from circuit_widgets import tasks
from circuit_widgets.core import (
    EditedRun,
    HeadGrid,
    MaskResult,
    SweepResult,
    activation_patch,
    attribution_patch,
    clear_cache,
    dcm,
    dcm_sweep,
    path_patch,
    run_with_edits,
)
from circuit_widgets.models import ModelLoadError, load_model, model_shape, tiny_model
from circuit_widgets.tasks import Task
from circuit_widgets.types import (
    Circuit,
    CircuitGroup,
    Component,
    Direction,
    Head,
    Receiver,
)

__version__ = "0.1.0"

# Widgets need the [widgets] extra (anywidget, ipywidgets); import them only when asked.
_WIDGETS = ("HeadGridWidget",)


def __getattr__(name: str):
    if name in _WIDGETS or name == "widgets":
        import importlib

        widgets = importlib.import_module("circuit_widgets.widgets")
        return widgets if name == "widgets" else getattr(widgets, name)
    raise AttributeError(f"module 'circuit_widgets' has no attribute {name!r}")


__all__ = [
    "Circuit",
    "CircuitGroup",
    "Component",
    "Direction",
    "EditedRun",
    "Head",
    "HeadGrid",
    "HeadGridWidget",
    "MaskResult",
    "ModelLoadError",
    "Receiver",
    "SweepResult",
    "Task",
    "activation_patch",
    "attribution_patch",
    "clear_cache",
    "dcm",
    "dcm_sweep",
    "load_model",
    "model_shape",
    "path_patch",
    "run_with_edits",
    "tasks",
    "tiny_model",
]
