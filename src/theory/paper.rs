//! docs/theory.md §5.1 and §5.2: the paper's closed forms, advanced one step at a time with the
//! exact propagators of [`super::propagator`].
//!
//! Conventions (stated once, see docs/theory.md): the state after n steps is (y_n, ẏ_n) at time
//! t_n = Σ_{k<n} h_k, h_k = η_k(1−d_k) with momentum and h_k = η_k without. The drive of step n
//! is held constant over [t_n, t_{n+1}]: without momentum it is |ĝ_n|² (the integrand
//! η_n|ĝ_n|² of §5.1); with momentum |b_n|², the buffer after step n (f_n = 2|b_n|²/(1−d_n)²).
//! For rescale, both are differences of the two sides (A1 − A2). Translation has no drive.

use super::chunks::{self, flush, Flags};
use super::propagator::{self, Step};
use super::{check_finite, check_len, result_buffer, Hyper, Interrupt, Kind, Schedule, Ticker};
use crate::error::{Error, Result};

/// Streaming state of the closed forms: O(groups) memory, one [`PaperState::step`] per
/// optimizer step.
#[derive(Clone, Debug)]
pub struct PaperState {
    kind: Kind,
    // A step that fails leaves the state as it was, whatever failed. Its arguments are checked
    // first. When every |y|, |ẏ| and |drive| is at most chunks::SMALL (2^500, tracked by the
    // kernels at no cost) and the step's coefficients are moderate, no result can overflow
    // (`bound`), and the step updates in place: one read and one write of each array. Otherwise
    // it writes (y_next, v_next), allocated then, and swaps them in only if every value is finite
    // (the double buffer costs ~15% at 10^5 groups, measured; only states beyond 1e150 or
    // extreme hyperparameters take it).
    y: Vec<f64>,
    v: Vec<f64>,
    y_next: Vec<f64>,
    v_next: Vec<f64>,
    /// Whether some |y| or |ẏ| is beyond chunks::SMALL (or not finite), kept by every step.
    big: bool,
    /// Translation has no drive: the kernels read this (zeros, under a zero coefficient).
    zeros: Vec<f64>,
    steps: usize,
    t: f64,
    /// Fixed by the first step: Some(true) with momentum, Some(false) without.
    momentum: Option<bool>,
    /// The last hyperparameters and their step coefficients (a constant schedule computes the
    /// propagator once).
    cache: Option<(Hyper, Step)>,
}

impl PaperState {
    /// y0: the charges at step 0; ydot0: ẏ(0) (None = 0, the paper's start; only meaningful
    /// with momentum, see docs/theory.md §5.2 for its value when a buffer already exists).
    pub fn new(kind: Kind, y0: &[f64], ydot0: Option<&[f64]>) -> Result<PaperState> {
        let groups = y0.len();
        check_finite("y0", y0, groups)?;
        let v = match ydot0 {
            Some(v) => {
                check_len("ydot0", v, 1, groups)?;
                check_finite("ydot0", v, groups)?;
                v.to_vec()
            }
            None => vec![0.0; groups],
        };
        let big = chunks::scan(y0).big | chunks::scan(&v).big;
        Ok(PaperState {
            kind,
            y: y0.to_vec(),
            v,
            y_next: Vec::new(),
            v_next: Vec::new(),
            big,
            zeros: if kind.is_quadratic() { Vec::new() } else { vec![0.0; groups] },
            steps: 0,
            t: 0.0,
            momentum: None,
            cache: None,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn groups(&self) -> usize {
        self.y.len()
    }
    /// The current charges y_n.
    pub fn y(&self) -> &[f64] {
        &self.y
    }
    /// The current rate ẏ_n (per unit of t). Without momentum: the right-hand side of the
    /// first-order ODE at the end of the last step (with that step's drive).
    pub fn ydot(&self) -> &[f64] {
        &self.v
    }
    pub fn steps(&self) -> usize {
        self.steps
    }
    /// The model time t_n.
    pub fn time(&self) -> f64 {
        self.t
    }
    /// Fixed by the first step: Some(true) with momentum, Some(false) without, None before.
    pub fn momentum(&self) -> Option<bool> {
        self.momentum
    }

    /// A state as [`PaperState::y`], [`PaperState::ydot`], [`PaperState::steps`],
    /// [`PaperState::time`] and [`PaperState::momentum`] read it (a checkpoint). The step
    /// coefficients are recomputed from the next step's hyperparameters, the same values.
    pub fn from_parts(kind: Kind, y: &[f64], ydot: &[f64], steps: usize, t: f64, momentum: Option<bool>) -> Result<PaperState> {
        if !t.is_finite() {
            return Err(Error::NonFinite("the model time of a paper state must be finite".into()));
        }
        let mut state = PaperState::new(kind, y, Some(ydot))?;
        state.steps = steps;
        state.t = t;
        state.momentum = momentum;
        Ok(state)
    }

    /// Advance one step. `drive`: (groups,), required for scale/rescale, ignored for
    /// translation. Returns y_{n+1}.
    pub fn step(&mut self, drive: Option<&[f64]>, hp: Hyper) -> Result<&[f64]> {
        self.step_into(drive, hp, None)?;
        Ok(&self.y)
    }

    /// [`PaperState::step`], also writing y_{n+1} to `out` (groups,) in the same pass.
    ///
    /// Every error leaves the state unchanged (values, step count, time): those from the
    /// arguments (hyperparameters, shapes, a non-finite drive) and a result that overflows
    /// float64 (charges near 1e308, NonFinite). `out` may have been written on error.
    pub fn step_into(&mut self, drive: Option<&[f64]>, hp: Hyper, out: Option<&mut [f64]>) -> Result<()> {
        hp.validate(Some(self.steps))?;
        let with_momentum = hp.momentum > 0.0;
        match self.momentum {
            Some(m) if m != with_momentum => {
                return Err(Error::InvalidArgument(format!(
                    "momentum must stay zero or stay positive over a run: step {} has momentum {} \
                     after steps {} momentum; the closed forms of §5.1 and §5.2 do not chain",
                    self.steps,
                    hp.momentum,
                    if m { "with" } else { "without" }
                )))
            }
            None if !with_momentum && self.v.iter().any(|&v| v != 0.0) => {
                return Err(Error::InvalidArgument("ydot0 applies only with momentum (the first-order model has no rate state)".into()))
            }
            _ => {}
        }
        let step = match self.cache {
            Some((cached, step)) if cached == hp => step,
            _ => {
                let step = propagator::step_for(self.kind, hp)?;
                self.cache = Some((hp, step));
                step
            }
        };
        let groups = self.y.len();
        let drive: &[f64] = if self.kind.is_quadratic() {
            let d = drive.ok_or_else(|| Error::InvalidArgument(format!("a drive is required for {} charges", self.kind.name())))?;
            check_len("drive", d, 1, groups)?;
            d
        } else {
            &[]
        };
        if let Some(o) = &out {
            check_len("out", o, 1, groups)?;
        }
        let t = self.t + step.h;
        if !t.is_finite() {
            return Err(Error::NonFinite(format!("the model time overflows float64 at step {} (lr = {:e})", self.steps, hp.lr)));
        }
        let mut drive_big = false;
        if self.kind.is_quadratic() {
            drive_big = chunks::run_tally(groups, [drive], [], |[d], []| chunks::scan(d), Flags::default(), Flags::or)?.big;
            if drive_big {
                check_finite("drive", drive, groups)?;
            }
        }
        let drive = if self.kind.is_quadratic() { drive } else { &self.zeros };
        let small = chunks::SMALL;
        let flags = if !self.big && !drive_big && cannot_overflow(&step, small, small, small) {
            advance(&step, drive, [&mut self.y, &mut self.v], None, out)?
        } else {
            self.y_next.resize(groups, 0.0);
            self.v_next.resize(groups, 0.0);
            let next: [&mut [f64]; 2] = [&mut self.y_next, &mut self.v_next];
            let flags = advance(&step, drive, [&mut self.y, &mut self.v], Some(next), out)?;
            if flags.bad {
                return Err(Error::NonFinite(format!(
                    "the closed form overflowed float64 at step {} (charges or rates too large for these \
                     hyperparameters); the stream is unchanged",
                    self.steps
                )));
            }
            std::mem::swap(&mut self.y, &mut self.y_next);
            std::mem::swap(&mut self.v, &mut self.v_next);
            flags
        };
        self.big = flags.big;
        self.momentum = Some(with_momentum);
        self.steps += 1;
        self.t = t;
        Ok(())
    }
}

/// Results below this cannot have overflowed anywhere in a step (the bound covers every
/// intermediate product; the margin to f64::MAX absorbs the rounding of the bound itself).
const SAFE: f64 = 1e300;

/// Whether no |y'|, |ẏ'| (nor any intermediate) of a step from a state with |y| ≤ `y`,
/// |ẏ| ≤ `v` and |drive| ≤ `d` can exceed SAFE: |r| ≤ |c_f|d + ω²y, then the updates of
/// [`advance`] term by term (a term that overflows, or is NaN, fails the comparison).
fn cannot_overflow(s: &Step, y: f64, v: f64, d: f64) -> bool {
    let r = s.cf.abs() * d + s.w2.abs() * y;
    let terms = if s.first_order {
        let y1 = y + s.p.abs() * r;
        [r, y1, s.cf.abs() * d + s.w2.abs() * y1]
    } else {
        [r, y + s.g.abs() * v + s.p.abs() * r, s.gp.abs() * v + s.g.abs() * r]
    };
    terms.iter().all(|&t| t <= SAFE)
}

/// One step for every group: (y, ẏ) → (y', ẏ'), in place, or into `next` (leaving the state as
/// it was) when given; y' also written to `out` if given. Returns whether a new value is beyond
/// chunks::SMALL and (only checked when writing to `next`) whether one is not finite.
fn advance(step: &Step, drive: &[f64], [y, v]: [&mut [f64]; 2], next: Option<[&mut [f64]; 2]>, out: Option<&mut [f64]>) -> Result<Flags> {
    use chunks::run_tally;
    let s = *step;
    let groups = y.len();
    // The two updates of the module documentation of `propagator`; subnormals are flushed.
    let second = move |y: f64, v: f64, d: f64| {
        let r = s.cf * d - s.w2 * y;
        (flush(y + s.g * v + s.p * r), flush(s.gp * v + s.g * r))
    };
    let first = move |y: f64, _v: f64, d: f64| {
        let r = s.cf * d - s.w2 * y;
        let y1 = flush(y + s.p * r);
        (y1, flush(s.cf * d - s.w2 * y1))
    };
    let (zero, add) = (Flags::default(), Flags::or);
    match (next, out) {
        (None, None) if s.first_order => run_tally(groups, [drive], [y, v], |[d], [y, v]| chunks::update(first, d, y, v, None), zero, add),
        (None, None) => run_tally(groups, [drive], [y, v], |[d], [y, v]| chunks::update(second, d, y, v, None), zero, add),
        (None, Some(o)) if s.first_order => {
            run_tally(groups, [drive], [y, v, o], |[d], [y, v, o]| chunks::update(first, d, y, v, Some(o)), zero, add)
        }
        (None, Some(o)) => run_tally(groups, [drive], [y, v, o], |[d], [y, v, o]| chunks::update(second, d, y, v, Some(o)), zero, add),
        // The rare path (a step that might overflow): the old state stays intact.
        (Some([yo, vo]), out) => {
            let (y, v): (&[f64], &[f64]) = (y, v);
            match out {
                None if s.first_order => {
                    run_tally(groups, [drive, y, v], [yo, vo], |[d, y, v], [yo, vo]| chunks::step(first, d, y, v, yo, vo, None), zero, add)
                }
                None => {
                    run_tally(groups, [drive, y, v], [yo, vo], |[d, y, v], [yo, vo]| chunks::step(second, d, y, v, yo, vo, None), zero, add)
                }
                Some(o) if s.first_order => run_tally(
                    groups,
                    [drive, y, v],
                    [yo, vo, o],
                    |[d, y, v], [yo, vo, o]| chunks::step(first, d, y, v, yo, vo, Some(o)),
                    zero,
                    add,
                ),
                Some(o) => run_tally(
                    groups,
                    [drive, y, v],
                    [yo, vo, o],
                    |[d, y, v], [yo, vo, o]| chunks::step(second, d, y, v, yo, vo, Some(o)),
                    zero,
                    add,
                ),
            }
        }
    }
}

/// The batch form: every step of a run at once. `drive`: (steps, groups) row-major, required
/// for scale/rescale (None for translation). Returns (steps+1, groups) row-major, row 0 = y0.
/// Runs the streaming state step by step, so both forms agree to the last bit.
///
/// The result is allocated fallibly; without a drive (translation) it may hold at most
/// [`super::MAX_UNBACKED_VALUES`] values. `interrupt` is called every few milliseconds of
/// work ([`super::INTERRUPT_EVERY`]); its error stops the run and is returned.
pub fn paper(
    kind: Kind,
    y0: &[f64],
    ydot0: Option<&[f64]>,
    drive: Option<&[f64]>,
    schedule: &Schedule,
    mut interrupt: Interrupt<'_>,
) -> Result<Vec<f64>> {
    let groups = y0.len();
    let steps = schedule.steps();
    let drive = if kind.is_quadratic() {
        let d = drive.ok_or_else(|| Error::InvalidArgument(format!("a drive is required for {} charges", kind.name())))?;
        check_len("drive", d, steps, groups)?;
        check_finite("drive", d, groups)?;
        Some(d)
    } else {
        None
    };
    let momentum = schedule.values("momentum");
    if let Some(&first) = momentum.first() {
        // One value per step, or one for all (then there is nothing to compare).
        if let Some(n) = momentum.iter().position(|&m| (m > 0.0) != (first > 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "momentum must be all zero or all positive over the run (step 0: {first}, step {n}: {})",
                momentum[n]
            )));
        }
    }
    let rows = steps.checked_add(1).ok_or_else(|| Error::InvalidArgument(format!("steps={steps} is too large")))?;
    let mut out = result_buffer("paper", rows, groups, drive.is_some())?;
    let mut state = PaperState::new(kind, y0, ydot0)?;
    if groups == 0 {
        // Nothing to advance; every value was checked by the schedule.
        return Ok(out);
    }
    out[..groups].copy_from_slice(y0);
    let mut ticker = Ticker::new(groups, &mut interrupt);
    for (n, row_out) in out.chunks_exact_mut(groups).skip(1).enumerate() {
        let row = drive.map(|d| &d[n * groups..(n + 1) * groups]);
        state.step_into(row, schedule.at(n), Some(row_out))?;
        ticker.tick()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::theory::never;

    #[test]
    fn ten_million_steps_reach_the_fixed_point() {
        // lr 0.1, β 0.99, λ 1e-3, constant |b|² = D: y → f/ω² = (2D/(1−d)²)·h(1+β)/(4λ).
        // Two scale groups and one rescale-like negative drive; translation decays to exactly 0.
        let hp = Hyper::new(0.1, 0.99, 0.0, 1e-3);
        let drive = [0.3, 2.5e-4, 7.0];
        let mut s = PaperState::new(Kind::Scale, &[1.0, 50.0, 0.0], None).unwrap();
        let mut tr = PaperState::new(Kind::Translation, &[3.0, -1e-300], Some(&[0.5, 0.0])).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..10_000_000 {
            s.step(Some(&drive), hp).unwrap();
            tr.step(None, hp).unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        for (i, &d) in drive.iter().enumerate() {
            let target = 2.0 * d * 0.1 * 1.99 / (4.0 * 1e-3);
            let rel = (s.y()[i] - target).abs() / target;
            assert!(rel <= 1e-12, "group {i}: {} vs {target} ({rel:e})", s.y()[i]);
            assert!(s.ydot()[i].abs() <= 1e-12 * target, "rate {}", s.ydot()[i]);
        }
        // Everything that decays reaches 0 through normal numbers only (flushed), no NaN.
        for &x in tr.y().iter().chain(tr.ydot()) {
            assert!(x == 0.0, "translation did not decay to 0: {x}");
        }
        for &x in s.y().iter().chain(s.ydot()) {
            assert!(x == 0.0 || x.is_normal(), "{x}");
        }
        // 2·10⁷ group-steps of 5 groups: well under a second without subnormal slowdowns;
        // the bound is loose because the machine is shared.
        assert!(elapsed < 20.0, "10^7 steps took {elapsed} s");
        assert_eq!(s.steps(), 10_000_000);
    }

    #[test]
    fn batch_equals_stream_bitwise_with_schedule() {
        let steps = 50;
        let groups = 5;
        let lr: Vec<f64> = (0..steps).map(|n| if n < 10 { 0.01 * (n + 1) as f64 } else { 0.1 / (1 + n / 20) as f64 }).collect();
        let drive: Vec<f64> = (0..steps * groups).map(|i| ((i * 7919) % 13) as f64 * 0.01).collect();
        let y0 = [1.0, 2.0, 0.5, 3.0, 0.1];
        let (m, d, w) = ([0.9], [0.2], [5e-3]);
        let sched = Schedule::new(steps, &lr, &m, &d, &w).unwrap();
        let batch = paper(Kind::Scale, &y0, None, Some(&drive), &sched, &mut never).unwrap();
        let mut st = PaperState::new(Kind::Scale, &y0, None).unwrap();
        for n in 0..steps {
            let y = st.step(Some(&drive[n * groups..(n + 1) * groups]), sched.at(n)).unwrap();
            assert_eq!(y, &batch[(n + 1) * groups..(n + 2) * groups]);
        }
    }

    #[test]
    fn errors_leave_the_state_alone() {
        let mut st = PaperState::new(Kind::Scale, &[1.0, 2.0], None).unwrap();
        let hp = Hyper::new(0.1, 0.9, 0.0, 1e-3);
        st.step(Some(&[0.1, 0.2]), hp).unwrap();
        let before = st.y().to_vec();
        assert!(matches!(st.step(Some(&[f64::NAN, 0.2]), hp), Err(Error::NonFinite(_))));
        assert!(matches!(st.step(Some(&[0.1]), hp), Err(Error::Shape(_))));
        assert!(matches!(st.step(Some(&[0.1, 0.2]), Hyper::new(-0.1, 0.9, 0.0, 0.0)), Err(Error::InvalidArgument(_))));
        assert!(matches!(st.step(Some(&[0.1, 0.2]), Hyper::new(0.1, 1.0, 0.0, 0.0)), Err(Error::InvalidArgument(_))));
        assert!(matches!(st.step(Some(&[0.1, 0.2]), Hyper::new(0.1, 0.0, 0.0, 0.0)), Err(Error::InvalidArgument(_))));
        assert_eq!(st.y(), &before[..]);
        assert_eq!(st.steps(), 1);
    }

    #[test]
    fn many_groups_run_in_parallel_identically() {
        let groups = 40_000;
        let y0: Vec<f64> = (0..groups).map(|i| 1.0 + (i % 17) as f64).collect();
        let drive: Vec<f64> = (0..groups).map(|i| 0.01 * (i % 5) as f64).collect();
        let hp = Hyper::new(0.05, 0.9, 0.1, 5e-4);
        let mut big = PaperState::new(Kind::Rescale, &y0, None).unwrap();
        for _ in 0..3 {
            big.step(Some(&drive), hp).unwrap();
        }
        for i in [0, 4095, 4096, 17_000, groups - 1] {
            let mut one = PaperState::new(Kind::Rescale, &y0[i..i + 1], None).unwrap();
            for _ in 0..3 {
                one.step(Some(&drive[i..i + 1]), hp).unwrap();
            }
            assert_eq!(one.y()[0], big.y()[i]);
        }
    }

    #[test]
    fn an_overflowing_step_leaves_the_state_unchanged() {
        // Finite inputs whose result overflows float64: the step fails, nothing moves.
        let mut st = PaperState::new(Kind::Scale, &[1.0, 1e300], None).unwrap();
        let hp = Hyper::new(0.1, 0.9, 0.0, 1e-3);
        st.step(Some(&[0.1, 0.2]), hp).unwrap();
        let (y, v, t) = (st.y().to_vec(), st.ydot().to_vec(), st.time());
        let mut out = [0.0; 2];
        let err = st.step_into(Some(&[0.1, 1e308]), hp, Some(&mut out));
        assert!(matches!(err, Err(Error::NonFinite(m)) if m.contains("unchanged")));
        assert_eq!((st.y(), st.ydot(), st.time(), st.steps()), (&y[..], &v[..], t, 1));
        // And the stream goes on from there.
        st.step(Some(&[0.1, 0.2]), hp).unwrap();
        assert_eq!(st.steps(), 2);
    }

    #[test]
    fn tiny_learning_rates_step_like_the_identity() {
        // lr < 1e-160 with momentum made ω² infinite and the state NaN (the step count advanced).
        for &lr in &[1e-161, 1e-200, 1e-300] {
            let mut st = PaperState::new(Kind::Scale, &[2.0, 3.0], Some(&[0.5, -0.5])).unwrap();
            let y = st.step(Some(&[0.1, 0.2]), Hyper::new(lr, 0.9, 0.0, 1e-3)).unwrap().to_vec();
            assert_eq!(y, vec![2.0, 3.0], "lr {lr}");
            assert!(st.ydot().iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn sizes_from_steps_alone_are_bounded_and_long_runs_stop_on_interrupt() {
        let big = Schedule::new(1 << 32, &[0.1], &[0.0], &[0.0], &[0.0]).unwrap();
        let start = std::time::Instant::now();
        let err = paper(Kind::Translation, &[0.0], None, None, &big, &mut never);
        assert!(matches!(err, Err(Error::InvalidArgument(m)) if m.contains("4294967297 values")));
        // No groups: nothing to do however many steps (and no allocation).
        assert_eq!(paper(Kind::Translation, &[], None, None, &big, &mut never).unwrap().len(), 0);
        assert!(start.elapsed().as_secs_f64() < 1.0);
        // Even with no values, a shape numpy cannot describe ((2^62 + 1) x 8 bytes) is refused.
        let huge = Schedule::new(1 << 62, &[0.1], &[0.0], &[0.0], &[0.0]).unwrap();
        assert!(
            matches!(paper(Kind::Translation, &[], None, None, &huge, &mut never), Err(Error::InvalidArgument(m)) if m.contains("too large"))
        );
        // An interrupt stops a long loop and its error comes back as is.
        let steps = 1 << 22;
        let sched = Schedule::new(steps, &[0.1], &[0.0], &[0.0], &[1e-3]).unwrap();
        let mut calls = 0;
        let mut stop = || {
            calls += 1;
            if calls == 2 {
                Err(Error::InvalidArgument("stop".into()))
            } else {
                Ok(())
            }
        };
        let err = paper(Kind::Translation, &[1.0], None, None, &sched, &mut stop);
        assert_eq!(err, Err(Error::InvalidArgument("stop".into())));
        assert_eq!(calls, 2);
    }

    #[test]
    fn in_place_and_double_buffered_steps_agree_bit_for_bit() {
        // Both paths of `advance` (in place when the bound allows it, into fresh buffers
        // otherwise) run the same arithmetic; every regime, with and without `out`, serial and
        // parallel group counts.
        for groups in [7, 20_000] {
            let y0: Vec<f64> = (0..groups).map(|i| 1.0 + (i % 13) as f64 * 0.37).collect();
            let v0: Vec<f64> = (0..groups).map(|i| ((i % 5) as f64 - 2.0) * 0.01).collect();
            let d: Vec<f64> = (0..groups).map(|i| 0.01 * (i % 7) as f64).collect();
            for hp in [Hyper::new(0.1, 0.9, 0.1, 5e-3), Hyper::new(0.5, 0.99, 0.0, 0.5), Hyper::new(0.1, 0.0, 0.0, 1e-3)] {
                let step = propagator::step_for(Kind::Scale, hp).unwrap();
                for with_out in [false, true] {
                    let (mut y1, mut v1, mut o1) = (y0.clone(), v0.clone(), vec![0.0; groups]);
                    let t1 = advance(&step, &d, [&mut y1, &mut v1], None, with_out.then_some(&mut o1[..])).unwrap();
                    let (mut y2, mut v2, mut o2) = (y0.clone(), v0.clone(), vec![0.0; groups]);
                    let (mut yn, mut vn) = (vec![0.0; groups], vec![0.0; groups]);
                    let t2 = advance(&step, &d, [&mut y2, &mut v2], Some([&mut yn, &mut vn]), with_out.then_some(&mut o2[..])).unwrap();
                    assert_eq!((&y1, &v1), (&yn, &vn));
                    assert_eq!((&y2, &v2), (&y0, &v0), "the double-buffered path leaves the state alone");
                    assert_eq!(o1, o2);
                    assert_eq!(t1.big, t2.big);
                    assert!(!t2.bad && !t1.big);
                }
            }
        }
    }
}
