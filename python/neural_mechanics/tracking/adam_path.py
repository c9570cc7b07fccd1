"""torch.optim.Adam / AdamW on the CPU without a snapshot: the step's update from the optimizer's state.

``UpdatePath`` (paths.py) copies every tracked parameter before the step and subtracts after
it. For Adam and AdamW the update is a known function of what the optimizer holds before the
step (θ, ĝ, exp_avg, exp_avg_sq, max_exp_avg_sq, step and the param_group's constants), so
``AdamPath`` computes d_n = θ_n − θ_{n+1} in Rust (src/stats/adam.rs, float64 arithmetic on the
stored values) and reduces (θ_n, ĝ_n, d_n) in the same native call: the sums are those the
snapshot path would hand ``core.step_update``, with nothing copied and one pass fewer.

A step that the formula cannot stand for takes the snapshot route instead (noted once in
``run.notes``): ``capturable`` or ``differentiable`` param_groups, a GradScaler that hands the
optimizer still-scaled gradients (fused Adam unscales inside the step), parameters that are
not float32/float64. Only the CPU Rust reducer has this path: on a GPU the device reducer's
snapshot is a device copy that overlaps training, and sharded (FSDP2) state lives per rank.
"""

from __future__ import annotations

from typing import Any

from .. import _native
from ..errors import DeviceError, DTypeError, ShapeError
from .paths import UpdatePath, read_hyper
from .reducers import KernelPlan, Pending, RustReducer
from .reducers.rust import _DTYPE_CODES


def fused_adam_applies(optimizer: Any, reducer: Any) -> bool:
    """Whether ``AdamPath`` can measure this optimizer: exactly torch.optim.Adam or AdamW (a
    subclass may change the update), reduced on the CPU by the Rust kernel."""
    import torch

    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and isinstance(reducer, RustReducer)


class AdamPath(UpdatePath):
    """torch.optim.Adam / AdamW: the update computed before the step, nothing copied.
    ``fused = False`` sends every step through the snapshot route (benchmarks compare both)."""

    fused = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._fused_blocks: Pending | None = None  # this step's sums, computed before the step
        self._kernel: tuple[list[tuple], list[tuple]] | None = None  # the reductions, by element
        self._fallbacks_noted: set[str] = set()

    def before_step(self, step: int) -> None:
        self.flush()
        self._fused_blocks = None
        self._snapshot, self._grads, self._failed_step = None, None, None
        if not self._measured(step):
            return  # after_step finds no snapshot and no sums: the step is skipped
        why = self._snapshot_reason() if self.fused else "fused=False"
        if why is None:
            try:
                self._fused_blocks = self._reduce_fused(step)
            except Exception as exc:  # as the snapshot route: a note, and the step is lost
                if self.on_error == "raise":
                    raise
                self._note_failure(step, "computing Adam's update before the step", exc)
                self._failed_step = step
            return
        if self.fused and why not in self._fallbacks_noted:
            self._fallbacks_noted.add(why)
            self.run.notes.append(f"step {step}: {why}, so Adam's update is measured from a snapshot at such steps")
        super().before_step(step)

    def after_step(self, step: int) -> None:
        blocks, self._fused_blocks = self._fused_blocks, None
        if blocks is None:
            super().after_step(step)
            return
        hyper = read_hyper(self.optimizer)  # read after the step, as the snapshot route does
        self._defer(lambda: self._process(blocks, hyper, step))

    # -- the fused route ---------------------------------------------------------------------
    def _snapshot_reason(self) -> str | None:
        """Why this step must take the snapshot route, or None."""
        opt = self.optimizer
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            return "a GradScaler hands the optimizer scaled gradients"
        for g in opt.param_groups:
            if g.get("capturable", False):
                return "a param_group is capturable"
            if g.get("differentiable", False):
                return "a param_group is differentiable"
        if any(p.dtype not in _FLOATS for p in self.plan.params.values()):
            return "a tracked parameter is neither float32 nor float64"
        return None

    def _reduce_fused(self, step: int) -> Pending:
        """One native call: every tracked parameter's update, then the (θ, ĝ, d) sums."""
        if self._kernel is None:
            self._kernel = KernelPlan(self.reads).by_element(True)
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        constants: dict[tuple[int, float, Any], tuple] = {}
        keep: list[Any] = []  # contiguous copies must outlive the call
        params = []
        for name in self.reads.names:
            p = self.plan.params[name]
            group = group_of.get(id(p))
            if group is None:
                raise ShapeError(f"{name} is no longer in the optimizer's param_groups; the tracker cannot read its update")
            st = self.optimizer.state.get(p) or {}  # .get: the state is a defaultdict
            started = "exp_avg" in st
            t = float(st["step"]) + 1.0 if started else 1.0
            key = (id(group), t, p.dtype)
            if key not in constants:
                constants[key] = _constants(group, t, self.optimizer, p.dtype)
            c = constants[key]
            grad = p.grad
            if grad is None:
                self._grad(name, p, step)  # notes it once; Adam leaves such a parameter alone
            amsgrad = c[-1]
            tensors = (
                _address(p, p, name, "parameter", keep),
                0 if grad is None else _address(grad, p, name, "gradient", keep),
                _address(st["exp_avg"], p, name, "exp_avg", keep) if started else 0,
                _address(st["exp_avg_sq"], p, name, "exp_avg_sq", keep) if started else 0,
                _address(st["max_exp_avg_sq"], p, name, "max_exp_avg_sq", keep) if started and amsgrad else 0,
                p.numel(),
                _DTYPE_CODES[p.dtype],
            )
            params.append((tensors, c))
        blocks = _native.reduce_adam_ptrs(params, *self._kernel)
        del keep
        return Pending(lambda: blocks)


def _floats() -> tuple[Any, ...]:
    import torch

    return (torch.float32, torch.float64)


_FLOATS = _floats()


def _constants(group: dict[str, Any], t: float, optimizer: Any, dtype: Any) -> tuple:
    """(s, √(1 − β2^t), eps, β1, β2, coupled wd, lr·decoupled wd, maximize, amsgrad) of one
    param_group at step t for parameters of ``dtype`` (torch's own bias corrections, in float64
    as torch computes them)."""
    import numpy as np
    import torch

    lr, wd, eps = float(group["lr"]), float(group.get("weight_decay", 0.0)), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    # AdamW of torch before 2.6 has no decoupled_weight_decay key: it always decouples.
    decoupled = bool(group.get("decoupled_weight_decay", False)) or type(optimizer) is torch.optim.AdamW
    step_size = lr / (1.0 - beta1**t)
    bias2_sqrt = (1.0 - beta2**t) ** 0.5
    coupled, decay = (0.0, lr * wd) if decoupled else (wd, 0.0)
    if decoupled and dtype is torch.float32:
        # Every implementation multiplies θ by 1 − lr·wd rounded to float32: with lr·wd = 1e-5 that
        # rounding is up to 0.3% of the decay, the same sign at every step, so it is followed here
        # (1 − the rounded factor is exact in float64); every other rounding of torch's is noise.
        decay = 1.0 - float(np.float32(1.0 - lr * wd))
    return (step_size, bias2_sqrt, eps, beta1, beta2, coupled, decay, bool(group.get("maximize", False)), bool(group.get("amsgrad", False)))


def _address(t: Any, p: Any, name: str, what: str, keep: list[Any]) -> int:
    """The address of ``t`` (of parameter ``p``), checked: dense, CPU, p's dtype and shape; a
    non-contiguous tensor is read from a contiguous copy kept in ``keep``."""
    if t.layout is not _STRIDED:
        raise ShapeError(f"{name}: its {what} is {t.layout}; the Adam path reads dense tensors")
    if not t.is_cpu:
        raise DeviceError(f"{name}: the Adam path reads CPU tensors; its {what} is on {t.device}")
    if t.dtype is not p.dtype:
        raise DTypeError(f"{name}: its {what} is {t.dtype}, the parameter {p.dtype}")
    if t.shape != p.shape:
        raise ShapeError(f"{name}: its {what} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
    if not t.is_contiguous():
        t = t.contiguous()
        keep.append(t)
    return int(t.data_ptr())


def _strided() -> Any:
    import torch

    return torch.strided


_STRIDED = _strided()
