//! Exact one-step propagators of the paper's ODEs (docs/theory.md §5.1, §5.2), drive held constant
//! over the step.
//!
//! Second order (momentum β > 0): ÿ + 2γẏ + ω²y = f over a step of length h = η(1−d), with
//! γ = (1−β)/(h(1+β)) and ω² = kλ/(h(1+β)) (k = 2 translation, 4 scale/rescale). With
//! G(s) = e^{−γs} sin(Ωs)/Ω (the Green's function; sinh in the overdamped case, s·e^{−γs} at
//! the critical point) and P(h) = ∫_0^h G, the exact solution over one step is
//!
//! ```text
//!     r  = f − ω² y                         (the net "force" at the start of the step)
//!     y' = y + G(h) ẏ + P(h) r
//!     ẏ' = G'(h) ẏ + G(h) r
//! ```
//!
//! which is the usual y' = K y + G ẏ + P f with K = 1 − ω²P written so that the fixed point
//! y = f/ω², ẏ = 0 is exact in floating point (r = 0 there), instead of depending on how 1 − K
//! rounds. Everything is evaluated in the dimensionless variables a = γh ∈ (0, 1] and
//! w = ω²h², μ = w − a² (= (Ωh)², signed: > 0 underdamped, < 0 overdamped):
//!
//! ```text
//!     G(h)/h = e^{−a} S(μ),   G'(h) = e^{−a} (C(μ) − a S(μ)),
//!     P(h)/h² = Q = ∫_0^1 σ e^{−aσ} S(μσ²) dσ,
//!     S(μ) = sin√μ/√μ  (sinh√−μ/√−μ for μ < 0),   C(μ) = cos√μ  (cosh√−μ for μ < 0).
//! ```
//!
//! S and C are entire functions of μ, so one power series covers both sides of the critical
//! point μ = 0 and the result is continuous (indeed analytic) across it. Only factors e^{−a}
//! with a > 0 appear, and |μ| ≤ a² ≤ 1 when overdamped, so no growing exponential is ever
//! formed: a step's coefficients are O(1) and the state stays bounded for any number of steps.
//! A change of hyperparameters simply gives the next step other coefficients.
//!
//! First order (β = 0, time step η, PyTorch ignores dampening): y' = −kλy/2·… precisely
//! ẏ = c_f D − w y with w = kλ/2 (λ translation, 2λ scale) and c_f = η (0 for translation),
//! solved exactly as y' = y + η φ₁(−wη) (c_f D − w y), φ₁(z) = (e^z − 1)/z.

use super::{Hyper, Kind};
use crate::error::{Error, Result};

/// The coefficients of one step, shared by every group (they depend on the step's
/// hyperparameters only). See the module documentation for the update they define.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// True: the first-order form of §5.1 (β = 0); `g` and `gp` are unused.
    pub first_order: bool,
    /// Multiplier of the per-step drive D: 2/(1−d)² (second order, scale/rescale), η (first
    /// order, scale/rescale), 0 (translation: no drive).
    pub cf: f64,
    /// ω² (second order) or the decay rate w (first order).
    pub w2: f64,
    /// G(h).
    pub g: f64,
    /// G'(h).
    pub gp: f64,
    /// P(h) = ∫_0^h G (second order) or η φ₁(−wη) (first order).
    pub p: f64,
    /// The time the step advances t by: h = η(1−d) (second order) or η (first order).
    pub h: f64,
}

/// |μ| up to which S, C and Q are summed as power series (beyond it, underdamped only, the
/// closed forms are well conditioned: √μ > 2).
const SERIES_MAX: f64 = 4.0;
const MAX_TERMS: usize = 60;

/// S(μ) and C(μ) (see the module documentation).
pub fn sinc_cos(mu: f64) -> (f64, f64) {
    if mu.abs() <= SERIES_MAX {
        // S = Σ (−μ)^k/(2k+1)!, C = Σ (−μ)^k/(2k)!; |μ| ≤ 4 keeps the terms below 2 in size.
        let (mut s, mut c) = (1.0, 1.0);
        let (mut ts, mut tc) = (1.0f64, 1.0f64);
        for k in 1..MAX_TERMS {
            let kf = k as f64;
            ts *= -mu / ((2.0 * kf) * (2.0 * kf + 1.0));
            tc *= -mu / ((2.0 * kf - 1.0) * (2.0 * kf));
            s += ts;
            c += tc;
            if ts.abs() < 1e-18 * s.abs() && tc.abs() < 1e-18 {
                break;
            }
        }
        (s, c)
    } else {
        // Only reached when μ > 4 (underdamped): overdamped means |μ| ≤ a² ≤ 1.
        let root = mu.sqrt();
        (root.sin() / root, root.cos())
    }
}

/// J_m(a) = ∫_0^1 σ^m e^{−aσ} dσ = Σ_j (−a)^j / (j! (m+j+1)), for 0 ≤ a ≤ 1 (terms ≤ 1/j!,
/// and the sum is at least e^{−1}/(m+1), so at most a factor e of cancellation).
fn moment(m: usize, a: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = 1.0f64; // (−a)^j / j!
    for j in 0..MAX_TERMS {
        let add = term / ((m + j + 1) as f64);
        sum += add;
        if add.abs() < 1e-18 * sum.abs() {
            break;
        }
        term *= -a / ((j + 1) as f64);
    }
    sum
}

/// Q(a, μ) = ∫_0^1 σ e^{−aσ} S(μσ²) dσ = P(h)/h², with w = μ + a² = ω²h².
pub fn q_integral(a: f64, mu: f64, w: f64) -> f64 {
    if mu.abs() <= SERIES_MAX {
        // Q = Σ_k (−μ)^k/(2k+1)! · J_{2k+1}(a): every piece is computed without cancellation
        // beyond a small constant factor, uniformly in w (no 1 − K / w division).
        let mut sum = 0.0;
        let mut t = 1.0f64; // (−μ)^k/(2k+1)!
        for k in 0..MAX_TERMS {
            let add = t * moment(2 * k + 1, a);
            sum += add;
            if add.abs() < 1e-18 * sum.abs() {
                break;
            }
            let kf = (k + 1) as f64;
            t *= -mu / ((2.0 * kf) * (2.0 * kf + 1.0));
        }
        sum
    } else {
        // w > 4 here, so dividing 1 − K by w loses nothing; 1 − K is assembled from pieces that
        // are each accurate: 1 − e^{−a}(cos c + a sin c / c).
        let c = mu.sqrt();
        let e = (-a).exp();
        let half = (0.5 * c).sin();
        let one_minus_k = -(-a).exp_m1() + e * 2.0 * half * half - e * a * c.sin() / c;
        one_minus_k / w
    }
}

/// φ₁(−z) = (1 − e^{−z})/z for z ≥ 0 (1 at z = 0), without cancellation.
fn phi1_neg(z: f64) -> f64 {
    if z == 0.0 {
        1.0
    } else {
        -(-z).exp_m1() / z
    }
}

/// The ω² coefficient k of the kind: ω² = kλ/(h(1+β)); also twice the first-order decay rate.
fn stiffness(kind: Kind) -> f64 {
    if kind.is_quadratic() {
        4.0
    } else {
        2.0
    }
}

/// §5.1: one SGD step without momentum (time step η; dampening is ignored, as PyTorch does).
pub fn first_order(kind: Kind, hp: Hyper) -> Step {
    let eta = hp.lr;
    let rate = 0.5 * stiffness(kind) * hp.weight_decay; // 2λ scale, λ translation
    Step {
        first_order: true,
        cf: if kind.is_quadratic() { eta } else { 0.0 },
        w2: rate,
        g: 0.0,
        gp: 0.0,
        p: eta * phi1_neg(rate * eta),
        h: eta,
    }
}

/// §5.2: one heavy-ball step (β > 0) of time length h = η(1−d).
pub fn second_order(kind: Kind, hp: Hyper) -> Result<Step> {
    let beta = hp.momentum;
    let damp = hp.dampening;
    let h = hp.lr * (1.0 - damp);
    let cf = if kind.is_quadratic() { 2.0 / ((1.0 - damp) * (1.0 - damp)) } else { 0.0 };
    if h == 0.0 {
        if hp.lr > 0.0 {
            // d = 1: the buffer never sees a gradient and the model's time stands still while
            // θ still moves; the continuous model has no meaning there.
            return Err(Error::InvalidArgument(
                "dampening = 1 with momentum > 0 has no continuous-time model (h = lr·(1−d) = 0); \
                 use the ledger"
                    .into(),
            ));
        }
        // lr = 0: no time passes, nothing moves.
        return Ok(Step { first_order: false, cf: 0.0, w2: 0.0, g: 0.0, gp: 1.0, p: 0.0, h: 0.0 });
    }
    let a = (1.0 - beta) / (1.0 + beta); // γh
    let w = stiffness(kind) * hp.weight_decay * h / (1.0 + beta); // ω²h²
    let mu = w - a * a;
    let e = (-a).exp();
    let (s, c) = sinc_cos(mu);
    let q = q_integral(a, mu, w);
    // ω² = w/h²; below h ≈ 1.5e-154 the square h² is no longer a normal number (and is 0 below
    // 2.2e-162), so ω² is then computed without it (kλ/(h(1+β)), equal up to rounding).
    let hh = h * h;
    let w2 = if hh.is_normal() { w / hh } else { stiffness(kind) * hp.weight_decay / (h * (1.0 + beta)) };
    let step = Step { first_order: false, cf, w2, g: h * e * s, gp: e * (c - a * s), p: hh * q, h };
    if [step.cf, step.w2, step.g, step.gp, step.p].iter().any(|x| !x.is_finite()) {
        // λ/h beyond float64 (lr ≈ 1e-308 and below), or h² beyond it (lr ≈ 1e154 and above):
        // a clear refusal rather than a NaN state.
        let which = if hp.lr < 1.0 { "small" } else { "large" };
        return Err(Error::InvalidArgument(format!(
            "lr = {:e} is too {which} for the closed form in float64 (its step coefficients ω² = kλ/(lr(1−d)(1+β)) \
             and P ≈ (lr(1−d))² overflow)",
            hp.lr
        )));
    }
    Ok(step)
}

/// The step for these hyperparameters: second order when β > 0, first order when β = 0.
pub fn step_for(kind: Kind, hp: Hyper) -> Result<Step> {
    if hp.momentum > 0.0 {
        second_order(kind, hp)
    } else {
        Ok(first_order(kind, hp))
    }
}

/// Which solution of the scale/rescale (or translation) oscillator these hyperparameters give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    FirstOrder,
    Underdamped,
    Critical,
    Overdamped,
}

impl Regime {
    pub fn name(self) -> &'static str {
        match self {
            Regime::FirstOrder => "first-order",
            Regime::Underdamped => "underdamped",
            Regime::Critical => "critical",
            Regime::Overdamped => "overdamped",
        }
    }
}

/// Relative width of the band |ω² − γ²| ≤ tol·γ² reported as "critical" (an exact float
/// equality is almost never met; the propagator itself needs no such band).
pub const CRITICAL_TOL: f64 = 1e-9;

pub fn regime(kind: Kind, hp: Hyper) -> Result<Regime> {
    hp.validate(None)?;
    if hp.momentum == 0.0 {
        return Ok(Regime::FirstOrder);
    }
    let a = (1.0 - hp.momentum) / (1.0 + hp.momentum);
    let h = hp.lr * (1.0 - hp.dampening);
    let w = stiffness(kind) * hp.weight_decay * h / (1.0 + hp.momentum);
    let mu = w - a * a;
    Ok(if mu.abs() <= CRITICAL_TOL * a * a {
        Regime::Critical
    } else if mu > 0.0 {
        Regime::Underdamped
    } else {
        Regime::Overdamped
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K, G, G', P from the closed forms of the table of docs/theory.md §5.2 (fine for moderate
    /// arguments).
    fn table(gamma: f64, omega2: f64, t: f64) -> (f64, f64, f64, f64) {
        let d = omega2 - gamma * gamma;
        let (k, g, gp);
        if d > 0.0 {
            let om = d.sqrt();
            let e = (-gamma * t).exp();
            k = e * ((om * t).cos() + gamma / om * (om * t).sin());
            g = e * (om * t).sin() / om;
            gp = e * ((om * t).cos() - gamma / om * (om * t).sin());
        } else if d < 0.0 {
            let r = (-d).sqrt();
            let (ap, am) = (-gamma + r, -gamma - r);
            k = (ap * (am * t).exp() - am * (ap * t).exp()) / (ap - am);
            g = ((ap * t).exp() - (am * t).exp()) / (ap - am);
            gp = (ap * (ap * t).exp() - am * (am * t).exp()) / (ap - am);
        } else {
            let e = (-gamma * t).exp();
            k = e * (1.0 + gamma * t);
            g = t * e;
            gp = e * (1.0 - gamma * t);
        }
        (k, g, gp, (1.0 - k) / omega2)
    }

    fn hp(lr: f64, beta: f64, wd: f64) -> Hyper {
        Hyper::new(lr, beta, 0.0, wd)
    }

    #[test]
    fn matches_closed_forms_in_all_regimes() {
        // (lr, β, λ): underdamped, strongly underdamped (series and closed branch), overdamped.
        for &(lr, beta, wd) in &[(0.1, 0.9, 0.05), (0.5, 0.99, 0.5), (1.0, 0.95, 3.0), (0.1, 0.5, 0.01)] {
            let p = hp(lr, beta, wd);
            let s = second_order(Kind::Scale, p).unwrap();
            let h = lr;
            let gamma = (1.0 - beta) / (h * (1.0 + beta));
            let omega2 = 4.0 * wd / (h * (1.0 + beta));
            let (k, g, gp, pp) = table(gamma, omega2, h);
            assert!((1.0 - s.w2 * s.p - k).abs() < 1e-13, "K {lr} {beta} {wd}");
            assert!((s.g - g).abs() < 1e-13 * h, "G");
            assert!((s.gp - gp).abs() < 1e-13, "G'");
            assert!((s.p - pp).abs() < 1e-10 * pp.abs(), "P {} {}", s.p, pp);
            assert!((s.w2 - omega2).abs() < 1e-13 * omega2);
        }
    }

    #[test]
    fn continuous_across_critical_point() {
        // λ_c = (1−β)²/(4h(1+β)) for scale; step across it by ±1e-12 relative.
        let (lr, beta) = (0.1, 0.5);
        let lc = (1.0 - beta) * (1.0 - beta) / (4.0 * lr * (1.0 + beta));
        let at = |f: f64| second_order(Kind::Scale, hp(lr, beta, lc * f)).unwrap();
        let (lo, mid, hi) = (at(1.0 - 1e-12), at(1.0), at(1.0 + 1e-12));
        // Continuity: a relative change of 1e-12 in λ moves every coefficient by O(1e-12) (a
        // jump between formulas would show as O(1) or as rounding noise far above it).
        for (x, y) in [(lo, mid), (mid, hi)] {
            assert!((x.g - y.g).abs() < 1e-12 * lr);
            assert!((x.gp - y.gp).abs() < 1e-12);
            assert!((x.p - y.p).abs() < 1e-12 * lr * lr);
        }
        // And the critical table: G = h e^{−γh}, G' = e^{−γh}(1 − γh).
        let gamma = (1.0 - beta) / (lr * (1.0 + beta));
        let e = (-gamma * lr).exp();
        assert!((mid.g - lr * e).abs() < 1e-15);
        assert!((mid.gp - e * (1.0 - gamma * lr)).abs() < 1e-15);
        assert_eq!(regime(Kind::Scale, hp(lr, beta, lc)).unwrap(), Regime::Critical);
        assert_eq!(regime(Kind::Scale, hp(lr, beta, lc * 1.01)).unwrap(), Regime::Underdamped);
        assert_eq!(regime(Kind::Scale, hp(lr, beta, lc * 0.99)).unwrap(), Regime::Overdamped);
    }

    #[test]
    fn series_and_closed_branches_meet() {
        for &a in &[1e-3, 0.3, 1.0] {
            let below = q_integral(a, 4.0, 4.0 + a * a);
            let above = q_integral(a, 4.0 * (1.0 + 1e-15), 4.0 * (1.0 + 1e-15) + a * a);
            assert!((below - above).abs() < 1e-14, "{a}: {below} {above}");
            let (s0, c0) = sinc_cos(4.0);
            assert!((s0 - 2f64.sin() / 2.0).abs() < 1e-15 && (c0 - 2f64.cos()).abs() < 1e-15);
        }
    }

    #[test]
    fn no_weight_decay_and_zero_lr() {
        // λ = 0: P = h²Q with Q = (1/(2a))(1 − (1 − e^{−2a})/(2a)).
        let s = second_order(Kind::Scale, hp(0.1, 0.9, 0.0)).unwrap();
        let a: f64 = 0.1 / 1.9;
        let q = (1.0 - (-(-2.0 * a).exp_m1()) / (2.0 * a)) / (2.0 * a);
        assert!((s.p / 0.01 - q).abs() < 1e-14 * q);
        let z = second_order(Kind::Scale, hp(0.0, 0.9, 0.1)).unwrap();
        assert_eq!((z.g, z.gp, z.p, z.w2, z.cf), (0.0, 1.0, 0.0, 0.0, 0.0));
        assert!(second_order(Kind::Scale, Hyper::new(0.1, 0.9, 1.0, 0.0)).is_err());
        let f = first_order(Kind::Scale, hp(0.1, 0.0, 0.0));
        assert_eq!(f.p, 0.1);
    }

    #[test]
    fn tiny_learning_rates_give_finite_coefficients() {
        // Below lr ≈ 1.5e-154 the square lr² is subnormal, below 2.2e-162 it is 0: ω² = w/h²
        // was then infinite and the closed form NaN. Every coefficient is finite down to the
        // smallest double (ω² overflows only where λ/lr does).
        for &lr in &[1e-150, 1e-155, 1e-161, 1e-170, 1e-250, 1e-300] {
            for kind in [Kind::Scale, Kind::Translation] {
                let s = second_order(kind, hp(lr, 0.9, 1e-3)).unwrap();
                for x in [s.w2, s.g, s.gp, s.p, s.cf, s.h] {
                    assert!(x.is_finite(), "lr {lr}: {s:?}");
                }
                let expected = stiffness(kind) * 1e-3 / (lr * 1.9);
                assert!((s.w2 - expected).abs() <= 1e-12 * expected, "lr {lr}: {} vs {expected}", s.w2);
            }
        }
        // Where ω² itself overflows: refused, never a non-finite coefficient.
        assert!(matches!(second_order(Kind::Scale, hp(5e-324, 0.9, 1e-3)), Err(Error::InvalidArgument(m)) if m.contains("too small")));
        assert!(second_order(Kind::Scale, hp(5e-324, 0.9, 0.0)).is_ok());
        assert!(
            matches!(second_order(Kind::Translation, hp(1e300, 5e-324, 0.0)), Err(Error::InvalidArgument(m)) if m.contains("too large"))
        );
    }
}
