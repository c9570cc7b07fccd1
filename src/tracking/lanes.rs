//! The theory streams of a run: one lane per (symmetry, param_group), each with the paper's
//! closed form for its columns that are whole groups and the exact prediction for all its columns
//! (docs/theory.md §5.1–§5.3).

use super::plan::{field, FIELDS};
use super::tracker::ParamGroupHyper;
use crate::error::{Error, Result};
use crate::theory::ledger::{LedgerInputs, LedgerState};
use crate::theory::paper::PaperState;
use crate::theory::Kind;

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

/// The theory streams of every lane, advanced together once per step from the per-column sums
/// of [`super::plan::Plan::sum`].
#[derive(Clone, Debug)]
pub struct Lanes {
    column_group: Vec<usize>,
    n_groups: usize,
    lanes: Vec<Lane>,
}

fn gather(columns: &[[f64; FIELDS]], field: usize, cols: &[usize]) -> Vec<f64> {
    cols.iter().map(|&c| columns[c][field]).collect()
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

    /// Every lane's (exact, paper) state in order, for a checkpoint (crate::tracking::snapshot).
    pub fn states(&self) -> impl Iterator<Item = (&Exact, Option<&PaperState>)> {
        self.lanes.iter().map(|l| (&l.exact, l.paper.as_ref()))
    }

    /// The symmetry of lane `i` (for notes).
    pub fn kind(&self, i: usize) -> Option<Kind> {
        self.lanes.get(i).map(|l| l.kind)
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

    fn check_hyper(&self, hyper: &[ParamGroupHyper]) -> Result<()> {
        if hyper.len() != self.lanes.len() {
            return Err(Error::Shape(format!("{} lane hyperparameters for {} lanes", hyper.len(), self.lanes.len())));
        }
        Ok(())
    }

    /// One step of every lane's SGD ledger from the step's per-column sums. Stops at the first
    /// lane whose step fails (that lane's state is unchanged).
    pub fn advance_ledger(&mut self, cols: &[[f64; FIELDS]], hyper: &[ParamGroupHyper]) -> Result<()> {
        self.check_hyper(hyper)?;
        if cols.len() != self.columns() {
            return Err(Error::Shape(format!("{} columns for lanes of {} columns", cols.len(), self.columns())));
        }
        for (lane, h) in self.lanes.iter_mut().zip(hyper) {
            let Exact::Ledger(ledger) = &mut lane.exact else { continue };
            let quadratic = lane.kind.is_quadratic();
            let flux = gather(cols, field::FLUX, &lane.cols);
            let update_sq = quadratic.then(|| gather(cols, field::UPDATE_SQ, &lane.cols));
            // Nesterov's ⟨u_n, b_n⟩, or with β = 0 ⟨u_n, b_{n−1}⟩ of the buffer PyTorch keeps.
            let update_dot = (quadratic && (h.nesterov || h.momentum == 0.0)).then(|| gather(cols, field::UPDATE_DOT, &lane.cols));
            let inputs = LedgerInputs { flux: &flux, update_sq: update_sq.as_deref(), update_dot: update_dot.as_deref() };
            ledger.step(inputs, h.hyper(), h.nesterov)?;
        }
        Ok(())
    }

    /// Add each column's measured change (its CHANGE field) to the lanes' measured sums.
    pub fn advance_measured(&mut self, cols: &[[f64; FIELDS]]) -> Result<()> {
        if cols.len() != self.columns() {
            return Err(Error::Shape(format!("{} columns for lanes of {} columns", cols.len(), self.columns())));
        }
        for lane in &mut self.lanes {
            if let Exact::Measured(y) = &mut lane.exact {
                for (v, &c) in y.iter_mut().zip(&lane.cols) {
                    *v += cols[c][field::CHANGE];
                }
            }
        }
        Ok(())
    }

    /// One step of every lane's closed form with `drive` (one value per column). A lane whose
    /// step fails stops predicting (its paper column is NaN from then on); the others go on.
    /// Returns the failed lanes and why.
    pub fn advance_paper(&mut self, drive: &[f64], hyper: &[ParamGroupHyper]) -> Result<Vec<(usize, Error)>> {
        self.check_hyper(hyper)?;
        if drive.len() != self.columns() {
            return Err(Error::Shape(format!("drive must have {} columns", self.columns())));
        }
        let mut failed = Vec::new();
        for (i, (lane, h)) in self.lanes.iter_mut().zip(hyper).enumerate() {
            let Some(paper) = &mut lane.paper else { continue };
            let lane_drive = lane.kind.is_quadratic().then(|| lane.paper_cols.iter().map(|&c| drive[c]).collect::<Vec<_>>());
            if let Err(err) = paper.step(lane_drive.as_deref(), h.hyper()) {
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

    fn hyper(lr: f64, momentum: f64, weight_decay: f64) -> ParamGroupHyper {
        ParamGroupHyper { lr, momentum, dampening: 0.0, weight_decay, nesterov: false }
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
        let mut cols = [[0.0; FIELDS]; 3];
        for (c, v) in cols.iter_mut().zip([0.5, 0.25, 1.0]) {
            c[field::CHANGE] = v;
        }
        lanes.advance_measured(&cols).unwrap();
        let (paper, exact) = lanes.predictions();
        assert_eq!(exact, vec![1.5 + 2.25, 4.0]);
        assert!(paper[0].is_nan() && paper[1] == 3.0);
        assert!(matches!(lanes.add(Kind::Scale, vec![3], vec![], Exact::None, None), Err(Error::Shape(_))));
        assert!(matches!(lanes.add(Kind::Scale, vec![0], vec![], measured(&[1.0, 2.0]), None), Err(Error::Shape(_))));
        assert!(matches!(lanes.advance_measured(&cols[..1]), Err(Error::Shape(_))));
        let h = hyper(0.1, 0.0, 0.0);
        assert!(matches!(lanes.advance_paper(&[0.0; 3], &[h]), Err(Error::Shape(_))));
        assert!(lanes.advance_paper(&[0.0; 3], &[h, h]).unwrap().is_empty());
        assert!(matches!(lanes.advance_ledger(&cols[..1], &[h, h]), Err(Error::Shape(_))));
    }

    #[test]
    fn ledger_lanes_follow_the_ledger_streams_and_a_failed_paper_lane_stops_alone() {
        let y0 = [1.0, 2.0, 3.0];
        let mut lanes = Lanes::new(vec![0, 1, 1], 2).unwrap();
        let ledger = |y: &[f64]| Exact::Ledger(LedgerState::new(Kind::Scale, y, None).unwrap());
        lanes.add(Kind::Scale, vec![0], vec![0], ledger(&y0[..1]), Some(PaperState::new(Kind::Scale, &y0[..1], None).unwrap())).unwrap();
        lanes.add(Kind::Scale, vec![1, 2], vec![], ledger(&y0[1..]), None).unwrap();
        let mut reference =
            [LedgerState::new(Kind::Scale, &y0[..1], None).unwrap(), LedgerState::new(Kind::Scale, &y0[1..], None).unwrap()];
        let hp = [hyper(0.1, 0.9, 1e-3), hyper(0.05, 0.0, 0.0)];
        for n in 0..4 {
            let mut cols = [[0.0; FIELDS]; 3];
            for (c, col) in cols.iter_mut().enumerate() {
                col[field::FLUX] = 0.01 * (n + c) as f64;
                col[field::UPDATE_SQ] = 0.5 + c as f64;
                col[field::DRIVE] = 0.5 + c as f64;
            }
            lanes.advance_ledger(&cols, &hp).unwrap();
            for (lane, (r, cs)) in reference.iter_mut().zip([vec![0], vec![1, 2]]).enumerate() {
                let flux: Vec<f64> = cs.iter().map(|&c| cols[c][field::FLUX]).collect();
                let usq: Vec<f64> = cs.iter().map(|&c| cols[c][field::UPDATE_SQ]).collect();
                r.step(LedgerInputs { flux: &flux, update_sq: Some(&usq), update_dot: None }, hp[lane].hyper(), false).unwrap();
            }
        }
        let (_, exact) = lanes.predictions();
        assert_eq!(exact, vec![reference[0].y()[0], reference[1].y()[0] + reference[1].y()[1]]);
        // Momentum switched off mid-run: the closed forms of §5.1 and §5.2 do not chain.
        let off = hyper(0.1, 0.0, 1e-3);
        assert!(lanes.advance_paper(&[1.0; 3], &hp).unwrap().is_empty());
        let failed = lanes.advance_paper(&[1.0; 3], &[off, hp[1]]).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, 0);
        assert!(lanes.predictions().0[0].is_nan());
    }
}
