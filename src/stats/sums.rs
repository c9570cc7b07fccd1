//! Which sums a reduction produces, in which order, and which product each one adds up.
//!
//! [`PRODUCTS`] is the one place that says it: the portable loops, the scalar tails and the
//! AVX2 and AVX-512 kernels all read it (the vector kernels through a constant sum index, so the
//! lookup costs nothing at run time), and [`Sums::NAMES`] follows its order.

/// Operand indices of [`PRODUCTS`]: the item's arrays θ, ĝ, v, and the constant 1 (a plain sum
/// Σa is written Σ a·1, and computed without the multiplication).
pub(crate) const THETA: usize = 0;
pub(crate) const GRAD: usize = 1;
pub(crate) const VELOCITY: usize = 2;
pub(crate) const ONE: usize = 3;

/// Sum q of a group adds up `a · b` over the group's elements, for `(a, b) = PRODUCTS[q]`.
/// Ordered so that the sums of θ alone, then of (θ, ĝ), are a prefix of the list
/// (see [`Sums::count`]).
pub(crate) const PRODUCTS: [(usize, usize); 8] = [
    (THETA, ONE),         // Σθ
    (THETA, THETA),       // Σθ²
    (GRAD, ONE),          // Σĝ
    (GRAD, GRAD),         // Σĝ²
    (THETA, GRAD),        // Σθĝ
    (VELOCITY, VELOCITY), // Σv²
    (THETA, VELOCITY),    // Σθv
    (GRAD, VELOCITY),     // Σĝv
];

/// Names of the sums, in the order of each group's row in the output (that of [`PRODUCTS`]).
pub struct Sums;

impl Sums {
    pub const NAMES: [&'static str; 8] = [
        "sum_theta",
        "sumsq_theta",
        "sum_grad",
        "sumsq_grad",
        "dot_theta_grad",
        "sumsq_velocity",
        "dot_theta_velocity",
        "dot_grad_velocity",
    ];

    /// Number of sums for 1 (θ), 2 (θ, ĝ) or 3 (θ, ĝ, v) arrays: the products of [`PRODUCTS`]
    /// that read only those arrays.
    pub const fn count(arrays: usize) -> usize {
        match arrays {
            1 => 2,
            2 => 5,
            _ => 8,
        }
    }

    /// The array (THETA, GRAD or VELOCITY) whose NaN or infinity sum q is the first to show:
    /// the last array it reads (a bad θ already spoils the θ sums, which come first).
    pub(crate) fn newest_input(q: usize) -> usize {
        match PRODUCTS[q] {
            (a, ONE) => a,
            (a, b) => a.max(b),
        }
    }
}

/// Runs `$body` once for every sum index `$q` below `$k` (at most 8), unrolled in the source:
/// `$q` is a constant in each copy, so `PRODUCTS[$q]` lookups and register indices fold away
/// and no loop or branch is left in a kernel's inner loop.
macro_rules! each_sum {
    ($k:expr, |$q:ident| $body:block) => {{
        let below: usize = $k;
        each_sum!(@unrolled below, $q, $body, 0 1 2 3 4 5 6 7)
    }};
    (@unrolled $k:ident, $q:ident, $body:block, $($n:literal)*) => {{
        $({
            const $q: usize = $n;
            if $q < $k $body
        })*
    }};
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use each_sum;

/// The products of one element (θ, ĝ, v), one per sum in the order of [`PRODUCTS`]: the scalar
/// form of every kernel (the portable loops and the tails of the vector ones). An absent array
/// is passed as 0; the sums that read it are not used.
#[inline(always)]
pub(crate) fn products(element: [f64; 3]) -> [f64; 8] {
    let mut p = [0f64; 8];
    each_sum!(8, |Q| {
        p[Q] = match const { PRODUCTS[Q] } {
            (a, ONE) => element[a],
            (a, b) => element[a] * element[b],
        };
    });
    p
}
