//! Bindings of `crate::tracking`: the tracker's per-step bookkeeping.

use super::to_pyerr;
use crate::error::Error;
use crate::tracking::{self, PartHyper, Plan};
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

    /// measure_sgd(rows, buffer_sum, momentum, dampening, weight_decay, nesterov) ->
    /// (columns (C, 8), groups (G, 7)); rows (R, 5 or 8) from the fused kernel, buffer_sum (R,)
    /// or None, hyperparameters per part (nesterov as 0/1 floats).
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
    ) -> PyResult<(Bound<'py, PyArray2<f64>>, Bound<'py, PyArray2<f64>>)> {
        let k = rows.shape()[1];
        let run = || -> Result<(Vec<f64>, Vec<f64>), Error> {
            let r = rows.as_slice().map_err(|_| Error::Shape("rows must be C-contiguous".into()))?;
            let b = buffer_sum.as_ref().map(|b| floats(b, "buffer_sum")).transpose()?;
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TrackerPlan>()?;
    Ok(())
}
