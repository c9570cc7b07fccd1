//! What one step does to one part, from the fused sums of that part (docs/theory.md §5.3).
//!
//! `torch.optim.SGD` (coupled weight decay): w_n = ĝ_n + λθ_n; the buffer b_0 = w_0 on its first
//! step, then b_n = β b_{n−1} + (1−d) w_n; the step direction u_n = b_n, or w_n + β b_n with
//! Nesterov, or w_n when β = 0 (an existing buffer is then kept as it is); θ_{n+1} = θ_n − η_n u_n. Every inner product the theories need
//! follows by bilinearity from the sums of (θ_n, ĝ_n, b_{n−1}), before b_n exists.
//! tests/sgd_reference.py is the readable numpy reference of [`sgd_part`], and the tests check
//! both against what torch applies.
//!
//! Any other optimizer: the applied update d_n = θ_n − θ_{n+1} is measured, and the charge
//! changes by −2⟨θ_n, d_n⟩ + |d_n|² (scale, rescale side) or −⟨1, d_n⟩ (translation). Its
//! update u_n = (d_n − η_nλθ_n)/η_n takes decoupled weight decay out (λ = 0 for coupled decay),
//! and drives the paper's form (docs/theory.md §5.5).
//!
//! Both paths also split the step's change of the charge into its decay, drive and breaking
//! terms (§5.5), and give ⟨θ_n, d_n⟩ and |d_n|², from which the tracker reads the angle of the
//! step (§5.6).

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
    // |b_n|², ⟨1, b_n⟩, ⟨w, b_n⟩ of the buffer this step makes. ⟨θ_n, u_n⟩ is never fed to the
    // ledger: that would close the loop the ledger is there to check (it only enters the
    // ledger split and the angle below, which the ledger does not read).
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
    sgd_split(&mut v, kind, s, buffer_sum, has_buffer, h);
    v
}

/// The ledger split of an SGD step (docs/theory.md §5.5) and the step's ⟨θ_n, d_n⟩, |d_n|².
///
/// u_n = c_w w_n + c_b b_{n−1} with (c_w, c_b) = (1, 0) without momentum or on the first step,
/// (1−d, β) with momentum, (1+β, β²) with nesterov ((1+β, 0) on its first step). Without
/// momentum θ_{n+1} = (1−ηλ)θ_n − ηĝ_n is the decoupled form with u = ĝ: decay
/// ((1−ηλ)² − 1)x, drive η²|ĝ|², breaking −2η(1−ηλ)⟨θ, ĝ⟩ (BatchNorm's ε). With momentum the
/// drive is the paper's η²|u_n|² (= η²|b_n|²), the decay −2ηc_wλx, and the breaking term holds
/// the rest of −2η⟨θ_n, u_n⟩: the ε part −2ηc_w⟨θ, ĝ⟩ and the momentum part −2ηc_b⟨θ_n, b_{n−1}⟩.
/// Translation: the same with ⟨1, ·⟩ for ⟨θ, ·⟩, halved, and no drive.
fn sgd_split(v: &mut [f64; FIELDS], kind: Kind, s: &PartSums, buffer_sum: f64, has_buffer: bool, h: &ParamGroupHyper) {
    let (q, x, gs, gg, st) = (s[0], s[1], s[2], s[3], s[4]);
    let (eta, beta, lam) = (h.lr, h.momentum, h.weight_decay);
    let t = kind == Kind::Translation;
    let uu = v[field::UPDATE_SQ];
    if beta == 0.0 {
        let keep = 1.0 - eta * lam;
        if t {
            v[field::DECAY_TERM] = -eta * lam * q;
            v[field::BREAKING_TERM] = -eta * gs;
        } else {
            v[field::DECAY_TERM] = -eta * lam * (2.0 - eta * lam) * x;
            v[field::DRIVE_TERM] = eta * eta * gg;
            v[field::BREAKING_TERM] = -2.0 * eta * keep * st;
            v[field::STEP_DOT] = eta * (st + lam * x);
            v[field::STEP_SQ] = eta * eta * uu;
        }
        return;
    }
    let (c_w, c_b) = match (h.nesterov, has_buffer) {
        (false, false) => (1.0, 0.0),
        (false, true) => (1.0 - h.dampening, beta),
        (true, false) => (1.0 + beta, 0.0),
        (true, true) => (1.0 + beta, beta * beta),
    };
    let (tb, bs) = if has_buffer { (s[6], buffer_sum) } else { (0.0, 0.0) };
    if t {
        v[field::DECAY_TERM] = -eta * c_w * lam * q;
        v[field::BREAKING_TERM] = -eta * (c_w * gs + c_b * bs);
    } else {
        v[field::DECAY_TERM] = -2.0 * eta * c_w * lam * x;
        v[field::DRIVE_TERM] = eta * eta * uu;
        v[field::BREAKING_TERM] = -2.0 * eta * (c_w * st + c_b * tb);
        v[field::STEP_DOT] = eta * (c_w * (st + lam * x) + c_b * tb);
        v[field::STEP_SQ] = eta * eta * uu;
    }
}

/// How a measured update is read: the weight decay λ_s taken out of it as
/// θ_{n+1} = (1 − ηλ_s)θ_n − ηu_n. Decoupled weight decay (AdamW, `decoupled_weight_decay`):
/// λ_s = λ; coupled (`weight_decay` added to the gradient before a preconditioner: Adam, RMSprop,
/// ...): λ_s = 0, the decay is inside u (docs/theory.md §5.5).
pub fn split_decay(h: &ParamGroupHyper, decoupled: bool) -> f64 {
    if decoupled {
        h.weight_decay
    } else {
        0.0
    }
}

/// One part's values for a measured update. `s`: the sums of (θ_n, ĝ_n, d_n) with
/// d_n = θ_n − θ_{n+1}; `update_sum`: ⟨1, d_n⟩ (translation parts; 0 otherwise); `lam`: the
/// decay taken out of the update ([`split_decay`]).
pub fn update_part(kind: Kind, s: &PartSums, update_sum: f64, lr: f64, lam: f64) -> [f64; FIELDS] {
    let (q, x, gs, gg, st, dd, td) = (s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    // u = d / η; a step with η = 0 that still moved θ is read as u = d.
    let eta = if lr > 0.0 { lr } else { 1.0 };
    let el = if lr > 0.0 { lr * lam } else { 0.0 };
    let t = kind == Kind::Translation;
    let mut v = [0.0; FIELDS];
    v[field::CHARGE] = if t { q } else { x };
    v[field::FLUX] = if t { gs } else { st };
    v[field::GRAD_SQ] = gg;
    v[field::UPDATE_SQ] = dd / (eta * eta);
    v[field::UPDATE_SUM] = update_sum / eta;
    v[field::CHANGE] = if t { -update_sum } else { -2.0 * td + dd };
    // ηu = d − ηλθ: |ηu|², ⟨θ, ηu⟩, ⟨1, ηu⟩ by bilinearity.
    let keep = 1.0 - el;
    if t {
        v[field::DECAY_TERM] = -el * q;
        v[field::BREAKING_TERM] = -(update_sum - el * q);
    } else {
        let step_u_sq = dd - 2.0 * el * td + el * el * x;
        v[field::DECAY_TERM] = -el * (2.0 - el) * x;
        v[field::DRIVE_TERM] = step_u_sq;
        v[field::BREAKING_TERM] = -2.0 * keep * (td - el * x);
        v[field::STEP_DOT] = td;
        v[field::STEP_SQ] = dd;
        // The paper's form applied to the update (§5.5) is driven by |u|².
        v[field::DRIVE] = step_u_sq / (eta * eta);
    }
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
        assert_eq!(v[..9], [4.0, 2.0, 1.0, 4.0, 0.0, 1.0, 2.0, 0.0, 0.0]);
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
        let v = update_part(Kind::Scale, &s, 1.0, 0.5, 0.0);
        assert_eq!((v[field::CHANGE], v[field::UPDATE_SQ], v[field::UPDATE_SUM]), (-5.0, 4.0, 2.0));
        let t = update_part(Kind::Translation, &s, 1.0, 0.0, 0.0);
        assert_eq!((t[field::CHANGE], t[field::UPDATE_SUM]), (-1.0, 1.0));
    }
    fn sums(theta: &[f64], grad: &[f64], third: &[f64]) -> PartSums {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        [
            theta.iter().sum(),
            dot(theta, theta),
            grad.iter().sum(),
            dot(grad, grad),
            dot(theta, grad),
            dot(third, third),
            dot(theta, third),
            dot(grad, third),
        ]
    }

    fn charges(theta: &[f64]) -> (f64, f64) {
        (theta.iter().sum(), theta.iter().map(|x| x * x).sum())
    }

    fn assert_split(v: &[f64; FIELDS], change: f64, what: &str) {
        let split = v[field::DECAY_TERM] + v[field::DRIVE_TERM] + v[field::BREAKING_TERM];
        assert!((split - change).abs() <= 1e-13 * (1.0 + change.abs()), "{what}: split {split} against change {change}");
    }

    #[test]
    fn sgd_split_adds_up_to_the_change_of_every_charge() {
        let theta = [0.7, -1.3, 0.4];
        let grad = [0.2, 0.5, -0.9];
        let buffer = [0.3, -0.1, 0.6];
        let (lam, eta) = (0.05, 0.1);
        for (beta, d, nesterov) in [(0.0, 0.0, false), (0.9, 0.3, false), (0.9, 0.0, true)] {
            for has_buffer in [false, true] {
                let h = ParamGroupHyper { lr: eta, momentum: beta, dampening: d, weight_decay: lam, nesterov };
                // torch.optim.SGD, entry by entry.
                let w: Vec<f64> = theta.iter().zip(&grad).map(|(t, g)| g + lam * t).collect();
                let b: Vec<f64> = if !has_buffer || beta == 0.0 {
                    w.clone()
                } else {
                    buffer.iter().zip(&w).map(|(b, w)| beta * b + (1.0 - d) * w).collect()
                };
                let u: Vec<f64> = match (beta == 0.0, nesterov) {
                    (true, _) => w.clone(),
                    (false, true) => w.iter().zip(&b).map(|(w, b)| w + beta * b).collect(),
                    (false, false) => b,
                };
                let next: Vec<f64> = theta.iter().zip(&u).map(|(t, u)| t - eta * u).collect();
                let ((q0, x0), (q1, x1)) = (charges(&theta), charges(&next));
                let third = if has_buffer { &buffer[..] } else { &[0.0; 3][..] };
                let s = sums(&theta, &grad, third);
                let bsum = if has_buffer { buffer.iter().sum() } else { 0.0 };
                let what = format!("β {beta} d {d} nesterov {nesterov} buffer {has_buffer}");
                assert_split(&sgd_part(Kind::Scale, &s, bsum, has_buffer, &h), x1 - x0, &what);
                assert_split(&sgd_part(Kind::Translation, &s, bsum, has_buffer, &h), q1 - q0, &what);
                let v = sgd_part(Kind::Scale, &s, bsum, has_buffer, &h);
                let d_vec: Vec<f64> = theta.iter().zip(&next).map(|(a, b)| a - b).collect();
                let td: f64 = theta.iter().zip(&d_vec).map(|(a, b)| a * b).sum();
                assert!((v[field::STEP_DOT] - td).abs() < 1e-14, "{what}: ⟨θ, d⟩");
                assert_eq!(v[field::DRIVE_TERM] == eta * eta * grad.iter().map(|g| g * g).sum::<f64>(), beta == 0.0);
            }
        }
    }

    #[test]
    fn update_split_takes_decoupled_decay_out() {
        // AdamW-like: θ' = (1 − ηλ)θ − ηa with a chosen direction a.
        let theta = [0.7, -1.3, 0.4];
        let a = [0.5, 0.2, -0.3];
        let (eta, lam) = (0.1, 0.2);
        let next: Vec<f64> = theta.iter().zip(&a).map(|(t, a)| (1.0 - eta * lam) * t - eta * a).collect();
        let d: Vec<f64> = theta.iter().zip(&next).map(|(t, n)| t - n).collect();
        let s = sums(&theta, &[0.0; 3], &d);
        let ((q0, x0), (q1, x1)) = (charges(&theta), charges(&next));
        let dsum: f64 = d.iter().sum();
        let v = update_part(Kind::Scale, &s, dsum, eta, lam);
        assert_split(&v, x1 - x0, "decoupled scale");
        assert!((v[field::DRIVE] - a.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-14); // |u|² = |a|²
        assert!((v[field::DECAY_TERM] - ((1.0 - eta * lam).powi(2) - 1.0) * x0).abs() < 1e-15);
        assert_split(&update_part(Kind::Translation, &s, dsum, eta, lam), q1 - q0, "decoupled translation");
        // Coupled: nothing taken out, the decay stays in u.
        let v = update_part(Kind::Scale, &s, dsum, eta, 0.0);
        assert_split(&v, x1 - x0, "coupled scale");
        assert_eq!(v[field::DECAY_TERM], 0.0);
    }
}
