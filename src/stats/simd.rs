//! Explicit AVX2+FMA row kernels (x86-64 only, chosen at run time by `super::pass_float`).
//!
//! Why explicit: auto-vectorisation of the multi-accumulator loop was fragile (PERF_NOTES.md;
//! the generic version measured ~2 GB/s in cache here, i.e. scalar). These kernels widen 4
//! inputs at a time to float64 (`vcvtps2pd ymm, m128`: the load is folded into the conversion),
//! accumulate with FMA into float64 lanes, and keep every accumulator in a register:
//!   1 array:  2 sums x 4 unrolled vectors = 8 accumulators, 16 elements per iteration;
//!   2 arrays: 5 sums x 2 = 10 accumulators, 8 elements per iteration;
//!   3 arrays: 8 sums x 1 = 8 accumulators, 4 elements per iteration.
//! Products of float32 inputs are exact in float64, so the only rounding is in the additions.
//! The lane order of the final horizontal sums is fixed, so results depend only on the segment
//! boundaries (which the plan fixes independently of the thread count).

use std::arch::x86_64::*;

/// An element type that loads as 4 float64 lanes.
pub(super) trait Lanes: Copy {
    /// # Safety
    /// `p` must point at 4 readable elements and the CPU must support AVX2.
    unsafe fn load4(p: *const Self) -> __m256d;
    /// The first n (1..=3) elements at `p`, zeros in the other lanes (masked: nothing past the
    /// n-th element is read).
    /// # Safety
    /// `p` must point at n readable elements and the CPU must support AVX2.
    unsafe fn load_first(p: *const Self, n: usize) -> __m256d;
    fn to_f64(self) -> f64;
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
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
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
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// Software prefetch distance in bytes. The hardware prefetcher alone left one core ~20% below
/// its streaming rate on two interleaved streams (measured on 256 MB arrays: 7.4 -> 9.0 GB/s
/// with 1-8 KiB ahead); prefetching a fixed distance ahead of each stream closes that gap.
const PREFETCH_BYTES: usize = 4096;

/// Prefetch the cache line PREFETCH_BYTES ahead of element i of `p`, once per 64-byte line.
#[inline(always)]
unsafe fn prefetch<E>(p: *const E, i: usize) {
    let per_line = (64 / std::mem::size_of::<E>()).max(1);
    if i % per_line == 0 {
        // wrapping_add: the address may lie past the end; a prefetch never faults.
        let ahead = (p as *const i8).wrapping_add(i * std::mem::size_of::<E>() + PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(ahead);
    }
}

/// Prefetch the cache line holding element i of `p`, once per 64-byte line of elements.
#[inline(always)]
unsafe fn prefetch_line<E>(p: *const E, i: usize) {
    if i % (64 / std::mem::size_of::<E>()).max(1) == 0 {
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

/// Σθ, Σθ² of one contiguous segment, added to out[0..2].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pass1<E: Lanes>(t: &[E], out: &mut [f64]) {
    let n = t.len();
    let p = t.as_ptr();
    let z = _mm256_setzero_pd();
    let (mut s0, mut s1, mut s2, mut s3) = (z, z, z, z);
    let (mut q0, mut q1, mut q2, mut q3) = (z, z, z, z);
    let mut i = 0;
    while i + 16 <= n {
        prefetch(p, i);
        prefetch(p, i + 8);
        let a = E::load4(p.add(i));
        let b = E::load4(p.add(i + 4));
        let c = E::load4(p.add(i + 8));
        let d = E::load4(p.add(i + 12));
        s0 = _mm256_add_pd(s0, a);
        q0 = _mm256_fmadd_pd(a, a, q0);
        s1 = _mm256_add_pd(s1, b);
        q1 = _mm256_fmadd_pd(b, b, q1);
        s2 = _mm256_add_pd(s2, c);
        q2 = _mm256_fmadd_pd(c, c, q2);
        s3 = _mm256_add_pd(s3, d);
        q3 = _mm256_fmadd_pd(d, d, q3);
        i += 16;
    }
    let s = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
    let q = _mm256_add_pd(_mm256_add_pd(q0, q1), _mm256_add_pd(q2, q3));
    let (mut r0, mut r1) = (hsum(s), hsum(q));
    for x in &t[i..] {
        let x = x.to_f64();
        r0 += x;
        r1 += x * x;
    }
    out[0] += r0;
    out[1] += r1;
}

/// Σθ, Σθ², Σĝ, Σĝ², Σθĝ of one contiguous segment, added to out[0..5].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pass2<E: Lanes>(t: &[E], g: &[E], out: &mut [f64]) {
    let n = t.len();
    let g = &g[..n];
    let (tp, gp) = (t.as_ptr(), g.as_ptr());
    let z = _mm256_setzero_pd();
    let (mut a0, mut a1, mut a2, mut a3, mut a4) = (z, z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3, mut b4) = (z, z, z, z, z);
    let mut i = 0;
    while i + 8 <= n {
        prefetch(tp, i);
        prefetch(gp, i);
        let x = E::load4(tp.add(i));
        let y = E::load4(gp.add(i));
        a0 = _mm256_add_pd(a0, x);
        a1 = _mm256_fmadd_pd(x, x, a1);
        a2 = _mm256_add_pd(a2, y);
        a3 = _mm256_fmadd_pd(y, y, a3);
        a4 = _mm256_fmadd_pd(x, y, a4);
        let x = E::load4(tp.add(i + 4));
        let y = E::load4(gp.add(i + 4));
        b0 = _mm256_add_pd(b0, x);
        b1 = _mm256_fmadd_pd(x, x, b1);
        b2 = _mm256_add_pd(b2, y);
        b3 = _mm256_fmadd_pd(y, y, b3);
        b4 = _mm256_fmadd_pd(x, y, b4);
        i += 8;
    }
    let mut r = [
        hsum(_mm256_add_pd(a0, b0)),
        hsum(_mm256_add_pd(a1, b1)),
        hsum(_mm256_add_pd(a2, b2)),
        hsum(_mm256_add_pd(a3, b3)),
        hsum(_mm256_add_pd(a4, b4)),
    ];
    for (x, y) in t[i..].iter().zip(&g[i..]) {
        let (x, y) = (x.to_f64(), y.to_f64());
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

/// The eight sums of (θ, ĝ, v) of one contiguous segment, added to out[0..8].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pass3<E: Lanes>(t: &[E], g: &[E], v: &[E], out: &mut [f64]) {
    let n = t.len();
    let (g, v) = (&g[..n], &v[..n]);
    let (tp, gp, vp) = (t.as_ptr(), g.as_ptr(), v.as_ptr());
    let mut a = [_mm256_setzero_pd(); 8];
    let mut i = 0;
    while i + 4 <= n {
        prefetch(tp, i);
        prefetch(gp, i);
        prefetch(vp, i);
        let x = E::load4(tp.add(i));
        let y = E::load4(gp.add(i));
        let w = E::load4(vp.add(i));
        a[0] = _mm256_add_pd(a[0], x);
        a[1] = _mm256_fmadd_pd(x, x, a[1]);
        a[2] = _mm256_add_pd(a[2], y);
        a[3] = _mm256_fmadd_pd(y, y, a[3]);
        a[4] = _mm256_fmadd_pd(x, y, a[4]);
        a[5] = _mm256_fmadd_pd(w, w, a[5]);
        a[6] = _mm256_fmadd_pd(x, w, a[6]);
        a[7] = _mm256_fmadd_pd(y, w, a[7]);
        i += 4;
    }
    let mut r = [0f64; 8];
    for k in 0..8 {
        r[k] = hsum(a[k]);
    }
    for j in i..n {
        let (x, y, w) = (t[j].to_f64(), g[j].to_f64(), v[j].to_f64());
        r[0] += x;
        r[1] += x * x;
        r[2] += y;
        r[3] += y * y;
        r[4] += x * y;
        r[5] += w * w;
        r[6] += x * w;
        r[7] += y * w;
    }
    for k in 0..8 {
        out[k] += r[k];
    }
}

// ---------------------------------------------------------------------------------------------
// The tile kernel for short segments (see `super::columns`): rows of a tile of columns, each
// element's sums added into per-column float64 accumulators in L1, and optionally each row's sums
// kept in registers (a tensor reduced both by rows and by columns in one read).

use super::columns::{ColAcc, Rows};

/// The sums of one 4-lane vector of (θ, ĝ, v), in the order of `Sums::NAMES` (first K used).
#[inline(always)]
unsafe fn sums<const A: usize>(x: __m256d, y: __m256d, z: __m256d) -> [__m256d; 8] {
    let zero = _mm256_setzero_pd();
    let mut s = [zero; 8];
    s[0] = x;
    s[1] = _mm256_mul_pd(x, x);
    if A >= 2 {
        s[2] = y;
        s[3] = _mm256_mul_pd(y, y);
        s[4] = _mm256_mul_pd(x, y);
    }
    if A >= 3 {
        s[5] = _mm256_mul_pd(z, z);
        s[6] = _mm256_mul_pd(x, z);
        s[7] = _mm256_mul_pd(y, z);
    }
    s
}

/// `into` plus sum q (in the order of `Sums::NAMES`) of one vector of (θ, ĝ, v).
#[inline(always)]
unsafe fn accumulate(q: usize, x: __m256d, y: __m256d, z: __m256d, into: __m256d) -> __m256d {
    match q {
        0 => _mm256_add_pd(into, x),
        1 => _mm256_fmadd_pd(x, x, into),
        2 => _mm256_add_pd(into, y),
        3 => _mm256_fmadd_pd(y, y, into),
        4 => _mm256_fmadd_pd(x, y, into),
        5 => _mm256_fmadd_pd(z, z, into),
        6 => _mm256_fmadd_pd(x, z, into),
        _ => _mm256_fmadd_pd(y, z, into),
    }
}

/// Sum Q of one vector added to the column accumulators at `col` and to the row's `row[Q]`.
#[inline(always)]
unsafe fn both<const Q: usize>(x: __m256d, y: __m256d, z: __m256d, col: *mut f64, row: &mut [__m256d; 8]) {
    _mm256_storeu_pd(col, accumulate(Q, x, y, z, _mm256_loadu_pd(col)));
    row[Q] = accumulate(Q, x, y, z, row[Q]);
}

/// `s` plus the sums of a second row's vector.
#[inline(always)]
unsafe fn add_sums<const A: usize>(s: &mut [__m256d; 8], x: __m256d, y: __m256d, z: __m256d) {
    s[0] = _mm256_add_pd(s[0], x);
    s[1] = _mm256_fmadd_pd(x, x, s[1]);
    if A >= 2 {
        s[2] = _mm256_add_pd(s[2], y);
        s[3] = _mm256_fmadd_pd(y, y, s[3]);
        s[4] = _mm256_fmadd_pd(x, y, s[4]);
    }
    if A >= 3 {
        s[5] = _mm256_fmadd_pd(z, z, s[5]);
        s[6] = _mm256_fmadd_pd(x, z, s[6]);
        s[7] = _mm256_fmadd_pd(y, z, s[7]);
    }
}

/// Adds columns [0, m) of every row of `rows` into `acc`. With ROWS_OUT, row j's K sums are
/// also added to rows_out[j*K..], the row's sums kept in registers (one row per sweep); without,
/// rows go four at a time, so each accumulator is loaded and stored once per four rows (those loads and stores,
/// not the products, bound a one-row sweep).
///
/// # Safety
/// AVX2 and FMA; rows_out holds count*K sums with ROWS_OUT. (`Rows::new` checked the rows.)
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile<E: Lanes, const A: usize, const ROWS_OUT: bool>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: &mut [f64]) {
    let k = super::Sums::count(A);
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
            let r = rows.row(i);
            let mut tail = [0f64; 8];
            for c in whole..m {
                let x = r[0][c].to_f64();
                let y = if A >= 2 { r[1][c].to_f64() } else { 0.0 };
                let z = if A >= 3 { r[2][c].to_f64() } else { 0.0 };
                super::columns::add_element(x, y, z, k, c, acc, &mut tail);
            }
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
    let k = super::Sums::count(A);
    let mut row = [_mm256_setzero_pd(); 8];
    let base = acc.0.as_mut_ptr() as *mut f64;
    let stride = acc.0[0].len();
    let mut c = 0;
    while c < whole {
        for p in ahead {
            for a in 0..A {
                prefetch_line(p[a], c);
            }
        }
        let at = |p: *const E| E::load4(p.add(c));
        let zero = _mm256_setzero_pd();
        let (x, y, z) = (at(rows[0][0]), if A >= 2 { at(rows[0][1]) } else { zero }, if A >= 3 { at(rows[0][2]) } else { zero });
        if ROWS_OUT {
            // One row: each product goes into the row's register and the column's memory by
            // FMA, one sum at a time (all eight at once would push the row's sums out of the
            // 16 registers, and a spilled sum is a store-to-load chain on every iteration).
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
            c += 4;
            continue;
        }
        let mut s = sums::<A>(x, y, z);
        for r in rows.iter().skip(1) {
            let (x, y, z) = (at(r[0]), if A >= 2 { at(r[1]) } else { x }, if A >= 3 { at(r[2]) } else { x });
            add_sums::<A>(&mut s, x, y, z);
        }
        for q in 0..k {
            let p = base.add(q * stride + c);
            _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), s[q]));
        }
        c += 4;
    }
    row
}

// ---------------------------------------------------------------------------------------------
// Long segments of a tensor reduced by rows and by column blocks in one read (a Flatten→Linear:
// blocks of 49). One call per row; each segment is summed in registers, and its vector sums are
// added to its group's and to the row's vector accumulators (no horizontal sums per segment;
// those are done once per group and row by the caller).

/// Vector sums of one group or row: lanes l of sum q at `[q * LANES + l]` (LANES = 4 here,
/// 8 for the AVX-512 kernel; the caller adds the lanes up once at the end).
pub(super) type LaneSums = [f64; 64];

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
    let k = super::Sums::count(A);
    let (whole, rest) = (seg - seg % 4, seg % 4);
    let zero = _mm256_setzero_pd();
    for (g, col) in cols.iter_mut().enumerate().take(groups) {
        let at = g * seg;
        let mut s = [zero; 8];
        let mut i = 0;
        while i < whole {
            for a in 0..A {
                prefetch(p[a], at + i);
            }
            let x = E::load4(p[0].add(at + i));
            let y = if A >= 2 { E::load4(p[1].add(at + i)) } else { zero };
            let z = if A >= 3 { E::load4(p[2].add(at + i)) } else { zero };
            add_sums::<A>(&mut s, x, y, z);
            i += 4;
        }
        if rest > 0 {
            let x = E::load_first(p[0].add(at + whole), rest);
            let y = if A >= 2 { E::load_first(p[1].add(at + whole), rest) } else { zero };
            let z = if A >= 3 { E::load_first(p[2].add(at + whole), rest) } else { zero };
            add_sums::<A>(&mut s, x, y, z);
        }
        for q in 0..k {
            for acc in [col.as_mut_ptr(), row.as_mut_ptr()] {
                let at = acc.add(q * 4);
                _mm256_storeu_pd(at, _mm256_add_pd(_mm256_loadu_pd(at), s[q]));
            }
        }
    }
}
