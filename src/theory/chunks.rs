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
    run_tally(groups, inputs, outputs, kernel, true, |a, b| a && b)
}

/// [`run`] for kernels that return any summary of their chunk (`T`), combined over the chunks
/// with `combine` from `identity` (the combinations used, AND and OR, do not depend on the order).
pub(crate) fn run_tally<const NI: usize, const NO: usize, T, K, C>(
    groups: usize,
    inputs: [&[f64]; NI],
    outputs: [&mut [f64]; NO],
    kernel: K,
    identity: T,
    combine: C,
) -> Result<T>
where
    T: Copy + Send + Sync,
    K: Fn([&[f64]; NI], [&mut [f64]; NO]) -> T + Sync,
    C: Fn(T, T) -> T + Sync + Send,
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
    Ok(pool.install(|| jobs.into_par_iter().map(|(i, o)| kernel(i, o)).reduce(|| identity, &combine)))
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

/// Values at most this large in magnitude (2^500 ≈ 3.3e150) are "small": a step of the closed
/// forms from small values with coefficients of moderate size cannot overflow (see `paper`).
pub(crate) const SMALL: f64 = f64::from_bits((1023 + 500) << 52);

/// What a pass over values found, per chunk (combined over chunks by OR): a NaN or infinity
/// (`bad`), a value beyond [`SMALL`] (`big`, NaN and infinity included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Flags {
    pub bad: bool,
    pub big: bool,
}

impl Flags {
    pub fn or(a: Flags, b: Flags) -> Flags {
        Flags { bad: a.bad | b.bad, big: a.big | b.big }
    }
}

/// True unless |x| ≤ [`SMALL`] (so true for NaN and ±inf): one and-mask and one comparison, so
/// OR-reductions of it vectorise like [`non_finite`].
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // deliberately true for NaN
pub(crate) fn big(x: f64) -> bool {
    !(x.abs() <= SMALL)
}

/// Whether any value is beyond [`SMALL`] (NaN and ±inf included: one comparison per value, as
/// cheap as a finiteness check; the caller tells a non-finite value apart only when this is set).
#[inline(always)]
pub(crate) fn scan(a: &[f64]) -> Flags {
    Flags { bad: false, big: a.iter().fold(false, |large, &x| large | big(x)) }
}

/// In place over the state (y, v) with a read-only input d: (y, v) ← f(y, v, d), also writing
/// the new y to `out` when given (the array handed back to the caller). For steps the caller
/// knows cannot overflow; returns whether a new value is beyond [`SMALL`].
#[inline(always)]
pub(crate) fn update<F>(f: F, d: &[f64], y: &mut [f64], v: &mut [f64], out: Option<&mut [f64]>) -> Flags
where
    F: Fn(f64, f64, f64) -> (f64, f64),
{
    let n = y.len();
    let (d, v) = (&d[..n], &mut v[..n]);
    let mut large = false;
    match out {
        None => {
            for i in 0..n {
                let (a, b) = f(y[i], v[i], d[i]);
                y[i] = a;
                v[i] = b;
                large |= big(a) | big(b);
            }
        }
        Some(out) => {
            let out = &mut out[..n];
            for i in 0..n {
                let (a, b) = f(y[i], v[i], d[i]);
                y[i] = a;
                v[i] = b;
                out[i] = a;
                large |= big(a) | big(b);
            }
        }
    }
    Flags { bad: false, big: large }
}

/// One step of the state (y, v) with a read-only input d, written to (yo, vo) (and the new y to
/// `out` when given): the old state is left as it was, so a step whose result is not finite can
/// be dropped. Returns whether a new value is not finite, or beyond [`SMALL`].
#[inline(always)]
pub(crate) fn step<F>(f: F, d: &[f64], y: &[f64], v: &[f64], yo: &mut [f64], vo: &mut [f64], out: Option<&mut [f64]>) -> Flags
where
    F: Fn(f64, f64, f64) -> (f64, f64),
{
    let n = yo.len();
    let (d, y, v, vo) = (&d[..n], &y[..n], &v[..n], &mut vo[..n]);
    let (mut bad, mut large) = (false, false);
    for i in 0..n {
        let (a, b) = f(y[i], v[i], d[i]);
        yo[i] = a;
        vo[i] = b;
        bad |= non_finite(a) | non_finite(b);
        large |= big(a) | big(b);
    }
    if let Some(out) = out {
        out[..n].copy_from_slice(&yo[..n]);
    }
    Flags { bad, big: large }
}
