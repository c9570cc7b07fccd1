//! docs/theory.md §5.4: the equilibrium a scale group's norm reaches when minibatch noise dominates
//! the steps (successive gradients uncorrelated), ηλ small; corrections are O(ηλ/(1−β)²).

use crate::error::{Error, Result};

/// The four predictions of §5.4 for one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Equilibrium {
    /// |θ_A*|².
    pub norm_sq: f64,
    /// RMS angle (radians) θ turns by in one step at equilibrium.
    pub angular_update: f64,
    /// The learning rate the direction θ/|θ| sees: η/|θ*|² (SGD), η/|θ*| (AdamW).
    pub effective_lr: f64,
    /// Steps for the norm to relax to equilibrium (from nearby).
    pub relaxation_steps: f64,
}

fn check(name: &str, value: f64, lo: f64, hi: Option<f64>) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::NonFinite(format!("{name} is {value}")));
    }
    let above = match hi {
        Some(h) => value >= h,
        None => false,
    };
    if value < lo || above {
        let range = match hi {
            Some(h) => format!("in [{lo}, {h})"),
            None => format!(">= {lo}"),
        };
        return Err(Error::InvalidArgument(format!("{name} must be {range}, got {value}")));
    }
    Ok(())
}

/// Π num / Π den for positive finite factors (a numerator may be 0), never NaN: the plain
/// products when the result is a normal number, else through logarithms (an intermediate
/// product that overflows or underflows, e.g. lr = 1e300 with λ = 1e308, gives the right
/// finite value, or 0 / ∞ where the result itself is out of range).
fn ratio(num: &[f64], den: &[f64]) -> f64 {
    if num.contains(&0.0) {
        return 0.0;
    }
    let direct = num.iter().product::<f64>() / den.iter().product::<f64>();
    if direct.is_normal() {
        direct
    } else {
        (num.iter().map(|x| x.ln()).sum::<f64>() - den.iter().map(|x| x.ln()).sum::<f64>()).exp()
    }
}

/// No equilibrium: the norm is never pulled to a finite value (λ = 0) or never moves (η = 0).
const NONE: Equilibrium = Equilibrium { norm_sq: f64::INFINITY, angular_update: 0.0, effective_lr: 0.0, relaxation_steps: f64::INFINITY };

/// SGD with momentum β, dampening d and coupled weight decay λ (β = 0: plain SGD, where PyTorch
/// ignores d). grad_sq_unit = E|g̃_A|², the squared gradient at unit norm (|ĝ_A| = |g̃_A|/|θ_A|).
///   |θ*|⁴ = η(1−d)E|g̃|²/(2λ(1−β)),  angle √(2ηλ(1−d)/(1+β)),  η/|θ*|²,  (1−β)/(4ηλ(1−d)).
/// No equilibrium when λ = 0 or η(1−d) = 0 (nothing pulls the norm to a finite value, or no step
/// moves θ): norm_sq = ∞, angle 0, effective_lr 0, relaxation ∞. With E|g̃|² = 0 the norm decays
/// to 0 (norm_sq 0, effective_lr ∞). No output is ever NaN.
pub fn sgd(lr: f64, weight_decay: f64, grad_sq_unit: f64, momentum: f64, dampening: f64) -> Result<Equilibrium> {
    // −0.0 is 0 (x + 0.0 changes no other value): a signed zero must not give −∞.
    let (lr, weight_decay, grad_sq_unit, momentum, dampening) =
        (lr + 0.0, weight_decay + 0.0, grad_sq_unit + 0.0, momentum + 0.0, dampening + 0.0);
    check("lr", lr, 0.0, None)?;
    check("weight_decay", weight_decay, 0.0, None)?;
    check("grad_sq_unit", grad_sq_unit, 0.0, None)?;
    check("momentum", momentum, 0.0, Some(1.0))?;
    check("dampening", dampening, 0.0, None)?;
    if dampening > 1.0 {
        return Err(Error::InvalidArgument(format!("dampening must be in [0, 1], got {dampening}")));
    }
    let keep = if momentum == 0.0 { 1.0 } else { 1.0 - dampening };
    if lr == 0.0 || keep == 0.0 || weight_decay == 0.0 {
        return Ok(NONE);
    }
    let norm_sq = ratio(&[lr, keep, grad_sq_unit], &[2.0, weight_decay, 1.0 - momentum]).sqrt();
    Ok(Equilibrium {
        norm_sq,
        angular_update: ratio(&[2.0, lr, weight_decay, keep], &[1.0 + momentum]).sqrt(),
        effective_lr: lr / norm_sq,
        relaxation_steps: ratio(&[1.0 - momentum], &[4.0, lr, weight_decay, keep]),
    })
}

/// AdamW (decoupled λ, first-moment β1). update_sq = E|u_A|², the squared norm of Adam's step
/// direction (≈ |A|(1−β1)/(1+β1) when noise dominates: the first moment averages the noise down).
///   |θ*|² = ηE|u|²(1+β1)/(2λ(1−β1)),  angle √(2ηλ(1−β1)/(1+β1)),  η/|θ*|,  1/(2ηλ).
/// No equilibrium when η = 0 or λ = 0 (as [`sgd`]); E|u|² = 0 gives norm_sq 0, effective_lr ∞.
pub fn adamw(lr: f64, weight_decay: f64, update_sq: f64, beta1: f64) -> Result<Equilibrium> {
    let (lr, weight_decay, update_sq, beta1) = (lr + 0.0, weight_decay + 0.0, update_sq + 0.0, beta1 + 0.0);
    check("lr", lr, 0.0, None)?;
    check("weight_decay", weight_decay, 0.0, None)?;
    check("update_sq", update_sq, 0.0, None)?;
    check("beta1", beta1, 0.0, Some(1.0))?;
    if lr == 0.0 || weight_decay == 0.0 {
        return Ok(NONE);
    }
    let norm_sq = ratio(&[lr, update_sq, 1.0 + beta1], &[2.0, weight_decay, 1.0 - beta1]);
    Ok(Equilibrium {
        norm_sq,
        angular_update: ratio(&[2.0, lr, weight_decay, 1.0 - beta1], &[1.0 + beta1]).sqrt(),
        effective_lr: lr / norm_sq.sqrt(),
        relaxation_steps: ratio(&[1.0], &[2.0, lr, weight_decay]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain SGD on a pure-noise scale-invariant toy (deterministic LCG noise), ηλ = 1e-4:
    /// the long-run mean of |θ|² is within 3% of the prediction.
    #[test]
    fn sgd_equilibrium_matches_a_noise_toy() {
        let (lr, wd, dim) = (0.1, 1e-3, 8usize);
        let mut seed = 12345u64;
        let mut normal = move || {
            // Box–Muller from a 64-bit LCG: enough for a test.
            let mut uni = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (u1, u2) = (uni(), uni());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let pred = sgd(lr, wd, (dim - 1) as f64, 0.0, 0.0).unwrap();
        let mut th: Vec<f64> = (0..dim).map(|_| normal()).collect();
        let scale = (pred.norm_sq / th.iter().map(|x| x * x).sum::<f64>()).sqrt();
        th.iter_mut().for_each(|x| *x *= scale);
        let (mut acc, mut count) = (0.0, 0usize);
        for n in 0..400_000 {
            let x: f64 = th.iter().map(|v| v * v).sum();
            let xi: Vec<f64> = (0..dim).map(|_| normal()).collect();
            let proj: f64 = xi.iter().zip(&th).map(|(a, b)| a * b).sum::<f64>() / x;
            let norm = x.sqrt();
            for (t, z) in th.iter_mut().zip(&xi) {
                let g = (z - proj * *t) / norm;
                *t -= lr * (g + wd * *t);
            }
            if n >= 20_000 {
                acc += x;
                count += 1;
            }
        }
        let mean = acc / count as f64;
        assert!((mean / pred.norm_sq - 1.0).abs() < 0.03, "{mean} vs {}", pred.norm_sq);
    }

    #[test]
    fn formulas_and_domains() {
        let e = sgd(0.1, 1e-3, 4.0, 0.9, 0.0).unwrap();
        assert!((e.norm_sq - (0.1 * 4.0 / (2.0 * 1e-3 * 0.1f64)).sqrt()).abs() < 1e-12);
        assert!((e.relaxation_steps - 0.1 / (4.0 * 1e-4)).abs() < 1e-9);
        let a = adamw(1e-3, 0.1, 10.0, 0.9).unwrap();
        assert!((a.relaxation_steps - 5000.0).abs() < 1e-9);
        assert!(sgd(-0.1, 1e-3, 1.0, 0.0, 0.0).is_err());
        assert!(sgd(0.1, 1e-3, 1.0, 1.0, 0.0).is_err());
        assert!(matches!(adamw(0.1, f64::NAN, 1.0, 0.9), Err(Error::NonFinite(_))));
        assert_eq!(sgd(0.1, 0.0, 1.0, 0.0, 0.0).unwrap().norm_sq, f64::INFINITY);
    }

    #[test]
    fn edges_are_limits_never_nan() {
        // lr = 0, λ = 0, both, −0.0, dampening 1 with momentum, zero noise: no NaN, no −∞.
        let grid = [0.0, -0.0, 5e-324, 1e-300, 0.1, 1e300, f64::MAX];
        for &lr in &grid {
            for &wd in &grid {
                for &g in &grid {
                    for &(m, d) in &[(0.0, 0.0), (0.9, 0.0), (0.9, 1.0), (0.5, 0.3), (1.0 - f64::EPSILON, 0.0)] {
                        let e = sgd(lr, wd, g, m, d).unwrap();
                        let a = adamw(lr, wd, g, m).unwrap();
                        for x in [
                            e.norm_sq,
                            e.angular_update,
                            e.effective_lr,
                            e.relaxation_steps,
                            a.norm_sq,
                            a.angular_update,
                            a.effective_lr,
                            a.relaxation_steps,
                        ] {
                            assert!(!x.is_nan() && x >= 0.0, "lr {lr} wd {wd} g {g} m {m} d {d}: {e:?} {a:?}");
                        }
                    }
                }
            }
        }
        assert_eq!(sgd(0.0, 1e-3, 1.0, 0.0, 0.0).unwrap(), NONE);
        assert_eq!(sgd(0.1, -0.0, 1.0, 0.0, 0.0).unwrap(), NONE);
        assert_eq!(adamw(0.0, 0.1, 1.0, 0.9).unwrap(), NONE);
    }
}
