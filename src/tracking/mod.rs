//! The tracker's per-step work for one run, in Rust: one call per measured step turns the fused
//! sums of every reduction row (`stats`) into the run's row and advances both theories.
//!
//! Read top-down:
//! - [`plan`]: the index maps of a measurement plan (rows → parts → columns → groups) and the
//!   one signed sum from parts to columns to groups that every path uses;
//! - [`algebra`]: what one pass over (θ_n, ĝ_n, b_{n−1}) says about a `torch.optim.SGD` step, and
//!   what a measured update says for any other optimizer (docs/theory.md §5.3);
//! - [`lanes`]: the theory streams (the paper's closed form and the exact ledger), one lane per
//!   (symmetry, param_group);
//! - [`snapshot`]: a tracker's state as named arrays, for checkpoints (export/import);
//! - [`tracker`]: the run's state between steps (clock, held drive, streams) and the calls the
//!   Python tracker makes: `step_sgd`, `step_update`, `skip`, `final_row`.
//!
//! Terms: a *row* is one output row of a fused reduction; a *part* is one (parameter, index,
//! sign) entry of a symmetry group, a set of rows; a *column* is the parts of one group that
//! share one optimizer param_group (one ledger runs per column, docs/theory.md §5.3); a *group*
//! is a symmetry group, a run of columns.

pub mod algebra;
pub mod lanes;
pub mod plan;
pub mod snapshot;
pub mod tracker;

pub use plan::Plan;
pub use tracker::{ParamGroupHyper, StepReport, Tracker, UpdateRule};

/// The fields of one recorded row of a run, in order: the row is (ROW_FIELDS, groups). The
/// Python `Run` stores rows in this layout (`neural_mechanics.run.COLUMNS`). After `residual`:
/// the ledger split of the step (`decay`, `drive`, `breaking`, docs/theory.md §5.5) and, for
/// scale groups, the live equilibrium (`effective_lr`, `angular_update` and their §5.4 values,
/// §5.6). New fields go at the end: saved runs without them load them as NaN.
pub const ROW_FIELDS: [&str; 20] = [
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "measured",
    "paper",
    "exact",
    "grad_sq",
    "update_sq",
    "flux",
    "update_sum",
    "magnitude",
    "residual",
    "decay",
    "drive",
    "breaking",
    "effective_lr",
    "angular_update",
    "effective_lr_eq",
    "angular_update_eq",
];

/// A group whose |ĝ_A|² is at most this fraction of its layer's |ĝ_L|² (the |ĝ|² of the layer's
/// groups added up) has "no gradient": its residual proves nothing (docs/theory.md §3). The same
/// rule as `neural_mechanics.verify`'s |ĝ_A| ≤ 1e-5·|ĝ_L|, squared.
pub const NO_GRADIENT: f64 = 1e-10;
