"""The patching engine: plain torch functions returning result dataclasses. No UI imports."""

from circuit_widgets.core.attribution import attribution_patch
from circuit_widgets.core.cache import clear_cache
from circuit_widgets.core.dcm import MaskResult, SweepResult, TrainingCurve, dcm, dcm_sweep
from circuit_widgets.core.edits import EditedRun, run_with_edits
from circuit_widgets.core.patching import activation_patch
from circuit_widgets.core.path_patching import path_patch
from circuit_widgets.core.results import HeadGrid

__all__ = [
    "EditedRun",
    "HeadGrid",
    "MaskResult",
    "SweepResult",
    "TrainingCurve",
    "activation_patch",
    "attribution_patch",
    "clear_cache",
    "dcm",
    "dcm_sweep",
    "path_patch",
    "run_with_edits",
]
