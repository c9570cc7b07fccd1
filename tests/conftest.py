"""Shared test set-up: this folder on sys.path, so that ``from helpers import ...`` (the data,
models and training loop that several test files share, tests/helpers.py) works under every
pytest import mode, ``--import-mode=importlib`` included."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
