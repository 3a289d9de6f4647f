//! OpenMP threads that sleep when idle: `OMP_WAIT_POLICY=PASSIVE` for libtorch's intra-op pool.
//!
//! Why: libtorch's CPU kernels run their parallel regions on libgomp's thread pool. With libgomp's
//! default policy a thread that finishes its share spins (for about 300,000 iterations) before it
//! sleeps, and at every barrier it spins waiting for the slowest thread. On a machine where the
//! cores are shared, by data-decoding workers (the training loader) or by other processes, the
//! thread being waited for is often not even running while its partner burns the core it needs:
//! `perf` of a training step of the small iResNet at load average 10 on the 2-core development
//! machine showed 74 % of the cycles inside libgomp's wait loop, and the step ran 3.5–6x faster
//! with `OMP_WAIT_POLICY=PASSIVE` (see docs/benchmarks.md, "Training steps").
//!
//! libgomp reads its environment in a constructor when the library is loaded, before `main`, so
//! setting the variable from inside the process is too late: [`init`] sets it and re-executes the
//! binary (`/proc/self/exe`, same arguments) once, when libgomp is mapped into the process and
//! neither `OMP_WAIT_POLICY` nor the opt-out is set. A variable the user set is always respected.
//! Child processes inherit the variable.
//!
//! Opt-out: `FACEREC_OMP_WAIT=default` (leave OpenMP's own default); `FACEREC_OMP_WAIT=passive`
//! (the default) asks for the passive policy.

use anyhow::{bail, Result};

/// The opt-out variable (`passive`, the default, or `default`).
pub const ENV: &str = "FACEREC_OMP_WAIT";

/// Set in the re-executed process, so that it never re-executes again.
const REEXEC_MARK: &str = "FACEREC_OMP_REEXEC";

/// The OpenMP wait policy the process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `OMP_WAIT_POLICY=PASSIVE` is in force (set by [`init`] or by the user).
    Passive,
    /// Left to the user's `OMP_WAIT_POLICY` or OpenMP's default (opt-out, another value set by the
    /// user, no libgomp in the process, or the re-execution failed).
    Inherited,
}

impl Wait {
    /// One line for logs.
    pub fn describe(self) -> String {
        match self {
            Wait::Passive => "OMP_WAIT_POLICY=PASSIVE".into(),
            Wait::Inherited => match std::env::var("OMP_WAIT_POLICY") {
                Ok(v) => format!("OMP_WAIT_POLICY={v} (as set)"),
                Err(_) => "OpenMP wait policy: its default".into(),
            },
        }
    }
}

/// What [`init`] must do, from the environment and whether libgomp is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Set `OMP_WAIT_POLICY=PASSIVE` and re-execute.
    Reexec,
    /// Nothing to do; the policy in force is this.
    Keep(Wait),
}

/// The decision for `FACEREC_OMP_WAIT = opt`, `OMP_WAIT_POLICY = policy`, whether this process
/// was already re-executed and whether libgomp is loaded.
pub fn decide(
    opt: Option<&str>,
    policy: Option<&str>,
    reexecuted: bool,
    gomp_loaded: bool,
) -> Result<Decision> {
    let want_passive = match opt.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("passive") => true,
        Some("default") => false,
        Some(other) => bail!("{ENV}={other:?}: expected `passive` (the default) or `default`"),
    };
    Ok(match policy {
        Some(p) if p.trim().eq_ignore_ascii_case("passive") => Decision::Keep(Wait::Passive),
        Some(_) => Decision::Keep(Wait::Inherited),
        None if want_passive && gomp_loaded && !reexecuted => Decision::Reexec,
        None => Decision::Keep(Wait::Inherited),
    })
}

/// Whether libgomp is mapped into this process (`/proc/self/maps`).
fn gomp_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libgomp"))
        .unwrap_or(false)
}

/// Put the passive policy in force (see the module docs); may re-execute the binary and then does
/// not return in this process image. Returns the policy in force.
pub fn init() -> Result<Wait> {
    let opt = std::env::var(ENV).ok();
    let policy = std::env::var("OMP_WAIT_POLICY").ok();
    let reexecuted = std::env::var_os(REEXEC_MARK).is_some();
    match decide(opt.as_deref(), policy.as_deref(), reexecuted, gomp_loaded())? {
        Decision::Keep(w) => Ok(w),
        Decision::Reexec => {
            #[cfg(unix)]
            {
                use std::os::unix::process::CommandExt;
                let mut args = std::env::args_os();
                let argv0 = args.next().unwrap_or_default();
                let err = std::process::Command::new("/proc/self/exe")
                    .arg0(argv0)
                    .args(args)
                    .env("OMP_WAIT_POLICY", "PASSIVE")
                    .env(REEXEC_MARK, "1")
                    .exec();
                eprintln!("warning: could not re-execute with OMP_WAIT_POLICY=PASSIVE ({err}); OpenMP keeps its default wait policy");
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
        let d = |opt, policy, re, gomp| decide(opt, policy, re, gomp).unwrap();
        assert_eq!(d(None, None, false, true), Decision::Reexec);
        assert_eq!(d(Some("passive"), None, false, true), Decision::Reexec);
        // The re-executed process, or no libgomp: never again / nothing to set.
        assert_eq!(d(None, None, true, true), Decision::Keep(Wait::Inherited));
        assert_eq!(d(None, None, false, false), Decision::Keep(Wait::Inherited));
        // The user's own setting wins; the opt-out leaves the default.
        assert_eq!(
            d(None, Some("PASSIVE"), false, true),
            Decision::Keep(Wait::Passive)
        );
        assert_eq!(
            d(None, Some("active"), false, true),
            Decision::Keep(Wait::Inherited)
        );
        assert_eq!(
            d(Some("default"), None, false, true),
            Decision::Keep(Wait::Inherited)
        );
        let e = format!("{:#}", decide(Some("spin"), None, false, true).unwrap_err());
        assert!(e.contains("FACEREC_OMP_WAIT") && e.contains("spin"), "{e}");
    }
}
