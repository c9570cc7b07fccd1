//! Explicit AVX2+FMA kernels (x86-64 only, chosen at run time by `super`).
//!
//! Why explicit: auto-vectorisation of the multi-accumulator loop was fragile (docs/benchmarks.md;
//! the generic version measured ~2 GB/s in cache here, i.e. scalar). These kernels widen 4
//! inputs at a time to float64 (`vcvtps2pd ymm, m128`: the load is folded into the conversion),
//! accumulate with FMA into float64 lanes, and keep every accumulator in a register.
//! Products of float32 inputs are exact in float64, so the only rounding is in the additions.
//! The lane order of the final horizontal sums is fixed, so results depend only on the segment
//! boundaries (which the plan fixes independently of the thread count).
//!
//! Which product each sum adds up comes from `PRODUCTS` through [`add`] and [`product`], called
//! with a constant sum index (`each_sum!`), so each compiles to the one instruction it names.

use super::buffers::{ColAcc, Element, LaneSums, Rows};
use super::portable;
use crate::stats::sums::{each_sum, products, Sums, ONE, PRODUCTS};
use std::arch::x86_64::*;

/// An element type that loads as 4 float64 lanes.
pub(crate) trait Lanes: Element {
    /// # Safety
    /// `p` must point at 4 readable elements and the CPU must support AVX2.
    unsafe fn load4(p: *const Self) -> __m256d;
    /// The first n (1..=3) elements at `p`, zeros in the other lanes (masked: nothing past the
    /// n-th element is read).
    /// # Safety
    /// `p` must point at n readable elements and the CPU must support AVX2.
    unsafe fn load_first(p: *const Self, n: usize) -> __m256d;
}

/// Lane masks for `load_first`: lanes below n set.
const MASK32: [[i32; 4]; 4] = [[0, 0, 0, 0], [-1, 0, 0, 0], [-1, -1, 0, 0], [-1, -1, -1, 0]];
const MASK64: [[i64; 4]; 4] = [[0, 0, 0, 0], [-1, 0, 0, 0], [-1, -1, 0, 0], [-1, -1, -1, 0]];

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> __m256d {
        _mm256_cvtps_pd(_mm_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> __m256d {
        _mm256_cvtps_pd(_mm_maskload_ps(p, _mm_loadu_si128(MASK32[n].as_ptr() as *const __m128i)))
    }
}

impl Lanes for f64 {
    #[inline(always)]
    unsafe fn load4(p: *const f64) -> __m256d {
        _mm256_loadu_pd(p)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f64, n: usize) -> __m256d {
        _mm256_maskload_pd(p, _mm256_loadu_si256(MASK64[n].as_ptr() as *const __m256i))
    }
}

/// Sum Q of one vector of (θ, ĝ, v) on its own: the operand itself or one multiplication.
#[inline(always)]
unsafe fn product<const Q: usize>(v: &[__m256d; 3]) -> __m256d {
    match const { PRODUCTS[Q] } {
        (a, ONE) => v[a],
        (a, b) => _mm256_mul_pd(v[a], v[b]),
    }
}

/// `into` plus sum Q of one vector of (θ, ĝ, v): one add, or one FMA.
#[inline(always)]
unsafe fn add<const Q: usize>(v: &[__m256d; 3], into: __m256d) -> __m256d {
    match const { PRODUCTS[Q] } {
        (a, ONE) => _mm256_add_pd(into, v[a]),
        (a, b) => _mm256_fmadd_pd(v[a], v[b], into),
    }
}

/// `s` plus the sums of A arrays of one vector.
#[inline(always)]
unsafe fn add_all<const A: usize>(s: &mut [__m256d; 8], v: &[__m256d; 3]) {
    each_sum!(Sums::count(A), |Q| {
        s[Q] = add::<Q>(v, s[Q]);
    });
}

/// Software prefetch distance in bytes. The hardware prefetcher alone left one core ~20% below
/// its streaming rate on two interleaved streams (measured on 256 MB arrays: 7.4 -> 9.0 GB/s
/// with 1-8 KiB ahead); prefetching a fixed distance ahead of each stream closes that gap.
const PREFETCH_BYTES: usize = 4096;

/// Prefetch the cache line PREFETCH_BYTES ahead of element i of `p`, once per 64-byte line.
#[inline(always)]
unsafe fn prefetch<E>(p: *const E, i: usize) {
    let per_line = (64 / std::mem::size_of::<E>()).max(1);
    if i.is_multiple_of(per_line) {
        // wrapping_add: the address may lie past the end; a prefetch never faults.
        let ahead = (p as *const i8).wrapping_add(i * std::mem::size_of::<E>() + PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(ahead);
    }
}

/// Prefetch the cache line holding element i of `p`, once per 64-byte line of elements.
#[inline(always)]
unsafe fn prefetch_line<E>(p: *const E, i: usize) {
    if i.is_multiple_of((64 / std::mem::size_of::<E>()).max(1)) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i) as *const i8);
    }
}

/// Horizontal sum in a fixed order: (l0 + l1) + (l2 + l3).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256d) -> f64 {
    let mut a = [0f64; 4];
    // SAFETY: `a` holds 4 f64.
    unsafe { _mm256_storeu_pd(a.as_mut_ptr(), v) };
    (a[0] + a[1]) + (a[2] + a[3])
}

// ---------------------------------------------------------------------------------------------
// The segment kernel: one contiguous segment summed in registers.

/// The sums of one contiguous segment of A arrays (`t`; `g` and `v`, at least as long, when
/// A >= 2, 3), added to out[..K]. Each iteration reads U vectors of 4 elements per array into U
/// sets of K accumulators, so that every accumulator stays in a register while the U sets hide
/// the add latency:
///   1 array:  2 sums x 4 sets = 8 accumulators, 16 elements per iteration;
///   2 arrays: 5 sums x 2 sets = 10 accumulators, 8 elements per iteration;
///   3 arrays: 8 sums x 1 set  = 8 accumulators, 4 elements per iteration.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn segment<E: Lanes, const A: usize, const U: usize>(t: &[E], g: &[E], v: &[E], out: &mut [f64]) {
    let k = Sums::count(A);
    let n = t.len();
    let data = [t, if A >= 2 { &g[..n] } else { g }, if A >= 3 { &v[..n] } else { v }];
    let p = data.map(<[E]>::as_ptr);
    let zero = _mm256_setzero_pd();
    let mut acc = [[zero; 8]; U];
    let mut i = 0;
    while i + 4 * U <= n {
        for &a in p.iter().take(A) {
            let mut at = i;
            while at < i + 4 * U {
                prefetch(a, at);
                at += 8;
            }
        }
        for (u, s) in acc.iter_mut().enumerate() {
            let load = |a: usize| if a < A { E::load4(p[a].add(i + 4 * u)) } else { zero };
            add_all::<A>(s, &[load(0), load(1), load(2)]);
        }
        i += 4 * U;
    }
    // The sets folded pairwise in a fixed order: (s0 + s1) + (s2 + s3).
    let mut sets = U;
    while sets > 1 {
        sets /= 2;
        for u in 0..sets {
            let (a, b) = (acc[2 * u], acc[2 * u + 1]);
            each_sum!(k, |Q| {
                acc[u][Q] = _mm256_add_pd(a[Q], b[Q]);
            });
        }
    }
    let mut r = [0f64; 8];
    each_sum!(k, |Q| {
        r[Q] = hsum(acc[0][Q]);
    });
    for j in i..n {
        let p = products(portable::element(data, A, j));
        for (s, p) in r.iter_mut().zip(p).take(k) {
            *s += p;
        }
    }
    for (o, s) in out.iter_mut().zip(r).take(k) {
        *o += s;
    }
}

// ---------------------------------------------------------------------------------------------
// The tile kernel for short segments (see `crate::stats::columns`): rows of a tile of columns,
// each element's sums added into per-column float64 accumulators in L1, and optionally each
// row's sums kept in registers (a tensor reduced both by rows and by columns in one read).

/// Sum Q of one vector added to the column accumulators at `col` and to the row's `row[Q]`.
#[inline(always)]
unsafe fn both<const Q: usize>(v: &[__m256d; 3], col: *mut f64, row: &mut [__m256d; 8]) {
    _mm256_storeu_pd(col, add::<Q>(v, _mm256_loadu_pd(col)));
    row[Q] = add::<Q>(v, row[Q]);
}

/// Adds columns [0, m) of every row of `rows` into `acc`. With ROWS_OUT, row j's K sums are
/// also added to rows_out[j*K..], the row's sums kept in registers (one row per sweep); without,
/// rows go four at a time, so each accumulator is loaded and stored once per four rows (those
/// loads and stores, not the products, bound a one-row sweep).
///
/// # Safety
/// AVX2 and FMA; rows_out holds count*K sums with ROWS_OUT. (`Rows::new` checked the rows.)
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile<E: Lanes, const A: usize, const ROWS_OUT: bool>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: &mut [f64]) {
    let k = Sums::count(A);
    let (count, m) = (rows.count, rows.m);
    let whole = m - m % 4;
    let mut j = 0;
    while j < count {
        let n = if ROWS_OUT { 1 } else { (count - j).min(4) };
        // The rows of the next sweep: rows of a tile are far apart, and the hardware
        // prefetcher would stall at the start of each.
        let ahead = (j + n..(j + 2 * n).min(count)).map(|i| rows.ptrs(i));
        let mut next = [[std::ptr::null::<E>(); 3]; 4];
        let mut n_ahead = 0;
        for (slot, p) in next.iter_mut().zip(ahead) {
            *slot = p;
            n_ahead += 1;
        }
        let p = |i: usize| rows.ptrs(j + i);
        let row = match n {
            1 => sweep::<E, A, 1, ROWS_OUT>([p(0)], &next[..n_ahead], whole, acc),
            2 => sweep::<E, A, 2, ROWS_OUT>([p(0), p(1)], &next[..n_ahead], whole, acc),
            3 => sweep::<E, A, 3, ROWS_OUT>([p(0), p(1), p(2)], &next[..n_ahead], whole, acc),
            _ => sweep::<E, A, 4, ROWS_OUT>([p(0), p(1), p(2), p(3)], &next[..n_ahead], whole, acc),
        };
        for i in j..j + n {
            let mut tail = [0f64; 8];
            portable::add_columns(rows.row(i), A, whole..m, acc, &mut tail);
            if ROWS_OUT {
                for q in 0..k {
                    rows_out[i * k + q] += hsum(row[q]) + tail[q];
                }
            }
        }
        j += n;
    }
}

/// The vector part of R rows (columns [0, whole), whole a multiple of 4) added into `acc`; the
/// row's own sums returned (ROWS_OUT, R = 1). `ahead`: rows to prefetch for the next sweep.
#[inline(always)]
unsafe fn sweep<E: Lanes, const A: usize, const R: usize, const ROWS_OUT: bool>(
    rows: [[*const E; 3]; R],
    ahead: &[[*const E; 3]],
    whole: usize,
    acc: &mut ColAcc,
) -> [__m256d; 8] {
    let k = Sums::count(A);
    let mut row = [_mm256_setzero_pd(); 8];
    let base = acc.0.as_mut_ptr() as *mut f64;
    let stride = acc.0[0].len();
    let mut c = 0;
    while c < whole {
        for p in ahead {
            for &a in p.iter().take(A) {
                prefetch_line(a, c);
            }
        }
        let at = |p: *const E| E::load4(p.add(c));
        let zero = _mm256_setzero_pd();
        let v = [at(rows[0][0]), if A >= 2 { at(rows[0][1]) } else { zero }, if A >= 3 { at(rows[0][2]) } else { zero }];
        if ROWS_OUT {
            // One row: each product goes into the row's register and the column's memory by
            // FMA, one sum at a time (all eight at once would push the row's sums out of the
            // 16 registers, and a spilled sum is a store-to-load chain on every iteration).
            each_sum!(k, |Q| {
                both::<Q>(&v, base.add(Q * stride + c), &mut row);
            });
            c += 4;
            continue;
        }
        let mut s = [zero; 8];
        each_sum!(k, |Q| {
            s[Q] = product::<Q>(&v);
        });
        for r in rows.iter().skip(1) {
            let x = at(r[0]);
            add_all::<A>(&mut s, &[x, if A >= 2 { at(r[1]) } else { x }, if A >= 3 { at(r[2]) } else { x }]);
        }
        each_sum!(k, |Q| {
            let p = base.add(Q * stride + c);
            _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), s[Q]));
        });
        c += 4;
    }
    row
}

// ---------------------------------------------------------------------------------------------
// Long segments of a tensor reduced by rows and by column blocks in one read (a Flatten→Linear:
// blocks of 49). One call per row; each segment is summed in registers, and its vector sums are
// added to its group's and to the row's lane sums (no horizontal sums per segment; those are
// done once per group and row by the caller).

/// Adds each of the `groups` segments of `seg` (>= 1) elements of one row (θ, ĝ, v of A arrays
/// from `p`) to `cols[g]` and all of them to `row` (4 lanes per sum).
///
/// # Safety
/// AVX2 and FMA; the A used arrays hold groups*seg elements from `p`; cols.len() >= groups.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn segments<E: Lanes, const A: usize>(
    p: [*const E; 3],
    groups: usize,
    seg: usize,
    cols: &mut [LaneSums],
    row: &mut LaneSums,
) {
    let k = Sums::count(A);
    let (whole, rest) = (seg - seg % 4, seg % 4);
    let zero = _mm256_setzero_pd();
    for (g, col) in cols.iter_mut().enumerate().take(groups) {
        let at = g * seg;
        let mut s = [zero; 8];
        let mut i = 0;
        while i < whole {
            for &a in p.iter().take(A) {
                prefetch(a, at + i);
            }
            let load = |a: usize| if a < A { E::load4(p[a].add(at + i)) } else { zero };
            add_all::<A>(&mut s, &[load(0), load(1), load(2)]);
            i += 4;
        }
        if rest > 0 {
            let load = |a: usize| if a < A { E::load_first(p[a].add(at + whole), rest) } else { zero };
            add_all::<A>(&mut s, &[load(0), load(1), load(2)]);
        }
        each_sum!(k, |Q| {
            for acc in [col.as_mut_ptr(), row.as_mut_ptr()] {
                let at = acc.add(Q * 4);
                _mm256_storeu_pd(at, _mm256_add_pd(_mm256_loadu_pd(at), s[Q]));
            }
        });
    }
}
