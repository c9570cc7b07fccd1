//! A run's state between optimizer steps, and the calls the Python tracker makes: one per step.
//!
//! - [`Tracker::step_sgd`]: a measured `torch.optim.SGD` step, from the fused sums of
//!   (θ_n, ĝ_n, b_{n−1}) taken before the step;
//! - [`Tracker::step_update`]: a measured step of any other optimizer, from the sums of
//!   (θ_n, ĝ_n, d_n) with the applied update d_n = θ_n − θ_{n+1};
//! - [`Tracker::skip`]: a step that is not measured (`every > 1`): the clock moves and the
//!   paper's closed form advances with the last measured drive;
//! - [`Tracker::final_row`]: the charges of the parameters as they are now.
//!
//! A measured step writes the run's row for θ_n (the predictions are those of θ_n, before the
//! step), then advances the clock and both theories past the step. Everything here is O(rows +
//! parts + groups) and independent of the thread count.

use super::algebra::{self, sgd_part, split_decay, update_part};
use super::lanes::{Exact, Lanes};
use super::plan::{field, Plan, Summed, FIELDS, FIELD_NAMES};
use super::snapshot::Snapshot;
use super::ROW_FIELDS;
use crate::error::{Error, Result};
use crate::theory::equilibrium;
use crate::theory::ledger::LedgerState;
use crate::theory::paper::PaperState;
use crate::theory::propagator::regime;
use crate::theory::{Hyper, Kind};

pub use algebra::ParamGroupHyper;

impl ParamGroupHyper {
    pub fn hyper(&self) -> Hyper {
        Hyper::new(self.lr, self.momentum, self.dampening, self.weight_decay)
    }
}

/// What a run's exact column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExactMode {
    /// The SGD ledger (docs/theory.md §5.3), a prediction from the measured norms.
    Ledger,
    /// The running sum of the measured changes (bookkeeping, any optimizer).
    Measured,
    /// Nothing: the ledger needs every step, and `every > 1` skips some.
    None,
}

/// The columns of one (kind, param_group): one lane of theory streams.
#[derive(Clone, Debug)]
struct LaneSpec {
    kind: Kind,
    param_group: usize,
    cols: Vec<usize>,
    /// The lane's columns that are whole groups: the paper's closed form covers these.
    paper_cols: Vec<usize>,
}

/// What a measured step reports besides its row.
#[derive(Clone, Debug, Default)]
pub struct StepReport {
    /// The model time t_n of the row (the clock of group 0's param_group).
    pub time: f64,
    /// Notes for the run (a closed form that stopped, and why).
    pub notes: Vec<String>,
    /// (symmetry, regime) when the hyperparameters changed since the last report, else empty.
    pub regimes: Vec<(&'static str, &'static str)>,
}

/// The last row of a run: the charges of the parameters as they are now, and the predictions.
#[derive(Clone, Debug)]
pub struct FinalRow {
    pub time: f64,
    pub measured: Vec<f64>,
    pub magnitude: Vec<f64>,
    pub paper: Vec<f64>,
    pub exact: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    plan: Plan,
    lanes: Vec<LaneSpec>,
    exact: ExactMode,
    /// The optimizer is torch.optim.SGD: the paper's closed forms and the ledger apply as such;
    /// any other optimizer gets the paper's first-order forms driven by its measured update.
    sgd: bool,
    /// Any other optimizer: how its update is read (docs/theory.md §5.5, §5.6).
    rule: UpdateRule,
    /// The theory streams, from the first measured step on.
    streams: Option<Lanes>,
    /// t per param_group: Σ η_k(1 − d_k) over past steps (d ignored without momentum).
    clock: Vec<f64>,
    /// Per column: the last measured drive, held over unmeasured steps.
    held_drive: Vec<f64>,
    /// The hyperparameters whose regimes were last reported.
    regimes_for: Option<Vec<ParamGroupHyper>>,
    /// The per-column sums of the last measured step (for inspection and tests).
    last_columns: Vec<[f64; FIELDS]>,
    /// Non-finite sums are an error that leaves the state as it was (`on_error="raise"`);
    /// otherwise that step's predictions are NaN and the theories restart (see `restart_after`).
    strict: bool,
    /// Some(step): the theories lost the run at that step (non-finite sums, or a step the
    /// tracker could not measure): predictions are NaN until the next measured step with finite
    /// sums, where every lane restarts from the measured charges.
    restart_after: Option<usize>,
    /// The index of the last step seen (every step crosses into the tracker once: measured,
    /// skipped or lost): the default step of `step_update`'s notes, and part of a checkpoint.
    next_step: usize,
}

/// The layout of [`Tracker::export`]: a checkpoint of another version is refused.
const STATE_VERSION: f64 = 1.0;

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// How the update of an optimizer other than torch.optim.SGD is read (set once per run).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateRule {
    /// Weight decay is decoupled (θ ← (1−ηλ)θ − ηu: AdamW, `decoupled_weight_decay=True`), so
    /// it is taken out of the update; coupled decay (added to the gradient) stays in u.
    pub decoupled: bool,
    /// Adam's first-moment coefficient β1 (0 for optimizers without one): the §5.4 equilibrium
    /// of decoupled weight decay depends on it.
    pub beta1: f64,
}

impl Default for UpdateRule {
    fn default() -> Self {
        UpdateRule { decoupled: false, beta1: 0.0 }
    }
}

fn take(values: &[f64], cols: &[usize]) -> Vec<f64> {
    cols.iter().map(|&c| values[c]).collect()
}

impl Tracker {
    /// `sgd`: the optimizer is `torch.optim.SGD` (closed forms and ledger); `every`: steps
    /// between measurements (the ledger needs every step).
    pub fn new(plan: Plan, sgd: bool, every: usize) -> Tracker {
        let exact = if every > 1 {
            ExactMode::None
        } else if sgd {
            ExactMode::Ledger
        } else {
            ExactMode::Measured
        };
        let mut param_groups: Vec<usize> = plan.column_param_group.clone();
        param_groups.sort_unstable();
        param_groups.dedup();
        let mut lanes = Vec::new();
        for kind in [Kind::Translation, Kind::Scale, Kind::Rescale] {
            for &pg in &param_groups {
                let cols: Vec<usize> =
                    (0..plan.columns()).filter(|&c| plan.column_kind(c) == kind && plan.column_param_group[c] == pg).collect();
                if !cols.is_empty() {
                    let paper_cols = cols.iter().copied().filter(|&c| plan.is_whole_group(c)).collect();
                    lanes.push(LaneSpec { kind, param_group: pg, cols, paper_cols });
                }
            }
        }
        let columns = plan.columns();
        Tracker {
            plan,
            lanes,
            exact,
            sgd,
            rule: UpdateRule::default(),
            streams: None,
            clock: Vec::new(),
            held_drive: vec![0.0; columns],
            regimes_for: None,
            last_columns: Vec::new(),
            strict: false,
            restart_after: None,
            next_step: 0,
        }
    }

    /// How the update of an optimizer other than torch.optim.SGD is read (default: coupled
    /// weight decay, β1 = 0). Set before the first step.
    pub fn set_update_rule(&mut self, rule: UpdateRule) -> Result<()> {
        if !(0.0..1.0).contains(&rule.beta1) {
            return Err(Error::InvalidArgument(format!("beta1 must be in [0, 1), got {}", rule.beta1)));
        }
        self.rule = rule;
        Ok(())
    }

    /// The hyperparameters the theories see: torch.optim.SGD's own; for any other optimizer the
    /// first-order model of its update (no momentum, no dampening, the decay taken out of the
    /// update: docs/theory.md §5.5), which also sets the clock t = Σ η.
    fn model_hyper(&self, hyper: &[ParamGroupHyper]) -> Vec<ParamGroupHyper> {
        if self.sgd {
            return hyper.to_vec();
        }
        hyper
            .iter()
            .map(|h| ParamGroupHyper {
                lr: h.lr,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: split_decay(h, self.rule.decoupled),
                nesterov: false,
            })
            .collect()
    }

    /// The index of the last step this tracker saw (measured, skipped or lost).
    pub fn next_step(&self) -> usize {
        self.next_step
    }

    /// `on_error="raise"`: non-finite sums are an error (the state unchanged) instead of a note.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// A step the tracker could not measure (its error is the caller's note): the clock moves,
    /// and the theories are NaN until they restart at the next measured step with finite sums.
    pub fn lose(&mut self, step: usize, hyper: &[ParamGroupHyper]) -> Result<()> {
        self.check(hyper, None)?;
        self.next_step = step;
        self.restart_after.get_or_insert(step);
        let model = self.model_hyper(hyper);
        self.advance_clock(&model);
        Ok(())
    }

    /// The first non-finite per-column sum, in words; None when all are finite.
    fn non_finite(&self, summed: &Summed) -> Option<String> {
        let bad = |c: &[f64; FIELDS]| c.iter().position(|v| !v.is_finite());
        let first = summed.columns.iter().enumerate().find_map(|(c, v)| bad(v).map(|f| (c, f, v[f])))?;
        let mut groups: Vec<usize> =
            summed.columns.iter().enumerate().filter(|(_, v)| bad(v).is_some()).map(|(c, _)| self.plan.column_group[c]).collect();
        groups.dedup();
        let (c, f, v) = first;
        Some(format!(
            "non-finite sums in {} of {} groups (group {}: {} is {v}; a NaN/Inf gradient or parameter)",
            groups.len(),
            self.plan.groups(),
            self.plan.column_group[c],
            FIELD_NAMES[f]
        ))
    }

    /// A measured step whose sums are not finite: an error (strict, nothing moved), or its row
    /// with NaN predictions, the clock moved and the theories held until they can restart.
    fn non_finite_step(
        &mut self,
        step: usize,
        why: String,
        summed: &Summed,
        hyper: &[ParamGroupHyper],
        model: &[ParamGroupHyper],
        out: Option<&mut [f64]>,
    ) -> Result<StepReport> {
        if self.strict {
            return Err(Error::NonFinite(format!("step {step}: {why}")));
        }
        let newly = self.restart_after.is_none();
        self.restart_after.get_or_insert(step);
        let mut report = self.record(summed, hyper, model, out);
        if newly {
            report.notes.push(format!(
                "step {step}: {why}; paper and exact are NaN from this step and restart from the measured charges                  at the next step whose sums are finite"
            ));
        }
        self.advance_clock(model);
        Ok(report)
    }

    /// Start the theory streams at the first measured step, or restart them after a loss.
    fn start_or_restart(&mut self, step: usize, summed: &Summed, has_buffer: bool, hyper: &[ParamGroupHyper]) -> Result<Vec<String>> {
        if self.streams.is_some() && self.restart_after.is_none() {
            return Ok(Vec::new());
        }
        self.start_streams(summed, has_buffer, hyper)?;
        Ok(match self.restart_after.take() {
            Some(lost) => vec![format!("step {step}: paper and exact restart from the measured charges (lost at step {lost})")],
            None => Vec::new(),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The per-column sums ([`field`]) of the last measured step; empty before the first.
    pub fn last_columns(&self) -> &[[f64; FIELDS]] {
        &self.last_columns
    }

    /// The model time now (the clock of group 0's param_group), as a run's rows report it.
    pub fn time(&self) -> f64 {
        let pg = if self.plan.groups() > 0 { self.plan.group_param_group(0) } else { 0 };
        self.clock.get(pg).copied().unwrap_or(0.0)
    }

    fn check(&self, hyper: &[ParamGroupHyper], out: Option<&[f64]>) -> Result<()> {
        if hyper.len() <= self.plan.max_param_group() {
            return Err(Error::Shape(format!(
                "hyperparameters for {} param_groups; the plan reads param_group {}",
                hyper.len(),
                self.plan.max_param_group()
            )));
        }
        // Every param_group the plan reads is checked before anything moves: a bad value is an
        // error that leaves the state as it was, never a half-advanced step.
        let model = self.model_hyper(hyper);
        for lane in &self.lanes {
            let h = model[lane.param_group];
            h.hyper().validate(None)?;
            if h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "nesterov requires momentum > 0 and dampening = 0 (as torch.optim.SGD), got momentum {} and dampening {}",
                    h.momentum, h.dampening
                )));
            }
        }
        if out.is_some_and(|o| o.len() != ROW_FIELDS.len() * self.plan.groups()) {
            return Err(Error::Shape(format!("a run's row is ({}, {}) float64", ROW_FIELDS.len(), self.plan.groups())));
        }
        Ok(())
    }

    fn lane_hyper(&self, hyper: &[ParamGroupHyper]) -> Vec<ParamGroupHyper> {
        self.lanes.iter().map(|l| hyper[l.param_group]).collect()
    }

    /// One measured `torch.optim.SGD` step. `rows`: (rows × k) fused sums of (θ_n, ĝ_n) (k = 5)
    /// or (θ_n, ĝ_n, b_{n−1}) (k = 8, a momentum buffer exists); `extra`: the plain sums of
    /// b_{n−1} over the plan's extra rows, ((extra rows) × 2); `hyper`: per param_group;
    /// `out`: the run's row for θ_n, written in place (None: measured, not recorded).
    pub fn step_sgd(
        &mut self,
        step: usize,
        rows: &[f64],
        k: usize,
        extra: Option<&[f64]>,
        hyper: &[ParamGroupHyper],
        out: Option<&mut [f64]>,
    ) -> Result<StepReport> {
        self.check(hyper, out.as_deref())?;
        self.next_step = step;
        if k != 5 && k != 8 {
            return Err(Error::Shape(format!("an SGD step needs the sums of (θ, ĝ) or (θ, ĝ, b): 5 or 8 per row, got {k}")));
        }
        let has_buffer = k == 8;
        let buffer_sums = if has_buffer { Some(self.plan.scatter_extra(extra.unwrap_or(&[]))?) } else { None };
        let plan = &self.plan;
        let summed = plan
            .sum(rows, k, buffer_sums.as_deref(), |c, kind, s, bs| sgd_part(kind, s, bs, has_buffer, &hyper[plan.column_param_group[c]]))?;
        if let Some(why) = self.non_finite(&summed) {
            return self.non_finite_step(step, why, &summed, hyper, hyper, out);
        }
        let restarted = self.start_or_restart(step, &summed, has_buffer, hyper)?;
        let mut report = self.record(&summed, hyper, hyper, out);
        self.held_drive = summed.columns.iter().map(|c| c[field::DRIVE]).collect();
        report.notes = restarted;
        report.notes.extend(self.advance_paper(step, hyper)?);
        if self.exact == ExactMode::Ledger {
            let lane_hyper = self.lane_hyper(hyper);
            if let Err(err) = self.streams.as_mut().expect("started above").advance_ledger(&summed.columns, &lane_hyper) {
                // A lane may have moved before another failed: every lane restarts at the next
                // good step. Strict: the clock stays, so a retried step counts once.
                self.restart_after = Some(step);
                if self.strict {
                    return Err(err);
                }
                report.notes.push(format!("step {step}: the exact ledger failed ({err}); paper and exact restart at the next good step"));
            }
        }
        self.advance_clock(hyper);
        self.last_columns = summed.columns;
        Ok(report)
    }

    /// One measured step of any other optimizer. `rows`: (rows × 8) fused sums of
    /// (θ_n, ĝ_n, d_n), d_n = θ_n − θ_{n+1}; `extra`: the plain sums of d_n over the plan's
    /// extra rows; `hyper` and `out` as for [`Tracker::step_sgd`]. `step`: the step's index
    /// (for notes).
    pub fn step_update(
        &mut self,
        step: usize,
        rows: &[f64],
        k: usize,
        extra: Option<&[f64]>,
        hyper: &[ParamGroupHyper],
        out: Option<&mut [f64]>,
    ) -> Result<StepReport> {
        self.check(hyper, out.as_deref())?;
        if k != 8 {
            return Err(Error::Shape(format!("a measured update needs the sums of (θ, ĝ, d): 8 per row, got {k}")));
        }
        let update_sums = self.plan.scatter_extra(extra.unwrap_or(&[]))?;
        let model = self.model_hyper(hyper);
        let plan = &self.plan;
        let summed = plan.sum(rows, k, Some(&update_sums), |c, kind, s, ds| {
            let h = &model[plan.column_param_group[c]];
            update_part(kind, s, ds, h.lr, h.weight_decay)
        })?;
        self.next_step = step;
        if let Some(why) = self.non_finite(&summed) {
            return self.non_finite_step(step, why, &summed, hyper, &model, out);
        }
        let restarted = self.start_or_restart(step, &summed, false, &model)?;
        let mut report = self.record(&summed, hyper, &model, out);
        self.held_drive = summed.columns.iter().map(|c| c[field::DRIVE]).collect();
        report.notes = restarted;
        report.notes.extend(self.advance_paper(step, &model)?);
        if self.exact == ExactMode::Measured {
            self.streams.as_mut().expect("started above").advance_measured(&summed.columns)?;
        }
        self.advance_clock(&model);
        self.last_columns = summed.columns;
        Ok(report)
    }

    /// A step that is not measured: the clock moves, and the paper's closed form advances with
    /// the last measured drive. Returns notes (a closed form that stopped).
    pub fn skip(&mut self, step: usize, hyper: &[ParamGroupHyper]) -> Result<Vec<String>> {
        self.check(hyper, None)?;
        self.next_step = step;
        let model = self.model_hyper(hyper);
        let notes = self.advance_paper(step, &model)?;
        self.advance_clock(&model);
        Ok(notes)
    }

    /// The run's state between two steps as named arrays (a checkpoint: [`Tracker::import`]
    /// continues it bit for bit). A lane field added later: one `put` here, one `get` there.
    pub fn export(&self) -> Snapshot {
        let mut s = Snapshot::default();
        s.put_scalar("version", STATE_VERSION);
        s.put("plan", self.fingerprint());
        s.put("clock", self.clock.clone());
        s.put("held_drive", self.held_drive.clone());
        s.put_scalar("next_step", self.next_step as f64);
        s.put("restart_after", self.restart_after.map(|n| vec![n as f64]).unwrap_or_default());
        if let Some(hyper) = &self.regimes_for {
            let flat = hyper.iter().flat_map(|h| [h.lr, h.momentum, h.dampening, h.weight_decay, flag(h.nesterov)]).collect();
            s.put("regimes_for", flat);
        }
        s.put_scalar("streams", flag(self.streams.is_some()));
        for (i, (exact, paper)) in self.streams.iter().flat_map(Lanes::states).enumerate() {
            let key = |name: &str| format!("lane.{i}.{name}");
            match exact {
                Exact::None => s.put_scalar(key("exact"), 0.0),
                Exact::Ledger(l) => {
                    s.put_scalar(key("exact"), 1.0);
                    s.put(key("ledger.y"), l.y().to_vec());
                    s.put(key("ledger.m"), l.buffer_dot().to_vec());
                    s.put_scalar(key("ledger.has_buffer"), flag(l.has_buffer()));
                    s.put_scalar(key("ledger.steps"), l.steps() as f64);
                }
                Exact::Measured(y) => {
                    s.put_scalar(key("exact"), 2.0);
                    s.put(key("measured.y"), y.clone());
                }
            }
            s.put_scalar(key("paper"), flag(paper.is_some()));
            if let Some(p) = paper {
                s.put(key("paper.y"), p.y().to_vec());
                s.put(key("paper.ydot"), p.ydot().to_vec());
                s.put_scalar(key("paper.steps"), p.steps() as f64);
                s.put_scalar(key("paper.t"), p.time());
                s.put_scalar(key("paper.momentum"), p.momentum().map_or(-1.0, flag));
            }
        }
        s
    }

    /// Continue from an [`Tracker::export`] of a tracker with the same plan, optimizer kind and
    /// `every`. Everything is read and checked first: a bad state is an error naming what is
    /// wrong and leaves this tracker as it was.
    pub fn import(&mut self, s: &Snapshot) -> Result<()> {
        let bad = |what: String| Error::InvalidArgument(format!("tracker state: {what}"));
        let version = s.scalar("version")?;
        if version != STATE_VERSION {
            return Err(bad(format!("version {version}, this tracker reads version {STATE_VERSION}")));
        }
        if s.get("plan")? != self.fingerprint().as_slice() {
            return Err(bad(format!(
                "it was saved by a tracker of another plan or optimizer (rows, parts, columns, groups, lanes, exact, paper: {:?}, here {:?})",
                s.get("plan")?,
                self.fingerprint()
            )));
        }
        let clock = s.finite("clock", s.get("clock")?.len())?.to_vec();
        let held_drive = s.finite("held_drive", self.plan.columns())?.to_vec();
        let next_step = s.count("next_step")?;
        let restart_after = match s.get("restart_after")?.len() {
            0 => None,
            _ => Some(s.count("restart_after")?),
        };
        let regimes_for = if s.has("regimes_for") {
            let flat = s.get("regimes_for")?;
            if flat.len() % 5 != 0 || flat.iter().any(|v| !v.is_finite()) {
                return Err(bad("\"regimes_for\" must hold 5 finite values per param_group".into()));
            }
            Some(
                flat.chunks_exact(5)
                    .map(|h| ParamGroupHyper { lr: h[0], momentum: h[1], dampening: h[2], weight_decay: h[3], nesterov: h[4] != 0.0 })
                    .collect(),
            )
        } else {
            None
        };
        let streams = if s.flag("streams")? { Some(self.import_lanes(s)?) } else { None };
        (self.clock, self.held_drive, self.next_step, self.restart_after) = (clock, held_drive, next_step, restart_after);
        (self.regimes_for, self.streams) = (regimes_for, streams);
        self.last_columns.clear();
        Ok(())
    }

    fn import_lanes(&self, s: &Snapshot) -> Result<Lanes> {
        let mut lanes = Lanes::new(self.plan.column_group.clone(), self.plan.groups())?;
        for (i, spec) in self.lanes.iter().enumerate() {
            let key = |name: &str| format!("lane.{i}.{name}");
            let n = spec.cols.len();
            let exact = match s.scalar(&key("exact"))? {
                0.0 => Exact::None,
                1.0 => Exact::Ledger(LedgerState::from_parts(
                    spec.kind,
                    s.finite(&key("ledger.y"), n)?,
                    s.finite(&key("ledger.m"), n)?,
                    s.flag(&key("ledger.has_buffer"))?,
                    s.count(&key("ledger.steps"))?,
                )?),
                2.0 => Exact::Measured(s.finite(&key("measured.y"), n)?.to_vec()),
                v => return Err(Error::InvalidArgument(format!("tracker state: {:?} is {v}, not 0, 1 or 2", key("exact")))),
            };
            let paper = if s.flag(&key("paper"))? {
                let m = spec.paper_cols.len();
                let momentum = match s.scalar(&key("paper.momentum"))? {
                    -1.0 => None,
                    v => Some(v == 1.0),
                };
                Some(PaperState::from_parts(
                    spec.kind,
                    s.finite(&key("paper.y"), m)?,
                    s.finite(&key("paper.ydot"), m)?,
                    s.count(&key("paper.steps"))?,
                    s.scalar(&key("paper.t"))?,
                    momentum,
                )?)
            } else {
                None
            };
            lanes.add(spec.kind, spec.cols.clone(), spec.paper_cols.clone(), exact, paper)?;
        }
        Ok(lanes)
    }

    /// What a state must match: the plan's shape, its lanes, and the kind of theories.
    fn fingerprint(&self) -> Vec<f64> {
        let p = &self.plan;
        let exact = match self.exact {
            ExactMode::None => 0.0,
            ExactMode::Ledger => 1.0,
            ExactMode::Measured => 2.0,
        };
        [p.rows(), p.parts(), p.columns(), p.groups(), self.lanes.len()]
            .iter()
            .map(|&n| n as f64)
            .chain([exact, flag(self.sgd), flag(self.rule.decoupled), self.rule.beta1])
            .collect()
    }

    /// The charges of the parameters now, from `rows` (rows × 2: Σθ, Σθ² per row), with the
    /// theories' current predictions; None before the first measured step.
    pub fn final_row(&self, rows: &[f64], k: usize) -> Result<Option<FinalRow>> {
        let Some(streams) = &self.streams else { return Ok(None) };
        let summed = self.plan.sum(rows, k, None, |_, kind, s, _| {
            let mut v = [0.0; FIELDS];
            v[field::CHARGE] = if kind == Kind::Translation { s[0] } else { s[1] };
            v
        })?;
        let (paper, exact) = self.predictions(streams);
        Ok(Some(FinalRow {
            time: self.time(),
            measured: summed.groups.iter().map(|g| g[field::CHARGE]).collect(),
            magnitude: summed.unsigned.iter().enumerate().map(|(g, u)| self.plan.magnitude(g, u)).collect(),
            paper,
            exact,
        }))
    }

    /// The streams of every lane from the first measured step's charges (and, when the
    /// optimizer already holds a momentum buffer, ⟨θ_0, b_{−1}⟩: docs/theory.md §5.2, §5.3).
    fn start_streams(&mut self, summed: &Summed, has_buffer: bool, hyper: &[ParamGroupHyper]) -> Result<()> {
        let y0: Vec<f64> = summed.columns.iter().map(|c| c[field::CHARGE]).collect();
        let buffer_dot: Option<Vec<f64>> = has_buffer.then(|| summed.columns.iter().map(|c| c[field::BUFFER_DOT]).collect());
        let mut streams = Lanes::new(self.plan.column_group.clone(), self.plan.groups())?;
        for lane in &self.lanes {
            let exact = match self.exact {
                ExactMode::Ledger => {
                    let b0 = buffer_dot.as_ref().map(|b| take(b, &lane.cols));
                    Exact::Ledger(LedgerState::new(lane.kind, &take(&y0, &lane.cols), b0.as_deref())?)
                }
                ExactMode::Measured => Exact::Measured(take(&y0, &lane.cols)),
                ExactMode::None => Exact::None,
            };
            let paper = if !lane.paper_cols.is_empty() {
                let h = hyper[lane.param_group];
                // ẏ(0) = −2⟨θ_0, b_{−1}⟩/(1−d) (translation: −⟨1, b_{−1}⟩/(1−d)).
                let factor = if lane.kind == Kind::Translation { -1.0 } else { -2.0 };
                let ydot0 = match &buffer_dot {
                    Some(b) if h.momentum > 0.0 => {
                        Some(take(b, &lane.paper_cols).iter().map(|v| factor * v / (1.0 - h.dampening)).collect::<Vec<_>>())
                    }
                    _ => None,
                };
                Some(PaperState::new(lane.kind, &take(&y0, &lane.paper_cols), ydot0.as_deref())?)
            } else {
                None
            };
            streams.add(lane.kind, lane.cols.clone(), lane.paper_cols.clone(), exact, paper)?;
        }
        self.streams = Some(streams);
        Ok(())
    }

    /// Write the row of θ_n (if asked) and the regimes to report; the theories are not moved.
    /// `hyper`: the optimizer's hyperparameters (the row's); `model`: the theories'
    /// ([`Tracker::model_hyper`]).
    fn record(&mut self, summed: &Summed, hyper: &[ParamGroupHyper], model: &[ParamGroupHyper], out: Option<&mut [f64]>) -> StepReport {
        let report = StepReport { time: self.time(), notes: Vec::new(), regimes: self.regimes(model) };
        let (Some(out), Some(streams)) = (out, &self.streams) else { return report };
        let plan = &self.plan;
        let groups = plan.groups();
        let (paper, exact) = self.predictions(streams);
        let mut rows = out.chunks_exact_mut(groups.max(1));
        let mut next = || rows.next().unwrap_or_default();
        let [lr, momentum, dampening, weight_decay, measured, paper_row, exact_row, grad_sq, update_sq, flux, update_sum, magnitude, residual, decay, drive, breaking, effective_lr, angular_update, effective_lr_eq, angular_update_eq] =
            std::array::from_fn(|_| next());
        for (g, (values, u)) in summed.groups.iter().zip(&summed.unsigned).enumerate() {
            let pg = plan.group_param_group(g);
            let h = hyper[pg];
            lr[g] = h.lr;
            momentum[g] = h.momentum;
            dampening[g] = h.dampening;
            weight_decay[g] = h.weight_decay;
            measured[g] = values[field::CHARGE];
            paper_row[g] = paper[g];
            exact_row[g] = exact[g];
            grad_sq[g] = values[field::GRAD_SQ];
            update_sq[g] = values[field::UPDATE_SQ];
            flux[g] = values[field::FLUX];
            update_sum[g] = if plan.group_kind[g] == Kind::Translation { values[field::UPDATE_SUM] } else { f64::NAN };
            magnitude[g] = plan.magnitude(g, u);
            residual[g] = plan.residual(g, values[field::FLUX], u);
            decay[g] = values[field::DECAY_TERM];
            drive[g] = values[field::DRIVE_TERM];
            breaking[g] = values[field::BREAKING_TERM];
            let angular = self.angular(g, values, &h, &model[pg]);
            effective_lr[g] = angular[0];
            angular_update[g] = angular[1];
            effective_lr_eq[g] = angular[2];
            angular_update_eq[g] = angular[3];
        }
        report
    }

    /// A scale group's (effective angular learning rate, angle of the step, and their §5.4
    /// equilibrium values), docs/theory.md §5.6; NaN for other groups, and the equilibrium NaN
    /// where §5.4 predicts none (λ = 0, coupled decay under a preconditioner, a group whose
    /// parts sit in param_groups with different hyperparameters).
    fn angular(&self, g: usize, values: &[f64; FIELDS], h: &ParamGroupHyper, model: &ParamGroupHyper) -> [f64; 4] {
        if self.plan.group_kind[g] != Kind::Scale {
            return [f64::NAN; 4];
        }
        let x = values[field::CHARGE];
        let (td, dd) = (values[field::STEP_DOT], values[field::STEP_SQ]);
        // The step's component across θ_n over its component along θ_n: no cancellation when
        // the angle is tiny (1 − cos would lose it all).
        let across = (dd - td * td / x).max(0.0).sqrt();
        let angle = across.atan2((x - td) / x.sqrt());
        let effective = if self.sgd { h.lr / x } else { h.lr / x.sqrt() };
        let one_column = self.plan.group_columns(g) == 1;
        let eq = if !one_column || model.weight_decay <= 0.0 {
            None
        } else if self.sgd {
            equilibrium::sgd(h.lr, h.weight_decay, values[field::GRAD_SQ] * x, h.momentum, h.dampening).ok()
        } else if self.rule.decoupled {
            equilibrium::adamw(h.lr, h.weight_decay, values[field::DRIVE], self.rule.beta1).ok()
        } else {
            None
        };
        let (lr_eq, angle_eq) = eq.map_or((f64::NAN, f64::NAN), |e| (e.effective_lr, e.angular_update));
        [effective, angle, lr_eq, angle_eq]
    }

    /// The streams' (paper, exact) per group; NaN while the theories wait to restart.
    fn predictions(&self, streams: &Lanes) -> (Vec<f64>, Vec<f64>) {
        if self.restart_after.is_some() {
            let nan = vec![f64::NAN; self.plan.groups()];
            return (nan.clone(), nan);
        }
        streams.predictions()
    }

    /// (symmetry, regime) of every lane's hyperparameters (the last lane of a kind wins), when
    /// they differ from the last report.
    fn regimes(&mut self, hyper: &[ParamGroupHyper]) -> Vec<(&'static str, &'static str)> {
        if self.regimes_for.as_deref() == Some(hyper) {
            return Vec::new();
        }
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for lane in &self.lanes {
            // A regime is a label: hyperparameters it cannot classify read "n/a".
            let name = regime(lane.kind, hyper[lane.param_group].hyper()).map(|r| r.name()).unwrap_or("n/a");
            match out.iter_mut().find(|(kind, _)| *kind == lane.kind.name()) {
                Some(entry) => entry.1 = name,
                None => out.push((lane.kind.name(), name)),
            }
        }
        self.regimes_for = Some(hyper.to_vec());
        out
    }

    /// One step of every lane's closed form with the held drive. A lane whose closed form fails
    /// (momentum switched between zero and non-zero mid-run) stops there, with a note.
    fn advance_paper(&mut self, step: usize, hyper: &[ParamGroupHyper]) -> Result<Vec<String>> {
        let lane_hyper = self.lane_hyper(hyper);
        let Some(streams) = &mut self.streams else { return Ok(Vec::new()) };
        if self.restart_after.is_some() {
            return Ok(Vec::new()); // lost: the streams restart from the next good step's charges
        }
        let failed = streams.advance_paper(&self.held_drive, &lane_hyper)?;
        Ok(failed
            .into_iter()
            .map(|(lane, why)| {
                let kind = streams.kind(lane).map_or("?", Kind::name);
                format!("paper closed form stopped at step {step} for {kind}: {why}")
            })
            .collect())
    }

    /// t_{n+1} = t_n + η_n(1 − d_n) per param_group (PyTorch ignores dampening without momentum).
    fn advance_clock(&mut self, hyper: &[ParamGroupHyper]) {
        self.next_step += 1;
        if self.clock.len() < hyper.len() {
            self.clock.resize(hyper.len(), 0.0); // optimizer.add_param_group() during training
        }
        for (t, h) in self.clock.iter_mut().zip(hyper) {
            *t += h.lr * (1.0 - if h.momentum > 0.0 { h.dampening } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::plan::PlanArrays;

    /// One scale group (two rows = two parts, one column) and one translation group (one row).
    fn plan() -> Plan {
        Plan::new(PlanArrays {
            part_row_starts: vec![0, 1, 2, 3],
            part_rows: vec![0, 1, 2],
            part_sign: vec![1.0, 1.0, 1.0],
            part_column: vec![0, 0, 1],
            part_size: vec![2.0, 2.0, 3.0],
            column_group: vec![0, 1],
            column_param_group: vec![0, 0],
            group_kind: vec![1, 0],
            group_size: vec![4.0, 3.0],
            group_layer: vec![],
            part_layer: vec![],
            extra_rows: vec![2],
            rows: 3,
        })
        .unwrap()
    }

    fn sgd(lr: f64, momentum: f64) -> ParamGroupHyper {
        ParamGroupHyper { lr, momentum, dampening: 0.0, weight_decay: 1e-3, nesterov: false }
    }

    #[test]
    fn a_step_writes_the_row_then_moves_clock_and_theories() {
        let mut t = Tracker::new(plan(), true, 1);
        let rows = [1.0, 2.0, 0.1, 0.5, 0.0, /* */ -1.0, 3.0, 0.2, 0.5, 0.0, /* */ 0.5, 1.0, 0.0, 0.3, 0.1];
        let mut out = vec![f64::NAN; ROW_FIELDS.len() * 2];
        let report = t.step_sgd(0, &rows, 5, None, &[sgd(0.1, 0.0)], Some(&mut out)).unwrap();
        assert_eq!(report.time, 0.0);
        assert_eq!(report.regimes, vec![("translation", "first-order"), ("scale", "first-order")]);
        let at = |field: &str, g: usize| out[ROW_FIELDS.iter().position(|f| *f == field).unwrap() * 2 + g];
        assert_eq!((at("measured", 0), at("measured", 1)), (5.0, 0.5));
        assert_eq!((at("paper", 0), at("exact", 1)), (5.0, 0.5)); // predictions of θ_0: the start
        assert_eq!(at("lr", 1), 0.1);
        assert!(at("update_sum", 0).is_nan() && at("update_sum", 1).is_finite());
        assert_eq!(at("residual", 0), 0.0); // ⟨θ, ĝ⟩ = 0: a perfect scale symmetry
        assert!((t.time() - 0.1).abs() < 1e-15);
        // Same hyperparameters: no regimes to report; a skipped step moves the clock.
        assert!(t.step_sgd(1, &rows, 5, None, &[sgd(0.1, 0.0)], None).unwrap().regimes.is_empty());
        t.skip(2, &[sgd(0.2, 0.0)]).unwrap();
        assert!((t.time() - 0.4).abs() < 1e-15);
        let last = t.final_row(&[1.0, 2.0, -1.0, 3.0, 0.5, 1.0], 2).unwrap().unwrap();
        assert_eq!(last.measured, vec![5.0, 0.5]);
        assert_eq!(last.magnitude, vec![5.0, 3f64.sqrt()]);
    }

    #[test]
    fn momentum_switched_off_stops_the_closed_form_with_a_note() {
        let mut t = Tracker::new(plan(), true, 1);
        let rows = [1.0; 15];
        t.step_sgd(0, &rows, 5, None, &[sgd(0.1, 0.9)], None).unwrap();
        let report = t.step_sgd(1, &[1.0; 24], 8, Some(&[0.5, 0.25]), &[sgd(0.1, 0.0)], None).unwrap();
        assert_eq!(report.notes.len(), 2, "{:?}", report.notes);
        assert!(report.notes[0].starts_with("paper closed form stopped at step 1 for translation"));
    }

    #[test]
    fn non_finite_sums_hold_the_theories_then_restart_them() {
        let mut t = Tracker::new(plan(), true, 1);
        let h = [sgd(0.1, 0.0)];
        let rows = [1.0, 2.0, 0.1, 0.5, 0.0, -1.0, 3.0, 0.2, 0.5, 0.0, 0.5, 1.0, 0.0, 0.3, 0.1];
        t.step_sgd(0, &rows, 5, None, &h, None).unwrap();
        let mut bad = rows;
        bad[3] = f64::NAN; // |ĝ|² of row 0
        let mut out = vec![0.0; ROW_FIELDS.len() * 2];
        let report = t.step_sgd(1, &bad, 5, None, &h, Some(&mut out)).unwrap();
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        assert!(report.notes[0].starts_with("step 1: non-finite sums in 1 of 2 groups (group 0: grad_sq is NaN"));
        let exact = ROW_FIELDS.iter().position(|f| *f == "exact").unwrap();
        assert!(out[exact * 2].is_nan() && out[exact * 2 + 1].is_nan());
        assert!((t.time() - 0.2).abs() < 1e-15, "the clock moves: the optimizer took the step");
        // Still lost: no second note; then finite sums restart every lane from the measured charges.
        assert!(t.step_sgd(2, &bad, 5, None, &h, None).unwrap().notes.is_empty());
        let report = t.step_sgd(3, &rows, 5, None, &h, Some(&mut out)).unwrap();
        assert_eq!(report.notes, vec!["step 3: paper and exact restart from the measured charges (lost at step 1)".to_string()]);
        assert_eq!((out[exact * 2], out[exact * 2 + 1]), (5.0, 0.5));
        // Strict: an error, and nothing moved.
        let mut strict = Tracker::new(plan(), true, 1);
        strict.set_strict(true);
        strict.step_sgd(0, &rows, 5, None, &h, None).unwrap();
        let before = strict.export();
        assert!(matches!(strict.step_sgd(1, &bad, 5, None, &h, None), Err(Error::NonFinite(_))));
        assert_eq!(strict.export(), before);
        // A lost step: the clock moves, predictions are NaN until the next good step.
        strict.lose(1, &h).unwrap();
        assert!(strict.final_row(&[1.0, 2.0, -1.0, 3.0, 0.5, 1.0], 2).unwrap().unwrap().exact[0].is_nan());
        assert!((strict.time() - 0.2).abs() < 1e-15);
    }

    #[test]
    fn an_exported_state_continues_bit_for_bit_and_a_foreign_one_is_refused() {
        let rows = |n: usize| -> Vec<f64> { (0..24).map(|i| 0.5 + ((i * 7 + n * 3) % 11) as f64 * 0.1).collect() };
        let hyper = |n: usize| [sgd(0.1 / (1.0 + n as f64), if (3..5).contains(&n) { 0.0 } else { 0.9 })];
        let run = |t: &mut Tracker, range: std::ops::Range<usize>| -> Vec<f64> {
            let mut last = vec![0.0; ROW_FIELDS.len() * 2];
            for n in range {
                let k = if n == 0 { 5 } else { 8 };
                t.step_sgd(n, &rows(n)[..3 * k], k, (k == 8).then_some(&[0.3, 0.2][..]), &hyper(n), Some(&mut last)).unwrap();
            }
            last
        };
        let mut whole = Tracker::new(plan(), true, 1);
        let expected = run(&mut whole, 0..8);
        let mut first = Tracker::new(plan(), true, 1);
        run(&mut first, 0..4);
        let state = first.export();
        let mut resumed = Tracker::new(plan(), true, 1);
        resumed.import(&state).unwrap();
        assert_eq!(resumed.export(), state);
        let got = run(&mut resumed, 4..8);
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(resumed.time().to_bits(), whole.time().to_bits());
        // Another kind of tracker, a missing entry, a bad value: refused, nothing moved.
        let mut other = Tracker::new(plan(), false, 1);
        assert!(other.import(&state).unwrap_err().to_string().contains("another plan"));
        let mut broken = state.clone();
        broken.0.remove("lane.0.ledger.m");
        assert!(resumed.import(&broken).unwrap_err().to_string().contains("\"lane.0.ledger.m\" is missing"));
        broken = state.clone();
        broken.put("clock", vec![f64::NAN]);
        assert!(resumed.import(&broken).is_err());
        assert_eq!(resumed.export().0["clock"], whole.export().0["clock"]);
    }

    #[test]
    fn bad_input_is_an_error_and_leaves_the_state() {
        let mut t = Tracker::new(plan(), false, 1);
        let h = [sgd(0.1, 0.0)];
        assert!(matches!(t.step_update(0, &[0.0; 15], 5, None, &h, None), Err(Error::Shape(_))));
        assert!(matches!(t.step_update(0, &[0.0; 24], 8, None, &h, None), Err(Error::Shape(_)))); // extra rows missing
        assert!(matches!(t.step_update(0, &[0.0; 24], 8, Some(&[0.0; 2]), &[], None), Err(Error::Shape(_))));
        assert!(matches!(t.step_update(0, &[0.0; 24], 8, Some(&[0.0; 2]), &h, Some(&mut [0.0; 3])), Err(Error::Shape(_))));
        assert!(t.final_row(&[0.0; 6], 2).unwrap().is_none());
        assert_eq!(t.time(), 0.0);
        t.step_update(0, &[0.0; 24], 8, Some(&[0.0; 2]), &h, None).unwrap();
        assert!((t.time() - 0.1).abs() < 1e-15);
    }
    #[test]
    fn another_optimizer_gets_the_paper_form_on_its_update_and_the_split() {
        // One scale group (two parts) and one translation group; AdamW-like decoupled decay.
        let mut t = Tracker::new(plan(), false, 1);
        assert!(matches!(t.set_update_rule(UpdateRule { decoupled: true, beta1: 1.0 }), Err(Error::InvalidArgument(_))));
        t.set_update_rule(UpdateRule { decoupled: true, beta1: 0.9 }).unwrap();
        let h = [ParamGroupHyper { lr: 0.1, momentum: 0.0, dampening: 0.0, weight_decay: 0.5, nesterov: false }];
        // Per row: Σθ, Σθ², Σĝ, Σĝ², Σθĝ, Σd², Σθd, Σĝd.
        let rows = [
            1.0, 2.0, 0.1, 0.5, 0.0, 0.02, 0.1, 0.0, /* */ -1.0, 3.0, 0.2, 0.5, 0.0, 0.03, 0.15, 0.0, /* */ 0.5, 1.0, 0.0, 0.3,
            0.1, 0.0, 0.0, 0.0,
        ];
        let mut out = vec![f64::NAN; ROW_FIELDS.len() * 2];
        t.step_update(0, &rows, 8, Some(&[0.05, 0.0]), &h, Some(&mut out)).unwrap();
        let at = |out: &[f64], field: &str, g: usize| out[ROW_FIELDS.iter().position(|f| *f == field).unwrap() * 2 + g];
        // The split adds up to the change −2⟨θ, d⟩ + |d|² (scale) and −⟨1, d⟩ (translation).
        let split = |out: &[f64], g: usize| at(out, "decay", g) + at(out, "drive", g) + at(out, "breaking", g);
        assert!((split(&out, 0) - (-2.0 * 0.25 + 0.05)).abs() < 1e-15);
        assert!((split(&out, 1) + 0.05).abs() < 1e-15);
        assert!((at(&out, "decay", 0) - ((1.0 - 0.05f64).powi(2) - 1.0) * 5.0).abs() < 1e-15);
        // The angle of the step and the AdamW equilibrium (scale only).
        let (x, td, dd) = (5.0f64, 0.25, 0.05);
        let angle = (dd - td * td / x).sqrt().atan2((x - td) / x.sqrt());
        assert!((at(&out, "angular_update", 0) - angle).abs() < 1e-15);
        assert!((at(&out, "angular_update_eq", 0) - (2.0 * 0.1 * 0.5 * 0.1 / 1.9f64).sqrt()).abs() < 1e-15);
        assert_eq!(at(&out, "effective_lr", 0), 0.1 / x.sqrt());
        assert!(at(&out, "angular_update", 1).is_nan() && at(&out, "effective_lr_eq", 1).is_nan());
        // The paper's form runs (first order, t = Σ η): translation decays as e^{−λt}.
        t.step_update(1, &rows, 8, Some(&[0.05, 0.0]), &h, Some(&mut out)).unwrap();
        assert!((at(&out, "paper", 1) - 0.5 * (-0.5f64 * 0.1).exp()).abs() < 1e-15);
        assert!(at(&out, "paper", 0).is_finite());
    }
}
