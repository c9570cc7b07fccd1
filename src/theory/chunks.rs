//! The per-group loops: element-wise kernels over `groups`-long slices, run on the crate's
//! private pool in chunks when there are many groups (below [`PARALLEL_MIN_GROUPS`] the
//! dispatch costs more than it saves). Each element's arithmetic is the same whatever the
//! chunking, so results are bit-identical for any thread count.

use crate::error::Result;
use crate::pool;
use rayon::prelude::*;

/// Below this many groups a call runs on the calling thread.
pub(crate) const PARALLEL_MIN_GROUPS: usize = 16_384;
/// Groups per parallel task (32 KiB per array: a task's working set stays in L2).
const CHUNK: usize = 4_096;

/// Run `kernel(inputs, outputs)` over all `groups` (every slice is `groups` long), cutting the
/// slices into chunks for the pool when there are many groups. Returns the AND of the kernel's
/// results (the kernels return false when they produced a non-finite value).
pub(crate) fn run<const NI: usize, const NO: usize, K>(
    groups: usize,
    inputs: [&[f64]; NI],
    outputs: [&mut [f64]; NO],
    kernel: K,
) -> Result<bool>
where
    K: Fn([&[f64]; NI], [&mut [f64]; NO]) -> bool + Sync,
{
    if groups < PARALLEL_MIN_GROUPS {
        return Ok(kernel(inputs, outputs));
    }
    let mut jobs = Vec::with_capacity(groups.div_ceil(CHUNK));
    let mut rest = outputs;
    let mut start = 0;
    while start < groups {
        let len = CHUNK.min(groups - start);
        let ins: [&[f64]; NI] = std::array::from_fn(|i| &inputs[i][start..start + len]);
        let outs: [&mut [f64]; NO] = std::array::from_fn(|i| {
            let (head, tail) = std::mem::take(&mut rest[i]).split_at_mut(len);
            rest[i] = tail;
            head
        });
        jobs.push((ins, outs));
        start += len;
    }
    let pool = pool::pool()?;
    Ok(pool.install(|| jobs.into_par_iter().map(|(i, o)| kernel(i, o)).reduce(|| true, |a, b| a && b)))
}

/// Values below the smallest normal float are set to zero: a decaying charge or rate would
/// otherwise crawl through subnormals (100x slower arithmetic) on its way to 0.
#[inline(always)]
pub(crate) fn flush(x: f64) -> f64 {
    if x.abs() < f64::MIN_POSITIVE {
        0.0
    } else {
        x
    }
}

/// True for NaN and ±inf: x − x is 0 for finite x and NaN otherwise. Unlike `!x.is_finite()`
/// this is one subtraction and one comparison, so OR-reductions of it vectorise.
#[inline(always)]
#[allow(clippy::eq_op)]
pub(crate) fn non_finite(x: f64) -> bool {
    (x - x) != 0.0
}

/// True when every value is finite.
#[inline(always)]
pub(crate) fn all_finite(a: &[f64]) -> bool {
    !a.iter().fold(false, |bad, &x| bad | non_finite(x))
}

/// One step of the state (y, v) with a read-only input d, written to (yo, vo): (yo, vo) ←
/// f(y, v, d). The old state is left as it was, so a step whose result is not finite can be
/// dropped. Returns false if a result is not finite.
#[inline(always)]
pub(crate) fn step2<F>(f: F, d: &[f64], y: &[f64], v: &[f64], yo: &mut [f64], vo: &mut [f64]) -> bool
where
    F: Fn(f64, f64, f64) -> (f64, f64),
{
    let n = yo.len();
    let (d, y, v, vo) = (&d[..n], &y[..n], &v[..n], &mut vo[..n]);
    let mut bad = false;
    for i in 0..n {
        let (a, b) = f(y[i], v[i], d[i]);
        yo[i] = a;
        vo[i] = b;
        bad |= non_finite(a) | non_finite(b);
    }
    !bad
}

/// As [`step2`], also writing the new y to `out` (the array handed back to the caller, so that
/// no separate copy pass is needed).
#[inline(always)]
pub(crate) fn step3<F>(f: F, d: &[f64], y: &[f64], v: &[f64], yo: &mut [f64], vo: &mut [f64], out: &mut [f64]) -> bool
where
    F: Fn(f64, f64, f64) -> (f64, f64),
{
    let n = yo.len();
    let (d, y, v, vo, out) = (&d[..n], &y[..n], &v[..n], &mut vo[..n], &mut out[..n]);
    let mut bad = false;
    for i in 0..n {
        let (a, b) = f(y[i], v[i], d[i]);
        yo[i] = a;
        vo[i] = b;
        out[i] = a;
        bad |= non_finite(a) | non_finite(b);
    }
    !bad
}
