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
//! Untrusted sizes: a batch form allocates its (steps + 1, groups) result fallibly (an error
//! naming the size, never an abort), refuses a result that no input array backs beyond
//! [`MAX_UNBACKED_VALUES`], and calls an [`Interrupt`] every few milliseconds of work so
//! that a long loop can be stopped (the Python bindings check for Ctrl-C there).
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

pub use hyper::{times, Hyper, Schedule};

use crate::error::{Error, Result};

/// Called by the batch forms between steps; an error stops the loop and is returned as is.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> Result<()>;

/// An [`Interrupt`] that never stops anything.
pub fn never() -> Result<()> {
    Ok(())
}

/// The batch loops call their [`Interrupt`] after about this much work: a step counts its
/// groups plus [`STEP_WEIGHT`] (the fixed cost of a step: hyperparameter checks, a propagator),
/// so a check comes every few milliseconds whatever the shape (every 4,096 steps of a run of a
/// few groups, every ~10 steps of 10⁵ groups).
pub const INTERRUPT_EVERY: usize = 1 << 20;
/// What one step costs besides its groups, in units of one group's update.
pub const STEP_WEIGHT: usize = 256;

/// The most values (8 bytes each) a batch result may hold when no (steps, groups) input array
/// backs it, i.e. when its size comes from `steps` and the number of groups alone (translation
/// closed forms with no drive, `times`): 2^27 values, 1 GiB. Longer runs stream (PaperStream).
pub const MAX_UNBACKED_VALUES: usize = 1 << 27;

/// Counts work between calls of an [`Interrupt`].
pub(crate) struct Ticker<'a, 'b> {
    per_step: usize,
    done: usize,
    interrupt: &'a mut Interrupt<'b>,
}

impl<'a, 'b> Ticker<'a, 'b> {
    pub(crate) fn new(groups: usize, interrupt: &'a mut Interrupt<'b>) -> Self {
        Ticker { per_step: groups.saturating_add(STEP_WEIGHT), done: 0, interrupt }
    }

    /// One step done; calls the interrupt every [`INTERRUPT_EVERY`] units of work.
    #[inline(always)]
    pub(crate) fn tick(&mut self) -> Result<()> {
        self.done += self.per_step;
        if self.done >= INTERRUPT_EVERY {
            self.done = 0;
            (self.interrupt)()?;
        }
        Ok(())
    }
}

/// `rows * groups` zeros for a batch result, allocated fallibly: an overflowing or
/// refused size is an error naming it. `backed`: whether an input array of about that size
/// exists (else the size is capped by [`MAX_UNBACKED_VALUES`]).
pub(crate) fn result_buffer(what: &str, rows: usize, groups: usize, backed: bool) -> Result<Vec<f64>> {
    let describe = || {
        let values = rows as f64 * groups as f64;
        let count = rows.checked_mul(groups).map_or_else(|| format!("{values:.0}"), |n| n.to_string());
        format!("{what}: {rows} rows x {groups} groups = {count} values ({})", crate::stats::fmt_bytes(values * 8.0))
    };
    // A numpy array's non-zero dimensions times 8 bytes must fit in isize, even when it holds no
    // value: (2^62 + 1, 0) is refused by numpy, so it is refused here too.
    let n = rows
        .checked_mul(groups)
        .filter(|_| rows.max(1).checked_mul(groups.max(1)).and_then(|n| n.checked_mul(8)).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| Error::InvalidArgument(format!("{} is too large for an array", describe())))?;
    if !backed && n > MAX_UNBACKED_VALUES {
        return Err(Error::InvalidArgument(format!(
            "{}: no input array of that size was given, and such a result may hold at most \
             {MAX_UNBACKED_VALUES} values; advance a stream step by step instead",
            describe()
        )));
    }
    zeroed(n).ok_or_else(|| Error::InvalidArgument(format!("{}: cannot allocate it", describe())))
}

/// `n` zeros from the allocator's zeroed memory (pages the kernel hands out already zero, so no
/// pass writes them), or None if the allocator refuses.
fn zeroed(n: usize) -> Option<Vec<f64>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f64>(n).ok()?;
    // SAFETY: the layout has a non-zero size; all-zero bytes are a valid f64 (0.0); the Vec owns
    // the allocation with exactly the layout it was made with (capacity n, global allocator).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut f64;
        if ptr.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(ptr, n, n))
    }
}

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
