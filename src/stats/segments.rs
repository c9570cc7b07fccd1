//! Long segments (rows; column blocks of at least `plan::SHORT_SEG` elements): one segment-kernel
//! call per contiguous segment, 16-bit input widened to float32 a chunk at a time; and the
//! fused read of a tensor reduced by rows and by long column blocks at once.

use super::input::{Data, InPlace, Item, Layout};
use super::kernels::{self, Float, LaneSums, RowSegments};

/// 16-bit inputs are widened to float32 this many elements at a time, then reduced as float32.
const HALF_CHUNK: usize = 1024;

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
        t.widen_into(&mut bt[..m]);
        if let Some(g) = g {
            g.widen_into(&mut bg[..m]);
        }
        if let Some(v) = v {
            v.widen_into(&mut bv[..m]);
        }
        (&bt[..m], g.map(|_| &bg[..m]), v.map(|_| &bv[..m]))
    }
}

/// Sums of the segments of groups [g.0, g.1) of rows [o.0, o.1) of `item`, elements [s.0, s.1)
/// of each, added to `partial` (k per group, from group g.0), and with `rows_out` each row's
/// (k per row, from row o.0; then the task covers whole rows: every group, whole segments).
pub(super) fn reduce_long(
    item: &Item<'_>,
    o: (usize, usize),
    g: (usize, usize),
    s: (usize, usize),
    partial: &mut [f64],
    rows_out: Option<&mut [f64]>,
) {
    let k = item.width();
    let Layout { groups, seg, .. } = item.layout;
    if let Some(rows) = rows_out {
        debug_assert!(g == (0, groups) && s == (0, seg), "a task that also gives row sums covers whole rows");
        match (RowSegments::detect(), item.theta) {
            (Some(kernel), Data::F32(_)) => return fused::<f32>(kernel, item, o, partial, rows),
            (Some(kernel), Data::F64(_)) => return fused::<f64>(kernel, item, o, partial, rows),
            _ => {}
        }
        // Segment by segment, each one's sums added to its group and to its row.
        let mut scratch = Scratch::new(item);
        for row in o.0..o.1 {
            for group in g.0..g.1 {
                let at = (row * groups + group) * seg;
                let mut one = [0f64; 8];
                reduce_segment(item, at + s.0, at + s.1, &mut one[..k], &mut scratch);
                let r = row - o.0;
                for (q, x) in one[..k].iter().enumerate() {
                    partial[(group - g.0) * k + q] += x;
                    rows[r * k + q] += x;
                }
            }
        }
        return;
    }
    let mut scratch = Scratch::new(item);
    for row in o.0..o.1 {
        for group in g.0..g.1 {
            let at = (row * groups + group) * seg;
            reduce_segment(item, at + s.0, at + s.1, &mut partial[(group - g.0) * k..(group - g.0 + 1) * k], &mut scratch);
        }
    }
}

/// Accumulate one contiguous segment [start, end) of the item's arrays into `out`.
fn reduce_segment(item: &Item<'_>, start: usize, end: usize, out: &mut [f64], scratch: &mut Scratch) {
    match item.theta {
        Data::F32(_) => in_place::<f32>(item, start, end, out),
        Data::F64(_) => in_place::<f64>(item, start, end, out),
        Data::F16(_) | Data::BF16(_) => {
            let [_, g, v] = item.data();
            let t = item.theta;
            let mut at = start;
            while at < end {
                let m = HALF_CHUNK.min(end - at);
                let (g, v) = (g.map(|d| d.slice(at, at + m)), v.map(|d| d.slice(at, at + m)));
                let (bt, bg, bv) = scratch.widen3(t.slice(at, at + m), g, v, m);
                kernels::segment(bt, bg, bv, out);
                at += m;
            }
        }
    }
}

fn in_place<E: Float + InPlace>(item: &Item<'_>, start: usize, end: usize, out: &mut [f64]) {
    let [t, g, v] = item.in_place::<E>(start, end);
    kernels::segment(t, item.grad.map(|_| g), item.velocity.map(|_| v), out)
}

/// Whole rows [o.0, o.1) of an item reduced by rows and by long column blocks in one read:
/// one fused kernel call per row, vector sums per group and row, the lanes added up once at the
/// end (in a fixed order, so the result does not depend on the thread count).
fn fused<E: Float + InPlace>(kernel: RowSegments, item: &Item<'_>, o: (usize, usize), partial: &mut [f64], rows: &mut [f64]) {
    let (k, arrays) = (item.width(), item.arrays());
    let Layout { groups, seg, .. } = item.layout;
    let row_len = groups * seg;
    let lanes = kernel.lanes();
    let add_lanes = |v: &LaneSums, out: &mut [f64]| {
        for (q, o) in out.iter_mut().enumerate().take(k) {
            *o += v[q * lanes..(q + 1) * lanes].iter().sum::<f64>();
        }
    };
    let mut cols = vec![[0f64; 64]; groups];
    for row in o.0..o.1 {
        let mut row_sums = [0f64; 64];
        kernel.add(item.in_place::<E>(row * row_len, (row + 1) * row_len), arrays, groups, seg, &mut cols, &mut row_sums);
        let r = row - o.0;
        add_lanes(&row_sums, &mut rows[r * k..(r + 1) * k]);
    }
    for (g, col) in cols.iter().enumerate() {
        add_lanes(col, &mut partial[g * k..(g + 1) * k]);
    }
}
