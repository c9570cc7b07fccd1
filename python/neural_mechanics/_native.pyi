"""The private native module (Rust, pyo3). Use the Python API of neural_mechanics instead."""

from collections.abc import Sequence
from os import PathLike
from typing import Any, TypeAlias, final

import numpy as np
import numpy.typing as npt

_F64: TypeAlias = npt.NDArray[np.float64]

__all__ = [
    "DTYPE_CODES",
    "MAX_EMPTY_GROUPS",
    "MAX_THREADS",
    "RUN_FORMAT_VERSION",
    "RunWriter",
    "SUM_NAMES",
    "THEORY_CRITICAL_TOL",
    "THEORY_KINDS",
    "THEORY_MAX_UNBACKED_VALUES",
    "TheoryLedgerStream",
    "TheoryPaperStream",
    "COLUMN_FIELDS",
    "ROW_FIELDS",
    "TrackerCore",
    "__version__",
    "get_num_threads",
    "group_stats_batch",
    "group_stats_ptrs",
    "layout",
    "reduce_ptrs",
    "reduce_adam_ptrs",
    "load_run",
    "read_pass",
    "save_run",
    "set_num_threads",
    "theory_equilibrium_adamw",
    "theory_equilibrium_sgd",
    "theory_ledger",
    "theory_ledger_measured",
    "theory_paper",
    "theory_regime",
    "theory_times",
]

__version__: str
SUM_NAMES: list[str]
DTYPE_CODES: dict[str, int]
MAX_THREADS: int
MAX_EMPTY_GROUPS: int
RUN_FORMAT_VERSION: int
THEORY_KINDS: list[str]
THEORY_CRITICAL_TOL: float
THEORY_MAX_UNBACKED_VALUES: int

# stats
def layout(shape: Sequence[int], axis: int, block: int) -> tuple[int, int, int]: ...
def group_stats_batch(items: list[tuple[Any, Any, Any, int, int, bool]], check_finite: bool = True) -> list[_F64]: ...
def group_stats_ptrs(items: list[tuple[int, int, int, int, int, int, int, int]]) -> _F64: ...
def read_pass(buffers: list[Any]) -> int: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# saved runs
def save_run(path: str | PathLike[str], meta_json: str, arrays: list[tuple[str, Any]]) -> None: ...
def load_run(path: str | PathLike[str]) -> tuple[str, list[tuple[str, Any]]]: ...
@final
class RunWriter:
    def __new__(cls, path: str | PathLike[str], level: int = 1) -> RunWriter: ...
    def add(self, arrays: list[tuple[str, Any]]) -> None: ...
    def finish(self, meta_json: str) -> None: ...
    def abort(self) -> None: ...

# theory
def theory_paper(
    kind: str,
    y0: _F64,
    drive: _F64 | None,
    lr: _F64,
    momentum: _F64,
    dampening: _F64,
    weight_decay: _F64,
    steps: int,
    ydot0: _F64 | None = None,
) -> _F64: ...
def theory_ledger(
    kind: str,
    y0: _F64,
    flux: _F64,
    update_sq: _F64 | None,
    update_dot: _F64 | None,
    buffer_dot0: _F64 | None,
    lr: _F64,
    momentum: _F64,
    dampening: _F64,
    weight_decay: _F64,
    nesterov: bool,
) -> _F64: ...
def theory_ledger_measured(
    kind: str, y0: _F64, lr: _F64, steps: int, dot: _F64 | None, update_sq: _F64 | None, update_sum: _F64 | None
) -> _F64: ...
def theory_equilibrium_sgd(
    lr: _F64, weight_decay: _F64, grad_sq_unit: _F64, momentum: _F64, dampening: _F64
) -> tuple[_F64, _F64, _F64, _F64]: ...
def theory_equilibrium_adamw(lr: _F64, weight_decay: _F64, update_sq: _F64, beta1: _F64) -> tuple[_F64, _F64, _F64, _F64]: ...
def theory_regime(lr: float, momentum: float, dampening: float, weight_decay: float, kind: str = "scale") -> str: ...
def theory_times(lr: _F64, momentum: _F64, dampening: _F64, steps: int) -> _F64: ...

@final
class TheoryPaperStream:
    def __new__(cls, kind: str, y0: _F64, ydot0: _F64 | None = None) -> TheoryPaperStream: ...
    def step(
        self, drive: _F64 | None, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0
    ) -> _F64: ...
    @property
    def y(self) -> _F64: ...
    @property
    def ydot(self) -> _F64: ...
    @property
    def steps(self) -> int: ...
    @property
    def time(self) -> float: ...
    @property
    def kind(self) -> str: ...

@final
class TheoryLedgerStream:
    def __new__(cls, kind: str, y0: _F64, buffer_dot0: _F64 | None = None) -> TheoryLedgerStream: ...
    def step(
        self,
        flux: _F64,
        update_sq: _F64 | None,
        update_dot: _F64 | None,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> _F64: ...
    @property
    def y(self) -> _F64: ...
    @property
    def buffer_dot(self) -> _F64: ...
    @property
    def steps(self) -> int: ...

# -- the tracker's per-step entry points (src/python/raw.rs, src/python/tracking.rs) -------------
_Spec: TypeAlias = tuple[int, int, int, int, int, int, int, int]
_Hyper: TypeAlias = tuple[float, float, float, float, bool]

ROW_FIELDS: list[str]
COLUMN_FIELDS: list[str]
def reduce_ptrs(main: list[_Spec], extra: list[_Spec]) -> tuple[_F64, _F64 | None]: ...

# (θ, ĝ or 0, exp_avg or 0, exp_avg_sq or 0, max_exp_avg_sq or 0, numel, dtype code) and
# (step size, √(1 − β2^t), eps, β1, β2, coupled wd, lr·decoupled wd, maximize, amsgrad)
_AdamParam: TypeAlias = tuple[tuple[int, int, int, int, int, int, int], tuple[float, float, float, float, float, float, float, bool, bool]]
_AdamReduction: TypeAlias = tuple[int, int, int, int, int, int]  # (parameter, offset, numel, outer, groups, seg)

def reduce_adam_ptrs(params: list[_AdamParam], main: list[_AdamReduction], extra: list[_AdamReduction]) -> tuple[_F64, _F64 | None]: ...
@final
class TrackerCore:
    def __new__(
        cls, plan: dict[str, Any], *, sgd: bool, every: int, decoupled: bool = False, beta1: float = 0.0, strict: bool = False
    ) -> TrackerCore: ...
    def lose(self, step: int, hyper: list[_Hyper] | list[Any]) -> None: ...
    def export_state(self) -> dict[str, _F64]: ...
    def import_state(self, state: dict[str, Any]) -> None: ...
    def step_sgd(
        self, step: int, rows: _F64, extra: _F64 | None, hyper: list[_Hyper] | list[Any], out: _F64 | None = None
    ) -> tuple[float, list[str], list[tuple[str, str]]]: ...
    def step_update(
        self, rows: _F64, extra: _F64 | None, hyper: list[_Hyper] | list[Any], out: _F64 | None = None, *, step: int | None = None
    ) -> tuple[float, list[str], list[tuple[str, str]]]: ...
    def skip(self, step: int, hyper: list[_Hyper] | list[Any]) -> list[str]: ...
    def final_row(self, rows: _F64) -> dict[str, Any] | None: ...
    def last_columns(self) -> _F64: ...
    @property
    def time(self) -> float: ...
    @property
    def groups(self) -> int: ...
