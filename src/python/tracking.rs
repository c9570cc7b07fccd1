//! Bindings of `crate::tracking`: the tracker's per-step bookkeeping.

use super::to_pyerr;
use crate::error::Error;
use crate::theory::ledger::LedgerState;
use crate::theory::paper::PaperState;
use crate::theory::{Hyper, Kind};
use crate::tracking::{self, Exact, LaneHyper, Lanes, PartHyper, Plan};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

type I64s<'py> = PyReadonlyArray1<'py, i64>;
type F64s<'py> = PyReadonlyArray1<'py, f64>;

fn indices(a: &I64s<'_>, name: &str) -> Result<Vec<usize>, Error> {
    a.as_slice()
        .map_err(|_| Error::Shape(format!("{name} must be contiguous")))?
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| Error::InvalidArgument(format!("{name}: negative index"))))
        .collect()
}

fn floats<'a>(a: &'a F64s<'_>, name: &str) -> Result<&'a [f64], Error> {
    a.as_slice().map_err(|_| Error::Shape(format!("{name} must be contiguous")))
}

/// TrackerPlan(part_row_starts, part_rows, part_sign, part_translation, part_column, part_group,
/// part_size, column_group, group_translation, group_size): the index maps of tracking/plan.py.
#[pyclass(module = "neural_mechanics._native", name = "TrackerPlan", frozen)]
struct TrackerPlan {
    plan: Plan,
}

#[pymethods]
impl TrackerPlan {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        part_row_starts: I64s<'_>,
        part_rows: I64s<'_>,
        part_sign: F64s<'_>,
        part_translation: I64s<'_>,
        part_column: I64s<'_>,
        part_group: I64s<'_>,
        part_size: F64s<'_>,
        column_group: I64s<'_>,
        group_translation: I64s<'_>,
        group_size: F64s<'_>,
    ) -> PyResult<Self> {
        let build = || -> Result<Plan, Error> {
            Ok(Plan {
                part_row_starts: indices(&part_row_starts, "part_row_starts")?,
                part_rows: indices(&part_rows, "part_rows")?,
                part_sign: floats(&part_sign, "part_sign")?.to_vec(),
                part_translation: indices(&part_translation, "part_translation")?.iter().map(|&v| v != 0).collect(),
                part_column: indices(&part_column, "part_column")?,
                part_group: indices(&part_group, "part_group")?,
                part_size: floats(&part_size, "part_size")?.to_vec(),
                column_group: indices(&column_group, "column_group")?,
                group_translation: indices(&group_translation, "group_translation")?.iter().map(|&v| v != 0).collect(),
                group_size: floats(&group_size, "group_size")?.to_vec(),
            })
        };
        let plan = build().map_err(|e| to_pyerr(py, e))?;
        Ok(TrackerPlan { plan })
    }

    /// measure_sgd(rows, buffer_sum, momentum, dampening, weight_decay, nesterov, buffer_rows=None)
    /// -> (columns (C, 8), groups (G, 7)); rows (R, 5 or 8) from the fused kernel, buffer_sum
    /// (R,) or None, hyperparameters per part (nesterov as 0/1 floats). With buffer_rows,
    /// buffer_sum[i] is the sum of row buffer_rows[i] and every other row's is 0 (the tracker
    /// sums the buffer of the translation reductions only).
    #[pyo3(signature = (rows, buffer_sum, momentum, dampening, weight_decay, nesterov, buffer_rows = None))]
    #[allow(clippy::too_many_arguments)]
    fn measure_sgd<'py>(
        &self,
        py: Python<'py>,
        rows: PyReadonlyArray2<'py, f64>,
        buffer_sum: Option<F64s<'py>>,
        momentum: F64s<'py>,
        dampening: F64s<'py>,
        weight_decay: F64s<'py>,
        nesterov: F64s<'py>,
        buffer_rows: Option<I64s<'py>>,
    ) -> PyResult<(Bound<'py, PyArray2<f64>>, Bound<'py, PyArray2<f64>>)> {
        let k = rows.shape()[1];
        let run = || -> Result<(Vec<f64>, Vec<f64>), Error> {
            let r = rows.as_slice().map_err(|_| Error::Shape("rows must be C-contiguous".into()))?;
            let b = buffer_sum.as_ref().map(|b| floats(b, "buffer_sum")).transpose()?;
            let scattered = match (&buffer_rows, b) {
                (Some(at), Some(b)) => Some(scatter(b, &indices(at, "buffer_rows")?, r.len() / k.max(1))?),
                (Some(_), None) => return Err(Error::InvalidArgument("buffer_rows needs buffer_sum".into())),
                _ => None,
            };
            let b = scattered.as_deref().or(b);
            let nest: Vec<bool> = floats(&nesterov, "nesterov")?.iter().map(|&v| v != 0.0).collect();
            let h = PartHyper {
                momentum: floats(&momentum, "momentum")?,
                dampening: floats(&dampening, "dampening")?,
                weight_decay: floats(&weight_decay, "weight_decay")?,
                nesterov: &nest,
            };
            tracking::measure_sgd(&self.plan, r, k, b, &h)
        };
        let (cols, groups) = run().map_err(|e| to_pyerr(py, e))?;
        let n_cols = self.plan.column_group.len();
        let n_groups = self.plan.group_size.len();
        let shape = |e: numpy::ndarray::ShapeError| to_pyerr(py, Error::Shape(e.to_string()));
        let c = Array2::from_shape_vec((n_cols, 8), cols).map_err(shape)?;
        let g = Array2::from_shape_vec((n_groups, 7), groups).map_err(shape)?;
        Ok((c.into_pyarray(py), g.into_pyarray(py)))
    }
}

/// A dense per-row vector (n_rows,) holding `values[i]` at row `at[i]`, zeros elsewhere.
fn scatter(values: &[f64], at: &[usize], n_rows: usize) -> Result<Vec<f64>, Error> {
    if values.len() != at.len() {
        return Err(Error::Shape(format!("buffer_sum has {} values for {} buffer_rows", values.len(), at.len())));
    }
    let mut dense = vec![0.0; n_rows];
    for (&i, &v) in at.iter().zip(values) {
        *dense.get_mut(i).ok_or_else(|| Error::Shape(format!("buffer_rows: row {i} is past the {n_rows} rows")))? = v;
    }
    Ok(dense)
}

/// Per lane: (lr, momentum, dampening, weight_decay, nesterov) of its param_group.
type HyperTuple = (f64, f64, f64, f64, bool);

fn lane_hyper(hyper: &[HyperTuple]) -> Vec<LaneHyper> {
    hyper.iter().map(|&(lr, m, d, w, nesterov)| LaneHyper { hp: Hyper::new(lr, m, d, w), nesterov }).collect()
}

fn take(values: &[f64], cols: &[usize], name: &str) -> Result<Vec<f64>, Error> {
    cols.iter().map(|&c| values.get(c).copied().ok_or_else(|| Error::Shape(format!("{name} is shorter than the columns")))).collect()
}

/// TrackerLanes(column_group, n_groups): the tracker's theory streams, one lane per
/// (kind, param_group), advanced with one call per step (see crate::tracking::Lanes).
#[pyclass(module = "neural_mechanics._native", name = "TrackerLanes")]
struct TrackerLanes {
    inner: Lanes,
}

#[pymethods]
impl TrackerLanes {
    #[new]
    fn new(py: Python<'_>, column_group: I64s<'_>, n_groups: usize) -> PyResult<Self> {
        let groups = indices(&column_group, "column_group").map_err(|e| to_pyerr(py, e))?;
        Ok(TrackerLanes { inner: Lanes::new(groups, n_groups).map_err(|e| to_pyerr(py, e))? })
    }

    /// add_lane(kind, cols, paper_cols, exact, y0, buffer_dot0=None, paper=False, ydot0=None):
    /// exact is "ledger" (SGD), "measured" or "none"; y0 and buffer_dot0 are per column (all
    /// columns), ydot0 per paper column.
    #[pyo3(signature = (kind, cols, paper_cols, exact, y0, buffer_dot0 = None, paper = false, ydot0 = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_lane(
        &mut self,
        py: Python<'_>,
        kind: &str,
        cols: I64s<'_>,
        paper_cols: I64s<'_>,
        exact: &str,
        y0: F64s<'_>,
        buffer_dot0: Option<F64s<'_>>,
        paper: bool,
        ydot0: Option<F64s<'_>>,
    ) -> PyResult<()> {
        let mut run = || -> Result<(), Error> {
            let kind = Kind::parse(kind)?;
            let cols = indices(&cols, "cols")?;
            let paper_cols = indices(&paper_cols, "paper_cols")?;
            let y0 = floats(&y0, "y0")?;
            let exact = match exact {
                "ledger" => {
                    let b0 =
                        buffer_dot0.as_ref().map(|b| floats(b, "buffer_dot0").and_then(|b| take(b, &cols, "buffer_dot0"))).transpose()?;
                    Exact::Ledger(LedgerState::new(kind, &take(y0, &cols, "y0")?, b0.as_deref())?)
                }
                "measured" => Exact::Measured(take(y0, &cols, "y0")?),
                "none" => Exact::None,
                other => return Err(Error::InvalidArgument(format!("exact must be 'ledger', 'measured' or 'none', got {other:?}"))),
            };
            let paper = if paper {
                let v = ydot0.as_ref().map(|v| floats(v, "ydot0")).transpose()?;
                Some(PaperState::new(kind, &take(y0, &paper_cols, "y0")?, v)?)
            } else {
                None
            };
            self.inner.add(kind, cols, paper_cols, exact, paper)
        };
        run().map_err(|e| to_pyerr(py, e))
    }

    /// advance_ledger(cols, hyper): cols (columns, 8) from measure_sgd, hyper one tuple per lane.
    fn advance_ledger(&mut self, py: Python<'_>, cols: PyReadonlyArray2<'_, f64>, hyper: Vec<HyperTuple>) -> PyResult<()> {
        let c = cols.as_slice().map_err(|_| to_pyerr(py, Error::Shape("cols must be C-contiguous".into())))?;
        self.inner.advance_ledger(c, &lane_hyper(&hyper)).map_err(|e| to_pyerr(py, e))
    }

    /// advance_measured(delta): add each column's measured change to the "measured" lanes.
    fn advance_measured(&mut self, py: Python<'_>, delta: F64s<'_>) -> PyResult<()> {
        let mut run = || self.inner.advance_measured(floats(&delta, "delta")?);
        run().map_err(|e| to_pyerr(py, e))
    }

    /// advance_paper(drive, hyper) -> [(lane, why)]: the lanes whose closed form failed and stopped.
    fn advance_paper(&mut self, py: Python<'_>, drive: F64s<'_>, hyper: Vec<HyperTuple>) -> PyResult<Vec<(usize, String)>> {
        let mut run = || self.inner.advance_paper(floats(&drive, "drive")?, &lane_hyper(&hyper));
        let failed = run().map_err(|e| to_pyerr(py, e))?;
        Ok(failed.into_iter().map(|(lane, err)| (lane, err.to_string())).collect())
    }

    /// predictions() -> (2, groups): paper (row 0) and exact (row 1) per group, NaN where a
    /// theory does not apply. One array: they are neighbouring rows of a Run's row.
    fn predictions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let (mut both, exact) = self.inner.predictions();
        let groups = both.len();
        both.extend(exact);
        let array = Array2::from_shape_vec((2, groups), both).map_err(|e| to_pyerr(py, Error::Shape(e.to_string())))?;
        Ok(array.into_pyarray(py))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TrackerPlan>()?;
    m.add_class::<TrackerLanes>()?;
    Ok(())
}
