//! The bandwidth limit: a plain read of the same bytes, with the same pool and the same cut into
//! tasks, for benchmarks/bench_stats.py. Nothing is computed but a wrapping sum of 64-bit words,
//! which the compiler vectorises to one add per load, so this is as close to "memory speed" as a
//! reduction can be.

#[cfg(target_arch = "x86_64")]
use super::kernels::has_avx2;
use super::plan::{PARALLEL_MIN_ELEMS, TASK_ELEMS};
use crate::error::Result;
use crate::pool;
use rayon::prelude::*;

/// Bytes per read task: the same order of size as a fused task over one f32 array.
const READ_TASK_BYTES: usize = TASK_ELEMS * 4;

/// The same software prefetch distance as the segment kernels.
#[cfg(target_arch = "x86_64")]
const READ_PREFETCH_BYTES: usize = 4096;

#[inline(always)]
fn read_words(bytes: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    let mut acc = [0u64; 16];
    let chunks = words.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        // The same software prefetch as the fused kernels (see stats/kernels/avx2.rs), so that
        // the limit is the best plain read, not a handicapped one.
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let ahead = (c.as_ptr() as *const i8).wrapping_add(READ_PREFETCH_BYTES);
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
        }
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    let mut s = acc.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    for &w in rest {
        s = s.wrapping_add(w);
    }
    for &b in head.iter().chain(tail) {
        s = s.wrapping_add(b as u64);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn read_words_avx2(bytes: &[u8]) -> u64 {
    read_words(bytes)
}

fn read_chunk(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { read_words_avx2(bytes) };
    }
    read_words(bytes)
}

/// Read every byte of `buffers` once (in parallel above the same size threshold as
/// [`super::group_stats_batch`]) and return a checksum, so that the reads cannot be optimised
/// away.
pub fn read_pass(buffers: &[&[u8]]) -> Result<u64> {
    let mut chunks: Vec<&[u8]> = Vec::new();
    for b in buffers {
        chunks.extend(b.chunks(READ_TASK_BYTES));
    }
    let total: usize = buffers.iter().map(|b| b.len()).sum();
    let sum = if pool::num_threads()? == 1 || total < PARALLEL_MIN_ELEMS * 4 || chunks.len() < 2 {
        chunks.iter().fold(0u64, |a, c| a.wrapping_add(read_chunk(c)))
    } else {
        pool::pool()?.install(|| chunks.par_iter().map(|c| read_chunk(c)).reduce(|| 0, |a, b| a.wrapping_add(b)))
    };
    Ok(sum)
}
