//! Short segments (a Linear's columns have length 1, a 3x3 conv's 9): one segment-kernel call per
//! segment would cost more than its arithmetic. Instead a tile of TILE columns is swept row by
//! row, each element's sums are added into per-column float64 accumulators that stay in L1, and
//! the columns are folded into their groups at the end of the tile. The same sweep can also keep
//! every row's sums, so a tensor reduced both by rows and by columns is read once.

use super::input::{Data, Item, Layout};
use super::kernels::{self, ColAcc, Rows, TILE};

thread_local! {
    static ACC: std::cell::RefCell<Box<ColAcc>> = std::cell::RefCell::new(ColAcc::zeroed());
}

/// 16-bit input is widened to float32 this many rows at a time.
const WIDEN_ROWS: usize = 4;

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
            let count = o.1 - o.0;
            match item.theta {
                Data::F32(_) => {
                    let data = item.in_place::<f32>(start, item.layout.len());
                    kernels::tile(&Rows::new(data, arrays, row_len, count, m), acc, rows_out.as_deref_mut());
                }
                Data::F64(_) => {
                    let data = item.in_place::<f64>(start, item.layout.len());
                    kernels::tile(&Rows::new(data, arrays, row_len, count, m), acc, rows_out.as_deref_mut());
                }
                Data::F16(_) | Data::BF16(_) => {
                    // Widen WIDEN_ROWS rows at a time into float32 scratch, rows TILE apart.
                    let mut j = 0;
                    while j < count {
                        let n = WIDEN_ROWS.min(count - j);
                        for (a, d) in item.data().iter().enumerate() {
                            if let Some(d) = d {
                                for i in 0..n {
                                    let src = start + (j + i) * row_len;
                                    let dst = (a * WIDEN_ROWS + i) * TILE;
                                    d.slice(src, src + m).widen_into(&mut scratch[dst..dst + m]);
                                }
                            }
                        }
                        let data: [&[f32]; 3] = std::array::from_fn(|a| &scratch[a * WIDEN_ROWS * TILE..(a + 1) * WIDEN_ROWS * TILE]);
                        let out = rows_out.as_deref_mut().map(|out| &mut out[j * k..(j + n) * k]);
                        kernels::tile(&Rows::new(data, arrays, TILE, n, m), acc, out);
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
