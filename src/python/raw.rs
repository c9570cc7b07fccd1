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

/// The kernel's items for `specs` (addresses checked), all of one arity.
fn kernel_items(specs: &[RawSpec]) -> Result<Vec<Item<'static>>, Error> {
    let work: Vec<Item<'static>> = specs
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
        .collect::<Result<_, _>>()?;
    if work.windows(2).any(|w| w[0].width() != w[1].width()) {
        return Err(Error::InvalidArgument("all items must carry the same arrays".into()));
    }
    Ok(work)
}

/// Every item's groups in order as one (total groups, sums) float64 array.
fn stacked<'py>(py: Python<'py>, work: &[Item<'_>], outputs: Vec<Vec<f64>>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let width = work.first().map(|i| i.width()).unwrap_or(2);
    let rows: usize = work.iter().map(|i| i.layout.groups).sum();
    let flat: Vec<f64> = outputs.into_iter().flatten().collect();
    let array = Array2::from_shape_vec((rows, width), flat).map_err(|e| to_pyerr(py, Error::Shape(e.to_string())))?;
    Ok(array.into_pyarray(py))
}

/// group_stats_ptrs(items) -> float64 array (total groups, sums): every item's groups in order.
/// All items must carry the same arrays (θ; θ, ĝ; or θ, ĝ, v).
#[pyfunction]
fn group_stats_ptrs<'py>(py: Python<'py>, items: Vec<RawSpec>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let work = kernel_items(&items).map_err(|e| to_pyerr(py, e))?;
    let outputs = py.detach(|| stats::group_stats_batch(&work)).map_err(|e| to_pyerr(py, e))?;
    stacked(py, &work, outputs)
}

/// reduce_ptrs(main, extra) -> (main sums, extra sums or None): the tracker's one reduction per
/// step, two blocks (e.g. (θ, ĝ, b) of every reduction and plain sums of b where a translation
/// needs ⟨1, b⟩) in one kernel call and one GIL release.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn reduce_ptrs<'py>(
    py: Python<'py>,
    main: Vec<RawSpec>,
    extra: Vec<RawSpec>,
) -> PyResult<(Bound<'py, PyArray2<f64>>, Option<Bound<'py, PyArray2<f64>>>)> {
    let (main_items, extra_items) = (kernel_items(&main).map_err(|e| to_pyerr(py, e))?, kernel_items(&extra).map_err(|e| to_pyerr(py, e))?);
    let all: Vec<Item<'static>> = main_items.iter().chain(&extra_items).copied().collect();
    let mut outputs = py.detach(|| stats::group_stats_batch(&all)).map_err(|e| to_pyerr(py, e))?;
    let extra_out = outputs.split_off(main_items.len());
    let main_array = stacked(py, &main_items, outputs)?;
    let extra_array = if extra_items.is_empty() { None } else { Some(stacked(py, &extra_items, extra_out)?) };
    Ok((main_array, extra_array))
}

/// layout(shape, axis, block) -> (outer, groups, seg): the kernel's view of a C-contiguous tensor.
#[pyfunction]
fn layout(shape: Vec<usize>, axis: usize, block: usize) -> PyResult<(usize, usize, usize)> {
    let l = Layout::from_shape(&shape, axis, block)?;
    Ok((l.outer, l.groups, l.seg))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    let codes = pyo3::types::PyDict::new(m.py());
    for (name, code) in [("float32", 0u8), ("float64", 1), ("float16", 2), ("bfloat16", 3)] {
        codes.set_item(name, code)?;
    }
    m.add("DTYPE_CODES", codes)?;
    m.add_function(wrap_pyfunction!(group_stats_ptrs, m)?)?;
    m.add_function(wrap_pyfunction!(reduce_ptrs, m)?)?;
    Ok(())
}
