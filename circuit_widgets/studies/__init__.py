"""End-to-end studies: each runs one paper's experiment on any model and returns one result."""

from circuit_widgets.studies.entity_tracking import EntityTrackingResult, entity_tracking_study
from circuit_widgets.studies.finetuning import FinetuningResult, finetuning_study
from circuit_widgets.studies.ioi import IOIResult, ioi_study
from circuit_widgets.studies.reuse import ReuseResult, circuit_reuse

__all__ = [
    "EntityTrackingResult",
    "FinetuningResult",
    "IOIResult",
    "ReuseResult",
    "circuit_reuse",
    "entity_tracking_study",
    "finetuning_study",
    "ioi_study",
]
