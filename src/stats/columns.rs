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

/// The rows of one tile: row j of array a is `data[a][j * stride..][..m]` (θ, ĝ, v; an absent
/// array is empty). The bounds are checked once here, so the kernels read without checks.
pub(super) struct Rows<'a, E> {
    data: [&'a [E]; 3],
    pub(super) arrays: usize,
    stride: usize,
    pub(super) count: usize,
    pub(super) m: usize,
}

impl<'a, E> Rows<'a, E> {
    pub(super) fn new(data: [&'a [E]; 3], arrays: usize, stride: usize, count: usize, m: usize) -> Rows<'a, E> {
        assert!(m <= TILE, "a tile has at most TILE columns");
        for d in &data[..arrays] {
            assert!(count == 0 || d.len() >= (count - 1) * stride + m, "tile rows reach past the data");
        }
        Rows { data, arrays, stride, count, m }
    }

    /// Row j's first m elements of each array (empty for absent arrays).
    pub(super) fn row(&self, j: usize) -> [&'a [E]; 3] {
        std::array::from_fn(|a| if a < self.arrays { &self.data[a][j * self.stride..j * self.stride + self.m] } else { &[][..] })
    }

    /// Row j's start in each array (dangling for absent arrays; never read).
    pub(super) fn ptrs(&self, j: usize) -> [*const E; 3] {
        std::array::from_fn(|a| self.data[a].as_ptr().wrapping_add(j * self.stride))
    }
}

thread_local! {
    static ACC: std::cell::RefCell<Box<ColAcc>> = std::cell::RefCell::new(Box::new(ColAcc([[0.0; TILE + 8]; 8])));
}

/// 16-bit input is widened to float32 this many rows at a time.
const WIDEN_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
pub(super) trait Float: Real + super::simd512::Lanes8 {}
#[cfg(not(target_arch = "x86_64"))]
pub(super) trait Float: Real {}
impl Float for f32 {}
impl Float for f64 {}

/// The k sums of one element triple added to column c's accumulators and to `row` (the
/// portable kernel, and the scalar tails of the vector ones).
#[inline(always)]
pub(super) fn add_element(x: f64, y: f64, z: f64, k: usize, c: usize, acc: &mut ColAcc, row: &mut [f64; 8]) {
    let v = [x, x * x, y, y * y, x * y, z * z, x * z, y * z];
    for q in 0..k {
        acc.0[q][c] += v[q];
        row[q] += v[q];
    }
}

/// Portable tile kernel: the same sums as `simd::tile`, one row and one column at a time.
fn tile_portable<E: Float>(rows: &Rows<'_, E>, acc: &mut ColAcc, mut rows_out: Option<&mut [f64]>) {
    let (arrays, m) = (rows.arrays, rows.m);
    let k = Sums::count(arrays);
    for j in 0..rows.count {
        let r = rows.row(j);
        let mut row = [0f64; 8];
        for c in 0..m {
            let x = r[0][c].f64();
            let y = if arrays >= 2 { r[1][c].f64() } else { 0.0 };
            let z = if arrays >= 3 { r[2][c].f64() } else { 0.0 };
            add_element(x, y, z, k, c, acc, &mut row);
        }
        if let Some(out) = rows_out.as_deref_mut() {
            for q in 0..k {
                out[j * k + q] += row[q];
            }
        }
    }
}

/// Add columns [0, m) of `rows` into `acc` (and each row's sums into `rows_out`, k per row).
fn tile<E: Float>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    let best = if super::has_avx512() {
        Kernel::Avx512
    } else if super::has_avx2() {
        Kernel::Avx2
    } else {
        Kernel::Portable
    };
    tile_with(best, rows, acc, rows_out)
}

/// Which tile kernel runs: the portable loops, AVX2, or AVX-512 for the fused sweep (rows and
/// columns; the columns-only sweep is AVX2 there too). A kernel the CPU lacks falls back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

/// [`tile`] with the choice of kernel given.
pub(super) fn tile_with<E: Float>(kernel: Kernel, rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    let k = Sums::count(rows.arrays);
    assert!(rows_out.as_ref().is_none_or(|o| o.len() >= rows.count * k), "rows_out too short");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 && super::has_avx512() {
        if let Some(o) = rows_out {
            use super::simd512::tile_rows as t;
            // SAFETY: the CPU supports AVX-512F (checked at run time); `Rows::new` checked that
            // every row of every used array holds m elements, and o holds count*k sums.
            unsafe {
                match rows.arrays {
                    1 => t::<E, 1>(rows, acc, o),
                    2 => t::<E, 2>(rows, acc, o),
                    _ => t::<E, 3>(rows, acc, o),
                }
            }
            return;
        }
        return tile_with(Kernel::Avx2, rows, acc, None);
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && super::has_avx2() {
        use super::simd::tile as t;
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); `Rows::new` checked that
        // every row of every used array holds m elements, and rows_out holds count*k sums.
        unsafe {
            match (rows.arrays, rows_out) {
                (1, None) => t::<E, 1, false>(rows, acc, &mut []),
                (2, None) => t::<E, 2, false>(rows, acc, &mut []),
                (_, None) => t::<E, 3, false>(rows, acc, &mut []),
                (1, Some(o)) => t::<E, 1, true>(rows, acc, o),
                (2, Some(o)) => t::<E, 2, true>(rows, acc, o),
                (_, Some(o)) => t::<E, 3, true>(rows, acc, o),
            }
        }
        return;
    }
    tile_portable(rows, acc, rows_out)
}

/// Sums of rows [o.0, o.1) x columns [cols.0, cols.1) of `item` (rows of groups*seg elements;
/// the column range starts and ends on group boundaries): each group's sums are added to
/// `partial` (k per group, from group cols.0 / seg), and with `rows_out` each row's (k per row,
/// from row o.0). Tiles, rows and the fold run in a fixed order.
pub(super) fn reduce_short<'a>(
    item: &Item<'a>,
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
    let mut scratch = match item.theta {
        Data::F16(_) | Data::BF16(_) => vec![0f32; 3 * WIDEN_ROWS * TILE],
        _ => Vec::new(),
    };
    // The accumulators (17 KiB) are the thread's own and reused: allocating and zeroing them
    // per task would cost more than reducing a small tensor.
    ACC.with_borrow_mut(|acc: &mut Box<ColAcc>| {
        let mut c0 = cols.0;
        while c0 < cols.1 {
            let m = TILE.min(cols.1 - c0);
            for a in acc.0.iter_mut().take(k) {
                a[..m].fill(0.0);
            }
            // Row o.0 of each array from column c0 on; rows follow every row_len elements.
            let start = o.0 * row_len + c0;
            let from = |d: Option<Data<'a>>| d.map(|d| d.slice(start, d.len()));
            let count = o.1 - o.0;
            match item.theta {
                Data::F32(_) => {
                    let data = given.map(|d| from(d).map_or(&[][..], as_f32));
                    tile(&Rows::new(data, arrays, row_len, count, m), acc, rows_out.as_deref_mut());
                }
                Data::F64(_) => {
                    let data = given.map(|d| from(d).map_or(&[][..], as_f64));
                    tile(&Rows::new(data, arrays, row_len, count, m), acc, rows_out.as_deref_mut());
                }
                Data::F16(_) | Data::BF16(_) => {
                    // Widen WIDEN_ROWS rows at a time into float32 scratch, rows TILE apart.
                    let mut j = 0;
                    while j < count {
                        let n = WIDEN_ROWS.min(count - j);
                        for (a, d) in given.iter().enumerate() {
                            if let Some(d) = d {
                                for i in 0..n {
                                    let src = start + (j + i) * row_len;
                                    let dst = (a * WIDEN_ROWS + i) * TILE;
                                    widen(d.slice(src, src + m), &mut scratch[dst..dst + m]);
                                }
                            }
                        }
                        let data: [&[f32]; 3] = std::array::from_fn(|a| &scratch[a * WIDEN_ROWS * TILE..(a + 1) * WIDEN_ROWS * TILE]);
                        let out = rows_out.as_deref_mut().map(|out| &mut out[j * k..(j + n) * k]);
                        tile(&Rows::new(data, arrays, TILE, n, m), acc, out);
                        j += n;
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
    })
}
