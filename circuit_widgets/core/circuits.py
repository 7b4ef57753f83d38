"""Old home of circuit evaluation and discovery, kept so existing imports work: evaluation
lives in ``core/evaluation.py``, discovery in ``core/discovery.py``."""

from circuit_widgets.core.discovery import PipelineResult, circuit_pipeline, default_stages
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
    random_circuit_like,
)
from circuit_widgets.types import Stage

__all__ = [
    "AblationResult",
    "CompletenessResult",
    "FaithfulnessResult",
    "MinimalityResult",
    "OverlapResult",
    "PipelineResult",
    "Stage",
    "circuit_pipeline",
    "completeness",
    "default_stages",
    "faithfulness",
    "head_overlap",
    "mean_ablate",
    "minimality",
    "random_circuit_like",
]
