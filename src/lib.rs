//! neural-mechanics core: fused per-group statistics ([`stats`]) and the theory engine.
//! Pure Rust; the pyo3 bindings live in `python` behind the `python` feature.

pub mod error;
pub mod pool;
pub mod runcodec;
pub mod runfile;
pub mod stats;
pub mod theory;
pub mod tracking;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
