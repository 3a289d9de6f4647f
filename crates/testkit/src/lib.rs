//! Test support shared by the facerec crates; a dev-dependency only.
//!
//! - [`oracle()`] (module [`mod@oracle`]): runs our independent oracles (`data-scripts/*.py`)
//!   or, without the interpreter, reads their frozen answers (`data-scripts/fixtures/`), so every
//!   parity assertion runs everywhere.
//! - [`gradcheck`]: the finite-difference gradient checker in f64 that every head and
//!   regularizer is tested with.
//! - [`randn`], [`randn_vec`]: standard-normal draws from a seeded ChaCha stream (independent of
//!   libtorch's global generator, which parallel tests share).
//! - [`require`] / [`python`]: the policy for tests that need something from outside the crate:
//!   under CI (`CI=true`) a missing resource fails the test loudly; elsewhere the test prints a
//!   clear skip note and returns.

pub mod gradcheck;
pub mod oracle;

pub use oracle::oracle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::path::PathBuf;
use tch::Tensor;

/// `n` standard-normal f64 draws from `ChaCha8Rng::seed_from_u64(seed)`, in stream order.
pub fn randn_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

/// An f64 tensor of shape `shape` filled row-major with [`randn_vec`]`(seed, numel)`.
///
/// # Panics
/// If a dimension is negative.
pub fn randn(seed: u64, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let n = usize::try_from(n).expect("a non-negative shape");
    Tensor::from_slice(&randn_vec(seed, n)).view(shape)
}

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

/// A JSON array of numbers as `Vec<f64>`; `null` (how the oracles write NaN) reads as NaN.
///
/// # Panics
/// When `v` is not an array of numbers and nulls.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| {
            if x.is_null() {
                f64::NAN
            } else {
                x.as_f64().expect("a number")
            }
        })
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
