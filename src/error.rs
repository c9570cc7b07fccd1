//! One error type for the whole core. The Python layer maps each variant to one exception class
//! of `neural_mechanics.errors` (see src/python/mod.rs), so nothing reaches the user as a panic.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// Shapes or lengths that do not fit together (ValueError in Python).
    #[error("{0}")]
    Shape(String),
    /// An element type the kernels do not read, or mixed types (TypeError in Python).
    #[error("{0}")]
    DType(String),
    /// A NaN or infinity in the input or the result (ValueError in Python).
    #[error("{0}")]
    NonFinite(String),
    /// Any other argument out of its domain: negative learning rate, momentum >= 1, ...
    #[error("{0}")]
    InvalidArgument(String),
    /// A saved run that is truncated, corrupted, foreign or from a newer format (ValueError).
    #[error("{0}")]
    Format(String),
    /// The operating system refused a read or write (OSError in Python).
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;
