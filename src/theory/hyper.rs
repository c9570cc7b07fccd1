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
    pub fn new(lr: f64, momentum: f64, dampening: f64, weight_decay: f64) -> Hyper {
        Hyper { lr, momentum, dampening, weight_decay }
    }

    /// Check every value's domain; `at` names the step in messages.
    pub fn validate(&self, at: Option<usize>) -> Result<()> {
        let where_ = at.map(|n| format!(" at step {n}")).unwrap_or_default();
        let named = [("lr", self.lr), ("momentum", self.momentum), ("dampening", self.dampening), ("weight_decay", self.weight_decay)];
        for (name, value) in named {
            if !value.is_finite() {
                return Err(Error::NonFinite(format!("{name} is {value}{where_}")));
            }
        }
        if self.lr < 0.0 {
            return Err(Error::InvalidArgument(format!("lr must be >= 0, got {}{where_}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::InvalidArgument(format!("momentum must be in [0, 1), got {}{where_}", self.momentum)));
        }
        if !(0.0..=1.0).contains(&self.dampening) {
            return Err(Error::InvalidArgument(format!("dampening must be in [0, 1], got {}{where_}", self.dampening)));
        }
        if self.weight_decay < 0.0 {
            return Err(Error::InvalidArgument(format!("weight_decay must be >= 0, got {}{where_}", self.weight_decay)));
        }
        Ok(())
    }
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
        let schedule = Schedule { steps, lr, momentum, dampening, weight_decay };
        for n in 0..steps {
            schedule.at(n).validate(Some(n))?;
        }
        if steps == 0 && [lr, momentum, dampening, weight_decay].iter().all(|s| s.len() == 1) {
            // Nothing will be read, but a bad value is still a bad call.
            Hyper::new(lr[0], momentum[0], dampening[0], weight_decay[0]).validate(None)?;
        }
        Ok(schedule)
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
