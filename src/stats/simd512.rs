//! The AVX-512 fused tile sweep (x86-64 CPUs with AVX-512F, chosen at run time): a tile's rows
//! reduced by columns and by rows in one read (`super::columns`, the 3x3 conv between a
//! BatchNorm scale and a ReLU rescale). Each row's eight sums stay in registers while every
//! product is also added to its column's accumulator. With 4 lanes this sweep is bound by its
//! instruction count (every element feeds two FMAs, and the column accumulators are loaded and
//! stored once per row); 8 lanes halve it. The other kernels stay AVX2: they are bound by memory.

use std::arch::x86_64::*;

use super::columns::{ColAcc, Rows};
use super::simd::LaneSums;

/// An element type that loads as 8 float64 lanes.
pub(super) trait Lanes8: super::simd::Lanes {
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

/// `into` plus sum Q (in the order of `Sums::NAMES`) of one vector of (θ, ĝ, v).
#[inline(always)]
unsafe fn add<const Q: usize>(x: __m512d, y: __m512d, z: __m512d, into: __m512d) -> __m512d {
    match Q {
        0 => _mm512_add_pd(into, x),
        1 => _mm512_fmadd_pd(x, x, into),
        2 => _mm512_add_pd(into, y),
        3 => _mm512_fmadd_pd(y, y, into),
        4 => _mm512_fmadd_pd(x, y, into),
        5 => _mm512_fmadd_pd(z, z, into),
        6 => _mm512_fmadd_pd(x, z, into),
        _ => _mm512_fmadd_pd(y, z, into),
    }
}

/// Sum Q of one vector added to the column accumulators at `col` and to the row's `row[Q]`.
#[inline(always)]
unsafe fn both<const Q: usize>(x: __m512d, y: __m512d, z: __m512d, col: *mut f64, row: &mut [__m512d; 8]) {
    _mm512_storeu_pd(col, add::<Q>(x, y, z, _mm512_loadu_pd(col)));
    row[Q] = add::<Q>(x, y, z, row[Q]);
}

/// Adds columns [0, m) of every row of `rows` into `acc`, and row j's K sums to rows_out[j*K..].
///
/// # Safety
/// AVX-512F; rows_out holds count*K sums. (`Rows::new` checked the rows.)
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_rows<E: Lanes8, const A: usize>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: &mut [f64]) {
    let k = super::Sums::count(A);
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
                if c % (64 / std::mem::size_of::<E>()).max(1) == 0 {
                    for a in n.iter().take(A) {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(c) as *const i8);
                    }
                }
            }
            let x = E::load8(p[0].add(c));
            let y = if A >= 2 { E::load8(p[1].add(c)) } else { zero };
            let z = if A >= 3 { E::load8(p[2].add(c)) } else { zero };
            let col = |q: usize| base.add(q * stride + c);
            both::<0>(x, y, z, col(0), &mut row);
            both::<1>(x, y, z, col(1), &mut row);
            if A >= 2 {
                both::<2>(x, y, z, col(2), &mut row);
                both::<3>(x, y, z, col(3), &mut row);
                both::<4>(x, y, z, col(4), &mut row);
            }
            if A >= 3 {
                both::<5>(x, y, z, col(5), &mut row);
                both::<6>(x, y, z, col(6), &mut row);
                both::<7>(x, y, z, col(7), &mut row);
            }
            c += 8;
        }
        let r = rows.row(j);
        let out = &mut rows_out[j * k..(j + 1) * k];
        let mut tail = [0f64; 8];
        for c in whole..m {
            let x = super::simd::Lanes::to_f64(r[0][c]);
            let y = if A >= 2 { super::simd::Lanes::to_f64(r[1][c]) } else { 0.0 };
            let z = if A >= 3 { super::simd::Lanes::to_f64(r[2][c]) } else { 0.0 };
            super::columns::add_element(x, y, z, k, c, acc, &mut tail);
        }
        for q in 0..k {
            out[q] += _mm512_reduce_add_pd(row[q]) + tail[q];
        }
    }
}

/// `simd::segments` with 8 lanes per sum (`LaneSums` lanes at `[q * 8 + l]`).
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
    let k = super::Sums::count(A);
    let (whole, rest) = (seg - seg % 8, seg % 8);
    let zero = _mm512_setzero_pd();
    let line = (64 / std::mem::size_of::<E>()).max(1);
    for (g, col) in cols.iter_mut().enumerate().take(groups) {
        let at = g * seg;
        let mut s = [zero; 8];
        let mut i = 0;
        let mut step = |x: __m512d, y: __m512d, z: __m512d| {
            s[0] = add::<0>(x, y, z, s[0]);
            s[1] = add::<1>(x, y, z, s[1]);
            if A >= 2 {
                s[2] = add::<2>(x, y, z, s[2]);
                s[3] = add::<3>(x, y, z, s[3]);
                s[4] = add::<4>(x, y, z, s[4]);
            }
            if A >= 3 {
                s[5] = add::<5>(x, y, z, s[5]);
                s[6] = add::<6>(x, y, z, s[6]);
                s[7] = add::<7>(x, y, z, s[7]);
            }
        };
        while i < whole {
            if (at + i) % line < 8 {
                for a in p.iter().take(A) {
                    _mm_prefetch::<_MM_HINT_T0>((a.wrapping_add(at + i) as *const i8).wrapping_add(4096));
                }
            }
            let x = E::load8(p[0].add(at + i));
            let y = if A >= 2 { E::load8(p[1].add(at + i)) } else { zero };
            let z = if A >= 3 { E::load8(p[2].add(at + i)) } else { zero };
            step(x, y, z);
            i += 8;
        }
        if rest > 0 {
            let x = E::load_first8(p[0].add(at + whole), rest);
            let y = if A >= 2 { E::load_first8(p[1].add(at + whole), rest) } else { zero };
            let z = if A >= 3 { E::load_first8(p[2].add(at + whole), rest) } else { zero };
            step(x, y, z);
        }
        for q in 0..k {
            for acc in [col.as_mut_ptr(), row.as_mut_ptr()] {
                let at = acc.add(q * 8);
                _mm512_storeu_pd(at, _mm512_add_pd(_mm512_loadu_pd(at), s[q]));
            }
        }
    }
}
