//! The tracker's per-step entry point: tensors passed by address, not as numpy arrays.
//!
//! Building numpy views of a few dozen torch tensors every step costs more than reducing them
//! (tens of microseconds each, against a budget of a millisecond per step on small networks).
//! The tracker already holds the tensors, knows their layouts from its plan and checked them, so
//! it passes (address, element count, layout, dtype) and this function reads the memory directly.
//!
//! Contract of this private function (neural_mechanics.tracking.reducers is its only caller):
//! every address points to live, C-contiguous CPU memory of `numel` elements of the given dtype
//! that no other thread writes during the call. Addresses are checked for null and alignment.

use super::to_pyerr;
use crate::error::Error;
use crate::stats::{self, Data, Item, Layout};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;

/// (theta, grad or 0, velocity or 0, numel, outer, groups, seg, dtype: 0 f32, 1 f64, 2 f16, 3 bf16)
type RawSpec = (usize, usize, usize, usize, usize, usize, usize, u8);

fn data<'a>(addr: usize, numel: usize, dtype: u8) -> Result<Data<'a>, Error> {
    let (size, name) = match dtype {
        0 => (4, "float32"),
        1 => (8, "float64"),
        2 | 3 => (2, "16-bit"),
        _ => return Err(Error::DType(format!("unknown dtype code {dtype}"))),
    };
    if numel == 0 {
        return Ok(match dtype {
            0 => Data::F32(&[]),
            1 => Data::F64(&[]),
            2 => Data::F16(&[]),
            _ => Data::BF16(&[]),
        });
    }
    if addr == 0 || addr % size != 0 {
        return Err(Error::InvalidArgument(format!("bad {name} address {addr:#x}")));
    }
    // SAFETY: the caller's contract (module documentation): live, contiguous, not written meanwhile.
    unsafe {
        Ok(match dtype {
            0 => Data::F32(std::slice::from_raw_parts(addr as *const f32, numel)),
            1 => Data::F64(std::slice::from_raw_parts(addr as *const f64, numel)),
            2 => Data::F16(std::slice::from_raw_parts(addr as *const half::f16, numel)),
            _ => Data::BF16(std::slice::from_raw_parts(addr as *const u16, numel)),
        })
    }
}

/// group_stats_ptrs(items) -> float64 array (total groups, sums): every item's groups in order.
/// All items must carry the same arrays (θ; θ, ĝ; or θ, ĝ, v).
#[pyfunction]
fn group_stats_ptrs<'py>(py: Python<'py>, items: Vec<RawSpec>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let build = || -> Result<Vec<Item<'static>>, Error> {
        items
            .iter()
            .map(|&(t, g, v, numel, outer, groups, seg, dtype)| {
                let layout = Layout { outer, groups, seg };
                if layout.len() != numel {
                    return Err(Error::Shape(format!("layout {layout:?} does not cover {numel} elements")));
                }
                Ok(Item {
                    theta: data(t, numel, dtype)?,
                    grad: if g != 0 { Some(data(g, numel, dtype)?) } else { None },
                    velocity: if v != 0 { Some(data(v, numel, dtype)?) } else { None },
                    layout,
                })
            })
            .collect()
    };
    let work = build().map_err(|e| to_pyerr(py, e))?;
    let width = work.first().map(|i| i.width()).unwrap_or(2);
    if work.iter().any(|i| i.width() != width) {
        return Err(to_pyerr(py, Error::InvalidArgument("all items must carry the same arrays".into())));
    }
    let outputs = py.detach(|| stats::group_stats_batch(&work)).map_err(|e| to_pyerr(py, e))?;
    let rows: usize = work.iter().map(|i| i.layout.groups).sum();
    let flat: Vec<f64> = outputs.into_iter().flatten().collect();
    let array = Array2::from_shape_vec((rows, width), flat).map_err(|e| to_pyerr(py, Error::Shape(e.to_string())))?;
    Ok(array.into_pyarray(py))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_stats_ptrs, m)?)?;
    Ok(())
}
