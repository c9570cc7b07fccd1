//! A tracker's state as named float64 arrays, for checkpoints (`Tracker.state_dict()` in
//! Python, docs/tracking.md "Resuming a run").
//!
//! Every piece of state is one entry `key → values`; a number is a one-element array, a flag
//! 0.0/1.0. A field added to a lane later is one `put` in its export and one `get` in its
//! import; a checkpoint written before it existed then fails with a clear error naming the key.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Named float64 arrays (sorted by key, so an export is deterministic).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot(pub BTreeMap<String, Vec<f64>>);

fn bad(what: String) -> Error {
    Error::InvalidArgument(format!("tracker state: {what}"))
}

impl Snapshot {
    pub fn put(&mut self, key: impl Into<String>, values: Vec<f64>) {
        self.0.insert(key.into(), values);
    }

    pub fn put_scalar(&mut self, key: impl Into<String>, value: f64) {
        self.put(key, vec![value]);
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The values of `key`; an error naming the key when it is missing.
    pub fn get(&self, key: &str) -> Result<&[f64]> {
        self.0.get(key).map(Vec::as_slice).ok_or_else(|| bad(format!("{key:?} is missing")))
    }

    /// The values of `key`, which must hold exactly `len` of them.
    pub fn get_len(&self, key: &str, len: usize) -> Result<&[f64]> {
        let v = self.get(key)?;
        if v.len() != len {
            return Err(bad(format!("{key:?} holds {} values, this tracker's plan needs {len}", v.len())));
        }
        Ok(v)
    }

    pub fn scalar(&self, key: &str) -> Result<f64> {
        Ok(self.get_len(key, 1)?[0])
    }

    /// A count (step numbers, lengths): a finite non-negative whole number.
    pub fn count(&self, key: &str) -> Result<usize> {
        let v = self.scalar(key)?;
        if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53)) {
            return Err(bad(format!("{key:?} must be a whole number >= 0, got {v}")));
        }
        Ok(v as usize)
    }

    pub fn flag(&self, key: &str) -> Result<bool> {
        match self.scalar(key)? {
            0.0 => Ok(false),
            1.0 => Ok(true),
            v => Err(bad(format!("{key:?} must be 0 or 1, got {v}"))),
        }
    }

    /// Values that must all be finite (charges, rates, clocks).
    pub fn finite(&self, key: &str, len: usize) -> Result<&[f64]> {
        let v = self.get_len(key, len)?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("{key:?} holds a non-finite value")));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_name_the_key_that_is_wrong() {
        let mut s = Snapshot::default();
        s.put_scalar("n", 3.0);
        s.put_scalar("half", 0.5);
        s.put("y", vec![1.0, f64::NAN]);
        assert_eq!(s.count("n").unwrap(), 3);
        assert!(s.count("half").unwrap_err().to_string().contains("\"half\""));
        assert!(s.get("absent").unwrap_err().to_string().contains("\"absent\" is missing"));
        assert!(s.get_len("y", 3).is_err());
        assert!(s.finite("y", 2).is_err());
        assert!(s.flag("n").is_err());
    }
}
