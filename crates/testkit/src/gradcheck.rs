//! Finite-difference gradient checks in f64, shared by every head's and regularizer's tests
//! (moved here from `facerec-loss-heads`, so no library crate ships test support).
//!
//! [`check_gradients`] compares autograd's gradient of a scalar function with central
//! differences `(f(x + eps·e_k) − f(x − eps·e_k)) / 2eps`, element by element, and fails when
//! `|analytic − numeric| > atol + rtol·|numeric|` anywhere (the `torch.autograd.gradcheck` rule).
//! The function is a closure over the input tensors; inputs are perturbed in place under
//! `no_grad`, so the closure sees the perturbation through its own handles (`shallow_clone`s and
//! `VarStore` variables share storage). The building blocks are public for checks that compare
//! autograd with the numeric gradient of a *different* function (straight-through estimators).

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Step and tolerances of a gradient check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheck {
    /// Central-difference step. Default 1e-6.
    pub eps: f64,
    /// Absolute tolerance. Default 1e-7.
    pub atol: f64,
    /// Relative tolerance (w.r.t. the numeric gradient). Default 1e-5.
    pub rtol: f64,
}

impl Default for GradCheck {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            atol: 1e-7,
            rtol: 1e-5,
        }
    }
}

/// Autograd gradients of the scalar `loss` w.r.t. each of `inputs` (graph not kept).
///
/// # Panics
/// If `loss` is not a scalar or an input is not part of its graph.
pub fn analytic_gradients(loss: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
    assert_eq!(loss.numel(), 1, "gradient check needs a scalar loss");
    Tensor::run_backward(&[loss], inputs, false, false)
}

/// Central-difference gradient of the scalar `f()` w.r.t. `x`, evaluated under `no_grad`.
///
/// `x` is perturbed in place one element at a time and restored bit-exactly afterwards.
///
/// # Shapes
/// `x [*]` -> `[*]` (f64, same shape as `x`).
///
/// # Panics
/// If `x` is not a contiguous f64 tensor or `f()` is not a scalar.
pub fn numerical_gradient(f: &dyn Fn() -> Tensor, x: &Tensor, eps: f64) -> Tensor {
    assert_eq!(x.kind(), Kind::Double, "gradient checks run in f64");
    assert!(x.is_contiguous(), "gradient check input must be contiguous");
    let _guard = tch::no_grad_guard();
    let flat = x.view([-1]);
    let grad: Vec<f64> = (0..flat.size()[0])
        .map(|k| {
            let mut e = flat.get(k);
            let orig = e.double_value(&[]);
            let mut at = |v: f64| {
                let _ = e.fill_(v);
                f().double_value(&[])
            };
            let g = (at(orig + eps) - at(orig - eps)) / (2.0 * eps);
            let _ = e.fill_(orig);
            g
        })
        .collect();
    Tensor::from_slice(&grad).view(x.size().as_slice())
}

/// Checks `|actual − expected| ≤ atol + rtol·|expected|` elementwise; the error names `what`,
/// the worst index and both values.
///
/// # Panics
/// If the shapes differ.
pub fn compare(what: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<()> {
    assert_eq!(actual.size(), expected.size(), "{what}: shape mismatch");
    let a = Vec::<f64>::try_from(actual.to_kind(Kind::Double).flatten(0, -1))?;
    let e = Vec::<f64>::try_from(expected.to_kind(Kind::Double).flatten(0, -1))?;
    let worst = a
        .iter()
        .zip(&e)
        .enumerate()
        .map(|(k, (a, e))| (k, (a - e).abs() - (atol + rtol * e.abs()), *a, *e))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    if let Some((k, excess, a, e)) = worst {
        if excess.is_nan() || excess > 0.0 {
            bail!(
                "{what}: element {k} is {a:.10e}, expected {e:.10e} (|diff| = {:.3e}, \
                 atol {atol:.1e}, rtol {rtol:.1e})",
                (a - e).abs()
            );
        }
    }
    Ok(())
}

/// Compares autograd's gradient of the scalar `f()` w.r.t. each named input with central
/// differences. Inputs must be f64 leaves with `requires_grad` that `f` reads.
///
/// # Panics
/// As [`analytic_gradients`] and [`numerical_gradient`].
pub fn check_gradients(
    f: impl Fn() -> Tensor,
    inputs: &[(&str, &Tensor)],
    cfg: &GradCheck,
) -> Result<()> {
    let tensors: Vec<&Tensor> = inputs.iter().map(|(_, t)| *t).collect();
    let analytic = analytic_gradients(&f(), &tensors);
    for ((name, x), a) in inputs.iter().zip(&analytic) {
        let numeric = numerical_gradient(&f, x, cfg.eps);
        compare(
            &format!("d loss / d {name}"),
            a,
            &numeric,
            cfg.atol,
            cfg.rtol,
        )?;
    }
    Ok(())
}
