//! What every kernel reads and writes: the element types, the rows of a tile, a tile's column
//! accumulators, and the lane sums of the fused long-segment kernels.

/// An input element type, widened to float64 for the sums (products of float32 inputs are exact
/// in float64, so the only rounding is in the additions).
pub(crate) trait Element: Copy {
    fn to_f64(self) -> f64;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// Columns per tile: 8 accumulators x TILE f64 = 16 KiB stays in L1 beside the rows in flight.
pub(crate) const TILE: usize = 256;

/// Per-column accumulators of one tile: `acc[q][c]` is sum q of column c of the tile. Each row is
/// padded by one cache line: with rows of exactly 2 KiB, acc[q][c] and acc[q + 2][c] would share
/// their low 12 address bits, and every load would wait on the store before it ("4K aliasing";
/// measured: the unpadded kernel ran at a third of the padded one's speed).
/// Aligned to a cache line, so that no 32-byte access straddles two lines.
#[repr(C, align(64))]
pub(crate) struct ColAcc(pub(crate) [[f64; TILE + 8]; 8]);

impl ColAcc {
    pub(crate) fn zeroed() -> Box<ColAcc> {
        Box::new(ColAcc([[0.0; TILE + 8]; 8]))
    }
}

/// The rows of one tile: row j of array a is `data[a][j * stride..][..m]` (θ, ĝ, v; an absent
/// array is empty). The bounds are checked once here, so the kernels read without checks.
pub(crate) struct Rows<'a, E> {
    data: [&'a [E]; 3],
    pub(crate) arrays: usize,
    stride: usize,
    pub(crate) count: usize,
    pub(crate) m: usize,
}

impl<'a, E> Rows<'a, E> {
    pub(crate) fn new(data: [&'a [E]; 3], arrays: usize, stride: usize, count: usize, m: usize) -> Rows<'a, E> {
        assert!(m <= TILE, "a tile has at most TILE columns");
        for d in &data[..arrays] {
            assert!(count == 0 || d.len() >= (count - 1) * stride + m, "tile rows reach past the data");
        }
        Rows { data, arrays, stride, count, m }
    }

    /// Row j's first m elements of each array (empty for absent arrays).
    pub(crate) fn row(&self, j: usize) -> [&'a [E]; 3] {
        std::array::from_fn(|a| if a < self.arrays { &self.data[a][j * self.stride..j * self.stride + self.m] } else { &[][..] })
    }

    /// Row j's start in each array (dangling for absent arrays; never read).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn ptrs(&self, j: usize) -> [*const E; 3] {
        std::array::from_fn(|a| self.data[a].as_ptr().wrapping_add(j * self.stride))
    }
}

/// Vector sums of one group or row in the fused long-segment kernels: lane l of sum q at
/// `[q * lanes + l]` (4 lanes with AVX2, 8 with AVX-512; the caller adds the lanes up once at
/// the end, in a fixed order).
pub(crate) type LaneSums = [f64; 64];
