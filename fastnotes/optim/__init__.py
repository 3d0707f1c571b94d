"""Optimisers and schedules: Amos with a fused step, and Su's strategies derived from it
(docs/amos.md)."""
from . import schedules
from .amos import Amos, default_eta

__all__ = ["Amos", "default_eta", "schedules"]
