//! The thin pyo3 layer: numpy in, numpy out, the GIL released during the work, every core
//! error mapped to one class of `neural_mechanics.errors` (`?` on a core `Result` does it).
//! Built only with the `python` feature.
//!
//! The contract with the Python layer is defined here, in Rust, and exported for Python to read
//! (never copied there): SUM_NAMES, DTYPE_CODES, MAX_THREADS and `layout` (this folder's stats.rs),
//! RUN_FORMAT_VERSION (runfile.rs), THEORY_KINDS and THEORY_CRITICAL_TOL (theory.rs).

use crate::error::Error;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;

mod raw;
mod runfile;
mod stats;
mod theory;
mod tracking;

/// Map a core error to the Python exception class of the same meaning (defined in Python so that
/// each can subclass both NeuralMechanicsError and ValueError/TypeError).
pub(crate) fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let (class, message) = match err {
        Error::Shape(m) => ("ShapeError", m),
        Error::DType(m) => ("DTypeError", m),
        Error::NonFinite(m) => ("NonFiniteError", m),
        Error::InvalidArgument(m) => ("InvalidArgumentError", m),
        Error::Format(m) => ("RunFormatError", m),
        Error::Io(m) => ("RunIOError", m),
    };
    let made = py.import("neural_mechanics.errors").and_then(|module| module.getattr(class)).and_then(|cls| cls.call1((message,)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(import_failure) => import_failure,
    }
}

/// `?` on a core `Result` inside a binding raises the matching Python exception.
impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| to_pyerr(py, err))
    }
}

/// A (rows, cols) float64 numpy array holding `data` row-major (a length that does not match
/// is a ShapeError, never a panic).
pub(crate) fn array2(py: Python<'_>, data: Vec<f64>, rows: usize, cols: usize) -> PyResult<Bound<'_, PyArray2<f64>>> {
    let array = Array2::from_shape_vec((rows, cols), data).map_err(|e| Error::Shape(e.to_string()))?;
    Ok(array.into_pyarray(py))
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    stats::register(m)?;
    runfile::register(m)?;
    raw::register(m)?;
    theory::register(m)?;
    tracking::register(m)?;
    Ok(())
}
