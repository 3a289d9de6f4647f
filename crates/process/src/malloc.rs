//! Memory that stays put: glibc `malloc` settings applied at process start (see [`crate::init`]), so that a training step does not hand its large
//! tensors back to the kernel and fault them in again, zeroed, on the next step.
//!
//! Why: libtorch's CPU allocator (`c10::alloc_cpu`) takes every tensor from glibc through
//! `posix_memalign`. glibc serves a block above `M_MMAP_THRESHOLD` (128 KiB at start, raised
//! dynamically up to 32 MiB as such blocks are freed) with its own `mmap`, and `munmap`s it on
//! `free`; it also trims the heap top above `M_TRIM_THRESHOLD`. A training step allocates and frees
//! activations and gradients of tens to hundreds of MB (MobileFaceNet at batch 64: about 100 MB per
//! early activation), so each step paid first-touch page faults on all of them: 15–20 % of the
//! cycles in `clear_page_erms`/`exc_page_fault` in `perf` (issue 16).
//!
//! What [`crate::init`] does with the default policy [`Policy::Keep`]: `mallopt(M_MMAP_THRESHOLD, 1 GiB)`
//! (blocks up to 1 GiB come from the heap and are reused; setting it also switches off glibc's
//! dynamic threshold) and `mallopt(M_TRIM_THRESHOLD, 2 GiB − 1)` (freed memory at the heap top is
//! kept). Both must be set before the large allocations, which is why it runs first in `main`.
//! The trade: the process keeps its peak working set instead of returning it between steps, so
//! its resident size stays at about its peak ([`crate::peak_rss_bytes`] reports it) and a long-lived
//! process does not give memory back to others after a large phase.
//!
//! A Rust `#[global_allocator]` (mimalloc, jemalloc) would not help here: it replaces only the
//! allocations Rust code makes, while tensors are allocated inside libtorch by glibc.
//!
//! Opt-out: `FACEREC_MALLOC=system` leaves glibc's defaults (and any `GLIBC_TUNABLES` the user set)
//! alone. On targets other than Linux/glibc both policies leave the allocator as it is.

use anyhow::{bail, Result};

/// The environment variable that selects the policy (`keep`, the default, or `system`).
pub const ENV: &str = "FACEREC_MALLOC";

/// `M_MMAP_THRESHOLD` under [`Policy::Keep`]: blocks up to 1 GiB come from the heap.
pub const MMAP_THRESHOLD: i32 = 1 << 30;

/// `M_TRIM_THRESHOLD` under [`Policy::Keep`]: the largest value `mallopt` takes (2 GiB − 1).
pub const TRIM_THRESHOLD: i32 = i32::MAX;

/// How the process's `malloc` treats large freed blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep freed memory for reuse (the thresholds above). Default.
    Keep,
    /// glibc's defaults: large blocks are `mmap`ed and returned to the kernel on `free`.
    System,
}

impl Policy {
    /// The policy named by `value` (`keep` or `system`, case-insensitive; empty means `keep`).
    pub fn parse(value: &str) -> Result<Policy> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "keep" => Ok(Policy::Keep),
            "system" => Ok(Policy::System),
            other => bail!("{ENV}={other:?}: expected `keep` (the default) or `system`"),
        }
    }

    /// The policy `$FACEREC_MALLOC` asks for (unset: [`Policy::Keep`]).
    pub fn from_env() -> Result<Policy> {
        match std::env::var(ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Policy::Keep),
            Err(std::env::VarError::NotUnicode(v)) => bail!("{ENV}={v:?} is not valid UTF-8"),
        }
    }

    /// The name `FACEREC_MALLOC` uses for this policy.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Keep => "keep",
            Policy::System => "system",
        }
    }

    /// One line for logs: the policy and what it set.
    pub fn describe(self) -> String {
        match self {
            Policy::Keep if cfg!(all(target_os = "linux", target_env = "gnu")) => format!(
                "{ENV}=keep (glibc M_MMAP_THRESHOLD {} MiB, M_TRIM_THRESHOLD {} MiB)",
                MMAP_THRESHOLD >> 20,
                TRIM_THRESHOLD >> 20
            ),
            Policy::Keep => format!("{ENV}=keep (no effect: not glibc)"),
            Policy::System => format!("{ENV}=system (allocator defaults)"),
        }
    }
}

/// Apply `policy` to this process. [`Policy::System`] changes nothing.
///
/// Call it before the large allocations (first thing in `main`): blocks allocated earlier keep the
/// treatment they got.
pub fn apply(policy: Policy) -> Result<()> {
    if policy == Policy::System {
        return Ok(());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes glibc's malloc parameters; any int is a valid argument.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            bail!("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) for {ENV}=keep; set {ENV}=system to run with the defaults");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies_and_names_the_variable_on_error() {
        assert_eq!(Policy::parse("").unwrap(), Policy::Keep);
        assert_eq!(Policy::parse("keep").unwrap(), Policy::Keep);
        assert_eq!(Policy::parse(" System ").unwrap(), Policy::System);
        let e = format!("{:#}", Policy::parse("jemalloc").unwrap_err());
        assert!(
            e.contains("FACEREC_MALLOC") && e.contains("jemalloc"),
            "{e}"
        );
        for p in [Policy::Keep, Policy::System] {
            assert_eq!(Policy::parse(p.name()).unwrap(), p);
        }
    }
}
