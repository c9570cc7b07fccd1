//! The AVX-512 kernels (x86-64 CPUs with AVX-512F, chosen at run time by `super`): the sweeps
//! that reduce a tensor by columns and by rows in one read. With 4 lanes the tile sweep is bound
//! by its instruction count (every element feeds two FMAs, and the column accumulators are
//! loaded and stored once per row; the 3x3 conv between a BatchNorm scale and a ReLU rescale);
//! 8 lanes halve it. The other kernels stay AVX2: they are bound by memory.

use super::buffers::{ColAcc, Element, LaneSums, Rows};
use super::portable;
use crate::stats::sums::{each_sum, Sums, ONE, PRODUCTS};
use std::arch::x86_64::*;

/// An element type that loads as 8 float64 lanes.
pub(crate) trait Lanes8: Element {
    /// # Safety
    /// `p` must point at 8 readable elements and the CPU must support AVX-512F.
    unsafe fn load8(p: *const Self) -> __m512d;
    /// The first n (1..=7) elements, zeros in the other lanes (nothing past them is read).
    /// # Safety
    /// `p` must point at n readable elements and the CPU must support AVX-512F.
    unsafe fn load_first8(p: *const Self, n: usize) -> __m512d;
}

impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m512d {
        _mm512_cvtps_pd(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_first8(p: *const f32, n: usize) -> __m512d {
        // A masked AVX load (lanes past n are neither read nor faulted on).
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        _mm512_cvtps_pd(_mm256_maskload_ps(p, mask))
    }
}

impl Lanes8 for f64 {
    #[inline(always)]
    unsafe fn load8(p: *const f64) -> __m512d {
        _mm512_loadu_pd(p)
    }
    #[inline(always)]
    unsafe fn load_first8(p: *const f64, n: usize) -> __m512d {
        _mm512_maskz_loadu_pd(((1u32 << n) - 1) as __mmask8, p)
    }
}

/// `into` plus sum Q of one vector of (θ, ĝ, v): one add, or one FMA.
#[inline(always)]
unsafe fn add<const Q: usize>(v: &[__m512d; 3], into: __m512d) -> __m512d {
    match const { PRODUCTS[Q] } {
        (a, ONE) => _mm512_add_pd(into, v[a]),
        (a, b) => _mm512_fmadd_pd(v[a], v[b], into),
    }
}

/// Sum Q of one vector added to the column accumulators at `col` and to the row's `row[Q]`.
#[inline(always)]
unsafe fn both<const Q: usize>(v: &[__m512d; 3], col: *mut f64, row: &mut [__m512d; 8]) {
    _mm512_storeu_pd(col, add::<Q>(v, _mm512_loadu_pd(col)));
    row[Q] = add::<Q>(v, row[Q]);
}

/// Adds columns [0, m) of every row of `rows` into `acc`, and row j's K sums to rows_out[j*K..].
///
/// # Safety
/// AVX-512F; rows_out holds count*K sums. (`Rows::new` checked the rows.)
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_rows<E: Lanes8, const A: usize>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: &mut [f64]) {
    let k = Sums::count(A);
    let (count, m) = (rows.count, rows.m);
    let whole = m - m % 8;
    let base = acc.0.as_mut_ptr() as *mut f64;
    let stride = acc.0[0].len();
    let zero = _mm512_setzero_pd();
    for j in 0..count {
        let p = rows.ptrs(j);
        let next = if j + 1 < count { Some(rows.ptrs(j + 1)) } else { None };
        let mut row = [zero; 8];
        let mut c = 0;
        while c < whole {
            if let Some(n) = next {
                // The next row, one cache line per 64 bytes of each array (rows of a tile are
                // far apart: the hardware prefetcher would stall at the start of each).
                if c.is_multiple_of((64 / std::mem::size_of::<E>()).max(1)) {
                    for a in n.iter().take(A) {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(c) as *const i8);
                    }
                }
            }
            let load = |a: usize| if a < A { E::load8(p[a].add(c)) } else { zero };
            let v = [load(0), load(1), load(2)];
            each_sum!(k, |Q| {
                both::<Q>(&v, base.add(Q * stride + c), &mut row);
            });
            c += 8;
        }
        let mut tail = [0f64; 8];
        portable::add_columns(rows.row(j), A, whole..m, acc, &mut tail);
        let out = &mut rows_out[j * k..(j + 1) * k];
        for (q, o) in out.iter_mut().enumerate() {
            *o += _mm512_reduce_add_pd(row[q]) + tail[q];
        }
    }
}

/// `avx2::segments` with 8 lanes per sum (`LaneSums` lanes at `[q * 8 + l]`).
///
/// # Safety
/// AVX-512F (and AVX2); the A used arrays hold groups*seg elements from `p`; cols.len() >= groups.
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn segments<E: Lanes8, const A: usize>(
    p: [*const E; 3],
    groups: usize,
    seg: usize,
    cols: &mut [LaneSums],
    row: &mut LaneSums,
) {
    let k = Sums::count(A);
    let (whole, rest) = (seg - seg % 8, seg % 8);
    let zero = _mm512_setzero_pd();
    let line = (64 / std::mem::size_of::<E>()).max(1);
    for (g, col) in cols.iter_mut().enumerate().take(groups) {
        let at = g * seg;
        let mut s = [zero; 8];
        let mut i = 0;
        let mut add_all = |v: [__m512d; 3]| {
            each_sum!(k, |Q| {
                s[Q] = add::<Q>(&v, s[Q]);
            });
        };
        while i < whole {
            if (at + i) % line < 8 {
                for a in p.iter().take(A) {
                    _mm_prefetch::<_MM_HINT_T0>((a.wrapping_add(at + i) as *const i8).wrapping_add(4096));
                }
            }
            let load = |a: usize| if a < A { E::load8(p[a].add(at + i)) } else { zero };
            add_all([load(0), load(1), load(2)]);
            i += 8;
        }
        if rest > 0 {
            let load = |a: usize| if a < A { E::load_first8(p[a].add(at + whole), rest) } else { zero };
            add_all([load(0), load(1), load(2)]);
        }
        each_sum!(k, |Q| {
            for acc in [col.as_mut_ptr(), row.as_mut_ptr()] {
                let at = acc.add(Q * 8);
                _mm512_storeu_pd(at, _mm512_add_pd(_mm512_loadu_pd(at), s[Q]));
            }
        });
    }
}
