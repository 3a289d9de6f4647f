//! MagFace: Meng, Zhao, Huang, Zhou, "MagFace: A Universal Representation for Face Recognition
//! and Quality Assessment", CVPR 2021, arXiv 2103.06627.
//!
//! Idea: the un-normalised feature norm `a = ‖x‖` becomes a quality measure. The target gets an
//! angular margin that grows with the norm, `z_y = s·cos(θ_y + m(a))`, and a regulariser `g(a)`
//! rewards large norms, so that only samples the model can pull close to their class centre
//! afford a large norm (and the large margin that comes with it):
//!
//! ```text
//! m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m        (linear, m(l_a) = l_m, m(u_a) = u_m)
//! g(a) = 1/a + a/u_a²                                    (convex, g'(u_a) = 0)
//! L    = mean_i [ CE_i(s·cos(θ_y + m(a_i)), s·cos θ_j) + λ_g·g(a_i) ]
//! ```
//!
//! with `a` clamped to `[l_a, u_a]`. Defaults (the paper's): `l_a = 10`, `u_a = 110`,
//! `l_m = 0.45`, `u_m = 0.8`, `λ_g = 35`, `s = 64`.
//!
//! How we read it:
//! - The norm is that of the backbone's embedding before normalisation (the trainer passes
//!   `‖emb_i‖` as `norms_b` to [`MarginHead::logits_with_norms`] and
//!   [`MarginHead::norm_penalty`]). Gradients flow through both `m(a)` and `g(a)` into the norm
//!   (the paper's analysis treats `a` as a variable of both terms); the clamp to `[l_a, u_a]`
//!   passes no gradient outside the interval, so a norm below `l_a` is not pushed up by `g`.
//! - `cos(θ + m(a))` is [`AngularMargin::per_row`] with the `exact` gradient and its fallback
//!   `cos θ − m·sin m` past `θ = π − m`.
//! - Without feature norms ([`MarginHead::logits`]) every row gets the smallest margin `l_m`.
//! - The regulariser's mean is over the rows of the micro-batch, like the cross-entropy; under
//!   model parallelism the loss adds it once (its gradient on rank 0 only, see
//!   [`crate::sharded_training_loss`]).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::{Kind, Tensor};

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{check_head_inputs, scaled_targets, validate_scale, MarginHead, Scale};
use crate::normface::default_scale;

/// `[head] type = "magface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MagFaceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Lower end `l_a` of the feature norms the margin and the regulariser see, > 0. Default 10.
    #[serde(default = "default_l_a")]
    pub l_a: f64,
    /// Upper end `u_a`, > `l_a`. Default 110.
    #[serde(default = "default_u_a")]
    pub u_a: f64,
    /// Margin at `a = l_a` (radians), `l_m >= 0`. Default 0.45.
    #[serde(default = "default_l_m")]
    pub l_m: f64,
    /// Margin at `a = u_a`, in `[l_m, π)`. Default 0.8.
    #[serde(default = "default_u_m")]
    pub u_m: f64,
    /// Weight `λ_g` of the regulariser, >= 0 (0: no regulariser). Default 35.
    #[serde(default = "default_lambda_g")]
    pub lambda_g: f64,
}

fn default_l_a() -> f64 {
    10.0
}
fn default_u_a() -> f64 {
    110.0
}
fn default_l_m() -> f64 {
    0.45
}
fn default_u_m() -> f64 {
    0.8
}
fn default_lambda_g() -> f64 {
    35.0
}

impl Default for MagFaceConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            l_a: default_l_a(),
            u_a: default_u_a(),
            l_m: default_l_m(),
            u_m: default_u_m(),
            lambda_g: default_lambda_g(),
        }
    }
}

impl MagFaceConfig {
    /// `s` finite and > 0; `0 < l_a < u_a` (finite); `0 <= l_m <= u_m < π`; `lambda_g >= 0`.
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        let (la, ua, lm, um, lg) = (self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g);
        ensure!(
            la.is_finite() && la > 0.0,
            "l_a must be finite and > 0, got {la}"
        );
        ensure!(
            ua.is_finite() && ua > la,
            "u_a must be finite and > l_a = {la}, got {ua}"
        );
        ensure!(lm.is_finite() && lm >= 0.0, "l_m must be >= 0, got {lm}");
        ensure!(
            (lm..PI).contains(&um),
            "u_m must be in [l_m, π) = [{lm}, π), got {um}"
        );
        ensure!(
            lg.is_finite() && lg >= 0.0,
            "lambda_g must be finite and >= 0, got {lg}"
        );
        Ok(())
    }
}

/// MagFace head: `z_y = s·cos(θ_y + m(a))`, `z_j = s·cos θ_j`, plus `λ_g·mean g(a)` as
/// [`MarginHead::norm_penalty`].
///
/// # Shapes
/// [`MarginHead::logits_with_norms`]: `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` ->
/// `[B, C]`.
#[derive(Debug, Clone)]
pub struct MagFace {
    cfg: MagFaceConfig,
}

impl MagFace {
    /// Builds the head from a (validated) config.
    pub fn new(cfg: &MagFaceConfig) -> Self {
        Self { cfg: cfg.clone() }
    }

    /// `a = clamp(‖x‖, l_a, u_a)` (differentiable inside the interval).
    fn clamped(&self, norms_b: &Tensor) -> Tensor {
        norms_b.clamp(self.cfg.l_a, self.cfg.u_a)
    }

    /// `m(a)` of the clamped norms (differentiable).
    ///
    /// # Shapes
    /// `norms_b [B]` -> `[B]`.
    pub fn margins(&self, norms_b: &Tensor) -> Tensor {
        let c = &self.cfg;
        let slope = (c.u_m - c.l_m) / (c.u_a - c.l_a);
        (self.clamped(norms_b) - c.l_a) * slope + c.l_m
    }

    /// `g(a) = 1/a + a/u_a²` of the clamped norms (differentiable).
    ///
    /// # Shapes
    /// `norms_b [B]` -> `[B]`.
    pub fn regulariser(&self, norms_b: &Tensor) -> Tensor {
        let a = self.clamped(norms_b);
        a.reciprocal() + a / (self.cfg.u_a * self.cfg.u_a)
    }

    fn logits_with_margins(&self, cos_bc: &Tensor, labels_b: &Tensor, m_b: &Tensor) -> Tensor {
        let b = check_head_inputs(cos_bc, labels_b);
        let m_b1 = m_b.to_kind(cos_bc.kind()).view([b, 1]);
        let angular = AngularMargin::per_row(&m_b1, ArcFaceGradient::Exact);
        scaled_targets(cos_bc, labels_b, Scale::Fixed(self.cfg.s), |c| {
            angular.target(c)
        })
    }
}

impl MarginHead for MagFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// Without norms: every row gets `m = l_m`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        let m = Tensor::full(
            [cos_bc.size()[0]],
            self.cfg.l_m,
            (cos_bc.kind(), cos_bc.device()),
        );
        self.logits_with_margins(cos_bc, labels_b, &m)
    }

    fn logits_with_norms(&self, cos_bc: &Tensor, labels_b: &Tensor, norms_b: &Tensor) -> Tensor {
        let m = self.margins(&norms_b.to_kind(cos_bc.kind()));
        self.logits_with_margins(cos_bc, labels_b, &m)
    }

    /// `λ_g·mean_i g(a_i)` (`None` when `λ_g = 0`).
    fn norm_penalty(&self, norms_b: &Tensor) -> Option<Tensor> {
        (self.cfg.lambda_g > 0.0).then(|| {
            let kind = match norms_b.kind() {
                Kind::Double => Kind::Double,
                _ => Kind::Float,
            };
            self.regulariser(&norms_b.to_kind(kind)).mean(kind) * self.cfg.lambda_g
        })
    }
}
