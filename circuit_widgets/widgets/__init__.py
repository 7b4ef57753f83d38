"""JupyterLab widgets (anywidget): thin views over circuit_widgets' results and experiments."""

from circuit_widgets.widgets._base import BaseWidget, BundleMissingError, Job, JobCancelled
from circuit_widgets.widgets.head_grid import HeadGridWidget

__all__ = ["BaseWidget", "BundleMissingError", "HeadGridWidget", "Job", "JobCancelled"]
