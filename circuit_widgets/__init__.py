"""circuit_widgets: path patching, DCM and CMAP on TransformerLens models, inline in JupyterLab."""

from circuit_widgets.models import ModelLoadError, load_model, model_shape, tiny_model
from circuit_widgets.types import Component, Direction, Head, Receiver

__version__ = "0.1.0"

__all__ = [
    "Component",
    "Direction",
    "Head",
    "ModelLoadError",
    "Receiver",
    "load_model",
    "model_shape",
    "tiny_model",
]
