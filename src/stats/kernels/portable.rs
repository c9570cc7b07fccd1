//! The portable kernels (any CPU; on x86-64 without AVX2, or with NEURAL_MECHANICS_NO_SIMD=1),
//! and the element step the vector tile kernels reuse for their scalar tails.

use super::buffers::{ColAcc, Element, Rows};
use crate::stats::sums::{products, Sums};
use std::ops::Range;

/// Independent lanes per sum in the segment kernel: they hide the add latency.
const W: usize = 4;

/// The sums of one contiguous segment of θ (and ĝ, v, each at least as long), added to `out`
/// (one per sum: 2, 5 or 8).
#[inline(always)]
pub(super) fn segment<E: Element>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    let n = t.len();
    let whole = n - n % W;
    let get = |a: Option<&[E]>, i: usize| a.map_or(0.0, |a| a[i].to_f64());
    let add = |acc: &mut [f64; 8], i: usize| {
        let p = products([t[i].to_f64(), get(g, i), get(v, i)]);
        for (s, p) in acc.iter_mut().zip(p) {
            *s += p;
        }
    };
    let mut lanes = [[0f64; 8]; W];
    for i in (0..whole).step_by(W) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            add(lane, i + l);
        }
    }
    let mut r = [0f64; 8];
    for lane in &lanes {
        for (s, x) in r.iter_mut().zip(lane) {
            *s += x;
        }
    }
    for i in whole..n {
        add(&mut r, i);
    }
    for (o, s) in out.iter_mut().zip(r) {
        *o += s;
    }
}

/// The portable tile kernel: columns [0, m) of every row added into `acc`, one row and one
/// column at a time, and with `rows_out` each row's sums (k per row).
pub(super) fn tile<E: Element>(rows: &Rows<'_, E>, acc: &mut ColAcc, mut rows_out: Option<&mut [f64]>) {
    let k = Sums::count(rows.arrays);
    for j in 0..rows.count {
        let mut row = [0f64; 8];
        add_columns(rows.row(j), rows.arrays, 0..rows.m, acc, &mut row);
        if let Some(out) = rows_out.as_deref_mut() {
            for (o, s) in out[j * k..(j + 1) * k].iter_mut().zip(row) {
                *o += s;
            }
        }
    }
}

/// Columns `cols` of one row of a tile (its first `arrays` arrays), element by element: each
/// element's sums added to its column's accumulators and to `row`. The portable tile kernel's
/// step, and the scalar tail of the vector ones.
#[inline(always)]
pub(super) fn add_columns<E: Element>(r: [&[E]; 3], arrays: usize, cols: Range<usize>, acc: &mut ColAcc, row: &mut [f64; 8]) {
    let k = Sums::count(arrays);
    for c in cols {
        let p = products(element(r, arrays, c));
        for q in 0..k {
            acc.0[q][c] += p[q];
            row[q] += p[q];
        }
    }
}

/// Element `j` of the first `arrays` of `data` (θ, ĝ, v), widened; 0 for the others.
#[inline(always)]
pub(super) fn element<E: Element>(data: [&[E]; 3], arrays: usize, j: usize) -> [f64; 3] {
    std::array::from_fn(|a| if a < arrays { data[a][j].to_f64() } else { 0.0 })
}
