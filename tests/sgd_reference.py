"""What one pre-step pass over (θ_n, ĝ_n, b_{n−1}) tells about step n of torch.optim.SGD.

The readable reference of the algebra the tracker runs in Rust (src/tracking/algebra.rs);
tests/test_tracking_sgd_algebra.py checks this module against what torch applies and the Rust
code against this module.

PyTorch's SGD (coupled weight decay): w_n = ĝ_n + λθ_n; the buffer b_0 = w_0 on its first step,
then b_n = β b_{n−1} + (1−d) w_n; the step direction u_n = b_n, or w_n + β b_n with nesterov, or
w_n when β = 0; θ_{n+1} = θ_n − η_n u_n (docs/theory.md §5.3). Every inner product the theories need
follows from the fused sums of (θ_n, ĝ_n, b_{n−1}) by bilinearity, without touching b_n.
All arrays are per part (one entry per part of a symmetry group); hyperparameters are per part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PartSums:
    """Sums over each part of θ_n, ĝ_n and the buffer b_{n−1} (None where no buffer exists)."""

    x: np.ndarray  # |θ|²
    q: np.ndarray  # ⟨1, θ⟩
    s: np.ndarray  # ⟨θ, ĝ⟩
    gg: np.ndarray  # |ĝ|²
    gs: np.ndarray  # ⟨1, ĝ⟩
    bb: np.ndarray | None = None  # |b_{n−1}|²
    tb: np.ndarray | None = None  # ⟨θ, b_{n−1}⟩
    gb: np.ndarray | None = None  # ⟨ĝ, b_{n−1}⟩
    bs: np.ndarray | None = None  # ⟨1, b_{n−1}⟩

    @classmethod
    def from_rows(cls, sums: np.ndarray, buffer_sum: np.ndarray | None) -> PartSums:
        """From fused sums (parts, 5 or 8) in the order of SUM_NAMES."""
        out = cls(x=sums[:, 1], q=sums[:, 0], s=sums[:, 4], gg=sums[:, 3], gs=sums[:, 2])
        if sums.shape[1] == 8:
            out.bb, out.tb, out.gb = sums[:, 5], sums[:, 6], sums[:, 7]
            out.bs = buffer_sum if buffer_sum is not None else np.zeros_like(out.x)
        return out


@dataclass
class StepQuantities:
    """Per part: the step direction u_n and the new buffer b_n, as the theories consume them."""

    uu: np.ndarray  # |u_n|²
    tu: np.ndarray  # ⟨θ_n, u_n⟩ (a check of the ledger, never fed to it)
    su: np.ndarray  # ⟨1, u_n⟩
    drive: np.ndarray  # the paper's drive: |ĝ_n|² without momentum, |b_n|² with it
    e: np.ndarray  # ⟨u_n, b_n⟩ (nesterov's ledger input)


def step_quantities(p: PartSums, momentum: Any, dampening: Any, weight_decay: Any, nesterov: Any) -> StepQuantities:
    """Hyperparameters per part (arrays)."""
    lam, beta, d = weight_decay, momentum, dampening
    ww = p.gg + 2 * lam * p.s + lam * lam * p.x  # |w|²
    tw = p.s + lam * p.x  # ⟨θ, w⟩
    sw = p.gs + lam * p.q  # ⟨1, w⟩
    if p.bb is None:
        # No buffer yet: b_0 = w (no dampening on the first step), or no momentum at all.
        bb_new, tb_new, sb_new, wb_new = ww, tw, sw, ww
    else:
        assert p.tb is not None and p.gb is not None and p.bs is not None
        wb = p.gb + lam * p.tb  # ⟨w, b_{n−1}⟩
        k = 1 - d
        bb_new = beta * beta * p.bb + 2 * beta * k * wb + k * k * ww
        tb_new = beta * p.tb + k * tw
        sb_new = beta * p.bs + k * sw
        wb_new = beta * wb + k * ww  # ⟨w, b_n⟩
    no_mom = beta == 0
    nest = nesterov.astype(bool) & ~no_mom
    plain = ~no_mom & ~nest
    uu = np.where(no_mom, ww, np.where(plain, bb_new, ww + 2 * beta * wb_new + beta * beta * bb_new))
    tu = np.where(no_mom, tw, np.where(plain, tb_new, tw + beta * tb_new))
    su = np.where(no_mom, sw, np.where(plain, sb_new, sw + beta * sb_new))
    # β = 0: torch keeps the old buffer; e = ⟨u_n, b_{n−1}⟩ lets the ledger follow ⟨θ, b⟩.
    kept = 0.0 if p.bb is None else p.gb + lam * p.tb
    e = np.where(nest, wb_new + beta * bb_new, np.where(plain, bb_new, kept))
    drive = np.where(no_mom, p.gg, bb_new)
    return StepQuantities(uu=uu, tu=tu, su=su, drive=drive, e=e)

