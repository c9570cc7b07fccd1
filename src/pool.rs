//! The private rayon pool of the crate.
//!
//! Private, so that the caller's own rayon users are not disturbed, and sized by
//! `NEURAL_MECHANICS_NUM_THREADS` or [`set_num_threads`]. A process forked after the pool was
//! built (PyTorch DataLoader workers) inherits the pool's bookkeeping but not its threads: every
//! access compares the process id with the one that built the pool and builds a fresh pool in
//! the child, leaking the dead one (its threads do not exist there, so it cannot be dropped).

use crate::error::{Error, Result};
use rayon::ThreadPool;
use std::sync::{Arc, Mutex};

pub const ENV_VAR: &str = "NEURAL_MECHANICS_NUM_THREADS";
/// More threads than this is a typo, not a machine: refuse before trying to start them.
pub const MAX_THREADS: usize = 4096;

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<PoolState>> = Mutex::new(None);
/// Threads asked for by `set_num_threads` (0: not set, use the environment or the core count).
static REQUESTED: Mutex<usize> = Mutex::new(0);

fn default_threads() -> Result<usize> {
    if let Ok(text) = std::env::var(ENV_VAR) {
        return match text.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            _ => Err(Error::InvalidArgument(format!(
                "{ENV_VAR}={text:?} is not a thread count: give an integer from 1 to {MAX_THREADS} \
                 (or unset it to use every core)"
            ))),
        };
    }
    Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn wanted_threads() -> Result<usize> {
    let requested = *REQUESTED.lock().unwrap_or_else(|e| e.into_inner());
    if requested > 0 {
        Ok(requested)
    } else {
        default_threads()
    }
}

/// Set the pool size; 0 goes back to the default (environment variable, else the core count).
pub fn set_num_threads(n: usize) -> Result<()> {
    if n > MAX_THREADS {
        return Err(Error::InvalidArgument(format!("set_num_threads({n}): at most {MAX_THREADS} threads (0 restores the default)")));
    }
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = n;
    // Validate now (a bad environment variable surfaces here rather than mid-training).
    wanted_threads().map(|_| ())
}

/// The number of threads the next parallel call will use.
pub fn num_threads() -> Result<usize> {
    wanted_threads()
}

/// The pool for this process, built on first use, rebuilt after a fork or a size change.
pub fn pool() -> Result<Arc<ThreadPool>> {
    let threads = wanted_threads()?;
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = guard.as_ref() {
        if state.pid == pid && state.threads == threads {
            return Ok(state.pool.clone());
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // Inherited through fork: its worker threads live only in the parent.
            std::mem::forget(old);
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("neural-mechanics-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {threads} threads: {e}")))?;
    let pool = Arc::new(pool);
    *guard = Some(PoolState { pid, threads, pool: pool.clone() });
    Ok(pool)
}
