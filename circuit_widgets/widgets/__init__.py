"""JupyterLab widgets (anywidget): thin views over circuit_widgets' results and experiments."""

from circuit_widgets.widgets._base import BaseWidget, BundleMissingError, Job, JobCancelled
from circuit_widgets.widgets.attention import AttentionWidget
from circuit_widgets.widgets.cmap import CMAPWidget
from circuit_widgets.widgets.dcm import DCMWidget
from circuit_widgets.widgets.explorer import CircuitExplorer
from circuit_widgets.widgets.head_grid import HeadGridWidget
from circuit_widgets.widgets.path_patching import PathPatchingWidget

__all__ = [
    "AttentionWidget",
    "BaseWidget",
    "BundleMissingError",
    "CMAPWidget",
    "CircuitExplorer",
    "DCMWidget",
    "HeadGridWidget",
    "Job",
    "JobCancelled",
    "PathPatchingWidget",
]
