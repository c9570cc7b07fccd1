//! The saved-run file: one self-describing, versioned, checksummed file, written atomically.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0   magic  b"NMRUN\0\r\n"      (the \r\n catches text-mode mangling)
//! 8   u32    format version
//! 12  u32    reserved (0)
//! 16  u64    header length H
//! 24  header: H bytes of JSON (serde), then zero padding to a multiple of 8
//!     arrays: raw f64 / i64 data, each at an 8-aligned offset listed in the header
//! end u64    checksum of every byte before it
//! ```
//!
//! The header carries the format version again, the producer, an arbitrary JSON object owned by
//! the Python layer (groups, notes, hyperparameters) and the array directory. A file is written
//! to a temporary name in the same folder, flushed to disk and renamed over the target, so a
//! crash mid-save leaves the previous file intact. Reading checks magic, version, sizes and the
//! checksum, so a truncated or foreign file is an error, never a wrong number.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"NMRUN\0\r\n";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    F64,
    I64,
}

/// One array to write: 8-byte elements, C order.
pub struct ArrayRef<'a> {
    pub name: &'a str,
    pub elem: ElemType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// One array read back.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedArray {
    pub name: String,
    pub elem: ElemType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    name: String,
    elem: ElemType,
    shape: Vec<usize>,
    offset: u64,
    nbytes: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format_version: u32,
    producer: String,
    meta: serde_json::Value,
    arrays: Vec<Entry>,
}

/// A fast 64-bit checksum over 8-byte words (FNV-style multiply-xor), for corruption detection.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    h = (h ^ u64::from_le_bytes(last) ^ tail.len() as u64).wrapping_mul(0x0000_0100_0000_01b3);
    h ^ (h >> 31)
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

/// Serialise the whole file into memory (runs are O(groups x rows); callers thin long runs).
pub fn encode(meta_json: &str, arrays: &[ArrayRef<'_>]) -> Result<Vec<u8>> {
    let meta: serde_json::Value =
        serde_json::from_str(meta_json).map_err(|e| Error::InvalidArgument(format!("run metadata is not valid JSON: {e}")))?;
    let mut entries = Vec::with_capacity(arrays.len());
    let mut offset = 0u64;
    for a in arrays {
        let n: usize = a.shape.iter().product();
        if a.bytes.len() != n * 8 {
            return Err(Error::Shape(format!("array {:?}: {} bytes for shape {:?} (8-byte elements)", a.name, a.bytes.len(), a.shape)));
        }
        entries.push(Entry { name: a.name.to_string(), elem: a.elem, shape: a.shape.clone(), offset, nbytes: a.bytes.len() as u64 });
        offset += a.bytes.len() as u64;
    }
    let header = Header {
        format_version: FORMAT_VERSION,
        producer: format!("neural-mechanics {}", env!("CARGO_PKG_VERSION")),
        meta,
        arrays: entries,
    };
    let header_bytes = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let data_start = 24 + pad8(header_bytes.len());
    let mut out = Vec::with_capacity(data_start + offset as usize + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    out.resize(data_start, 0);
    for a in arrays {
        out.extend_from_slice(a.bytes);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Parse a whole file; every inconsistency is an `Error::Format` naming what is wrong.
pub fn decode(data: &[u8]) -> Result<(String, Vec<OwnedArray>)> {
    let bad = |m: String| Error::Format(m);
    if data.len() < 8 || &data[..8] != MAGIC {
        return Err(bad("not a neural-mechanics run file (bad magic bytes)".into()));
    }
    if data.len() < 32 {
        return Err(bad(format!("truncated run file ({} bytes)", data.len())));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
    if version == 0 || version > FORMAT_VERSION {
        return Err(bad(format!(
            "run file format version {version}; this neural-mechanics reads versions 1..={FORMAT_VERSION} (upgrade the package)"
        )));
    }
    let header_len = u64::from_le_bytes(data[16..24].try_into().unwrap_or_default()) as usize;
    let body = &data[..data.len() - 8];
    let stored = u64::from_le_bytes(data[data.len() - 8..].try_into().unwrap_or_default());
    if header_len > body.len().saturating_sub(24) {
        return Err(bad("truncated run file (header runs past the end)".into()));
    }
    if checksum(body) != stored {
        return Err(bad("run file is truncated or corrupted (checksum mismatch)".into()));
    }
    let header: Header =
        serde_json::from_slice(&data[24..24 + header_len]).map_err(|e| bad(format!("run file header is not valid: {e}")))?;
    if header.format_version != version {
        return Err(bad("run file header and preamble disagree on the format version".into()));
    }
    let data_start = 24 + pad8(header_len);
    let mut arrays = Vec::with_capacity(header.arrays.len());
    for e in header.arrays {
        let start = data_start.checked_add(e.offset as usize);
        let end = start.and_then(|s| s.checked_add(e.nbytes as usize));
        let n: Option<usize> = e.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        match (start, end, n) {
            (Some(s), Some(t), Some(n)) if t <= body.len() && n * 8 == e.nbytes as usize => {
                arrays.push(OwnedArray { name: e.name, elem: e.elem, shape: e.shape, bytes: body[s..t].to_vec() })
            }
            _ => return Err(bad(format!("array {:?} does not fit in the file", e.name))),
        }
    }
    Ok((header.meta.to_string(), arrays))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Write atomically: temporary file in the same folder, fsync, rename over `path`, fsync folder.
pub fn write_atomic(path: &Path, meta_json: &str, arrays: &[ArrayRef<'_>]) -> Result<()> {
    let bytes = encode(meta_json, arrays)?;
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, "cannot write", e))?;
        f.sync_all().map_err(|e| io_err(&tmp, "cannot flush", e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot replace", e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every filesystem supports this, so best effort.
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub fn read(path: &Path) -> Result<(String, Vec<OwnedArray>)> {
    let data = fs::read(path).map_err(|e| io_err(path, "cannot read", e))?;
    decode(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_bytes(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let a = f64_bytes(&[1.0, 2.5, -3.0, f64::NAN, 0.0, 7.0]);
        let b: Vec<u8> = [4i64, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let arrays = [
            ArrayRef { name: "x", elem: ElemType::F64, shape: vec![2, 3], bytes: &a },
            ArrayRef { name: "steps", elem: ElemType::I64, shape: vec![2], bytes: &b },
        ];
        let bytes = encode(r#"{"k": [1, "two"]}"#, &arrays).unwrap();
        let (meta, back) = decode(&bytes).unwrap();
        assert_eq!(meta, r#"{"k":[1,"two"]}"#);
        assert_eq!(back[0].bytes, a);
        assert_eq!(back[1].shape, vec![2]);
        // Truncation anywhere, a flipped bit anywhere, a foreign file: all errors.
        for cut in [0, 7, 20, 40, bytes.len() - 9, bytes.len() - 1] {
            assert!(matches!(decode(&bytes[..cut]), Err(Error::Format(_))), "cut {cut}");
        }
        for at in [30, bytes.len() / 2, bytes.len() - 12] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(matches!(decode(&bad), Err(Error::Format(_))), "flip {at}");
        }
        let mut future = bytes.clone();
        future[8] = 99;
        assert!(matches!(decode(&future), Err(Error::Format(m)) if m.contains("version 99")));
        assert!(matches!(decode(b"PK\x03\x04 a zip file, not a run"), Err(Error::Format(_))));
        assert!(matches!(encode("not json", &[]), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("nm-runfile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.nmrun");
        let one = f64_bytes(&[1.0]);
        let arrays = [ArrayRef { name: "x", elem: ElemType::F64, shape: vec![1], bytes: &one }];
        write_atomic(&path, "{}", &arrays).unwrap();
        write_atomic(&path, r#"{"second": true}"#, &arrays).unwrap();
        assert_eq!(read(&path).unwrap().0, r#"{"second":true}"#);
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1);
        // A failing write (folder does not exist) leaves the old file and no temporary.
        assert!(matches!(write_atomic(&dir.join("no/such/dir/r"), "{}", &arrays), Err(Error::Io(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
