"""Symmetry discovery: which parameter groups of a model carry a translation, scale or rescale
symmetry (docs/theory.md §2, §2b), read from the model's real dataflow.

- ``trace.py``: records the op-level dataflow of one forward pass (meta device first).
- ``graph.py``: the graph of values and calls.
- ``rewrite.py``: hand-written RMSNorm / LayerNorm chains folded into one norm call.
- ``labels.py``: where each unit of a layer lies in a later tensor (compressed label tensors).
- ``propagate.py``: follows perturbations of layers' units to where they are absorbed.
- ``discover.py``: ``find_symmetries``, the groups from the absorbed perturbations.
- ``groups.py``: ``SymmetryGroup``, ``Symmetries``, ``declare`` (groups by hand, validated).
"""

from .discover import find_symmetries
from .groups import Symmetries, SymmetryGroup, check_index, declare

__all__ = ["SymmetryGroup", "Symmetries", "find_symmetries", "declare", "check_index"]
