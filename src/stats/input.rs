//! What one call reduces: the arrays ([`Data`]), the view they are reduced in ([`Layout`]) and
//! the two together ([`Item`]), checked before any kernel runs.

use super::sums::Sums;
use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;

/// The element types the kernels read, with the codes the Python layer passes for them
/// (`_native.group_stats_ptrs` reads these codes; `_native.DTYPE_CODES` exports them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F64 = 1,
    F16 = 2,
    BF16 = 3,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// The name numpy and torch give the type.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Element slices of one of the [`DType`]s. `BF16` is carried as its raw 16 bits.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [half::f16]),
    BF16(&'a [u16]),
}

impl<'a> Data<'a> {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::F64(s) => s.len(),
            Data::F16(s) => s.len(),
            Data::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        self.dtype().name()
    }

    /// (address, length, dtype): two equal identities are the same memory read the same way.
    pub(super) fn identity(&self) -> (usize, usize, &'static str) {
        let addr = match self {
            Data::F32(s) => s.as_ptr() as usize,
            Data::F64(s) => s.as_ptr() as usize,
            Data::F16(s) => s.as_ptr() as usize,
            Data::BF16(s) => s.as_ptr() as usize,
        };
        (addr, self.len(), self.dtype_name())
    }

    pub(crate) fn slice(self, start: usize, end: usize) -> Data<'a> {
        match self {
            Data::F32(s) => Data::F32(&s[start..end]),
            Data::F64(s) => Data::F64(&s[start..end]),
            Data::F16(s) => Data::F16(&s[start..end]),
            Data::BF16(s) => Data::BF16(&s[start..end]),
        }
    }

    /// 16-bit data converted to float32 into `dst` (of the same length). Float32 and float64
    /// are read in place ([`InPlace`]), never widened.
    pub(super) fn widen_into(self, dst: &mut [f32]) {
        match self {
            Data::F16(s) => s.convert_to_f32_slice(dst),
            Data::BF16(s) => {
                for (d, &b) in dst.iter_mut().zip(s) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
            Data::F32(_) | Data::F64(_) => unreachable!("only 16-bit data is widened"),
        }
    }
}

/// The element types the kernels read in place, straight from the caller's memory (16-bit input
/// is widened to float32 first).
pub(super) trait InPlace: Sized {
    /// The elements of `d`, which holds this type (every array of a validated item has θ's dtype).
    fn of(d: Data<'_>) -> &[Self];
}

impl InPlace for f32 {
    fn of(d: Data<'_>) -> &[f32] {
        match d {
            Data::F32(s) => s,
            _ => unreachable!("dtypes were validated to match"),
        }
    }
}

impl InPlace for f64 {
    fn of(d: Data<'_>) -> &[f64] {
        match d {
            Data::F64(s) => s,
            _ => unreachable!("dtypes were validated to match"),
        }
    }
}

/// A byte count for messages: "16.0 TiB", "512 B".
pub fn fmt_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A shape as Python prints it: (4, 6), (5,), ().
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// At most this many groups in the result of a tensor that holds no elements (a shape such as
/// (0, n) reduced by columns): every sum is 0, and nothing the caller holds bounds n, so a shape
/// like (0, 2**40) would otherwise ask for terabytes of zeros. A tensor with elements has at
/// most one group per element, so its result is bounded by its own size.
pub const MAX_EMPTY_GROUPS: usize = 1 << 24;

/// The (outer, groups, seg) view of a tensor: group g is the union over o < outer of the
/// contiguous segment starting at (o·groups + g)·seg of length seg (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub groups: usize,
    pub seg: usize,
}

impl Layout {
    /// The layout of a C-contiguous tensor of `shape` reduced keeping `axis` (0: rows, 1:
    /// columns) in blocks of `block` columns. A 1-D tensor is viewed as (n, 1, 1), a 2-D one as
    /// (out, in, 1), more dimensions as (out, in, product of the rest).
    pub fn from_shape(shape: &[usize], axis: usize, block: usize) -> Result<Layout> {
        let too_large = || Error::Shape(format!("shape {} has more elements than memory can address", fmt_shape(shape)));
        let (out, inner, rest) = match shape.len() {
            0 => return Err(Error::Shape("a 0-d tensor has no groups: pass a tensor with at least one dimension".into())),
            1 => (shape[0], 1, 1),
            2 => (shape[0], shape[1], 1),
            _ => (shape[0], shape[1], shape[2..].iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_large)?),
        };
        // Every product of dimensions below must fit (numpy and torch refuse such shapes; the
        // exported `_native.layout` takes any list).
        out.checked_mul(inner).and_then(|n| n.checked_mul(rest)).ok_or_else(too_large)?;
        if block == 0 {
            return Err(Error::InvalidArgument("block must be at least 1".into()));
        }
        match axis {
            0 => {
                if block != 1 {
                    return Err(Error::InvalidArgument(format!(
                        "block={block} applies only with axis=1 (column blocks); axis=0 takes block=1"
                    )));
                }
                Ok(Layout { outer: 1, groups: out, seg: inner * rest })
            }
            1 => {
                if inner % block != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "block={block} does not divide axis 1 of shape {} (size {inner})",
                        fmt_shape(shape)
                    )));
                }
                Ok(Layout { outer: out, groups: inner / block, seg: block * rest })
            }
            _ => Err(Error::InvalidArgument(format!("axis must be 0 (rows) or 1 (columns), got {axis}"))),
        }
    }

    /// Elements the layout covers (saturating: a layout built by [`Layout::from_shape`] never
    /// overflows; [`Item`] validation refuses one that does).
    pub fn len(&self) -> usize {
        self.checked_len().unwrap_or(usize::MAX)
    }

    pub fn checked_len(&self) -> Option<usize> {
        self.outer.checked_mul(self.groups)?.checked_mul(self.seg)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tensor (with its gradient and velocity) and the layout to reduce it with.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub theta: Data<'a>,
    pub grad: Option<Data<'a>>,
    pub velocity: Option<Data<'a>>,
    pub layout: Layout,
}

impl<'a> Item<'a> {
    pub fn arrays(&self) -> usize {
        1 + self.grad.is_some() as usize + self.velocity.is_some() as usize
    }

    /// Number of sums per group for this item.
    pub fn width(&self) -> usize {
        Sums::count(self.arrays())
    }

    /// θ, ĝ, v in the order the kernels take them (None for an absent array).
    pub(super) fn data(&self) -> [Option<Data<'a>>; 3] {
        [Some(self.theta), self.grad, self.velocity]
    }

    /// Elements [start, end) of each array, read in place (an absent array is empty).
    pub(super) fn in_place<E: InPlace>(&self, start: usize, end: usize) -> [&'a [E]; 3] {
        self.data().map(|d| d.map_or(&[][..], |d| E::of(d.slice(start, end))))
    }

    pub(super) fn validate(&self, index: usize) -> Result<()> {
        let n = self.layout.checked_len().ok_or_else(|| Error::Shape(format!("tensor {index}: the layout {:?} overflows", self.layout)))?;
        let groups = self.layout.groups;
        if n == 0 && groups > MAX_EMPTY_GROUPS {
            // Checked before anything is allocated: the result would be groups x width zeros.
            return Err(Error::Shape(format!(
                "tensor {index}: a tensor with no elements reduced into {groups} groups would give {groups} rows of zeros \
                 ({}); at most {MAX_EMPTY_GROUPS} groups are allowed for an empty tensor",
                fmt_bytes(groups as f64 * self.width() as f64 * 8.0)
            )));
        }
        let named = [("theta", Some(self.theta)), ("grad", self.grad), ("velocity", self.velocity)];
        for (name, data) in named.iter() {
            if let Some(d) = data {
                if d.len() != n {
                    return Err(Error::Shape(format!(
                        "tensor {index}: {name} has {} elements but the layout {:?} needs {n}",
                        d.len(),
                        self.layout
                    )));
                }
                if d.dtype() != self.theta.dtype() {
                    return Err(Error::DType(format!(
                        "tensor {index}: {name} is {} but theta is {}; give all arrays one dtype",
                        d.dtype_name(),
                        self.theta.dtype_name()
                    )));
                }
            }
        }
        if self.velocity.is_some() && self.grad.is_none() {
            return Err(Error::InvalidArgument(format!("tensor {index}: a velocity needs a gradient too")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod size_checks {
    use super::*;

    #[test]
    fn an_empty_tensor_cannot_ask_for_an_enormous_result() {
        // (0, 2**40) by columns and (2**40, 0) by rows: 2**40 groups of zeros (16 TiB) refused
        // before anything is allocated; a few zero groups are fine.
        let empty = Data::F32(&[]);
        for (shape, axis) in [(vec![0, 1usize << 40], 1), (vec![1usize << 40, 0], 0)] {
            let layout = Layout::from_shape(&shape, axis, 1).unwrap();
            let item = Item { theta: empty, grad: None, velocity: None, layout };
            let err = crate::stats::group_stats(&item).unwrap_err();
            assert!(matches!(&err, Error::Shape(m) if m.contains("1099511627776 groups") && m.contains("16.0 TiB")), "{err}");
        }
        let layout = Layout::from_shape(&[0, MAX_EMPTY_GROUPS], 1, 1).unwrap();
        let out = crate::stats::group_stats(&Item { theta: empty, grad: None, velocity: None, layout }).unwrap();
        assert_eq!(out.len(), 2 * MAX_EMPTY_GROUPS);
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused() {
        let big = 1usize << 40;
        assert!(matches!(Layout::from_shape(&[0, big, big, big], 0, 1), Err(Error::Shape(_))));
        assert!(matches!(Layout::from_shape(&[big, big, 2], 1, 1), Err(Error::Shape(_))));
        let layout = Layout { outer: big, groups: big, seg: 2 };
        let item = Item { theta: Data::F32(&[]), grad: None, velocity: None, layout };
        assert!(matches!(item.validate(0), Err(Error::Shape(_))));
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1.5 * 1024.0 * 1024.0), "1.5 MiB");
    }
}
