//! Bindings of `crate::stats` and the thread pool, and the constants of their contract with
//! the Python layer (SUM_NAMES, DTYPE_CODES, MAX_THREADS, `layout`): defined in Rust, read by
//! Python, so neither side keeps its own copy.

use super::array2;
use crate::error::Error;
use crate::pool;
use crate::stats::{self, DType, Data, Item, Layout, Sums};
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A borrowed, read-only numpy array of one of the element types the kernels read.
enum Held<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
    /// bfloat16 carried as its bits in a uint16 array (numpy has no bfloat16).
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> Held<'py> {
    fn take(obj: &Bound<'py, PyAny>, bf16: bool, what: &str) -> Result<Self, Error> {
        let held = if bf16 {
            obj.extract::<PyReadonlyArrayDyn<u16>>().ok().map(Held::BF16)
        } else if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<f32>>() {
            Some(Held::F32(a))
        } else if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<f64>>() {
            Some(Held::F64(a))
        } else {
            obj.extract::<PyReadonlyArrayDyn<half::f16>>().ok().map(Held::F16)
        };
        let held = held.ok_or_else(|| {
            let found = obj.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| obj.get_type().to_string());
            Error::DType(format!("{what}: unsupported dtype {found}; expected float32, float64, float16 or bfloat16"))
        })?;
        let contiguous = match &held {
            Held::F32(a) => a.is_c_contiguous(),
            Held::F64(a) => a.is_c_contiguous(),
            Held::F16(a) => a.is_c_contiguous(),
            Held::BF16(a) => a.is_c_contiguous(),
        };
        let (addr, align) = match &held {
            Held::F32(a) => (a.data() as usize, 4),
            Held::F64(a) => (a.data() as usize, 8),
            Held::F16(a) => (a.data() as usize, 2),
            Held::BF16(a) => (a.data() as usize, 2),
        };
        if addr % align != 0 {
            // A slice of misaligned elements is undefined behaviour in Rust: refuse it.
            return Err(Error::Shape(format!(
                "{what} is not aligned in memory for its dtype; pass an aligned copy (np.require(x, requirements='CA'))"
            )));
        }
        if !contiguous {
            // as_slice() also accepts Fortran order, whose rows are not our rows: refuse.
            return Err(Error::Shape(format!(
                "{what} is not C-contiguous; pass a contiguous copy (tensor.contiguous() / np.ascontiguousarray)"
            )));
        }
        Ok(held)
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Held::F32(a) => a.shape().to_vec(),
            Held::F64(a) => a.shape().to_vec(),
            Held::F16(a) => a.shape().to_vec(),
            Held::BF16(a) => a.shape().to_vec(),
        }
    }

    fn data(&self) -> Data<'_> {
        // Contiguity was checked in `take`, so as_slice cannot fail here.
        match self {
            Held::F32(a) => Data::F32(a.as_slice().unwrap_or_default()),
            Held::F64(a) => Data::F64(a.as_slice().unwrap_or_default()),
            Held::F16(a) => Data::F16(a.as_slice().unwrap_or_default()),
            Held::BF16(a) => Data::BF16(a.as_slice().unwrap_or_default()),
        }
    }
}

type ItemSpec<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>, usize, usize, bool);

/// group_stats_batch(items, check_finite=True)
/// --
///
/// items: a list of (theta, grad or None, velocity or None, axis, block, is_bfloat16).
/// Returns one float64 array of shape (groups, sums) per item, sums in the order of SUM_NAMES.
/// The arrays must not be modified by another thread while the call runs (the GIL is released).
#[pyfunction]
#[pyo3(signature = (items, check_finite = true))]
fn group_stats_batch<'py>(py: Python<'py>, items: Vec<ItemSpec<'py>>, check_finite: bool) -> PyResult<Vec<Bound<'py, PyArray2<f64>>>> {
    let mut held = Vec::with_capacity(items.len());
    let mut layouts = Vec::with_capacity(items.len());
    for (i, (theta, grad, velocity, axis, block, bf16)) in items.iter().enumerate() {
        let take = |obj: &Bound<'py, PyAny>, name: &str| Held::take(obj, *bf16, &format!("tensor {i}: {name}"));
        let t = take(theta, "theta")?;
        let g = grad.as_ref().map(|a| take(a, "grad")).transpose()?;
        let v = velocity.as_ref().map(|a| take(a, "velocity")).transpose()?;
        let shape = t.shape();
        for (name, other) in [("grad", &g), ("velocity", &v)] {
            if let Some(o) = other {
                if o.shape() != shape {
                    return Err(Error::Shape(format!(
                        "tensor {i}: {name} has shape {} but theta has shape {}",
                        stats::fmt_shape(&o.shape()),
                        stats::fmt_shape(&shape)
                    ))
                    .into());
                }
            }
        }
        layouts.push(Layout::from_shape(&shape, *axis, *block)?);
        held.push((t, g, v));
    }
    let work: Vec<Item<'_>> = held
        .iter()
        .zip(&layouts)
        .map(|((t, g, v), layout)| Item {
            theta: t.data(),
            grad: g.as_ref().map(Held::data),
            velocity: v.as_ref().map(Held::data),
            layout: *layout,
        })
        .collect();
    let outputs = py.detach(|| {
        let out = stats::group_stats_batch(&work)?;
        if check_finite {
            stats::check_finite(&work, &out)?;
        }
        Ok::<_, Error>(out)
    })?;
    outputs.into_iter().zip(&work).map(|(out, item)| array2(py, out, item.layout.groups, item.width())).collect()
}

/// read_pass(buffers)
/// --
///
/// Read every byte of each buffer (1-D C-contiguous uint8 arrays, e.g. ``a.reshape(-1).view(np.uint8)``)
/// once, with the same thread pool and task size as group_stats_batch, and return a checksum.
/// The bandwidth limit that benchmarks/bench_stats.py compares the fused kernel with.
#[pyfunction]
fn read_pass(py: Python<'_>, buffers: Vec<PyReadonlyArray1<'_, u8>>) -> PyResult<u64> {
    let mut slices = Vec::with_capacity(buffers.len());
    for (i, b) in buffers.iter().enumerate() {
        let s = b.as_slice().map_err(|_| Error::Shape(format!("buffer {i} is not contiguous")))?;
        slices.push(s);
    }
    Ok(py.detach(|| stats::read_pass(&slices))?)
}

/// Set the size of the private thread pool; 0 restores the default
/// (NEURAL_MECHANICS_NUM_THREADS, else the number of cores).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    Ok(pool::set_num_threads(n)?)
}

/// The number of threads the next parallel call will use.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(pool::num_threads()?)
}

/// layout(shape, axis, block) -> (outer, groups, seg)
/// --
///
/// The view the kernels reduce a C-contiguous tensor of `shape` in, keeping `axis` (0: rows,
/// 1: columns in blocks of `block`): group g is the union over o < outer of the `seg` elements
/// from (o * groups + g) * seg. The errors are those of group_stats_batch.
#[pyfunction]
fn layout(shape: Vec<usize>, axis: usize, block: usize) -> PyResult<(usize, usize, usize)> {
    let Layout { outer, groups, seg } = Layout::from_shape(&shape, axis, block)?;
    Ok((outer, groups, seg))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SUM_NAMES", Sums::NAMES.to_vec())?;
    let codes = PyDict::new(py);
    for dtype in DType::ALL {
        codes.set_item(dtype.name(), dtype.code())?;
    }
    m.add("DTYPE_CODES", codes)?;
    m.add("MAX_THREADS", pool::MAX_THREADS)?;
    m.add("MAX_EMPTY_GROUPS", stats::MAX_EMPTY_GROUPS)?;
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    m.add_function(wrap_pyfunction!(group_stats_batch, m)?)?;
    m.add_function(wrap_pyfunction!(read_pass, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    Ok(())
}
