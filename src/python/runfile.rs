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

/// save_run(path, meta_json, arrays): arrays is a list of (name, C-contiguous float64 or int64 array).
#[pyfunction]
fn save_run(py: Python<'_>, path: PathBuf, meta_json: &str, arrays: NamedArrays<'_>) -> PyResult<()> {
    let mut held = Vec::with_capacity(arrays.len());
    for (name, obj) in &arrays {
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
    let refs: Vec<ArrayRef<'_>> = held
        .iter()
        .zip(&arrays)
        .map(|(h, (name, _))| match h {
            Held::F64(a) => {
                ArrayRef { name, elem: ElemType::F64, shape: a.shape().to_vec(), bytes: bytes_of(a.as_slice().unwrap_or_default()) }
            }
            Held::I64(a) => {
                ArrayRef { name, elem: ElemType::I64, shape: a.shape().to_vec(), bytes: bytes_of(a.as_slice().unwrap_or_default()) }
            }
        })
        .collect();
    Ok(py.detach(|| runfile::write_atomic(&path, meta_json, &refs))?)
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
        let words = a.bytes.chunks_exact(8).map(|w| <[u8; 8]>::try_from(w).unwrap_or([0; 8]));
        let array = match a.elem {
            ElemType::F64 => PyArray1::from_iter(py, words.map(f64::from_le_bytes)).into_any(),
            ElemType::I64 => PyArray1::from_iter(py, words.map(i64::from_le_bytes)).into_any(),
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
    Ok(())
}
