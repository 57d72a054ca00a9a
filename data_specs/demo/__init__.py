"""The embedded demo world: synthetic tasks, a gold oracle and a simulated annotator."""
from .annotator import SimulatedAnnotator
from .oracle import Oracle
from .world import DemoWorld

__all__ = ["DemoWorld", "Oracle", "SimulatedAnnotator"]
