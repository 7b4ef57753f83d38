"""circuit_widgets: path patching, DCM and CMAP on TransformerLens models, inline in JupyterLab."""

from circuit_widgets import studies, tasks
from circuit_widgets.core import (
    AblationResult,
    AttentionResult,
    CMAPResult,
    CompletenessResult,
    EditedRun,
    FaithfulnessResult,
    HeadGrid,
    Intervention,
    MaskResult,
    MinimalityResult,
    OverlapResult,
    PipelineResult,
    Stage,
    SweepResult,
    activation_patch,
    attribution_patch,
    check_compatible,
    circuit_pipeline,
    clear_activation_cache,
    clear_cache,
    cmap,
    cmap_grid,
    completeness,
    copy_scores,
    dcm,
    dcm_sweep,
    default_stages,
    faithfulness,
    head_attention,
    head_overlap,
    intervene,
    mean_ablate,
    minimality,
    path_attribution,
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
_WIDGETS = (
    "AttentionWidget",
    "CMAPWidget",
    "CircuitExplorer",
    "DCMWidget",
    "HeadGridWidget",
    "PathPatchingWidget",
)


def __getattr__(name: str):
    if name in _WIDGETS or name == "widgets":
        import importlib

        widgets = importlib.import_module("circuit_widgets.widgets")
        return widgets if name == "widgets" else getattr(widgets, name)
    raise AttributeError(f"module 'circuit_widgets' has no attribute {name!r}")


__all__ = [
    "AblationResult",
    "AttentionResult",
    "AttentionWidget",
    "CMAPResult",
    "CMAPWidget",
    "Circuit",
    "CircuitExplorer",
    "CircuitGroup",
    "CompletenessResult",
    "Component",
    "DCMWidget",
    "Direction",
    "EditedRun",
    "FaithfulnessResult",
    "Head",
    "HeadGrid",
    "HeadGridWidget",
    "Intervention",
    "MaskResult",
    "MinimalityResult",
    "ModelLoadError",
    "OverlapResult",
    "PathPatchingWidget",
    "PipelineResult",
    "Receiver",
    "Stage",
    "SweepResult",
    "Task",
    "activation_patch",
    "attribution_patch",
    "check_compatible",
    "circuit_pipeline",
    "clear_activation_cache",
    "clear_cache",
    "cmap",
    "cmap_grid",
    "completeness",
    "copy_scores",
    "dcm",
    "dcm_sweep",
    "default_stages",
    "faithfulness",
    "head_attention",
    "head_overlap",
    "intervene",
    "load_model",
    "mean_ablate",
    "minimality",
    "model_shape",
    "path_attribution",
    "path_patch",
    "run_with_edits",
    "studies",
    "tasks",
    "tiny_model",
]
