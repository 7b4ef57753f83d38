"""The replication report: every study run on one model, written as one HTML page
(``python -m circuit_widgets.report --out DIR``) with results.json and the figures as PNGs."""

from circuit_widgets.report.build import (
    DEFAULT_SIZES,
    QUICK_SIZES,
    STUDIES,
    EntitySizes,
    FinetuneSizes,
    IOISizes,
    Report,
    ReuseSizes,
    StudyRun,
    build_report,
)
from circuit_widgets.report.cli import main

__all__ = [
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "STUDIES",
    "EntitySizes",
    "FinetuneSizes",
    "IOISizes",
    "Report",
    "ReuseSizes",
    "StudyRun",
    "build_report",
    "main",
]
