"""Attach to a training loop: optimizer hooks, fused per-step measurement, theory streams."""

from .tracker import Tracker, track

__all__ = ["Tracker", "track"]
