//! The theory engine (docs/theory.md §5): the paper's closed forms, the exact discrete ledger and
//! equilibrium predictions, float64, O(groups) state.
//!
//! Layout of the module:
//! - [`hyper`]: per-step hyperparameters (η, β, d, λ), their validation and schedules;
//! - [`propagator`]: the exact one-step propagators of the paper's ODEs (first and second order),
//!   computed once per step from the hyperparameters alone (they do not depend on the group);
//! - [`paper`]: §5.1/§5.2 closed forms, streaming ([`paper::PaperState`]) and batch;
//! - [`ledger`]: §5.3 exact identities of `torch.optim.SGD` and the optimizer-agnostic one;
//! - [`equilibrium`]: §5.4 equilibrium norm, angular update, effective lr, relaxation time;
//! - `chunks`: the per-group loops, run on the crate's private pool for large group counts.
//!
//! Every per-group update is element-wise (no reduction across groups), so results do not
//! depend on the thread count, and the batch forms call the very same per-step kernels as the
//! streaming forms: both agree to the last bit.

mod chunks;
pub mod equilibrium;
pub mod hyper;
pub mod ledger;
pub mod paper;
pub mod propagator;

pub use hyper::{Hyper, Schedule};

use crate::error::{Error, Result};

/// The three charge kinds of docs/theory.md §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// q_A = ⟨θ_A, 1⟩.
    Translation,
    /// x_A = |θ_A|².
    Scale,
    /// Δ_A = |θ_A1|² − |θ_A2|² (A1: the incoming side, A2: the outgoing side).
    Rescale,
}

impl Kind {
    pub const NAMES: [&'static str; 3] = ["translation", "scale", "rescale"];

    pub fn parse(name: &str) -> Result<Kind> {
        match name {
            "translation" => Ok(Kind::Translation),
            "scale" => Ok(Kind::Scale),
            "rescale" => Ok(Kind::Rescale),
            _ => Err(Error::InvalidArgument(format!("unknown charge kind {name:?}; expected one of {:?}", Kind::NAMES))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Translation => "translation",
            Kind::Scale => "scale",
            Kind::Rescale => "rescale",
        }
    }

    /// Scale and rescale charges are quadratic in θ (|θ|²), translation is linear (⟨θ, 1⟩).
    pub fn is_quadratic(self) -> bool {
        !matches!(self, Kind::Translation)
    }
}

/// Fail with NonFinite naming the first non-finite entry of a (rows, groups) array.
pub(crate) fn check_finite(name: &str, data: &[f64], groups: usize) -> Result<()> {
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        let (row, col) = (i.checked_div(groups).unwrap_or(0), i.checked_rem(groups).unwrap_or(i));
        let where_ = if data.len() > groups { format!("step {row}, group {col}") } else { format!("group {col}") };
        return Err(Error::NonFinite(format!("{name} is {} at {where_}", data[i])));
    }
    Ok(())
}

/// Fail with Shape unless `data` holds exactly `rows * groups` values.
pub(crate) fn check_len(name: &str, data: &[f64], rows: usize, groups: usize) -> Result<()> {
    if data.len() != rows * groups {
        return Err(Error::Shape(format!("{name} has {} values but {rows} steps x {groups} groups need {}", data.len(), rows * groups)));
    }
    Ok(())
}
