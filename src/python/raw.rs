//! The tracker's per-step entry point: tensors passed by address, not as numpy arrays.
//!
//! Building numpy views of a few dozen torch tensors every step costs more than reducing them
//! (tens of microseconds each, against a budget of a millisecond per step on small networks).
//! The tracker already holds the tensors, knows their layouts from its plan and checked them, so
//! it passes (address, element count, layout, dtype code) and this function reads the memory
//! directly. The dtype codes are those of `stats::DType`, exported as `_native.DTYPE_CODES`.
//!
//! Contract of this private function (neural_mechanics.tracking.reducers is its only caller):
//! every address points to live, C-contiguous CPU memory of `numel` elements of the given dtype
//! that no other thread writes during the call. Addresses are checked for null and alignment.

use super::array2;
use crate::error::Error;
use crate::stats::{self, AdamHyper, AdamParam, DType, Data, Item, Layout};
use numpy::PyArray2;
use pyo3::prelude::*;

/// (theta, grad or 0, velocity or 0, numel, outer, groups, seg, dtype code)
type RawSpec = (usize, usize, usize, usize, usize, usize, usize, u8);

fn data<'a>(addr: usize, numel: usize, code: u8) -> Result<Data<'a>, Error> {
    let dtype = DType::from_code(code).ok_or_else(|| Error::DType(format!("unknown dtype code {code}")))?;
    if numel == 0 {
        return Ok(match dtype {
            DType::F32 => Data::F32(&[]),
            DType::F64 => Data::F64(&[]),
            DType::F16 => Data::F16(&[]),
            DType::BF16 => Data::BF16(&[]),
        });
    }
    if addr == 0 || !addr.is_multiple_of(dtype.size()) {
        return Err(Error::InvalidArgument(format!("bad {} address {addr:#x}", dtype.name())));
    }
    // SAFETY: the caller's contract (module documentation): live, contiguous, not written
    // meanwhile; the address is non-null and aligned for the dtype (checked just above).
    unsafe {
        Ok(match dtype {
            DType::F32 => Data::F32(std::slice::from_raw_parts(addr as *const f32, numel)),
            DType::F64 => Data::F64(std::slice::from_raw_parts(addr as *const f64, numel)),
            DType::F16 => Data::F16(std::slice::from_raw_parts(addr as *const half::f16, numel)),
            DType::BF16 => Data::BF16(std::slice::from_raw_parts(addr as *const u16, numel)),
        })
    }
}

fn item(&(t, g, v, numel, outer, groups, seg, dtype): &RawSpec) -> Result<Item<'static>, Error> {
    let layout = Layout { outer, groups, seg };
    if layout.len() != numel {
        return Err(Error::Shape(format!("layout {layout:?} does not cover {numel} elements")));
    }
    let optional = |addr: usize| if addr != 0 { data(addr, numel, dtype).map(Some) } else { Ok(None) };
    Ok(Item { theta: data(t, numel, dtype)?, grad: optional(g)?, velocity: optional(v)?, layout })
}

/// The kernel's items for `specs`, all of one arity.
fn items_of(specs: &[RawSpec]) -> Result<Vec<Item<'static>>, Error> {
    let work = specs.iter().map(item).collect::<Result<Vec<_>, _>>()?;
    if work.windows(2).any(|w| w[0].width() != w[1].width()) {
        return Err(Error::InvalidArgument("all items must carry the same arrays".into()));
    }
    Ok(work)
}

/// Every item's groups in order, as one (total groups, sums) float64 array.
fn stacked<'py>(py: Python<'py>, work: &[Item<'_>], outputs: Vec<Vec<f64>>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let width = work.first().map(|i| i.width()).unwrap_or(2);
    let rows: usize = work.iter().map(|i| i.layout.groups).sum();
    array2(py, outputs.into_iter().flatten().collect(), rows, width)
}

/// group_stats_ptrs(items) -> float64 array (total groups, sums): every item's groups in order.
/// All items must carry the same arrays (θ; θ, ĝ; or θ, ĝ, v).
#[pyfunction]
fn group_stats_ptrs<'py>(py: Python<'py>, items: Vec<RawSpec>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let work = items_of(&items)?;
    let outputs = py.detach(|| stats::group_stats_batch(&work))?;
    stacked(py, &work, outputs)
}

/// The two blocks of [`reduce_ptrs`].
type Blocks<'py> = (Bound<'py, PyArray2<f64>>, Option<Bound<'py, PyArray2<f64>>>);

/// reduce_ptrs(main, extra) -> (main sums, extra sums or None): the tracker's one reduction per
/// step, two blocks (e.g. (θ, ĝ, b) of every reduction and plain sums of b where a translation
/// needs ⟨1, b⟩) in one kernel call and one GIL release.
#[pyfunction]
fn reduce_ptrs<'py>(py: Python<'py>, main: Vec<RawSpec>, extra: Vec<RawSpec>) -> PyResult<Blocks<'py>> {
    let (main_items, extra_items) = (items_of(&main)?, items_of(&extra)?);
    let all: Vec<Item<'static>> = main_items.iter().chain(&extra_items).copied().collect();
    let mut outputs = py.detach(|| stats::group_stats_batch(&all))?;
    let extra_out = outputs.split_off(main_items.len());
    let extra_array = if extra_items.is_empty() { None } else { Some(stacked(py, &extra_items, extra_out)?) };
    Ok((stacked(py, &main_items, outputs)?, extra_array))
}

/// (theta, grad or 0 (no gradient: no update), exp_avg or 0, exp_avg_sq or 0, max_exp_avg_sq or
/// 0, numel, dtype code): one parameter as torch's Adam holds it (0: state not created yet).
type AdamTensors = (usize, usize, usize, usize, usize, usize, u8);
/// (step_size, √(1 − β2^t), eps, beta1, beta2, coupled weight decay, lr·decoupled weight decay,
/// maximize, amsgrad): see `stats::AdamHyper`.
type AdamConstants = (f64, f64, f64, f64, f64, f64, f64, bool, bool);
/// (parameter index, element offset, numel, outer, groups, seg): a reduction of a parameter's
/// (θ, ĝ, d) (main) or of its d alone (extra).
type AdamReduction = (usize, usize, usize, usize, usize, usize);

fn adam_param(i: usize, &((t, g, m, v, vmax, numel, code), c): &(AdamTensors, AdamConstants)) -> Result<AdamParam<'static>, Error> {
    let dtype = DType::from_code(code).ok_or_else(|| Error::DType(format!("unknown dtype code {code}")))?;
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::DType(format!("parameter {i}: the Adam path reads float32 or float64, got {}", dtype.name())));
    }
    let optional = |addr: usize| if addr != 0 { data(addr, numel, code).map(Some) } else { Ok(None) };
    let hyper = AdamHyper {
        step_size: c.0,
        bias2_sqrt: c.1,
        eps: c.2,
        beta1: c.3,
        beta2: c.4,
        coupled_decay: c.5,
        decoupled_decay: c.6,
        maximize: c.7,
        amsgrad: c.8,
    };
    if hyper.amsgrad && m != 0 && vmax == 0 {
        return Err(Error::InvalidArgument(format!("parameter {i}: amsgrad needs max_exp_avg_sq once the state exists")));
    }
    Ok(AdamParam {
        theta: data(t, numel, code)?,
        grad: optional(g)?,
        exp_avg: optional(m)?,
        exp_avg_sq: optional(v)?,
        max_exp_avg_sq: if hyper.amsgrad { optional(vmax)? } else { None },
        hyper,
    })
}

/// The (θ, ĝ, d) items (`with_grad`) or d items of `reductions`, reading the updates `d`.
fn adam_items<'a>(
    params: &[AdamParam<'a>],
    d: &'a [stats::Update],
    reductions: &[AdamReduction],
    with_grad: bool,
) -> Result<Vec<Item<'a>>, Error> {
    let mut out = Vec::with_capacity(reductions.len());
    for (r, &(pi, offset, numel, outer, groups, seg)) in reductions.iter().enumerate() {
        let p = params.get(pi).ok_or_else(|| Error::InvalidArgument(format!("reduction {r}: no parameter {pi}")))?;
        if offset.checked_add(numel).is_none_or(|end| end > p.theta.len()) {
            return Err(Error::Shape(format!("reduction {r}: elements {offset}..+{numel} outside parameter {pi} of {}", p.theta.len())));
        }
        let layout = Layout { outer, groups, seg };
        if layout.len() != numel {
            return Err(Error::Shape(format!("reduction {r}: layout {layout:?} does not cover {numel} elements")));
        }
        let update = d[pi].data(offset, numel);
        out.push(if with_grad {
            // A parameter without a gradient: its update is 0, and ĝ is read as zeros.
            let grad = p.grad.map(|g| g.slice(offset, offset + numel)).unwrap_or(update);
            Item { theta: p.theta.slice(offset, offset + numel), grad: Some(grad), velocity: Some(update), layout }
        } else {
            Item { theta: update, grad: None, velocity: None, layout }
        });
    }
    Ok(out)
}

/// reduce_adam_ptrs(params, main, extra) -> (main sums, extra sums or None): the Adam path's one
/// native call per step. Computes every parameter's update d from torch's Adam state (see
/// `stats::adam`), then reduces (θ, ĝ, d) for `main` and d alone for `extra`, exactly as
/// [`reduce_ptrs`] reduces (θ, ĝ, d) handed in by the snapshot path; one GIL release.
#[pyfunction]
fn reduce_adam_ptrs<'py>(
    py: Python<'py>,
    params: Vec<(AdamTensors, AdamConstants)>,
    main: Vec<AdamReduction>,
    extra: Vec<AdamReduction>,
) -> PyResult<Blocks<'py>> {
    let params = params.iter().enumerate().map(|(i, p)| adam_param(i, p)).collect::<Result<Vec<_>, _>>()?;
    let (outputs, n_main, main_groups, extra_groups) = py.detach(|| -> Result<_, Error> {
        let d = stats::adam_updates(&params)?;
        let main_items = adam_items(&params, &d, &main, true)?;
        let extra_items = adam_items(&params, &d, &extra, false)?;
        let groups = |items: &[Item<'_>]| items.iter().map(|i| i.layout.groups).sum::<usize>();
        let (mg, eg) = (groups(&main_items), groups(&extra_items));
        let n_main = main_items.len();
        let all: Vec<Item<'_>> = main_items.into_iter().chain(extra_items).collect();
        Ok((stats::group_stats_batch(&all)?, n_main, mg, eg))
    })?;
    let mut outputs = outputs;
    let extra_out: Vec<f64> = outputs.split_off(n_main).into_iter().flatten().collect();
    let extra_array = if extra.is_empty() { None } else { Some(array2(py, extra_out, extra_groups, 2)?) };
    Ok((array2(py, outputs.into_iter().flatten().collect(), main_groups, 8)?, extra_array))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_stats_ptrs, m)?)?;
    m.add_function(wrap_pyfunction!(reduce_ptrs, m)?)?;
    m.add_function(wrap_pyfunction!(reduce_adam_ptrs, m)?)?;
    Ok(())
}
