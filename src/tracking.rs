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
use crate::theory::ledger::{LedgerInputs, LedgerState};
use crate::theory::paper::PaperState;
use crate::theory::{Hyper, Kind};

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
            || [self.part_translation.len(), self.part_column.len(), self.part_group.len(), self.part_size.len()].iter().any(|&n| n != p)
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
        let bdot = if k == 8 {
            if t {
                bs
            } else {
                s[6]
            }
        } else {
            0.0
        };
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

/// Hyperparameters of one lane's param_group for one step.
#[derive(Clone, Copy, Debug)]
pub struct LaneHyper {
    pub hp: Hyper,
    pub nesterov: bool,
}

/// What a lane predicts for the charges of its columns: the SGD ledger, the optimizer-agnostic
/// running sum of measured changes, or nothing (`every > 1`: the ledger needs every step).
#[derive(Clone, Debug)]
pub enum Exact {
    None,
    Ledger(LedgerState),
    Measured(Vec<f64>),
}

/// One lane: the columns of one (kind, param_group). Its exact prediction covers all its
/// columns; the paper's closed form covers the columns that are whole groups (`paper_cols`).
#[derive(Clone, Debug)]
pub struct Lane {
    kind: Kind,
    cols: Vec<usize>,
    paper_cols: Vec<usize>,
    exact: Exact,
    paper: Option<PaperState>,
}

/// The theory streams of every lane, advanced with one call per step from the per-column
/// matrix of [`measure_sgd`] (the loop over lanes and the gathers of their columns stay here).
#[derive(Clone, Debug)]
pub struct Lanes {
    column_group: Vec<usize>,
    n_groups: usize,
    lanes: Vec<Lane>,
}

const FLUX: usize = 1;
const UPDATE_SQ: usize = 3;
const UPDATE_DOT: usize = 4;

fn gather(values: &[f64], stride: usize, field: usize, cols: &[usize]) -> Vec<f64> {
    cols.iter().map(|&c| values[c * stride + field]).collect()
}

impl Lanes {
    pub fn new(column_group: Vec<usize>, n_groups: usize) -> Result<Lanes> {
        if column_group.iter().any(|&g| g >= n_groups) {
            return Err(Error::Shape("lanes: a column's group is out of range".into()));
        }
        Ok(Lanes { column_group, n_groups, lanes: Vec::new() })
    }

    pub fn columns(&self) -> usize {
        self.column_group.len()
    }

    /// Add a lane. `exact` and `paper` must already hold `cols.len()` and `paper_cols.len()`
    /// groups respectively; `paper_cols` must be columns that are whole groups.
    pub fn add(&mut self, kind: Kind, cols: Vec<usize>, paper_cols: Vec<usize>, exact: Exact, paper: Option<PaperState>) -> Result<()> {
        let n = self.columns();
        if cols.iter().chain(&paper_cols).any(|&c| c >= n) {
            return Err(Error::Shape(format!("lane: a column index is out of range (columns: {n})")));
        }
        let exact_len = match &exact {
            Exact::None => cols.len(),
            Exact::Ledger(l) => l.groups(),
            Exact::Measured(y) => y.len(),
        };
        if exact_len != cols.len() || paper.as_ref().is_some_and(|p| p.groups() != paper_cols.len()) {
            return Err(Error::Shape("lane: a stream's length differs from its columns".into()));
        }
        self.lanes.push(Lane { kind, cols, paper_cols, exact, paper });
        Ok(())
    }

    fn check_hyper(&self, hyper: &[LaneHyper]) -> Result<()> {
        if hyper.len() != self.lanes.len() {
            return Err(Error::Shape(format!("{} lane hyperparameters for {} lanes", hyper.len(), self.lanes.len())));
        }
        Ok(())
    }

    /// One step of every lane's SGD ledger from `cols` (columns × 8, COLUMN_FIELDS). Stops at
    /// the first lane whose step fails (that lane's state is unchanged).
    pub fn advance_ledger(&mut self, cols: &[f64], hyper: &[LaneHyper]) -> Result<()> {
        self.check_hyper(hyper)?;
        if cols.len() != self.columns() * 8 {
            return Err(Error::Shape(format!("columns must be ({}, 8)", self.columns())));
        }
        for (lane, h) in self.lanes.iter_mut().zip(hyper) {
            let Exact::Ledger(ledger) = &mut lane.exact else { continue };
            let quadratic = lane.kind.is_quadratic();
            let flux = gather(cols, 8, FLUX, &lane.cols);
            let update_sq = quadratic.then(|| gather(cols, 8, UPDATE_SQ, &lane.cols));
            let update_dot = (quadratic && h.nesterov).then(|| gather(cols, 8, UPDATE_DOT, &lane.cols));
            let inputs = LedgerInputs { flux: &flux, update_sq: update_sq.as_deref(), update_dot: update_dot.as_deref() };
            ledger.step(inputs, h.hp, h.nesterov)?;
        }
        Ok(())
    }

    /// Add each column's measured change `delta` (columns,) to the lanes' measured sums.
    pub fn advance_measured(&mut self, delta: &[f64]) -> Result<()> {
        if delta.len() != self.columns() {
            return Err(Error::Shape(format!("delta must have {} columns", self.columns())));
        }
        for lane in &mut self.lanes {
            if let Exact::Measured(y) = &mut lane.exact {
                for (v, &c) in y.iter_mut().zip(&lane.cols) {
                    *v += delta[c];
                }
            }
        }
        Ok(())
    }

    /// One step of every lane's closed form with `drive` (columns,). A lane whose step fails
    /// stops predicting (its paper column is NaN from then on); the others go on. Returns the
    /// failed lanes and why.
    pub fn advance_paper(&mut self, drive: &[f64], hyper: &[LaneHyper]) -> Result<Vec<(usize, Error)>> {
        self.check_hyper(hyper)?;
        if drive.len() != self.columns() {
            return Err(Error::Shape(format!("drive must have {} columns", self.columns())));
        }
        let mut failed = Vec::new();
        for (i, (lane, h)) in self.lanes.iter_mut().zip(hyper).enumerate() {
            let Some(paper) = &mut lane.paper else { continue };
            let lane_drive = lane.kind.is_quadratic().then(|| gather(drive, 1, 0, &lane.paper_cols));
            if let Err(err) = paper.step(lane_drive.as_deref(), h.hp) {
                lane.paper = None;
                failed.push((i, err));
            }
        }
        Ok(failed)
    }

    /// Current (paper, exact) per group, NaN where a theory does not apply. A group's exact
    /// value is the sum of its columns' (in column order: the group's ledger is their sum).
    pub fn predictions(&self) -> (Vec<f64>, Vec<f64>) {
        let mut paper = vec![f64::NAN; self.n_groups];
        let mut exact_cols = vec![f64::NAN; self.columns()];
        for lane in &self.lanes {
            if let Some(p) = &lane.paper {
                for (&c, &y) in lane.paper_cols.iter().zip(p.y()) {
                    paper[self.column_group[c]] = y;
                }
            }
            let y = match &lane.exact {
                Exact::None => continue,
                Exact::Ledger(l) => l.y(),
                Exact::Measured(y) => y,
            };
            for (&c, &v) in lane.cols.iter().zip(y) {
                exact_cols[c] = v;
            }
        }
        let mut exact = vec![0.0; self.n_groups];
        for (&g, v) in self.column_group.iter().zip(exact_cols) {
            exact[g] += v;
        }
        (paper, exact)
    }
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

    #[test]
    fn lanes_sum_columns_into_groups_and_refuse_bad_input() {
        // Columns 0 and 1 form group 0 (no paper); column 2 is group 1.
        let mut lanes = Lanes::new(vec![0, 0, 1], 2).unwrap();
        let measured = |y: &[f64]| Exact::Measured(y.to_vec());
        lanes
            .add(Kind::Scale, vec![0, 2], vec![2], measured(&[1.0, 3.0]), Some(PaperState::new(Kind::Scale, &[3.0], None).unwrap()))
            .unwrap();
        lanes.add(Kind::Scale, vec![1], vec![], measured(&[2.0]), None).unwrap();
        lanes.advance_measured(&[0.5, 0.25, 1.0]).unwrap();
        let (paper, exact) = lanes.predictions();
        assert_eq!(exact, vec![1.5 + 2.25, 4.0]);
        assert!(paper[0].is_nan() && paper[1] == 3.0);
        assert!(matches!(lanes.add(Kind::Scale, vec![3], vec![], Exact::None, None), Err(Error::Shape(_))));
        assert!(matches!(lanes.add(Kind::Scale, vec![0], vec![], measured(&[1.0, 2.0]), None), Err(Error::Shape(_))));
        assert!(matches!(lanes.advance_measured(&[0.0]), Err(Error::Shape(_))));
        let h = LaneHyper { hp: Hyper::new(0.1, 0.0, 0.0, 0.0), nesterov: false };
        assert!(matches!(lanes.advance_paper(&[0.0; 3], &[h]), Err(Error::Shape(_))));
        assert!(lanes.advance_paper(&[0.0; 3], &[h, h]).unwrap().is_empty());
        assert!(matches!(lanes.advance_ledger(&[0.0; 8], &[h, h]), Err(Error::Shape(_))));
    }
}
