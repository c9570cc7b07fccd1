//! The update torch.optim.Adam / AdamW is about to apply, computed before the step from what the
//! optimizer holds (docs/theory.md §5.3 for why the tracker wants it before the step).
//!
//! For one element, with ĝ the gradient, m, v (and v̂max under amsgrad) the optimizer's state
//! before the step, t = step + 1 and everything in float64:
//!
//!   g  = ±ĝ (− under maximize) + λ_c·θ            (λ_c: coupled weight decay, Adam's L2)
//!   m' = β1·m + (1 − β1)·g,   v' = β2·v + (1 − β2)·g²,   v' ← max(v̂max, v') under amsgrad
//!   d  = λ_d·θ + s·m' / (√v' / c2 + ε)            (s = lr / (1 − β1^t), c2 = √(1 − β2^t),
//!                                                    λ_d = lr·wd for decoupled weight decay)
//!
//! so that θ_{n+1} = θ_n − d_n, the form torch's single-tensor, foreach and fused
//! implementations all compute (each in its own order of float32 operations; d here is the
//! float64 value they round). The tracker then reduces (θ, ĝ, d) with the ordinary kernels:
//! [`adam_updates`] writes d into buffers of θ's dtype, in parallel, in one native call with
//! the reduction (`_native.reduce_adam_ptrs`), so θ_n is never copied.

use super::input::Data;
use crate::error::{Error, Result};
use crate::pool;
use rayon::prelude::*;

/// One param_group's constants at this step (the bias corrections already folded in).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    /// s = lr / (1 − β1^t)
    pub step_size: f64,
    /// c2 = √(1 − β2^t)
    pub bias2_sqrt: f64,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// λ_c, added to the gradient (Adam's coupled weight decay; 0 when decoupled)
    pub coupled_decay: f64,
    /// λ_d = lr·wd, θ's own shrink factor (AdamW; 0 when coupled)
    pub decoupled_decay: f64,
    pub maximize: bool,
    pub amsgrad: bool,
}

/// One parameter as the optimizer holds it. `exp_avg` / `exp_avg_sq` are None before the
/// parameter's first step (torch creates them zero then); `grad` None: the optimizer skips the
/// parameter at this step (no gradient), so its update is 0.
#[derive(Clone, Copy, Debug)]
pub struct AdamParam<'a> {
    pub theta: Data<'a>,
    pub grad: Option<Data<'a>>,
    pub exp_avg: Option<Data<'a>>,
    pub exp_avg_sq: Option<Data<'a>>,
    pub max_exp_avg_sq: Option<Data<'a>>,
    pub hyper: AdamHyper,
}

/// A parameter's update, in θ's dtype.
#[derive(Debug)]
pub enum Update {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Update {
    /// Elements [start, start + len) as kernel input.
    pub fn data(&self, start: usize, len: usize) -> Data<'_> {
        match self {
            Update::F32(d) => Data::F32(&d[start..start + len]),
            Update::F64(d) => Data::F64(&d[start..start + len]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Update::F32(d) => d.len(),
            Update::F64(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AdamParam<'_> {
    /// Everything the formula needs, of one dtype (float32 or float64) and one length.
    fn validate(&self, i: usize) -> Result<()> {
        let n = self.theta.len();
        let dtype = self.theta.dtype();
        if !matches!(self.theta, Data::F32(_) | Data::F64(_)) {
            return Err(Error::DType(format!("parameter {i}: the Adam path reads float32 or float64, got {}", dtype.name())));
        }
        let named =
            [("grad", self.grad), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq), ("max_exp_avg_sq", self.max_exp_avg_sq)];
        for (name, d) in named {
            if let Some(d) = d {
                if d.dtype() != dtype {
                    return Err(Error::DType(format!("parameter {i}: {name} is {}, the parameter {}", d.dtype_name(), dtype.name())));
                }
                if d.len() != n {
                    return Err(Error::Shape(format!("parameter {i}: {name} holds {} elements, the parameter {n}", d.len())));
                }
            }
        }
        if self.exp_avg.is_some() != self.exp_avg_sq.is_some() {
            return Err(Error::InvalidArgument(format!(
                "parameter {i}: exp_avg and exp_avg_sq must be given together (both None before the first step)"
            )));
        }
        let h = &self.hyper;
        let finite = [h.step_size, h.bias2_sqrt, h.eps, h.beta1, h.beta2, h.coupled_decay, h.decoupled_decay];
        if finite.iter().any(|x| !x.is_finite()) || h.bias2_sqrt <= 0.0 {
            return Err(Error::InvalidArgument(format!("parameter {i}: Adam constants must be finite (and √(1 − β2^t) > 0), got {h:?}")));
        }
        Ok(())
    }
}

/// The element types the update is written in.
trait UpdateFloat: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn slice<'a>(d: Data<'a>) -> &'a [Self];
}

impl UpdateFloat for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn slice<'a>(d: Data<'a>) -> &'a [f32] {
        match d {
            Data::F32(s) => s,
            _ => unreachable!("dtypes were validated to match"),
        }
    }
}

impl UpdateFloat for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn slice<'a>(d: Data<'a>) -> &'a [f64] {
        match d {
            Data::F64(s) => s,
            _ => unreachable!("dtypes were validated to match"),
        }
    }
}

/// d for elements [start, start + out.len()) of `p` (the formula of the module documentation).
fn update_range<'a, E: UpdateFloat>(p: &AdamParam<'a>, start: usize, out: &mut [E]) {
    let end = start + out.len();
    let Some(grad) = p.grad else {
        out.iter_mut().for_each(|d| *d = E::from_f64(0.0));
        return;
    };
    let range = |d: Data<'a>| -> &'a [E] { &E::slice(d)[start..end] };
    let arrays = [Some(p.theta), Some(grad), p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq].map(|d| d.map_or(&[][..], range));
    // Before the first step (no state) m = v = 0, and max(0, v') = v': one loop body per case,
    // each without a branch, so that the compiler vectorizes it.
    let started = p.exp_avg.is_some();
    let amsgrad = started && p.hyper.amsgrad && p.max_exp_avg_sq.is_some();
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx512() {
        // SAFETY: the CPU supports AVX-512F (checked at run time just above).
        unsafe {
            match (started, amsgrad) {
                (false, _) => body_avx512::<E, false, false>(arrays, &p.hyper, out),
                (true, false) => body_avx512::<E, true, false>(arrays, &p.hyper, out),
                (true, true) => body_avx512::<E, true, true>(arrays, &p.hyper, out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe {
            match (started, amsgrad) {
                (false, _) => body_avx2::<E, false, false>(arrays, &p.hyper, out),
                (true, false) => body_avx2::<E, true, false>(arrays, &p.hyper, out),
                (true, true) => body_avx2::<E, true, true>(arrays, &p.hyper, out),
            }
        }
        return;
    }
    match (started, amsgrad) {
        (false, _) => body::<E, false, false>(arrays, &p.hyper, out),
        (true, false) => body::<E, true, false>(arrays, &p.hyper, out),
        (true, true) => body::<E, true, true>(arrays, &p.hyper, out),
    }
}

/// [`body`] compiled for AVX2 and FMA (wheels target generic x86-64: four float64 lanes of
/// sqrt and division instead of two).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn body_avx2<E: UpdateFloat, const STARTED: bool, const AMSGRAD: bool>(arrays: [&[E]; 5], h: &AdamHyper, out: &mut [E]) {
    body::<E, STARTED, AMSGRAD>(arrays, h, out)
}

/// [`body`] compiled for AVX-512F: eight float64 lanes (the loop is bound by sqrt and division).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn body_avx512<E: UpdateFloat, const STARTED: bool, const AMSGRAD: bool>(arrays: [&[E]; 5], h: &AdamHyper, out: &mut [E]) {
    body::<E, STARTED, AMSGRAD>(arrays, h, out)
}

/// The loop over one range: `arrays` = (θ, ĝ, m, v, v̂max), the state ones read only if
/// STARTED (and v̂max if AMSGRAD), each at least as long as `out`.
#[inline(always)]
fn body<E: UpdateFloat, const STARTED: bool, const AMSGRAD: bool>(arrays: [&[E]; 5], h: &AdamHyper, out: &mut [E]) {
    let n = out.len();
    let [theta, grad, m, v, vmax] = arrays;
    let (theta, grad) = (&theta[..n], &grad[..n]);
    let (m, v) = if STARTED { (&m[..n], &v[..n]) } else { (m, v) };
    let vmax = if AMSGRAD { &vmax[..n] } else { vmax };
    let sign = if h.maximize { -1.0 } else { 1.0 };
    let (b1, b2, c1, c2) = (h.beta1, h.beta2, 1.0 - h.beta1, 1.0 - h.beta2);
    let inv_bias2 = 1.0 / h.bias2_sqrt;
    for j in 0..n {
        let th = theta[j].to_f64();
        let g = sign * grad[j].to_f64() + h.coupled_decay * th;
        let (m0, v0) = if STARTED { (m[j].to_f64(), v[j].to_f64()) } else { (0.0, 0.0) };
        let m1 = b1 * m0 + c1 * g;
        let mut v1 = b2 * v0 + c2 * g * g;
        if AMSGRAD {
            let x = vmax[j].to_f64();
            v1 = if x > v1 { x } else { v1 };
        }
        out[j] = E::from_f64(h.decoupled_decay * th + h.step_size * m1 / (v1.sqrt() * inv_bias2 + h.eps));
    }
}

/// Elements per piece of work, and the least elements in a call worth waking the pool for: far
/// fewer than the reductions' (plan.rs), since this loop costs a square root and a division per
/// element rather than a memory read.
const PIECE_ELEMS: usize = 1 << 13;
const PARALLEL_MIN_ELEMS: usize = 1 << 14;

/// One piece of work: elements [start, start + out.len()) of parameter `param`.
struct Piece<'o, E> {
    param: usize,
    start: usize,
    out: &'o mut [E],
}

/// Every parameter's update d (θ_{n+1} = θ_n − d), in θ's dtype: pieces of at most PIECE_ELEMS
/// elements, on the pool when the call is large enough (each element is independent, so the
/// result does not depend on the thread count).
pub fn adam_updates(params: &[AdamParam<'_>]) -> Result<Vec<Update>> {
    for (i, p) in params.iter().enumerate() {
        p.validate(i)?;
    }
    let mut outs: Vec<Update> = Vec::with_capacity(params.len());
    for p in params {
        let n = p.theta.len();
        outs.push(match p.theta {
            Data::F64(_) => Update::F64(alloc(n)?),
            _ => Update::F32(alloc(n)?),
        });
    }
    let mut f32_pieces = Vec::new();
    let mut f64_pieces = Vec::new();
    for (param, out) in outs.iter_mut().enumerate() {
        match out {
            Update::F32(d) => {
                f32_pieces.extend(d.chunks_mut(PIECE_ELEMS).enumerate().map(|(c, out)| Piece { param, start: c * PIECE_ELEMS, out }))
            }
            Update::F64(d) => {
                f64_pieces.extend(d.chunks_mut(PIECE_ELEMS).enumerate().map(|(c, out)| Piece { param, start: c * PIECE_ELEMS, out }))
            }
        }
    }
    let total: usize = params.iter().map(|p| p.theta.len()).sum();
    let threads = pool::num_threads()?;
    if threads == 1 || total < PARALLEL_MIN_ELEMS || f32_pieces.len() + f64_pieces.len() < 2 {
        f32_pieces.iter_mut().for_each(|w| update_range(&params[w.param], w.start, w.out));
        f64_pieces.iter_mut().for_each(|w| update_range(&params[w.param], w.start, w.out));
    } else {
        pool::pool()?.install(|| {
            f32_pieces.par_iter_mut().for_each(|w| update_range(&params[w.param], w.start, w.out));
            f64_pieces.par_iter_mut().for_each(|w| update_range(&params[w.param], w.start, w.out));
        });
    }
    Ok(outs)
}

/// `n` zeros of E, or an error naming the size the allocator refused.
fn alloc<E: Clone + Default>(n: usize) -> Result<Vec<E>> {
    let mut v: Vec<E> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::InvalidArgument(format!(
            "cannot allocate the update of {n} elements ({})",
            super::fmt_bytes((n * std::mem::size_of::<E>()) as f64)
        ))
    })?;
    v.resize(n, E::default());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper() -> AdamHyper {
        AdamHyper {
            step_size: 0.01,
            bias2_sqrt: 0.5,
            eps: 1e-8,
            beta1: 0.9,
            beta2: 0.99,
            coupled_decay: 0.0,
            decoupled_decay: 0.0,
            maximize: false,
            amsgrad: false,
        }
    }

    #[test]
    fn first_step_moves_each_element_by_about_the_step_size() {
        // With m = v = 0, m' = (1−β1)g and √v' = √(1−β2)|g|: d = s·(1−β1)/√(1−β2)·c2·sign(g).
        let theta = [1.0f64, -2.0, 3.0];
        let grad = [0.5f64, -0.25, 2.0];
        let h = AdamHyper { eps: 0.0, ..hyper() }; // ε would shift d by ~1e-7 relative
        let p = AdamParam {
            theta: Data::F64(&theta),
            grad: Some(Data::F64(&grad)),
            exp_avg: None,
            exp_avg_sq: None,
            max_exp_avg_sq: None,
            hyper: h,
        };
        let out = adam_updates(&[p]).unwrap();
        let Update::F64(d) = &out[0] else { panic!("float64 in, float64 out") };
        let expected = h.step_size * (1.0 - h.beta1) / (1.0 - h.beta2).sqrt() * h.bias2_sqrt;
        for (x, g) in d.iter().zip(grad) {
            assert!((x - expected * g.signum()).abs() < 1e-9 * expected, "{x} vs {expected}");
        }
    }

    #[test]
    fn no_gradient_means_no_update() {
        let theta = [1.0f32; 5];
        let p = AdamParam { theta: Data::F32(&theta), grad: None, exp_avg: None, exp_avg_sq: None, max_exp_avg_sq: None, hyper: hyper() };
        let Update::F32(d) = &adam_updates(&[p]).unwrap()[0] else { panic!("float32 in, float32 out") };
        assert!(d.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn mismatched_state_is_an_error() {
        let theta = [1.0f32; 4];
        let grad = [1.0f32; 3];
        let p = AdamParam {
            theta: Data::F32(&theta),
            grad: Some(Data::F32(&grad)),
            exp_avg: None,
            exp_avg_sq: None,
            max_exp_avg_sq: None,
            hyper: hyper(),
        };
        assert!(matches!(adam_updates(&[p]), Err(Error::Shape(_))));
    }
}
