//! The inner loops, and the choice between them at run time.
//!
//! Two shapes of work:
//! * segment kernels: one contiguous segment of 1, 2 or 3 arrays summed into float64 registers
//!   ([`segment`]: rows, and column blocks whose segment is long), and their fused form that adds
//!   every segment of a row to its group and to the row at once ([`RowSegments`]: a tensor
//!   reduced by rows and by long column blocks in one read);
//! * tile kernels for short segments ([`tile`]): per-column accumulators over a tile of columns,
//!   optionally with each row's sums too (a tensor reduced by rows and columns in one read).
//!
//! Each exists as portable Rust (`portable`) and as AVX2+FMA (`avx2`); the sweeps that reduce by
//! rows and columns at once, which are bound by instructions rather than memory, also as
//! AVX-512F (`avx512`). Wheels are built for generic x86-64, so the CPU is checked at run time
//! (once). Every kernel takes which product each sum adds up from `crate::stats::sums`.
//!
//! Dependencies point one way: this file dispatches to `portable`, `avx2` and `avx512`, which
//! share `buffers`; the vector tile kernels reuse `portable`'s element step for their tails.

mod buffers;
mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub(crate) use buffers::{ColAcc, LaneSums, Rows, TILE};

use crate::stats::sums::Sums;

/// The element types the kernels read (16-bit input is widened to float32 first).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Float: avx2::Lanes + avx512::Lanes8 {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Float: buffers::Element {}
impl Float for f32 {}
impl Float for f64 {}

/// Whether the AVX2+FMA kernels can run (NEURAL_MECHANICS_NO_SIMD=1 forces the portable loops,
/// for comparisons and tests).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::env::var_os("NEURAL_MECHANICS_NO_SIMD").is_none() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 sweeps can run (NEURAL_MECHANICS_NO_AVX512=1 keeps AVX2, for
/// comparisons; NEURAL_MECHANICS_NO_SIMD=1 turns both off).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512
            .get_or_init(|| has_avx2() && std::env::var_os("NEURAL_MECHANICS_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernels run: the portable loops, AVX2, or AVX-512 where it has a kernel (the fused
/// row-and-column tile sweep; everything else is AVX2 there too). A kernel the CPU lacks falls
/// back to the next one down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

impl Kernel {
    /// The best kernel this CPU runs.
    pub(crate) fn best() -> Kernel {
        if has_avx512() {
            Kernel::Avx512
        } else if has_avx2() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }
}

/// The sums of one contiguous segment of θ (and ĝ, v, each at least as long), added to `out`
/// (2, 5 or 8 sums, in the order of `Sums::NAMES`). AVX2 where the CPU has it: the segment
/// kernels are bound by memory, so AVX-512 would not make them faster.
pub(crate) fn segment<E: Float>(t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    segment_with(Kernel::Avx2, t, g, v, out)
}

/// [`segment`] with the choice of kernel given.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn segment_with<E: Float>(kernel: Kernel, t: &[E], g: Option<&[E]>, v: Option<&[E]>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); the kernel checks that
        // the arrays it reads hold as many elements as `t`.
        unsafe {
            match (g, v) {
                (None, _) => avx2::segment::<E, 1, 4>(t, &[], &[], out),
                (Some(g), None) => avx2::segment::<E, 2, 2>(t, g, &[], out),
                (Some(g), Some(v)) => avx2::segment::<E, 3, 1>(t, g, v, out),
            }
        }
        return;
    }
    portable::segment(t, g, v, out)
}

/// Add columns [0, m) of `rows` into `acc` (and each row's sums into `rows_out`, k per row).
pub(crate) fn tile<E: Float>(rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    tile_with(Kernel::best(), rows, acc, rows_out)
}

/// [`tile`] with the choice of kernel given.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn tile_with<E: Float>(kernel: Kernel, rows: &Rows<'_, E>, acc: &mut ColAcc, rows_out: Option<&mut [f64]>) {
    let k = Sums::count(rows.arrays);
    assert!(rows_out.as_ref().is_none_or(|o| o.len() >= rows.count * k), "rows_out too short");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 && has_avx512() {
        if let Some(o) = rows_out {
            use avx512::tile_rows as t;
            // SAFETY: the CPU supports AVX-512F (checked at run time); `Rows::new` checked that
            // every row of every used array holds m elements, and o holds count*k sums.
            unsafe {
                match rows.arrays {
                    1 => t::<E, 1>(rows, acc, o),
                    2 => t::<E, 2>(rows, acc, o),
                    _ => t::<E, 3>(rows, acc, o),
                }
            }
            return;
        }
        return tile_with(Kernel::Avx2, rows, acc, None);
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && has_avx2() {
        use avx2::tile as t;
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); `Rows::new` checked that
        // every row of every used array holds m elements, and rows_out holds count*k sums.
        unsafe {
            match (rows.arrays, rows_out) {
                (1, None) => t::<E, 1, false>(rows, acc, &mut []),
                (2, None) => t::<E, 2, false>(rows, acc, &mut []),
                (_, None) => t::<E, 3, false>(rows, acc, &mut []),
                (1, Some(o)) => t::<E, 1, true>(rows, acc, o),
                (2, Some(o)) => t::<E, 2, true>(rows, acc, o),
                (_, Some(o)) => t::<E, 3, true>(rows, acc, o),
            }
        }
        return;
    }
    portable::tile(rows, acc, rows_out)
}

/// The fused kernel for long segments of a tensor reduced by rows and by column blocks (a
/// Flatten→Linear: blocks of 49): one call per row sums each segment in registers and adds its
/// vector sums to its group's and to the row's [`LaneSums`]; the caller adds the lanes up once
/// per group and row. A value exists only where the CPU runs it (AVX2; AVX-512 for 8 lanes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowSegments {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl RowSegments {
    /// The fused kernel this CPU runs, if any.
    pub(crate) fn detect() -> Option<RowSegments> {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return Some(if has_avx512() { RowSegments::Avx512 } else { RowSegments::Avx2 });
        }
        None
    }

    /// Lanes per sum in the lane sums.
    pub(crate) fn lanes(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            RowSegments::Avx2 => 4,
            #[cfg(target_arch = "x86_64")]
            RowSegments::Avx512 => 8,
        }
    }

    /// Adds each of the `groups` segments of `seg` elements of one row (the first `arrays` of
    /// `row`, θ, ĝ, v) to `cols[g]`, and all of them to `row_sums`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(crate) fn add<E: Float>(
        self,
        row: [&[E]; 3],
        arrays: usize,
        groups: usize,
        seg: usize,
        cols: &mut [LaneSums],
        row_sums: &mut LaneSums,
    ) {
        assert!(seg >= 1 && cols.len() >= groups, "one lane sum per group, segments of at least one element");
        assert!(row[..arrays].iter().all(|a| a.len() >= groups * seg), "the row holds groups * seg elements");
        let p = row.map(<[E]>::as_ptr);
        match self {
            // SAFETY (both arms): a RowSegments exists only where `detect` found the CPU
            // features its kernel needs; the lengths were checked just above.
            #[cfg(target_arch = "x86_64")]
            RowSegments::Avx2 => unsafe {
                match arrays {
                    1 => avx2::segments::<E, 1>(p, groups, seg, cols, row_sums),
                    2 => avx2::segments::<E, 2>(p, groups, seg, cols, row_sums),
                    _ => avx2::segments::<E, 3>(p, groups, seg, cols, row_sums),
                }
            },
            #[cfg(target_arch = "x86_64")]
            RowSegments::Avx512 => unsafe {
                match arrays {
                    1 => avx512::segments::<E, 1>(p, groups, seg, cols, row_sums),
                    2 => avx512::segments::<E, 2>(p, groups, seg, cols, row_sums),
                    _ => avx512::segments::<E, 3>(p, groups, seg, cols, row_sums),
                }
            },
        }
    }
}
