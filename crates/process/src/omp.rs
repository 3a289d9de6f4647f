//! How libtorch's OpenMP threads wait when idle: a short spin, then sleep (`GOMP_SPINCOUNT=3000`).
//!
//! Why: libtorch's CPU kernels run their parallel regions on libgomp's thread pool. With libgomp's
//! default policy a thread that finishes its share spins (for about 300,000 iterations) before it
//! sleeps, and at every barrier it spins waiting for the slowest thread. On a machine where the
//! cores are shared, by data-decoding workers (the training loader) or by other processes, the
//! thread being waited for is often not even running while its partner burns the core it needs:
//! `perf` of a training step of the small iResNet at load average 10 on the 2-core development
//! machine showed 74 % of the cycles inside libgomp's wait loop, and the step ran 3.5–6x faster
//! with `OMP_WAIT_POLICY=PASSIVE` (see docs/benchmarks.md, "Training steps"). But sleeping at once
//! costs on a quiet machine: every small kernel then wakes its threads through the kernel, and the
//! default run trained 35 % slower with the passive policy than with libgomp's default when
//! nothing else ran. A spin of 3,000 iterations (tens of microseconds) covers the gaps between a
//! step's kernels and gives the core up before it matters to a competing thread: on the 2-core
//! machine it matched the faster of the two in both cases (docs/training.md).
//!
//! libgomp reads its environment in a constructor when the library is loaded, before `main`, so
//! setting a variable from inside the process is too late: [`init`] sets it and re-executes the
//! binary (`/proc/self/exe`, same arguments) once, when libgomp is mapped into the process and
//! neither `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` nor the opt-out is set. A variable the user set is
//! always respected. Child processes inherit the variable.
//!
//! `FACEREC_OMP_WAIT`: `short` (the default) sets `GOMP_SPINCOUNT=3000`; `passive` sets
//! `OMP_WAIT_POLICY=PASSIVE` (sleep at once; the previous default); `default` leaves OpenMP's own.

use anyhow::{bail, Result};

/// The opt-out variable (`short`, the default, `passive` or `default`).
pub const ENV: &str = "FACEREC_OMP_WAIT";

/// The spin count of the `short` policy (libgomp's iterations of its wait loop before it sleeps).
pub const SHORT_SPIN: u32 = 3000;

/// Set in the re-executed process, so that it never re-executes again.
const REEXEC_MARK: &str = "FACEREC_OMP_REEXEC";

/// The OpenMP wait policy the process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `GOMP_SPINCOUNT=3000` set by [`init`]: spin briefly, then sleep.
    ShortSpin,
    /// `OMP_WAIT_POLICY=PASSIVE` is in force (set by [`init`] or by the user).
    Passive,
    /// Left to the user's `OMP_WAIT_POLICY` / `GOMP_SPINCOUNT` or OpenMP's default (opt-out,
    /// another value set by the user, no libgomp in the process, or the re-execution failed).
    Inherited,
}

impl Wait {
    /// One line for logs.
    pub fn describe(self) -> String {
        match self {
            Wait::ShortSpin => format!("GOMP_SPINCOUNT={SHORT_SPIN}"),
            Wait::Passive => "OMP_WAIT_POLICY=PASSIVE".into(),
            Wait::Inherited => {
                let set: Vec<String> = ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"]
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
                    .collect();
                if set.is_empty() {
                    "OpenMP wait policy: its default".into()
                } else {
                    format!("{} (as set)", set.join(", "))
                }
            }
        }
    }

    /// The variable and value that put this policy in force, for the re-execution.
    fn variable(self) -> Option<(&'static str, String)> {
        match self {
            Wait::ShortSpin => Some(("GOMP_SPINCOUNT", SHORT_SPIN.to_string())),
            Wait::Passive => Some(("OMP_WAIT_POLICY", "PASSIVE".into())),
            Wait::Inherited => None,
        }
    }
}

/// What [`init`] must do, from the environment and whether libgomp is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Set the policy's variable ([`Wait::ShortSpin`] or [`Wait::Passive`]) and re-execute.
    Reexec(Wait),
    /// Nothing to do; the policy in force is this.
    Keep(Wait),
}

/// The decision for `FACEREC_OMP_WAIT = opt`, `OMP_WAIT_POLICY = policy`,
/// `GOMP_SPINCOUNT = spincount`, whether this process was already re-executed and whether
/// libgomp is loaded.
pub fn decide(
    opt: Option<&str>,
    policy: Option<&str>,
    spincount: Option<&str>,
    reexecuted: bool,
    gomp_loaded: bool,
) -> Result<Decision> {
    let want = match opt.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("short") => Some(Wait::ShortSpin),
        Some("passive") => Some(Wait::Passive),
        Some("default") => None,
        Some(other) => {
            bail!("{ENV}={other:?}: expected `short` (the default), `passive` or `default`")
        }
    };
    Ok(match (policy, spincount) {
        (Some(p), _) if p.trim().eq_ignore_ascii_case("passive") => Decision::Keep(Wait::Passive),
        (Some(_), _) => Decision::Keep(Wait::Inherited),
        (None, Some(c)) if reexecuted && c.trim() == SHORT_SPIN.to_string() => {
            Decision::Keep(Wait::ShortSpin)
        }
        (None, Some(_)) => Decision::Keep(Wait::Inherited),
        (None, None) => match want {
            Some(w) if gomp_loaded && !reexecuted => Decision::Reexec(w),
            _ => Decision::Keep(Wait::Inherited),
        },
    })
}

/// Whether libgomp is mapped into this process (`/proc/self/maps`).
fn gomp_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libgomp"))
        .unwrap_or(false)
}

/// Put the wait policy in force (see the module docs); may re-execute the binary and then does
/// not return in this process image. Returns the policy in force.
pub fn init() -> Result<Wait> {
    let var = |k| std::env::var(k).ok();
    let reexecuted = std::env::var_os(REEXEC_MARK).is_some();
    let decision = decide(
        var(ENV).as_deref(),
        var("OMP_WAIT_POLICY").as_deref(),
        var("GOMP_SPINCOUNT").as_deref(),
        reexecuted,
        gomp_loaded(),
    )?;
    match decision {
        Decision::Keep(w) => Ok(w),
        Decision::Reexec(w) => {
            #[cfg(unix)]
            if let Some((key, value)) = w.variable() {
                use std::os::unix::process::CommandExt;
                let mut args = std::env::args_os();
                let argv0 = args.next().unwrap_or_default();
                let err = std::process::Command::new("/proc/self/exe")
                    .arg0(argv0)
                    .args(args)
                    .env(key, &value)
                    .env(REEXEC_MARK, "1")
                    .exec();
                eprintln!("warning: could not re-execute with {key}={value} ({err}); OpenMP keeps its default wait policy");
            }
            Ok(Wait::Inherited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_from_the_environment() {
        let d = |opt, policy, spin, re, gomp| decide(opt, policy, spin, re, gomp).unwrap();
        assert_eq!(
            d(None, None, None, false, true),
            Decision::Reexec(Wait::ShortSpin)
        );
        assert_eq!(
            d(Some("short"), None, None, false, true),
            Decision::Reexec(Wait::ShortSpin)
        );
        assert_eq!(
            d(Some("passive"), None, None, false, true),
            Decision::Reexec(Wait::Passive)
        );
        // The re-executed process sees its own variable; no libgomp: nothing to set.
        assert_eq!(
            d(None, None, Some("3000"), true, true),
            Decision::Keep(Wait::ShortSpin)
        );
        assert_eq!(
            d(Some("passive"), Some("PASSIVE"), None, true, true),
            Decision::Keep(Wait::Passive)
        );
        assert_eq!(
            d(None, None, None, true, true),
            Decision::Keep(Wait::Inherited)
        );
        assert_eq!(
            d(None, None, None, false, false),
            Decision::Keep(Wait::Inherited)
        );
        // The user's own setting wins; the opt-out leaves the default.
        assert_eq!(
            d(None, Some("PASSIVE"), None, false, true),
            Decision::Keep(Wait::Passive)
        );
        assert_eq!(
            d(None, Some("active"), None, false, true),
            Decision::Keep(Wait::Inherited)
        );
        assert_eq!(
            d(None, None, Some("3000"), false, true),
            Decision::Keep(Wait::Inherited)
        );
        assert_eq!(
            d(Some("short"), None, Some("50000"), false, true),
            Decision::Keep(Wait::Inherited)
        );
        assert_eq!(
            d(Some("default"), None, None, false, true),
            Decision::Keep(Wait::Inherited)
        );
        let e = format!(
            "{:#}",
            decide(Some("spin"), None, None, false, true).unwrap_err()
        );
        assert!(e.contains("FACEREC_OMP_WAIT") && e.contains("spin"), "{e}");
    }
}
