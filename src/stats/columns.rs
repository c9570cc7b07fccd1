//! Short segments (a Linear's columns have length 1, a 3x3 conv's 9): one segment-kernel call per
//! segment would cost more than its arithmetic. Instead a tile of TILE columns is swept row by
//! row, each element's sums are added into per-column float64 accumulators that stay in L1, and
//! the columns are folded into their groups at the end of the tile. The same sweep can also keep
//! every row's sums, so a tensor reduced both by rows and by columns is read once.

use super::{as_f32, as_f64, widen, Data, Item, Layout, Real, Sums};

/// Columns per tile: 8 accumulators x TILE f64 = 16 KiB stays in L1 beside the rows in flight.
pub(super) const TILE: usize = 256;

/// Per-column accumulators of one tile: `acc[q][c]` is sum q of column c of the tile. Each row is
/// padded by one cache line: with rows of exactly 2 KiB, acc[q][c] and acc[q + 2][c] would share
/// their low 12 address bits, and every load would wait on the store before it ("4K aliasing";
/// measured: the unpadded kernel ran at a third of the padded one's speed).
/// Aligned to a cache line, so that no 32-byte access straddles two lines.
#[repr(C, align(64))]
pub(super) struct ColAcc(pub(super) [[f64; TILE + 8]; 8]);

/// One row of a tile: θ, ĝ, v (an absent array is an empty slice).
pub(super) type Row<'a, E> = [&'a [E]; 3];

/// 16-bit input is widened to float32 this many rows at a time.
const WIDEN_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
pub(super) trait Float: Real + super::simd::Lanes {}
#[cfg(not(target_arch = "x86_64"))]
pub(super) trait Float: Real {}
impl Float for f32 {}
impl Float for f64 {}

/// Portable tile kernel: the same sums as `simd::tile`, one row and one column at a time.
fn tile_portable<E: Float>(rows: &[Row<'_, E>], arrays: usize, m: usize, acc: &mut ColAcc, mut rows_out: Option<&mut [f64]>) {
    let k = Sums::count(arrays);
    for (j, r) in rows.iter().enumerate() {
        let mut row = [0f64; 8];
        for c in 0..m {
            let x = r[0][c].f64();
            let y = if arrays >= 2 { r[1][c].f64() } else { 0.0 };
            let z = if arrays >= 3 { r[2][c].f64() } else { 0.0 };
            let v = [x, x * x, y, y * y, x * y, z * z, x * z, y * z];
            for q in 0..k {
                acc.0[q][c] += v[q];
                row[q] += v[q];
            }
        }
        if let Some(out) = rows_out.as_deref_mut() {
            for q in 0..k {
                out[j * k + q] += row[q];
            }
        }
    }
}

/// Add columns [0, m) of `rows` into `acc` (and each row's sums into `rows_out`, k per row).
fn tile<E: Float>(rows: &[Row<'_, E>], arrays: usize, m: usize, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    tile_with(super::has_avx2(), rows, arrays, m, acc, rows_out)
}

/// [`tile`] with the choice of kernel given (`simd` is honoured only where AVX2 and FMA exist).
pub(super) fn tile_with<E: Float>(simd: bool, rows: &[Row<'_, E>], arrays: usize, m: usize, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    assert!(m <= TILE && rows.iter().all(|r| r[..arrays].iter().all(|a| a.len() >= m)), "tile rows shorter than the tile");
    #[cfg(target_arch = "x86_64")]
    if simd && super::has_avx2() {
        use super::simd::tile as t;
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); every used row holds m
        // elements (the slices were cut by the caller).
        unsafe {
            match (arrays, rows_out) {
                (1, None) => t::<E, 1, false>(rows, m, acc, &mut []),
                (2, None) => t::<E, 2, false>(rows, m, acc, &mut []),
                (_, None) => t::<E, 3, false>(rows, m, acc, &mut []),
                (1, Some(o)) => t::<E, 1, true>(rows, m, acc, o),
                (2, Some(o)) => t::<E, 2, true>(rows, m, acc, o),
                (_, Some(o)) => t::<E, 3, true>(rows, m, acc, o),
            }
        }
        return;
    }
    tile_portable(rows, arrays, m, acc, rows_out)
}

/// Sums of rows [o.0, o.1) x columns [cols.0, cols.1) of `item` (rows of groups*seg elements;
/// the column range starts and ends on group boundaries): each group's sums are added to
/// `partial` (k per group, from group cols.0 / seg), and with `rows_out` each row's (k per row,
/// from row o.0). Tiles, rows and the fold run in a fixed order.
pub(super) fn reduce_short(
    item: &Item<'_>,
    o: (usize, usize),
    cols: (usize, usize),
    partial: &mut [f64],
    mut rows_out: Option<&mut [f64]>,
) {
    let (k, arrays) = (item.width(), item.arrays());
    let Layout { groups, seg, .. } = item.layout;
    let row_len = groups * seg;
    let first_group = cols.0 / seg;
    let given = [Some(item.theta), item.grad, item.velocity];
    let mut acc: Box<ColAcc> = Box::new(ColAcc([[0.0; TILE + 8]; 8]));
    let mut scratch = match item.theta {
        Data::F16(_) | Data::BF16(_) => vec![0f32; 3 * WIDEN_ROWS * TILE],
        _ => Vec::new(),
    };
    let mut c0 = cols.0;
    while c0 < cols.1 {
        let m = TILE.min(cols.1 - c0);
        for a in acc.0.iter_mut().take(k) {
            a[..m].fill(0.0);
        }
        fn cut(d: Data<'_>, start: usize, m: usize) -> Data<'_> {
            d.slice(start, start + m)
        }
        let at_row = |r: usize| r * row_len + c0;
        match item.theta {
            Data::F32(_) => {
                let rows: Vec<Row<'_, f32>> =
                    (o.0..o.1).map(|r| given.map(|d| d.map_or(&[][..], |d| as_f32(cut(d, at_row(r), m))))).collect();
                tile(&rows, arrays, m, &mut acc, rows_out.as_deref_mut());
            }
            Data::F64(_) => {
                let rows: Vec<Row<'_, f64>> =
                    (o.0..o.1).map(|r| given.map(|d| d.map_or(&[][..], |d| as_f64(cut(d, at_row(r), m))))).collect();
                tile(&rows, arrays, m, &mut acc, rows_out.as_deref_mut());
            }
            Data::F16(_) | Data::BF16(_) => {
                let mut r = o.0;
                while r < o.1 {
                    let n = WIDEN_ROWS.min(o.1 - r);
                    let at = |a: usize, j: usize| (a * WIDEN_ROWS + j) * TILE;
                    for j in 0..n {
                        for (a, d) in given.iter().enumerate() {
                            if let Some(d) = d {
                                widen(cut(*d, at_row(r + j), m), &mut scratch[at(a, j)..at(a, j) + m]);
                            }
                        }
                    }
                    let rows: Vec<Row<'_, f32>> = (0..n)
                        .map(|j| std::array::from_fn(|a| if given[a].is_some() { &scratch[at(a, j)..at(a, j) + m] } else { &[][..] }))
                        .collect();
                    let out = rows_out.as_deref_mut().map(|out| &mut out[(r - o.0) * k..(r - o.0 + n) * k]);
                    tile(&rows, arrays, m, &mut acc, out);
                    r += n;
                }
            }
        }
        // Fold the tile's columns into their groups, one group's run of columns at a time.
        let mut c = 0;
        while c < m {
            let g = (c0 + c) / seg;
            let end = ((g + 1) * seg - c0).min(m);
            for q in 0..k {
                let sum: f64 = acc.0[q][c..end].iter().sum();
                partial[(g - first_group) * k + q] += sum;
            }
            c = end;
        }
        c0 += m;
    }
}
