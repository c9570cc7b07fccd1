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

    pub(super) fn slice(self, start: usize, end: usize) -> Data<'a> {
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

/// A shape as Python prints it: (4, 6), (5,), ().
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

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
        let (out, inner, rest) = match shape.len() {
            0 => return Err(Error::Shape("a 0-d tensor has no groups: pass a tensor with at least one dimension".into())),
            1 => (shape[0], 1, 1),
            2 => (shape[0], shape[1], 1),
            _ => (shape[0], shape[1], shape[2..].iter().product()),
        };
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

    pub fn len(&self) -> usize {
        self.outer * self.groups * self.seg
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
        let n = self.layout.len();
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
