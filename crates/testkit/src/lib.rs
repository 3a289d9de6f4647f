//! Test support shared by the facerec crates; a dev-dependency only.
//!
//! Owns the policy for tests that need something from outside the crate (the Python interpreter
//! with torch and numpy that runs our independent oracles): under CI (`CI=true`) a missing resource
//! fails the test loudly; elsewhere the test prints a clear skip note and returns.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Apply the CI policy to a resource lookup: `Some` passes through; `None` panics on CI and prints
/// a `SKIPPED:` note elsewhere.
///
/// # Panics
/// When `found` is `None` and `CI=true`.
pub fn require<T>(found: Option<T>, what: &str) -> Option<T> {
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("\n*** CI: {what} is missing, so this test cannot run ***\n");
        }
        eprintln!("SKIPPED: {what} is missing; run the tests through `cargo xtask test`");
    }
    found
}

/// The Python interpreter of the oracles, from `$FACEREC_PYTHON` (which `cargo xtask` sets to the
/// environment holding torch 2.13.0 and numpy).
///
/// # Panics
/// When it is missing and `CI=true`.
pub fn python() -> Option<PathBuf> {
    let found = std::env::var_os("FACEREC_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists());
    require(found, "the oracle interpreter ($FACEREC_PYTHON)")
}

/// Run the oracle `data-scripts/<script>` with [`python`], `request` as JSON on its stdin, and
/// return its JSON answer. `None` when the interpreter is missing outside CI (see [`require`]).
///
/// # Panics
/// When the script fails or answers something that is not JSON.
pub fn oracle(script: &str, request: &serde_json::Value) -> Option<serde_json::Value> {
    let py = python()?;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data-scripts").join(script);
    let mut child = Command::new(py)
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
    child.stdin.take().expect("stdin").write_all(request.to_string().as_bytes()).expect("writing the request");
    let out = child.wait_with_output().expect("waiting for the oracle");
    assert!(out.status.success(), "{} failed", path.display());
    Some(serde_json::from_slice(&out.stdout).expect("oracle JSON"))
}

/// A JSON array of numbers as `Vec<f64>`; `null` (how the oracles write NaN) reads as NaN.
///
/// # Panics
/// When `v` is not an array of numbers and nulls.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| if x.is_null() { f64::NAN } else { x.as_f64().expect("a number") })
        .collect()
}

/// Assert `|a − e| ≤ rtol·|e| + rtol·1e-2·max|e| + floor` element by element: relative, with an
/// absolute floor scaled to the largest entry (gradient entries of far-off classes are tiny and
/// only meaningful absolutely) plus `floor` for rounding noise.
///
/// # Panics
/// On a length mismatch or the first element out of tolerance, naming `what` and the index.
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], rtol: f64, floor: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0f64, |a, x| a.max(x.abs()));
    for (k, (a, e)) in actual.iter().zip(expected).enumerate() {
        let tol = rtol * e.abs() + rtol * 1e-2 * scale + floor;
        assert!(
            (a - e).abs() <= tol,
            "{what}[{k}]: ours {a:.12e}, oracle {e:.12e} (|diff| {:.2e} > {tol:.2e})",
            (a - e).abs()
        );
    }
}
