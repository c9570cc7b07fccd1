//! Per-step hyperparameters and schedules.

use crate::error::{Error, Result};

/// The hyperparameters of one optimizer step, as `torch.optim.SGD` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// Learning rate η ≥ 0.
    pub lr: f64,
    /// Momentum β ∈ [0, 1).
    pub momentum: f64,
    /// Dampening d ∈ [0, 1] (ignored by PyTorch, and here, when β = 0).
    pub dampening: f64,
    /// Coupled weight decay λ ≥ 0.
    pub weight_decay: f64,
}

impl Hyper {
    /// The four values, each with −0.0 read as +0.0 (x + 0.0 changes no other value), so that a
    /// signed zero never turns a 1/λ into −∞.
    pub fn new(lr: f64, momentum: f64, dampening: f64, weight_decay: f64) -> Hyper {
        Hyper { lr: lr + 0.0, momentum: momentum + 0.0, dampening: dampening + 0.0, weight_decay: weight_decay + 0.0 }
    }

    /// Check every value's domain; `at` names the step in messages.
    pub fn validate(&self, at: Option<usize>) -> Result<()> {
        let named = [("lr", self.lr), ("momentum", self.momentum), ("dampening", self.dampening), ("weight_decay", self.weight_decay)];
        for (name, value) in named {
            check_value(name, value, at)?;
        }
        Ok(())
    }
}

/// The domain of one hyperparameter (NaN and ±inf first): lr ≥ 0, momentum ∈ [0, 1),
/// dampening ∈ [0, 1], weight_decay ≥ 0. `at` names the step in messages.
pub fn check_value(name: &str, value: f64, at: Option<usize>) -> Result<()> {
    let where_ = || at.map(|n| format!(" at step {n}")).unwrap_or_default();
    if !value.is_finite() {
        return Err(Error::NonFinite(format!("{name} is {value}{}", where_())));
    }
    let (ok, range) = match name {
        "momentum" => ((0.0..1.0).contains(&value), "in [0, 1)"),
        "dampening" => ((0.0..=1.0).contains(&value), "in [0, 1]"),
        _ => (value >= 0.0, ">= 0"),
    };
    if !ok {
        return Err(Error::InvalidArgument(format!("{name} must be {range}, got {value}{}", where_())));
    }
    Ok(())
}

/// Hyperparameters for `steps` steps: each of the four is one value for every step (a slice
/// of length 1) or one value per step (a slice of length `steps`).
#[derive(Clone, Copy, Debug)]
pub struct Schedule<'a> {
    steps: usize,
    lr: &'a [f64],
    momentum: &'a [f64],
    dampening: &'a [f64],
    weight_decay: &'a [f64],
}

impl<'a> Schedule<'a> {
    /// Validates lengths and every value (so the kernels never meet a bad step).
    pub fn new(steps: usize, lr: &'a [f64], momentum: &'a [f64], dampening: &'a [f64], weight_decay: &'a [f64]) -> Result<Schedule<'a>> {
        for (name, s) in [("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)] {
            if s.len() != 1 && s.len() != steps {
                return Err(Error::Shape(format!("{name} has {} values; give one value or one per step ({steps})", s.len())));
            }
        }
        // Every value given is checked once (a constant once, not once per step: `steps` alone
        // may be large), so the kernels never meet a bad step and an unused bad value is still
        // a bad call.
        for (name, values) in [("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)] {
            if values.len() == 1 && steps != 1 {
                check_value(name, values[0], None)?;
            } else {
                for (n, &v) in values.iter().enumerate() {
                    check_value(name, v, Some(n))?;
                }
            }
        }
        Ok(Schedule { steps, lr, momentum, dampening, weight_decay })
    }

    /// Whether every hyperparameter is one value for all steps (no per-step array).
    pub fn is_constant(&self) -> bool {
        [self.lr, self.momentum, self.dampening, self.weight_decay].iter().all(|s| s.len() == 1)
    }

    /// The hyperparameter `name`'s values: one, or one per step.
    pub fn values(&self, name: &str) -> &'a [f64] {
        match name {
            "lr" => self.lr,
            "momentum" => self.momentum,
            "dampening" => self.dampening,
            _ => self.weight_decay,
        }
    }

    /// A schedule with one set of hyperparameters for every step.
    pub fn constant(steps: usize, h: &'a [f64; 4]) -> Result<Schedule<'a>> {
        Schedule::new(steps, &h[0..1], &h[1..2], &h[2..3], &h[3..4])
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The hyperparameters of step n (n < steps).
    pub fn at(&self, n: usize) -> Hyper {
        let pick = |s: &[f64]| if s.len() == 1 { s[0] } else { s[n] };
        Hyper::new(pick(self.lr), pick(self.momentum), pick(self.dampening), pick(self.weight_decay))
    }
}

/// The model time of the closed forms at every step boundary, t_0 = 0, t_{n+1} = t_n + h_n with
/// h_n = η_n(1−d_n) with momentum and η_n without (docs/theory.md §1): `steps + 1` values, summed
/// in order exactly as the streams advance their clock. Weight decay plays no part (pass 0).
/// A schedule of constants may ask for at most [`super::MAX_UNBACKED_VALUES`] values.
pub fn times(schedule: &Schedule) -> Result<Vec<f64>> {
    let steps = schedule.steps();
    let rows = steps.checked_add(1).ok_or_else(|| Error::InvalidArgument(format!("steps={steps} is too large")))?;
    let mut out = super::result_buffer("times", rows, 1, !schedule.is_constant())?;
    let mut t = 0.0;
    for n in 0..steps {
        let hp = schedule.at(n);
        t += if hp.momentum > 0.0 { hp.lr * (1.0 - hp.dampening) } else { hp.lr };
        if !t.is_finite() {
            return Err(Error::NonFinite(format!("the model time overflows float64 at step {n} (lr = {:e})", hp.lr)));
        }
        out[n + 1] = t;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_zero_is_zero_and_every_given_value_is_checked() {
        let h = Hyper::new(-0.0, -0.0, -0.0, -0.0);
        assert!(h.lr.is_sign_positive() && h.weight_decay.is_sign_positive() && h.momentum.is_sign_positive());
        // A constant is checked once even for a huge number of steps (this returns at once).
        assert!(Schedule::new(usize::MAX, &[0.1], &[0.9], &[0.0], &[1e-3]).is_ok());
        assert!(matches!(Schedule::new(usize::MAX, &[f64::NAN], &[0.9], &[0.0], &[0.0]), Err(Error::NonFinite(_))));
        // steps = 0 with a per-step array of length 0 still checks the constants.
        assert!(matches!(Schedule::new(0, &[], &[2.0], &[0.0], &[0.0]), Err(Error::InvalidArgument(_))));
        assert!(
            matches!(Schedule::new(3, &[0.1, -1.0, 0.1], &[0.0], &[0.0], &[0.0]), Err(Error::InvalidArgument(m)) if m.contains("step 1"))
        );
    }

    #[test]
    fn times_follow_the_clock_and_refuse_unbacked_sizes() {
        let s = Schedule::new(3, &[0.1, 0.2, 0.3], &[0.0, 0.5, 0.5], &[0.5], &[0.0]).unwrap();
        assert_eq!(times(&s).unwrap(), vec![0.0, 0.1, 0.1 + 0.2 * 0.5, 0.1 + 0.2 * 0.5 + 0.3 * 0.5]);
        let huge = Schedule::new(1 << 40, &[0.1], &[0.0], &[0.0], &[0.0]).unwrap();
        assert!(matches!(times(&huge), Err(Error::InvalidArgument(m)) if m.contains("1099511627777 rows")));
    }
}
