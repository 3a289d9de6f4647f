//! Test support shared by the facerec crates; a dev-dependency only.
//!
//! - [`oracle()`] (module [`mod@oracle`]): runs our independent oracles (`data-scripts/*.py`)
//!   or, without the interpreter, reads their frozen answers (`data-scripts/fixtures/`), so every
//!   parity assertion runs everywhere.
//! - [`gradcheck`]: the finite-difference gradient checker in f64 that every head and
//!   regularizer is tested with.
//! - [`randn`], [`randn_vec`]: standard-normal draws from a seeded ChaCha stream (independent of
//!   libtorch's global generator, which parallel tests share); [`fill_seeded`] gives a whole
//!   `VarStore` such weights, so inputs sent to an oracle are the same bits on every machine.
//! - [`require`] / [`python`]: the policy for tests that need something from outside the crate:
//!   under CI (`CI=true`) a missing resource fails the test loudly; elsewhere the test prints a
//!   clear skip note and returns.

pub mod gradcheck;
pub mod oracle;

pub use oracle::{oracle, oracle_with};

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

/// Overwrites every floating-point variable of `vs` with seeded draws, the `k`-th name in sorted
/// order from [`randn_vec`]`(seed + k, numel)` (values z), so that a model's weights depend
/// neither on libtorch's global generator (shared by parallel tests) nor on libtorch's arithmetic,
/// and an oracle request naming them (by [`oracle::tensor_digest`]) is the same on every machine:
///
/// - `…running_var`: `exp(0.3 z)`; `…running_mean`: `0.1 z`;
/// - other 1-d tensors: `b + 0.1 z`, with `b` = 0.25 for PReLU slopes (a name containing
///   `prelu`), 1 for the other `…weight`s (BN scales), 0 for biases;
/// - the rest (convolution and linear weights): `z · sqrt(2 / fan_in)`, `fan_in = numel / size[0]`.
///
/// Integer buffers (`num_batches_tracked`) are left alone. Values are computed in f64 and rounded
/// once to the variable's kind.
pub fn fill_seeded(vs: &tch::nn::VarStore, seed: u64) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (k, (name, mut t)) in vars.into_iter().enumerate() {
            if !t.is_floating_point() {
                continue;
            }
            let size = t.size();
            let numel = t.numel();
            let z = randn_vec(seed.wrapping_add(k as u64), numel);
            let values: Vec<f64> = if name.ends_with("running_var") {
                z.iter().map(|z| (0.3 * z).exp()).collect()
            } else if name.ends_with("running_mean") {
                z.iter().map(|z| 0.1 * z).collect()
            } else if size.len() == 1 {
                let base = if name.contains("prelu") {
                    0.25
                } else if name.ends_with("weight") {
                    1.0
                } else {
                    0.0
                };
                z.iter().map(|z| base + 0.1 * z).collect()
            } else {
                let fan_in = numel as f64 / size[0].max(1) as f64;
                let std = (2.0 / fan_in).sqrt();
                z.iter().map(|z| z * std).collect()
            };
            let src = Tensor::from_slice(&values)
                .view(size.as_slice())
                .to_kind(t.kind());
            t.copy_(&src);
        }
    });
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
