"""End-to-end studies: each runs one paper's experiment on any model and returns one result."""

from circuit_widgets.studies.reuse import ReuseResult, circuit_reuse

__all__ = ["ReuseResult", "circuit_reuse"]
