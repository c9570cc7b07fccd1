//! What one step does to one part, from the fused sums of that part (docs/theory.md §5.3).
//!
//! `torch.optim.SGD` (coupled weight decay): w_n = ĝ_n + λθ_n; the buffer b_0 = w_0 on its first
//! step, then b_n = β b_{n−1} + (1−d) w_n; the step direction u_n = b_n, or w_n + β b_n with
//! Nesterov, or w_n when β = 0 (an existing buffer is then kept as it is); θ_{n+1} = θ_n − η_n u_n. Every inner product the theories need
//! follows by bilinearity from the sums of (θ_n, ĝ_n, b_{n−1}), before b_n exists.
//! tests/sgd_reference.py is the readable numpy reference of [`sgd_part`], and the tests check
//! both against what torch applies.
//!
//! Any other optimizer: the applied update d_n = θ_n − θ_{n+1} is measured, u_n = d_n / η_n, and
//! the charge changes by −2⟨θ_n, d_n⟩ + |d_n|² (scale, rescale side) or −⟨1, d_n⟩ (translation).

use super::plan::{field, PartSums, FIELDS};
use crate::theory::Kind;

/// The hyperparameters of one optimizer param_group for one step, as torch names them
/// (optimizers without momentum or dampening read 0 for them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroupHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// One part's values for an SGD step. `s`: the sums of (θ_n, ĝ_n[, b_{n−1}]) in the kernel's
/// order; `buffer_sum`: ⟨1, b_{n−1}⟩ (translation parts; 0 otherwise); `has_buffer`: whether a
/// momentum buffer b_{n−1} exists (then `s` holds its 3 sums).
pub fn sgd_part(kind: Kind, s: &PartSums, buffer_sum: f64, has_buffer: bool, h: &ParamGroupHyper) -> [f64; FIELDS] {
    let (q, x, gs, gg, st) = (s[0], s[1], s[2], s[3], s[4]);
    let (beta, d, lam) = (h.momentum, h.dampening, h.weight_decay);
    // |w|², ⟨1, w⟩ of w = ĝ + λθ.
    let ww = gg + 2.0 * lam * st + lam * lam * x;
    let sw = gs + lam * q;
    // |b_n|², ⟨1, b_n⟩, ⟨w, b_n⟩ of the buffer this step makes. ⟨θ_n, u_n⟩ is never formed:
    // feeding it to the ledger would close the loop the ledger is there to check.
    let (bb_new, sb_new, wb_new) = if has_buffer {
        let (bb, tb, gb) = (s[5], s[6], s[7]);
        let wb = gb + lam * tb;
        let c = 1.0 - d;
        (beta * beta * bb + 2.0 * beta * c * wb + c * c * ww, beta * buffer_sum + c * sw, beta * wb + c * ww)
    } else {
        (ww, sw, ww) // b_0 = w on the first step (no dampening)
    };
    let (uu, su, drive, e) = if beta == 0.0 {
        // PyTorch keeps an existing buffer untouched while β = 0, but θ moves under it: the
        // ledger follows ⟨θ, b⟩ with e = ⟨u_n, b_{n−1}⟩ = ⟨w_n, b_{n−1}⟩ (docs/theory.md §5.3).
        let wb_old = if has_buffer { s[7] + lam * s[6] } else { 0.0 };
        (ww, sw, gg, wb_old)
    } else if h.nesterov {
        (ww + 2.0 * beta * wb_new + beta * beta * bb_new, sw + beta * sb_new, bb_new, wb_new + beta * bb_new)
    } else {
        (bb_new, sb_new, bb_new, bb_new)
    };
    let t = kind == Kind::Translation;
    let mut v = [0.0; FIELDS];
    v[field::CHARGE] = if t { q } else { x };
    v[field::FLUX] = if t { gs } else { st };
    v[field::GRAD_SQ] = gg;
    v[field::UPDATE_SQ] = uu;
    v[field::UPDATE_DOT] = e;
    v[field::DRIVE] = drive;
    v[field::UPDATE_SUM] = su;
    v[field::BUFFER_DOT] = match (has_buffer, t) {
        (false, _) => 0.0,
        (true, true) => buffer_sum,
        (true, false) => s[6],
    };
    v
}

/// One part's values for a measured update. `s`: the sums of (θ_n, ĝ_n, d_n) with
/// d_n = θ_n − θ_{n+1}; `update_sum`: ⟨1, d_n⟩ (translation parts; 0 otherwise).
pub fn update_part(kind: Kind, s: &PartSums, update_sum: f64, lr: f64) -> [f64; FIELDS] {
    let (q, x, gs, gg, st, dd, td) = (s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    // u = d / η; a step with η = 0 that still moved θ is read as u = d.
    let lr = if lr > 0.0 { lr } else { 1.0 };
    let t = kind == Kind::Translation;
    let mut v = [0.0; FIELDS];
    v[field::CHARGE] = if t { q } else { x };
    v[field::FLUX] = if t { gs } else { st };
    v[field::GRAD_SQ] = gg;
    v[field::UPDATE_SQ] = dd / (lr * lr);
    v[field::DRIVE] = gg;
    v[field::UPDATE_SUM] = update_sum / lr;
    v[field::CHANGE] = if t { -update_sum } else { -2.0 * td + dd };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(lam: f64) -> ParamGroupHyper {
        ParamGroupHyper { lr: 0.1, momentum: 0.0, dampening: 0.0, weight_decay: lam, nesterov: false }
    }

    #[test]
    fn plain_sgd_by_hand() {
        // θ = 2 (x = 4), ĝ = 1, λ = 0.5, β = 0: w = 2, |u|² = 4, the drive is |ĝ|² = 1.
        let s = [2.0, 4.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0];
        let v = sgd_part(Kind::Scale, &s, 0.0, false, &plain(0.5));
        assert_eq!(v, [4.0, 2.0, 1.0, 4.0, 0.0, 1.0, 2.0, 0.0, 0.0]);
        let t = sgd_part(Kind::Translation, &s, 0.0, false, &plain(0.5));
        assert_eq!((t[field::CHARGE], t[field::FLUX], t[field::UPDATE_SUM]), (2.0, 1.0, 2.0));
    }

    #[test]
    fn momentum_buffer_by_hand() {
        // One entry: θ = 1, ĝ = 2, b_{−1} = 3; β = 0.5, d = 0, λ = 0: b_0 = 0.5·3 + 2 = 3.5.
        let s = [1.0, 1.0, 2.0, 4.0, 2.0, 9.0, 3.0, 6.0];
        let h = ParamGroupHyper { lr: 0.1, momentum: 0.5, dampening: 0.0, weight_decay: 0.0, nesterov: false };
        let v = sgd_part(Kind::Scale, &s, 3.0, true, &h);
        assert_eq!((v[field::UPDATE_SQ], v[field::DRIVE], v[field::BUFFER_DOT]), (12.25, 12.25, 3.0));
        // Nesterov: u = w + β b_0 = 2 + 1.75 = 3.75; ⟨u, b_0⟩ = 3.75 · 3.5.
        let v = sgd_part(Kind::Translation, &s, 3.0, true, &ParamGroupHyper { nesterov: true, ..h });
        assert_eq!((v[field::UPDATE_SQ], v[field::UPDATE_DOT], v[field::UPDATE_SUM]), (3.75 * 3.75, 3.75 * 3.5, 3.75));
    }

    #[test]
    fn measured_update_by_hand() {
        // θ_n = 3, d = 1 (θ_{n+1} = 2): |θ|² goes 9 → 4, a change of −2·3 + 1 = −5.
        let s = [3.0, 9.0, 0.5, 0.25, 1.5, 1.0, 3.0, 0.5];
        let v = update_part(Kind::Scale, &s, 1.0, 0.5);
        assert_eq!((v[field::CHANGE], v[field::UPDATE_SQ], v[field::UPDATE_SUM]), (-5.0, 4.0, 2.0));
        let t = update_part(Kind::Translation, &s, 1.0, 0.0);
        assert_eq!((t[field::CHANGE], t[field::UPDATE_SUM]), (-1.0, 1.0));
    }
}
