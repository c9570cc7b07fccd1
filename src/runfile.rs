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
//!
//! A file is untrusted input. Only a regular file is read (a FIFO, a device such as /dev/zero or
//! a folder is refused before anything is read), the preamble and header first: the arrays must
//! lie one after the other, in order, exactly filling the file, the product of each array's
//! non-zero dimensions at most the file's size in bytes, so what a file makes this code (and the
//! bindings) allocate is a small multiple of its size. The checksum detects corruption (a torn
//! write, a flipped bit), not forgery: anyone can compute it, so it says nothing about who wrote
//! a file. Saving refuses to replace anything but a regular file: a symbolic link, a folder, a
//! device, a FIFO or a socket at the target path is an error (write to the file a link points to
//! by its real path).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"NMRUN\0\r\n";
pub const FORMAT_VERSION: u32 = 2;

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
    /// The elements' bits (an f64's `to_bits`, an i64 as u64), C order.
    pub words: Vec<u64>,
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

/// Serialise a whole version-1 file into memory (what this package wrote before version 2; kept
/// to test that such files still load).
#[cfg(test)]
pub fn encode_v1(meta_json: &str, arrays: &[ArrayRef<'_>]) -> Result<Vec<u8>> {
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
    let header = Header { format_version: 1, producer: format!("neural-mechanics {}", env!("CARGO_PKG_VERSION")), meta, arrays: entries };
    let header_bytes = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let data_start = 24 + pad8(header_bytes.len());
    let mut out = Vec::with_capacity(data_start + offset as usize + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
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

/// The preamble (24 bytes) of a file of `file_len` bytes: the format version and header length.
fn preamble(head: &[u8], file_len: u64) -> Result<(u32, usize)> {
    let bad = |m: String| Error::Format(m);
    if head.len() < 8 || &head[..8] != MAGIC {
        return Err(bad("not a neural-mechanics run file (bad magic bytes)".into()));
    }
    if file_len < 32 || head.len() < 24 {
        return Err(bad(format!("truncated run file ({file_len} bytes)")));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
    if version == 0 || version > FORMAT_VERSION {
        return Err(bad(format!(
            "run file format version {version}; this neural-mechanics reads versions 1..={FORMAT_VERSION} (upgrade the package)"
        )));
    }
    let header_len = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    if version == 1 && header_len > file_len - 32 {
        return Err(bad("truncated run file (header runs past the end)".into()));
    }
    Ok((version, if version == 1 { header_len as usize } else { 0 }))
}

/// The header, checked against the file it came from: the version agrees with the preamble, the
/// arrays lie one after the other from the end of the header, in order, with distinct names,
/// 8 bytes per element of their shape, the product of the non-zero dimensions at most the file's
/// size, and together they fill the file exactly (so the file's size bounds every allocation).
fn header(json: &[u8], version: u32, header_len: usize, file_len: u64) -> Result<Header> {
    let bad = |m: String| Error::Format(m);
    let header: Header = serde_json::from_slice(json).map_err(|e| bad(format!("run file header is not valid: {e}")))?;
    if header.format_version != version {
        return Err(bad("run file header and preamble disagree on the format version".into()));
    }
    let mut names = std::collections::HashSet::new();
    let mut offset = 0u64;
    for e in &header.arrays {
        if !names.insert(e.name.as_str()) {
            return Err(bad(format!("array {:?} appears twice", e.name)));
        }
        // Even an empty array's shape must be describable: the product of its non-zero
        // dimensions is at most the file's size (so numpy can make it, and (0, 2^40) is refused).
        let extent = e.shape.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        if extent.is_none_or(|n| n > file_len) {
            return Err(bad(format!("array {:?} declares shape {:?}, larger than the file can hold", e.name, e.shape)));
        }
        let elems = e.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        match elems.and_then(|n| n.checked_mul(8)) {
            Some(n) if n == e.nbytes && e.offset == offset && n <= file_len => offset += n,
            _ => return Err(bad(format!("array {:?} does not fit in the file", e.name))),
        }
    }
    let expected = (24 + pad8(header_len) as u64).checked_add(offset).and_then(|n| n.checked_add(8));
    if expected != Some(file_len) {
        return Err(bad(format!(
            "run file is truncated or has trailing bytes ({file_len} bytes; its header describes {})",
            expected.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
        )));
    }
    Ok(header)
}

/// Parse a whole file (any version); every inconsistency is an `Error::Format` naming what is wrong.
pub fn decode(data: &[u8]) -> Result<(String, Vec<OwnedArray>)> {
    let (version, _) = preamble(&data[..data.len().min(24)], data.len() as u64)?;
    if version == 1 {
        decode_v1(data)
    } else {
        decode_v2(data)
    }
}

fn decode_v1(data: &[u8]) -> Result<(String, Vec<OwnedArray>)> {
    let file_len = data.len() as u64;
    let (version, header_len) = preamble(&data[..data.len().min(24)], file_len)?;
    let body = &data[..data.len() - 8];
    let stored = u64::from_le_bytes(data[data.len() - 8..].try_into().unwrap_or_default());
    if checksum(body) != stored {
        return Err(Error::Format("run file is truncated or corrupted (checksum mismatch)".into()));
    }
    let header = header(&data[24..24 + header_len], version, header_len, file_len)?;
    let data_start = 24 + pad8(header_len);
    let mut arrays = Vec::with_capacity(header.arrays.len());
    for e in header.arrays {
        // In bounds: `header` checked that the arrays fill the body exactly.
        let (s, t) = (data_start + e.offset as usize, data_start + (e.offset + e.nbytes) as usize);
        let words = body[s..t].chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))).collect();
        arrays.push(OwnedArray { name: e.name, elem: e.elem, shape: e.shape, words });
    }
    Ok((header.meta.to_string(), arrays))
}

/// A name for the temporary file next to `path`, unique in this process.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}-{count}", std::process::id()))
}

/// Whether `path` may be replaced by a saved run: it does not exist, or it is a regular file
/// (checked without following a symbolic link, which is refused).
fn check_target(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "cannot inspect", e)),
        Ok(m) if m.file_type().is_symlink() => Err(Error::Io(format!(
            "{} is a symbolic link; a run is never saved through one (save to the file it points to, os.path.realpath)",
            path.display()
        ))),
        Ok(m) if !m.is_file() => Err(Error::Io(format!(
            "{} exists and is not a regular file ({}); refusing to replace it with a run",
            path.display(),
            kind_of(&m)
        ))),
        Ok(_) => Ok(()),
    }
}

/// What a non-regular file is, for messages.
fn kind_of(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Write atomically: temporary file in the same folder (created exclusively, never through an
/// existing name), fsync, rename over `path`, fsync folder. `path` must not exist or be a
/// regular file; anything else (a symbolic link, a device, a folder) is refused untouched.
pub fn write_atomic(path: &Path, meta_json: &str, arrays: &[ArrayRef<'_>]) -> Result<()> {
    let mut w = Writer::create(path, DEFAULT_LEVEL)?;
    for a in arrays {
        w.add(a)?;
    }
    w.finish(meta_json)
}

/// O_NONBLOCK where its value is known (0 elsewhere): opening a FIFO for reading then returns at
/// once instead of waiting for a writer (the regular-file check that follows refuses it).
/// Elsewhere the check made before opening stands alone.
const O_NONBLOCK: i32 = if cfg!(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
)) {
    0o4000
} else if cfg!(any(target_os = "macos", target_os = "ios", target_os = "freebsd", target_os = "openbsd", target_os = "netbsd")) {
    0x0004
} else {
    0
};

/// Open `path` for reading if it is a regular file (checked before opening and again on the
/// open file); returns the file and its size.
fn open_regular(path: &Path) -> Result<(fs::File, u64)> {
    let not_regular = |m: &fs::Metadata| {
        Error::Io(format!("cannot read {}: it is {}, not a run file (only regular files are read)", path.display(), kind_of(m)))
    };
    let before = fs::metadata(path).map_err(|e| io_err(path, "cannot read", e))?;
    if !before.is_file() {
        return Err(not_regular(&before));
    }
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(O_NONBLOCK);
    }
    let _ = O_NONBLOCK;
    let file = options.open(path).map_err(|e| io_err(path, "cannot read", e))?;
    let m = file.metadata().map_err(|e| io_err(path, "cannot read", e))?;
    if !m.is_file() {
        return Err(not_regular(&m));
    }
    Ok((file, m.len()))
}

/// Append exactly `n` bytes of `file` to `buf` (whose capacity was reserved by the caller).
fn read_into(file: &mut fs::File, buf: &mut Vec<u8>, n: u64, path: &Path) -> Result<()> {
    use std::io::Read;
    let before = buf.len();
    file.take(n).read_to_end(buf).map_err(|e| io_err(path, "cannot read", e))?;
    if (buf.len() - before) as u64 != n {
        return Err(Error::Format(format!("truncated run file ({} changed while it was read)", path.display())));
    }
    Ok(())
}

/// An empty buffer with room for `n` bytes, allocated fallibly.
fn buffer(n: u64, path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let room = usize::try_from(n).ok().filter(|&n| buf.try_reserve_exact(n).is_ok());
    room.ok_or_else(|| Error::Io(format!("cannot read {}: no memory for its {n} bytes", path.display())))?;
    Ok(buf)
}

/// Read a saved run: a regular file only, preamble and header first (so that nothing is
/// allocated for a foreign file, and only the file's own size for a run file, which the header
/// must account for exactly), then the rest; [`decode`] then checks everything, checksum
/// included.
pub fn read(path: &Path) -> Result<(String, Vec<OwnedArray>)> {
    let (mut file, file_len) = open_regular(path)?;
    let mut head = Vec::with_capacity(24);
    read_into(&mut file, &mut head, file_len.min(24), path)?;
    let (version, header_len) = preamble(&head, file_len)?;
    let mut data = buffer(file_len, path)?;
    data.extend_from_slice(&head);
    if version == 1 {
        read_into(&mut file, &mut data, header_len as u64, path)?;
        header(&data[24..], version, header_len, file_len)?;
    }
    let rest = file_len - data.len() as u64;
    read_into(&mut file, &mut data, rest, path)?;
    decode(&data)
}

// -- format version 2: compressed blocks, header at the end --------------------------------------
//
// ```text
// 0    magic  b"NMRUN\0\r\n"
// 8    u32    format version (2)
// 12   u32    reserved (0)
// 16   u64    reserved (0)
// 24   blocks: each one array's rows [r0, r1), coded by `runcodec`, zero-padded to 8 bytes, one
//      after the other in the order they were written
// H    header: JSON, zero-padded to 8 bytes
// end-16 u64  header length (unpadded)
// end-8  u64  checksum of every byte before it
// ```
//
// The header (at the end, so a run is written in one pass, block by block, without holding it
// in memory) lists each array's name, element type, shape and blocks (offset, stored bytes,
// rows, codec). Reading checks that the blocks tile the file from byte 24 to the header exactly,
// that each array's block rows add up to its first dimension, and that no block declares more
// output than its codec can make from its stored bytes (`runcodec::max_raw`): what a file makes
// a reader allocate is at most `runcodec::MAX_RATIO` times its size.

/// Deflate level of saved runs: 1, the fastest (higher levels gain a few percent on float data
/// for several times the time; docs/benchmarks.md).
pub const DEFAULT_LEVEL: u8 = 1;

#[derive(Serialize, Deserialize, Clone)]
struct Block {
    offset: u64,
    nbytes: u64,
    rows: u64,
    codec: crate::runcodec::Codec,
}

#[derive(Serialize, Deserialize)]
struct Entry2 {
    name: String,
    elem: ElemType,
    shape: Vec<usize>,
    blocks: Vec<Block>,
}

#[derive(Serialize, Deserialize)]
struct Header2 {
    format_version: u32,
    producer: String,
    meta: serde_json::Value,
    arrays: Vec<Entry2>,
}

/// The format's checksum, fed in pieces of a multiple of 8 bytes (the same value as `checksum`
/// of the concatenation).
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        debug_assert!(data.len().is_multiple_of(8));
        for w in data.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.0 = (self.0 ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
    }
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        h ^ (h >> 31)
    }
}

/// Rows and words per row of an array of `shape` (a 0-d array is one row of one word).
fn rows_of(shape: &[usize]) -> Option<(u64, u64)> {
    match shape.split_first() {
        None => Some((1, 1)),
        Some((&rows, rest)) => rest.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).map(|w| (rows as u64, w)),
    }
}

/// A run file being written, block by block, to a temporary file next to its target; `finish`
/// writes the header and renames it over the target (atomically, as `write_atomic`). Dropped
/// unfinished, it removes its temporary file and leaves the target untouched.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<fs::File>>,
    offset: u64,
    sum: Checksum,
    arrays: Vec<Entry2>,
    level: u8,
}

impl Writer {
    pub fn create(path: &Path, level: u8) -> Result<Writer> {
        check_target(path)?;
        let tmp = temp_path(path);
        let f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
        let mut w = Writer {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
            offset: 0,
            sum: Checksum::new(),
            arrays: Vec::new(),
            level: level.min(10),
        };
        let mut pre = Vec::with_capacity(24);
        pre.extend_from_slice(MAGIC);
        pre.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        pre.extend_from_slice(&[0u8; 12]);
        w.put(&pre)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let pad = pad8(bytes.len()) - bytes.len();
        let f = self.file.as_mut().ok_or_else(|| Error::Io("run file already finished".into()))?;
        f.write_all(bytes).and_then(|_| f.write_all(&[0u8; 8][..pad])).map_err(|e| io_err(&self.tmp, "cannot write", e))?;
        // The checksum runs over whole words: the block and its padding.
        let whole = bytes.len() - bytes.len() % 8;
        self.sum.update(&bytes[..whole]);
        if whole < bytes.len() {
            let mut last = [0u8; 8];
            last[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.sum.update(&last);
        }
        self.offset += (bytes.len() + pad) as u64;
        Ok(())
    }

    /// Append `a`'s rows to the array of its name: a new array, or more rows of one already
    /// begun (same element type, same shape after the first dimension).
    pub fn add(&mut self, a: &ArrayRef<'_>) -> Result<()> {
        let (rows, row_words) =
            rows_of(&a.shape).ok_or_else(|| Error::Shape(format!("array {:?}: shape {:?} overflows", a.name, a.shape)))?;
        let n = rows.checked_mul(row_words).filter(|&n| n.checked_mul(8) == Some(a.bytes.len() as u64));
        if n.is_none() {
            return Err(Error::Shape(format!("array {:?}: {} bytes for shape {:?} (8-byte elements)", a.name, a.bytes.len(), a.shape)));
        }
        let found = self.arrays.iter().position(|e| e.name == a.name);
        if let Some(i) = found {
            let e = &self.arrays[i];
            if e.elem != a.elem || e.shape.is_empty() || a.shape.is_empty() || e.shape[1..] != a.shape[1..] {
                return Err(Error::Shape(format!("array {:?}: a block of shape {:?} cannot extend shape {:?}", a.name, a.shape, e.shape)));
            }
        }
        let (codec, stored) = crate::runcodec::encode(a.bytes, row_words as usize, self.level);
        let block = Block { offset: self.offset, nbytes: stored.len() as u64, rows, codec };
        self.put(&stored)?;
        match found {
            Some(i) => {
                let e = &mut self.arrays[i];
                e.shape[0] += rows as usize;
                e.blocks.push(block);
            }
            None => self.arrays.push(Entry2 { name: a.name.to_string(), elem: a.elem, shape: a.shape.clone(), blocks: vec![block] }),
        }
        Ok(())
    }

    /// Write the header and the checksum, flush to disk, rename over the target.
    pub fn finish(mut self, meta_json: &str) -> Result<()> {
        let meta: serde_json::Value =
            serde_json::from_str(meta_json).map_err(|e| Error::InvalidArgument(format!("run metadata is not valid JSON: {e}")))?;
        let header = Header2 {
            format_version: FORMAT_VERSION,
            producer: format!("neural-mechanics {}", env!("CARGO_PKG_VERSION")),
            meta,
            arrays: std::mem::take(&mut self.arrays),
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.put(&json)?;
        self.put(&(json.len() as u64).to_le_bytes())?;
        let sum = self.sum.finish();
        let mut f = self.file.take().ok_or_else(|| Error::Io("run file already finished".into()))?;
        f.write_all(&sum.to_le_bytes()).map_err(|e| io_err(&self.tmp, "cannot write", e))?;
        let f = f.into_inner().map_err(|e| io_err(&self.tmp, "cannot write", e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&self.tmp, "cannot flush", e))?;
        drop(f);
        // Checked again just before the rename (the target may have changed while writing).
        check_target(&self.path)?;
        fs::rename(&self.tmp, &self.path).map_err(|e| io_err(&self.path, "cannot replace", e))?;
        self.tmp = PathBuf::new(); // renamed: nothing left to remove
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every filesystem supports this, so best effort.
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A version-2 file, checked and decoded (see the layout above).
fn decode_v2(data: &[u8]) -> Result<(String, Vec<OwnedArray>)> {
    let bad = |m: String| Error::Format(m);
    let file_len = data.len() as u64;
    if file_len < 40 || !file_len.is_multiple_of(8) {
        return Err(bad(format!("truncated run file ({file_len} bytes)")));
    }
    let body = &data[..data.len() - 8];
    let stored = u64::from_le_bytes(data[data.len() - 8..].try_into().unwrap_or_default());
    let mut sum = Checksum::new();
    sum.update(body);
    if sum.finish() != stored {
        return Err(bad("run file is truncated or corrupted (checksum mismatch)".into()));
    }
    let header_len = u64::from_le_bytes(data[data.len() - 16..data.len() - 8].try_into().unwrap_or_default());
    if header_len > file_len - 40 {
        return Err(bad("truncated run file (header runs past the start)".into()));
    }
    let header_start = (file_len - 16 - pad8(header_len as usize) as u64) as usize;
    let json = &data[header_start..header_start + header_len as usize];
    let header: Header2 = serde_json::from_slice(json).map_err(|e| bad(format!("run file header is not valid: {e}")))?;
    if header.format_version != 2 {
        return Err(bad("run file header and preamble disagree on the format version".into()));
    }
    // The blocks tile [24, header_start) exactly, in file order.
    let mut spans: Vec<(u64, u64)> = header.arrays.iter().flat_map(|e| e.blocks.iter().map(|b| (b.offset, b.nbytes))).collect();
    spans.sort_unstable();
    let mut at = 24u64;
    for (offset, nbytes) in spans {
        if offset != at || nbytes > file_len {
            return Err(bad(format!("run file blocks overlap or leave gaps (a block at byte {offset}, expected {at})")));
        }
        at = offset + pad8(nbytes as usize) as u64;
    }
    if at != header_start as u64 {
        return Err(bad(format!("run file is truncated or has stray bytes (blocks end at {at}, the header starts at {header_start})")));
    }
    let mut names = std::collections::HashSet::new();
    let mut arrays = Vec::with_capacity(header.arrays.len());
    for e in header.arrays {
        if !names.insert(e.name.clone()) {
            return Err(bad(format!("array {:?} appears twice", e.name)));
        }
        let (rows, row_words) =
            rows_of(&e.shape).ok_or_else(|| bad(format!("array {:?} declares shape {:?}, which overflows", e.name, e.shape)))?;
        let block_rows = e.blocks.iter().try_fold(0u64, |acc, b| acc.checked_add(b.rows));
        if block_rows != Some(rows) || (e.shape.is_empty() && e.blocks.len() != 1) {
            return Err(bad(format!("array {:?}: its blocks hold {block_rows:?} rows, its shape {:?} says {rows}", e.name, e.shape)));
        }
        // What the blocks may make: each at most its codec's bound (a bomb is refused here, before
        // anything is allocated); an empty array's shape bounded by the file as in version 1.
        let mut total = 0u64;
        for b in &e.blocks {
            let raw = b.rows.checked_mul(row_words).and_then(|n| n.checked_mul(8));
            match raw {
                Some(raw) if raw <= crate::runcodec::max_raw(b.codec, b.nbytes) => total += raw,
                _ => return Err(bad(format!("array {:?}: a block declares more than its {} stored bytes can hold", e.name, b.nbytes))),
            }
        }
        let extent = e.shape.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        if extent.is_none_or(|n| n > file_len.saturating_mul(crate::runcodec::MAX_RATIO)) {
            return Err(bad(format!("array {:?} declares shape {:?}, larger than the file can hold", e.name, e.shape)));
        }
        let mut words = Vec::new();
        words
            .try_reserve_exact((total / 8) as usize)
            .map_err(|_| Error::Io(format!("no memory for array {:?} ({total} bytes)", e.name)))?;
        words.resize((total / 8) as usize, 0u64);
        let mut at = 0usize;
        for b in &e.blocks {
            let n = (b.rows * row_words) as usize;
            let stored = &data[b.offset as usize..(b.offset + b.nbytes) as usize];
            crate::runcodec::decode(b.codec, stored, row_words as usize, &mut words[at..at + n])
                .map_err(|err| bad(format!("array {:?}: {err}", e.name)))?;
            at += n;
        }
        arrays.push(OwnedArray { name: e.name, elem: e.elem, shape: e.shape, words });
    }
    Ok((header.meta.to_string(), arrays))
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
        let bytes = encode_v1(r#"{"k": [1, "two"]}"#, &arrays).unwrap();
        let (meta, back) = decode(&bytes).unwrap();
        assert_eq!(meta, r#"{"k":[1,"two"]}"#);
        assert_eq!(back[0].words, [1.0, 2.5, -3.0, f64::NAN, 0.0, 7.0].map(f64::to_bits));
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
        future[8] = 99; // a version-1 file, read by the version-2 reader
        assert!(matches!(decode(&future), Err(Error::Format(m)) if m.contains("version 99")));
        assert!(matches!(decode(b"PK\x03\x04 a zip file, not a run"), Err(Error::Format(_))));
        assert!(matches!(encode_v1("not json", &[]), Err(Error::InvalidArgument(_))));
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

    /// A file with this header JSON and payload, correctly framed and checksummed: only the
    /// header's own claims can be wrong.
    fn craft(header_json: &str, payload: &[u8]) -> Vec<u8> {
        let h = header_json.as_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(h);
        out.resize(24 + pad8(h.len()), 0);
        out.extend_from_slice(payload);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    fn entry(name: &str, shape: &str, offset: u64, nbytes: u64) -> String {
        format!(r#"{{"name":"{name}","elem":"f64","shape":{shape},"offset":{offset},"nbytes":{nbytes}}}"#)
    }

    fn header_with(entries: &[String]) -> String {
        format!(r#"{{"format_version":1,"producer":"x","meta":{{}},"arrays":[{}]}}"#, entries.join(","))
    }

    #[test]
    fn crafted_headers_cannot_make_a_file_allocate_more_than_its_size() {
        let payload = f64_bytes(&[1.0, 2.0]);
        let ok = craft(&header_with(&[entry("a", "[2]", 0, 16)]), &payload);
        assert_eq!(decode(&ok).unwrap().1[0].shape, vec![2]);
        let refused = [
            // Two arrays over the same bytes (each copied: n arrays would take n times the file).
            header_with(&[entry("a", "[2]", 0, 16), entry("b", "[2]", 0, 16)]),
            // The same name twice.
            header_with(&[entry("a", "[1]", 0, 8), entry("a", "[1]", 8, 8)]),
            // A gap, an array past the end, bytes no array claims.
            header_with(&[entry("a", "[1]", 8, 8)]),
            header_with(&[entry("a", "[4]", 0, 32)]),
            header_with(&[entry("a", "[1]", 0, 8)]),
            // An empty array with an enormous dimension, or enormous non-zero dimensions, and
            // shapes whose product overflows.
            header_with(&[entry("a", "[0, 1152921504606846976]", 0, 0), entry("b", "[2]", 0, 16)]),
            header_with(&[entry("a", "[0, 100, 100]", 0, 0), entry("b", "[2]", 0, 16)]),
            header_with(&[entry("a", "[4294967296, 4294967296, 2]", 0, 16)]),
            // nbytes that disagree with the shape.
            header_with(&[entry("a", "[1]", 0, 16)]),
        ];
        for h in refused {
            let file = craft(&h, &payload);
            assert!(matches!(decode(&file), Err(Error::Format(_))), "{h}");
        }
        // Trailing bytes after a valid layout.
        let mut trailing = payload.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&craft(&header_with(&[entry("a", "[2]", 0, 16)]), &trailing)), Err(Error::Format(_))));
    }

    #[test]
    fn only_regular_files_are_read_and_replaced() {
        let dir = std::env::temp_dir().join(format!("nm-runfile-targets-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let one = f64_bytes(&[1.0]);
        let arrays = [ArrayRef { name: "x", elem: ElemType::F64, shape: vec![1], bytes: &one }];
        // A folder is neither read nor replaced.
        assert!(matches!(read(&dir), Err(Error::Io(m)) if m.contains("a folder")));
        let sub = dir.join("sub");
        fs::create_dir_all(&sub).unwrap();
        assert!(matches!(write_atomic(&sub, "{}", &arrays), Err(Error::Io(m)) if m.contains("not a regular file")));
        assert!(sub.is_dir());
        // A symbolic link is refused and left as it is, and so is the file it points to.
        #[cfg(unix)]
        {
            let target = dir.join("target.nmrun");
            write_atomic(&target, r#"{"v": 1}"#, &arrays).unwrap();
            let link = dir.join("link.nmrun");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            assert!(matches!(write_atomic(&link, r#"{"v": 2}"#, &arrays), Err(Error::Io(m)) if m.contains("symbolic link")));
            assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
            assert_eq!(read(&link).unwrap().0, r#"{"v":1}"#); // reading through a link is fine
                                                              // A character device (read side): refused before a byte is read.
            let zero = Path::new("/dev/zero");
            if zero.exists() {
                assert!(matches!(read(zero), Err(Error::Io(m)) if m.contains("a device")));
            }
        }
        // A foreign regular file is refused after its first bytes, whatever its size.
        let foreign = dir.join("foreign");
        fs::write(&foreign, vec![b'x'; 1 << 20]).unwrap();
        assert!(matches!(read(&foreign), Err(Error::Format(m)) if m.contains("magic")));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn v2_file(dir: &Path, name: &str, blocks: &[(&str, Vec<usize>, Vec<f64>)]) -> Vec<u8> {
        let path = dir.join(name);
        let mut w = Writer::create(&path, DEFAULT_LEVEL).unwrap();
        for (n, shape, v) in blocks {
            let b = f64_bytes(v);
            w.add(&ArrayRef { name: n, elem: ElemType::F64, shape: shape.clone(), bytes: &b }).unwrap();
        }
        w.finish(r#"{"m": 1}"#).unwrap();
        fs::read(&path).unwrap()
    }

    #[test]
    fn version_2_streams_blocks_and_every_bit_comes_back() {
        let dir = std::env::temp_dir().join(format!("nm-runfile-v2-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let a: Vec<f64> = (0..600).map(|i| 1.0 + 1e-9 * i as f64).collect();
        let nan = vec![f64::NAN; 300];
        let bytes = v2_file(
            &dir,
            "r",
            &[("x", vec![2, 300], a[..600].to_vec()), ("y", vec![1, 300], nan.clone()), ("x", vec![1, 300], a[..300].to_vec())],
        );
        assert!(bytes.len() < 8 * 1200, "compressed: {}", bytes.len());
        let (meta, back) = decode(&bytes).unwrap();
        assert_eq!(meta, r#"{"m":1}"#);
        assert_eq!(back[0].shape, vec![3, 300]);
        let want: Vec<u64> = a.iter().chain(&a[..300]).map(|x| x.to_bits()).collect();
        assert_eq!(back[0].words, want);
        assert_eq!(back[1].words, nan.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(read(&dir.join("r")).unwrap().1, back);
        // Truncation and flipped bits anywhere are errors.
        for cut in [0, 7, 20, 30, 40, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
            assert!(matches!(decode(&bytes[..cut]), Err(Error::Format(_))), "cut {cut}");
        }
        for at in [30, bytes.len() / 2, bytes.len() - 12] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(matches!(decode(&bad), Err(Error::Format(_))), "flip {at}");
        }
        // A block that cannot extend its array, a writer dropped unfinished: no file, no temporary.
        let mut w = Writer::create(&dir.join("unfinished"), 1).unwrap();
        let b = f64_bytes(&[1.0, 2.0]);
        w.add(&ArrayRef { name: "z", elem: ElemType::F64, shape: vec![1, 2], bytes: &b }).unwrap();
        assert!(w.add(&ArrayRef { name: "z", elem: ElemType::F64, shape: vec![2, 1], bytes: &b }).is_err());
        drop(w);
        let names: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("r")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A version-2 file with this header JSON and these block bytes, correctly framed.
    fn craft_v2(header_json: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&[0u8; 12]);
        out.extend_from_slice(payload);
        out.resize(pad8(out.len()), 0);
        out.extend_from_slice(header_json.as_bytes());
        out.resize(pad8(out.len()), 0);
        out.extend_from_slice(&(header_json.len() as u64).to_le_bytes());
        let mut sum = Checksum::new();
        sum.update(&out);
        out.extend_from_slice(&sum.finish().to_le_bytes());
        out
    }

    #[test]
    fn version_2_headers_cannot_make_a_file_allocate_more_than_its_codec_bound() {
        let (codec, stored) = crate::runcodec::encode(&vec![0u8; 4096 * 8], 64, 1);
        let codec = serde_json::to_string(&codec).unwrap();
        let h = |shape: &str, rows: u64, nbytes: usize, offset: u64| {
            format!(
                r#"{{"format_version":2,"producer":"x","meta":{{}},"arrays":[{{"name":"a","elem":"f64","shape":{shape},"blocks":[{{"offset":{offset},"nbytes":{nbytes},"rows":{rows},"codec":{codec}}}]}}]}}"#
            )
        };
        let ok = craft_v2(&h("[64, 64]", 64, stored.len(), 24), &stored);
        assert_eq!(decode(&ok).unwrap().1[0].words.len(), 4096);
        let refused = [
            h("[100000000000, 64]", 100_000_000_000, stored.len(), 24), // a bomb: refused before inflating
            h("[65, 64]", 65, stored.len(), 24),                        // more than the stream holds
            h("[64, 64]", 63, stored.len(), 24),                        // rows disagree with the shape
            h("[64, 64]", 64, stored.len(), 32),                        // a gap
            h("[64, 64]", 64, stored.len() + 8, 24),                    // past the header
            h("[0, 1152921504606846976]", 0, stored.len(), 24),
        ];
        for header in refused {
            assert!(matches!(decode(&craft_v2(&header, &stored)), Err(Error::Format(_))), "{header}");
        }
    }
}
