//! The lossless block codec of saved runs (format version 2, `runfile`): one block holds some
//! rows of one array of 8-byte words (float64 or int64), stored as
//!
//! 1. each row XOR-ed with the row before it in the block (a charge changes little from one
//!    recorded step to the next, so its sign, exponent and leading mantissa bits cancel);
//! 2. bytes shuffled into eight planes (byte 0 of every word, then byte 1, ...), so the
//!    near-constant high bytes sit together;
//! 3. deflate (`miniz_oxide`, pure Rust), or the shuffled bytes as they are when deflate does not
//!    make them smaller.
//!
//! Every step is a bijection on bits, so every float comes back bit for bit (NaNs included):
//! errors of 1e-7 relative keep all their digits.
//!
//! Decompression bombs: deflate cannot expand its input more than [`MAX_RATIO`] to one (a
//! 258-byte match costs at least 2 bits), so a block that declares more output than that is
//! refused before it is inflated, and inflation stops at the declared size; what a file makes a
//! reader allocate is at most `MAX_RATIO` times its size.

use crate::error::{Error, Result};

/// Deflate's largest possible expansion (output bytes per input byte), plus slack for a header.
pub const MAX_RATIO: u64 = 1032;

/// How a block's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// XOR with the previous row, byte planes, deflate.
    Deflate,
    /// XOR with the previous row, byte planes, stored as they are.
    Planes,
}

/// The largest output a block of `nbytes` stored bytes may declare under `codec`.
pub fn max_raw(codec: Codec, nbytes: u64) -> u64 {
    match codec {
        Codec::Planes => nbytes,
        Codec::Deflate => nbytes.saturating_mul(MAX_RATIO).saturating_add(MAX_RATIO),
    }
}

/// Encode `bytes` (little-endian 8-byte words, rows of `row_words` words, C order) into
/// (codec, stored bytes).
pub fn encode(bytes: &[u8], row_words: usize, level: u8) -> (Codec, Vec<u8>) {
    let word = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    let n = bytes.len() / 8;
    let mut planes = vec![0u8; n * 8];
    for i in 0..n {
        let prev = if row_words > 0 && i >= row_words { word(i - row_words) } else { 0 };
        let d = (word(i) ^ prev).to_le_bytes();
        for (k, b) in d.iter().enumerate() {
            planes[k * n + i] = *b;
        }
    }
    let packed = miniz_oxide::deflate::compress_to_vec(&planes, level);
    if packed.len() < planes.len() {
        (Codec::Deflate, packed)
    } else {
        (Codec::Planes, planes)
    }
}

/// Decode a block into `out` (exactly the words it declared: `out.len()`), rows of `row_words`.
pub fn decode(codec: Codec, stored: &[u8], row_words: usize, out: &mut [u64]) -> Result<()> {
    let n = out.len();
    let raw = n.checked_mul(8).ok_or_else(|| Error::Format("run file block is too large".into()))?;
    if raw as u64 > max_raw(codec, stored.len() as u64) {
        return Err(Error::Format(format!(
            "run file block declares {raw} bytes from {} stored: more than the codec can produce",
            stored.len()
        )));
    }
    let inflated;
    let planes: &[u8] = match codec {
        Codec::Planes => stored,
        Codec::Deflate => {
            inflated = miniz_oxide::inflate::decompress_to_vec_with_limit(stored, raw)
                .map_err(|e| Error::Format(format!("run file block does not inflate ({:?})", e.status)))?;
            &inflated
        }
    };
    if planes.len() != raw {
        return Err(Error::Format(format!("run file block holds {} bytes; its header says {raw}", planes.len())));
    }
    for (i, slot) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        for (k, byte) in b.iter_mut().enumerate() {
            *byte = planes[k * n + i];
        }
        *slot = u64::from_le_bytes(b);
    }
    // Undo the XOR with the previous row, row after row (row r needs row r - 1 decoded).
    if row_words > 0 {
        for i in row_words..n {
            out[i] ^= out[i - row_words];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_comes_back_and_bombs_are_refused() {
        let mut words: Vec<u64> = (0..3000).map(|i| (1.0 + 1e-7 * (i % 37) as f64).to_bits()).collect();
        words[5] = f64::NAN.to_bits() | 1; // a NaN payload survives
        words[7] = (-0.0f64).to_bits();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for row_words in [0, 1, 7, 100] {
            let (codec, stored) = encode(&bytes, row_words, 1);
            let mut back = vec![0u64; words.len()];
            decode(codec, &stored, row_words, &mut back).unwrap();
            assert_eq!(back, words);
        }
        let (codec, stored) = encode(&vec![0u8; 800_000], 10, 1);
        assert_eq!(codec, Codec::Deflate);
        assert!(stored.len() < 800_000 / 50, "{}", stored.len());
        // Declaring far more output than deflate can make from these bytes is refused up front.
        let mut huge = vec![0u64; (max_raw(codec, stored.len() as u64) / 8 + 1) as usize];
        assert!(matches!(decode(codec, &stored, 10, &mut huge), Err(Error::Format(m)) if m.contains("more than")));
        // Declaring more than the stream holds, or less, is refused too.
        let mut more = vec![0u64; 100_001];
        assert!(decode(codec, &stored, 10, &mut more).is_err());
        let mut less = vec![0u64; 99_999];
        assert!(decode(codec, &stored, 10, &mut less).is_err());
        assert!(decode(Codec::Deflate, b"garbage!", 1, &mut [0u64; 4]).is_err());
    }
}
