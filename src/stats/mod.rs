//! Fused one-pass per-group reductions over a parameter θ, its gradient ĝ and optionally a
//! velocity v (docs/theory.md §2, last paragraph).
//!
//! Every group shape of the project is one of two reductions over a 3-D view (out, in, rest) of
//! a tensor: keep axis 0 (rows) or keep axis 1 in blocks of `block` columns. Both are the same
//! loop over a [`Layout`] (outer, groups, seg): group g is the union over o < outer of the
//! contiguous segment starting at (o·groups + g)·seg of length seg.
//!   rows:            outer = 1,   groups = out,        seg = in·rest
//!   column blocks:   outer = out, groups = in / block, seg = block·rest
//!
//! One pass reads each element once and produces, per group, the sums listed in [`Sums`]
//! (2, 5 or 8 of them, by how many arrays are given), accumulated in float64. Work is cut into
//! tasks whose plan depends only on the shapes (never on the thread count), and partial sums
//! are merged in plan order, so results are bit-identical for any number of threads.
//!
//! Reading order, top-down:
//! - this file: the public API, [`group_stats_batch`] and its helpers;
//! - `input`: what a call reduces ([`DType`], [`Data`], [`Layout`], [`Item`]), and its validation;
//! - `plan`: the cut into tasks, the pairing of a tensor reduced by rows and by columns into one
//!   read, and the plan-order merge;
//! - `segments`: long contiguous segments (rows, long column blocks);
//! - `columns`: short segments, swept as tiles of columns;
//! - `kernels`: the inner loops (portable, AVX2, AVX-512) and the run-time choice between them;
//! - `sums`: which sums, in which order, and which product each one adds up (one table);
//! - `bandwidth`: [`read_pass`], a plain read of the same bytes (the benchmarks' limit);
//! - `adam`: [`adam_updates`], the update torch's Adam/AdamW is about to apply, computed from
//!   its state so that the tracker reduces (θ, ĝ, d) without copying θ.
//!
//! Dependencies point one way, with no cycle: this file → plan → segments, columns → kernels →
//! sums; `input` uses only `sums`, and `bandwidth` only `plan`'s task sizes and `kernels`'
//! CPU check; `adam` only `input` and `kernels`' CPU check.

mod adam;
mod bandwidth;
mod columns;
mod input;
mod kernels;
mod plan;
mod segments;
mod sums;

#[cfg(test)]
mod tests;

pub use adam::{adam_updates, AdamHyper, AdamParam, Update};
pub use bandwidth::read_pass;
pub use input::{fmt_bytes, fmt_shape, DType, Data, Item, Layout, MAX_EMPTY_GROUPS};
pub use sums::Sums;

use crate::error::{Error, Result};

/// Per-group sums of every item: one row of `item.width()` sums per group, row-major, in the
/// order of [`Sums::NAMES`]. Non-finite inputs give non-finite sums (see [`check_finite`]).
pub fn group_stats_batch(items: &[Item<'_>]) -> Result<Vec<Vec<f64>>> {
    for (i, item) in items.iter().enumerate() {
        item.validate(i)?;
    }
    let tasks = plan::plan(items);
    let partials = plan::run(items, &tasks)?;
    plan::merge(items, &tasks, &partials)
}

/// The sums of one item.
pub fn group_stats(item: &Item<'_>) -> Result<Vec<f64>> {
    Ok(group_stats_batch(std::slice::from_ref(item))?.pop().unwrap_or_default())
}

/// An error naming the first tensor and group whose sums are not finite, and which input holds
/// the NaN or infinity (θ if the θ sums are bad, else ĝ, else v).
pub fn check_finite(items: &[Item<'_>], outputs: &[Vec<f64>]) -> Result<()> {
    const INPUTS: [&str; 3] = ["theta", "grad", "velocity"];
    for (i, (item, out)) in items.iter().zip(outputs).enumerate() {
        let k = item.width();
        for (g, row) in out.chunks_exact(k).enumerate() {
            if let Some(bad) = row.iter().position(|x| !x.is_finite()) {
                let which = INPUTS[Sums::newest_input(bad)];
                return Err(Error::NonFinite(format!("tensor {i}, group {g}: {} is not finite (NaN or inf in {which})", Sums::NAMES[bad])));
            }
        }
    }
    Ok(())
}
