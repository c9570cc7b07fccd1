//! Bindings of `crate::tracking`: the tracker's one native call per optimizer step.

use crate::error::Error;
use crate::tracking::plan::{PlanArrays, FIELDS, FIELD_NAMES};
use crate::tracking::snapshot::Snapshot;
use crate::tracking::tracker::FinalRow;
use crate::tracking::{ParamGroupHyper, Plan, StepReport, Tracker, UpdateRule, ROW_FIELDS};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// One param_group's hyperparameters, from the tracker's `(lr, momentum, dampening,
/// weight_decay, nesterov)` tuples (a NamedTuple in Python).
#[derive(FromPyObject)]
struct PyHyper(f64, f64, f64, f64, bool);

fn hypers(hyper: &[PyHyper]) -> Vec<ParamGroupHyper> {
    hyper
        .iter()
        .map(|&PyHyper(lr, momentum, dampening, weight_decay, nesterov)| ParamGroupHyper {
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        })
        .collect()
}

/// The plan's arrays, from a dict of 1-D numpy arrays (`tracking/plan.py`, `Plan.native_arrays`).
#[derive(FromPyObject)]
struct PyPlan<'py> {
    #[pyo3(item)]
    part_row_starts: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    part_rows: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    part_sign: PyReadonlyArray1<'py, f64>,
    #[pyo3(item)]
    part_column: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    part_size: PyReadonlyArray1<'py, f64>,
    #[pyo3(item)]
    column_group: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    column_param_group: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    group_kind: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    group_size: PyReadonlyArray1<'py, f64>,
    /// Optional (older callers): without it every group is judged against the whole plan.
    #[pyo3(item, default)]
    group_layer: Option<PyReadonlyArray1<'py, i64>>,
    /// Optional: each part's layer (default: its group's).
    #[pyo3(item, default)]
    part_layer: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(item)]
    extra_rows: PyReadonlyArray1<'py, i64>,
    #[pyo3(item)]
    rows: i64,
}

fn vec1<T: numpy::Element + Copy>(a: &PyReadonlyArray1<'_, T>) -> Vec<T> {
    a.as_array().to_vec()
}

impl PyPlan<'_> {
    fn arrays(&self) -> PlanArrays {
        PlanArrays {
            part_row_starts: vec1(&self.part_row_starts),
            part_rows: vec1(&self.part_rows),
            part_sign: vec1(&self.part_sign),
            part_column: vec1(&self.part_column),
            part_size: vec1(&self.part_size),
            column_group: vec1(&self.column_group),
            column_param_group: vec1(&self.column_param_group),
            group_kind: vec1(&self.group_kind),
            group_size: vec1(&self.group_size),
            group_layer: self.group_layer.as_ref().map(vec1).unwrap_or_default(),
            part_layer: self.part_layer.as_ref().map(vec1).unwrap_or_default(),
            extra_rows: vec1(&self.extra_rows),
            rows: self.rows,
        }
    }
}

/// A (rows, k) C-contiguous float64 block, as a flat slice and its width. (`as_slice` alone
/// also accepts Fortran order, whose rows are not our rows.)
fn block<'a>(a: &'a PyReadonlyArray2<'_, f64>, name: &str) -> Result<(&'a [f64], usize), Error> {
    let not_c = || Error::Shape(format!("{name} must be a C-contiguous float64 array"));
    if !a.is_c_contiguous() {
        return Err(not_c());
    }
    a.as_slice().map(|s| (s, a.shape()[1])).map_err(|_| not_c())
}

/// The run's row to write in place: a C-contiguous float64 array.
fn row<'a>(out: &'a mut Option<PyReadwriteArray2<'_, f64>>) -> Result<Option<&'a mut [f64]>, Error> {
    let Some(o) = out else { return Ok(None) };
    if !o.is_c_contiguous() {
        return Err(Error::Shape("out must be a C-contiguous float64 row".into()));
    }
    o.as_slice_mut().map(Some).map_err(|_| Error::Shape("out must be a C-contiguous float64 row".into()))
}

/// (time, notes, regimes) of a measured step, as Python receives it.
type Report = (f64, Vec<String>, Vec<(&'static str, &'static str)>);

fn report(r: StepReport) -> Report {
    (r.time, r.notes, r.regimes)
}

/// TrackerCore(plan, *, sgd, every, decoupled=False, beta1=0.0, strict=False): one run's per-step
/// state (clock, held drive, theory streams) and the one call per optimizer step that turns the
/// fused sums into the run's row. `decoupled`, `beta1`: how an optimizer other than
/// torch.optim.SGD is read (its weight decay decoupled, as AdamW's; Adam's β1), docs/theory.md
/// §5.5–§5.6. `strict`: non-finite sums raise instead of becoming a note (`on_error="raise"`).
/// See crate::tracking and docs/architecture.md ("Data flow of one tracked step").
#[pyclass(module = "neural_mechanics._native", name = "TrackerCore")]
struct TrackerCore {
    inner: Tracker,
}

#[pymethods]
impl TrackerCore {
    #[new]
    #[pyo3(signature = (plan, *, sgd, every, decoupled = false, beta1 = 0.0, strict = false))]
    fn new(plan: PyPlan<'_>, sgd: bool, every: usize, decoupled: bool, beta1: f64, strict: bool) -> PyResult<Self> {
        let mut inner = Tracker::new(Plan::new(plan.arrays())?, sgd, every.max(1));
        inner.set_update_rule(UpdateRule { decoupled, beta1 })?;
        inner.set_strict(strict);
        Ok(TrackerCore { inner })
    }

    /// lose(step, hyper): a step the tracker could not measure (the caller notes why): the
    /// clock moves; paper and exact are NaN until they restart at the next good step.
    fn lose(&mut self, step: usize, hyper: Vec<PyHyper>) -> PyResult<()> {
        Ok(self.inner.lose(step, &hypers(&hyper))?)
    }

    /// export_state() -> dict[str, ndarray]: the state between two steps as named float64
    /// arrays (crate::tracking::snapshot), for `Tracker.state_dict()`.
    fn export_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (key, values) in self.inner.export().0 {
            out.set_item(key, values.into_pyarray(py))?;
        }
        Ok(out)
    }

    /// import_state(state): continue from `export_state()` of a tracker with the same plan; a
    /// state of another plan, version or shape is an error that leaves this one as it was.
    fn import_state(&mut self, state: std::collections::BTreeMap<String, Vec<f64>>) -> PyResult<()> {
        Ok(self.inner.import(&Snapshot(state))?)
    }

    /// step_sgd(step, rows, extra, hyper, out=None) -> (time, notes, regimes): one measured
    /// torch.optim.SGD step (see crate::tracking::Tracker::step_sgd).
    #[pyo3(signature = (step, rows, extra, hyper, out = None))]
    fn step_sgd(
        &mut self,
        py: Python<'_>,
        step: usize,
        rows: PyReadonlyArray2<'_, f64>,
        extra: Option<PyReadonlyArray2<'_, f64>>,
        hyper: Vec<PyHyper>,
        mut out: Option<PyReadwriteArray2<'_, f64>>,
    ) -> PyResult<Report> {
        let (rows, k) = block(&rows, "rows")?;
        let extra = extra.as_ref().map(|e| block(e, "extra").map(|b| b.0)).transpose()?;
        let out = row(&mut out)?;
        let hyper = hypers(&hyper);
        let inner = &mut self.inner;
        Ok(report(py.detach(|| inner.step_sgd(step, rows, k, extra, &hyper, out))?))
    }

    /// step_update(rows, extra, hyper, out=None, *, step=0) -> (time, notes, regimes): one
    /// measured step of any other optimizer, from the sums of (θ_n, ĝ_n, θ_n − θ_{n+1});
    /// `step` names the step in notes (default: the last step the core saw).
    #[pyo3(signature = (rows, extra, hyper, out = None, *, step = None))]
    fn step_update(
        &mut self,
        py: Python<'_>,
        rows: PyReadonlyArray2<'_, f64>,
        extra: Option<PyReadonlyArray2<'_, f64>>,
        hyper: Vec<PyHyper>,
        mut out: Option<PyReadwriteArray2<'_, f64>>,
        step: Option<usize>,
    ) -> PyResult<Report> {
        let (rows, k) = block(&rows, "rows")?;
        let extra = extra.as_ref().map(|e| block(e, "extra").map(|b| b.0)).transpose()?;
        let out = row(&mut out)?;
        let hyper = hypers(&hyper);
        let inner = &mut self.inner;
        let step = step.unwrap_or_else(|| inner.next_step());
        Ok(report(py.detach(|| inner.step_update(step, rows, k, extra, &hyper, out))?))
    }

    /// skip(step, hyper) -> notes: a step that is not measured.
    fn skip(&mut self, step: usize, hyper: Vec<PyHyper>) -> PyResult<Vec<String>> {
        Ok(self.inner.skip(step, &hypers(&hyper))?)
    }

    /// final_row(rows) -> dict | None: the charges now from (rows, 2) sums of θ, with the
    /// theories' predictions and the time; None before the first measured step.
    fn final_row<'py>(&self, py: Python<'py>, rows: PyReadonlyArray2<'py, f64>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let (rows, k) = block(&rows, "rows")?;
        let Some(FinalRow { time, measured, magnitude, paper, exact }) = self.inner.final_row(rows, k)? else { return Ok(None) };
        let out = PyDict::new(py);
        out.set_item("time", time)?;
        let arrays: [(&str, Vec<f64>); 4] = [("measured", measured), ("magnitude", magnitude), ("paper", paper), ("exact", exact)];
        for (name, values) in arrays {
            let array: Bound<'py, PyArray1<f64>> = values.into_pyarray(py);
            out.set_item(name, array)?;
        }
        Ok(Some(out))
    }

    /// last_columns() -> (columns, len(COLUMN_FIELDS)): the per-column sums of the last measured
    /// step (empty before the first), for inspection.
    fn last_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let cols = self.inner.last_columns();
        let flat: Vec<f64> = cols.iter().flatten().copied().collect();
        Ok(Array2::from_shape_vec((cols.len(), FIELDS), flat).map_err(|e| Error::Shape(e.to_string()))?.into_pyarray(py))
    }

    /// The model time now (the clock of group 0's param_group).
    #[getter]
    fn time(&self) -> f64 {
        self.inner.time()
    }

    /// The number of symmetry groups of the plan (a run's row is (len(ROW_FIELDS), groups)).
    #[getter]
    fn groups(&self) -> usize {
        self.inner.plan().groups()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ROW_FIELDS", ROW_FIELDS.to_vec())?;
    m.add("COLUMN_FIELDS", FIELD_NAMES.to_vec())?;
    m.add_class::<TrackerCore>()?;
    Ok(())
}
