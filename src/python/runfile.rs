//! Bindings of `crate::runfile`: numpy float64/int64 arrays in and out.

use crate::error::Error;
use crate::runfile::{self, ArrayRef, ElemType};
use numpy::{PyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

enum Held<'py> {
    F64(PyReadonlyArrayDyn<'py, f64>),
    I64(PyReadonlyArrayDyn<'py, i64>),
}

/// (name, numpy array) pairs, as save_run takes them and load_run returns them.
type NamedArrays<'py> = Vec<(String, Bound<'py, PyAny>)>;

/// The arrays as (name, C-contiguous float64 or int64 array), held for reading.
fn hold<'py>(arrays: &NamedArrays<'py>) -> PyResult<Vec<Held<'py>>> {
    let mut held = Vec::with_capacity(arrays.len());
    for (name, obj) in arrays {
        let h = if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<f64>>() {
            Held::F64(a)
        } else if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<i64>>() {
            Held::I64(a)
        } else {
            return Err(Error::DType(format!("array {name:?}: only float64 and int64 arrays are saved")).into());
        };
        let contiguous = match &h {
            Held::F64(a) => a.is_c_contiguous(),
            Held::I64(a) => a.is_c_contiguous(),
        };
        if !contiguous {
            return Err(Error::Shape(format!("array {name:?} is not C-contiguous")).into());
        }
        held.push(h);
    }
    Ok(held)
}

fn refs<'a>(held: &'a [Held<'_>], arrays: &'a NamedArrays<'_>) -> Vec<ArrayRef<'a>> {
    held.iter()
        .zip(arrays.iter())
        .map(|(h, (name, _))| match h {
            Held::F64(a) => {
                ArrayRef { name, elem: ElemType::F64, shape: a.shape().to_vec(), bytes: bytes_of(a.as_slice().unwrap_or_default()) }
            }
            Held::I64(a) => {
                ArrayRef { name, elem: ElemType::I64, shape: a.shape().to_vec(), bytes: bytes_of(a.as_slice().unwrap_or_default()) }
            }
        })
        .collect()
}

/// save_run(path, meta_json, arrays): arrays is a list of (name, C-contiguous float64 or int64 array).
#[pyfunction]
fn save_run(py: Python<'_>, path: PathBuf, meta_json: &str, arrays: NamedArrays<'_>) -> PyResult<()> {
    let held = hold(&arrays)?;
    let refs = refs(&held, &arrays);
    Ok(py.detach(|| runfile::write_atomic(&path, meta_json, &refs))?)
}

/// RunWriter(path, level=1): a run file written block by block (`add`), then `finish(meta_json)`
/// renames it over `path`; `abort()` (or dropping it unfinished) removes the temporary file.
/// Memory stays at one block, whatever the run's length.
#[pyclass(module = "neural_mechanics._native")]
struct RunWriter {
    inner: Option<runfile::Writer>,
}

#[pymethods]
impl RunWriter {
    #[new]
    #[pyo3(signature = (path, level = 1))] // runfile::DEFAULT_LEVEL (a literal, so the signature shows it)
    fn new(path: PathBuf, level: u8) -> PyResult<Self> {
        Ok(RunWriter { inner: Some(runfile::Writer::create(&path, level)?) })
    }

    /// add(arrays): append each (name, array) as the next rows of the array of that name.
    fn add(&mut self, py: Python<'_>, arrays: NamedArrays<'_>) -> PyResult<()> {
        let held = hold(&arrays)?;
        let refs = refs(&held, &arrays);
        let w = self.inner.as_mut().ok_or_else(|| Error::InvalidArgument("RunWriter is already finished".into()))?;
        py.detach(|| refs.iter().try_for_each(|r| w.add(r)))?;
        Ok(())
    }

    fn finish(&mut self, py: Python<'_>, meta_json: &str) -> PyResult<()> {
        let w = self.inner.take().ok_or_else(|| Error::InvalidArgument("RunWriter is already finished".into()))?;
        Ok(py.detach(|| w.finish(meta_json))?)
    }

    fn abort(&mut self) {
        self.inner = None;
    }
}

fn bytes_of<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: f64 and i64 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

/// load_run(path) -> (meta_json, [(name, array)]).
#[pyfunction]
fn load_run<'py>(py: Python<'py>, path: PathBuf) -> PyResult<(String, NamedArrays<'py>)> {
    let (meta, arrays) = py.detach(|| runfile::read(&path))?;
    let mut out = Vec::with_capacity(arrays.len());
    for a in arrays {
        // Collected in place (u64 to f64 / i64: same size), handed to numpy without a copy.
        let array = match a.elem {
            ElemType::F64 => PyArray1::from_vec(py, a.words.into_iter().map(f64::from_bits).collect()).into_any(),
            ElemType::I64 => PyArray1::from_vec(py, a.words.into_iter().map(|w| w as i64).collect()).into_any(),
        };
        let shaped = array.call_method1("reshape", (a.shape.clone(),))?;
        out.push((a.name, shaped));
    }
    Ok((meta, out))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RUN_FORMAT_VERSION", runfile::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(save_run, m)?)?;
    m.add_function(wrap_pyfunction!(load_run, m)?)?;
    m.add_class::<RunWriter>()?;
    Ok(())
}
