"""Task generators: tokenised clean/corrupt prompts with answers, key positions and a metric."""

from circuit_widgets.tasks.arithmetic import arithmetic
from circuit_widgets.tasks.base import METRICS, Task
from circuit_widgets.tasks.colored_objects import colored_objects
from circuit_widgets.tasks.desiderata import Desideratum, desiderata
from circuit_widgets.tasks.entity_tracking import entity_tracking
from circuit_widgets.tasks.ioi import ioi

__all__ = [
    "METRICS",
    "Desideratum",
    "Task",
    "arithmetic",
    "colored_objects",
    "desiderata",
    "entity_tracking",
    "ioi",
]
