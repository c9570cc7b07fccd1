//! docs/theory.md §5.3: the exact discrete ledger of `torch.optim.SGD`, and the optimizer-agnostic
//! identity for any optimizer whose update is measured.
//!
//! With u_n the applied update (θ_{n+1} = θ_n − η_n u_n), g_n = λ y_n + s_n (s_n the measured
//! breaking flux ⟨θ_n, ĝ_n⟩, or ⟨1, ĝ_n⟩ for translation) and the buffer b_n:
//!
//! ```text
//!     a_n = ⟨θ_n, b_n⟩  = β_n m_{n−1} + (1−d_n) g_n      (first step, no buffer: a_0 = g_0)
//!     c_n = ⟨θ_n, u_n⟩  = a_n,  or g_n + β_n a_n with nesterov,  or g_n when β_n = 0
//!     y_{n+1} = y_n − 2η_n c_n + η_n² |u_n|²              (translation: y_n − η_n c_n)
//!     m_n = ⟨θ_{n+1}, b_n⟩ = a_n − η_n e_n                (translation: m_n = a_n)
//! ```
//!
//! where e_n = ⟨u_n, b_n⟩ (= |u_n|² without nesterov, measured with it). For translation read
//! ⟨1, ·⟩ for ⟨θ, ·⟩; rescale is the difference of the two sides in every measured input. The
//! one state variable m carried between steps is ⟨θ_{n+1}, b_n⟩ (⟨1, b_n⟩ for translation),
//! which is also what `buffer_dot0` gives when tracking starts on an existing buffer.
//!
//! A step with β = 0 leaves PyTorch's buffer untouched (it is neither read nor written), while θ
//! moves under it: given e_n = ⟨u_n, b⟩ (`update_dot`, measured) the ledger follows
//! m_{n+1} = m_n − η_n e_n (translation: m is unchanged), so momentum switched 0.9 → 0 → 0.9
//! stays exact; without `update_dot` m is kept as is (exact only if no buffer existed yet). A
//! later step with β > 0 uses the first-step rule if no buffer ever existed.

use super::chunks;
use super::{check_finite, check_len, result_buffer, Hyper, Interrupt, Kind, Schedule, Ticker};
use crate::error::{Error, Result};

/// The per-step coefficients of the ledger update (see the module documentation); one set for
/// all groups. Written as products so that one kernel covers every case.
#[derive(Clone, Copy, Debug)]
struct Coeffs {
    lam: f64,
    /// a = am·m + ag·g
    am: f64,
    ag: f64,
    /// c = cg·g + ca·a
    cg: f64,
    ca: f64,
    /// y' = y − ky·c + kq·|u|²
    ky: f64,
    kq: f64,
    /// m' = mm·m + ma·a − me·e
    mm: f64,
    ma: f64,
    me: f64,
}

/// `follow`: with β = 0, move m under the kept buffer by −η e (e = ⟨u_n, b⟩ given).
fn coeffs(kind: Kind, hp: Hyper, nesterov: bool, has_buffer: bool, follow: bool) -> Coeffs {
    let (eta, beta, lam) = (hp.lr, hp.momentum, hp.weight_decay);
    let quad = kind.is_quadratic();
    let (ky, kq) = if quad { (2.0 * eta, eta * eta) } else { (eta, 0.0) };
    if beta == 0.0 {
        // PyTorch: u = ĝ + λθ, dampening ignored, buffer untouched (θ moves under it).
        let me = if quad && follow { eta } else { 0.0 };
        return Coeffs { lam, am: 0.0, ag: 1.0, cg: 0.0, ca: 1.0, ky, kq, mm: 1.0, ma: 0.0, me };
    }
    let (am, ag) = if has_buffer { (beta, 1.0 - hp.dampening) } else { (0.0, 1.0) };
    let (cg, ca) = if nesterov { (1.0, beta) } else { (0.0, 1.0) };
    let me = if quad { eta } else { 0.0 };
    Coeffs { lam, am, ag, cg, ca, ky, kq, mm: 0.0, ma: 1.0, me }
}

/// Streaming state of the ledger.
#[derive(Clone, Debug)]
pub struct LedgerState {
    kind: Kind,
    y: Vec<f64>,
    /// ⟨θ_n, b_{n−1}⟩ (⟨1, b_{n−1}⟩ for translation).
    m: Vec<f64>,
    y_next: Vec<f64>,
    m_next: Vec<f64>,
    has_buffer: bool,
    steps: usize,
}

/// The measured inputs of one ledger step, each (groups,).
#[derive(Clone, Copy, Debug, Default)]
pub struct LedgerInputs<'a> {
    /// s_n = ⟨θ_n, ĝ_n⟩ (scale; rescale: s_A1 − s_A2) or ⟨1, ĝ_n⟩ (translation).
    pub flux: &'a [f64],
    /// |u_n|² (rescale: difference of the sides); required for scale/rescale.
    pub update_sq: Option<&'a [f64]>,
    /// e_n = ⟨u_n, b_n⟩; required with nesterov for scale/rescale.
    pub update_dot: Option<&'a [f64]>,
}

impl LedgerState {
    /// buffer_dot0: ⟨θ_0, b_{−1}⟩ (rescale: difference of the sides; translation ⟨1, b_{−1}⟩)
    /// when the optimizer already holds a momentum buffer; None: the first-step rule.
    pub fn new(kind: Kind, y0: &[f64], buffer_dot0: Option<&[f64]>) -> Result<LedgerState> {
        let groups = y0.len();
        check_finite("y0", y0, groups)?;
        let m = match buffer_dot0 {
            Some(b) => {
                check_len("buffer_dot0", b, 1, groups)?;
                check_finite("buffer_dot0", b, groups)?;
                b.to_vec()
            }
            None => vec![0.0; groups],
        };
        Ok(LedgerState {
            kind,
            y: y0.to_vec(),
            m,
            y_next: vec![0.0; groups],
            m_next: vec![0.0; groups],
            has_buffer: buffer_dot0.is_some(),
            steps: 0,
        })
    }

    pub fn y(&self) -> &[f64] {
        &self.y
    }
    /// ⟨θ_n, b_{n−1}⟩ (meaningful once a buffer exists).
    pub fn buffer_dot(&self) -> &[f64] {
        &self.m
    }
    pub fn steps(&self) -> usize {
        self.steps
    }
    pub fn groups(&self) -> usize {
        self.y.len()
    }
    /// Whether a momentum buffer exists (b_{n−1} enters the next step).
    pub fn has_buffer(&self) -> bool {
        self.has_buffer
    }

    /// A state as [`LedgerState::y`], [`LedgerState::buffer_dot`], [`LedgerState::has_buffer`]
    /// and [`LedgerState::steps`] read it (a checkpoint): continues bit for bit.
    pub fn from_parts(kind: Kind, y: &[f64], m: &[f64], has_buffer: bool, steps: usize) -> Result<LedgerState> {
        let mut state = LedgerState::new(kind, y, Some(m))?;
        state.has_buffer = has_buffer;
        state.steps = steps;
        Ok(state)
    }

    /// Advance one optimizer step; returns y_{n+1}. On error the state is unchanged.
    pub fn step(&mut self, inputs: LedgerInputs<'_>, hp: Hyper, nesterov: bool) -> Result<&[f64]> {
        hp.validate(Some(self.steps))?;
        let groups = self.y.len();
        let quad = self.kind.is_quadratic();
        if nesterov && (hp.momentum <= 0.0 || hp.dampening != 0.0) {
            return Err(Error::InvalidArgument(format!(
                "nesterov requires momentum > 0 and dampening = 0 (as torch.optim.SGD), got momentum {} \
                 and dampening {} at step {}",
                hp.momentum, hp.dampening, self.steps
            )));
        }
        check_len("flux", inputs.flux, 1, groups)?;
        // Unused inputs are replaced by y (finite) under a zero coefficient.
        let update_sq = if quad {
            let u = inputs
                .update_sq
                .ok_or_else(|| Error::InvalidArgument(format!("update_sq is required for {} charges", self.kind.name())))?;
            check_len("update_sq", u, 1, groups)?;
            u
        } else {
            &self.y
        };
        // β = 0 over an existing buffer: ⟨u_n, b⟩, when given, moves m with θ.
        let follow = quad && hp.momentum == 0.0 && self.has_buffer && inputs.update_dot.is_some();
        let update_dot = if quad && nesterov && hp.momentum > 0.0 || follow {
            let e = inputs.update_dot.ok_or_else(|| {
                Error::InvalidArgument(format!("update_dot (⟨u_n, b_n⟩) is required with nesterov for {} charges", self.kind.name()))
            })?;
            check_len("update_dot", e, 1, groups)?;
            e
        } else {
            update_sq
        };
        let k = coeffs(self.kind, hp, nesterov, self.has_buffer, follow);
        let ok = chunks::run(
            groups,
            [&self.y, &self.m, inputs.flux, update_sq, update_dot],
            [&mut self.y_next, &mut self.m_next],
            move |[y, m, s, u, e], [yo, mo]| ledger_kernel(&k, y, m, s, u, e, yo, mo),
        )?;
        if !ok {
            check_finite("flux", inputs.flux, groups)?;
            check_finite("update_sq", update_sq, groups)?;
            check_finite("update_dot", update_dot, groups)?;
            return Err(Error::NonFinite(format!("the ledger overflowed at step {}", self.steps)));
        }
        std::mem::swap(&mut self.y, &mut self.y_next);
        std::mem::swap(&mut self.m, &mut self.m_next);
        if hp.momentum > 0.0 {
            self.has_buffer = true;
        }
        self.steps += 1;
        Ok(&self.y)
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn ledger_kernel(k: &Coeffs, y: &[f64], m: &[f64], s: &[f64], u: &[f64], e: &[f64], yo: &mut [f64], mo: &mut [f64]) -> bool {
    let n = yo.len();
    let (y, m, s, u, e, mo) = (&y[..n], &m[..n], &s[..n], &u[..n], &e[..n], &mut mo[..n]);
    let mut bad = false;
    for i in 0..n {
        let g = k.lam * y[i] + s[i];
        let a = k.am * m[i] + k.ag * g;
        let c = k.cg * g + k.ca * a;
        let y1 = y[i] - k.ky * c + k.kq * u[i];
        let m1 = k.mm * m[i] + k.ma * a - k.me * e[i];
        yo[i] = y1;
        mo[i] = m1;
        bad |= chunks::non_finite(y1) | chunks::non_finite(m1);
    }
    !bad
}

/// Batch ledger over a whole run: inputs (steps, groups) row-major; returns (steps+1, groups).
/// Runs [`LedgerState`] step by step, so both forms agree to the last bit. `interrupt` is
/// called every few milliseconds of work ([`super::INTERRUPT_EVERY`]); its error stops the run.
#[allow(clippy::too_many_arguments)]
pub fn ledger(
    kind: Kind,
    y0: &[f64],
    flux: &[f64],
    update_sq: Option<&[f64]>,
    update_dot: Option<&[f64]>,
    buffer_dot0: Option<&[f64]>,
    schedule: &Schedule,
    nesterov: bool,
    mut interrupt: Interrupt<'_>,
) -> Result<Vec<f64>> {
    let groups = y0.len();
    let steps = schedule.steps();
    check_len("flux", flux, steps, groups)?;
    if let Some(u) = update_sq {
        check_len("update_sq", u, steps, groups)?;
    }
    if let Some(e) = update_dot {
        check_len("update_dot", e, steps, groups)?;
    }
    if nesterov {
        // Checked on the values given (one per step, or one for all) rather than step by step:
        // a run with no groups does not step at all.
        let bad_m = schedule.values("momentum").iter().find(|&&m| m <= 0.0).map(|m| format!("momentum {m}"));
        let bad_d = schedule.values("dampening").iter().find(|&&d| d != 0.0).map(|d| format!("dampening {d}"));
        if let Some(got) = bad_m.or(bad_d) {
            return Err(Error::InvalidArgument(format!(
                "nesterov requires momentum > 0 and dampening = 0 (as torch.optim.SGD), got {got}"
            )));
        }
    }
    if kind.is_quadratic() && steps > 0 {
        // Also checked by every step; here so that a run with no groups is refused the same way.
        if update_sq.is_none() {
            return Err(Error::InvalidArgument(format!("update_sq is required for {} charges", kind.name())));
        }
        if nesterov && update_dot.is_none() {
            return Err(Error::InvalidArgument(format!("update_dot (⟨u_n, b_n⟩) is required with nesterov for {} charges", kind.name())));
        }
    }
    let rows = steps.checked_add(1).ok_or_else(|| Error::InvalidArgument(format!("steps={steps} is too large")))?;
    let mut out = result_buffer("ledger", rows, groups, true)?;
    let mut state = LedgerState::new(kind, y0, buffer_dot0)?;
    if groups == 0 {
        return Ok(out);
    }
    out[..groups].copy_from_slice(y0);
    let mut ticker = Ticker::new(groups, &mut interrupt);
    for n in 0..steps {
        let r = n * groups..(n + 1) * groups;
        let inputs = LedgerInputs {
            flux: &flux[r.clone()],
            update_sq: update_sq.map(|u| &u[r.clone()]),
            update_dot: update_dot.map(|e| &e[r.clone()]),
        };
        let y = state.step(inputs, schedule.at(n), nesterov)?;
        out[(n + 1) * groups..(n + 2) * groups].copy_from_slice(y);
        ticker.tick()?;
    }
    Ok(out)
}

/// The optimizer-agnostic identity (θ_{n+1} = θ_n − η_n u_n) from measured quantities:
/// scale/rescale y_{n+1} = y_n − 2η_n⟨θ_n,u_n⟩ + η_n²|u_n|² (needs `dot` and `update_sq`);
/// translation y_{n+1} = y_n − η_n⟨1,u_n⟩ (needs `update_sum`). `lr`: one value or one per step.
#[allow(clippy::too_many_arguments)]
pub fn ledger_measured(
    kind: Kind,
    y0: &[f64],
    steps: usize,
    lr: &[f64],
    dot: Option<&[f64]>,
    update_sq: Option<&[f64]>,
    update_sum: Option<&[f64]>,
    mut interrupt: Interrupt<'_>,
) -> Result<Vec<f64>> {
    let groups = y0.len();
    check_finite("y0", y0, groups)?;
    let zero = [0.0];
    let schedule = Schedule::new(steps, lr, &zero, &zero, &zero)?;
    let need = |name: &str, a: Option<&'_ [f64]>| -> Result<()> {
        let a = a.ok_or_else(|| Error::InvalidArgument(format!("{name} is required for {} charges", kind.name())))?;
        check_len(name, a, steps, groups)?;
        check_finite(name, a, groups)
    };
    let (linear, quad_sq): (&[f64], &[f64]) = if kind.is_quadratic() {
        need("dot_theta_update", dot)?;
        need("update_sq", update_sq)?;
        (dot.unwrap_or_default(), update_sq.unwrap_or_default())
    } else {
        need("update_sum", update_sum)?;
        (update_sum.unwrap_or_default(), &[])
    };
    let rows = steps.checked_add(1).ok_or_else(|| Error::InvalidArgument(format!("steps={steps} is too large")))?;
    let mut out = result_buffer("ledger_measured", rows, groups, true)?;
    if groups == 0 {
        return Ok(out);
    }
    out[..groups].copy_from_slice(y0);
    let mut ticker = Ticker::new(groups, &mut interrupt);
    for n in 0..steps {
        let eta = schedule.at(n).lr;
        let (prev, next) = (n * groups, (n + 1) * groups);
        for g in 0..groups {
            let y = out[prev + g];
            out[next + g] = if kind.is_quadratic() {
                y - 2.0 * eta * linear[prev + g] + eta * eta * quad_sq[prev + g]
            } else {
                y - eta * linear[prev + g]
            };
        }
        ticker.tick()?;
    }
    check_finite("the ledger", &out, groups)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a simulated run measured, per step: the charge |θ_n|² (steps + 1 values), the flux
    /// ⟨θ_n, ĝ_n⟩, |u_n|², ⟨u_n, b_n⟩ and the learning rate.
    struct Simulated {
        xs: Vec<f64>,
        flux: Vec<f64>,
        update_sq: Vec<f64>,
        update_dot: Vec<f64>,
        lrs: Vec<f64>,
    }

    /// A tiny scale-invariant SGD run in f64 (θ ∈ R², loss depends on θ/|θ| only), simulated
    /// directly and compared with the ledger fed the measured flux and |u|².
    fn simulate(beta: f64, damp: f64, wd: f64, nesterov: bool, steps: usize) -> Simulated {
        let mut th = [1.3f64, -0.4];
        let mut buf: Option<[f64; 2]> = None;
        let (mut xs, mut fl, mut us, mut es, mut lrs) = (vec![], vec![], vec![], vec![], vec![]);
        for n in 0..steps {
            let eta = if n < 7 { 0.05 } else { 0.02 };
            let x = th[0] * th[0] + th[1] * th[1];
            // ĝ ⊥ θ: the gradient of a function of the angle, plus a small breaking component.
            let ang = th[1].atan2(th[0]);
            let amp = (3.0 * ang).sin() / x.sqrt();
            let mut g = [-th[1] / x.sqrt() * amp, th[0] / x.sqrt() * amp];
            g[0] += 1e-3 * th[0];
            g[1] += 1e-3 * th[1];
            let d = [g[0] + wd * th[0], g[1] + wd * th[1]];
            let u = if beta == 0.0 {
                d
            } else {
                let b = match buf {
                    None => d,
                    Some(b) => [beta * b[0] + (1.0 - damp) * d[0], beta * b[1] + (1.0 - damp) * d[1]],
                };
                buf = Some(b);
                if nesterov {
                    [d[0] + beta * b[0], d[1] + beta * b[1]]
                } else {
                    b
                }
            };
            xs.push(x);
            fl.push(th[0] * g[0] + th[1] * g[1]);
            us.push(u[0] * u[0] + u[1] * u[1]);
            let b = buf.unwrap_or(u);
            es.push(u[0] * b[0] + u[1] * b[1]);
            lrs.push(eta);
            th = [th[0] - eta * u[0], th[1] - eta * u[1]];
        }
        xs.push(th[0] * th[0] + th[1] * th[1]);
        Simulated { xs, flux: fl, update_sq: us, update_dot: es, lrs }
    }

    #[test]
    fn reproduces_simulated_sgd() {
        for &(beta, damp, nesterov) in &[(0.0, 0.0, false), (0.9, 0.0, false), (0.9, 0.3, false), (0.8, 0.0, true)] {
            let steps = 40;
            let Simulated { xs, flux: fl, update_sq: us, update_dot: es, lrs } = simulate(beta, damp, 0.01, nesterov, steps);
            let (m, d, w) = ([beta], [damp], [0.01]);
            let sched = Schedule::new(steps, &lrs, &m, &d, &w).unwrap();
            let ys = ledger(Kind::Scale, &xs[..1], &fl, Some(&us), Some(&es), None, &sched, nesterov, &mut crate::theory::never).unwrap();
            for n in 0..=steps {
                assert!((ys[n] - xs[n]).abs() <= 1e-13 * xs[n], "{beta} {damp} {nesterov} step {n}: {} {}", ys[n], xs[n]);
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut st = LedgerState::new(Kind::Scale, &[1.0], None).unwrap();
        let hp = Hyper::new(0.1, 0.9, 0.1, 0.0);
        let inputs = LedgerInputs { flux: &[0.0], update_sq: Some(&[1.0]), update_dot: None };
        assert!(matches!(st.step(inputs, hp, true), Err(Error::InvalidArgument(_))));
        let no_u = LedgerInputs { flux: &[0.0], update_sq: None, update_dot: None };
        assert!(matches!(st.step(no_u, hp, false), Err(Error::InvalidArgument(_))));
        let nan = LedgerInputs { flux: &[f64::NAN], update_sq: Some(&[1.0]), update_dot: None };
        assert!(matches!(st.step(nan, hp, false), Err(Error::NonFinite(_))));
        assert_eq!(st.steps(), 0);
        assert_eq!(st.y(), &[1.0]);
        // No steps, per-step arrays of length 0 beside constants: an error, never an index panic.
        let empty = Schedule::new(0, &[0.1], &[], &[0.5], &[0.0]).unwrap();
        let never = &mut crate::theory::never;
        assert!(matches!(
            ledger(Kind::Scale, &[1.0], &[], Some(&[]), Some(&[]), None, &empty, true, never),
            Err(Error::InvalidArgument(_))
        ));
    }
}
