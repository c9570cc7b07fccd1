//! The tracker's per-step bookkeeping for `torch.optim.SGD`: from the fused sums of every
//! reduction row to per-column theory inputs and per-group table values, in one pass.
//!
//! The same algebra as python/neural_mechanics/tracking/sgd.py (which documents it and is the
//! reference the tests compare against), moved here because on small networks a hundred small
//! numpy calls per step cost more than the reduction itself.
//!
//! Rows are the outputs of the fused kernel (`stats`), `k` = 5 (θ, ĝ) or 8 (θ, ĝ, b_{n−1}) sums
//! each. A part is a set of rows (a row, a column, a whole tensor...) with a sign; a column is a
//! run of parts of one group sharing one param_group; a group is a run of columns.

use crate::error::{Error, Result};

/// Columns of the per-column output: signed sums over the column's parts.
pub const COLUMN_FIELDS: [&str; 8] = ["charge", "flux", "grad_sq", "update_sq", "update_dot", "drive", "update_sum", "buffer_dot"];
/// Columns of the per-group output.
pub const GROUP_FIELDS: [&str; 7] = ["measured", "flux", "grad_sq", "update_sq", "update_sum", "magnitude", "residual"];
/// A group whose mean squared gradient entry is below this fraction of the model's has "no gradient".
pub const NO_GRADIENT: f64 = 1e-8;

/// The index maps of a measurement plan (built once per run by the Python planner).
pub struct Plan {
    pub part_row_starts: Vec<usize>, // parts + 1 offsets into part_rows
    pub part_rows: Vec<usize>,       // row indices of each part, in order
    pub part_sign: Vec<f64>,
    pub part_translation: Vec<bool>,
    pub part_column: Vec<usize>,
    pub part_group: Vec<usize>,
    pub part_size: Vec<f64>,
    pub column_group: Vec<usize>,
    pub group_translation: Vec<bool>,
    pub group_size: Vec<f64>,
}

/// Hyperparameters per part: momentum β, dampening d, weight decay λ, nesterov.
pub struct PartHyper<'a> {
    pub momentum: &'a [f64],
    pub dampening: &'a [f64],
    pub weight_decay: &'a [f64],
    pub nesterov: &'a [bool],
}

impl Plan {
    pub fn parts(&self) -> usize {
        self.part_sign.len()
    }

    pub fn validate(&self, rows: usize) -> Result<()> {
        let p = self.parts();
        let bad = |m: &str| Err(Error::Shape(format!("tracker plan: {m}")));
        if self.part_row_starts.len() != p + 1
            || [self.part_translation.len(), self.part_column.len(), self.part_group.len(), self.part_size.len()]
                .iter()
                .any(|&n| n != p)
        {
            return bad("per-part arrays differ in length");
        }
        if self.part_row_starts.windows(2).any(|w| w[0] > w[1]) || self.part_row_starts[p] != self.part_rows.len() {
            return bad("part row offsets are not increasing");
        }
        if self.part_rows.iter().any(|&r| r >= rows) {
            return bad("a part names a row past the reductions");
        }
        if self.part_column.iter().any(|&c| c >= self.column_group.len())
            || self.column_group.iter().any(|&g| g >= self.group_size.len())
            || self.part_group.iter().any(|&g| g >= self.group_size.len())
            || self.group_translation.len() != self.group_size.len()
        {
            return bad("a column or group index is out of range");
        }
        Ok(())
    }
}

/// One measured SGD step: (columns × 8 in COLUMN_FIELDS order, groups × 7 in GROUP_FIELDS order).
pub fn measure_sgd(plan: &Plan, rows: &[f64], k: usize, buffer_sum: Option<&[f64]>, h: &PartHyper<'_>) -> Result<(Vec<f64>, Vec<f64>)> {
    if k != 5 && k != 8 {
        return Err(Error::Shape(format!("rows carry {k} sums; expected 5 or 8")));
    }
    if rows.len() % k != 0 {
        return Err(Error::Shape("rows are not a whole number of rows".into()));
    }
    let n_rows = rows.len() / k;
    plan.validate(n_rows)?;
    let p = plan.parts();
    if [h.momentum.len(), h.dampening.len(), h.weight_decay.len(), h.nesterov.len()].iter().any(|&n| n != p) {
        return Err(Error::Shape("hyperparameters per part differ in length from the parts".into()));
    }
    if buffer_sum.is_some_and(|b| b.len() != n_rows) {
        return Err(Error::Shape("buffer sums must have one value per row".into()));
    }
    let (n_cols, n_groups) = (plan.column_group.len(), plan.group_size.len());
    let mut cols = vec![0f64; n_cols * 8];
    let mut unsigned = vec![0f64; n_groups * 3]; // Σx, Σ|ĝ|², Σ|ĝ||θ| over parts
    let mut total_gg = 0.0;
    let mut total_size = 0.0;
    for part in 0..p {
        let mut s = [0f64; 8];
        let mut bs = 0.0;
        for &r in &plan.part_rows[plan.part_row_starts[part]..plan.part_row_starts[part + 1]] {
            for (j, v) in rows[r * k..(r + 1) * k].iter().enumerate() {
                s[j] += v;
            }
            if let Some(b) = buffer_sum {
                bs += b[r];
            }
        }
        let (q, x, gs, gg, st) = (s[0], s[1], s[2], s[3], s[4]);
        let (beta, d, lam) = (h.momentum[part], h.dampening[part], h.weight_decay[part]);
        // w = ĝ + λθ (coupled weight decay): |w|², ⟨θ, w⟩, ⟨1, w⟩.
        let ww = gg + 2.0 * lam * st + lam * lam * x;
        let sw = gs + lam * q;
        // |b_n|², ⟨1, b_n⟩, ⟨w, b_n⟩ of the buffer this step makes (⟨θ_n, u_n⟩ is never needed:
        // feeding it to the ledger would close the loop the ledger is there to check).
        let (bb_new, sb_new, wb_new) = if k == 8 {
            let (bb, tb, gb) = (s[5], s[6], s[7]);
            let wb = gb + lam * tb;
            let c = 1.0 - d;
            (beta * beta * bb + 2.0 * beta * c * wb + c * c * ww, beta * bs + c * sw, beta * wb + c * ww)
        } else {
            (ww, sw, ww) // b_0 = w on the first step (no dampening)
        };
        let (uu, su, drive, e) = if beta == 0.0 {
            (ww, sw, gg, 0.0)
        } else if h.nesterov[part] {
            (ww + 2.0 * beta * wb_new + beta * beta * bb_new, sw + beta * sb_new, bb_new, wb_new + beta * bb_new)
        } else {
            (bb_new, sb_new, bb_new, bb_new)
        };
        let t = plan.part_translation[part];
        let bdot = if k == 8 { if t { bs } else { s[6] } } else { 0.0 };
        let m = [if t { q } else { x }, if t { gs } else { st }, gg, uu, e, drive, su, bdot];
        let sign = plan.part_sign[part];
        let c = plan.part_column[part];
        for (dst, v) in cols[c * 8..(c + 1) * 8].iter_mut().zip(m) {
            *dst += sign * v;
        }
        let g = plan.part_group[part];
        unsigned[g * 3] += x;
        unsigned[g * 3 + 1] += gg;
        unsigned[g * 3 + 2] += (gg * x).sqrt();
        total_gg += gg;
        total_size += plan.part_size[part];
    }
    let mut groups_sum = vec![0f64; n_groups * 8];
    for (c, &g) in plan.column_group.iter().enumerate() {
        for j in 0..8 {
            groups_sum[g * 8 + j] += cols[c * 8 + j];
        }
    }
    let mean_sq = total_gg / total_size.max(1.0);
    let mut out = vec![0f64; n_groups * 7];
    for g in 0..n_groups {
        let s = &groups_sum[g * 8..(g + 1) * 8];
        let (x_abs, g_abs, norm_prod) = (unsigned[g * 3], unsigned[g * 3 + 1], unsigned[g * 3 + 2]);
        let t = plan.group_translation[g];
        let size = plan.group_size[g];
        let denom = if t { (size * g_abs).sqrt() } else { norm_prod };
        // A group whose gradient is at float rounding level (a bias before BatchNorm, a dead
        // unit) proves nothing (THEORY §3): its residual is NaN, "no gradient".
        let residual = if denom > 0.0 && g_abs > NO_GRADIENT * mean_sq * size { s[1].abs() / denom } else { f64::NAN };
        let row = &mut out[g * 7..(g + 1) * 7];
        row.copy_from_slice(&[
            s[0],
            s[1],
            s[2],
            s[3],
            if t { s[6] } else { f64::NAN },
            if t { (size * x_abs).sqrt() } else { x_abs },
            residual,
        ]);
    }
    Ok((cols, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(parts: usize) -> Plan {
        Plan {
            part_row_starts: (0..=parts).collect(),
            part_rows: (0..parts).collect(),
            part_sign: vec![1.0; parts],
            part_translation: vec![false; parts],
            part_column: (0..parts).collect(),
            part_group: (0..parts).collect(),
            part_size: vec![1.0; parts],
            column_group: (0..parts).collect(),
            group_translation: vec![false; parts],
            group_size: vec![1.0; parts],
        }
    }

    #[test]
    fn plain_sgd_by_hand_and_bad_input_is_an_error() {
        // One part: θ = 2 (x = 4), ĝ = 1; λ = 0.5, β = 0: w = 2, |u|² = 4, drive |ĝ|² = 1.
        let rows = [2.0, 4.0, 1.0, 1.0, 2.0];
        let h = PartHyper { momentum: &[0.0], dampening: &[0.0], weight_decay: &[0.5], nesterov: &[false] };
        let (cols, groups) = measure_sgd(&plan(1), &rows, 5, None, &h).unwrap();
        assert_eq!(&cols[..8], &[4.0, 2.0, 1.0, 4.0, 0.0, 1.0, 2.0, 0.0]);
        assert_eq!(groups[0], 4.0); // measured |θ|²
        assert!((groups[6] - 1.0).abs() < 1e-15); // |⟨θ, ĝ⟩| / (|θ||ĝ|) = 1: no symmetry here
        assert!(matches!(measure_sgd(&plan(2), &rows, 5, None, &h), Err(Error::Shape(_))));
        assert!(matches!(measure_sgd(&plan(1), &rows, 4, None, &h), Err(Error::Shape(_))));
        let mut bad = plan(1);
        bad.part_rows = vec![7];
        assert!(matches!(measure_sgd(&bad, &rows, 5, None, &h), Err(Error::Shape(_))));
    }
}
