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

    /// (address, length, dtype): two equal identities are the same memory read the same way.
    fn identity(&self) -> (usize, usize, &'static str) {
        let addr = match self {
            Data::F32(s) => s.as_ptr() as usize,
            Data::F64(s) => s.as_ptr() as usize,
            Data::F16(s) => s.as_ptr() as usize,
            Data::BF16(s) => s.as_ptr() as usize,
        };
        (addr, self.len(), self.dtype_name())
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

/// A shape as Python prints it: (4, 6), (5,), ().
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")),
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
            0 => return Err(Error::Shape("a 0-d tensor has no groups: pass a tensor with at least one dimension".into())),
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
                        "block={block} does not divide axis 1 of shape {} (size {inner})",
                        fmt_shape(shape)
                    )));
                }
                Ok(Layout { outer: out, groups: inner / block, seg: block * rest })
            }
            _ => Err(Error::InvalidArgument(format!("axis must be 0 (rows) or 1 (columns), got {axis}"))),
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
            return Err(Error::InvalidArgument(format!("tensor {index}: a velocity needs a gradient too")));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The inner loops. Two shapes of work:
// * segment kernels: one contiguous segment of 1, 2 or 3 arrays summed into float64 registers
//   (rows, and column blocks whose segment is long). On x86-64 with AVX2+FMA (checked at run
//   time: wheels are generic x86-64) these are the explicit kernels of `simd`; elsewhere the
//   portable lane loops below.
// * the tile kernel (`columns`) for short segments: per-column accumulators over a tile of
//   columns, optionally with each row's sums too (a tensor reduced by rows and columns at once).

mod columns;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd512;

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

#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            // NEURAL_MECHANICS_NO_SIMD=1 forces the portable loops (for comparisons and tests).
            std::env::var_os("NEURAL_MECHANICS_NO_SIMD").is_none() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 fused tile sweep can run (NEURAL_MECHANICS_NO_AVX512=1 keeps AVX2, for
/// comparisons; NEURAL_MECHANICS_NO_SIMD=1 turns both off).
#[inline]
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512
            .get_or_init(|| has_avx2() && std::env::var_os("NEURAL_MECHANICS_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable segment kernel: W independent lanes per sum hide the add latency.
const W: usize = 4;

#[inline(always)]
fn portable_pass<E: Real>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    let n = t.len();
    let k = out.len();
    let whole = n - n % W;
    let get = |a: Option<&[E]>, i: usize| a.map_or(0.0, |a| a[i].f64());
    let add = |acc: &mut [f64; 8], x: f64, y: f64, z: f64| {
        acc[0] += x;
        acc[1] += x * x;
        acc[2] += y;
        acc[3] += y * y;
        acc[4] += x * y;
        acc[5] += z * z;
        acc[6] += x * z;
        acc[7] += y * z;
    };
    let mut lanes = [[0f64; 8]; W];
    for i in (0..whole).step_by(W) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            add(lane, t[i + l].f64(), get(g, i + l), get(v, i + l));
        }
    }
    let mut r = [0f64; 8];
    for lane in &lanes {
        for j in 0..8 {
            r[j] += lane[j];
        }
    }
    for i in whole..n {
        add(&mut r, t[i].f64(), get(g, i), get(v, i));
    }
    for j in 0..k {
        out[j] += r[j];
    }
}

fn pass_f32(t: &[f32], g: Option<&[f32]>, v: Option<&[f32]>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time above).
        unsafe {
            match (g, v) {
                (None, _) => simd::pass1(t, out),
                (Some(g), None) => simd::pass2(t, g, out),
                (Some(g), Some(v)) => simd::pass3(t, g, v, out),
            }
        }
        return;
    }
    portable_pass(t, g, v, out)
}

fn pass_f64(t: &[f64], g: Option<&[f64]>, v: Option<&[f64]>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time above).
        unsafe {
            match (g, v) {
                (None, _) => simd::pass1(t, out),
                (Some(g), None) => simd::pass2(t, g, out),
                (Some(g), Some(v)) => simd::pass3(t, g, v, out),
            }
        }
        return;
    }
    portable_pass(t, g, v, out)
}

/// 16-bit inputs are widened to float32 this many elements at a time, then reduced as float32.
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

/// Float32 scratch for widening 16-bit input: 3 arrays of HALF_CHUNK (one allocation per task).
struct Scratch(Vec<f32>);

impl Scratch {
    fn new(item: &Item<'_>) -> Scratch {
        match item.theta {
            Data::F16(_) | Data::BF16(_) => Scratch(vec![0f32; 3 * HALF_CHUNK]),
            _ => Scratch(Vec::new()),
        }
    }

    /// Widen [start, start + m) of each given array (m <= HALF_CHUNK) into the scratch.
    fn widen3(&mut self, t: Data<'_>, g: Option<Data<'_>>, v: Option<Data<'_>>, m: usize) -> (&[f32], Option<&[f32]>, Option<&[f32]>) {
        let (bt, rest) = self.0.split_at_mut(HALF_CHUNK);
        let (bg, bv) = rest.split_at_mut(HALF_CHUNK);
        widen(t, &mut bt[..m]);
        if let Some(g) = g {
            widen(g, &mut bg[..m]);
        }
        if let Some(v) = v {
            widen(v, &mut bv[..m]);
        }
        (&bt[..m], g.map(|_| &bg[..m]), v.map(|_| &bv[..m]))
    }
}

/// Accumulate one contiguous segment [start, end) of the item's arrays into `out`.
fn reduce_segment(item: &Item<'_>, start: usize, end: usize, out: &mut [f64], scratch: &mut Scratch) {
    let t = item.theta.slice(start, end);
    let g = item.grad.map(|d| d.slice(start, end));
    let v = item.velocity.map(|d| d.slice(start, end));
    match t {
        Data::F32(t) => pass_f32(t, g.map(as_f32), v.map(as_f32), out),
        Data::F64(t) => pass_f64(t, g.map(as_f64), v.map(as_f64), out),
        Data::F16(_) | Data::BF16(_) => {
            let n = end - start;
            let mut at = 0;
            while at < n {
                let m = HALF_CHUNK.min(n - at);
                let (bt, bg, bv) = scratch.widen3(t.slice(at, at + m), g.map(|d| d.slice(at, at + m)), v.map(|d| d.slice(at, at + m)), m);
                pass_f32(bt, bg, bv, out);
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

/// Segments shorter than this are reduced by the tile kernel of `columns`.
const SHORT_SEG: usize = 32;

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
    /// A rows item over the same tensor whose sums this task's read gives too (see [`pairs`]).
    rows_of: Option<usize>,
}

/// A tensor reduced both by rows and by columns in one call (a conv or Linear between two
/// symmetries: its rows are one neuron's incoming weights, its columns the previous neurons'
/// outgoing ones) is read once: each column item is paired with the rows item over the same
/// arrays, if any. Returns, per item, the rows item its column tasks also reduce.
fn pairs(items: &[Item<'_>]) -> Vec<Option<usize>> {
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

fn plan(items: &[Item<'_>]) -> Vec<Task> {
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

/// One task's sums: per group of the task (k each) and, for a task with `rows_of`, per row of
/// the task (k each, for the rows item).
fn run_task(items: &[Item<'_>], task: &Task) -> (Vec<f64>, Vec<f64>) {
    let item = &items[task.item];
    let k = item.width();
    let Layout { groups, seg, .. } = item.layout;
    let (g0, g1) = task.groups;
    let (o0, o1) = task.outer;
    let mut partial = vec![0f64; (g1 - g0) * k];
    let mut rows = vec![0f64; if task.rows_of.is_some() { (o1 - o0) * k } else { 0 }];
    if seg < SHORT_SEG {
        // Short segments are never split (task.seg is the whole segment).
        let rows_out = task.rows_of.map(|_| rows.as_mut_slice());
        columns::reduce_short(item, task.outer, (g0 * seg, g1 * seg), &mut partial, rows_out);
        return (partial, rows);
    }
    #[cfg(target_arch = "x86_64")]
    if task.rows_of.is_some() && has_avx2() && matches!(item.theta, Data::F32(_) | Data::F64(_)) {
        // SAFETY: AVX2 and FMA are present (checked at run time); AVX-512 is checked inside.
        unsafe { fused_segments(item, task, &mut partial, &mut rows) };
        return (partial, rows);
    }
    let mut scratch = Scratch::new(item);
    for o in o0..o1 {
        for g in g0..g1 {
            let (start, end) = ((o * groups + g) * seg + task.seg.0, (o * groups + g) * seg + task.seg.1);
            let out = &mut partial[(g - g0) * k..(g - g0 + 1) * k];
            if task.rows_of.is_none() {
                reduce_segment(item, start, end, out, &mut scratch);
                continue;
            }
            let mut one = [0f64; 8];
            reduce_segment(item, start, end, &mut one[..k], &mut scratch);
            for (q, x) in one[..k].iter().enumerate() {
                out[q] += x;
                rows[(o - o0) * k + q] += x;
            }
        }
    }
    (partial, rows)
}

/// Long segments reduced by rows and by column blocks in one read (float32/64, AVX2 or AVX-512):
/// one `segments` call per row, vector sums per group and row, the lanes added up once at the end
/// (in a fixed order, so the result does not depend on the thread count).
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
unsafe fn fused_segments(item: &Item<'_>, task: &Task, partial: &mut [f64], rows: &mut [f64]) {
    let (k, arrays) = (item.width(), item.arrays());
    let Layout { groups, seg, .. } = item.layout;
    let row_len = groups * seg;
    let wide = has_avx512();
    let lanes = if wide { 8 } else { 4 };
    let add_lanes = |v: &simd::LaneSums, out: &mut [f64]| {
        for q in 0..k {
            out[q] += v[q * lanes..(q + 1) * lanes].iter().sum::<f64>();
        }
    };
    let mut cols = vec![[0f64; 64]; groups];
    for o in task.outer.0..task.outer.1 {
        let mut row = [0f64; 64];
        let (start, end) = (o * row_len, (o + 1) * row_len);
        // Row o of each array (a null pointer for an absent one: never read).
        macro_rules! run {
            ($t:ty, $as:ident) => {{
                let cut = |d: Option<Data<'_>>| d.map_or(std::ptr::null(), |d| $as(d.slice(start, end)).as_ptr());
                let p: [*const $t; 3] = [cut(Some(item.theta)), cut(item.grad), cut(item.velocity)];
                match (wide, arrays) {
                    (true, 1) => simd512::segments::<$t, 1>(p, groups, seg, &mut cols, &mut row),
                    (true, 2) => simd512::segments::<$t, 2>(p, groups, seg, &mut cols, &mut row),
                    (true, _) => simd512::segments::<$t, 3>(p, groups, seg, &mut cols, &mut row),
                    (false, 1) => simd::segments::<$t, 1>(p, groups, seg, &mut cols, &mut row),
                    (false, 2) => simd::segments::<$t, 2>(p, groups, seg, &mut cols, &mut row),
                    (false, _) => simd::segments::<$t, 3>(p, groups, seg, &mut cols, &mut row),
                }
            }};
        }
        match item.theta {
            Data::F32(_) => run!(f32, as_f32),
            _ => run!(f64, as_f64),
        }
        let r = o - task.outer.0;
        add_lanes(&row, &mut rows[r * k..(r + 1) * k]);
    }
    for (g, col) in cols.iter().enumerate() {
        add_lanes(col, &mut partial[g * k..(g + 1) * k]);
    }
}

/// Per-group sums of every item: one row of `item.width()` sums per group, row-major, in the
/// order of [`Sums::NAMES`]. Non-finite inputs give non-finite sums (see [`check_finite`]).
pub fn group_stats_batch(items: &[Item<'_>]) -> Result<Vec<Vec<f64>>> {
    for (i, item) in items.iter().enumerate() {
        item.validate(i)?;
    }
    // Also validates NEURAL_MECHANICS_NUM_THREADS on every call, not only on the large ones.
    let threads = pool::num_threads()?;
    let tasks = plan(items);
    let total: usize = tasks.iter().map(|t| task_elems(items, t)).sum();
    // One thread: work on the caller's thread (handing work to a one-thread pool only adds a
    // wake-up). Same tasks, same merge order, so the result is bit-identical either way.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = if threads == 1 || total < PARALLEL_MIN_ELEMS || tasks.len() < 2 {
        tasks.iter().map(|t| run_task(items, t)).collect()
    } else {
        pool::pool()?.install(|| tasks.par_iter().map(|t| run_task(items, t)).collect())
    };
    let mut outputs: Vec<Vec<f64>> = items.iter().map(|it| vec![0f64; it.layout.groups * it.width()]).collect();
    for (task, (partial, rows)) in tasks.iter().zip(&partials) {
        let k = items[task.item].width();
        let dst = &mut outputs[task.item][task.groups.0 * k..task.groups.1 * k];
        for (d, p) in dst.iter_mut().zip(partial) {
            *d += p;
        }
        if let Some(r) = task.rows_of {
            outputs[r][task.outer.0 * k..task.outer.1 * k].copy_from_slice(rows);
        }
    }
    Ok(outputs)
}

/// Elements of one array a task reads.
fn task_elems(items: &[Item<'_>], t: &Task) -> usize {
    let seg = items[t.item].layout.seg;
    let per_segment = if t.seg.1 > t.seg.0 { t.seg.1 - t.seg.0 } else { seg };
    (t.outer.1 - t.outer.0) * (t.groups.1 - t.groups.0) * per_segment
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
                return Err(Error::NonFinite(format!("tensor {i}, group {g}: {} is not finite (NaN or inf in {which})", Sums::NAMES[bad])));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The bandwidth limit: a plain read of the same bytes, with the same pool and the same cut into
// tasks, for benchmarks/bench_stats.py. Nothing is computed but a wrapping sum of 64-bit words,
// which the compiler vectorises to one add per load, so this is as close to "memory speed" as a
// reduction can be.

/// Bytes per read task: the same order of size as a fused task over one f32 array.
const READ_TASK_BYTES: usize = TASK_ELEMS * 4;

const READ_PREFETCH_BYTES: usize = 4096;

#[inline(always)]
fn read_words(bytes: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    let mut acc = [0u64; 16];
    let chunks = words.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        // The same software prefetch as the fused kernels (see stats/simd.rs), so that the
        // limit is the best plain read, not a handicapped one.
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let ahead = (c.as_ptr() as *const i8).wrapping_add(READ_PREFETCH_BYTES);
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
        }
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    let mut s = acc.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    for &w in rest {
        s = s.wrapping_add(w);
    }
    for &b in head.iter().chain(tail) {
        s = s.wrapping_add(b as u64);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn read_words_avx2(bytes: &[u8]) -> u64 {
    read_words(bytes)
}

fn read_chunk(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { read_words_avx2(bytes) };
    }
    read_words(bytes)
}

/// Read every byte of `buffers` once (in parallel above the same size threshold as
/// [`group_stats_batch`]) and return a checksum, so that the reads cannot be optimised away.
pub fn read_pass(buffers: &[&[u8]]) -> Result<u64> {
    let mut chunks: Vec<&[u8]> = Vec::new();
    for b in buffers {
        chunks.extend(b.chunks(READ_TASK_BYTES));
    }
    let total: usize = buffers.iter().map(|b| b.len()).sum();
    let sum = if pool::num_threads()? == 1 || total < PARALLEL_MIN_ELEMS * 4 || chunks.len() < 2 {
        chunks.iter().fold(0u64, |a, c| a.wrapping_add(read_chunk(c)))
    } else {
        pool::pool()?.install(|| chunks.par_iter().map(|c| read_chunk(c)).reduce(|| 0, |a, b| a.wrapping_add(b)))
    };
    Ok(sum)
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
        assert_eq!(Layout::from_shape(&[4, 6, 3, 3], 0, 1).unwrap(), Layout { outer: 1, groups: 4, seg: 54 });
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
        check(Data::F16(&t16), Data::F16(&g16), t16.iter().map(|x| x.to_f64()).collect(), g16.iter().map(|x| x.to_f64()).collect());
        check(Data::BF16(&tbits), Data::BF16(&gbits), tb.iter().map(|x| x.to_f64()).collect(), gb.iter().map(|x| x.to_f64()).collect());
        check(Data::F32(&t32), Data::F32(&g32), t32.iter().map(|&x| x as f64).collect(), g32.iter().map(|&x| x as f64).collect());
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

    #[test]
    fn column_kernel_16_bit_and_long_column_segments() {
        // Short segments (column kernel, several tiles) and long ones (segment kernel) with
        // every dtype and array count, against the f64 reference of the widened values.
        for &(o, i, r, block) in &[(37usize, 700usize, 1usize, 1usize), (9, 6, 40, 2), (300, 20, 3, 5)] {
            let n = o * i * r;
            let layout = Layout::from_shape(&[o, i, r], 1, block).unwrap();
            let raw: Vec<Vec<f64>> = (0..3).map(|s| random(n, 40 + s)).collect();
            let h: Vec<Vec<half::f16>> = raw.iter().map(|v| v.iter().map(|&x| half::f16::from_f64(x)).collect()).collect();
            let b: Vec<Vec<u16>> = raw.iter().map(|v| v.iter().map(|&x| half::bf16::from_f64(x).to_bits()).collect()).collect();
            let f: Vec<Vec<f32>> = raw.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
            for arrays in 1..=3 {
                let exact = |conv: &dyn Fn(usize) -> Vec<f64>| (0..3).map(conv).collect::<Vec<_>>();
                let cases: Vec<(Item, Vec<Vec<f64>>)> = vec![
                    (
                        Item {
                            theta: Data::F16(&h[0]),
                            grad: (arrays > 1).then_some(Data::F16(&h[1])),
                            velocity: (arrays > 2).then_some(Data::F16(&h[2])),
                            layout,
                        },
                        exact(&|k| h[k].iter().map(|x| x.to_f64()).collect()),
                    ),
                    (
                        Item {
                            theta: Data::BF16(&b[0]),
                            grad: (arrays > 1).then_some(Data::BF16(&b[1])),
                            velocity: (arrays > 2).then_some(Data::BF16(&b[2])),
                            layout,
                        },
                        exact(&|k| b[k].iter().map(|&x| half::bf16::from_bits(x).to_f64()).collect()),
                    ),
                    (
                        Item {
                            theta: Data::F32(&f[0]),
                            grad: (arrays > 1).then_some(Data::F32(&f[1])),
                            velocity: (arrays > 2).then_some(Data::F32(&f[2])),
                            layout,
                        },
                        exact(&|k| f[k].iter().map(|&x| x as f64).collect()),
                    ),
                ];
                for (item, vals) in cases {
                    let refs: Vec<&[f64]> = vals.iter().map(|v| &v[..]).collect();
                    let want = reference((o, i, r), 1, block, &refs[..arrays]);
                    close(&group_stats(&item).unwrap(), &want, 1e-12);
                }
            }
        }
    }

    #[test]
    fn rows_and_columns_of_one_tensor_are_read_once() {
        // A tensor given twice (rows, then column blocks) is fused into one read; both results
        // must match the reference, for short and long segments, every dtype and array count,
        // and must not depend on the thread count.
        for &(o, i, r, block) in &[(70usize, 600usize, 1usize, 1usize), (512, 64, 9, 1), (40, 12, 49, 1), (33, 30, 3, 5)] {
            let n = o * i * r;
            let raw: Vec<Vec<f64>> = (0..3).map(|s| random(n, 70 + s)).collect();
            let h: Vec<Vec<u16>> = raw.iter().map(|v| v.iter().map(|&x| half::bf16::from_f64(x).to_bits()).collect()).collect();
            let f: Vec<Vec<f32>> = raw.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
            let rows = Layout::from_shape(&[o, i, r], 0, 1).unwrap();
            let cols = Layout::from_shape(&[o, i, r], 1, block).unwrap();
            for arrays in 1..=3 {
                for dtype in 0..3 {
                    let data = |k: usize| match dtype {
                        0 => Data::F64(&raw[k]),
                        1 => Data::F32(&f[k]),
                        _ => Data::BF16(&h[k]),
                    };
                    let exact: Vec<Vec<f64>> = (0..3)
                        .map(|k| match dtype {
                            0 => raw[k].clone(),
                            1 => f[k].iter().map(|&x| x as f64).collect(),
                            _ => h[k].iter().map(|&x| half::bf16::from_bits(x).to_f64()).collect(),
                        })
                        .collect();
                    let refs: Vec<&[f64]> = exact.iter().map(|v| &v[..]).collect();
                    let item = |layout| Item {
                        theta: data(0),
                        grad: (arrays > 1).then(|| data(1)),
                        velocity: (arrays > 2).then(|| data(2)),
                        layout,
                    };
                    let items = [item(rows), item(cols)];
                    assert_eq!(pairs(&items), vec![None, Some(0)], "the pair must be fused");
                    let got = group_stats_batch(&items).unwrap();
                    close(&got[0], &reference((o, i, r), 0, 1, &refs[..arrays]), 1e-12);
                    close(&got[1], &reference((o, i, r), 1, block, &refs[..arrays]), 1e-12);
                    pool::set_num_threads(1).unwrap();
                    let one = group_stats_batch(&items).unwrap();
                    pool::set_num_threads(0).unwrap();
                    assert_eq!(got, one, "results must not depend on the thread count");
                }
            }
        }
        // Different arrays, or a layout that is not the other's transpose: not fused.
        let (a, b) = (random(24, 1), random(24, 2));
        let item = |t: &'static [f64], layout| Item { theta: Data::F64(t), grad: None, velocity: None, layout };
        let (a, b): (&'static [f64], &'static [f64]) = (a.leak(), b.leak());
        let rows = Layout::from_shape(&[4, 6], 0, 1).unwrap();
        let cols = Layout::from_shape(&[4, 6], 1, 2).unwrap();
        assert_eq!(pairs(&[item(a, rows), item(b, cols)]), vec![None, None]);
        assert_eq!(pairs(&[item(a, Layout::from_shape(&[6, 4], 0, 1).unwrap()), item(a, cols)]), vec![None, None]);
    }

    #[test]
    fn portable_and_simd_kernels_agree() {
        let t: Vec<f32> = random(1003, 5).iter().map(|&x| x as f32).collect();
        let g: Vec<f32> = random(1003, 6).iter().map(|&x| x as f32).collect();
        let v: Vec<f32> = random(1003, 7).iter().map(|&x| x as f32).collect();
        for arrays in 1..=3 {
            let k = Sums::count(arrays);
            let (gs, vs) = ((arrays > 1).then_some(&g[..]), (arrays > 2).then_some(&v[..]));
            let (mut a, mut b) = (vec![0f64; k], vec![0f64; k]);
            portable_pass(&t, gs, vs, &mut a);
            pass_f32(&t, gs, vs, &mut b);
            close(&a, &b, 1e-14);
            // The tile kernel: 7 rows of 203 columns (a vector part and a scalar tail), 110 apart.
            let rows = columns::Rows::new([&t[..], &g[..], &v[..]], arrays, 110, 7, 203);
            let mut results = Vec::new();
            for kernel in [columns::Kernel::Portable, columns::Kernel::Avx2, columns::Kernel::Avx512] {
                let mut acc = Box::new(columns::ColAcc([[0.0; columns::TILE + 8]; 8]));
                let mut per_row = vec![0f64; 7 * k];
                columns::tile_with(kernel, &rows, &mut acc, Some(&mut per_row));
                let mut cols_only = Box::new(columns::ColAcc([[0.0; columns::TILE + 8]; 8]));
                columns::tile_with(kernel, &rows, &mut cols_only, None);
                let flat = |a: &columns::ColAcc| a.0[..k].iter().flat_map(|r| r[..203].to_vec()).collect::<Vec<f64>>();
                close(&flat(&acc), &flat(&cols_only), 1e-14);
                results.push((flat(&acc), per_row));
            }
            close(&results[0].0, &results[2].0, 1e-14);
            close(&results[0].1, &results[2].1, 1e-14);
            close(&results[0].0, &results[1].0, 1e-14);
            close(&results[0].1, &results[1].1, 1e-14);
        }
    }

    #[test]
    fn read_pass_reads_every_byte() {
        let bytes: Vec<u8> = (0..5_000_003u32).map(|i| (i * 7 + 3) as u8).collect();
        // Wrapping sum of the 8-byte words plus the unaligned ends: compare with chunks read
        // one at a time (same definition), and check that a change anywhere changes the sum.
        let whole = read_pass(&[&bytes[..]]).unwrap();
        let mut changed = bytes.clone();
        changed[4_999_999] ^= 1;
        assert_ne!(whole, read_pass(&[&changed[..]]).unwrap());
        assert_eq!(read_pass(&[]).unwrap(), 0);
        assert_eq!(read_pass(&[&[][..], &[1u8, 2][..]]).unwrap(), read_pass(&[&[1u8, 2][..]]).unwrap());
    }

    #[test]
    fn shapes_print_like_python() {
        assert_eq!(fmt_shape(&[4, 6]), "(4, 6)");
        assert_eq!(fmt_shape(&[5]), "(5,)");
        assert_eq!(fmt_shape(&[]), "()");
    }
}
