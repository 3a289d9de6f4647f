//! Process-start settings of the facerec binaries (`facerec`, the `bench-*` binaries): call
//! [`init`] first thing in `main`.
//!
//! - [`malloc`]: glibc keeps freed memory for reuse instead of returning large blocks to the kernel
//!   and faulting them in again, zeroed, every training step (`FACEREC_MALLOC=keep`, the default;
//!   `system` opts out).
//! - [`omp`]: libtorch's OpenMP threads spin briefly at the end of a parallel region, then sleep
//!   (`GOMP_SPINCOUNT=3000` unless the user set it or `OMP_WAIT_POLICY`; `FACEREC_OMP_WAIT=passive`
//!   sleeps at once, `default` opts out). libgomp reads its environment when it is loaded, before
//!   `main`, so [`init`] sets the variable and re-executes the binary once.
//!
//! [`peak_rss_bytes`] and [`peak_rss_line`] report the memory side of the trade.

use anyhow::Result;

pub mod malloc;
pub mod omp;

/// What [`init`] put in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The allocator policy.
    pub malloc: malloc::Policy,
    /// The OpenMP wait policy.
    pub omp: omp::Wait,
}

impl Settings {
    /// One line for logs.
    pub fn describe(&self) -> String {
        format!("{}; {}", self.malloc.describe(), self.omp.describe())
    }
}

/// Apply the process settings from the environment: first the OpenMP wait policy (which may
/// re-execute the binary with `GOMP_SPINCOUNT` set, so nothing before this call should
/// have side effects), then the allocator thresholds.
///
/// Errors name the environment variable with a bad value, or the failing call.
pub fn init() -> Result<Settings> {
    let omp = omp::init()?;
    let policy = malloc::Policy::from_env()?;
    malloc::apply(policy)?;
    Ok(Settings {
        malloc: policy,
        omp,
    })
}

/// The largest resident set size this process has had so far, in bytes (`getrusage`'s
/// `ru_maxrss`); `None` where the call fails.
pub fn peak_rss_bytes() -> Option<u64> {
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF is a constant libc defines.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    // Linux reports kilobytes.
    (rc == 0).then(|| usage.ru_maxrss as u64 * 1024)
}

/// Minor page faults of this process so far (`getrusage`'s `ru_minflt`), 0 where the call fails.
pub fn minor_faults() -> u64 {
    // SAFETY: as in `peak_rss_bytes`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc == 0 {
        usage.ru_minflt as u64
    } else {
        0
    }
}

/// "peak RSS 1234 MiB" (or "peak RSS unknown"), for the end of a run.
pub fn peak_rss_line() -> String {
    match peak_rss_bytes() {
        Some(b) => format!("peak RSS {} MiB", b >> 20),
        None => "peak RSS unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_positive() {
        let rss = peak_rss_bytes().expect("getrusage works on Linux");
        assert!(
            rss > 1 << 20,
            "a test process has more than 1 MiB resident: {rss}"
        );
    }
}
