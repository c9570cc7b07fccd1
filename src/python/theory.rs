//! Bindings of `crate::theory`. The Python module `neural_mechanics.theory` normalises the
//! arguments (float64, contiguous, scalars as length-1 arrays) and calls these; the core checks
//! every value, so a bad argument becomes an exception of `neural_mechanics.errors`.

use super::to_pyerr;
use crate::error::Error;
use crate::theory::{equilibrium, ledger, paper, propagator, Hyper, Kind, Schedule};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

type Arr1<'py> = PyReadonlyArray1<'py, f64>;
type Arr2<'py> = PyReadonlyArray2<'py, f64>;

fn err(py: Python<'_>) -> impl Fn(Error) -> PyErr + '_ {
    move |e| to_pyerr(py, e)
}

fn slice1<'a>(a: &'a Arr1<'_>, name: &str) -> Result<&'a [f64], Error> {
    a.as_slice().map_err(|_| Error::Shape(format!("{name} is not contiguous")))
}

/// A (steps, groups) array's data, after checking both dimensions.
fn slice2<'a>(a: &'a Arr2<'_>, name: &str, steps: Option<usize>, groups: usize) -> Result<&'a [f64], Error> {
    let shape = a.shape();
    let rows_ok = steps.map_or(true, |s| shape[0] == s);
    if shape[1] != groups || !rows_ok {
        let want = match steps {
            Some(s) => format!("({s}, {groups})"),
            None => format!("(steps, {groups})"),
        };
        return Err(Error::Shape(format!("{name} has shape {shape:?}; expected {want} (steps, groups)")));
    }
    a.as_slice().map_err(|_| Error::Shape(format!("{name} is not C-contiguous")))
}

fn to_array2(py: Python<'_>, data: Vec<f64>, rows: usize, groups: usize) -> PyResult<Bound<'_, PyArray2<f64>>> {
    Array2::from_shape_vec((rows, groups), data).map(|a| a.into_pyarray(py)).map_err(|e| to_pyerr(py, Error::Shape(e.to_string())))
}

/// theory_paper(kind, y0, drive, lr, momentum, dampening, weight_decay, steps, ydot0=None)
/// --
///
/// Batch closed forms; hyperparameters are float64 arrays of length 1 or `steps`; drive is
/// (steps, groups) or None (translation). Returns (steps+1, groups).
#[pyfunction]
#[pyo3(signature = (kind, y0, drive, lr, momentum, dampening, weight_decay, steps, ydot0 = None))]
#[allow(clippy::too_many_arguments)]
fn theory_paper<'py>(
    py: Python<'py>,
    kind: &str,
    y0: Arr1<'py>,
    drive: Option<Arr2<'py>>,
    lr: Arr1<'py>,
    momentum: Arr1<'py>,
    dampening: Arr1<'py>,
    weight_decay: Arr1<'py>,
    steps: usize,
    ydot0: Option<Arr1<'py>>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let e = err(py);
    let kind = Kind::parse(kind).map_err(&e)?;
    let y0s = slice1(&y0, "y0").map_err(&e)?;
    let groups = y0s.len();
    let drive_s = match (&drive, kind.is_quadratic()) {
        (Some(d), true) => Some(slice2(d, "drive", Some(steps), groups).map_err(&e)?),
        _ => None,
    };
    let ydot_s = ydot0.as_ref().map(|v| slice1(v, "ydot0")).transpose().map_err(&e)?;
    let (l, m, d, w) = (
        slice1(&lr, "lr").map_err(&e)?,
        slice1(&momentum, "momentum").map_err(&e)?,
        slice1(&dampening, "dampening").map_err(&e)?,
        slice1(&weight_decay, "weight_decay").map_err(&e)?,
    );
    let out = py
        .detach(|| {
            let schedule = Schedule::new(steps, l, m, d, w)?;
            paper::paper(kind, y0s, ydot_s, drive_s, &schedule)
        })
        .map_err(&e)?;
    to_array2(py, out, steps + 1, groups)
}

/// Streaming closed forms (THEORY.md §5.1/§5.2): one `step` per optimizer step.
#[pyclass(module = "neural_mechanics._native", name = "TheoryPaperStream")]
struct TheoryPaperStream {
    inner: paper::PaperState,
}

#[pymethods]
impl TheoryPaperStream {
    #[new]
    #[pyo3(signature = (kind, y0, ydot0 = None))]
    fn new(py: Python<'_>, kind: &str, y0: Arr1<'_>, ydot0: Option<Arr1<'_>>) -> PyResult<Self> {
        let e = err(py);
        let kind = Kind::parse(kind).map_err(&e)?;
        let y = slice1(&y0, "y0").map_err(&e)?;
        let v = ydot0.as_ref().map(|v| slice1(v, "ydot0")).transpose().map_err(&e)?;
        Ok(TheoryPaperStream { inner: paper::PaperState::new(kind, y, v).map_err(&e)? })
    }

    /// step(drive, lr, momentum, dampening, weight_decay) -> y_{n+1}
    #[pyo3(signature = (drive, lr, momentum = 0.0, dampening = 0.0, weight_decay = 0.0))]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        drive: Option<Arr1<'py>>,
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let e = err(py);
        let d = match (&drive, self.inner.kind().is_quadratic()) {
            (Some(d), true) => Some(slice1(d, "drive").map_err(&e)?),
            _ => None,
        };
        let hp = Hyper::new(lr, momentum, dampening, weight_decay);
        let groups = self.inner.groups();
        // SAFETY: the fresh array is owned here, not yet visible to Python, and step_into
        // writes every one of its elements before it is returned (on error it is dropped).
        let out = unsafe { PyArray1::<f64>::new(py, groups, false) };
        let out_slice = unsafe { out.as_slice_mut() }.map_err(|_| to_pyerr(py, Error::Shape("output".into())))?;
        let inner = &mut self.inner;
        py.detach(|| inner.step_into(d, hp, Some(out_slice))).map_err(&e)?;
        Ok(out)
    }

    /// The current charges y_n (a copy).
    #[getter]
    fn y<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.y())
    }

    /// The current rate ẏ_n per unit of the model time t (a copy).
    #[getter]
    fn ydot<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.ydot())
    }

    #[getter]
    fn steps(&self) -> usize {
        self.inner.steps()
    }

    /// The model time t_n = Σ h_k.
    #[getter]
    fn time(&self) -> f64 {
        self.inner.time()
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind().name()
    }
}

/// theory_ledger(kind, y0, flux, update_sq, update_dot, buffer_dot0, lr, momentum, dampening,
///               weight_decay, nesterov)
/// --
///
/// Batch exact ledger of torch.optim.SGD; inputs (steps, groups). Returns (steps+1, groups).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn theory_ledger<'py>(
    py: Python<'py>,
    kind: &str,
    y0: Arr1<'py>,
    flux: Arr2<'py>,
    update_sq: Option<Arr2<'py>>,
    update_dot: Option<Arr2<'py>>,
    buffer_dot0: Option<Arr1<'py>>,
    lr: Arr1<'py>,
    momentum: Arr1<'py>,
    dampening: Arr1<'py>,
    weight_decay: Arr1<'py>,
    nesterov: bool,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let e = err(py);
    let kind = Kind::parse(kind).map_err(&e)?;
    let y0s = slice1(&y0, "y0").map_err(&e)?;
    let groups = y0s.len();
    let fl = slice2(&flux, "flux", None, groups).map_err(&e)?;
    let steps = flux.shape()[0];
    let usq = update_sq.as_ref().map(|u| slice2(u, "update_sq", Some(steps), groups)).transpose().map_err(&e)?;
    let udot = update_dot.as_ref().map(|u| slice2(u, "update_dot", Some(steps), groups)).transpose().map_err(&e)?;
    let b0 = buffer_dot0.as_ref().map(|b| slice1(b, "buffer_dot0")).transpose().map_err(&e)?;
    let (l, m, d, w) = (
        slice1(&lr, "lr").map_err(&e)?,
        slice1(&momentum, "momentum").map_err(&e)?,
        slice1(&dampening, "dampening").map_err(&e)?,
        slice1(&weight_decay, "weight_decay").map_err(&e)?,
    );
    let out = py
        .detach(|| {
            let schedule = Schedule::new(steps, l, m, d, w)?;
            ledger::ledger(kind, y0s, fl, usq, udot, b0, &schedule, nesterov)
        })
        .map_err(&e)?;
    to_array2(py, out, steps + 1, groups)
}

/// Streaming exact ledger (THEORY.md §5.3): one `step` per optimizer step.
#[pyclass(module = "neural_mechanics._native", name = "TheoryLedgerStream")]
struct TheoryLedgerStream {
    inner: ledger::LedgerState,
}

#[pymethods]
impl TheoryLedgerStream {
    #[new]
    #[pyo3(signature = (kind, y0, buffer_dot0 = None))]
    fn new(py: Python<'_>, kind: &str, y0: Arr1<'_>, buffer_dot0: Option<Arr1<'_>>) -> PyResult<Self> {
        let e = err(py);
        let kind = Kind::parse(kind).map_err(&e)?;
        let y = slice1(&y0, "y0").map_err(&e)?;
        let b = buffer_dot0.as_ref().map(|b| slice1(b, "buffer_dot0")).transpose().map_err(&e)?;
        Ok(TheoryLedgerStream { inner: ledger::LedgerState::new(kind, y, b).map_err(&e)? })
    }

    /// step(flux, update_sq, update_dot, lr, momentum, dampening, weight_decay, nesterov) -> y_{n+1}
    #[pyo3(signature = (flux, update_sq, update_dot, lr, momentum = 0.0, dampening = 0.0, weight_decay = 0.0, nesterov = false))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        flux: Arr1<'py>,
        update_sq: Option<Arr1<'py>>,
        update_dot: Option<Arr1<'py>>,
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let e = err(py);
        let inputs = ledger::LedgerInputs {
            flux: slice1(&flux, "flux").map_err(&e)?,
            update_sq: update_sq.as_ref().map(|u| slice1(u, "update_sq")).transpose().map_err(&e)?,
            update_dot: update_dot.as_ref().map(|u| slice1(u, "update_dot")).transpose().map_err(&e)?,
        };
        let hp = Hyper::new(lr, momentum, dampening, weight_decay);
        let inner = &mut self.inner;
        py.detach(|| inner.step(inputs, hp, nesterov).map(|_| ())).map_err(&e)?;
        Ok(PyArray1::from_slice(py, self.inner.y()))
    }

    #[getter]
    fn y<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.y())
    }

    /// ⟨θ_n, b_{n−1}⟩ as the ledger carries it (a copy).
    #[getter]
    fn buffer_dot<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.buffer_dot())
    }

    #[getter]
    fn steps(&self) -> usize {
        self.inner.steps()
    }
}

/// theory_ledger_measured(kind, y0, lr, steps, dot, update_sq, update_sum)
/// --
///
/// The optimizer-agnostic identity θ_{n+1} = θ_n − η_n u_n; inputs (steps, groups) or None.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn theory_ledger_measured<'py>(
    py: Python<'py>,
    kind: &str,
    y0: Arr1<'py>,
    lr: Arr1<'py>,
    steps: usize,
    dot: Option<Arr2<'py>>,
    update_sq: Option<Arr2<'py>>,
    update_sum: Option<Arr2<'py>>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let e = err(py);
    let kind = Kind::parse(kind).map_err(&e)?;
    let y0s = slice1(&y0, "y0").map_err(&e)?;
    let groups = y0s.len();
    fn take<'a>(a: &'a Option<Arr2<'_>>, name: &str, steps: usize, groups: usize) -> Result<Option<&'a [f64]>, Error> {
        a.as_ref().map(|a| slice2(a, name, Some(steps), groups)).transpose()
    }
    let dot_s = take(&dot, "dot_theta_update", steps, groups).map_err(&e)?;
    let usq = take(&update_sq, "update_sq", steps, groups).map_err(&e)?;
    let usum = take(&update_sum, "update_sum", steps, groups).map_err(&e)?;
    let l = slice1(&lr, "lr").map_err(&e)?;
    let out = py.detach(|| ledger::ledger_measured(kind, y0s, steps, l, dot_s, usq, usum)).map_err(&e)?;
    to_array2(py, out, steps + 1, groups)
}

type Four<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

fn columns<'py>(py: Python<'py>, all: Vec<equilibrium::Equilibrium>) -> Four<'py> {
    let col = |f: fn(&equilibrium::Equilibrium) -> f64| PyArray1::from_vec(py, all.iter().map(f).collect());
    (col(|q| q.norm_sq), col(|q| q.angular_update), col(|q| q.effective_lr), col(|q| q.relaxation_steps))
}

fn same_len(py: Python<'_>, arrays: &[&[f64]]) -> PyResult<usize> {
    let n = arrays[0].len();
    if arrays.iter().any(|a| a.len() != n) {
        return Err(to_pyerr(py, Error::Shape("equilibrium inputs must be broadcast to one shape".into())));
    }
    Ok(n)
}

/// theory_equilibrium_sgd(lr, weight_decay, grad_sq_unit, momentum, dampening)
/// --
///
/// Element-wise over equal-length 1-D arrays; returns (norm_sq, angular_update, effective_lr,
/// relaxation_steps).
#[pyfunction]
fn theory_equilibrium_sgd<'py>(
    py: Python<'py>,
    lr: Arr1<'py>,
    weight_decay: Arr1<'py>,
    grad_sq_unit: Arr1<'py>,
    momentum: Arr1<'py>,
    dampening: Arr1<'py>,
) -> PyResult<Four<'py>> {
    let e = err(py);
    let (l, w, g, m, d) = (
        slice1(&lr, "lr").map_err(&e)?,
        slice1(&weight_decay, "weight_decay").map_err(&e)?,
        slice1(&grad_sq_unit, "grad_sq_unit").map_err(&e)?,
        slice1(&momentum, "momentum").map_err(&e)?,
        slice1(&dampening, "dampening").map_err(&e)?,
    );
    let n = same_len(py, &[l, w, g, m, d])?;
    let all = (0..n).map(|i| equilibrium::sgd(l[i], w[i], g[i], m[i], d[i])).collect::<Result<Vec<_>, _>>().map_err(&e)?;
    Ok(columns(py, all))
}

/// theory_equilibrium_adamw(lr, weight_decay, update_sq, beta1)
/// --
///
/// Element-wise over equal-length 1-D arrays; returns the same four arrays as the SGD form.
#[pyfunction]
fn theory_equilibrium_adamw<'py>(
    py: Python<'py>,
    lr: Arr1<'py>,
    weight_decay: Arr1<'py>,
    update_sq: Arr1<'py>,
    beta1: Arr1<'py>,
) -> PyResult<Four<'py>> {
    let e = err(py);
    let (l, w, u, b) = (
        slice1(&lr, "lr").map_err(&e)?,
        slice1(&weight_decay, "weight_decay").map_err(&e)?,
        slice1(&update_sq, "update_sq").map_err(&e)?,
        slice1(&beta1, "beta1").map_err(&e)?,
    );
    let n = same_len(py, &[l, w, u, b])?;
    let all = (0..n).map(|i| equilibrium::adamw(l[i], w[i], u[i], b[i])).collect::<Result<Vec<_>, _>>().map_err(&e)?;
    Ok(columns(py, all))
}

/// theory_regime(lr, momentum, dampening, weight_decay, kind="scale") -> str
#[pyfunction]
#[pyo3(signature = (lr, momentum, dampening, weight_decay, kind = "scale"))]
fn theory_regime(py: Python<'_>, lr: f64, momentum: f64, dampening: f64, weight_decay: f64, kind: &str) -> PyResult<&'static str> {
    let e = err(py);
    let kind = Kind::parse(kind).map_err(&e)?;
    let r = propagator::regime(kind, Hyper::new(lr, momentum, dampening, weight_decay)).map_err(&e)?;
    Ok(r.name())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("THEORY_KINDS", Kind::NAMES.to_vec())?;
    m.add("THEORY_CRITICAL_TOL", propagator::CRITICAL_TOL)?;
    m.add_function(wrap_pyfunction!(theory_paper, m)?)?;
    m.add_function(wrap_pyfunction!(theory_ledger, m)?)?;
    m.add_function(wrap_pyfunction!(theory_ledger_measured, m)?)?;
    m.add_function(wrap_pyfunction!(theory_equilibrium_sgd, m)?)?;
    m.add_function(wrap_pyfunction!(theory_equilibrium_adamw, m)?)?;
    m.add_function(wrap_pyfunction!(theory_regime, m)?)?;
    m.add_class::<TheoryPaperStream>()?;
    m.add_class::<TheoryLedgerStream>()?;
    Ok(())
}
