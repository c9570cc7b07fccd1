//! Fused one-pass per-group reductions over a parameter θ, its gradient ĝ and optionally a
//! velocity v (THEORY.md §2, last paragraph).
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
//! [`Task`]s whose plan depends only on the shapes (never on the thread count), and partial sums
//! are merged in plan order, so results are bit-identical for any number of threads.

use crate::error::{Error, Result};
use crate::pool;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Element types the kernels read. `BF16` is carried as its raw 16 bits.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [half::f16]),
    BF16(&'a [u16]),
}

impl<'a> Data<'a> {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::F64(s) => s.len(),
            Data::F16(s) => s.len(),
            Data::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            Data::F32(_) => "float32",
            Data::F64(_) => "float64",
            Data::F16(_) => "float16",
            Data::BF16(_) => "bfloat16",
        }
    }

    fn slice(self, start: usize, end: usize) -> Data<'a> {
        match self {
            Data::F32(s) => Data::F32(&s[start..end]),
            Data::F64(s) => Data::F64(&s[start..end]),
            Data::F16(s) => Data::F16(&s[start..end]),
            Data::BF16(s) => Data::BF16(&s[start..end]),
        }
    }
}

/// Names of the sums, in the order of each group's row in the output.
pub struct Sums;
impl Sums {
    pub const NAMES: [&'static str; 8] = [
        "sum_theta",
        "sumsq_theta",
        "sum_grad",
        "sumsq_grad",
        "dot_theta_grad",
        "sumsq_velocity",
        "dot_theta_velocity",
        "dot_grad_velocity",
    ];

    /// Number of sums for 1 (θ), 2 (θ, ĝ) or 3 (θ, ĝ, v) arrays.
    pub fn count(arrays: usize) -> usize {
        match arrays {
            1 => 2,
            2 => 5,
            _ => 8,
        }
    }
}

/// The (outer, groups, seg) view of a tensor; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub groups: usize,
    pub seg: usize,
}

impl Layout {
    /// The layout of a C-contiguous tensor of `shape` reduced keeping `axis` (0: rows, 1:
    /// columns) in blocks of `block` columns. A 1-D tensor is viewed as (n, 1, 1), a 2-D one as
    /// (out, in, 1), more dimensions as (out, in, product of the rest).
    pub fn from_shape(shape: &[usize], axis: usize, block: usize) -> Result<Layout> {
        let (out, inner, rest) = match shape.len() {
            0 => {
                return Err(Error::Shape(
                    "a 0-d tensor has no groups: pass a tensor with at least one dimension".into(),
                ))
            }
            1 => (shape[0], 1, 1),
            2 => (shape[0], shape[1], 1),
            _ => (shape[0], shape[1], shape[2..].iter().product()),
        };
        if block == 0 {
            return Err(Error::InvalidArgument("block must be at least 1".into()));
        }
        match axis {
            0 => {
                if block != 1 {
                    return Err(Error::InvalidArgument(format!(
                        "block={block} applies only with axis=1 (column blocks); axis=0 takes block=1"
                    )));
                }
                Ok(Layout { outer: 1, groups: out, seg: inner * rest })
            }
            1 => {
                if inner % block != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "block={block} does not divide axis 1 of shape {shape:?} (size {inner})"
                    )));
                }
                Ok(Layout { outer: out, groups: inner / block, seg: block * rest })
            }
            _ => Err(Error::InvalidArgument(format!(
                "axis must be 0 (rows) or 1 (columns), got {axis}"
            ))),
        }
    }

    pub fn len(&self) -> usize {
        self.outer * self.groups * self.seg
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tensor (with its gradient and velocity) and the layout to reduce it with.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub theta: Data<'a>,
    pub grad: Option<Data<'a>>,
    pub velocity: Option<Data<'a>>,
    pub layout: Layout,
}

impl Item<'_> {
    pub fn arrays(&self) -> usize {
        1 + self.grad.is_some() as usize + self.velocity.is_some() as usize
    }

    /// Number of sums per group for this item.
    pub fn width(&self) -> usize {
        Sums::count(self.arrays())
    }

    fn validate(&self, index: usize) -> Result<()> {
        let n = self.layout.len();
        let named = [("theta", Some(self.theta)), ("grad", self.grad), ("velocity", self.velocity)];
        for (name, data) in named.iter() {
            if let Some(d) = data {
                if d.len() != n {
                    return Err(Error::Shape(format!(
                        "tensor {index}: {name} has {} elements but the layout {:?} needs {n}",
                        d.len(),
                        self.layout
                    )));
                }
                if std::mem::discriminant(d) != std::mem::discriminant(&self.theta) {
                    return Err(Error::DType(format!(
                        "tensor {index}: {name} is {} but theta is {}; give all arrays one dtype",
                        d.dtype_name(),
                        self.theta.dtype_name()
                    )));
                }
            }
        }
        if self.velocity.is_some() && self.grad.is_none() {
            return Err(Error::InvalidArgument(format!(
                "tensor {index}: a velocity needs a gradient too"
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The inner loops: one contiguous segment of 1, 2 or 3 arrays, accumulated into float64 sums.
// Written as fixed-width lane arrays so that the compiler vectorises them; compiled twice, once
// for the x86-64 baseline and once with AVX2+FMA, chosen at run time (wheels are generic).

trait Real: Copy {
    fn f64(self) -> f64;
}
impl Real for f32 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}
impl Real for f64 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

#[inline(always)]
fn lanes_sum<const W: usize>(a: &[f64; W]) -> f64 {
    a.iter().sum()
}

#[inline(always)]
fn pass1<E: Real, const W: usize>(t: &[E], out: &mut [f64]) {
    let (mut s, mut ss) = ([0f64; W], [0f64; W]);
    let tc = t.chunks_exact(W);
    let tail = tc.remainder();
    for tt in tc {
        for l in 0..W {
            let x = tt[l].f64();
            s[l] += x;
            ss[l] += x * x;
        }
    }
    let (mut s0, mut s1) = (lanes_sum(&s), lanes_sum(&ss));
    for x in tail {
        let x = x.f64();
        s0 += x;
        s1 += x * x;
    }
    out[0] += s0;
    out[1] += s1;
}

#[inline(always)]
fn pass2<E: Real, const W: usize>(t: &[E], g: &[E], out: &mut [f64]) {
    let g = &g[..t.len()];
    let (mut st, mut stt, mut sg, mut sgg, mut stg) = ([0f64; W], [0f64; W], [0f64; W], [0f64; W], [0f64; W]);
    let (tc, gc) = (t.chunks_exact(W), g.chunks_exact(W));
    let (tt_tail, gg_tail) = (tc.remainder(), gc.remainder());
    for (tt, gg) in tc.zip(gc) {
        for l in 0..W {
            let x = tt[l].f64();
            let y = gg[l].f64();
            st[l] += x;
            stt[l] += x * x;
            sg[l] += y;
            sgg[l] += y * y;
            stg[l] += x * y;
        }
    }
    let mut r = [lanes_sum(&st), lanes_sum(&stt), lanes_sum(&sg), lanes_sum(&sgg), lanes_sum(&stg)];
    for (x, y) in tt_tail.iter().zip(gg_tail) {
        let (x, y) = (x.f64(), y.f64());
        r[0] += x;
        r[1] += x * x;
        r[2] += y;
        r[3] += y * y;
        r[4] += x * y;
    }
    for k in 0..5 {
        out[k] += r[k];
    }
}

#[inline(always)]
fn pass3<E: Real, const W: usize>(t: &[E], g: &[E], v: &[E], out: &mut [f64]) {
    let n = t.len();
    let (g, v) = (&g[..n], &v[..n]);
    let mut acc = [[0f64; W]; 8];
    let (tc, gc, vc) = (t.chunks_exact(W), g.chunks_exact(W), v.chunks_exact(W));
    let start_tail = n - tc.remainder().len();
    for ((tt, gg), vv) in tc.zip(gc).zip(vc) {
        for l in 0..W {
            let x = tt[l].f64();
            let y = gg[l].f64();
            let z = vv[l].f64();
            acc[0][l] += x;
            acc[1][l] += x * x;
            acc[2][l] += y;
            acc[3][l] += y * y;
            acc[4][l] += x * y;
            acc[5][l] += z * z;
            acc[6][l] += x * z;
            acc[7][l] += y * z;
        }
    }
    let mut r = [0f64; 8];
    for k in 0..8 {
        r[k] = lanes_sum(&acc[k]);
    }
    for i in start_tail..n {
        let (x, y, z) = (t[i].f64(), g[i].f64(), v[i].f64());
        r[0] += x;
        r[1] += x * x;
        r[2] += y;
        r[3] += y * y;
        r[4] += x * y;
        r[5] += z * z;
        r[6] += x * z;
        r[7] += y * z;
    }
    for k in 0..8 {
        out[k] += r[k];
    }
}

/// Lane widths: enough independent accumulators to hide the add latency, few enough to stay in
/// the 16 vector registers (8 sums x 4 lanes of f64 = 8 registers of AVX2).
const W1: usize = 8;
const W2: usize = 8;
const W3: usize = 4;

#[inline(always)]
fn pass_any<E: Real>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    match (g, v) {
        (None, _) => pass1::<E, W1>(t, out),
        (Some(g), None) => pass2::<E, W2>(t, g, out),
        (Some(g), Some(v)) => pass3::<E, W3>(t, g, v, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass_avx2<E: Real>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    pass_any(t, g, v, out)
}

#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::env::var_os("NEURAL_MECHANICS_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn pass_float<E: Real>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time above).
        return unsafe { pass_avx2(t, g, v, out) };
    }
    pass_any(t, g, v, out)
}

/// 16-bit inputs are widened to float32 a stack chunk at a time, then reduced as float32.
const HALF_CHUNK: usize = 1024;

fn widen(src: Data<'_>, dst: &mut [f32]) {
    match src {
        Data::F16(s) => s.convert_to_f32_slice(dst),
        Data::BF16(s) => {
            for (d, &b) in dst.iter_mut().zip(s) {
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        _ => unreachable!("only 16-bit data is widened"),
    }
}

/// Accumulate one contiguous segment [start, end) of the item's arrays into `out`.
fn reduce_segment(item: &Item<'_>, start: usize, end: usize, out: &mut [f64]) {
    let t = item.theta.slice(start, end);
    let g = item.grad.map(|d| d.slice(start, end));
    let v = item.velocity.map(|d| d.slice(start, end));
    match t {
        Data::F32(t) => pass_float(t, g.map(as_f32), v.map(as_f32), out),
        Data::F64(t) => pass_float(t, g.map(as_f64), v.map(as_f64), out),
        Data::F16(_) | Data::BF16(_) => {
            let mut bufs = [[0f32; HALF_CHUNK]; 3];
            let n = end - start;
            let mut at = 0;
            while at < n {
                let m = HALF_CHUNK.min(n - at);
                let [bt, bg, bv] = &mut bufs;
                widen(t.slice(at, at + m), &mut bt[..m]);
                if let Some(g) = g {
                    widen(g.slice(at, at + m), &mut bg[..m]);
                }
                if let Some(v) = v {
                    widen(v.slice(at, at + m), &mut bv[..m]);
                }
                pass_float(
                    &bt[..m],
                    g.map(|_| &bg[..m]),
                    v.map(|_| &bv[..m]),
                    out,
                );
                at += m;
            }
        }
    }
}

fn as_f32<'a>(d: Data<'a>) -> &'a [f32] {
    match d {
        Data::F32(s) => s,
        _ => unreachable!("dtypes were validated to match"),
    }
}

fn as_f64<'a>(d: Data<'a>) -> &'a [f64] {
    match d {
        Data::F64(s) => s,
        _ => unreachable!("dtypes were validated to match"),
    }
}

// ---------------------------------------------------------------------------------------------
// Planning: cut every item into tasks of about TASK_ELEMS elements.

/// Elements per task: large enough that scheduling costs nothing, small enough to balance.
const TASK_ELEMS: usize = 1 << 18;
/// At most this many tasks per column-reduced tensor (each task holds a partial sum for every
/// group, merged at the end; more tasks would make the merge cost show).
const MAX_COLUMN_TASKS: usize = 16;
/// Below this many elements in a whole call, work on the calling thread: waking the pool costs
/// more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Task {
    item: usize,
    outer: (usize, usize),
    groups: (usize, usize),
    seg: (usize, usize),
}

fn plan(items: &[Item<'_>]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Layout { outer, groups, seg } = item.layout;
        if item.layout.is_empty() {
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
                        tasks.push(Task { item: i, outer: (0, 1), groups: (g, g + 1), seg: (s, e) });
                        s = e;
                    }
                }
            } else {
                let per = (TASK_ELEMS / seg).max(1);
                let mut g = 0;
                while g < groups {
                    let e = (g + per).min(groups);
                    tasks.push(Task { item: i, outer: (0, 1), groups: (g, e), seg: (0, seg) });
                    g = e;
                }
            }
        } else {
            let pieces = (item.layout.len() / TASK_ELEMS).clamp(1, MAX_COLUMN_TASKS).min(outer);
            let step = outer.div_ceil(pieces);
            let mut o = 0;
            while o < outer {
                let e = (o + step).min(outer);
                tasks.push(Task { item: i, outer: (o, e), groups: (0, groups), seg: (0, seg) });
                o = e;
            }
        }
    }
    tasks
}

fn run_task(items: &[Item<'_>], task: &Task) -> Vec<f64> {
    let item = &items[task.item];
    let k = item.width();
    let Layout { groups, seg, .. } = item.layout;
    let (g0, g1) = task.groups;
    let mut partial = vec![0f64; (g1 - g0) * k];
    for o in task.outer.0..task.outer.1 {
        for g in g0..g1 {
            let base = (o * groups + g) * seg;
            let out = &mut partial[(g - g0) * k..(g - g0 + 1) * k];
            reduce_segment(item, base + task.seg.0, base + task.seg.1, out);
        }
    }
    partial
}

/// Per-group sums of every item: one row of `item.width()` sums per group, row-major, in the
/// order of [`Sums::NAMES`]. Non-finite inputs give non-finite sums (see [`check_finite`]).
pub fn group_stats_batch(items: &[Item<'_>]) -> Result<Vec<Vec<f64>>> {
    for (i, item) in items.iter().enumerate() {
        item.validate(i)?;
    }
    let tasks = plan(items);
    let total: usize = items.iter().map(|it| it.layout.len()).sum();
    let partials: Vec<Vec<f64>> = if total < PARALLEL_MIN_ELEMS || tasks.len() < 2 {
        tasks.iter().map(|t| run_task(items, t)).collect()
    } else {
        pool::pool()?.install(|| tasks.par_iter().map(|t| run_task(items, t)).collect())
    };
    let mut outputs: Vec<Vec<f64>> =
        items.iter().map(|it| vec![0f64; it.layout.groups * it.width()]).collect();
    for (task, partial) in tasks.iter().zip(&partials) {
        let k = items[task.item].width();
        let dst = &mut outputs[task.item][task.groups.0 * k..task.groups.1 * k];
        for (d, p) in dst.iter_mut().zip(partial) {
            *d += p;
        }
    }
    Ok(outputs)
}

/// The sums of one item.
pub fn group_stats(item: &Item<'_>) -> Result<Vec<f64>> {
    Ok(group_stats_batch(std::slice::from_ref(item))?.pop().unwrap_or_default())
}

/// An error naming the first tensor and group whose sums are not finite, and which input holds
/// the NaN or infinity (θ if the θ sums are bad, else ĝ, else v).
pub fn check_finite(items: &[Item<'_>], outputs: &[Vec<f64>]) -> Result<()> {
    for (i, (item, out)) in items.iter().zip(outputs).enumerate() {
        let k = item.width();
        for (g, row) in out.chunks_exact(k).enumerate() {
            if let Some(bad) = row.iter().position(|x| !x.is_finite()) {
                let which = match bad {
                    0 | 1 => "theta",
                    2..=4 => "grad",
                    _ => "velocity",
                };
                return Err(Error::NonFinite(format!(
                    "tensor {i}, group {g}: {} is not finite (NaN or inf in {which})",
                    Sums::NAMES[bad]
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// Straightforward reference: per element, find its group from the 3-D index.
    fn reference(shape3: (usize, usize, usize), axis: usize, block: usize, arrays: &[&[f64]]) -> Vec<f64> {
        let (out, inn, rest) = shape3;
        let groups = if axis == 0 { out } else { inn / block };
        let k = Sums::count(arrays.len());
        let mut r = vec![0f64; groups * k];
        for o in 0..out {
            for j in 0..inn {
                for q in 0..rest {
                    let idx = (o * inn + j) * rest + q;
                    let g = if axis == 0 { o } else { j / block };
                    let x = arrays[0][idx];
                    let row = &mut r[g * k..(g + 1) * k];
                    row[0] += x;
                    row[1] += x * x;
                    if arrays.len() > 1 {
                        let y = arrays[1][idx];
                        row[2] += y;
                        row[3] += y * y;
                        row[4] += x * y;
                    }
                    if arrays.len() > 2 {
                        let (y, z) = (arrays[1][idx], arrays[2][idx]);
                        row[5] += z * z;
                        row[6] += x * z;
                        row[7] += y * z;
                    }
                }
            }
        }
        r
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(Layout::from_shape(&[7], 0, 1).unwrap(), Layout { outer: 1, groups: 7, seg: 1 });
        assert_eq!(Layout::from_shape(&[4, 6], 1, 3).unwrap(), Layout { outer: 4, groups: 2, seg: 3 });
        assert_eq!(
            Layout::from_shape(&[4, 6, 3, 3], 0, 1).unwrap(),
            Layout { outer: 1, groups: 4, seg: 54 }
        );
        assert!(matches!(Layout::from_shape(&[4, 6], 1, 4), Err(Error::InvalidArgument(_))));
        assert!(matches!(Layout::from_shape(&[4, 6], 0, 2), Err(Error::InvalidArgument(_))));
        assert!(matches!(Layout::from_shape(&[4, 6], 2, 1), Err(Error::InvalidArgument(_))));
        assert!(matches!(Layout::from_shape(&[], 0, 1), Err(Error::Shape(_))));
    }

    #[test]
    fn f64_matches_reference_all_shapes() {
        let cases = [
            ((5, 7, 3), 0, 1),
            ((5, 8, 3), 1, 1),
            ((5, 8, 3), 1, 4),
            ((1, 1, 1), 0, 1),
            ((3, 600_000, 1), 0, 1), // long rows, split inside the segment
            ((2000, 300, 1), 1, 1),  // many outer rows, column tasks
            ((64, 64, 9), 1, 2),
        ];
        for (seed, ((o, i, r), axis, block)) in cases.into_iter().enumerate() {
            let n = o * i * r;
            let (t, g, v) = (random(n, seed as u64), random(n, 100 + seed as u64), random(n, 200 + seed as u64));
            let layout = Layout::from_shape(&[o, i, r], axis, block).unwrap();
            for arrays in 1..=3 {
                let item = Item {
                    theta: Data::F64(&t),
                    grad: (arrays > 1).then_some(Data::F64(&g)),
                    velocity: (arrays > 2).then_some(Data::F64(&v)),
                    layout,
                };
                let got = group_stats(&item).unwrap();
                let want = reference((o, i, r), axis, block, &[&t[..], &g[..], &v[..]][..arrays]);
                close(&got, &want, 1e-12);
            }
        }
    }

    #[test]
    fn sixteen_bit_and_f32_inputs() {
        let n = 3 * 2500;
        let t64 = random(n, 1);
        let g64 = random(n, 2);
        // Values exactly representable in each type, so the reference is exact.
        let t16: Vec<half::f16> = t64.iter().map(|&x| half::f16::from_f64(x)).collect();
        let g16: Vec<half::f16> = g64.iter().map(|&x| half::f16::from_f64(x)).collect();
        let tb: Vec<half::bf16> = t64.iter().map(|&x| half::bf16::from_f64(x)).collect();
        let gb: Vec<half::bf16> = g64.iter().map(|&x| half::bf16::from_f64(x)).collect();
        let tbits: Vec<u16> = tb.iter().map(|x| x.to_bits()).collect();
        let gbits: Vec<u16> = gb.iter().map(|x| x.to_bits()).collect();
        let t32: Vec<f32> = t64.iter().map(|&x| x as f32).collect();
        let g32: Vec<f32> = g64.iter().map(|&x| x as f32).collect();
        let layout = Layout::from_shape(&[3, 2500], 0, 1).unwrap();
        let check = |theta: Data, grad: Data, tr: Vec<f64>, gr: Vec<f64>| {
            let got = group_stats(&Item { theta, grad: Some(grad), velocity: None, layout }).unwrap();
            close(&got, &reference((3, 2500, 1), 0, 1, &[&tr, &gr]), 1e-12);
        };
        check(
            Data::F16(&t16),
            Data::F16(&g16),
            t16.iter().map(|x| x.to_f64()).collect(),
            g16.iter().map(|x| x.to_f64()).collect(),
        );
        check(
            Data::BF16(&tbits),
            Data::BF16(&gbits),
            tb.iter().map(|x| x.to_f64()).collect(),
            gb.iter().map(|x| x.to_f64()).collect(),
        );
        check(
            Data::F32(&t32),
            Data::F32(&g32),
            t32.iter().map(|&x| x as f64).collect(),
            g32.iter().map(|&x| x as f64).collect(),
        );
    }

    #[test]
    fn batch_equals_single_and_is_thread_independent() {
        let a = random(512 * 4608, 3);
        let b = random(512 * 4608, 4);
        let layout0 = Layout::from_shape(&[512, 512, 9], 0, 1).unwrap();
        let layout1 = Layout::from_shape(&[512, 512, 9], 1, 1).unwrap();
        let items = [
            Item { theta: Data::F64(&a), grad: Some(Data::F64(&b)), velocity: None, layout: layout0 },
            Item { theta: Data::F64(&a), grad: None, velocity: None, layout: layout1 },
        ];
        let batch = group_stats_batch(&items).unwrap();
        assert_eq!(batch[0], group_stats(&items[0]).unwrap());
        assert_eq!(batch[1], group_stats(&items[1]).unwrap());
        pool::set_num_threads(1).unwrap();
        let one = group_stats_batch(&items).unwrap();
        pool::set_num_threads(0).unwrap();
        assert_eq!(batch, one, "results must not depend on the thread count");
    }

    #[test]
    fn errors_and_empty() {
        let a = vec![1f64; 6];
        let f = vec![1f32; 6];
        let layout = Layout::from_shape(&[2, 3], 0, 1).unwrap();
        let bad_len = Layout::from_shape(&[2, 4], 0, 1).unwrap();
        let mixed = Item { theta: Data::F64(&a), grad: Some(Data::F32(&f)), velocity: None, layout };
        assert!(matches!(group_stats(&mixed), Err(Error::DType(_))));
        let short = Item { theta: Data::F64(&a), grad: None, velocity: None, layout: bad_len };
        assert!(matches!(group_stats(&short), Err(Error::Shape(_))));
        let vel_only = Item { theta: Data::F64(&a), grad: None, velocity: Some(Data::F64(&a)), layout };
        assert!(matches!(group_stats(&vel_only), Err(Error::InvalidArgument(_))));
        let empty: Vec<f64> = vec![];
        let rows_of_nothing = Layout::from_shape(&[3, 0], 0, 1).unwrap();
        let out = group_stats(&Item { theta: Data::F64(&empty), grad: None, velocity: None, layout: rows_of_nothing }).unwrap();
        assert_eq!(out, vec![0.0; 6]);
        let mut nan = a.clone();
        nan[4] = f64::NAN;
        let items = [Item { theta: Data::F64(&a), grad: Some(Data::F64(&nan)), velocity: None, layout }];
        let out = group_stats_batch(&items).unwrap();
        let err = check_finite(&items, &out).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("group 1") && m.contains("grad")), "{err}");
    }
}
