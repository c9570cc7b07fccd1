//! Bindings of `crate::theory`. The Python module `neural_mechanics.theory` normalises the
//! arguments (float64, contiguous, scalars as length-1 arrays) and calls these; the core checks
//! every value, so a bad argument becomes an exception of `neural_mechanics.errors`.

use crate::error::Error;
use crate::theory::{self, equilibrium, ledger, paper, propagator, Hyper, Kind, Schedule};
use numpy::ndarray::{Dimension, Ix1, Ix2};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::Borrowed;

use super::array2;

/// A float64 array argument of D dimensions, borrowed read-only and C-contiguous, so that its
/// data is one slice. Extraction refuses another dtype or rank (TypeError) and a strided view
/// (ShapeError); pyo3 adds a note naming the argument to either.
struct F64Array<'py, D: Dimension>(PyReadonlyArray<'py, f64, D>);

/// A 1-D float64 array argument: hyperparameters (one value, or one per step), charges, rates.
type Arr1<'py> = F64Array<'py, Ix1>;
/// A (steps, groups) float64 array argument.
type Arr2<'py> = F64Array<'py, Ix2>;

impl<'a, 'py, D: Dimension + 'a> FromPyObject<'a, 'py> for F64Array<'py, D> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let array = <PyReadonlyArray<'py, f64, D> as FromPyObject<'a, 'py>>::extract(obj)?;
        if !array.is_c_contiguous() {
            return Err(Error::Shape("the array is not C-contiguous; pass np.ascontiguousarray(array)".into()).into());
        }
        Ok(F64Array(array))
    }
}

impl<D: Dimension> F64Array<'_, D> {
    /// The elements, in C order.
    fn values(&self) -> &[f64] {
        // Contiguity was checked on extraction, so there is always a slice.
        self.0.as_slice().unwrap_or_default()
    }
}

impl Arr2<'_> {
    /// The data of a (steps, groups) array, after checking both dimensions (any number of rows
    /// when `steps` is None).
    fn rows(&self, name: &str, steps: Option<usize>, groups: usize) -> Result<&[f64], Error> {
        let shape = self.0.shape();
        if shape[1] != groups || steps.is_some_and(|s| shape[0] != s) {
            let want = match steps {
                Some(s) => format!("({s}, {groups})"),
                None => format!("(steps, {groups})"),
            };
            return Err(Error::Shape(format!("{name} has shape {shape:?}; expected {want} (steps, groups)")));
        }
        Ok(self.values())
    }

    fn steps(&self) -> usize {
        self.0.shape()[0]
    }
}

/// Run `work` with the GIL released, letting it check for Ctrl-C: its [`theory::Interrupt`]
/// re-takes the GIL every few milliseconds of work ([`theory::INTERRUPT_EVERY`]) to run Python's signal
/// handlers, and an exception they raise (KeyboardInterrupt) stops the work and is raised.
fn interruptible<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce(theory::Interrupt<'_>) -> Result<T, Error> + Send,
{
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut check = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => Ok(()),
            Err(err) => {
                raised = Some(err);
                Err(Error::InvalidArgument("interrupted".into()))
            }
        };
        work(&mut check)
    });
    match (result, raised) {
        (_, Some(err)) => Err(err),
        (result, None) => Ok(result?),
    }
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
    let kind = Kind::parse(kind)?;
    let groups = y0.values().len();
    let drive = match (&drive, kind.is_quadratic()) {
        (Some(d), true) => Some(d.rows("drive", Some(steps), groups)?),
        _ => None,
    };
    let (y0, ydot0) = (y0.values(), ydot0.as_ref().map(F64Array::values));
    let [l, m, d, w] = [&lr, &momentum, &dampening, &weight_decay].map(F64Array::values);
    let out = interruptible(py, |interrupt| {
        let schedule = Schedule::new(steps, l, m, d, w)?;
        paper::paper(kind, y0, ydot0, drive, &schedule, interrupt)
    })?;
    array2(py, out, steps.saturating_add(1), groups)
}

/// Streaming closed forms (docs/theory.md §5.1/§5.2): one `step` per optimizer step.
#[pyclass(module = "neural_mechanics._native", name = "TheoryPaperStream")]
struct TheoryPaperStream {
    inner: paper::PaperState,
}

#[pymethods]
impl TheoryPaperStream {
    #[new]
    #[pyo3(signature = (kind, y0, ydot0 = None))]
    fn new(kind: &str, y0: Arr1<'_>, ydot0: Option<Arr1<'_>>) -> PyResult<Self> {
        let inner = paper::PaperState::new(Kind::parse(kind)?, y0.values(), ydot0.as_ref().map(F64Array::values))?;
        Ok(TheoryPaperStream { inner })
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
        let drive = match (&drive, self.inner.kind().is_quadratic()) {
            (Some(d), true) => Some(d.values()),
            _ => None,
        };
        let hp = Hyper::new(lr, momentum, dampening, weight_decay);
        let groups = self.inner.groups();
        // SAFETY: the fresh array is owned here, not yet visible to Python, and step_into
        // writes every one of its elements before it is returned (on error it is dropped).
        let out = unsafe { PyArray1::<f64>::new(py, groups, false) };
        // SAFETY: nothing else can reach the fresh array, so this is its only borrow.
        let out_slice = unsafe { out.as_slice_mut() }.map_err(|_| Error::Shape("output".into()))?;
        let inner = &mut self.inner;
        py.detach(|| inner.step_into(drive, hp, Some(out_slice)))?;
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
    let kind = Kind::parse(kind)?;
    let groups = y0.values().len();
    let fl = flux.rows("flux", None, groups)?;
    let steps = flux.steps();
    let usq = update_sq.as_ref().map(|u| u.rows("update_sq", Some(steps), groups)).transpose()?;
    let udot = update_dot.as_ref().map(|u| u.rows("update_dot", Some(steps), groups)).transpose()?;
    let (y0, buffer_dot0) = (y0.values(), buffer_dot0.as_ref().map(F64Array::values));
    let [l, m, d, w] = [&lr, &momentum, &dampening, &weight_decay].map(F64Array::values);
    let out = interruptible(py, |interrupt| {
        let schedule = Schedule::new(steps, l, m, d, w)?;
        ledger::ledger(kind, y0, fl, usq, udot, buffer_dot0, &schedule, nesterov, interrupt)
    })?;
    array2(py, out, steps.saturating_add(1), groups)
}

/// Streaming exact ledger (docs/theory.md §5.3): one `step` per optimizer step.
#[pyclass(module = "neural_mechanics._native", name = "TheoryLedgerStream")]
struct TheoryLedgerStream {
    inner: ledger::LedgerState,
}

#[pymethods]
impl TheoryLedgerStream {
    #[new]
    #[pyo3(signature = (kind, y0, buffer_dot0 = None))]
    fn new(kind: &str, y0: Arr1<'_>, buffer_dot0: Option<Arr1<'_>>) -> PyResult<Self> {
        let inner = ledger::LedgerState::new(Kind::parse(kind)?, y0.values(), buffer_dot0.as_ref().map(F64Array::values))?;
        Ok(TheoryLedgerStream { inner })
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
        let inputs = ledger::LedgerInputs {
            flux: flux.values(),
            update_sq: update_sq.as_ref().map(F64Array::values),
            update_dot: update_dot.as_ref().map(F64Array::values),
        };
        let hp = Hyper::new(lr, momentum, dampening, weight_decay);
        let inner = &mut self.inner;
        py.detach(|| inner.step(inputs, hp, nesterov).map(|_| ()))?;
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
    let kind = Kind::parse(kind)?;
    let groups = y0.values().len();
    let dot = dot.as_ref().map(|a| a.rows("dot_theta_update", Some(steps), groups)).transpose()?;
    let usq = update_sq.as_ref().map(|a| a.rows("update_sq", Some(steps), groups)).transpose()?;
    let usum = update_sum.as_ref().map(|a| a.rows("update_sum", Some(steps), groups)).transpose()?;
    let (y0, lr) = (y0.values(), lr.values());
    let out = interruptible(py, |interrupt| ledger::ledger_measured(kind, y0, steps, lr, dot, usq, usum, interrupt))?;
    array2(py, out, steps.saturating_add(1), groups)
}

/// theory_times(lr, momentum, dampening, steps)
/// --
///
/// The model time t_n (n = 0 … steps) of the closed forms; hyperparameters as theory_paper's,
/// checked the same way. Returns (steps + 1,).
#[pyfunction]
fn theory_times<'py>(
    py: Python<'py>,
    lr: Arr1<'py>,
    momentum: Arr1<'py>,
    dampening: Arr1<'py>,
    steps: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let [l, m, d] = [&lr, &momentum, &dampening].map(F64Array::values);
    let out = py.detach(|| {
        let schedule = Schedule::new(steps, l, m, d, &[0.0])?;
        theory::times(&schedule)
    })?;
    Ok(PyArray1::from_vec(py, out))
}

type Four<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

fn columns<'py>(py: Python<'py>, all: Vec<equilibrium::Equilibrium>) -> Four<'py> {
    let col = |f: fn(&equilibrium::Equilibrium) -> f64| PyArray1::from_vec(py, all.iter().map(f).collect());
    (col(|q| q.norm_sq), col(|q| q.angular_update), col(|q| q.effective_lr), col(|q| q.relaxation_steps))
}

fn same_len(arrays: &[&[f64]]) -> Result<usize, Error> {
    let n = arrays[0].len();
    if arrays.iter().any(|a| a.len() != n) {
        return Err(Error::Shape("equilibrium inputs must be broadcast to one shape".into()));
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
    let [l, w, g, m, d] = [&lr, &weight_decay, &grad_sq_unit, &momentum, &dampening].map(F64Array::values);
    let n = same_len(&[l, w, g, m, d])?;
    let all = (0..n).map(|i| equilibrium::sgd(l[i], w[i], g[i], m[i], d[i])).collect::<Result<Vec<_>, _>>()?;
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
    let [l, w, u, b] = [&lr, &weight_decay, &update_sq, &beta1].map(F64Array::values);
    let n = same_len(&[l, w, u, b])?;
    let all = (0..n).map(|i| equilibrium::adamw(l[i], w[i], u[i], b[i])).collect::<Result<Vec<_>, _>>()?;
    Ok(columns(py, all))
}

/// theory_regime(lr, momentum, dampening, weight_decay, kind="scale") -> str
#[pyfunction]
#[pyo3(signature = (lr, momentum, dampening, weight_decay, kind = "scale"))]
fn theory_regime(lr: f64, momentum: f64, dampening: f64, weight_decay: f64, kind: &str) -> PyResult<&'static str> {
    let regime = propagator::regime(Kind::parse(kind)?, Hyper::new(lr, momentum, dampening, weight_decay))?;
    Ok(regime.name())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("THEORY_KINDS", Kind::NAMES.to_vec())?;
    m.add("THEORY_CRITICAL_TOL", propagator::CRITICAL_TOL)?;
    m.add("THEORY_MAX_UNBACKED_VALUES", theory::MAX_UNBACKED_VALUES)?;
    m.add_function(wrap_pyfunction!(theory_paper, m)?)?;
    m.add_function(wrap_pyfunction!(theory_ledger, m)?)?;
    m.add_function(wrap_pyfunction!(theory_ledger_measured, m)?)?;
    m.add_function(wrap_pyfunction!(theory_equilibrium_sgd, m)?)?;
    m.add_function(wrap_pyfunction!(theory_equilibrium_adamw, m)?)?;
    m.add_function(wrap_pyfunction!(theory_regime, m)?)?;
    m.add_function(wrap_pyfunction!(theory_times, m)?)?;
    m.add_class::<TheoryPaperStream>()?;
    m.add_class::<TheoryLedgerStream>()?;
    Ok(())
}
