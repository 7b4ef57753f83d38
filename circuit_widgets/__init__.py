"""circuit_widgets: path patching, DCM and CMAP on TransformerLens models, inline in JupyterLab."""

from circuit_widgets import tasks
from circuit_widgets.core import (
    HeadGrid,
    activation_patch,
    attribution_patch,
    clear_cache,
    path_patch,
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
    "Head",
    "HeadGrid",
    "HeadGridWidget",
    "ModelLoadError",
    "Receiver",
    "Task",
    "activation_patch",
    "attribution_patch",
    "clear_cache",
    "load_model",
    "model_shape",
    "path_patch",
    "tasks",
    "tiny_model",
]
