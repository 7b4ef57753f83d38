"""The patching engine: plain torch functions returning result dataclasses. No UI imports.

activation_patch, path_patch, attribution_patch, path_attribution, cmap and cmap_grid run one
job loop (common.run_sweep) over a Backend (backends.py) that backend_for picks per model:
the exact fast engine where it applies, TransformerLens bridge hooks otherwise (or under
cache.force_hooked), nnsight requests for an nnsight-served model.
"""

from circuit_widgets.core.attribution import attribution_patch, path_attribution
from circuit_widgets.core.cache import clear_activation_cache, clear_cache
from circuit_widgets.core.cross_model import (
    CMAPResult,
    check_compatible,
    cmap,
    cmap_grid,
    cmap_logits,
)
from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline, default_stages
from circuit_widgets.core.edits import EditedRun, run_with_edits
from circuit_widgets.core.evaluation import (
    AblationResult,
    CompletenessResult,
    FaithfulnessResult,
    MinimalityResult,
    OverlapResult,
    completeness,
    faithfulness,
    head_overlap,
    mean_ablate,
    minimality,
)
from circuit_widgets.core.interventions import (
    AttentionResult,
    CopyScores,
    Intervention,
    copy_scores,
    head_attention,
    intervene,
)
from circuit_widgets.core.masking import MaskResult, SweepResult, TrainingCurve, dcm, dcm_sweep
from circuit_widgets.core.patching import activation_patch
from circuit_widgets.core.path_patching import path_patch
from circuit_widgets.core.results import HeadGrid
from circuit_widgets.types import Stage

__all__ = [
    "AblationResult",
    "AttentionResult",
    "CMAPResult",
    "CompletenessResult",
    "CopyScores",
    "EditedRun",
    "FaithfulnessResult",
    "HeadGrid",
    "Intervention",
    "MaskResult",
    "MinimalityResult",
    "OverlapResult",
    "PipelineResult",
    "Stage",
    "SweepResult",
    "TrainingCurve",
    "activation_patch",
    "attribution_patch",
    "check_compatible",
    "circuit_pipeline",
    "clear_activation_cache",
    "clear_cache",
    "cmap",
    "cmap_grid",
    "cmap_logits",
    "completeness",
    "copy_scores",
    "dcm",
    "dcm_sweep",
    "default_stages",
    "faithfulness",
    "head_attention",
    "head_overlap",
    "intervene",
    "mean_ablate",
    "minimality",
    "path_attribution",
    "path_patch",
    "run_with_edits",
]
