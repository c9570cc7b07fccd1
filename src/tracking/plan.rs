//! The index maps of a measurement plan, and the one signed sum from parts to columns to groups.
//!
//! The Python planner (`tracking/plan.py`) lists every distinct reduction once and numbers its
//! output rows; this module takes the resulting maps, checks them once, and from then on every
//! per-step path (SGD, any other optimizer, the final row) adds rows into parts, parts into
//! columns with their signs, and columns into groups through [`Plan::sum`].

use crate::error::{Error, Result};
use crate::theory::Kind;

/// How many values one part (and one column, and one group) carries per step: see [`field`].
pub const FIELDS: usize = 14;

/// The names of the [`field`]s, in order (`_native.COLUMN_FIELDS`).
pub const FIELD_NAMES: [&str; FIELDS] = [
    "charge",
    "flux",
    "grad_sq",
    "update_sq",
    "update_dot",
    "drive",
    "update_sum",
    "buffer_dot",
    "change",
    "decay_term",
    "drive_term",
    "breaking_term",
    "step_dot",
    "step_sq",
];

/// The per-part values of one step, summed with the part's sign into columns and groups.
pub mod field {
    /// The charge: ⟨1, θ⟩ (translation) or |θ|² (scale, rescale side).
    pub const CHARGE: usize = 0;
    /// The breaking flux: ⟨1, ĝ⟩ (translation) or ⟨θ, ĝ⟩.
    pub const FLUX: usize = 1;
    /// |ĝ|².
    pub const GRAD_SQ: usize = 2;
    /// |u|², the step direction's squared norm.
    pub const UPDATE_SQ: usize = 3;
    /// ⟨u_n, b_n⟩ (the Nesterov ledger's input); with β = 0 and an existing buffer, which
    /// PyTorch keeps untouched, ⟨u_n, b_{n−1}⟩ (the ledger follows ⟨θ, b⟩ with it).
    pub const UPDATE_DOT: usize = 4;
    /// The paper's drive: |ĝ|² without momentum, |b_n|² with it.
    pub const DRIVE: usize = 5;
    /// ⟨1, u⟩.
    pub const UPDATE_SUM: usize = 6;
    /// ⟨θ_n, b_{n−1}⟩ (⟨1, b_{n−1}⟩ for translation): the ledger's and closed form's start.
    pub const BUFFER_DOT: usize = 7;
    /// The measured change of the charge over the step (optimizers other than SGD).
    pub const CHANGE: usize = 8;
    /// The step's change of the charge split in three (docs/theory.md §5.5), adding up to it
    /// exactly: the weight-decay term, ...
    pub const DECAY_TERM: usize = 9;
    /// ... the η²|u|² drive term (0 for translation), ...
    pub const DRIVE_TERM: usize = 10;
    /// ... and the term that breaks the symmetry (with SGD momentum, also the buffer's inertia).
    pub const BREAKING_TERM: usize = 11;
    /// ⟨θ_n, d_n⟩ with d_n = θ_n − θ_{n+1} (scale, rescale side): the step along θ (§5.6).
    pub const STEP_DOT: usize = 12;
    /// |d_n|²: the step's squared length (§5.6).
    pub const STEP_SQ: usize = 13;
}

/// The sums of one part's rows, in the kernel's order (`stats::Sums::NAMES`), zero past `k`.
pub type PartSums = [f64; 8];

/// The index maps, as the Python planner builds them (integers as i64, checked here).
#[derive(Clone, Debug, Default)]
pub struct PlanArrays {
    pub part_row_starts: Vec<i64>,
    pub part_rows: Vec<i64>,
    pub part_sign: Vec<f64>,
    pub part_column: Vec<i64>,
    /// Entries per part (checked for length; the plan itself does not need them).
    pub part_size: Vec<f64>,
    pub column_group: Vec<i64>,
    pub column_param_group: Vec<i64>,
    pub group_kind: Vec<i64>,
    pub group_size: Vec<f64>,
    /// Each group's layer (an index shared by the groups named after one layer, any symmetry):
    /// the "no gradient" rule compares a group's gradient with its layer's ([`Plan::residual`]).
    /// Empty: every group in one layer.
    pub group_layer: Vec<i64>,
    /// Each part's layer (the module of its parameter), same numbering; empty: its group's.
    /// A layer's |ĝ|² adds every part in it, whichever group the part belongs to.
    pub part_layer: Vec<i64>,
    /// The rows whose plain sums of a third array (the momentum buffer, or the measured update)
    /// come in a separate block, in that block's order (the translation reductions' rows).
    pub extra_rows: Vec<i64>,
    /// Output rows of all reductions together.
    pub rows: i64,
}

/// A checked measurement plan.
#[derive(Clone, Debug)]
pub struct Plan {
    part_row_starts: Vec<usize>,
    part_rows: Vec<usize>,
    part_sign: Vec<f64>,
    part_column: Vec<usize>,
    pub(crate) column_group: Vec<usize>,
    pub(crate) column_param_group: Vec<usize>,
    pub(crate) group_kind: Vec<Kind>,
    group_size: Vec<f64>,
    group_layer: Vec<usize>,
    part_layer: Vec<usize>,
    layers: usize,
    extra_rows: Vec<usize>,
    rows: usize,
    /// Each group's first column (columns are runs of one group): its param_group gives the
    /// group's hyperparameters in a run's row.
    group_first_column: Vec<usize>,
    /// The number of columns of each group (a closed form needs a group of one column).
    group_columns: Vec<usize>,
}

/// Per group, sums over its parts without signs: |θ|², |ĝ|² and Σ|ĝ||θ| (magnitudes, residuals),
/// and |ĝ_L|², the |ĝ|² of every group of its layer added up (the "no gradient" reference).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unsigned {
    pub x: f64,
    pub gg: f64,
    pub norm_prod: f64,
    pub layer_gg: f64,
}

/// One step summed: per column and per group the signed sums of the part values, per group the
/// unsigned sums.
#[derive(Clone, Debug)]
pub struct Summed {
    pub columns: Vec<[f64; FIELDS]>,
    pub groups: Vec<[f64; FIELDS]>,
    pub unsigned: Vec<Unsigned>,
}

fn indices(values: &[i64], name: &str, bound: usize, bound_name: &str) -> Result<Vec<usize>> {
    values
        .iter()
        .map(|&v| match usize::try_from(v) {
            Ok(i) if i < bound => Ok(i),
            _ => Err(Error::Shape(format!("tracker plan: {name} holds {v}, outside 0..{bound} ({bound_name})"))),
        })
        .collect()
}

impl Plan {
    pub fn new(a: PlanArrays) -> Result<Plan> {
        let bad = |m: String| Err(Error::Shape(format!("tracker plan: {m}")));
        let parts = a.part_sign.len();
        if a.part_column.len() != parts || a.part_size.len() != parts || a.part_row_starts.len() != parts + 1 {
            return bad("per-part arrays differ in length".into());
        }
        let groups = a.group_kind.len();
        if a.group_size.len() != groups || a.column_param_group.len() != a.column_group.len() {
            return bad("per-group or per-column arrays differ in length".into());
        }
        let Ok(rows) = usize::try_from(a.rows) else { return bad(format!("rows = {}", a.rows)) };
        let columns = a.column_group.len();
        let part_rows = indices(&a.part_rows, "part_rows", rows, "the reductions' rows")?;
        let part_row_starts = indices(&a.part_row_starts, "part_row_starts", part_rows.len() + 1, "part_rows")?;
        if part_row_starts.first() != Some(&0)
            || part_row_starts.windows(2).any(|w| w[0] > w[1])
            || part_row_starts[parts] != part_rows.len()
        {
            return bad("part row offsets must rise from 0 to the number of part rows".into());
        }
        let part_column = indices(&a.part_column, "part_column", columns, "columns")?;
        let column_group = indices(&a.column_group, "column_group", groups, "groups")?;
        let column_param_group = indices(&a.column_param_group, "column_param_group", usize::MAX, "param_groups")?;
        let extra_rows = indices(&a.extra_rows, "extra_rows", rows, "the reductions' rows")?;
        let group_layer = if a.group_layer.is_empty() {
            vec![0; groups]
        } else if a.group_layer.len() != groups {
            return bad(format!("group_layer has {} entries for {groups} groups", a.group_layer.len()));
        } else {
            indices(&a.group_layer, "group_layer", groups, "groups")?
        };
        let part_layer = if a.part_layer.is_empty() {
            Vec::new()
        } else if a.part_layer.len() != parts {
            return bad(format!("part_layer has {} entries for {parts} parts", a.part_layer.len()));
        } else {
            indices(&a.part_layer, "part_layer", parts.max(groups), "layers")?
        };
        let layers = group_layer.iter().chain(&part_layer).max().map_or(0, |&l| l + 1);
        let group_kind = a
            .group_kind
            .iter()
            .map(|&k| match k {
                0 => Ok(Kind::Translation),
                1 => Ok(Kind::Scale),
                2 => Ok(Kind::Rescale),
                _ => Err(Error::Shape(format!("tracker plan: group kind {k} is not 0, 1 or 2"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut group_first_column = vec![usize::MAX; groups];
        let mut group_columns = vec![0; groups];
        for (c, &g) in column_group.iter().enumerate() {
            group_first_column[g] = group_first_column[g].min(c);
            group_columns[g] += 1;
        }
        if group_columns.contains(&0) {
            return bad("a group has no column".into());
        }
        Ok(Plan {
            part_row_starts,
            part_rows,
            part_sign: a.part_sign,
            part_column,
            column_group,
            column_param_group,
            group_kind,
            group_size: a.group_size,
            group_layer,
            part_layer,
            layers,
            extra_rows,
            rows,
            group_first_column,
            group_columns,
        })
    }

    pub fn parts(&self) -> usize {
        self.part_sign.len()
    }
    pub fn columns(&self) -> usize {
        self.column_group.len()
    }
    pub fn groups(&self) -> usize {
        self.group_kind.len()
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn extra_rows(&self) -> usize {
        self.extra_rows.len()
    }
    pub fn group_size(&self, g: usize) -> f64 {
        self.group_size[g]
    }
    /// The param_group whose hyperparameters a run's row shows for group `g`.
    pub fn group_param_group(&self, g: usize) -> usize {
        self.column_param_group[self.group_first_column[g]]
    }
    /// Whether column `c` is a whole group (the paper's closed form applies only then).
    /// The number of columns of group `g` (1: all its parts share one param_group).
    pub fn group_columns(&self, g: usize) -> usize {
        self.group_columns[g]
    }
    pub fn is_whole_group(&self, c: usize) -> bool {
        self.group_columns[self.column_group[c]] == 1
    }
    pub fn column_kind(&self, c: usize) -> Kind {
        self.group_kind[self.column_group[c]]
    }
    /// The highest param_group index the plan refers to.
    pub fn max_param_group(&self) -> usize {
        self.column_param_group.iter().copied().max().unwrap_or(0)
    }

    /// A dense per-row vector of the extra block's plain sums (`extra` holds (sum, sum of
    /// squares) per extra row, the kernel's 2-sum layout); zero for the other rows.
    pub fn scatter_extra(&self, extra: &[f64]) -> Result<Vec<f64>> {
        if extra.len() != 2 * self.extra_rows.len() {
            return Err(Error::Shape(format!("the extra block has {} values; the plan needs ({}, 2)", extra.len(), self.extra_rows.len())));
        }
        let mut dense = vec![0.0; self.rows];
        for (&r, pair) in self.extra_rows.iter().zip(extra.chunks_exact(2)) {
            dense[r] = pair[0];
        }
        Ok(dense)
    }

    /// Sum one step: `rows` (rows × k sums, k = 2, 5 or 8, the kernel's order) into per-part
    /// sums, then `part_values(column, kind, sums, extra sum)` of each part into columns and
    /// groups with the part's sign. `extra` is a dense per-row vector ([`Plan::scatter_extra`]) or None (zero).
    pub fn sum(
        &self,
        rows: &[f64],
        k: usize,
        extra: Option<&[f64]>,
        mut part_values: impl FnMut(usize, Kind, &PartSums, f64) -> [f64; FIELDS],
    ) -> Result<Summed> {
        if !matches!(k, 2 | 5 | 8) || rows.len() != self.rows * k {
            return Err(Error::Shape(format!(
                "rows must be ({}, 2, 5 or 8) for this plan; got {} values of width {k}",
                self.rows,
                rows.len()
            )));
        }
        if extra.is_some_and(|e| e.len() != self.rows) {
            return Err(Error::Shape("the extra sums must have one value per row".into()));
        }
        let mut columns = vec![[0.0; FIELDS]; self.columns()];
        let mut unsigned = vec![Unsigned::default(); self.groups()];
        let mut layer_gg = vec![0.0; self.layers];
        for part in 0..self.parts() {
            let mut s: PartSums = [0.0; 8];
            let mut extra_sum = 0.0;
            for &r in &self.part_rows[self.part_row_starts[part]..self.part_row_starts[part + 1]] {
                for (acc, v) in s.iter_mut().zip(&rows[r * k..(r + 1) * k]) {
                    *acc += v;
                }
                if let Some(e) = extra {
                    extra_sum += e[r];
                }
            }
            let c = self.part_column[part];
            let g = self.column_group[c];
            let values = part_values(c, self.group_kind[g], &s, extra_sum);
            let sign = self.part_sign[part];
            for (acc, v) in columns[c].iter_mut().zip(values) {
                *acc += sign * v;
            }
            let u = &mut unsigned[g];
            u.x += s[1];
            u.gg += s[3];
            u.norm_prod += (s[3] * s[1]).sqrt();
            layer_gg[self.part_layer.get(part).copied().unwrap_or(self.group_layer[g])] += s[3];
        }
        for (u, &l) in unsigned.iter_mut().zip(&self.group_layer) {
            u.layer_gg = layer_gg[l];
        }
        let mut groups = vec![[0.0; FIELDS]; self.groups()];
        for (column, &g) in columns.iter().zip(&self.column_group) {
            for (acc, v) in groups[g].iter_mut().zip(column) {
                *acc += v;
            }
        }
        Ok(Summed { columns, groups, unsigned })
    }

    /// A group's magnitude: √(|A|·Σθ²) for translation, Σ|θ|² over its parts otherwise (the
    /// scale of its charge that errors are divided by).
    pub fn magnitude(&self, g: usize, u: &Unsigned) -> f64 {
        if self.group_kind[g] == Kind::Translation {
            (self.group_size[g] * u.x).sqrt()
        } else {
            u.x
        }
    }

    /// A group's normalised constraint residual (docs/theory.md §3), NaN when the group has "no
    /// gradient" (it proves nothing): |ĝ_A|² ≤ `NO_GRADIENT` × |ĝ_L|², the |ĝ|² of its layer's
    /// groups added up (`Unsigned::layer_gg`), the rule `neural_mechanics.verify` applies too.
    pub fn residual(&self, g: usize, flux: f64, u: &Unsigned) -> f64 {
        let size = self.group_size[g];
        let denom = if self.group_kind[g] == Kind::Translation { (size * u.gg).sqrt() } else { u.norm_prod };
        if denom > 0.0 && u.gg > crate::tracking::NO_GRADIENT * u.layer_gg {
            flux.abs() / denom
        } else {
            f64::NAN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two groups: group 0 (scale) has two columns of one part each, group 1 (translation) one
    /// column of two parts with signs +1 and −1; parts read rows [0], [1], [2, 3], [4].
    pub(crate) fn small() -> Plan {
        Plan::new(PlanArrays {
            part_row_starts: vec![0, 1, 2, 4, 5],
            part_rows: vec![0, 1, 2, 3, 4],
            part_sign: vec![1.0, 1.0, 1.0, -1.0],
            part_column: vec![0, 1, 2, 2],
            part_size: vec![3.0, 3.0, 4.0, 2.0],
            column_group: vec![0, 0, 1],
            column_param_group: vec![0, 1, 0],
            group_kind: vec![1, 0],
            group_size: vec![6.0, 6.0],
            group_layer: vec![],
            part_layer: vec![],
            extra_rows: vec![4],
            rows: 5,
        })
        .unwrap()
    }

    #[test]
    fn rows_add_into_parts_columns_and_groups_with_signs() {
        let plan = small();
        let rows: Vec<f64> = (0..5).flat_map(|r| [r as f64, 10.0 * r as f64]).collect();
        let s = plan
            .sum(&rows, 2, None, |_, _, s, _| {
                let mut v = [0.0; FIELDS];
                v[0] = s[0];
                v[1] = s[1];
                v
            })
            .unwrap();
        assert_eq!(s.columns.iter().map(|c| c[0]).collect::<Vec<_>>(), vec![0.0, 1.0, 2.0 + 3.0 - 4.0]);
        assert_eq!(s.groups.iter().map(|g| g[1]).collect::<Vec<_>>(), vec![10.0, 10.0]);
        assert_eq!(s.unsigned[1].x, 90.0); // unsigned: 20 + 30 + 40
        assert!(!plan.is_whole_group(0) && plan.is_whole_group(2));
        assert_eq!(plan.group_param_group(0), 0);
        assert_eq!(plan.scatter_extra(&[7.0, 49.0]).unwrap(), vec![0.0, 0.0, 0.0, 0.0, 7.0]);
    }

    #[test]
    fn no_gradient_is_judged_against_the_layer() {
        // Groups 0 and 1 share layer 0, group 2 is alone in layer 1; each is one scale part.
        let plan = Plan::new(PlanArrays {
            part_row_starts: vec![0, 1, 2, 3],
            part_rows: vec![0, 1, 2],
            part_sign: vec![1.0; 3],
            part_column: vec![0, 1, 2],
            part_size: vec![1.0; 3],
            column_group: vec![0, 1, 2],
            column_param_group: vec![0; 3],
            group_kind: vec![1, 1, 1],
            group_size: vec![1.0; 3],
            group_layer: vec![0, 0, 1],
            part_layer: vec![],
            extra_rows: vec![],
            rows: 3,
        })
        .unwrap();
        // |ĝ|² of the three groups: 1, 1e-12 (rounding next to group 0), 1e-12 (alone).
        let gg: [f64; 3] = [1.0, 1e-12, 1e-12];
        let rows: Vec<f64> = gg.iter().flat_map(|&g| [0.0, 1.0, 0.0, g, 1e-3 * g.sqrt()]).collect();
        let s = plan
            .sum(&rows, 5, None, |_, _, s, _| {
                let mut v = [0.0; FIELDS];
                v[0] = s[0];
                v[1] = s[4];
                v
            })
            .unwrap();
        assert_eq!(s.unsigned[0].layer_gg, 1.0 + 1e-12);
        let residual: Vec<f64> = (0..3).map(|g| plan.residual(g, s.groups[g][1], &s.unsigned[g])).collect();
        assert!((residual[0] - 1e-3).abs() < 1e-12 && (residual[2] - 1e-3).abs() < 1e-12, "{residual:?}");
        assert!(residual[1].is_nan(), "1e-12 of its layer's |ĝ|² is no gradient");
    }

    #[test]
    fn bad_maps_and_bad_rows_are_errors() {
        let plan = small();
        assert!(matches!(plan.sum(&[0.0; 9], 2, None, |_, _, _, _| [0.0; FIELDS]), Err(Error::Shape(_))));
        assert!(matches!(plan.sum(&[0.0; 20], 4, None, |_, _, _, _| [0.0; FIELDS]), Err(Error::Shape(_))));
        assert!(matches!(plan.scatter_extra(&[1.0]), Err(Error::Shape(_))));
        let base = || PlanArrays {
            part_row_starts: vec![0, 1],
            part_rows: vec![0],
            part_sign: vec![1.0],
            part_column: vec![0],
            part_size: vec![1.0],
            column_group: vec![0],
            column_param_group: vec![0],
            group_kind: vec![1],
            group_size: vec![1.0],
            group_layer: vec![0],
            part_layer: vec![],
            extra_rows: vec![],
            rows: 1,
        };
        assert!(Plan::new(base()).is_ok());
        for spoil in [
            (|a: &mut PlanArrays| a.part_rows = vec![3]) as fn(&mut PlanArrays),
            |a| a.part_rows = vec![-1],
            |a| a.part_column = vec![1],
            |a| a.group_kind = vec![5],
            |a| a.part_row_starts = vec![1, 1],
            |a| a.column_group = vec![2],
            |a| a.extra_rows = vec![1],
            |a| a.group_layer = vec![1],
            |a| a.group_layer = vec![0, 0],
            |a| {
                a.group_kind = vec![1, 1];
                a.group_size = vec![1.0, 1.0]
            },
        ] {
            let mut a = base();
            spoil(&mut a);
            assert!(matches!(Plan::new(a), Err(Error::Shape(_))));
        }
    }
}
