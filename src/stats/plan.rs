//! The work plan of one call: every item cut into tasks of about TASK_ELEMS elements whose
//! boundaries depend only on the shapes (never on the thread count), a tensor reduced by rows and
//! by columns read once, the tasks run on the pool, and their partial sums merged in plan order,
//! so results are bit-identical for any number of threads.

use super::input::{Data, Item, Layout};
use super::{columns, segments};
use crate::error::{Error, Result};
use crate::pool;
use rayon::prelude::*;

/// Elements per task: large enough that scheduling costs nothing, small enough to balance.
pub(super) const TASK_ELEMS: usize = 1 << 18;
/// At most this many tasks per column-reduced tensor (each task holds a partial sum for every
/// group, merged at the end; more tasks would make the merge cost show).
const MAX_COLUMN_TASKS: usize = 16;
/// Below this many elements in a whole call, work on the calling thread: waking the pool costs
/// more than it saves.
pub(super) const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Segments shorter than this are reduced by the column tiles of `columns`.
const SHORT_SEG: usize = 32;

/// Groups [groups.0, groups.1) of rows [outer.0, outer.1) of one item, elements [seg.0, seg.1)
/// of each segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Task {
    item: usize,
    outer: (usize, usize),
    groups: (usize, usize),
    seg: (usize, usize),
    /// A rows item over the same tensor whose sums this task's read gives too (see [`pairs`]).
    rows_of: Option<usize>,
}

/// One task's sums: k per group of the task and, for a task with `rows_of`, k per row of the
/// task (for the rows item).
pub(super) struct Partial {
    groups: Vec<f64>,
    rows: Vec<f64>,
}

/// A tensor reduced both by rows and by columns in one call (a conv or Linear between two
/// symmetries: its rows are one neuron's incoming weights, its columns the previous neurons'
/// outgoing ones) is read once: each column item is paired with the rows item over the same
/// arrays, if any. Returns, per item, the rows item its column tasks also reduce.
pub(super) fn pairs(items: &[Item<'_>]) -> Vec<Option<usize>> {
    let mut fused = vec![None; items.len()];
    let mut taken = vec![false; items.len()];
    for (c, cols) in items.iter().enumerate() {
        let Layout { outer, groups, seg } = cols.layout;
        if outer < 2 || cols.layout.is_empty() {
            continue;
        }
        let rows_layout = Layout { outer: 1, groups: outer, seg: groups * seg };
        let found = (0..items.len()).find(|&r| !taken[r] && items[r].layout == rows_layout && same_arrays(&items[r], cols));
        if let Some(r) = found {
            taken[r] = true;
            fused[c] = Some(r);
        }
    }
    fused
}

/// Whether two items read the same memory (same arrays, addresses, lengths and dtypes).
fn same_arrays(a: &Item<'_>, b: &Item<'_>) -> bool {
    let same = |x: Option<Data<'_>>, y: Option<Data<'_>>| match (x, y) {
        (None, None) => true,
        (Some(x), Some(y)) => x.identity() == y.identity(),
        _ => false,
    };
    same(Some(a.theta), Some(b.theta)) && same(a.grad, b.grad) && same(a.velocity, b.velocity)
}

/// The tasks of one call, in the order their sums are merged.
pub(super) fn plan(items: &[Item<'_>]) -> Vec<Task> {
    let fused = pairs(items);
    let mut read_by_columns = vec![false; items.len()];
    for r in fused.iter().flatten() {
        read_by_columns[*r] = true;
    }
    let mut tasks = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Layout { outer, groups, seg } = item.layout;
        if item.layout.is_empty() || read_by_columns[i] {
            continue;
        }
        if outer == 1 {
            if seg >= TASK_ELEMS {
                // Long rows (a whole-tensor group, a wide fc row): split inside the segment.
                let pieces = seg.div_ceil(TASK_ELEMS);
                let step = seg.div_ceil(pieces);
                for g in 0..groups {
                    let mut s = 0;
                    while s < seg {
                        let e = (s + step).min(seg);
                        tasks.push(Task { item: i, outer: (0, 1), groups: (g, g + 1), seg: (s, e), rows_of: None });
                        s = e;
                    }
                }
            } else {
                let per = (TASK_ELEMS / seg).max(1);
                let mut g = 0;
                while g < groups {
                    let e = (g + per).min(groups);
                    tasks.push(Task { item: i, outer: (0, 1), groups: (g, e), seg: (0, seg), rows_of: None });
                    g = e;
                }
            }
        } else {
            let pieces = (item.layout.len() / TASK_ELEMS).clamp(1, MAX_COLUMN_TASKS).min(outer);
            let step = outer.div_ceil(pieces);
            let mut o = 0;
            while o < outer {
                let e = (o + step).min(outer);
                tasks.push(Task { item: i, outer: (o, e), groups: (0, groups), seg: (0, seg), rows_of: fused[i] });
                o = e;
            }
        }
    }
    tasks
}

impl Task {
    /// Elements of one array this task reads.
    fn elems(&self, items: &[Item<'_>]) -> usize {
        let seg = items[self.item].layout.seg;
        let per_segment = if self.seg.1 > self.seg.0 { self.seg.1 - self.seg.0 } else { seg };
        (self.outer.1 - self.outer.0) * (self.groups.1 - self.groups.0) * per_segment
    }

    /// This task's sums: short segments by column tiles, long ones by segment kernels.
    fn run(&self, items: &[Item<'_>]) -> Partial {
        let item = &items[self.item];
        let k = item.width();
        let seg = item.layout.seg;
        let (g0, g1) = self.groups;
        let mut partial = vec![0f64; (g1 - g0) * k];
        let mut rows = vec![0f64; if self.rows_of.is_some() { (self.outer.1 - self.outer.0) * k } else { 0 }];
        let rows_out = self.rows_of.map(|_| rows.as_mut_slice());
        if seg < SHORT_SEG {
            // Short segments are never split (self.seg is the whole segment).
            columns::reduce_short(item, self.outer, (g0 * seg, g1 * seg), &mut partial, rows_out);
        } else {
            segments::reduce_long(item, self.outer, self.groups, self.seg, &mut partial, rows_out);
        }
        Partial { groups: partial, rows }
    }
}

/// Every task's sums, on the caller's thread or the pool (same tasks either way).
pub(super) fn run(items: &[Item<'_>], tasks: &[Task]) -> Result<Vec<Partial>> {
    // Also validates NEURAL_MECHANICS_NUM_THREADS on every call, not only on the large ones.
    let threads = pool::num_threads()?;
    let total: usize = tasks.iter().map(|t| t.elems(items)).sum();
    // One thread: work on the caller's thread (handing work to a one-thread pool only adds a
    // wake-up). Same tasks, same merge order, so the result is bit-identical either way.
    Ok(if threads == 1 || total < PARALLEL_MIN_ELEMS || tasks.len() < 2 {
        tasks.iter().map(|t| t.run(items)).collect()
    } else {
        pool::pool()?.install(|| tasks.par_iter().map(|t| t.run(items)).collect())
    })
}

/// The tasks' partial sums added up per item, in plan order: one row of `item.width()` sums per
/// group, row-major.
///
/// The outputs are allocated fallibly: a result the allocator refuses is an error naming its
/// size, never an abort (validation already bounded every item's group count).
pub(super) fn merge(items: &[Item<'_>], tasks: &[Task], partials: &[Partial]) -> Result<Vec<Vec<f64>>> {
    let mut outputs: Vec<Vec<f64>> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        outputs.push(zeros(it.layout.groups.saturating_mul(it.width())).map_err(|bytes| {
            Error::InvalidArgument(format!(
                "tensor {i}: cannot allocate the result of {} groups ({})",
                it.layout.groups,
                super::input::fmt_bytes(bytes)
            ))
        })?);
    }
    for (task, partial) in tasks.iter().zip(partials) {
        let k = items[task.item].width();
        let dst = &mut outputs[task.item][task.groups.0 * k..task.groups.1 * k];
        for (d, p) in dst.iter_mut().zip(&partial.groups) {
            *d += p;
        }
        if let Some(r) = task.rows_of {
            outputs[r][task.outer.0 * k..task.outer.1 * k].copy_from_slice(&partial.rows);
        }
    }
    Ok(outputs)
}

/// `n` zeros, or the bytes they would take if the allocator refuses them.
pub(crate) fn zeros(n: usize) -> std::result::Result<Vec<f64>, f64> {
    let mut v: Vec<f64> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| n as f64 * 8.0)?;
    v.resize(n, 0.0);
    Ok(v)
}
